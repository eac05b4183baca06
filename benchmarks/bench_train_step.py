"""Training-step time and peak memory: lorakit vs PEFT (+ bitsandbytes for QLoRA), side by side in one run.

Each case runs in its own subprocess (so peak RSS is that case's alone), cases are interleaved over `--rounds`,
and every figure is reported as a ratio to a reference measured in the same run:
- floor: a frozen-base forward + backward of the same batch (gradients to the activations only);
- lora / dora / vera / qlora for lorakit and the peer.
Usage: python benchmarks/bench_train_step.py [--quick] [--cases lorakit-lora,peft-lora,...]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CASES = [
    "floor", "lorakit-lora", "peft-lora", "lorakit-dora", "peft-dora", "lorakit-vera", "peft-vera",
    "lorakit-qlora", "peft-qlora",
]


def build_model(hidden: int, layers: int, vocab: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 2.75), num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128, vocab_size=vocab,
                         max_position_embeddings=1024)
    return LlamaForCausalLM(config)


def prepare(case: str, args: argparse.Namespace) -> torch.nn.Module:
    model = build_model(args.hidden, args.layers, args.vocab)
    library, _, method = case.partition("-")
    rank = 256 if method == "vera" else args.r
    if library == "floor":
        model.requires_grad_(False)
        model.enable_input_require_grads()  # backward runs through every layer to the activations, no weights
        return model
    if library == "lorakit":
        import lorakit

        if method == "qlora":
            lorakit.quantize(model, compute_dtype=torch.float32)
        config = (lorakit.VeraConfig(r=rank, target_modules="all-linear") if method == "vera" else
                  lorakit.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear",
                                     use_dora=method == "dora"))
        return lorakit.adapt(model, config)
    import peft

    if method == "qlora":
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        with tempfile.TemporaryDirectory() as directory:
            model.save_pretrained(directory)
            quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                       bnb_4bit_compute_dtype=torch.float32)
            model = AutoModelForCausalLM.from_pretrained(directory, quantization_config=quant, device_map="cpu")
    config = (peft.VeraConfig(r=rank, target_modules="all-linear") if method == "vera" else
              peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", use_dora=method == "dora"))
    return peft.get_peft_model(model, config)


def worker(case: str, args: argparse.Namespace) -> dict[str, float]:
    torch.set_num_threads(args.threads)
    model = prepare(case, args).train()
    rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    batch = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params or [torch.zeros(1, requires_grad=True)], lr=1e-4)
    times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"step_s": statistics.median(times), "peak_mb": peak, "model_mb": rss_model}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="hidden 512, 2 layers, seq 128, 1 round")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.layers, args.seq, args.rounds, args.steps, args.vocab = 512, 2, 128, 1, 3, 8000
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    cases = args.cases.split(",")
    results: dict[str, list[dict[str, float]]] = {case: [] for case in cases}
    forwarded = [a for a in sys.argv[1:] if not a.startswith("--cases") and a not in cases and a != args.cases]
    for _ in range(args.rounds):
        for case in cases:
            proc = subprocess.run([sys.executable, __file__, "--worker", case, *forwarded],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{case}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            results[case].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    summary = {
        case: {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        for case, runs in results.items() if runs
    }
    print(f"\nLlama hidden {args.hidden}, {args.layers} layers, batch {args.batch}x{args.seq}, r={args.r} "
          f"(VeRA r=256), {args.threads} threads, median of {args.steps} steps x {args.rounds} rounds\n")
    print("| case | step (s) | vs floor | vs lorakit LoRA | peak RSS (MB) | peak − model (MB) |")
    print("|---|---|---|---|---|---|")
    floor = summary.get("floor", {}).get("step_s")
    ours = summary.get("lorakit-lora", {}).get("step_s")
    for case, row in summary.items():
        vs_floor = f"{row['step_s'] / floor:.2f}×" if floor else "-"
        vs_ours = f"{row['step_s'] / ours:.2f}×" if ours else "-"
        print(f"| {case} | {row['step_s']:.3f} | {vs_floor} | {vs_ours} | {row['peak_mb']:.0f} | "
              f"{row['peak_mb'] - row['model_mb']:.0f} |")
    for method in ("lora", "dora", "vera", "qlora"):
        a, b = summary.get(f"lorakit-{method}"), summary.get(f"peft-{method}")
        if a and b:
            print(f"{method}: lorakit / peer step time = {a['step_s'] / b['step_s']:.2f}×, "
                  f"peak memory = {a['peak_mb'] / b['peak_mb']:.2f}×")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

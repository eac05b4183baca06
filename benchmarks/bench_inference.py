"""Inference overhead of unmerged adapters vs the base model, lorakit vs PEFT, in one process.

Forward passes (no grad) of one random-init Llama on the same batch: base; lorakit LoRA and DoRA unmerged; lorakit
LoRA merged; PEFT LoRA and DoRA unmerged. Cases are interleaved over rounds; medians; ratios to the base.
Usage: python benchmarks/bench_inference.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from bench_train_step import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.layers, args.rounds = 512, 2, 3
    torch.set_num_threads(args.threads)
    import peft

    import lorakit

    base = build_model(args.hidden, args.layers, 32000).eval()
    models = {"base": base}
    for method in ("lora", "dora"):
        options = dict(r=args.r, lora_alpha=2 * args.r, target_modules="all-linear", use_dora=method == "dora")
        ours = lorakit.adapt(copy.deepcopy(base), lorakit.LoraConfig(**options))
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**options))
        for model in (ours, theirs):
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.normal_(0, 0.01)
        models[f"lorakit-{method}"] = ours.eval()
        models[f"peft-{method}"] = theirs.eval()
    merged = copy.deepcopy(models["lorakit-lora"])
    lorakit.merge(merged)
    models["lorakit-lora-merged"] = merged
    batch = torch.randint(0, 32000, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():
            model(input_ids=batch)
        for _ in range(args.rounds):
            for name, model in models.items():
                start = time.perf_counter()
                model(input_ids=batch)
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"\nLlama hidden {args.hidden}, {args.layers} layers, batch {args.batch}x{args.seq}, r={args.r}, "
          f"{args.threads} threads, median of {args.rounds}\n")
    print("| case | forward (ms) | vs base |\n|---|---|---|")
    for name, value in medians.items():
        print(f"| {name} | {1000 * value:.1f} | {value / medians['base']:.2f}× |")
    print(f"\nunmerged DoRA / unmerged LoRA (lorakit): {medians['lorakit-dora'] / medians['lorakit-lora']:.2f}×")


if __name__ == "__main__":
    main()

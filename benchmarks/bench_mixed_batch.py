"""Mixed-batch inference: each sample of one batch runs with its own adapter (or none), against the base model.

One process builds every case from the same seeded Llama, then times no-grad forwards with the cases interleaved
round by round, so load from other jobs on the machine hits all cases alike. Each case is reported against the base
model as the median of its per-round ratios and as the ratio of the fastest times (the steadier figure when other
jobs share the CPUs, as timeit's documentation advises). Cases:
- base: the plain model;
- lorakit-<method>-single: the whole batch through one adapter;
- lorakit-<method>-mixed: two adapters and the base model in one batch (`lorakit.mixed_batch`), LoRA, DoRA and VeRA;
- peft-lora-single / peft-lora-mixed: PEFT, the mixed batch through its `adapter_names=` forward argument.
Every adapter targets all linear layers of the blocks at the same rank (VeRA too, so that only routing differs).
Usage: python benchmarks/bench_mixed_batch.py [--rounds 15] [--repeats 1] [--threads 2] [--clock wall|cpu] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import lorakit

Forward = Callable[[torch.Tensor], torch.Tensor]
METHODS = ("lora", "dora", "vera")
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def build_model(args: argparse.Namespace) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.75),
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=args.hidden // 128, vocab_size=args.vocab, max_position_embeddings=1024)
    return LlamaForCausalLM(config).eval()


def perturb(model: nn.Module, seed: int) -> None:
    """Move the trainable (just added) adapter tensors off their identity init."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.01)


def lorakit_config(method: str, r: int) -> lorakit.LoraConfig | lorakit.VeraConfig:
    if method == "vera":
        return lorakit.VeraConfig(r=r, target_modules="all-linear")
    return lorakit.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", use_dora=method == "dora")


def lorakit_cases(method: str, names: list[str], args: argparse.Namespace) -> dict[str, Forward]:
    model = build_model(args)
    for i, name in enumerate(("a", "b")):
        lorakit.adapt(model, lorakit_config(method, args.r), name)
        perturb(model, seed=i)
    lorakit.set_adapter(model, "a")

    def mixed(ids: torch.Tensor) -> torch.Tensor:
        with lorakit.mixed_batch(model, names):
            return model(input_ids=ids).logits

    return {f"lorakit-{method}-single": lambda ids: model(input_ids=ids).logits, f"lorakit-{method}-mixed": mixed}


def peft_cases(names: list[str], args: argparse.Namespace) -> dict[str, Forward]:
    import peft

    config = peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules="all-linear")
    model = peft.get_peft_model(build_model(args), config, adapter_name="a")
    perturb(model, seed=0)
    model.add_adapter("b", config)
    model.base_model.set_adapter("b")
    perturb(model, seed=1)
    model.base_model.set_adapter("a")
    model.eval()
    return {"peft-lora-single": lambda ids: model(input_ids=ids).logits,
            "peft-lora-mixed": lambda ids: model(input_ids=ids, adapter_names=names).logits}


def routing(batch: int) -> list[str]:
    """Three groups of about equal size: adapter a, adapter b, the base model."""
    return [("a", "b", "__base__")[i * 3 // batch] for i in range(batch)]


def time_once(forward: Forward, ids: torch.Tensor, repeats: int, clock: Callable[[], float]) -> float:
    start = clock()
    with torch.no_grad():
        for _ in range(repeats):
            forward(ids)
    return (clock() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds over all cases")
    parser.add_argument("--repeats", type=int, default=1, help="forwards per case per round (their mean is one sample)")
    parser.add_argument("--clock", choices=CLOCKS, default="wall",
                        help="wall: elapsed time; cpu: CPU time of this process (steadier on a shared machine, "
                             "meaningful with --threads 1, since idle threads may spin)")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 1 forward")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.repeats = 2, 1
    torch.set_num_threads(args.threads)
    names = routing(args.batch)
    base = build_model(args)
    cases: dict[str, Forward] = {"base": lambda ids: base(input_ids=ids).logits}
    for method in METHODS:
        cases.update(lorakit_cases(method, names, args))
    cases.update(peft_cases(names, args))
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    for forward in cases.values():  # warm-up
        time_once(forward, ids, 1, CLOCKS[args.clock])
    samples: dict[str, list[float]] = {case: [] for case in cases}
    for _ in range(args.rounds):
        for case, forward in cases.items():
            samples[case].append(time_once(forward, ids, args.repeats, CLOCKS[args.clock]))
    medians = {case: statistics.median(times) for case, times in samples.items()}
    ratios = {case: statistics.median(t / b for t, b in zip(times, samples["base"])) for case, times in samples.items()}
    print(f"\nLlama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, batch {args.batch}x{args.seq}, "
          f"all-linear r={args.r}, routing {names}, {args.threads} threads, {args.clock} clock, "
          f"median of {args.rounds} rounds x {args.repeats} forwards\n")
    print("| case | median (ms) | min (ms) | vs base: median of per-round ratios | vs base: min / min |")
    print("|---|---|---|---|---|")
    for case, median in medians.items():
        best = min(samples[case])
        print(f"| {case} | {1e3 * median:.1f} | {1e3 * best:.1f} | {ratios[case]:.3f}× | "
              f"{best / min(samples['base']):.3f}× |")

if __name__ == "__main__":
    main()

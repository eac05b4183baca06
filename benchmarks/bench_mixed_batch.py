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
from pathlib import Path

import torch
from bench_train_step import build_model
from report import add_report_options, emit, pyplot, save_figure, table, verdict
from torch import nn

import lorakit

Forward = Callable[[torch.Tensor], torch.Tensor]
METHODS = ("lora", "dora", "vera")
NAMES = {"lora": "LoRA", "dora": "DoRA", "vera": "VeRA"}
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
TARGET = 1.15  # a mixed batch against the base model, from the spec


def llama(args: argparse.Namespace) -> nn.Module:
    return build_model(args.hidden, args.layers, args.vocab).eval()


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
    model = llama(args)
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
    model = peft.get_peft_model(llama(args), config, adapter_name="a")
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


def verdicts(ratios: dict[str, float], args: argparse.Namespace) -> list[str]:
    """One sentence per lorakit method on the mixed-batch target; the cause and the next idea when one is missed."""
    lines, missed = [], []
    for method in METHODS:
        mixed, single = ratios[f"lorakit-{method}-mixed"], ratios[f"lorakit-{method}-single"]
        ratio = round(mixed, 2)
        line = f"- {NAMES[method]} mixed batch ≤ {TARGET}× base: {verdict(ratio <= TARGET)} ({ratio:.2f}×"
        if ratio > TARGET:
            line += f", {ratio / TARGET - 1:.0%} over"
            missed.append(method)
        lines.append(line + f"; one adapter over the whole batch: {single:.2f}×, so routing adds "
                            f"{mixed - single:+.2f}).")
    if missed:
        lines.append(
            "- Cause of the miss: in every layer each adapter gathers its rows of the input (`index_select`; DoRA also "
            "those of the base output) and scatter-adds its update into a copy of the layer output (`index_add`), "
            "extra passes over [rows, features] per adapter per layer. Next idea: sort the batch by adapter once per "
            "forward at the model level (a permutation of the input rows, undone on the logits), so every layer "
            "works on contiguous slices without gather or scatter.")
        over = [NAMES[m] for m in missed if round(ratios[f"lorakit-{m}-single"], 2) > TARGET]
        if over:
            dora = "; DoRA also recomputes its row norms every forward, which could be cached in no-grad eval mode"
            lines.append(
                f"- {' and '.join(over)}: even one adapter over the whole batch is over {TARGET}× here, so routing "
                "alone cannot close it: the adapter's own per-layer work (its small matmuls) has to shrink too"
                f"{dora if 'DoRA' in over else ''}.")
    theirs = ratios["peft-lora-mixed"]
    ours = ratios["lorakit-lora-mixed"] / theirs
    lines.append(f"- For reference, PEFT's mixed LoRA batch (`adapter_names=`; it refuses DoRA and VeRA there): "
                 f"{theirs:.2f}× base; lorakit's LoRA mixed batch is {ours:.2f}× PEFT's. With {args.rounds} rounds "
                 "on a shared machine, ratios move by a few hundredths between runs.")
    return lines


def plot(ratios: dict[str, float], args: argparse.Namespace) -> Path:
    plt = pyplot()

    names = list(ratios)
    colors = ["tab:gray" if n == "base" else "tab:blue" if n.startswith("lorakit") else "tab:orange" for n in names]
    figure, axis = plt.subplots(figsize=(7, 4))
    axis.barh(names, [ratios[n] for n in names], color=colors)
    axis.axvline(TARGET, color="black", linestyle="--", linewidth=0.8, label=f"target {TARGET}×")
    axis.invert_yaxis()
    axis.set_xlabel("forward time / base (median of per-round ratios)")
    axis.set_title("Mixed batches (blue: lorakit, orange: PEFT)")
    axis.legend(loc="lower right")
    return save_figure(args, figure, "mixed_batch.png")


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
    parser.add_argument("--quick", action="store_true", help="2 layers, vocab 8000, seq 64, 2 rounds of 1 forward")
    add_report_options(parser)
    args = parser.parse_args()
    if args.quick:
        args.layers, args.vocab, args.seq, args.rounds, args.repeats = 2, 8000, 64, 2, 1
    torch.set_num_threads(args.threads)
    names = routing(args.batch)
    base = llama(args)
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
    ratios = {case: statistics.median(t / b for t, b in zip(times, samples["base"])) for case, times in samples.items()}
    setup = (f"Random-init Llama (hidden {args.hidden}, intermediate {int(args.hidden * 2.75)}, {args.layers} layers, "
             f"vocab {args.vocab}), batch {args.batch}×{args.seq}, every adapter on all linear layers at r={args.r} "
             f"(VeRA too, so that only routing differs), routing {','.join(n.strip('_') for n in names)}; no-grad "
             f"forwards, {args.threads} threads, {args.clock} clock, {args.rounds} interleaved rounds × "
             f"{args.repeats} forward(s) after a warm-up. The ratio to read is the median of per-round ratios; "
             "min / min shows the spread.")
    rows = [[case, f"{1e3 * statistics.median(times):.1f}", f"{1e3 * min(times):.1f}", f"{ratios[case]:.3f}×",
             f"{min(times) / min(samples['base']):.3f}×"] for case, times in samples.items()]
    header = ["case", "median (ms)", "min (ms)", "vs base: median of per-round ratios", "vs base: min / min"]
    markdown = "\n\n".join([setup, table(header, rows), "Against the target:\n" + "\n".join(verdicts(ratios, args))])
    emit(args, "Mixed batches: each sample with its own adapter", markdown, [plot(ratios, args)])


if __name__ == "__main__":
    main()

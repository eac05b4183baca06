"""Adapter injection time on SmolLM2-135M: `lorakit.adapt` vs `peft.get_peft_model`, all linear layers.

The built-in model is loaded once; every timed call gets its own fresh `copy.deepcopy` of it, made outside the timing.
The copies share the frozen weight tensors (neither library writes them while injecting), so no 540 MB of weights
is duplicated per call, and the garbage collector runs before each call, with the libraries and the base model
frozen out of it (`gc.freeze`) so that it only scans what earlier calls left. LoRA, DoRA and VeRA cases for
both libraries are interleaved trial by trial after one untimed warm-up trial (first calls pay lazy imports); the
table gives medians.
Usage: python benchmarks/bench_injection.py [--quick] [--trials 7] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import peft
import torch
from report import add_report_options, emit, pyplot, save_figure, table, verdict
from torch import nn

import lorakit
from lorakit.models import load_model

TARGET = 0.5  # lorakit injection time / PEFT's, from the spec
METHODS = ("LoRA", "DoRA", "VeRA")
Inject = Callable[[nn.Module], nn.Module]
# Where lorakit's injection time goes (cProfile on this machine), and what would cut it, for a missed target.
CAUSES = {
    "LoRA": "lorakit's injection is mostly Python bookkeeping: walking the module tree (`named_modules`, once to "
            "find the targets and again to set the active adapter and freeze the rest), building a wrapper and an "
            "adapter per layer, and the Kaiming init of every A. Next idea: one walk that wraps, initialises and "
            "freezes in a single pass.",
    "DoRA": "on top of LoRA's bookkeeping, each layer's magnitude starts at ‖W_i‖ (B = 0 at initialisation), one "
            "full pass over every frozen weight. Next idea: compute those row norms lazily, at the first forward.",
    "VeRA": "as for LoRA, mostly walking the module tree (`named_modules`) and registering each layer's small "
            "modules; the shared projections are drawn once. Next idea: one walk that wraps, initialises and "
            "freezes in a single pass.",
}


def injections(args: argparse.Namespace) -> dict[str, Inject]:
    """Each case name -> a function that adds that adapter to a model, in place."""
    lora = {"r": args.r, "lora_alpha": 2 * args.r, "target_modules": "all-linear"}
    ours = {"LoRA": lorakit.LoraConfig(**lora), "DoRA": lorakit.LoraConfig(**lora, use_dora=True),
            "VeRA": lorakit.VeraConfig(r=args.vera_r, target_modules="all-linear")}
    theirs = {"LoRA": peft.LoraConfig(**lora), "DoRA": peft.LoraConfig(**lora, use_dora=True),
              "VeRA": peft.VeraConfig(r=args.vera_r, target_modules="all-linear")}
    cases: dict[str, Inject] = {}
    for method in METHODS:
        cases[f"lorakit {method}"] = lambda model, config=ours[method]: lorakit.adapt(model, config)
        cases[f"PEFT {method}"] = lambda model, config=theirs[method]: peft.get_peft_model(model, config)
    return cases


def fresh_copy(base: nn.Module) -> nn.Module:
    """A deep copy of the module tree that shares `base`'s parameter and buffer tensors."""
    return copy.deepcopy(base, {id(t): t for t in [*base.parameters(), *base.buffers()]})


def time_injection(inject: Inject, base: nn.Module) -> float:
    model = fresh_copy(base)
    gc.collect()  # the previous trial's garbage is not this call's cost
    start = time.perf_counter()
    inject(model)
    return time.perf_counter() - start


def plot(medians: dict[str, float], args: argparse.Namespace) -> Path:
    plt = pyplot()

    figure, axis = plt.subplots(figsize=(6, 3.5))
    positions = range(len(METHODS))
    axis.bar([p - 0.2 for p in positions], [1e3 * medians[f"lorakit {m}"] for m in METHODS], 0.4, label="lorakit")
    axis.bar([p + 0.2 for p in positions], [1e3 * medians[f"PEFT {m}"] for m in METHODS], 0.4, label="PEFT")
    axis.set_xticks(list(positions), METHODS)
    axis.set_ylabel("injection time (ms, median)")
    axis.set_title("Adapter injection on SmolLM2-135M, all linear layers")
    axis.legend()
    return save_figure(args, figure, "injection.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=7, help="timed trials per case (median), after one warm-up")
    parser.add_argument("--r", type=int, default=16, help="LoRA / DoRA rank")
    parser.add_argument("--vera-r", type=int, default=256, help="VeRA rank")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="2 trials")
    add_report_options(parser)
    args = parser.parse_args()
    if args.quick:
        args.trials = 2
    torch.set_num_threads(args.threads)
    base = load_model("smollm2-135m")[0]
    cases = injections(args)
    targeted = len(list(lorakit.adapted_layers(cases["lorakit LoRA"](fresh_copy(base)))))
    gc.collect()
    gc.freeze()  # libraries and the base model leave the collector: each gc.collect() then scans only new objects
    times: dict[str, list[float]] = {case: [] for case in cases}
    for trial in range(args.trials + 1):
        for case, inject in cases.items():
            seconds = time_injection(inject, base)
            if trial:
                times[case].append(seconds)
    medians = {case: statistics.median(values) for case, values in times.items()}
    ratios = {method: round(medians[f"lorakit {method}"] / medians[f"PEFT {method}"], 2) for method in METHODS}
    rows = [[method, f"{1e3 * medians[f'lorakit {method}']:.0f}", f"{1e3 * medians[f'PEFT {method}']:.0f}",
             f"{ratios[method]:.2f}×"] for method in METHODS]
    sentences = []
    for method, ratio in ratios.items():
        sentence = f"- {method} injection ≤ {TARGET}× PEFT's: {verdict(ratio <= TARGET)} ({ratio:.2f}×"
        if ratio <= TARGET:
            sentences.append(sentence + ").")
        else:
            sentences.append(sentence + f", {ratio / TARGET - 1:.0%} over): {CAUSES[method]}")
    setup = (f"SmolLM2-135M-Instruct, all linear layers of the blocks ({targeted} layers; `lm_head` excluded by both), "
             f"LoRA and DoRA r={args.r}, VeRA r={args.vera_r}; wall time of `lorakit.adapt` vs "
             f"`peft.get_peft_model` on a fresh copy of the loaded model per call (sharing its frozen weights, made "
             "outside the timing), "
             f"{args.threads} threads, cases interleaved, median of {args.trials} trials after one warm-up.")
    markdown = "\n\n".join([
        setup,
        table(["method", "lorakit (ms)", "PEFT (ms)", "lorakit / PEFT"], rows),
        "Against the target (the spec's ≤ 0.5× PEFT, applied to each method):\n" + "\n".join(sentences),
    ])
    emit(args, "Adapter injection vs PEFT on SmolLM2-135M", markdown, [plot(medians, args)])


if __name__ == "__main__":
    main()

"""Inference cost of unmerged and merged adapters against the base model, lorakit vs PEFT, in one process.

Forward passes (no grad) of one random-init Llama on the same batch: the base; LoRA and DoRA unmerged in each library;
LoRA merged in each library (lorakit: `lorakit.merge`, which keeps its wrappers so that `unmerge` can undo it; PEFT:
`merge_and_unload` on a copy, which leaves a plain model). Adapter B matrices are moved off zero so that every
update is real. Cases are interleaved over rounds after one warm-up round; medians; ratios to the base.
Usage: python benchmarks/bench_inference.py [--quick] [--rounds 7]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import peft
import torch
from bench_train_step import build_model
from report import add_report_options, emit, pyplot, save_figure, table, verdict
from torch import nn

import lorakit

MERGED_TOLERANCE = 0.03  # a merged model is judged equal to the base within this run-to-run spread
DORA_TARGET = 1.1  # lorakit unmerged DoRA / unmerged LoRA


def perturb(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)
    return model.eval()


def build_cases(args: argparse.Namespace) -> dict[str, nn.Module]:
    base = build_model(args.hidden, args.layers, args.vocab).eval()
    models = {"base": base}
    for method in ("LoRA", "DoRA"):
        options = {"r": args.r, "lora_alpha": 2 * args.r, "target_modules": "all-linear", "use_dora": method == "DoRA"}
        ours = lorakit.adapt(copy.deepcopy(base), lorakit.LoraConfig(**options))
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**options))
        models[f"lorakit {method}, unmerged"], models[f"PEFT {method}, unmerged"] = perturb(ours), perturb(theirs)
    merged = copy.deepcopy(models["lorakit LoRA, unmerged"])
    lorakit.merge(merged)
    models["lorakit LoRA, merged"] = merged
    models["PEFT LoRA, merged and unloaded"] = copy.deepcopy(models["PEFT LoRA, unmerged"]).merge_and_unload()
    return models


def interleaved_medians(models: dict[str, nn.Module], batch: torch.Tensor, rounds: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for round_index in range(rounds + 1):
            for name, model in models.items():
                start = time.perf_counter()
                model(input_ids=batch)
                if round_index:
                    times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def verdicts(ratios: dict[str, float]) -> list[str]:
    lines = []
    for method in ("LoRA", "DoRA"):
        ours, theirs = ratios[f"lorakit {method}, unmerged"], ratios[f"PEFT {method}, unmerged"]
        lines.append(f"- Unmerged {method}: lorakit {ours:.2f}× the base, PEFT {theirs:.2f}× (lorakit / PEFT "
                     f"{ours / theirs:.2f}×).")
    dora = round(ratios["lorakit DoRA, unmerged"] / ratios["lorakit LoRA, unmerged"], 2)
    line = f"- Unmerged DoRA ≤ {DORA_TARGET}× unmerged LoRA in lorakit: {verdict(dora <= DORA_TARGET)} ({dora:.2f}×"
    if dora <= DORA_TARGET:
        line += "): the base output is reused and the row norms come from the r×r Gram identity, not a dense W + sBA."
    else:
        line += (f", {dora / DORA_TARGET - 1:.0%} over). The base output is already reused and the row norms come from "
                 "the r×r Gram identity, but every forward still recomputes them, with one W·Aᵀ matmul over each "
                 "weight. Next idea: in no-grad eval mode the norms are constant, so cache them until the adapter's "
                 "or the base's weights change.")
    lines.append(line)
    for name in ("lorakit LoRA, merged", "PEFT LoRA, merged and unloaded"):
        ratio = round(ratios[name], 2)
        met = ratio <= 1 + MERGED_TOLERANCE
        line = f"- Merged = base (1.00×, within {MERGED_TOLERANCE:.0%}), {name}: {verdict(met)} ({ratio:.2f}×"
        if met:
            line += ")."
        else:
            line += (f", {ratio - 1:.0%} over): a merged model runs the base's matmuls and nothing else (lorakit's "
                     "kept wrappers add one Python call per layer, microseconds per forward), so the gap is this "
                     "machine's run-to-run noise; more rounds (`--rounds 15`) would settle it.")
        lines.append(line)
    return lines


def plot(ratios: dict[str, float], args: argparse.Namespace) -> Path:
    plt = pyplot()

    names = list(ratios)
    colors = ["tab:gray" if n == "base" else "tab:blue" if n.startswith("lorakit") else "tab:orange" for n in names]
    figure, axis = plt.subplots(figsize=(8, 3.5))
    axis.barh(names, [ratios[n] for n in names], color=colors)
    axis.axvline(1.0, color="black", linewidth=0.8)
    axis.invert_yaxis()
    axis.set_xlabel("forward time / base (median)")
    figure.suptitle("Inference vs the base model (blue: lorakit, orange: PEFT)")
    return save_figure(args, figure, "inference.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="hidden 512, 2 layers, vocab 8000, 3 rounds")
    add_report_options(parser)
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.layers, args.vocab, args.rounds = 512, 2, 8000, 3
    torch.set_num_threads(args.threads)
    models = build_cases(args)
    batch = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    medians = interleaved_medians(models, batch, args.rounds)
    ratios = {name: value / medians["base"] for name, value in medians.items()}
    setup = (f"Random-init Llama (hidden {args.hidden}, intermediate {int(args.hidden * 2.75)}, {args.layers} layers, "
             f"vocab {args.vocab}), batch {args.batch}×{args.seq}, LoRA / DoRA r={args.r} on all linear layers with B "
             f"off zero, float32, no grad, {args.threads} threads, median of {args.rounds} interleaved rounds after "
             "one warm-up.")
    rows = [[name, f"{1e3 * medians[name]:.1f}", f"{ratios[name]:.2f}×"] for name in models]
    markdown = "\n\n".join([setup, table(["case", "forward (ms)", "vs base"], rows),
                            "Against the targets:\n" + "\n".join(verdicts(ratios))])
    emit(args, "Inference: unmerged and merged adapters vs the base model", markdown, [plot(ratios, args)])


if __name__ == "__main__":
    main()

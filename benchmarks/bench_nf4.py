"""NF4 quantize / dequantize speed and accuracy: lorakit against bitsandbytes (CPU) and torchao, side by side.

    python benchmarks/bench_nf4.py            # 4096 x 4096, 2 threads, 25 dequantize runs, 3 quantize runs
    python benchmarks/bench_nf4.py --quick    # 2048 x 2048, 5 dequantize runs, 1 quantize run

Every contender sees the same N(0, 1) tensor in one process; runs are interleaved (each round calls every
contender once) so background load hits them alike; the table gives medians and speed ratios (peer time / lorakit
time, so > 1 means lorakit is faster). Peers that are not installed are skipped.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from report import add_report_options, emit, pyplot, save_figure, table, verdict

from lorakit.quant.nf4 import NF4Linear, quantize_nf4

BITSANDBYTES_TARGET = 0.5  # lorakit speed / bitsandbytes' speed, at least (the spec)
TORCHAO_TARGET = 10.0  # lorakit speed / torchao's speed, at least (the spec)


def load_bitsandbytes() -> dict[str, Callable] | None:
    try:
        import bitsandbytes.functional as bnbf
    except (ImportError, OSError, RuntimeError):  # not installed, or its native library does not load here
        return None

    def quantize(weight: torch.Tensor):
        return bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")

    def dequantize(quantized, dtype: torch.dtype) -> torch.Tensor:
        packed, state = quantized
        state.dtype = dtype  # the output dtype; the stored codes do not depend on it
        return bnbf.dequantize_4bit(packed, state)

    return {"quantize": quantize, "dequantize": dequantize}


def load_torchao() -> dict[str, Callable] | None:
    to_nf4 = None
    for module in ("torchao.dtypes.nf4tensor", "torchao.quantization.quantize_.workflows.nf4.nf4_tensor"):
        try:
            to_nf4 = __import__(module, fromlist=["to_nf4"]).to_nf4
            break
        except (ImportError, AttributeError, OSError, RuntimeError):  # absent, another layout, or does not load
            continue
    if to_nf4 is None:
        return None

    def quantize(weight: torch.Tensor):
        return to_nf4(weight, 64, 256)  # block 64, scaler block 256 (its double quantization)

    def dequantize(quantized, dtype: torch.dtype) -> torch.Tensor:
        return quantized.get_original_weight().to(dtype)  # torchao dequantizes to the dtype it quantized from

    return {"quantize": quantize, "dequantize": dequantize}


def lorakit_contender() -> dict[str, Callable]:
    return {"quantize": quantize_nf4, "dequantize": lambda quantized, dtype: quantized.dequantize(dtype)}


def interleaved_medians(calls: dict[str, Callable[[], object]], runs: int) -> dict[str, float]:
    """Median wall time in ms of each call; every round runs each call once (after one warm-up round)."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for round_index in range(runs + 1):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            if round_index:
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def relative_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    return ((approx.float() - weight.float()).norm() / weight.float().norm()).item()


def layer_step_medians(size: int, tokens: int, runs: int) -> dict[str, float]:
    """Forward + input-gradient backward of a frozen size x size float32 layer on [tokens, size]: dense vs NF4.

    float32 because CPUs without native bf16 matmul (AVX2) run bf16 matmuls far slower than float32 ones.
    """
    dense = torch.nn.Linear(size, size).requires_grad_(False)
    nf4 = NF4Linear.from_linear(dense)
    x = torch.randn(tokens, size, requires_grad=True)
    grad = torch.randn(tokens, size)

    def step(layer: torch.nn.Module) -> None:
        layer(x).backward(grad)

    return interleaved_medians({"dense": lambda: step(dense), "nf4": lambda: step(nf4)}, runs)


Rows = list[tuple[str, dict[str, float]]]  # (operation, median ms by contender)


def bitsandbytes_verdict(rows: Rows) -> str:
    """The ≥ 0.5× bitsandbytes target over every operation, with the cause of a miss."""
    ratios = {operation: medians["bitsandbytes"] / medians["lorakit"] for operation, medians in rows}
    worst = min(ratios, key=ratios.__getitem__)
    low, met = round(ratios[worst], 2), round(ratios[worst], 2) >= BITSANDBYTES_TARGET
    line = (f"- ≥ {BITSANDBYTES_TARGET}× bitsandbytes' speed: {verdict(met)} ({low:.2f}–{max(ratios.values()):.2f}× "
            f"over the {len(ratios)} operations, the lowest for {worst}")
    if met:
        return line + ")."
    line += f"; it would need to run {BITSANDBYTES_TARGET / low:.2f}× faster). "
    if worst.startswith("dequantize"):
        return line + ("bitsandbytes' native kernel reads each packed byte and its block scale and writes the "
                       "output in one pass; lorakit makes two PyTorch passes (a byte-pair table gather into a float32 "
                       "scratch, then the per-block scale multiply that writes the output). Next idea: one fused pass "
                       "in a C++ kernel (a `torch.compile`d one was slower, see `nf4_notes.md`).")
    return line + ("lorakit's quantize makes five PyTorch passes per chunk (absmax, scale, clamp, bucketize, pack) "
                   "plus the double quantization of the scales. Next idea: fuse them into one pass per chunk.")


def torchao_verdict(rows: Rows, floors: dict[str, float], size: int) -> str:
    """The ≥ 10× torchao target over every operation, with the cause of a miss (the dequantize's write floor)."""
    ratios = {operation: medians["torchao"] / medians["lorakit"] for operation, medians in rows}
    worst = min(ratios, key=ratios.__getitem__)
    low, met = round(ratios[worst], 2), round(ratios[worst], 2) >= TORCHAO_TARGET
    line = (f"- ≥ {TORCHAO_TARGET:.0f}× torchao's speed: {verdict(met)} ({low:.2f}–{max(ratios.values()):.2f}× over "
            f"the {len(ratios)} operations, the lowest for {worst}")
    if met:
        return line + ")."
    line += f"; it would need to run {TORCHAO_TARGET / low:.1f}× faster)."
    missed = [(operation, medians) for operation, medians in rows if ratios[operation] < TORCHAO_TARGET]
    for kind in ("dequantize", "quantize"):
        of_kind = [(op, medians) for op, medians in missed if op.startswith(kind)]
        if not of_kind:
            continue
        operation, medians = max(of_kind, key=lambda row: row[1]["lorakit"] / row[1]["torchao"])
        budget = medians["torchao"] / TORCHAO_TARGET
        line += (f" 10× torchao's {medians['torchao']:.0f} ms for {operation} leaves {budget:.1f} ms, against "
                 f"lorakit's {medians['lorakit']:.1f} ms")
        if kind == "quantize":
            line += (": it makes five PyTorch passes per chunk (absmax, scale, clamp, bucketize, pack) plus the double "
                     "quantization of the scales.")
            continue
        label = operation.removeprefix("dequantize to ")
        mib = size * size * torch.empty(0, dtype=getattr(torch, label)).element_size() / 2**20
        line += f"; allocating and writing the {mib:.0f} MiB output alone takes {floors[label]:.1f} ms here"
        if floors[label] >= budget:
            line += (", so no dequantize that returns a fresh tensor can reach it: torchao's own time is what bounds "
                     "the ratio (the target assumed 113 ms for bfloat16 at 4096²).")
        else:
            line += (" and lorakit adds two passes (the byte-pair lookup into a float32 scratch, then the per-block "
                     "scale multiply that writes the output).")
    return line + (" Next idea: one fused pass per direction in a C++ kernel, reading each input once and writing the "
                   "output once (it would also close the remaining gap to bitsandbytes' dequantize).")


def plot(rows: Rows, peers: list[str], args: argparse.Namespace) -> Path:
    plt = pyplot()

    figure, axis = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(peers)
    targets = {"bitsandbytes": BITSANDBYTES_TARGET, "torchao": TORCHAO_TARGET}
    shown = list(targets.values())
    for i, peer in enumerate(peers):
        positions = [j + (i - (len(peers) - 1) / 2) * width for j in range(len(rows))]
        speeds = [medians[peer] / medians["lorakit"] for _, medians in rows]
        bars = axis.bar(positions, speeds, width, label=f"vs {peer} (dashed: target)")
        axis.axhline(targets[peer], linestyle="--", linewidth=1, color=bars.patches[0].get_facecolor())
        shown += speeds
    axis.set_yscale("log")
    axis.set_ylim(min(shown) / 1.5, max(shown) * 1.5)
    axis.set_xticks(range(len(rows)), [operation for operation, _ in rows], rotation=15, fontsize=8)
    axis.set_ylabel("lorakit speed / peer speed (log)")
    axis.set_title(f"NF4 on {args.size}×{args.size}, {args.threads} threads")
    axis.legend()
    return save_figure(args, figure, "nf4.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4096, help="the weight is size x size")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=25, help="dequantize runs per contender (median)")
    parser.add_argument("--quantize-runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="2048 x 2048, 5 dequantize runs and 1 quantize run")
    parser.add_argument("--tokens", type=int, default=1024, help="rows of the layer-step input (0: skip it)")
    add_report_options(parser)
    args = parser.parse_args()
    if args.quick:
        args.size, args.runs, args.quantize_runs = 2048, 5, 1
    torch.set_num_threads(args.threads)

    contenders = {"lorakit": lorakit_contender(), "bitsandbytes": load_bitsandbytes(), "torchao": load_torchao()}
    contenders = {name: funcs for name, funcs in contenders.items() if funcs is not None}
    peers = [name for name in contenders if name != "lorakit"]
    weight = torch.randn(args.size, args.size, generator=torch.Generator().manual_seed(0))
    versions = [f"torch {torch.__version__}", *(f"{peer} {__import__(peer).__version__}" for peer in peers)]
    load = os.getloadavg()[0]

    rows: Rows = []
    errors: dict[str, float] = {}
    floors: dict[str, float] = {}  # ms to allocate and fill an output of each dtype: the dequantize's floor
    for dtype in (torch.bfloat16, torch.float32):
        source = weight.to(dtype)
        quantized = {name: funcs["quantize"](source) for name, funcs in contenders.items()}
        quantize_calls = {
            name: (lambda f=funcs["quantize"], w=source: f(w)) for name, funcs in contenders.items()
        }
        dequantize_calls = {
            name: (lambda f=funcs["dequantize"], q=quantized[name], d=dtype: f(q, d))
            for name, funcs in contenders.items()
        }
        label = str(dtype).removeprefix("torch.")
        rows.append((f"quantize {label} (double quant)", interleaved_medians(quantize_calls, args.quantize_runs)))
        rows.append((f"dequantize to {label}", interleaved_medians(dequantize_calls, args.runs)))
        write = {"write": lambda d=dtype: torch.empty(args.size, args.size, dtype=d).fill_(0)}
        floors[label] = interleaved_medians(write, args.runs)["write"]
        if dtype == torch.float32:
            errors = {name: relative_error(weight, dequantize_calls[name]()) for name in contenders}

    header = ["operation", *(f"{name} ms" for name in contenders), *(f"lorakit speed vs {peer}" for peer in peers)]
    cells = [[operation, *(f"{medians[name]:.1f}" for name in contenders),
              *(f"{medians[peer] / medians['lorakit']:.2f}×" for peer in peers)] for operation, medians in rows]
    setup = (
        f"One {args.size}×{args.size} N(0, 1) tensor, blocks of 64, double quantization (scale blocks of 256), "
        f"{args.threads} threads, CPU {torch.backends.cpu.get_cpu_capability()}; {', '.join(versions)}; medians of "
        f"{args.runs} dequantize and {args.quantize_runs} quantize runs, contenders interleaved round by round after a "
        f"warm-up round; speed = peer time / lorakit time (> 1: lorakit faster); 1-minute load average {load:.1f} at "
        "start."
    )
    accuracy = ", ".join(f"{name} {value:.4f}" for name, value in errors.items())
    sections = [setup, table(header, cells),
                f"NF4 round-trip relative Frobenius error on N(0, 1) (float32, double quant): {accuracy}."]
    if args.tokens:
        step = layer_step_medians(args.size, args.tokens, args.runs)
        sections.append(f"An `NF4Linear` forward + input-gradient backward on [{args.tokens}, {args.size}] costs "
                        f"{step['nf4'] / step['dense']:.2f}× a frozen dense float32 layer of the same shape "
                        f"({step['nf4']:.1f} ms against {step['dense']:.1f} ms): it dequantizes twice per step.")
    verdicts = [bitsandbytes_verdict(rows) if "bitsandbytes" in peers else "- bitsandbytes: not installed.",
                torchao_verdict(rows, floors, args.size) if "torchao" in peers else "- torchao: not installed."]
    sections.append("Against the targets:\n" + "\n".join(verdicts))
    emit(args, "NF4 quantize / dequantize vs bitsandbytes and torchao", "\n\n".join(sections),
         [plot(rows, peers, args)] if peers else [])


if __name__ == "__main__":
    main()

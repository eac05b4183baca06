"""NF4 quantize / dequantize speed and accuracy: lorakit against bitsandbytes (CPU) and torchao, side by side.

    python benchmarks/bench_nf4.py            # 4096 x 4096, 2 threads, 25 dequantize runs, 3 quantize runs
    python benchmarks/bench_nf4.py --quick    # 5 dequantize runs, 1 quantize run

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

import torch

from lorakit.nf4 import NF4Linear, quantize_nf4


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4096, help="the weight is size x size")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=25, help="dequantize runs per contender (median)")
    parser.add_argument("--quantize-runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="5 dequantize runs and 1 quantize run")
    parser.add_argument("--tokens", type=int, default=1024, help="rows of the layer-step input (0: skip it)")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.quantize_runs = 5, 1
    torch.set_num_threads(args.threads)

    contenders = {"lorakit": lorakit_contender(), "bitsandbytes": load_bitsandbytes(), "torchao": load_torchao()}
    contenders = {name: funcs for name, funcs in contenders.items() if funcs is not None}
    weight = torch.randn(args.size, args.size, generator=torch.Generator().manual_seed(0))

    versions = [f"torch {torch.__version__}"]
    for module in ("bitsandbytes", "torchao"):
        if module in contenders:
            versions.append(f"{module} {__import__(module).__version__}")
    cpu = torch.backends.cpu.get_cpu_capability()
    print(f"# NF4, {args.size}x{args.size}, N(0,1), {args.threads} threads, CPU {cpu}; {', '.join(versions)}; "
          f"load average at start {os.getloadavg()[0]:.2f}\n")

    rows: list[tuple[str, dict[str, float]]] = []
    errors: dict[str, float] = {}
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
        if dtype == torch.float32:
            errors = {name: relative_error(weight, dequantize_calls[name]()) for name in contenders}

    peers = [name for name in contenders if name != "lorakit"]
    header = ["operation", *(f"{name} ms" for name in contenders), *(f"{peer} / lorakit" for peer in peers)]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for operation, medians in rows:
        cells = [operation, *(f"{medians[name]:.1f}" for name in contenders)]
        cells += [f"{medians[peer] / medians['lorakit']:.2f}x" for peer in peers]
        print("| " + " | ".join(cells) + " |")
    print("\nNF4 round-trip relative Frobenius error on N(0,1) (float32, double quant): "
          + ", ".join(f"{name} {value:.4f}" for name, value in errors.items()))
    if args.tokens:
        step = layer_step_medians(args.size, args.tokens, args.runs)
        print(f"\nFrozen {args.size}x{args.size} float32 layer, forward + input-gradient backward on "
              f"[{args.tokens}, {args.size}]: dense nn.Linear {step['dense']:.1f} ms, NF4Linear {step['nf4']:.1f} ms "
              f"({step['nf4'] / step['dense']:.2f}x)")


if __name__ == "__main__":
    main()

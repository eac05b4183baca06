"""The frozen base layer an adapter sits on, seen through one small interface.

A base computes y = W·x + b with W [out, in]. It is one of:
- nn.Linear (weight stored [out, in]);
- Hugging Face's Conv1D of the GPT-2 family (weight stored transposed, [in, out]);
- nn.Embedding, a linear map from one-hot token vectors: W [dim, num_embeddings] = its weight transposed, so a
  token's row of the embedding table is a column (an input) of W;
- a *weight provider*: any module with `in_features`, `out_features` and `dense_weight()` (e.g. lorakit's NF4Linear),
  whose weight can only be read as a dense copy.
Everything above this module reads W, b and the dimensions through these functions, so no adapter and no model-level
operation knows which kind of base it holds, and the adapter core never imports a quantization backend.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def conv1d_class() -> type[nn.Module] | None:
    """Hugging Face's transposed linear layer (GPT-2 family), if transformers is importable."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


def is_conv1d(module: nn.Module) -> bool:
    conv1d = conv1d_class()
    return conv1d is not None and isinstance(module, conv1d)


def is_weight_provider(module: nn.Module) -> bool:
    """A module that is not an nn.Linear but offers the frozen base interface (e.g. NF4Linear)."""
    return all(hasattr(module, attr) for attr in ("in_features", "out_features", "dense_weight"))


def stored_transposed(base: nn.Module) -> bool:
    """The base stores W transposed, [in, out] (Conv1D, nn.Embedding)."""
    return is_conv1d(base) or isinstance(base, nn.Embedding)


def base_dims(base: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a base layer."""
    if stored_transposed(base):
        in_features, out_features = base.weight.shape
        return out_features, in_features
    return base.out_features, base.in_features


def dense_weight(base: nn.Module) -> Tensor:
    """The base weight as [out, in] (a view for dense layers, a dequantized copy for providers)."""
    if isinstance(base, nn.Linear):
        return base.weight
    if stored_transposed(base):
        return base.weight.T
    return base.dense_weight()


def base_bias(base: nn.Module) -> Tensor | None:
    return getattr(base, "bias", None)


# -- frozen matmuls in half precision on CPUs without half-precision units ----------------------------------------


@functools.cache
def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: the CPU multiplies bfloat16 in hardware."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in (" avx512_bf16", " amx_bf16"))


def matmul_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype a frozen layer's matmuls run in: `dtype`, except half precision on a CPU without native bfloat16,
    where float32 is faster. There torch falls back to a scalar kernel for half-precision products of the
    grad·W form (measured on AVX2: 5.5 s against 49 ms in float32 for [64, 5632]·[5632, 2048]; the forward x·Wᵀ
    form runs at 151 ms against 46 ms), so the product is taken in float32 and rounded back to `dtype` once."""
    if dtype in (torch.bfloat16, torch.float16) and device.type == "cpu" and not cpu_has_native_bf16():
        return torch.float32
    return dtype


CAST_CHUNK_ELEMENTS = 1 << 24  # rows of W cast at a time: a 64 MiB float32 copy, never the whole (vocab-sized) W


class FrozenLinearFunction(torch.autograd.Function):
    """y = x·Wᵀ + b for a frozen dense W, its products in `matmul_dtype` (gradients flow to x and b, never to W).
    W is cast block of rows by block of rows, so the float32 copy in flight stays small even for an output head."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(weight)
        compute = matmul_dtype(x.dtype, x.device)
        x_c = x.to(compute)
        out = torch.empty(*x.shape[:-1], weight.shape[0], dtype=x.dtype, device=x.device)  # [..., out]
        for rows in _row_blocks(weight):
            b = None if bias is None else bias[rows].to(compute)
            out[..., rows] = F.linear(x_c, weight[rows].to(compute), b)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, None, Tensor | None]:
        (weight,) = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            compute = matmul_dtype(grad_out.dtype, grad_out.device)
            total = None
            for rows in _row_blocks(weight):  # Σ over row blocks of grad[..., rows] @ W[rows]: [..., in]
                part = grad_out[..., rows].to(compute) @ weight[rows].to(compute)
                total = part if total is None else total.add_(part)
            grad_x = total.to(grad_out.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, None, grad_bias


def _row_blocks(weight: Tensor) -> list[slice]:
    step = max(1, CAST_CHUNK_ELEMENTS // weight.shape[1])
    return [slice(start, start + step) for start in range(0, weight.shape[0], step)]


def frozen_linear_forward(base: nn.Module, x: Tensor) -> Tensor:
    """base(x), through FrozenLinearFunction where that is faster: a frozen half-precision nn.Linear whose products
    run in another dtype. Everything else, bit for bit, is the base's own forward."""
    if type(base) not in (nn.Linear, FrozenLinear):
        return base(x)
    weight = base.weight
    if weight.requires_grad or matmul_dtype(weight.dtype, weight.device) == weight.dtype or x.dtype != weight.dtype:
        return F.linear(x, weight, base.bias)
    return FrozenLinearFunction.apply(x, weight, base.bias)


class FrozenLinear(nn.Linear):
    """An nn.Linear (same parameters, state dict and isinstance) whose forward is `frozen_linear_forward`. The loader
    gives it to the dense linear layers of a half-precision model on a CPU without native bfloat16, so that layers no
    adapter wraps (the output head) also keep out of the slow kernel."""

    def forward(self, x: Tensor) -> Tensor:
        return frozen_linear_forward(self, x)


def dense_module(base: nn.Module, weight: Tensor, dtype: torch.dtype) -> nn.Module:
    """A plain dense layer holding `weight` [out, in] and `base`'s bias: Conv1D if the base is or came from one
    (a provider records that as `from_conv1d`), else nn.Linear. Used to export a provider's layer as a dense one."""
    out_features, in_features = weight.shape
    bias = base_bias(base)
    if is_conv1d(base) or getattr(base, "from_conv1d", False):
        layer = conv1d_class()(out_features, in_features).to(device=weight.device, dtype=dtype)
        target = layer.weight.T
    else:
        layer = nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device, dtype=dtype)
        target = layer.weight
    with torch.no_grad():
        target.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer

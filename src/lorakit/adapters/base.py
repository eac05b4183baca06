"""The frozen base layer an adapter sits on, seen through one small interface.

A base computes y = W·x + b with W [out, in]. It is one of:
- nn.Linear (weight stored [out, in]);
- Hugging Face's Conv1D of the GPT-2 family (weight stored transposed, [in, out]);
- a *weight provider*: any module with `in_features`, `out_features` and `dense_weight()` (e.g. lorakit's NF4Linear),
  whose weight can only be read as a dense copy.
Everything above this module reads W, b and the dimensions through these functions, so no adapter and no model-level
operation knows which kind of base it holds, and the adapter core never imports a quantization backend.
"""

from __future__ import annotations

import torch
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


def base_dims(base: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of a base layer."""
    if is_conv1d(base):
        in_features, out_features = base.weight.shape
        return out_features, in_features
    return base.out_features, base.in_features


def dense_weight(base: nn.Module) -> Tensor:
    """The base weight as [out, in] (a view for dense layers, a dequantized copy for providers)."""
    if isinstance(base, nn.Linear):
        return base.weight
    if is_conv1d(base):
        return base.weight.T
    return base.dense_weight()


def base_bias(base: nn.Module) -> Tensor | None:
    return getattr(base, "bias", None)


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

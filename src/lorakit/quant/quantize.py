"""The QLoRA base (Dettmers et al. 2023): turn a model's linear layers into frozen NF4 layers, and measure them.

`quantize(model)` replaces every eligible nn.Linear and HF Conv1D (the output head stays dense by default) by an
`NF4Linear`; `lorakit.adapt` then wraps them exactly as it wraps dense layers, so every method trains on NF4 with
no extra code. With double quantization a weight costs 4 + 8/64 + 32/(64·256) ≈ 4.127 bits, without it 4.5.
Saving and loading a quantized model is a file format: `lorakit.formats.quantized`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..adapters.base import is_conv1d
from ..adapters.init import register_quantizer
from ..adapters.layer import AdaptedLinear
from ..adapters.targets import candidate_modules, matches, replace_module
from .nf4 import NF4Linear


def _to_nf4(layer: nn.Module, blocksize: int = 64, double_quant: bool = True, compute_dtype: torch.dtype | None = None,
            weight: torch.Tensor | None = None) -> NF4Linear:
    """`layer` (or `weight` [out, in] with `layer`'s bias, as LoftQ asks) as an NF4Linear."""
    conv = is_conv1d(layer)
    if weight is None:
        weight = layer.weight.T if conv else layer.weight  # [out, in]
    nf4 = NF4Linear.from_weight(weight, layer.bias, blocksize, double_quant, compute_dtype)
    nf4.from_conv1d = conv
    return nf4


register_quantizer(4, lambda layer, weight: _to_nf4(layer, weight=weight))  # LoftQ's 4-bit base: quantize()'s defaults


def quantize(
    model: nn.Module,
    skip: tuple[str, ...] = ("lm_head",),
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Replace every nn.Linear / Conv1D not matched by `skip` (names or path suffixes) by an NF4Linear, in place.

    compute_dtype is the dtype of the dequantized weight in the matmul (default: the layer's own dtype).
    Layers already wrapped by `adapt` have their base quantized (unmerge adapters first).
    """
    for path, module in list(candidate_modules(model)):
        if matches(path, skip):
            continue
        if isinstance(module, AdaptedLinear):
            if module.merged:
                raise ValueError(f"{path} has merged adapters; unmerge() before quantizing")
            if not isinstance(module.base_layer, NF4Linear):
                module.base_layer = _to_nf4(module.base_layer, blocksize, double_quant, compute_dtype)
                module.row_norm_sq = None
        elif not isinstance(module, NF4Linear):
            replace_module(model, path, _to_nf4(module, blocksize, double_quant, compute_dtype))
    return model


@dataclass(frozen=True)
class MemoryFootprint:
    """Bytes held by a model, by storage kind."""

    nf4_codes: int
    nf4_scales: int
    dense_frozen: int
    trainable: int
    buffers: int

    @property
    def total(self) -> int:
        return self.nf4_codes + self.nf4_scales + self.dense_frozen + self.trainable + self.buffers

    def __str__(self) -> str:
        rows = [(name, getattr(self, name)) for name in ("nf4_codes", "nf4_scales", "dense_frozen", "trainable",
                                                        "buffers")] + [("total", self.total)]
        return "\n".join(f"{name:>13}: {value / 2**20:10.2f} MiB" for name, value in rows)


def memory_footprint(model: nn.Module) -> MemoryFootprint:
    """Storage of parameters and buffers (shared tensors counted once)."""
    seen: set[int] = set()
    counts = dict(nf4_codes=0, nf4_scales=0, dense_frozen=0, trainable=0, buffers=0)
    for module in model.modules():
        is_nf4 = isinstance(module, NF4Linear)
        for name, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if tensor is None or tensor.data_ptr() in seen or tensor.device.type == "meta":
                continue
            seen.add(tensor.data_ptr())
            if is_nf4 and name == "packed":
                kind = "nf4_codes"
            elif is_nf4 and name.startswith("absmax"):
                kind = "nf4_scales"
            elif isinstance(tensor, nn.Parameter):
                kind = "trainable" if tensor.requires_grad else "dense_frozen"
            else:
                kind = "buffers"
            counts[kind] += tensor.nbytes
    return MemoryFootprint(**counts)

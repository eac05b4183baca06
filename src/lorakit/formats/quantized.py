"""A quantized base saved once and loaded without quantizing again (`lorakit quantize`, `save_quantized`).

The directory holds `model.safetensors` (the model's state dict, NF4 layers as their packed codes and scales under
`<layer path>.<packed|absmax|absmax_q|absmax_scale|absmax_offset>`, non-persistent buffers such as rotary
frequencies under `non_persistent_buffer:<path>`) and `lorakit_quantization.json` (format version and, per quantized
layer, the NF4 metadata, compute dtype and whether it came from a Conv1D, and which tied weights were stored once);
an HF model also gets its `config.json` and `generation_config.json`, so `lorakit.models.load_model` (and `--model`
on the command line) loads the directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..adapters.layer import AdaptedLinear
from ..quant.nf4 import NF4Linear, NF4Weight
from .files import read_json_object

QUANT_CONFIG_NAME = "lorakit_quantization.json"
QUANT_WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1
BUFFER_PREFIX = "non_persistent_buffer:"


def _non_persistent_buffers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [
        (f"{name}.{buffer_name}" if name else buffer_name, module._buffers[buffer_name])
        for name, module in model.named_modules()
        for buffer_name in module._non_persistent_buffers_set
        if module._buffers.get(buffer_name) is not None
    ]


def save_quantized(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write a quantized (adapter-free) model so it can be loaded without quantizing again."""
    if any(isinstance(m, AdaptedLinear) for m in model.modules()):
        raise ValueError("save the quantized base without adapters (save adapters with save_adapter)")
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    layers = {
        name: {**module.quantized_weight().metadata(), "compute_dtype": str(module.compute_dtype).split(".")[-1],
               "from_conv1d": bool(getattr(module, "from_conv1d", False))}
        for name, module in model.named_modules() if isinstance(module, NF4Linear)
    }
    state: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    tied: dict[str, str] = {}
    for key, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:  # tied weights (e.g. lm_head = embed_tokens) are stored once
            tied[key] = seen[tensor.data_ptr()]
            continue
        seen[tensor.data_ptr()] = key
        state[key] = tensor.contiguous().cpu()
    for key, buffer in _non_persistent_buffers(model):  # e.g. rotary inv_freq: needed to rebuild a meta skeleton
        state[BUFFER_PREFIX + key] = buffer.contiguous().cpu()
    save_file(state, directory / QUANT_WEIGHTS_NAME, metadata={"format": "pt"})
    manifest = {"format_version": FORMAT_VERSION, "layers": layers, "tied": tied}
    (directory / QUANT_CONFIG_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "save_pretrained"):
        config.save_pretrained(directory)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(directory)
    return directory


def is_quantized_dir(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / QUANT_CONFIG_NAME).is_file()


def nf4_layer_from_tensors(path: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                           dtype: torch.dtype | None, file: Path) -> NF4Linear:
    """The NF4Linear a directory stores at `path` (its packed codes, scales and bias); `dtype`, if given, replaces the
    stored compute dtype."""
    bias = tensors.pop("bias", None)
    if bias is not None and dtype is not None:
        bias = bias.to(dtype)
    try:
        weight = NF4Weight.from_state_dict(tensors, meta)
        layer = NF4Linear(weight, bias, dtype or getattr(torch, meta["compute_dtype"]))
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{file}: layer {path}: {error}") from None
    layer.from_conv1d = bool(meta.get("from_conv1d", False))
    return layer


def read_manifest(directory: Path) -> dict[str, Any]:
    """The manifest of a directory written by save_quantized: format version, NF4 layers, tied weights."""
    file = directory / QUANT_CONFIG_NAME
    manifest = read_json_object(file, "lorakit quantized model")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{file}: unsupported format_version {manifest.get('format_version')!r}")
    return manifest

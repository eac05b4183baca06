"""Where a model's adapters live: their configs (on the model object) and the layers and module copies holding them.
Every model-level operation finds adapters through these three lookups."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from .config import AdapterConfig
from .layer import AdaptedLinear
from .modules_to_save import ModulesToSave

CONFIGS_ATTR = "lorakit_configs"


def adapter_configs(model: nn.Module) -> dict[str, AdapterConfig]:
    """The configs of the adapters in `model`, by adapter name (empty for a plain model)."""
    return model.__dict__.setdefault(CONFIGS_ATTR, {})


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, AdaptedLinear]]:
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLinear):
            yield name, module


def saved_module_wrappers(model: nn.Module) -> Iterator[tuple[str, ModulesToSave]]:
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSave):
            yield name, module


def module_device(module: nn.Module) -> torch.device:
    tensor = next(module.parameters(), None)
    if tensor is None:
        tensor = next(module.buffers())
    return tensor.device

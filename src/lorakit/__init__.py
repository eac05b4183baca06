"""lorakit: parameter-efficient fine-tuning for PyTorch (LoRA, LoRA+, QLoRA/NF4, DoRA, VeRA) in PEFT's format."""

import importlib
import sys
from typing import Any

from . import legacy
from .adapters.combine import combine_adapters
from .adapters.adalora import RankAllocator
from .adapters.config import AdaLoraConfig, LoftQConfig, LoraConfig, VeraConfig
from .adapters.layer import AdaptedLinear, Adapter
from .adapters.loraplus import create_loraplus_optimizer, loraplus_param_groups
from .adapters.model import (
    ParameterCount,
    adapt,
    adapted_layers,
    adapter_configs,
    delete_adapter,
    disable_adapters,
    merge,
    merge_and_unload,
    mixed_batch,
    set_adapter,
    trainable_parameters,
    unload,
    unmerge,
)
from .adapters.tokens import add_tokens
from .formats.peft import adapter_state_dict, load_adapter, read_adapter_config, save_adapter
from .formats.quantized import save_quantized
from .quant.nf4 import NF4Linear, NF4Weight, quantize_nf4
from .quant.quantize import MemoryFootprint, memory_footprint, quantize

__version__ = "0.1.0"

__all__ = [
    "AdaLoraConfig", "AdaptedLinear", "Adapter", "LoftQConfig", "RankAllocator", "add_tokens", "LoraConfig", "MemoryFootprint", "NF4Linear", "NF4Weight", "load_quantized",
    "load_model", "memory_footprint", "quantize", "quantize_nf4", "save_quantized", "ParameterCount", "VeraConfig", "adapt", "adapted_layers",
    "adapter_configs", "adapter_state_dict", "combine_adapters", "create_loraplus_optimizer", "delete_adapter", "disable_adapters",
    "export_gguf",
    "load_adapter", "loraplus_param_groups", "merge", "merge_and_unload", "mixed_batch", "read_adapter_config", "save_adapter",
    "set_adapter", "trainable_parameters", "unload", "unmerge",
]

LAZY = {"load_model": "models.load", "load_quantized": "models.load",  # they import transformers' model classes
        "export_gguf": "export"}


def __getattr__(name: str) -> Any:
    if name in LAZY:
        return getattr(importlib.import_module(f".{LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


legacy.install(sys.modules[__name__])

"""Will a new adapter fit? An estimate of the bytes its weights take, refused before anything is allocated.

The rule: the adapter's float32 weights, counted from the config's ranks and the targeted layers' shapes
(LoRA and AdaLoRA r·(in + out) per layer, DoRA + out, VeRA r + out per layer plus the shared r·(max in + max out),
LoRA on a parameter E·r·(in + out) for its E experts),
must fit in the memory available on the device that holds the layers (Linux's MemAvailable for the CPU, the free
memory for a CUDA device). A rank whose weights could never fit is then a clear error instead of an allocation that
grows the process by gigabytes or fails deep inside torch.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .base import base_dims
from .config import AdaLoraConfig, AdapterConfig, LoraConfig, VeraConfig
from .registry import module_device

BYTES_PER_WEIGHT = 4  # adapters train in float32


def available_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors on `device` (None: unknown, e.g. the meta device)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def adapter_weights(model: nn.Module, config: AdapterConfig, targets: list[str]) -> int:
    """How many weights the adapter of `config` on the layers at `targets` holds (module doc)."""
    dims = {path: base_dims(model.get_submodule(path)) for path in targets}  # (out, in)
    if isinstance(config, VeraConfig):
        if not dims:
            return 0
        shared = config.r * (max(i for _, i in dims.values()) + max(o for o, _ in dims.values()))
        return shared + sum(config.r + out for out, _ in dims.values())
    total = 0
    for path, (out, inp) in dims.items():
        rank = max(config.rank_for(path), config.init_r) if isinstance(config, AdaLoraConfig) else config.rank_for(path)
        total += rank * (inp + out) + (out if isinstance(config, LoraConfig) and config.use_dora else 0)
    for name, param in model.named_parameters():  # target_parameters: E·r·(in + out) per [E, out, in] parameter
        name = name.replace(".parametrizations.", ".").removesuffix(".original")
        if param.dim() in (2, 3) and any(name == t or name.endswith("." + t) for t in config.target_parameters or ()):
            experts = param.shape[0] if param.dim() == 3 else 1
            total += experts * config.rank_for(name) * (param.shape[-1] + param.shape[-2])
    return total


def check_adapter_fits(model: nn.Module, config: AdapterConfig, targets: list[str]) -> None:
    """Raise a ValueError when the adapter's weights cannot fit in the memory available (module doc)."""
    needed = adapter_weights(model, config, targets) * BYTES_PER_WEIGHT
    if not needed:
        return
    free = available_bytes(module_device(model))
    if free is not None and needed > free:
        raise ValueError(f"r={config.r}: the adapter's weights would take {needed / 2**30:,.1f} GiB on "
                         f"{len(targets)} layers but {free / 2**30:,.1f} GiB are available; choose a smaller rank")

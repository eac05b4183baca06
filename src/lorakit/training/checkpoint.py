"""Training checkpoints in safetensors + JSON only (nothing is pickled), written atomically.

A checkpoint directory holds the adapter in PEFT's format (`adapter/`), `optimizer.safetensors` (every optimizer state
tensor, keyed `<param index>.<name>`, plus the torch RNG state `rng.torch`, and `rng.torch.<rank>` for the other ranks
of a distributed run, which draw their own dropout masks), and `state.json` (step, optimizer param-group settings,
scheduler, data-stream position, Python RNG state). It is written to a temporary sibling directory and renamed into
place, so a run killed at any moment leaves either the previous checkpoint or the new one, never a mix.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..adapters.config import AdaLoraConfig
from ..adapters.registry import adapter_configs
from ..formats.peft import adapter_state_dict, read_adapter_config, read_adapter_tensors, save_adapter

STATE_NAME = "state.json"
TENSORS_NAME = "optimizer.safetensors"


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def save_checkpoint(
    directory: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    extra: dict[str, Any],
    adapter_name: str = "default",
    rng_states: Sequence[torch.Tensor] | None = None,
) -> Path:
    """Atomically write everything a run needs to continue exactly where it stopped.

    `rng_states` are the torch RNG states of all ranks in rank order (default: this process's alone).
    """
    target = Path(directory)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_adapter(model, tmp / "adapter", adapter_name, residual=True)  # resumed on the same (residual) base
    tensors, optimizer_meta = _optimizer_tensors(optimizer)
    for rank, rng_state in enumerate(rng_states or [torch.get_rng_state()]):
        tensors["rng.torch" + (f".{rank}" if rank else "")] = rng_state
    save_file(tensors, tmp / TENSORS_NAME)
    scheduler_state = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    state = {"optimizer": optimizer_meta, "scheduler": scheduler_state, "python_rng": _python_rng(), **extra}
    (tmp / STATE_NAME).write_text(json.dumps(state, indent=1))
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def _python_rng() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def load_checkpoint(
    directory: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    adapter_name: str = "default",
    rank: int = 0,
) -> dict[str, Any]:
    """Restore adapter weights, optimizer, scheduler and RNG states; returns the extra state saved with them.

    `rank` picks this process's own torch RNG state from the checkpoint of a distributed run.
    """
    source = Path(directory)
    if not (source / STATE_NAME).is_file():
        raise FileNotFoundError(f"{source} holds no checkpoint ({STATE_NAME} missing)")
    state = json.loads((source / STATE_NAME).read_text())
    saved = read_adapter_tensors(source / "adapter")
    with torch.no_grad():
        for key, target in adapter_state_dict(model, adapter_name).items():
            if key not in saved:
                raise ValueError(f"checkpoint {source}: missing tensor {key}")
            if saved[key].shape != target.shape:
                raise ValueError(f"checkpoint {source}: tensor {key} has shape {tuple(saved[key].shape)}, "
                                 f"the model needs {tuple(target.shape)} (different method or rank?)")
            target.copy_(saved[key])
    saved_config = read_adapter_config(source / "adapter")
    if isinstance(saved_config, AdaLoraConfig):  # the rank pattern AdaLoRA's allocator had reached
        configs = adapter_configs(model)
        configs[adapter_name] = configs[adapter_name].replace(rank_pattern=saved_config.rank_pattern)
    tensors = load_file(source / TENSORS_NAME)
    rng_states = {key: tensors.pop(key) for key in [k for k in tensors if k.startswith("rng.torch")]}
    rng_key = "rng.torch" + (f".{rank}" if rank else "")
    if rng_key not in rng_states:
        raise ValueError(f"checkpoint {source} was written by {len(rng_states)} process(es); resume with as many")
    torch.set_rng_state(rng_states[rng_key])
    optimizer.load_state_dict(_optimizer_state(tensors, state["optimizer"]))
    scheduler.load_state_dict({**scheduler.state_dict(), **state["scheduler"]})
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    return {k: v for k, v in state.items() if k not in ("optimizer", "scheduler", "python_rng")}


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    per_param: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, _, name = key.partition(".")
        per_param.setdefault(int(index), {})[name] = value
    return {"state": per_param, "param_groups": meta["param_groups"]}

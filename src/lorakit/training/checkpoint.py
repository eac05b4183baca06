"""Training checkpoints in safetensors + JSON only (nothing is pickled), written atomically, resumed only when whole.

A checkpoint directory holds the adapter in PEFT's format (`adapter/`), `optimizer.safetensors` (every optimizer state
tensor, keyed `<param index>.<name>`, plus the torch RNG state `rng.torch`, and `rng.torch.<rank>` for the other ranks
of a distributed run, which draw their own dropout masks), `state.json` (step, optimizer param-group settings,
scheduler, data-stream position, Python RNG state) and, written last, `manifest.json`: every other file's path, size
and SHA-256. A checkpoint is *complete* when its manifest is there and every file it lists matches it.

The save protocol, for a checkpoint directory `D` written by process `PID`:
  1. refuse to write a non-finite tensor or setting (ValueError; the previous checkpoint stays as it is);
  2. remove stale temporaries: `.D.tmp-*` of writers no longer running (this process's own count as stale too);
  3. write everything into `.D.tmp-PID`, the manifest last;
  4. rename `D` (if any) to `.D.old-PID` (`.D.old-PID-<n>` if that name is taken), then `.D.tmp-PID` to `D`;
  5. delete that `.old`, and any `.D.old-*` / `.D.tmp-*` left by writers no longer running (returned, to be said).
A run killed at any moment thus leaves a complete `D`, or, killed between the two renames of step 4, no `D` and a
complete `.D.old-PID`. A live concurrent writer's temporaries are never touched; a `.tmp` is never resumed from.

Resuming (`find_resumable`) reads `D` or, when `D` is missing or not complete and valid, the newest complete and valid
`.D.old-*`, and says which. It checks, before any model exists: completeness (manifest), that `state.json` has the
expected keys and types, that its counters agree (scheduler and data stream at the saved step, one RNG state per
process), that the RNG states are states the generators accept, and that every tensor is finite. `restore` then
checks the tensors' names, shapes and dtypes and the optimizer's settings against this run's model, optimizer and
schedule before changing any of them; the scheduler's state and the learning rates are derived from the saved step.
Anything else is a one-line ValueError naming the file and the key or tensor.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..adapters.config import AdaLoraConfig, AdapterConfig
from ..adapters.registry import adapter_configs
from ..formats.peft import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    adapter_state_dict,
    read_adapter_config,
    save_adapter,
)
from ..formats.schema import (
    SchemaError,
    anything,
    array,
    boolean,
    integer,
    number,
    obj,
    optional,
    read_json,
    text,
)

STATE_NAME = "state.json"
TENSORS_NAME = "optimizer.safetensors"
ADAPTER_DIR = "adapter"
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "lorakit-checkpoint/1"
REQUIRED_FILES = (STATE_NAME, TENSORS_NAME, f"{ADAPTER_DIR}/{CONFIG_NAME}", f"{ADAPTER_DIR}/{WEIGHTS_NAME}")
TMP_MARK, OLD_MARK = ".tmp-", ".old-"
RNG_KEY = "rng.torch"


_PARAM_GROUP = obj({"params": array(integer(0)), "initial_lr": number(0), "weight_decay": number(0), "eps": number(0),
                    "betas": array(number(0), length=2)})
STATE_SCHEMA = obj({
    "optimizer": obj({"param_groups": array(_PARAM_GROUP, min_length=1), "scalars": obj({}, number())}),
    "scheduler": obj({"base_lrs": array(number(0)), "last_epoch": integer(0), "_step_count": integer(1)}),
    "python_rng": array(anything, length=3),
    "step": integer(0),
    "stream": obj({"seed": integer(), "epoch": integer(0), "index": integer(0), "shuffle": boolean,
                   "group_by_length": boolean, "n_examples": integer(1), "global_batch_size": integer(1)}),
    "world_size": integer(1),
    "config": obj({}),
})
MANIFEST_SCHEMA = obj({"format": text, "files": obj({}, obj({"size": integer(0), "sha256": text}))})


# -- writing ----------------------------------------------------------------------------------------------------------

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
) -> list[Path]:
    """Atomically write everything a run needs to continue exactly where it stopped (protocol: module docstring).

    `rng_states` are the torch RNG states of all ranks in rank order (default: this process's alone). Returns the
    stale temporaries of stopped writers it removed. A non-finite tensor is a ValueError and nothing is written.
    """
    target = Path(directory)
    tensors, optimizer_meta = _optimizer_tensors(optimizer)
    for where, values in (("adapter", adapter_state_dict(model, adapter_name)), ("optimizer state", tensors)):
        for key, value in values.items():
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise ValueError(f"not saving a checkpoint to {target}: {where} tensor {key} holds non-finite "
                                 "values (the previous checkpoint is kept)")
    for rank, rng_state in enumerate(rng_states or [torch.get_rng_state()]):
        tensors[RNG_KEY + (f".{rank}" if rank else "")] = rng_state
    scheduler_state = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    state = {"optimizer": optimizer_meta, "scheduler": scheduler_state, "python_rng": _python_rng(), **extra}
    try:
        state_text = json.dumps(state, indent=1, allow_nan=False)
    except ValueError:
        raise ValueError(f"not saving a checkpoint to {target}: its state holds a non-finite number (the previous "
                         "checkpoint is kept)") from None

    removed = remove_stale_temporaries(target, olds=False)
    tmp = target.with_name(f".{target.name}{TMP_MARK}{os.getpid()}")
    tmp.mkdir(parents=True)
    save_adapter(model, tmp / ADAPTER_DIR, adapter_name, residual=True)  # resumed on the same (residual) base
    save_file(tensors, tmp / TENSORS_NAME)
    (tmp / STATE_NAME).write_text(state_text)
    _write_manifest(tmp)
    old = _unused(target.with_name(f".{target.name}{OLD_MARK}{os.getpid()}"))
    if target.exists() or target.is_symlink():
        target.rename(old)
    tmp.rename(target)
    _remove(old)
    return removed + remove_stale_temporaries(target, olds=True)


def _python_rng() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _write_manifest(directory: Path) -> None:
    files = {path.relative_to(directory).as_posix(): {"size": path.stat().st_size, "sha256": _sha256(path)}
             for path in sorted(directory.rglob("*")) if path.is_file()}
    manifest = {"format": MANIFEST_FORMAT, "files": files}
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))


def seal(directory: str | os.PathLike[str]) -> None:
    """(Re)write the manifest of a checkpoint directory for the files it now holds."""
    (Path(directory) / MANIFEST_NAME).unlink(missing_ok=True)
    _write_manifest(Path(directory))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _unused(path: Path) -> Path:
    candidate, n = path, 0
    while candidate.exists() or candidate.is_symlink():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


# -- temporaries of stopped writers -----------------------------------------------------------------------------------

def _writer_pid(path: Path, target: Path, mark: str) -> int | None:
    """The PID in `.<target>.<mark><pid>[-n]`, or None if `path` is not such a name."""
    prefix = f".{target.name}{mark}"
    if not path.name.startswith(prefix):
        return None
    pid = path.name[len(prefix):].split("-", 1)[0]
    return int(pid) if pid.isdigit() and pid.isascii() else None


def _writer_running(pid: int) -> bool:
    """True for a live process other than this one (this process writes one checkpoint at a time)."""
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _siblings(target: Path, mark: str) -> list[tuple[Path, int]]:
    if not target.parent.is_dir():
        return []
    found = [(path, _writer_pid(path, target, mark)) for path in target.parent.glob(f".{target.name}{mark}*")]
    return [(path, pid) for path, pid in found if pid is not None]


def remove_stale_temporaries(directory: str | os.PathLike[str], olds: bool) -> list[Path]:
    """Delete `.D.tmp-PID` (and, with `olds`, `.D.old-PID`) siblings of checkpoint `D` whose writer is not running.

    Call with `olds` only once `D` is complete: an `.old` may be the one complete checkpoint (module docstring).
    """
    target = Path(directory)
    removed = []
    for mark in (TMP_MARK, OLD_MARK) if olds else (TMP_MARK,):
        for path, pid in _siblings(target, mark):
            if not _writer_running(pid):
                _remove(path)
                removed.append(path)
    return sorted(removed)


# -- reading ----------------------------------------------------------------------------------------------------------

@dataclass
class SavedCheckpoint:
    """A complete, finite checkpoint read from disk, not yet applied to anything."""

    path: Path
    state: dict[str, Any]
    optimizer_tensors: dict[str, torch.Tensor]
    rng_states: dict[int, torch.Tensor]
    adapter: dict[str, torch.Tensor]
    adapter_config: AdapterConfig

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @property
    def extra(self) -> dict[str, Any]:
        """The run's own state saved with it (step, data stream, world size, config)."""
        return {k: v for k, v in self.state.items() if k not in ("optimizer", "scheduler", "python_rng")}


def _verify_manifest(directory: Path) -> None:
    """Raise ValueError unless `directory` holds a manifest and every file it lists, unchanged."""
    file = directory / MANIFEST_NAME
    if not file.is_file():
        raise ValueError(f"{directory} is incomplete: it has no {MANIFEST_NAME} (its save did not finish)")
    manifest = read_json(file, MANIFEST_SCHEMA)
    if manifest["format"] != MANIFEST_FORMAT:
        raise ValueError(f"{file}: unknown format {manifest['format'][:40]!r} (expected {MANIFEST_FORMAT!r})")
    listed = manifest["files"]
    for name in REQUIRED_FILES:
        if name not in listed:
            raise ValueError(f"{file}: lists no {name}")
    for name, entry in listed.items():
        parts = Path(name).parts
        if not parts or Path(name).is_absolute() or ".." in parts or name == MANIFEST_NAME:
            raise ValueError(f"{file}: invalid file name {name[:60]!r}")
        path = directory / name
        if not path.is_file():
            raise ValueError(f"{directory} is incomplete: {name} is missing")
        if path.stat().st_size != entry["size"] or _sha256(path) != entry["sha256"]:
            raise ValueError(f"{path} is damaged: its size or content differs from {MANIFEST_NAME}")


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(file)
    except PermissionError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as error:
        reason = str(error).splitlines()[0][:80] if str(error) else type(error).__name__
        raise ValueError(f"{file}: corrupted or not a safetensors file ({reason})") from None


def _check_finite(tensors: dict[str, torch.Tensor], file: Path) -> None:
    for key, value in tensors.items():
        if not value.is_floating_point():
            raise ValueError(f"{file}: tensor {key} is {value.dtype}, not a floating-point tensor")
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{file}: tensor {key} holds non-finite values")


def _check_counters(state: dict[str, Any], file: Path) -> None:
    """The saved step, scheduler, data stream and optimizer groups must describe one and the same moment."""
    step, scheduler, stream = state["step"], state["scheduler"], state["stream"]
    if scheduler["last_epoch"] != step:
        raise ValueError(f"{file}: key scheduler.last_epoch is {scheduler['last_epoch']}, not the step {step}")
    groups = state["optimizer"]["param_groups"]
    if len(scheduler["base_lrs"]) != len(groups):
        raise ValueError(f"{file}: key scheduler.base_lrs has {len(scheduler['base_lrs'])} entries for {len(groups)} "
                         "optimizer param groups")
    per_epoch = stream["n_examples"] // stream["global_batch_size"]
    if per_epoch < 1 or stream["index"] > per_epoch or stream["epoch"] * per_epoch + stream["index"] != step:
        raise ValueError(f"{file}: key stream (epoch {stream['epoch']}, index {stream['index']}) is not at step {step}")
    indices = [index for group in groups for index in group["params"]]
    if sorted(indices) != list(range(len(indices))):
        raise ValueError(f"{file}: key optimizer.param_groups numbers its parameters other than 0..{len(indices) - 1}")
    for key in state["optimizer"]["scalars"]:
        _param_index(key, len(indices), file, "key optimizer.scalars.")
    version, internal, gauss = state["python_rng"]
    try:
        integer(0)(version, "python_rng[0]")
        array(integer(0, 2**32 - 1), length=625)(internal, "python_rng[1]")
        optional(number())(gauss, "python_rng[2]")
        random.Random().setstate((version, tuple(internal), gauss))
    except SchemaError as error:
        raise ValueError(f"{file}: {error}") from None
    except (ValueError, TypeError, OverflowError):
        raise ValueError(f"{file}: key python_rng is not a state of Python's random generator") from None


def _param_index(key: str, count: int, file: Path, what: str) -> int:
    index, _, name = key.partition(".")
    if not (index.isdigit() and index.isascii() and int(index) < count and name):
        raise ValueError(f"{file}: {what}{key[:60]} names no optimizer parameter (expected <0..{count - 1}>.<name>)")
    return int(index)


def _split_rng(tensors: dict[str, torch.Tensor], world_size: int, file: Path) -> dict[int, torch.Tensor]:
    keys = {RNG_KEY + (f".{rank}" if rank else ""): rank for rank in range(world_size)}
    states = {}
    for key, rank in keys.items():
        if key not in tensors:
            raise ValueError(f"{file}: tensor {key} is missing (a run of {world_size} process(es) saves one per rank)")
        value = tensors.pop(key)
        try:
            torch.Generator().set_state(value)
        except (RuntimeError, TypeError, ValueError):
            raise ValueError(f"{file}: tensor {key} is not a state of torch's CPU generator") from None
        states[rank] = value
    return states


def read_checkpoint(directory: str | os.PathLike[str]) -> SavedCheckpoint:
    """Read and check a checkpoint without a model (module docstring); ValueError names the file and key or tensor."""
    source = Path(directory)
    if not source.is_dir():
        raise (NotADirectoryError if source.exists() else FileNotFoundError)(f"{source} is not a checkpoint directory")
    _verify_manifest(source)
    state = read_json(source / STATE_NAME, STATE_SCHEMA)
    _check_counters(state, source / STATE_NAME)
    file = source / TENSORS_NAME
    tensors = _read_tensors(file)
    saved_rngs = sum(key.startswith(RNG_KEY) for key in tensors)
    if saved_rngs != state["world_size"]:
        raise ValueError(f"{source / STATE_NAME}: key world_size is {state['world_size']}, but {file} holds "
                         f"{saved_rngs} torch RNG state(s) (one per process)")
    rng_states = _split_rng(tensors, state["world_size"], file)
    count = sum(len(group["params"]) for group in state["optimizer"]["param_groups"])
    for key, value in tensors.items():
        _param_index(key, count, file, "tensor ")
        if key.endswith(".step") and not (value.dim() == 0 and 0 <= float(value) <= state["step"]):
            raise ValueError(f"{file}: tensor {key} must be a step count in [0, {state['step']}]")
    _check_finite(tensors, file)
    adapter_dir = source / ADAPTER_DIR
    adapter = _read_tensors(adapter_dir / WEIGHTS_NAME)
    _check_finite(adapter, adapter_dir / WEIGHTS_NAME)
    return SavedCheckpoint(source, state, tensors, rng_states, adapter, read_adapter_config(adapter_dir))


def find_resumable(directory: str | os.PathLike[str]) -> tuple[SavedCheckpoint, str | None]:
    """The checkpoint to resume from `D` (= `directory`), and a note when it is an `.old` one an interrupted save left.

    `D` itself when it is complete and valid; otherwise the newest complete and valid `.D.old-*`; otherwise the
    reason why not, as one-line ValueError (FileNotFoundError when there is nothing at all).
    """
    target = Path(directory)
    olds = sorted((path for path, _ in _siblings(target, OLD_MARK) if path.is_dir()),
                  key=lambda path: path.stat().st_mtime_ns, reverse=True)
    problem: ValueError | None = None
    if target.exists() or target.is_symlink():
        try:
            return read_checkpoint(target), None
        except (ValueError, OSError) as error:
            problem = error if isinstance(error, ValueError) else ValueError(str(error))
    for old in olds:
        try:
            saved = read_checkpoint(old)
        except (ValueError, OSError):
            continue
        why = f"is not usable ({problem})" if problem else "is missing"
        return saved, (f"{target} {why}; resuming from {old.name}, the complete checkpoint of step {saved.step} "
                       "that an interrupted save left")
    if problem is not None:
        raise problem
    if olds:
        read_checkpoint(olds[0])  # raises: say why the newest one cannot be used
    raise FileNotFoundError(f"no checkpoint to resume: {target} does not exist (nor a .{target.name}.old-* left by "
                            "an interrupted save)")


def restore(
    saved: SavedCheckpoint,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    adapter_name: str = "default",
    rank: int = 0,
) -> dict[str, Any]:
    """Check `saved` against the model and optimizer, then restore adapter weights, optimizer, scheduler and RNG
    states; returns the extra state saved with them. On an error nothing has been changed."""
    if rank not in saved.rng_states:
        raise ValueError(f"checkpoint {saved.path} was written by {len(saved.rng_states)} process(es); resume with "
                         "as many")
    targets = adapter_state_dict(model, adapter_name)
    _check_like(saved.adapter, targets, saved.path / ADAPTER_DIR / WEIGHTS_NAME)
    optimizer_state = _optimizer_state(saved, optimizer, scheduler)
    optimizer.load_state_dict(optimizer_state)
    lrs = [group["lr"] for group in optimizer_state["param_groups"]]
    scheduler.load_state_dict({**scheduler.state_dict(), "last_epoch": saved.step, "_step_count": saved.step + 1,
                               "_last_lr": lrs})
    with torch.no_grad():
        for key, target in targets.items():
            target.copy_(saved.adapter[key])
    if isinstance(saved.adapter_config, AdaLoraConfig):  # the rank pattern AdaLoRA's allocator had reached
        configs = adapter_configs(model)
        configs[adapter_name] = configs[adapter_name].replace(rank_pattern=saved.adapter_config.rank_pattern)
    torch.set_rng_state(saved.rng_states[rank])
    version, internal, gauss = saved.state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    return saved.extra


def _check_like(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], file: Path) -> None:
    """`found` must hold exactly `expected`'s tensor names, each with its shape and dtype."""
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing:
        raise ValueError(f"{file}: missing tensor {missing[0]} (different method, targets or rank?)")
    if unexpected:
        raise ValueError(f"{file}: unexpected tensor {unexpected[0]} (different method, targets or rank?)")
    for key, target in expected.items():
        if found[key].shape != target.shape or found[key].dtype != target.dtype:
            raise ValueError(f"{file}: tensor {key} is {found[key].dtype} {tuple(found[key].shape)}, the model needs "
                             f"{target.dtype} {tuple(target.shape)} (different method or rank?)")


def _optimizer_state(saved: SavedCheckpoint, optimizer: torch.optim.Optimizer,
                     scheduler: torch.optim.lr_scheduler.LRScheduler) -> dict[str, Any]:
    """The optimizer state dict of `saved`, checked against this run's optimizer: the same parameters per group, every
    group setting equal to this run's; the learning rates are this run's schedule's at the saved step (a run resumed
    with more steps follows its new schedule from there)."""
    live = optimizer.state_dict()["param_groups"]
    groups = saved.state["optimizer"]["param_groups"]
    file = saved.path / STATE_NAME
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in live]:
        raise ValueError(f"{file}: key optimizer.param_groups holds {[len(g['params']) for g in groups]} parameters "
                         f"per group, this run's optimizer {[len(g['params']) for g in live]}")
    expected_lrs = _scheduled_lrs(scheduler, saved.step)
    if expected_lrs is not None:
        groups = [{**group, "lr": lr} for group, lr in zip(groups, expected_lrs)]
    for index, (group, mine) in enumerate(zip(groups, live)):
        for name in sorted(set(group) | set(mine)):
            key = f"optimizer.param_groups[{index}].{name}"
            if name not in mine:
                raise ValueError(f"{file}: key {key} is not a setting of this run's optimizer")
            if name not in group:
                raise ValueError(f"{file}: key {key} is missing")
            if name == "lr" and not (type(group[name]) in (int, float) and math.isfinite(group[name])):
                raise ValueError(f"{file}: key {key} must be a finite number, found {group[name]!r:.60}")
            if name not in ("lr", "params") and not _same_value(group[name], mine[name]):
                raise ValueError(f"{file}: key {key} is {group[name]!r:.60}, this run's is {mine[name]!r} "
                                 "(resume with the options the run was made with)")
    scheduler_state = saved.state["scheduler"]
    checks = {"base_lrs": list(getattr(scheduler, "base_lrs", scheduler_state["base_lrs"])),
              "_step_count": saved.step + 1}
    for name, value in checks.items():
        if not _same_value(scheduler_state[name], value):
            raise ValueError(f"{file}: key scheduler.{name} is {scheduler_state[name]!r:.60}, expected {value!r:.60}")
    params = [p for g in optimizer.param_groups for p in g["params"]]
    per_param: dict[int, dict[str, Any]] = {}
    for key, value in list(saved.optimizer_tensors.items()) + list(saved.state["optimizer"]["scalars"].items()):
        index, _, name = key.partition(".")
        per_param.setdefault(int(index), {})[name] = value
    tensors_file = saved.path / TENSORS_NAME
    names = {frozenset(values) for values in per_param.values()}
    if len(names) > 1:
        raise ValueError(f"{tensors_file}: the parameters' optimizer states hold different entries {sorted(names)}")
    for index, values in per_param.items():
        for name, value in values.items():
            if name != "step" and (not isinstance(value, torch.Tensor) or value.shape != params[index].shape
                                   or value.dtype != params[index].dtype):
                raise ValueError(f"{tensors_file}: tensor {index}.{name} must be {params[index].dtype} "
                                 f"{tuple(params[index].shape)} like its parameter")
    return {"state": per_param, "param_groups": groups}


def _scheduled_lrs(scheduler: torch.optim.lr_scheduler.LRScheduler, step: int) -> list[float] | None:
    """The learning rate of each group at `step` under a LambdaLR schedule (None for another scheduler)."""
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        return None
    return [base * factor(step) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]


def _same_value(value: Any, like: Any) -> bool:
    """JSON `value` equals `like`, type for type (a float may be written as an int; a tuple is a list)."""
    if isinstance(like, (list, tuple)):
        return type(value) is list and len(value) == len(like) and all(map(_same_value, value, like))
    if type(like) is float:
        return type(value) in (int, float) and value == like
    return type(value) is type(like) and value == like


def load_checkpoint(
    directory: str | os.PathLike[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    adapter_name: str = "default",
    rank: int = 0,
) -> dict[str, Any]:
    """Check and restore the checkpoint in `directory` (see `restore`); returns the extra state saved with it."""
    return restore(read_checkpoint(directory), model, optimizer, scheduler, adapter_name, rank)

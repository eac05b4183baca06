"""All or nothing: an operation that changes a model either completes or leaves the model exactly as it found it.

`all_or_nothing(model)` records, for every module of the model, its class and its attributes (the dicts and lists
among them by content: child modules, parameters, buffers, hooks, adapter dicts, active and merged lists, the
adapter configs on the model), and every parameter's `requires_grad`. If the block raises, all of it is put back:
wrappers added in the block disappear (their parents hold the original modules again), adapters added to existing
layers are removed, parametrizations are undone (class and parameters restored), and the flags are as before. The
values of tensors the block writes in place are restored for the modules named in `values` (initialisations that
rewrite the base weight); no other tensor is copied, so a snapshot costs a few dict copies per module.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

_CONTAINERS = (dict, list, set)


class _ModuleState:
    """One module's class and attributes, containers copied by content."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.cls = type(module)
        self.attrs = dict(module.__dict__)
        self.contents = {key: value.copy() for key, value in self.attrs.items() if isinstance(value, _CONTAINERS)}

    def restore(self) -> None:
        self.module.__class__ = self.cls
        self.module.__dict__.clear()
        self.module.__dict__.update(self.attrs)
        for key, saved in self.contents.items():
            container = self.attrs[key]
            container.clear()
            if isinstance(container, dict):
                container.update(saved)
            elif isinstance(container, list):
                container.extend(saved)
            else:
                container.update(saved)


class Snapshot:
    """What `all_or_nothing` restores (module doc)."""

    def __init__(self, model: nn.Module, values: Iterable[nn.Module] = ()) -> None:
        self.modules = [_ModuleState(module) for module in model.modules()]
        self.flags = [(param, param.requires_grad) for param in model.parameters()]
        self.values: list[tuple[Tensor, Tensor]] = []
        for module in values:
            tensors = [*module.parameters(), *module.buffers()]
            self.values += [(tensor, tensor.detach().clone()) for tensor in tensors]

    def restore(self) -> None:
        for state in self.modules:
            state.restore()
        for param, flag in self.flags:
            param.requires_grad_(flag)
        with torch.no_grad():
            for tensor, saved in self.values:
                tensor.copy_(saved)


@contextlib.contextmanager
def all_or_nothing(model: nn.Module, values: Iterable[nn.Module] = ()) -> Iterator[None]:
    """Run the block; if it raises (anything, also an interrupt), restore `model` as it was, then re-raise."""
    snapshot = Snapshot(model, values)
    try:
        yield
    except BaseException:
        snapshot.restore()
        raise


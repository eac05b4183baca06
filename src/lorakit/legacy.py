"""Module paths of lorakit's earlier flat layout, kept importable so no user script breaks.

`import lorakit.nf4` gives `lorakit.quant.nf4` itself (the same module object, so patches and isinstance checks
agree). An old module whose names now live in several modules (`lorakit.quantize`: the pass, and the quantized-model
file format) is served as a read-only view that looks a name up in each of them in turn. Nothing is imported before
it is asked for.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from collections.abc import Sequence
from typing import Any

PACKAGE = "lorakit"

MOVED: dict[str, tuple[str, ...]] = {
    "checkpoint": ("training.checkpoint",),
    "combine": ("adapters.combine",),
    "config": ("adapters.config",),
    "data": ("training.data", "training.batches", "training.task"),
    "deltas": ("adapters.deltas",),
    "distributed": ("training.distributed",),
    "evaluate": ("training.evaluate",),
    "layer": ("adapters.layer", "adapters.base"),
    "metrics": ("training.metrics",),
    "model": ("adapters.model", "adapters.registry", "adapters.routing"),
    "nf4": ("quant.nf4",),
    "optim": ("adapters.loraplus",),
    "peft_format": ("formats.peft", "formats.files"),
    "quantize": ("quant.quantize", "formats.quantized", "models.load", "adapters.base"),
    "saved_modules": ("adapters.modules_to_save",),
    "targets": ("adapters.targets", "adapters.base"),
    "train": ("training.trainer", "training.setup", "training.config"),
}


def _view(name: str, targets: Sequence[str]) -> types.ModuleType:
    """A module whose attributes are looked up in `targets` in turn, each imported when first needed."""
    view = types.ModuleType(name, f"Old path of {', '.join(targets)}.")

    def lookup(attribute: str) -> Any:
        for target in targets:
            module = importlib.import_module(target)
            if hasattr(module, attribute):
                return getattr(module, attribute)
        raise AttributeError(f"module {name!r} has no attribute {attribute!r}")

    view.__getattr__ = lookup  # type: ignore[method-assign]
    view.__dir__ = lambda: sorted({n for t in targets for n in dir(importlib.import_module(t))})  # type: ignore
    return view


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers imports of the old paths with the modules that replaced them."""

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: types.ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        package, _, old = fullname.partition(".")
        if package != PACKAGE or old not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def exec_module(self, module: types.ModuleType) -> None:
        # The import system returns whatever sys.modules holds once this returns: the new module, or a view.
        sys.modules[module.__name__] = _replacement(module.__name__)


def _replacement(fullname: str) -> types.ModuleType:
    targets = [f"{PACKAGE}.{new}" for new in MOVED[fullname.partition(".")[2]]]
    return importlib.import_module(targets[0]) if len(targets) == 1 else _view(fullname, targets)


def install(package: types.ModuleType) -> None:
    """Answer the old paths from now on. An old module named like one of the package's own attributes (the function
    `lorakit.quantize`) is registered at once: imported through the finder, it would replace that attribute."""
    for old in MOVED:
        if hasattr(package, old):
            sys.modules.setdefault(f"{PACKAGE}.{old}", _replacement(f"{PACKAGE}.{old}"))
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())

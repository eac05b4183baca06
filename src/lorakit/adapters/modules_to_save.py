"""`modules_to_save`: whole modules (a classification head, an lm_head) trained fully next to the adapters.

The original stays frozen and untouched; each adapter trains its own copy, so disabling or unloading adapters gives
back exactly the pre-trained module. Saved in PEFT's format under the module's own path.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn


class ModulesToSave(nn.Module):
    """Runs the active adapter's trainable copy of a module, or the frozen original when none is active."""

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.copies = nn.ModuleDict()
        self.active: str | None = None
        self.disabled = False

    def add_copy(self, name: str) -> None:
        self.copies[name] = copy.deepcopy(self.original_module)

    @property
    def current(self) -> nn.Module:
        if self.disabled or self.active is None:
            return self.original_module
        return self.copies[self.active]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.current(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:  # weight, bias, ...: forward to the module in use, like the module it replaces
            return getattr(self.current, name)

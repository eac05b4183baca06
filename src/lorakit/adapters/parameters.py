"""LoRA on raw parameters (PEFT's `target_parameters`), e.g. the fused expert weights of a mixture-of-experts layer.

A model like Mixtral or Qwen3-MoE in transformers 5 keeps all experts of a layer in one nn.Parameter, `gate_up_proj`
[E, 2·inter, hidden] and `down_proj` [E, hidden, inter], and its forward reads them directly: there is no linear
layer to wrap. The parameter is parametrized instead (torch.nn.utils.parametrize): every read of `experts.down_proj`
returns W + Σ_active s·ΔW, ΔW_e = B_e·A_e (`StackedLoRADelta`), with W frozen. Layouts as in PEFT: a 3-D parameter
is [E, out, in], or [E, in, out] when its module says `is_transposed` (gpt-oss); a 2-D one is [out, in] with E = 1.
One owner forward computes W + s·ΔW once (`parametrize.cached`), however often the forward reads the parameter.

File keys follow PEFT's nesting of one wrapper per targeted parameter of a module: the parameters targeted on one
module, in their registration order, get `<module>.base_layer…base_layer.lora_A.weight` with one `base_layer` fewer
for each later one (the last targeted: `<module>.lora_A.weight`). Dropout, DoRA and initialisations that rewrite the
base do not apply to a parameter (as in PEFT).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .config import LoraConfig
from .deltas import StackedLoRADelta
from .layer import Adapter


class AdaptedParameter(nn.Module):
    """The parametrization of one frozen parameter: W ↦ W + Σ over active, unmerged adapters of s·ΔW.

    It offers what the model-level operations use on an AdaptedLinear: `adapters`, `active`, `merged`, `disabled`,
    `add_adapter`, `merge`, `unmerge`. The owner module is kept outside the module tree (no cycle in it)."""

    def __init__(self, owner: nn.Module, param_name: str, nesting: int) -> None:
        super().__init__()
        shape = getattr(owner, param_name).shape
        if len(shape) not in (2, 3):
            raise ValueError(f"target_parameters: {param_name} has shape {tuple(shape)}; only 2-D and 3-D parameters "
                             "can carry LoRA")
        self.__dict__["owner"] = owner
        self.param_name = param_name
        self.nesting = nesting  # how many PEFT wrappers sit around this one: `base_layer.` × nesting in file keys
        self.transposed = len(shape) == 3 and bool(getattr(owner, "is_transposed", False))
        self.num_experts = shape[0] if len(shape) == 3 else 1
        out_features, in_features = shape[-2:]
        self.out_features, self.in_features = (in_features, out_features) if self.transposed else (out_features, in_features)
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []
        self.merged: list[str] = []
        self.disabled = False

    @property
    def original(self) -> nn.Parameter:
        return self.owner.parametrizations[self.param_name].original

    def add_adapter(self, name: str, adapter: Adapter) -> None:
        self.adapters[name] = adapter

    def delta(self, names: list[str]) -> Tensor:
        """Σ s·ΔW of `names` in the parameter's own layout."""
        total = sum(self.adapters[n].delta_weight() for n in names)  # [E, out, in]
        if self.transposed:
            return total.transpose(-1, -2)  # [E, in, out]
        return total if self.original.dim() == 3 else total[0]  # 2-D: [out, in]

    def forward(self, weight: Tensor) -> Tensor:
        names = [n for n in self.active if n not in self.merged]
        if self.disabled or not names:
            return weight
        return weight + self.delta(names).to(weight.dtype)

    @torch.no_grad()
    def merge(self, names: list[str] | None = None, safe_merge: bool = False) -> None:
        for name in names if names is not None else list(self.active):
            if name in self.merged:
                continue
            new = self.original + self.delta([name]).to(self.original.dtype)
            if safe_merge and not torch.isfinite(new).all():
                raise ValueError(f"merging adapter {name!r} gives non-finite weights; the parameter is left unchanged")
            self.original.copy_(new)
            self.merged.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        while self.merged:
            self.original.sub_(self.delta([self.merged.pop()]).to(self.original.dtype))

    def remove(self) -> None:
        """Take the parametrization off the owner: the plain parameter (with whatever is merged into it) is back."""
        for handle in self.__dict__.pop("hooks", []):
            handle.remove()
        _own_class(self.owner)
        parametrize.remove_parametrizations(self.owner, self.param_name, leave_parametrized=False)


def _own_class(module: nn.Module) -> None:
    """torch keeps a parametrized module's parameters as properties of a class made for it, which `copy.deepcopy`
    shares with the copy: give the module a class of its own before adding or removing one, so that changing a copy
    never changes the original."""
    if parametrize.is_parametrized(module):
        cls = type(module)
        namespace = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
        module.__class__ = type(cls.__name__, cls.__bases__, namespace)


def _cache_during_forward(owner: nn.Module) -> list[Any]:
    """W + s·ΔW computed once per owner forward, not on every read of the parameter."""
    contexts: list[Any] = []

    def enter(*_: Any) -> None:
        contexts.append(parametrize.cached())
        contexts[-1].__enter__()

    def leave(*_: Any) -> None:
        contexts.pop().__exit__(None, None, None)

    return [owner.register_forward_pre_hook(enter), owner.register_forward_hook(leave, always_call=True)]


def adapted_parameters(model: nn.Module) -> Iterator[tuple[str, AdaptedParameter]]:
    """(owner path + "." + parameter name, its AdaptedParameter) for every parametrized parameter."""
    for path, module in model.named_modules():
        for name, chain in getattr(module, "parametrizations", {}).items():
            for item in chain:
                if isinstance(item, AdaptedParameter):
                    yield (f"{path}.{name}" if path else name), item


def _matches(key: str, targets: tuple[str, ...]) -> bool:
    return any(key == t or key.endswith("." + t) for t in targets)


def adapt_parameters(model: nn.Module, config: LoraConfig, adapter_name: str) -> None:
    """Add adapter `adapter_name` to every parameter `config.target_parameters` names (PEFT's suffix rule)."""
    targets = tuple(config.target_parameters or ())
    existing = dict(adapted_parameters(model))
    found: list[tuple[str, AdaptedParameter]] = []
    for path, module in list(model.named_modules()):
        if isinstance(module, AdaptedParameter):
            continue
        names = [n for n in list(module._parameters) + list(getattr(module, "parametrizations", {}))
                 if _matches(f"{path}.{n}" if path else n, targets)]
        for index, name in enumerate(names):
            key = f"{path}.{name}" if path else name
            if not path:
                raise ValueError(f"target_parameters: {name!r} belongs to the model itself, not to a submodule")
            adapted = existing.get(key)
            if adapted is None:
                adapted = AdaptedParameter(module, name, nesting=len(names) - 1 - index)
                _own_class(module)
                parametrize.register_parametrization(module, name, adapted)
                adapted.__dict__["hooks"] = _cache_during_forward(module)
            found.append((key, adapted))
    if not found:
        raise ValueError(f"target_parameters={list(targets)} matches no parameter of {type(model).__name__}")
    for key, adapted in found:
        delta = StackedLoRADelta(adapted.num_experts, adapted.in_features, adapted.out_features,
                                 config.rank_for(key), config.init_lora_weights)
        adapted.add_adapter(adapter_name, Adapter(delta.to(adapted.original.device), config.scaling_for(key), 0.0))

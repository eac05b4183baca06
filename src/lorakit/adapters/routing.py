"""Per-sample adapters: sample i of a batch runs with its own adapter (PEFT's `adapter_names`).

`mixed_batch(model, names)` routes every forward (and `generate`) inside the block; `model(..., adapter_names=names)`
and `model.generate(..., adapter_names=names)` route one call, as in PEFT, on the user's own model: `adapt` gives
the model a forward pre-hook that takes the keyword out of the call, and an instance `generate` that accepts it. Each
adapted layer then gathers each adapter's rows, runs that adapter once on them and scatters the update back
(`AdaptedLinear._forward_routed`); "__base__" rows get no update. A batch whose size differs from the number of names
(beam search, `num_return_sequences` > 1) raises instead of routing wrongly.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .registry import adapted_layers, adapter_configs, module_device

BASE = "__base__"


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names: list[str]) -> Iterator[nn.Module]:
    """Inside the block, sample i of every batch runs with adapter adapter_names[i] ("__base__": no adapter).

    Works for forward and `generate` (the batch dimension must stay as given), for LoRA, DoRA and VeRA alike.
    """
    layers = _route(model, adapter_names)
    try:
        yield model
    finally:
        for layer in layers:
            layer.routing = None


def _route(model: nn.Module, adapter_names: list[str]) -> list[Any]:
    """Point every adapted layer at its rows of the batch; returns the layers routed."""
    if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
        raise TypeError(f"adapter_names must be a list of adapter names, one per sample; got {adapter_names!r}")
    configs = adapter_configs(model)
    unknown = sorted({n for n in adapter_names if n != BASE and n not in configs})
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}; this model has {sorted(configs)} (and {BASE!r})")
    with_copies = sorted({n for n in adapter_names if n != BASE and configs[n].modules_to_save})
    if with_copies:
        raise ValueError(f"adapters {with_copies} train modules_to_save, which a mixed batch cannot route per sample")
    on_parameters = sorted({n for n in adapter_names if n != BASE and getattr(configs[n], "target_parameters", None)})
    if on_parameters:
        raise ValueError(f"adapters {on_parameters} adapt parameters (target_parameters), whose update is in the "
                         "weight itself: a mixed batch cannot route them per sample")
    layers = [layer for _, layer in adapted_layers(model)]
    if not layers:
        raise ValueError("the model has no adapters")
    device = module_device(layers[0].base_layer)
    routing = [
        (name, torch.tensor([i for i, n in enumerate(adapter_names) if n == name], device=device))
        for name in dict.fromkeys(adapter_names) if name != BASE
    ]
    for layer in layers:
        layer.routing, layer.routing_batch = routing, len(adapter_names)
    return layers


# -- the `adapter_names` keyword -------------------------------------------------------------------------------

ROUTED_CALL = "lorakit_routed_call"  # set on the model while a forward routes its own adapter_names
ENTRY_POINTS = "lorakit_routing_hooks"


def accept_adapter_names(model: nn.Module) -> None:
    """Let `model(..., adapter_names=...)` and `model.generate(..., adapter_names=...)` route per sample."""
    if ENTRY_POINTS in model.__dict__:
        return
    hooks = (model.register_forward_pre_hook(_take_adapter_names, with_kwargs=True),
             model.register_forward_hook(_end_routed_call, with_kwargs=True, always_call=True))
    model.__dict__[ENTRY_POINTS] = hooks
    if callable(getattr(type(model), "generate", None)):
        model.generate = types.MethodType(_generate, model)


def refuse_adapter_names(model: nn.Module) -> None:
    """Undo `accept_adapter_names`: the model is plain again."""
    for hook in model.__dict__.pop(ENTRY_POINTS, ()):
        hook.remove()
    model.__dict__.pop("generate", None)


def _take_adapter_names(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                        ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    names = kwargs.pop("adapter_names", None)
    if names is not None:
        _route(model, names)
        model.__dict__[ROUTED_CALL] = True
    return args, kwargs


def _end_routed_call(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
    if model.__dict__.pop(ROUTED_CALL, False):
        for _, layer in adapted_layers(model):
            layer.routing = None


def _generate(model: nn.Module, *args: Any, adapter_names: list[str] | None = None, **kwargs: Any) -> Any:
    """The model's own `generate`, routing every step's samples when adapter_names is given."""
    generate = type(model).generate
    if adapter_names is None:
        return generate(model, *args, **kwargs)
    with mixed_batch(model, adapter_names):
        return generate(model, *args, **kwargs)

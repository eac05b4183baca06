"""`lorakit inspect keys`: LoRA read as a key–value memory: s·B·A·x = Σ_i s·b_i·(a_i·x), rank component i has key a_i (row i of A)
and value b_i (column i of B). For each token t and component i the table and heat map show the write
s·‖b_i‖·|a_i·x_t|; the signed terms s·b_i·(a_i·x_t) sum back exactly to the layer's update. For DoRA this is the
low-rank term before the m/n rescale; for VeRA a_i and b_i are the rows and columns of diag(λ_d)·A_s and diag(λ_b)·B_s.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..adapters.registry import adapted_layers
from .figures import new_figure, save_figure

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


DEFAULT_PNG_LAYERS = 6
@dataclass(frozen=True)
class KeyValueMap:
    """One layer's rank components on one text: activations a_i·x_t, value norms ‖b_i‖ and the scaling."""

    path: str
    tokens: list[str]
    activations: Tensor  # [T, r] a_i·x_t (signed), float64
    values: Tensor  # [out, r] b_i as columns, float64
    scaling: float

    @property
    def contributions(self) -> Tensor:
        """[T, r] how much component i writes at token t: s·‖b_i‖·|a_i·x_t|."""
        return abs(self.scaling) * self.activations.abs() * self.values.norm(dim=0)

    def update(self) -> Tensor:
        """[T, out] Σ_i s·b_i·(a_i·x_t): the layer's low-rank update, recomposed from its components."""
        return self.scaling * self.activations @ self.values.T


def key_value_maps(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, text: str, adapter_name: str | None = None
) -> list[KeyValueMap]:
    """Run `text` through `model` and read every adapted layer's rank components (forward hooks on the inputs).

    `adapter_name` defaults to the first active adapter of the first adapted layer.
    """
    layers = dict(adapted_layers(model))
    if not layers:
        raise ValueError("the model has no adapters")
    name = adapter_name or next((layer.active[0] for layer in layers.values() if layer.active), None)
    if name is None or not any(name in layer.adapters for layer in layers.values()):
        raise ValueError(f"adapter {name!r} is not in the model")
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:1]  # [1, T]
    if ids.shape[1] == 0:
        raise ValueError("the text gives no tokens")
    inputs: dict[str, Tensor] = {}
    hooks = [layer.register_forward_hook(_capture(path, inputs)) for path, layer in layers.items()
             if name in layer.adapters]
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for hook in hooks:
            hook.remove()
    tokens = [tokenizer.decode([int(i)]) for i in ids[0]]
    return [_key_value_map(path, layers[path].adapters[name], x, tokens) for path, x in inputs.items()]


def _capture(path: str, store: dict[str, Tensor]) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        store[path] = args[0].detach()[0]  # [T, in]: the first (only) sample

    return hook


def _key_value_map(path: str, adapter: nn.Module, x: Tensor, tokens: list[str]) -> KeyValueMap:
    down, up = (t.detach().double() for t in adapter.delta.factors())  # [r, in], [out, r]
    return KeyValueMap(path, tokens, x.double() @ down.T, up, adapter.scaling)


def format_key_values(maps: Sequence[KeyValueMap], top: int = 3) -> str:
    """Per layer, the `top` components that write most in total, and the tokens where each writes most."""
    lines = ["| layer | component | total write | top tokens@position (write) |", "|---|---|---|---|"]
    for kv in maps:
        writes = kv.contributions  # [T, r]
        totals = writes.sum(0)  # [r]
        for i in totals.argsort(descending=True)[:top].tolist():
            best = writes[:, i].argsort(descending=True)[:top].tolist()
            shown = ", ".join(f"{kv.tokens[t]!r}@{t} ({writes[t, i]:.3g})" for t in best)
            lines.append(f"| {kv.path} | {i} | {totals[i]:.4g} | {shown} |")
    return "\n".join(lines)


def plot_key_values(maps: Sequence[KeyValueMap], png: str | os.PathLike[str], layers: int = DEFAULT_PNG_LAYERS
                    ) -> Path:
    """Heat maps (components × tokens) of the `layers` layers that write most in total."""
    chosen = sorted(maps, key=lambda kv: -float(kv.contributions.sum()))[:layers]
    tokens = chosen[0].tokens
    figure = new_figure(max(6.0, 0.35 * len(tokens) + 2), 2.2 * len(chosen) + 0.5)
    axes = figure.subplots(len(chosen), 1, squeeze=False)[:, 0]
    for axis, kv in zip(axes, chosen):
        image = axis.imshow(kv.contributions.T.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
        axis.set(title=kv.path, ylabel="component")
        axis.set_xticks(range(len(tokens)), [repr(t)[1:-1] for t in tokens], rotation=90, fontsize=7)
        figure.colorbar(image, ax=axis, label="s·‖b_i‖·|a_i·x|")
    return save_figure(figure, png)

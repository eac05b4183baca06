"""`lorakit inspect adapter`: per adapted layer, from the saved files (and the base model when given):
‖s·ΔW‖_F; the singular values of s·ΔW (exact, from the factors, never a dense SVD); two effective ranks: the
entropy rank exp(H(p)), p_k = σ_k/Σσ (Roy & Vetterli 2007), and the count of σ_k above 1% of σ_max. With the base
weights W, the DoRA paper's view (Liu et al. 2024, §3): W' is the adapted weight (W + sΔW, or (m/‖W + sΔW‖)·(W + sΔW)
for DoRA); magnitude change = ‖ ‖W'_i‖ − ‖W_i‖ ‖₂ over output rows i (for DoRA ‖m − ‖W‖‖), direction change
= mean_i (1 − cos(W'_i, W_i)) (a negative DoRA m_i flips W'_i and counts as a direction change).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..adapters.combine import factored_svd
from ..adapters.config import AdapterConfig, VeraConfig
from ..adapters.layer import AdaptedLinear
from ..adapters.registry import adapted_layers
from ..formats.peft import PREFIX, load_adapter, read_adapter_config, read_adapter_tensors
from .figures import new_figure, save_figure

INSPECT_ADAPTER = "inspect"
def singular_values(down: Tensor, up: Tensor, scale: float = 1.0) -> Tensor:
    """σ of scale·up·down (down [r, in], up [out, r]) in float64, descending, r of them at most."""
    _, sigma, _ = factored_svd(down.detach().double(), up.detach().double())
    return sigma * abs(scale)


def effective_rank(sigma: Tensor) -> float:
    """Roy & Vetterli (2007): exp of the entropy of p_k = σ_k / Σσ; 0 for a zero update."""
    total = sigma.sum()
    if total <= 0:
        return 0.0
    p = sigma[sigma > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def rank_above(sigma: Tensor, fraction: float = 0.01) -> int:
    """How many singular values exceed `fraction` of the largest."""
    if sigma.numel() == 0 or sigma[0] <= 0:
        return 0
    return int((sigma > fraction * sigma[0]).sum())


# Adapter analysis ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerAnalysis:
    path: str
    r: int
    delta_norm: float  # ‖s·ΔW‖_F
    singular_values: Tensor  # of s·ΔW, descending
    magnitude_change: float | None = None  # ‖ ‖W'_i‖ − ‖W_i‖ ‖₂; needs the base weights
    direction_change: float | None = None  # mean_i 1 − cos(W'_i, W_i); needs the base weights

    @property
    def effective_rank(self) -> float:
        return effective_rank(self.singular_values)

    @property
    def rank_above_1pct(self) -> int:
        return rank_above(self.singular_values)


@dataclass(frozen=True)
class _BaseView:
    """A layer's base weight W, adapted weight W' (both [out, in], float64) and the magnitudes of W' per row."""

    weight: Tensor
    adapted: Tensor
    magnitude: Tensor  # [out]: ‖W'_i‖, or DoRA's (signed) m_i


def _layer_analysis(path: str, down: Tensor, up: Tensor, scale: float, base: _BaseView | None) -> LayerAnalysis:
    sigma = singular_values(down, up, scale)
    magnitude = direction = None
    if base is not None:
        magnitude = float((base.magnitude - base.weight.norm(dim=1)).norm())
        direction = float((1 - torch.cosine_similarity(base.adapted, base.weight, dim=1)).mean())
    return LayerAnalysis(path, down.shape[0], float(sigma.norm()), sigma, magnitude, direction)


def _base_view(layer: AdaptedLinear, name: str) -> _BaseView:
    """W and W' = W + s·ΔW, or (m/‖W + s·ΔW‖)·(W + s·ΔW) for DoRA, written out directly."""
    adapter = layer.adapters[name]
    weight = layer.weight.detach().double()  # [out, in]
    adapted = weight + adapter.delta_weight().detach().double()
    if not adapter.use_dora:
        return _BaseView(weight, adapted, adapted.norm(dim=1))
    magnitude = adapter.lora_magnitude_vector.detach().double()
    return _BaseView(weight, (magnitude / adapted.norm(dim=1))[:, None] * adapted, magnitude)


def analyze_model(model: nn.Module, adapter_name: str = "default") -> list[LayerAnalysis]:
    """Per-layer analysis of adapter `adapter_name` in `model`, with the base weights (magnitude/direction change)."""
    rows = []
    for path, layer in adapted_layers(model):
        if adapter_name in layer.adapters:
            adapter = layer.adapters[adapter_name]
            down, up = adapter.delta.factors()
            rows.append(_layer_analysis(path, down, up, adapter.scaling, _base_view(layer, adapter_name)))
    if not rows:
        raise ValueError(f"adapter {adapter_name!r} adapts no layer of {type(model).__name__}")
    return rows


def analyze_adapter(directory: str | os.PathLike[str], model: str | os.PathLike[str] | None = None
                    ) -> list[LayerAnalysis]:
    """Analyse the PEFT adapter in `directory`; with `model` (name or path), also against its base weights.

    Without a model, LoRA and DoRA are read from the files alone (no magnitude/direction change); VeRA needs the model
    because its files do not record each layer's input size.
    """
    config = read_adapter_config(directory)
    if model is not None:
        from ..models.load import load_model

        base, _ = load_model(model, dtype="float32")  # the figures must not depend on the machine's "auto"
        load_adapter(base, directory, INSPECT_ADAPTER)
        return analyze_model(base, INSPECT_ADAPTER)
    if isinstance(config, VeraConfig):
        raise ValueError(f"{directory}: analysing a VeRA adapter needs the base model (--model): "
                         "its files do not record each layer's input size")
    return _analyze_lora_files(config, read_adapter_tensors(directory))


def _analyze_lora_files(config: AdapterConfig, tensors: dict[str, Tensor]) -> list[LayerAnalysis]:
    suffix = ".lora_A.weight"
    paths = sorted(key[len(PREFIX): -len(suffix)] for key in tensors if key.endswith(suffix))
    if not paths:
        raise ValueError("the adapter file holds no lora_A/lora_B tensors")
    rows = []
    for path in paths:
        down = tensors[f"{PREFIX}{path}.lora_A.weight"]
        up = tensors.get(f"{PREFIX}{path}.lora_B.weight")
        if up is None:
            raise ValueError(f"the adapter file has {path}.lora_A but no {path}.lora_B")
        rows.append(_layer_analysis(path, down, up, config.scaling_for(path), None))
    return rows


def format_analysis(rows: Sequence[LayerAnalysis]) -> str:
    """A markdown table, one row per layer."""
    lines = ["| layer | r | ‖s·ΔW‖_F | σ_max | eff. rank (entropy) | rank > 1% σ_max | magnitude Δ | direction Δ |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        sigma_max = float(row.singular_values[0]) if row.singular_values.numel() else 0.0
        lines.append(
            f"| {row.path} | {row.r} | {row.delta_norm:.4g} | {sigma_max:.4g} | {row.effective_rank:.2f} | "
            f"{row.rank_above_1pct} | {_maybe(row.magnitude_change)} | {_maybe(row.direction_change)} |"
        )
    return "\n".join(lines)


def _maybe(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def plot_analysis(rows: Sequence[LayerAnalysis], png: str | os.PathLike[str]) -> Path:
    """Spectra of every layer (normalised by σ_max), ‖s·ΔW‖_F per layer and, with base weights, ΔD against ΔM."""
    with_base = rows[0].magnitude_change is not None
    figure = new_figure(15 if with_base else 10, 4.5)
    axes = figure.subplots(1, 3 if with_base else 2)
    for row in rows:
        if row.singular_values.numel() and row.singular_values[0] > 0:
            axes[0].semilogy(range(1, row.singular_values.numel() + 1),
                             (row.singular_values / row.singular_values[0]).numpy(), alpha=0.5)
    axes[0].set(title="singular values of s·ΔW / σ_max", xlabel="index", ylabel="σ_k / σ_max")
    axes[1].bar(range(len(rows)), [row.delta_norm for row in rows])
    axes[1].set(title="‖s·ΔW‖_F per layer", xlabel="layer (table order)", ylabel="Frobenius norm")
    if with_base:
        axes[2].scatter([row.direction_change for row in rows], [row.magnitude_change for row in rows])
        axes[2].set(title="direction vs magnitude change", xlabel="mean 1 − cos(W', W)",
                    ylabel="‖ ‖W'‖ − ‖W‖ ‖")
    return save_figure(figure, png)

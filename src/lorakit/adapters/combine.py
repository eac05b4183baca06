"""Weighted combination of adapters into one new LoRA adapter.

Each source adapter i contributes, in every layer it adapts, factors A_i [r_i, in] and B_i [out, r_i] with
ΔW_i = B_i·A_i (VeRA: A_i = diag(λ_d)·A_s, B_i = diag(λ_b)·B_s) and its scaling s_i (α/r, or α/√r with rsLoRA;
1 for VeRA). With user weights w_i, let c_i = w_i·s_i. The *target* update of a layer is

    ΔW* = Σ_i c_i·B_i·A_i                     (task arithmetic on weights, Ilharco et al. 2023)

and adapters absent from a layer count as zero there. The new adapter stores its factors with scaling exactly 1 in
every layer (`use_rslora=False`, `lora_alpha` = r, `rank_pattern`/`alpha_pattern` where ranks differ), so its files
load in lorakit and PEFT with the same outputs whatever the sources' rsLoRA settings or rank/alpha patterns were.

Methods:
- ``"cat"``: A = [A_1; …; A_n] [Σr_i, in], B = [c_1·B_1, …, c_n·B_n] [out, Σr_i]. B·A = ΔW* exactly.
- ``"svd"``: the best rank-k approximation of ΔW* (Eckart–Young): k = ``svd_rank`` (default: the largest source rank
  in the layer), capped at rank(ΔW*) ≤ Σr_i and min(out, in), so it is exact whenever k ≥ rank(ΔW*). Computed from the
  factors (QR of the stacked factors, SVD of a Σr_i × Σr_i core, in float64), never from a dense out × in SVD.
  Split evenly: B = U_k·√Σ_k, A = √Σ_k·V_kᵀ.
- ``"linear"``: parameter averaging, the semantics of PEFT's ``add_weighted_adapter(combination_type="linear")``:
  all sources have the same rank r in a layer and

      A = Σ_i sgn(c_i)·√|c_i|·A_i,   B = Σ_i √|c_i|·B_i,   so   B·A = ΔW* + Σ_{i≠j} √|c_i|·sgn(c_j)√|c_j|·B_i·A_j.

  It keeps rank r and costs nothing, but it is exact only for a single adapter (or when the cross terms B_i·A_j
  vanish); otherwise it is an approximation: use "cat" (exact) or "svd" (best at a chosen rank) for ΔW*.
  PEFT gives the new adapter lora_alpha = r but keeps the first source's use_rslora, so with rsLoRA sources its
  combined update comes out √r times too large; lorakit always stores scaling 1.

Refused with a clear error: DoRA sources (the magnitude rescales the whole row of W + sΔW, so the effective update
is not low-rank and has no combined magnitude), VeRA sources for "linear" (no trainable A and B to average), sources
that train biases or modules_to_save (those are shared base tensors or whole modules, not low-rank updates).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .config import AdapterConfig, LoraConfig, VeraConfig
from .layer import Adapter
from .model import adapt, set_adapter
from .registry import adapted_layers, adapter_configs
from .targets import compact_target_list

METHODS = ("linear", "cat", "svd")


@dataclass(frozen=True)
class _Term:
    """One source adapter in one layer: c·up·down, in float64."""

    coeff: float  # c = w·s
    down: Tensor  # [r, in]
    up: Tensor  # [out, r]


Factors = tuple[Tensor, Tensor]  # (down [k, in], up [out, k]) of the new adapter in one layer


def combine_adapters(
    model: nn.Module,
    names: Sequence[str],
    weights: Sequence[float],
    method: str = "linear",
    *,
    new_name: str,
    svd_rank: int | None = None,
) -> None:
    """Add LoRA adapter `new_name` combining adapters `names` with `weights` (see the module docstring).

    The active adapters stay as they were; `set_adapter(model, new_name)` switches to the new one, and
    `save_adapter(model, path, new_name)` writes it in PEFT's format.
    """
    configs = _check_request(model, names, list(weights), method, new_name, svd_rank)
    combine = _COMBINERS[method]
    factors: dict[str, Factors] = {}
    for path, layer in adapted_layers(model):
        terms = [_term(layer.adapters[n], w) for n, w in zip(names, weights) if n in layer.adapters]
        if terms:
            factors[path] = combine(path, terms, svd_rank)
    _install(model, new_name, _new_config(model, configs, factors), factors)


def _check_request(
    model: nn.Module, names: Sequence[str], weights: list[float], method: str, new_name: str, svd_rank: int | None
) -> list[AdapterConfig]:
    configs = adapter_configs(model)
    if isinstance(names, str):
        raise TypeError(f"names must be a list of adapter names, got the string {names!r}")
    if method not in METHODS:
        raise ValueError(f"unknown combination method {method!r}; choose one of {METHODS}")
    if not names:
        raise ValueError("names is empty: give at least one adapter to combine")
    if len(weights) != len(names):
        raise ValueError(f"got {len(names)} adapter names but {len(weights)} weights")
    if len(set(names)) != len(names):
        raise ValueError(f"adapter names repeat: {names}; give each adapter once with its total weight")
    unknown = [n for n in names if n not in configs]
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}; this model has {sorted(configs)}")
    if new_name in configs:
        raise ValueError(f"adapter {new_name!r} already exists; delete_adapter() it or choose another name")
    if not new_name or "." in new_name or new_name == "__base__" or hasattr(nn.ModuleDict, new_name):
        raise ValueError(f"invalid adapter name {new_name!r}: it must be non-empty, without '.', not '__base__' and "
                         "not an nn.ModuleDict attribute")
    if not all(torch.isfinite(torch.tensor(float(w))) for w in weights):
        raise ValueError(f"weights must be finite numbers, got {weights}")
    if svd_rank is not None and (method != "svd" or svd_rank <= 0):
        raise ValueError(f"svd_rank={svd_rank} needs method='svd' and a positive value")
    chosen = [configs[n] for n in names]
    for name, config in zip(names, chosen):
        _check_source(model, name, config, method)
    return chosen


def _check_source(model: nn.Module, name: str, config: AdapterConfig, method: str) -> None:
    if (isinstance(config, LoraConfig) and config.use_dora) or any(
        layer.adapters[name].use_dora for _, layer in adapted_layers(model) if name in layer.adapters
    ):
        raise ValueError(
            f"adapter {name!r} uses DoRA: its magnitude rescales whole rows of W + s·ΔW, so its effective update is "
            "not low-rank and magnitudes have no combined value; merge_and_unload a copy of the model instead"
        )
    if isinstance(config, LoraConfig) and config.changes_base:
        raise ValueError(
            f"adapter {name!r} was initialised from the base weight ({config.init_lora_weights!r}): its update counts "
            "from B0·A0, not from zero; save it as a plain LoRA (save_adapter) and load that to combine it"
        )
    if isinstance(config, LoraConfig) and (config.target_parameters or config.trainable_token_indices):
        raise ValueError(f"adapter {name!r} adapts parameters or token rows, which combine_adapters does not weight")
    if config.bias != "none":
        raise ValueError(
            f"adapter {name!r} trains biases (bias={config.bias!r}); biases are shared base tensors that a combined "
            "adapter cannot carry separately, so they cannot be weighted"
        )
    if config.modules_to_save:
        raise ValueError(
            f"adapter {name!r} trains whole modules (modules_to_save={list(config.modules_to_save)}), which are not "
            "low-rank updates and cannot be combined"
        )
    if method == "linear" and isinstance(config, VeraConfig):
        raise ValueError(
            f"adapter {name!r} is a VeRA adapter: 'linear' averages trained LoRA factors A and B, which VeRA does "
            "not have; use method='cat' (exact) or 'svd'"
        )


def _term(adapter: Adapter, weight: float) -> _Term:
    down, up = adapter.delta.factors()  # [r, in], [out, r]
    return _Term(float(weight) * adapter.scaling, down.detach().double(), up.detach().double())


def _cat(path: str, terms: list[_Term], svd_rank: int | None) -> Factors:
    """ΔW* exactly, at rank Σr_i."""
    down = torch.cat([t.down for t in terms], dim=0)  # [Σr, in]
    up = torch.cat([t.coeff * t.up for t in terms], dim=1)  # [out, Σr]
    return down, up


def factored_svd(down: Tensor, up: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of up·down (down [R, in], up [out, R]) without forming it: U [out, p], σ [p], Vᵀ [p, in], p ≤ R.

    up = Q_u·R_u and downᵀ = Q_d·R_d (thin QR), so up·down = Q_u·(R_u·R_dᵀ)·Q_dᵀ and only the small core is decomposed.
    """
    q_up, r_up = torch.linalg.qr(up)  # [out, p], [p, R]
    q_down, r_down = torch.linalg.qr(down.T)  # [in, q], [q, R]
    u, sigma, vh = torch.linalg.svd(r_up @ r_down.T, full_matrices=False)  # core [p, q]
    return q_up @ u, sigma, vh @ q_down.T


def _svd(path: str, terms: list[_Term], svd_rank: int | None) -> Factors:
    """Best rank-k approximation of ΔW* = up·down, split evenly between the factors."""
    down, up = _cat(path, terms, None)  # ΔW* = up·down
    u, sigma, vh = factored_svd(down, up)
    k = min(svd_rank if svd_rank is not None else max(t.down.shape[0] for t in terms), sigma.shape[0])
    root = sigma[:k].sqrt()  # [k]
    return root[:, None] * vh[:k], u[:, :k] * root  # [k, in], [out, k]


def _linear(path: str, terms: list[_Term], svd_rank: int | None) -> Factors:
    """PEFT's parameter averaging: A = Σ sgn(c)√|c|·A_i, B = Σ √|c|·B_i (same rank required)."""
    ranks = sorted({t.down.shape[0] for t in terms})
    if len(ranks) > 1:
        raise ValueError(
            f"method='linear' needs equal ranks, but the adapters have ranks {ranks} in {path}; "
            "use method='cat' (exact) or 'svd'"
        )
    roots = [abs(t.coeff) ** 0.5 for t in terms]
    down = sum((r if t.coeff >= 0 else -r) * t.down for r, t in zip(roots, terms))  # [r, in]
    up = sum(r * t.up for r, t in zip(roots, terms))  # [out, r]
    return down, up


_COMBINERS: dict[str, Callable[[str, list[_Term], int | None], Factors]] = {
    "linear": _linear, "cat": _cat, "svd": _svd,
}


def _new_config(model: nn.Module, sources: list[AdapterConfig], factors: dict[str, Factors]) -> LoraConfig:
    """A LoRA config whose scaling_for(path) is exactly 1 and whose rank_for(path) is each layer's new rank."""
    ranks = {path: down.shape[0] for path, (down, _) in factors.items()}
    common = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {re.escape(path): r for path, r in ranks.items() if r != common}
    first = sources[0]
    dropout = first.lora_dropout if isinstance(first, LoraConfig) else first.vera_dropout
    return LoraConfig(
        target_modules=compact_target_list(model, list(factors)),
        r=common, lora_alpha=common, rank_pattern=pattern, alpha_pattern=dict(pattern),
        lora_dropout=dropout, task_type=first.task_type, base_model_name_or_path=first.base_model_name_or_path,
    )


def _install(model: nn.Module, name: str, config: LoraConfig, factors: dict[str, Factors]) -> None:
    """Create the adapter with lorakit's own constructors, fill in the factors, keep the active set unchanged."""
    active = list(dict.fromkeys(n for _, layer in adapted_layers(model) for n in layer.active))
    adapt(model, config, name)
    with torch.no_grad():
        for path, layer in adapted_layers(model):
            if path in factors:
                delta = layer.adapters[name].delta
                down, up = factors[path]
                delta.lora_A.copy_(down)
                delta.lora_B.copy_(up)
    set_adapter(model, active)


__all__ = ["METHODS", "combine_adapters", "factored_svd"]

"""AdaptedLinear: a frozen base layer plus named adapters whose updates add to its output.

For a base computing W·x + b (W [out, in]) and an active adapter with update ΔW = up·down and scaling s:
- LoRA / VeRA:  y = W·x + b + s·ΔW·x_d,  x_d = dropout(x)                                   (Hu et al. 2021, eq. 3)
- DoRA:         y = (m/n)·(W + s·ΔW)·x_d + b-terms, n = ‖W + s·ΔW‖ per output row, detached (Liu et al. 2024, §4.3),
  computed as  y = W·x + b + (m/n − 1)·W·x_d + (m/n)·s·ΔW·x_d;  with no dropout x_d = x and W·x is the base output,
  so no second matmul is needed. n² = ‖W_i‖² + 2s·⟨up_i, (W·downᵀ)_i⟩ + s²·up_i·(down·downᵀ)·up_iᵀ never builds W + sΔW.

The base is any frozen layer of `base.py`'s interface: nn.Linear, Hugging Face Conv1D (weight stored [in, out]) or a
weight provider such as NF4Linear. Adapters never look at which.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import (
    FrozenLinear,
    base_bias,
    base_dims,
    dense_weight,
    frozen_linear_forward,
    is_conv1d,
    matmul_dtype,
    stored_transposed,
)
from .deltas import HeadTokensDelta, LoRADelta, LoRALinear, TrainableTokensDelta, VeRADelta

Delta = LoRADelta | VeRADelta | TrainableTokensDelta | HeadTokensDelta


class Adapter(nn.Module):
    """One adapter's state in one layer: its delta, dropout, scaling and (DoRA) magnitude vector."""

    def __init__(self, delta: Delta, scaling: float, dropout: float, magnitude: Tensor | None = None) -> None:
        super().__init__()
        self.delta = delta
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_magnitude_vector = None if magnitude is None else nn.Parameter(magnitude)  # [out]
        self.register_buffer("merged_norm", None, persistent=False)  # [out]: DoRA's n at merge time, for unmerge

    @property
    def use_dora(self) -> bool:
        return self.lora_magnitude_vector is not None

    @property
    def dtype(self) -> torch.dtype:
        return next(self.delta.parameters()).dtype

    def delta_weight(self) -> Tensor:
        """s·ΔW [out, in]."""
        return self.delta.delta_weight() * self.scaling

    @torch.no_grad()
    def weight_norm(self, layer: AdaptedLinear) -> Tensor:
        """n = ‖W + s·ΔW‖ per output row [out], without forming W + s·ΔW; detached by construction."""
        down, up = (t.float() for t in self.delta.factors())  # [r, in], [out, r]
        w_down = layer.project_base(down).float()  # [out, r] = W·downᵀ
        s = self.scaling
        gram = down @ down.T  # [r, r]
        norm_sq = layer.weight_row_norm_sq() + 2 * s * (up * w_down).sum(1) + s * s * ((up @ gram) * up).sum(1)
        return norm_sq.clamp_min(0).sqrt()

    def update(self, x: Tensor, base_out: Tensor, layer: AdaptedLinear) -> Tensor:
        """What this adapter adds to the base output, in the adapter's dtype: [..., out]. The products run in the
        adapter's dtype (float32 by default) also on a half-precision base, as PEFT's do: with bfloat16 products
        (the factors rounded as under autocast) the built-in task's exact match fell by 1.7 points over 3 seeds."""
        x = x.to(self.dtype) if x.is_floating_point() else x  # an embedding's input is token ids
        x_d = self.dropout(x)
        if not self.use_dora:
            return self.delta(x_d, self.scaling)  # [..., out]
        ratio = self.lora_magnitude_vector / self.weight_norm(layer)  # [out]; norm detached (DoRA §4.3)
        down, up = self.delta.factors()  # [r, in], [out, r]
        hidden = F.linear(x_d, down) * self.scaling  # [..., r]
        if isinstance(self.dropout, nn.Identity) or not self.training:
            # (m/n − 1)·(W·x) with W·x = base_out − b: one fused multiply-add over the activations; the ratio
            # scales the small matrix `up` rather than the [..., out] update, and the bias term rides in F.linear.
            bias = layer.bias
            shift = None if bias is None else (1 - ratio) * bias.to(self.dtype)  # [out]
            lora = F.linear(hidden, ratio[:, None] * up, shift)  # [..., out]
            return torch.addcmul(lora, base_out.to(self.dtype), ratio - 1)
        w_x = F.linear(x_d, dense_weight(layer.base_layer).to(self.dtype))  # W·x_d [..., out]
        return torch.addcmul(F.linear(hidden, ratio[:, None] * up), w_x, ratio - 1)

    def merged_weight(self, weight: Tensor, layer: AdaptedLinear) -> Tensor:
        """W with this adapter folded in (float32 math); remembers DoRA's norm for an exact unmerge."""
        w = weight.float()
        if isinstance(self.delta, (TrainableTokensDelta, HeadTokensDelta)):
            return self.delta.written_into(w, self.delta.values)  # rows replaced: merging twice (tied) is harmless
        delta = self.delta_weight().float()
        if not self.use_dora:
            return w + delta
        norm = self.weight_norm(layer)
        self.merged_norm = norm
        return (self.lora_magnitude_vector.float() / norm)[:, None] * (w + delta)

    def unmerged_weight(self, weight: Tensor) -> Tensor:
        """Inverse of merged_weight."""
        w = weight.float()
        if isinstance(self.delta, (TrainableTokensDelta, HeadTokensDelta)):
            return self.delta.written_into(w, self.delta.originals)
        delta = self.delta_weight().float()
        if not self.use_dora:
            return w - delta
        w = w * (self.merged_norm / self.lora_magnitude_vector.float())[:, None]
        self.merged_norm = None
        return w - delta


class AdaptedLinear(nn.Module):
    """A frozen base layer and a ModuleDict of adapters; `active` adapters add their updates, `merged` ones are in W."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.out_features, self.in_features = base_dims(base_layer)
        self.fan_in_fan_out = is_conv1d(base_layer)  # PEFT's config flag; `transposed` also covers nn.Embedding
        self.transposed = stored_transposed(base_layer)
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []
        self.merged: list[str] = []
        self.disabled = False
        self.routing: list[tuple[str, Tensor]] | None = None  # mixed batch: (adapter or "__base__", sample indices)
        self.routing_batch = 0  # the batch size the routing was given for
        self.register_buffer("row_norm_sq", None, persistent=False)  # [out] ‖W_i‖², cached; cleared when W changes

    @property
    def bias(self) -> Tensor | None:
        return base_bias(self.base_layer)

    @property
    def weight(self) -> Tensor:
        """The base weight [out, in] (dequantized for quantized bases)."""
        return dense_weight(self.base_layer)

    @property
    def live(self) -> list[str]:
        """The active adapters that are not merged into W: those whose updates the forward adds."""
        return [name for name in self.active if name not in self.merged]

    def add_adapter(self, name: str, adapter: Adapter) -> None:
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists in this layer; delete it first or choose another name")
        self.adapters[name] = adapter

    def forward(self, x: Tensor, *args: object, **kwargs: object) -> Tensor:
        fused = None if args or kwargs else self._fusable_lora(x)
        if fused is not None:
            base = self.base_layer
            return LoRALinear.apply(x, base.weight, base.bias, *fused.delta.factors(), fused.scaling)
        base_out = frozen_linear_forward(self.base_layer, x) if not (args or kwargs) else \
            self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return base_out
        if self.routing is not None:
            return self._forward_routed(x, base_out)
        updates = [self.adapters[n].update(x, base_out, self) for n in self.live]
        if not updates:
            return base_out
        total = updates[0]
        for more in updates[1:]:
            total = total + more
        return base_out + total.to(base_out.dtype)

    def _fusable_lora(self, x: Tensor) -> Adapter | None:
        """The one live adapter when base and update can run as one `LoRALinear`: a plain LoRA, with no dropout at
        work, on a frozen dense nn.Linear whose products run in its own dtype (the common training case)."""
        base = self.base_layer
        if self.disabled or self.routing is not None or type(base) not in (nn.Linear, FrozenLinear):
            return None
        live = self.live
        if len(live) != 1:
            return None
        adapter = self.adapters[live[0]]
        weight = base.weight
        plain = type(adapter.delta) is LoRADelta and not adapter.use_dora
        no_dropout = isinstance(adapter.dropout, nn.Identity) or not adapter.dropout.training
        native = x.dtype == weight.dtype and matmul_dtype(weight.dtype, weight.device) == weight.dtype
        return adapter if plain and no_dropout and native and not weight.requires_grad else None

    def _forward_routed(self, x: Tensor, base_out: Tensor) -> Tensor:
        """Each sample (dim 0) gets its own adapter: one gather, update and scatter-add per adapter, not per sample."""
        if self.merged:
            raise RuntimeError("a mixed batch needs unmerged adapters; unmerge() first")
        if x.shape[0] != self.routing_batch:
            raise ValueError(f"mixed_batch was given {self.routing_batch} adapter names for a batch of {x.shape[0]}")
        out = None
        for name, index in self.routing:
            if name not in self.adapters:
                continue
            adapter = self.adapters[name]
            rows = base_out.index_select(0, index) if adapter.use_dora else base_out  # only DoRA reads W·x
            update = adapter.update(x.index_select(0, index), rows, self).to(base_out.dtype)
            out = base_out.index_add(0, index, update) if out is None else out.index_add_(0, index, update)
        return base_out if out is None else out

    @torch.no_grad()
    def project_base(self, rows: Tensor) -> Tensor:
        """W·rowsᵀ for rows [k, in]: [out, k], through the base layer itself (no dense copy for quantized bases)."""
        out = self.base_layer(rows.to(self._compute_dtype()))  # [k, out]
        bias = self.bias
        if bias is not None:
            out = out - bias.to(out.dtype)
        return out.T

    def _compute_dtype(self) -> torch.dtype:
        return getattr(self.base_layer, "compute_dtype", None) or dense_weight(self.base_layer).dtype

    @torch.no_grad()
    def weight_row_norm_sq(self) -> Tensor:
        if self.row_norm_sq is None:
            self.row_norm_sq = self.weight.float().pow(2).sum(1)
        return self.row_norm_sq

    # Merging -----------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def merge(self, names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Fold adapters (default: the active ones) into the base weight; dense bases only."""
        for name in names if names is not None else list(self.active):
            if name in self.merged:
                continue
            new = self.adapters[name].merged_weight(self.weight, self)
            if safe_merge and not torch.isfinite(new).all():
                self.adapters[name].merged_norm = None
                raise ValueError(f"merging adapter {name!r} gives non-finite weights; the layer is left unchanged")
            self.write_weight(new)
            self.merged.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take merged adapters back out of W, last merged first."""
        while self.merged:
            name = self.merged.pop()
            self.write_weight(self.adapters[name].unmerged_weight(self.weight))

    def write_weight(self, weight: Tensor) -> None:
        """Replace the dense base weight by `weight` [out, in] (in the base's dtype and layout)."""
        base = self.base_layer
        if not isinstance(base, nn.Linear) and not self.transposed:
            raise TypeError(
                f"cannot merge into a {type(base).__name__} base in place (it would round the update away); "
                "use lorakit.merge_and_unload(model, dtype=...) to export a dense model"
            )
        target = base.weight.T if self.transposed else base.weight
        target.copy_(weight.to(target.dtype))
        self.row_norm_sq = None

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, active={self.active}, merged={self.merged}"

"""AdaLoRA's rank allocation (Zhang et al. 2023, §3.2–3.3 and Alg. 1), as PEFT runs it.

Each adapted layer holds ΔW = P·Λ·Q (`SVDDelta`); triplet i of a layer is (P[:, i], Λ_i, Q[i, :]). After every
optimizer step:
- sensitivity of each trainable entry w: I = |w · ∂L/∂w|, smoothed Ī ← β₁·Ī + (1 − β₁)·I, uncertainty
  Ū ← β₂·Ū + (1 − β₂)·|I − Ī|, score s(w) = Ī·Ū (eq. 6–8);
- a triplet's importance is s(Λ_i) + mean_j s(P_ji) + mean_j s(Q_ij) (eq. 9);
- the budget (total kept triplets) stays at init_r · layers for `tinit` steps, falls cubically to target_r · layers
  until `total_step − tfinal`, then stays (eq. 10); every `deltaT` steps in between, the least important triplets
  beyond the budget get Λ_i = 0. From `total_step − tfinal` on the final mask is re-applied every step.
The loss gains the orthogonality penalty R = mean over layers of ‖QQᵀ − I‖_F and ‖PᵀP − I‖_F, times
`orth_reg_weight` (eq. 4). The final mask is the config's `rank_pattern`; saving keeps only the kept triplets.

In a training loop (after `loss.backward()`):

    allocator = lorakit.RankAllocator(model)            # the model's AdaLoRA adapter
    loss = task_loss + allocator.orthogonal_penalty()   # before backward
    optimizer.step(); allocator.update_and_allocate(step); optimizer.zero_grad()
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import AdaLoraConfig
from .registry import adapted_layers, adapter_configs


class RankAllocator:
    """Importance scores, the budget schedule and the masks of one AdaLoRA adapter of `model`."""

    def __init__(self, model: nn.Module, adapter_name: str = "default", total_step: int | None = None) -> None:
        config = adapter_configs(model).get(adapter_name)
        if not isinstance(config, AdaLoraConfig):
            raise ValueError(f"adapter {adapter_name!r} is not an AdaLoRA adapter")
        if total_step is not None:
            config = config.replace(total_step=total_step)
        if config.total_step is None:
            raise ValueError("AdaLoRA needs total_step: set it in AdaLoraConfig or pass it to RankAllocator")
        adapter_configs(model)[adapter_name] = config
        self.model, self.adapter_name = model, adapter_name
        self.deltas = {path: layer.adapters[adapter_name].delta for path, layer in adapted_layers(model)
                       if adapter_name in layer.adapters}
        self.initial_budget = sum(delta.r for delta in self.deltas.values())
        self.target_budget = config.target_r * len(self.deltas)
        self.reset()

    @property
    def config(self) -> AdaLoraConfig:
        """The adapter's config as the model holds it (rank_pattern updated by every mask, restored on resume)."""
        return adapter_configs(self.model)[self.adapter_name]

    def reset(self) -> None:
        self.smoothed: dict[int, Tensor] = {}  # id(parameter) -> Ī
        self.uncertainty: dict[int, Tensor] = {}  # id(parameter) -> Ū

    def budget(self, step: int) -> tuple[int, bool]:
        """(triplets to keep, whether to mask at this step), the cubic schedule of eq. 10."""
        c = self.config
        if step <= c.tinit:
            return self.initial_budget, False
        if step > c.total_step - c.tfinal:
            return self.target_budget, True
        left = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        budget = int((self.initial_budget - self.target_budget) * left**3 + self.target_budget)
        return budget, step % c.deltaT == 0

    @torch.no_grad()
    def _update_scores(self) -> None:
        b1, b2 = self.config.beta1, self.config.beta2
        for delta in self.deltas.values():
            for param in (delta.lora_A, delta.lora_E, delta.lora_B):
                if param.grad is None:
                    continue
                sensitivity = (param * param.grad).abs()
                key = id(param)
                smoothed = self.smoothed.get(key, torch.zeros_like(param))
                uncertainty = self.uncertainty.get(key, torch.zeros_like(param))
                self.smoothed[key] = b1 * smoothed + (1 - b1) * sensitivity
                self.uncertainty[key] = b2 * uncertainty + (1 - b2) * (sensitivity - self.smoothed[key]).abs()

    def _score(self, param: Tensor) -> Tensor:
        key = id(param)
        return self.smoothed[key] * self.uncertainty[key] if key in self.smoothed else torch.zeros_like(param)

    def triplet_scores(self) -> dict[str, Tensor]:
        """Importance of each triplet [r] per layer (eq. 9)."""
        return {path: self._score(d.lora_E).view(-1) + self._score(d.lora_A).mean(1) + self._score(d.lora_B).mean(0)
                for path, d in self.deltas.items()}

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        """Zero Λ of the triplets scoring at or below the (initial − budget)-th smallest score; returns the masks."""
        scores = self.triplet_scores()
        drop = self.initial_budget - budget
        threshold = torch.cat(list(scores.values())).kthvalue(drop).values if drop > 0 else None
        pattern = {}
        for path, delta in self.deltas.items():
            keep = scores[path] > threshold if threshold is not None else torch.ones_like(scores[path], dtype=torch.bool)
            delta.lora_E.masked_fill_(~keep[:, None], 0.0)
            pattern[f"{path}.lora_E"] = keep.tolist()
        return pattern

    @torch.no_grad()
    def _apply(self, pattern: dict[str, list[bool]]) -> None:
        for path, delta in self.deltas.items():
            keep = torch.tensor(pattern[f"{path}.lora_E"], device=delta.lora_E.device)
            delta.lora_E.masked_fill_(~keep[:, None], 0.0)

    def update_and_allocate(self, step: int) -> int:
        """Call after optimizer.step() and before zero_grad(); returns the budget in force at `step` (0-based)."""
        c = self.config
        final = c.total_step - c.tfinal
        if step < final:
            self._update_scores()
        budget, mask = self.budget(step)
        if step > final and self.config.rank_pattern is not None:  # the final mask, again
            self._apply(self.config.rank_pattern)
        elif mask or step >= final:
            self._set_pattern(self.mask_to_budget(budget))
            if step == final:
                self.reset()
        return budget

    def _set_pattern(self, pattern: dict[str, list[bool]]) -> None:
        adapter_configs(self.model)[self.adapter_name] = self.config.replace(rank_pattern=pattern)

    def orthogonal_penalty(self) -> Tensor:
        """orth_reg_weight · mean over P and Q of every layer of ‖PᵀP − I‖_F, ‖QQᵀ − I‖_F (eq. 4)."""
        terms = []
        for delta in self.deltas.values():
            for gram in (delta.lora_A @ delta.lora_A.T, delta.lora_B.T @ delta.lora_B):  # [r, r]
                terms.append(torch.linalg.matrix_norm(gram - torch.eye(gram.shape[0], device=gram.device)))
        return self.config.orth_reg_weight * torch.stack(terms).mean()

"""Low-rank weight updates ΔW = up · down, independent of the base layer they sit on.

- LoRA (Hu et al. 2021, §4.1): ΔW = B·A, A [r, in] kaiming-uniform (or N(0, 1/r)), B [out, r] zeros, so ΔW = 0 at init.
- Stacked LoRA (PEFT's `target_parameters`, e.g. the fused experts of a mixture-of-experts layer): one LoRA per matrix
  of a stack [E, out, in], ΔW_e = B_e·A_e, held in two tensors in PEFT's layout.
- VeRA (Kopiczko et al. 2024, §3.1): ΔW = diag(λ_b)·B_s·diag(λ_d)·A_s with A_s [r, in] and B_s [out, r] frozen random
  projections shared by every layer (sliced from one pair sized to the largest layer), λ_b = 0 and λ_d = d_initial.

Every delta offers the same three operations: `forward(x, scale)` = scale·ΔW·x computed through the rank-r bottleneck,
`factors()` = (down [r, in], up [out, r]) with ΔW = up·down, and `delta_weight()` = ΔW [out, in] for merging.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LoRADelta(nn.Module):
    """ΔW = lora_B · lora_A, PEFT's parameter names and layouts."""

    def __init__(self, in_features: int, out_features: int, r: int, init: bool | str = True) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(r, in_features))  # [r, in]
        self.lora_B = nn.Parameter(torch.empty(out_features, r))  # [out, r]
        # the factors at init when they came from the base weight (init.py): ΔW then counts from B₀·A₀, not 0
        self.register_buffer("init_A", None, persistent=False)  # [r, in]
        self.register_buffer("init_B", None, persistent=False)  # [out, r]
        self.reset_parameters(init)

    @torch.no_grad()
    def reset_parameters(self, init: bool | str = True) -> None:
        r = self.r
        if init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if init is False:  # both random: a non-identity start, used to test merging
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
        else:
            nn.init.zeros_(self.lora_B)

    @property
    def r(self) -> int:
        return self.lora_A.shape[0]

    def forward(self, x: Tensor, scale: float) -> Tensor:
        # x [..., in] -> [..., r] -> [..., out]
        return F.linear(F.linear(x, self.lora_A) * scale, self.lora_B)

    def factors(self) -> tuple[Tensor, Tensor]:
        return self.lora_A, self.lora_B

    def delta_weight(self) -> Tensor:
        return self.lora_B @ self.lora_A  # [out, in]


class StackedLoRADelta(LoRADelta):
    """ΔW_e = B_e·A_e for each matrix e of a stack of E (E = 1: a plain 2-D parameter), PEFT's layout:
    lora_A [E·r, in] holds A_e in rows e·r … e·r + r − 1; lora_B [out, r·E] holds column k of B_e in column k·E + e.
    It acts through the weight (`adapters/parameters.py`), so only `delta_weight` is used."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, r: int, init: bool | str = True) -> None:
        self.num_experts = num_experts
        super().__init__(in_features, out_features, r * num_experts, init)

    @property
    def r(self) -> int:
        return self.lora_A.shape[0] // self.num_experts

    def delta_weight(self) -> Tensor:
        a = self.lora_A.reshape(self.num_experts, self.r, -1)  # [E, r, in]
        b = self.lora_B.reshape(self.lora_B.shape[0], self.r, self.num_experts).permute(2, 0, 1)  # [E, out, r]
        return b @ a  # [E, out, in]


def kaiming_uniform_like_peft(shape: tuple[int, int], generator: torch.Generator) -> Tensor:
    """U(-b, b) with b = √3·√2/√fan_in, fan_in = shape[1], drawn from `generator` (VeRA's projection init)."""
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeRAProjections(nn.Module):
    """The frozen pair shared by every VeRA layer of one adapter, regenerable from `projection_prng_key`.

    Buffers are non-persistent: the model's state dict does not repeat them under every layer; the adapter file
    carries them once (`save_projection=True`) or only the seed. A is kept transposed, so that every layer's slice
    A[:, :in] is a contiguous block of rows of Aᵀ (no copy per forward).
    """

    def __init__(self, r: int, max_in: int, max_out: int, projection_prng_key: int) -> None:
        super().__init__()
        generator = torch.Generator(device="cpu").manual_seed(projection_prng_key)
        vera_a = kaiming_uniform_like_peft((r, max_in), generator)
        self.register_buffer("vera_A_t", vera_a.T.contiguous(), persistent=False)  # [max_in, r]
        self.register_buffer("vera_B", kaiming_uniform_like_peft((max_out, r), generator), persistent=False)  # [max_out, r]

    @property
    def vera_A(self) -> Tensor:
        """PEFT's layout [r, max_in], a view: writing into it writes the stored projection."""
        return self.vera_A_t.T


class VeRADelta(nn.Module):
    """ΔW = diag(vera_lambda_b)·B_s[:out]·diag(vera_lambda_d)·A_s[:, :in]."""

    def __init__(self, in_features: int, out_features: int, projections: VeRAProjections, d_initial: float) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.projections = projections
        r = projections.vera_A.shape[0]
        self.vera_lambda_b = nn.Parameter(torch.zeros(out_features))  # [out]
        self.vera_lambda_d = nn.Parameter(torch.full((r,), float(d_initial)))  # [r]

    @property
    def r(self) -> int:
        return self.vera_lambda_d.shape[0]

    def forward(self, x: Tensor, scale: float) -> Tensor:
        a_t = self.projections.vera_A_t[: self.in_features].to(x.dtype)  # [in, r], contiguous
        hidden = (x @ a_t) * (self.vera_lambda_d * scale)  # [..., r]
        if torch.is_grad_enabled() and self.vera_lambda_b.requires_grad:
            # λ_b on the output: folded into the frozen B, autograd would form B's whole [out, r] gradient (a matmul)
            return F.linear(hidden, self._up()) * self.vera_lambda_b  # [..., out]
        return F.linear(hidden, self.vera_lambda_b[:, None] * self._up())  # no gradient: fold λ_b into [out, r]

    def _up(self) -> Tensor:
        return self.projections.vera_B[: self.out_features].to(self.vera_lambda_b.dtype)  # [out, r]

    def factors(self) -> tuple[Tensor, Tensor]:
        a = self.projections.vera_A[:, : self.in_features].to(self.vera_lambda_d.dtype)  # [r, in]
        return self.vera_lambda_d[:, None] * a, self.vera_lambda_b[:, None] * self._up()

    def delta_weight(self) -> Tensor:
        down, up = self.factors()
        return up @ down  # [out, in]

"""Low-rank weight updates ΔW = up · down, independent of the base layer they sit on.

- LoRA (Hu et al. 2021, §4.1): ΔW = B·A, A [r, in] kaiming-uniform (or N(0, 1/r)), B [out, r] zeros, so ΔW = 0 at init.
- Embedding LoRA: the same ΔW = B·A on nn.Embedding's W [dim, num_embeddings] (`base.py`), so A [r, num] is looked up
  by token id; as PEFT (after loralib) A starts at zero and B ~ N(0, 1).
- Trainable tokens (PEFT's `trainable_token_indices`): chosen rows of an embedding table train, all others stay
  frozen; the rows' values are held, ΔW = values − original on those rows, zero elsewhere. On an output head the
  rows are output rows (`HeadTokensDelta`), also when the head is tied to the embedding and shares its rows.
- Stacked LoRA (PEFT's `target_parameters`, e.g. the fused experts of a mixture-of-experts layer): one LoRA per matrix
  of a stack [E, out, in], ΔW_e = B_e·A_e, held in two tensors in PEFT's layout.
- VeRA (Kopiczko et al. 2024, §3.1): ΔW = diag(λ_b)·B_s·diag(λ_d)·A_s with A_s [r, in] and B_s [out, r] frozen random
  projections shared by every layer (sliced from one pair sized to the largest layer), λ_b = 0 and λ_d = d_initial.

A plain LoRA on a frozen dense layer, the common training case, runs with its base as one function (`LoRALinear`).

Every delta offers the same three operations: `forward(x, scale)` = scale·ΔW·x computed through the rank-r bottleneck,
`factors()` = (down [r, in], up [out, r]) with ΔW = up·down, and `delta_weight()` = ΔW [out, in] for merging.
"""

from __future__ import annotations

import math
from typing import Any

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
        return LoRAProduct.apply(x, self.lora_A, self.lora_B, scale)

    def factors(self) -> tuple[Tensor, Tensor]:
        return self.lora_A, self.lora_B

    def delta_weight(self) -> Tensor:
        return self.lora_B @ self.lora_A  # [out, in]


class LoRAProduct(torch.autograd.Function):
    """y = s·(x·Aᵀ)·Bᵀ, the same function as two F.linear calls, with a backward that multiplies in the layouts the
    CPU's GEMMs run fastest (`lora_gradients`). Saved: x and h = s·x·Aᵀ, as autograd would."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, down: Tensor, up: Tensor, scale: float) -> Tensor:
        hidden = F.linear(x, down) * scale  # [..., r]
        ctx.save_for_backward(x, down, up, hidden)
        ctx.scale = scale
        return F.linear(hidden, up)  # [..., out]

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        x, down, up, hidden = ctx.saved_tensors
        need_x, need_down, need_up, _ = ctx.needs_input_grad
        x2 = x.reshape(-1, x.shape[-1])  # [n, in]
        g = grad_out.reshape(-1, grad_out.shape[-1])  # [n, out]
        grad_hidden, grad_down, grad_up = lora_gradients(x2, down, up, hidden.reshape(-1, hidden.shape[-1]), g,
                                                         ctx.scale, need_down, need_up)
        grad_x = (grad_hidden @ down).reshape(x.shape) if need_x else None  # [..., in]
        return grad_x, grad_down, grad_up, None


class LoRALinear(torch.autograd.Function):
    """y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ for a frozen dense W: the base layer and one LoRA as a single function. The update
    is added inside the GEMM (addmm) in the forward, and ∂L/∂x = g·W + (∂L/∂h)·A is one addmm in the backward, so
    each layer makes one pass over its [n, out] and [n, in] activations fewer than base + update. On a half-precision
    base it saves x in its own dtype instead of a float32 copy per adapter: the activations kept for backward by
    SmolLM2-135M's bfloat16 training step fall from 288 to 196 MiB (8 × 30 tokens). Numerics as
    `base_out + update.to(base_out.dtype)`: the LoRA products run in the factors' dtype (float32) and are rounded
    once to the base's dtype."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, down: Tensor, up: Tensor,
                scale: float) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # [n, in]
        out = F.linear(x2, weight, bias)  # [n, out], the base's dtype
        hidden = torch.mm(x2.to(down.dtype), down.T).mul_(scale)  # [n, r]
        if out.dtype == up.dtype:
            out.addmm_(hidden, up.T)
        else:
            out.add_(torch.mm(hidden, up.T).to(out.dtype))
        ctx.save_for_backward(x2, weight, down, up, hidden)
        ctx.scale = scale
        return out.reshape(*x.shape[:-1], out.shape[-1])  # [..., out]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, None, Tensor | None, Tensor | None,
                                                      Tensor | None, None]:
        x2, weight, down, up, hidden = ctx.saved_tensors
        need_x, _, need_bias, need_down, need_up, _ = ctx.needs_input_grad
        g = grad_out.reshape(-1, grad_out.shape[-1])  # [n, out]
        grad_hidden, grad_down, grad_up = lora_gradients(x2.to(down.dtype), down, up, hidden, g.to(up.dtype),
                                                         ctx.scale, need_down, need_up)
        grad_x = None
        if need_x:
            grad_x = g @ weight  # [n, in]
            if grad_x.dtype == down.dtype:
                grad_x.addmm_(grad_hidden, down)
            else:
                grad_x.add_(torch.mm(grad_hidden, down).to(grad_x.dtype))
            grad_x = grad_x.reshape(*grad_out.shape[:-1], x2.shape[-1])  # [..., in]
        grad_bias = g.sum(0) if need_bias else None  # [out]
        return grad_x, None, grad_bias, grad_down, grad_up, None


def lora_gradients(x: Tensor, down: Tensor, up: Tensor, hidden: Tensor, g: Tensor, scale: float, need_down: bool,
                   need_up: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """∂L/∂h, ∂L/∂A, ∂L/∂B of y = h·Bᵀ, h = s·x·Aᵀ, for x [n, in], h [n, r], g = ∂L/∂y [n, out], all in the
    factors' dtype. Autograd's ∂L/∂B = gᵀ·h and g·B take a transposed [out, n] operand with a tiny inner or outer size
    r; the same products as (hᵀ·g)ᵀ and (Bᵀ·gᵀ)ᵀ run 1.5–2.6× faster in float32 on 2 cores (out = 192 … 1536,
    n = 240, r = 8)."""
    grad_up = (hidden.T @ g).T if need_up else None  # [out, r]
    grad_hidden = (up.T @ g.T).T * scale  # [n, r]
    grad_down = grad_hidden.T @ x if need_down else None  # [r, in]
    return grad_hidden, grad_down, grad_up


class EmbeddingLoRADelta(LoRADelta):
    """LoRA on an nn.Embedding: the input is token ids, A [r, num_embeddings] is a lookup table, B [dim, r]."""

    def __init__(self, num_embeddings: int, dim: int, r: int, init: bool | str = True,
                 padding_idx: int | None = None) -> None:
        self.padding_idx = padding_idx
        super().__init__(num_embeddings, dim, r, init)

    @torch.no_grad()
    def reset_parameters(self, init: bool | str = True) -> None:
        if init is False:
            super().reset_parameters(False)
            return
        nn.init.zeros_(self.lora_A)
        nn.init.normal_(self.lora_B)

    def forward(self, ids: Tensor, scale: float) -> Tensor:
        # ids [...] -> [..., r] -> [..., dim]
        return F.linear(F.embedding(ids, self.lora_A.T, padding_idx=self.padding_idx) * scale, self.lora_B)


class TrainableTokensDelta(nn.Module):
    """Rows `token_indices` of an embedding table [num, dim] train: `trainable_tokens_delta` [n, dim] holds their values
    (PEFT's name: the values, not a difference), `trainable_tokens_original` the frozen ones they replace."""

    def __init__(self, table: Tensor, token_indices: list[int]) -> None:
        super().__init__()
        self.num_embeddings = table.shape[0]
        self.register_buffer("token_indices", torch.tensor(token_indices, dtype=torch.long, device=table.device))
        original = table.detach()[self.token_indices].float()  # [n, dim]
        self.register_buffer("trainable_tokens_original", original.clone())
        self.trainable_tokens_delta = nn.Parameter(original.clone())  # [n, dim]

    @property
    def values(self) -> Tensor:
        return self.trainable_tokens_delta

    @property
    def originals(self) -> Tensor:
        return self.trainable_tokens_original

    def rows(self) -> Tensor:
        """ΔW in the table's layout [num, dim]: values − original on the chosen rows."""
        change = self.trainable_tokens_delta - self.trainable_tokens_original  # [n, dim]
        return change.new_zeros(self.num_embeddings, change.shape[1]).index_copy(0, self.token_indices, change)

    def forward(self, ids: Tensor, scale: float) -> Tensor:
        return F.embedding(ids, self.rows())  # [..., dim]

    def delta_weight(self) -> Tensor:
        return self.rows().T  # [dim, num]: the embedding seen as a linear map

    def written_into(self, weight: Tensor, rows: Tensor) -> Tensor:
        """weight [dim, num] with the chosen tokens' columns set to `rows` [n, dim]."""
        return weight.T.index_copy(0, self.token_indices, rows.to(weight.dtype)).T


class HeadTokensDelta(nn.Module):
    """Trainable rows of an output head [vocab, dim], which are output rows: y[..., i] += x·(values_i − original_i)
    for the chosen tokens i. `shared`: the head is tied to an embedding and these are that embedding's rows (one set
    of parameters, saved once, under the embedding)."""

    def __init__(self, tokens: TrainableTokensDelta, shared: bool) -> None:
        super().__init__()
        self.tokens = tokens
        self.shared = shared

    @property
    def values(self) -> Tensor:
        return self.tokens.trainable_tokens_delta

    @property
    def originals(self) -> Tensor:
        return self.tokens.trainable_tokens_original

    def forward(self, x: Tensor, scale: float) -> Tensor:
        tokens = self.tokens
        change = tokens.trainable_tokens_delta - tokens.trainable_tokens_original  # [n, dim]
        out = x.new_zeros(*x.shape[:-1], tokens.num_embeddings)  # [..., vocab]
        return out.index_copy(-1, tokens.token_indices, F.linear(x, change))

    def delta_weight(self) -> Tensor:
        return self.tokens.rows()  # [vocab, dim]

    def written_into(self, weight: Tensor, rows: Tensor) -> Tensor:
        return weight.index_copy(0, self.tokens.token_indices, rows.to(weight.dtype))


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


class SVDDelta(nn.Module):
    """AdaLoRA's update in SVD form (Zhang et al. 2023, eq. 3): ΔW = P·Λ·Q / r₀, PEFT's names lora_B = P [out, r],
    lora_E = Λ [r, 1], lora_A = Q [r, in]; r₀ = `ranknum`, the initial rank, which keeps the scaling fixed while
    triplets are pruned (a pruned triplet has Λ_i = 0). P and Q start N(0, 0.02²), Λ at zero, so ΔW = 0."""

    def __init__(self, in_features: int, out_features: int, r: int, ranknum: int, init: bool | str = True) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.randn(r, in_features))  # [r, in]
        self.lora_E = nn.Parameter(torch.randn(r, 1))  # [r, 1]
        self.lora_B = nn.Parameter(torch.randn(out_features, r))  # [out, r]
        self.register_buffer("ranknum", torch.tensor(float(ranknum)), persistent=False)
        if init is not False:
            with torch.no_grad():
                nn.init.zeros_(self.lora_E)
                nn.init.normal_(self.lora_A, std=0.02)
                nn.init.normal_(self.lora_B, std=0.02)

    @property
    def r(self) -> int:
        return self.lora_A.shape[0]

    def forward(self, x: Tensor, scale: float) -> Tensor:
        # x [..., in] -> [..., r] -> [..., out]
        return F.linear(F.linear(x, self.lora_A * self.lora_E) * (scale / (self.ranknum + 1e-5)), self.lora_B)

    def factors(self) -> tuple[Tensor, Tensor]:
        return self.lora_A * self.lora_E / (self.ranknum + 1e-5), self.lora_B

    def delta_weight(self) -> Tensor:
        down, up = self.factors()
        return up @ down  # [out, in]


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

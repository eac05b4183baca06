"""Initialisations that read the base weight W [out, in] and move part of it into the adapter.

The adapter starts from factors A [r, in], B [out, r] taken from W and the base keeps the rest, W_res, so that at init
W_res + s·B·A = W (exactly for PiSSA and OLoRA; up to the quantization error for LoftQ), s the adapter's scaling:

- PiSSA (Meng et al. 2024, §3): W = U·diag(S)·Vᵀ; B = U_r·diag(√(S_r/s)), A = diag(√(S_r/s))·V_rᵀ, so s·B·A is W's best
  rank-r approximation (its principal components train) and W_res = W − s·B·A its tail. "pissa_niter_<N>" takes U_r,
  S_r, V_r from a randomized SVD with N subspace iterations (Halko et al. 2011): much faster for large W, approximate.
- OLoRA (Büyükakyüz 2024, §3): W = Q·R (reduced QR); B = Q[:, :r], A = R[:r], W_res = W − s·B·A (as PEFT: s is not
  divided out, so s·B·A is W's first r QR components only when s = 1).
- LoftQ (Li et al. 2023, Alg. 1): starting from B·A = 0, alternate  Q_t = quant(W − s·B·A)  and
  (B, A) = SVD_r((W − deq(Q_t)) / s)  for `loftq_iter` rounds; the base becomes the quantized Q_T, so that
  deq(Q_T) + s·B·A ≈ W: QLoRA that starts where the dense model is. s is divided out so this holds for any lora_alpha
  (PEFT's factors approximate W − deq(Q_T) without it, i.e. only for s = 1).

The adapter core never imports a quantization backend: LoftQ finds its quantizer in `QUANTIZERS`, which
`lorakit.quant` fills when the package is imported. The adapter's initial factors are kept (non-persistent buffers
`init_A`, `init_B`), so that a trained adapter can be written as a plain LoRA of the original base:
ΔW = B·A − B₀·A₀ = [B | −B₀]·[A; A₀] (rank 2r; `formats/peft.py`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .base import dense_weight, is_weight_provider
from .config import LoftQConfig, LoraConfig
from .deltas import LoRADelta
from .layer import AdaptedLinear

Quantizer = Callable[[nn.Module, Tensor], nn.Module]
"""(dense base layer, weight [out, in]) -> a frozen quantized base holding that weight and the layer's bias."""

QUANTIZERS: dict[int, Quantizer] = {}  # bits -> quantizer; lorakit.quant registers NF4 as 4


def register_quantizer(bits: int, quantizer: Quantizer) -> None:
    QUANTIZERS[bits] = quantizer


def _split_singular(u: Tensor, s_vals: Tensor, vh: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """A = diag(√(S/s))·Vh [r, in], B = U·diag(√(S/s)) [out, r], so that s·B·A = U·diag(S)·Vh."""
    root = (s_vals / scale).sqrt()  # [r]
    return root[:, None] * vh, u * root[None, :]


def pissa_factors(weight: Tensor, r: int, scale: float, niter: int | None = None) -> tuple[Tensor, Tensor]:
    """(A [r, in], B [out, r]) from W's top-r singular triplets: exact SVD, or randomized with `niter` iterations."""
    if niter is None:
        u, s_vals, vh = torch.linalg.svd(weight, full_matrices=False)  # [out, k], [k], [k, in]
        return _split_singular(u[:, :r], s_vals[:r], vh[:r], scale)
    u, s_vals, v = torch.svd_lowrank(weight, q=r, niter=niter)  # [out, r], [r], [in, r]
    return _split_singular(u, s_vals, v.T, scale)


def olora_factors(weight: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """(A = R[:r] [r, in], B = Q[:, :r] [out, r]) from W = Q·R."""
    q, upper = torch.linalg.qr(weight)  # [out, k], [k, in]
    return upper[:r].contiguous(), q[:, :r].contiguous()


def loftq_factors(
    weight: Tensor, r: int, scale: float, config: LoftQConfig, quantize: Callable[[Tensor], nn.Module]
) -> tuple[Tensor, Tensor, nn.Module]:
    """(A [r, in], B [out, r], quantized base) with deq(base) + s·B·A ≈ W after `loftq_iter` alternations."""
    target = weight
    for _ in range(config.loftq_iter):
        base = quantize(target)
        error = weight - dense_weight(base).float()  # [out, in]: what the quantized base misses
        a, b = pissa_factors(error, r, scale)
        target = weight - scale * (b @ a)
    return a, b, base


def initialize_from_base(layer: AdaptedLinear, delta: LoRADelta, config: LoraConfig, scale: float) -> None:
    """Set delta's factors from the layer's base weight and write the residual into the base (see the module doc)."""
    init = str(config.init_lora_weights)
    if is_weight_provider(layer.base_layer):
        raise ValueError(
            f"init_lora_weights={init!r} rewrites the base weight, which a quantized base cannot take back exactly: "
            "adapt the dense model, then quantize it (lorakit.quantize, or --quantize nf4 on the command line)"
        )
    if layer.merged:
        raise ValueError(f"init_lora_weights={init!r} reads the base weight: unmerge() the other adapters first")
    weight = layer.weight.detach().float()  # [out, in]
    r = delta.r
    if r > min(weight.shape):
        raise ValueError(f"init_lora_weights={init!r} needs r <= min(out, in) = {min(weight.shape)}, got r={r}")
    base = None
    if init == "olora":
        a, b = olora_factors(weight, r)
    elif init == "loftq":
        quantizer = QUANTIZERS.get(config.loftq_config.loftq_bits)
        if quantizer is None:
            raise ValueError(f"no {config.loftq_config.loftq_bits}-bit quantizer is registered for LoftQ")
        a, b, base = loftq_factors(weight, r, scale, config.loftq_config,
                                   lambda w: quantizer(layer.base_layer, w.to(layer.weight.dtype)))
    else:
        niter = int(init.rsplit("_", 1)[1]) if init.startswith("pissa_niter_") else None
        a, b = pissa_factors(weight, r, scale, niter)
    if not (torch.isfinite(a).all() and torch.isfinite(b).all() and torch.isfinite(weight - scale * (b @ a)).all()):
        raise ValueError(f"init_lora_weights={init!r} gives non-finite factors with scaling {scale:g} (PiSSA and LoftQ "
                         "divide by it: lora_alpha must be positive and not tiny)")
    with torch.no_grad():
        delta.lora_A.copy_(a)
        delta.lora_B.copy_(b)
        delta.init_A = a.to(delta.lora_A.dtype).clone()
        delta.init_B = b.to(delta.lora_B.dtype).clone()
        if base is None:
            layer.write_weight(weight - scale * (b @ a))
        else:
            layer.base_layer = base
            layer.row_norm_sq = None

"""A float64 dense reference for every method: the effective weight written out directly from the papers."""

from __future__ import annotations

import torch
from torch import Tensor

import lorakit


class FixedMask(torch.nn.Module):
    """Dropout with a known mask, so the oracle can apply the same one."""

    def __init__(self, mask: Tensor) -> None:
        super().__init__()
        self.mask = mask

    def forward(self, x: Tensor) -> Tensor:
        return x * self.mask.to(x.dtype)


def factors64(adapter: lorakit.Adapter) -> tuple[Tensor, Tensor]:
    """(down [r, in], up [out, r]) in float64, as leaves whose gradients the oracle reports by parameter."""
    delta = adapter.delta
    if hasattr(delta, "lora_A"):
        return delta.lora_A.detach().double(), delta.lora_B.detach().double()
    a = delta.projections.vera_A[:, : delta.in_features].double()
    b = delta.projections.vera_B[: delta.out_features].double()
    return a, b


def oracle_forward(layer: lorakit.AdaptedLinear, x: Tensor, weight: Tensor, mask: Tensor | None = None
                   ) -> tuple[Tensor, dict[str, Tensor]]:
    """y = W·x + b + Σ adapters, in float64, with the adapter parameters as float64 leaves (returned by name)."""
    x64 = x.double()
    w = weight.double()
    bias = layer.bias.detach().double() if layer.bias is not None else 0.0
    y = x64 @ w.T + bias
    leaves: dict[str, Tensor] = {}
    for name in layer.active:
        adapter = layer.adapters[name]
        x_d = x64 * mask.double() if mask is not None else x64
        s = adapter.scaling
        if hasattr(adapter.delta, "lora_A"):
            a, b = (t.clone().requires_grad_() for t in factors64(adapter))
            leaves.update({"lora_A": a, "lora_B": b})
            delta_w = b @ a
        else:
            a, b = factors64(adapter)
            lam_b = adapter.delta.vera_lambda_b.detach().double().clone().requires_grad_()
            lam_d = adapter.delta.vera_lambda_d.detach().double().clone().requires_grad_()
            leaves.update({"vera_lambda_b": lam_b, "vera_lambda_d": lam_d})
            delta_w = lam_b[:, None] * b @ (lam_d[:, None] * a)
        if adapter.lora_magnitude_vector is None:
            y = y + x_d @ (s * delta_w).T
        else:
            m = adapter.lora_magnitude_vector.detach().double().clone().requires_grad_()
            leaves["lora_magnitude_vector"] = m
            norm = (w + s * delta_w).norm(dim=1).detach()  # DoRA §4.3: the norm is a constant in backward
            ratio = m / norm
            y = y + (ratio - 1) * (x_d @ w.T) + ratio * (x_d @ (s * delta_w).T)
    return y, leaves


def grads_by_name(adapter: lorakit.Adapter) -> dict[str, Tensor]:
    out = {name.rsplit(".", 1)[-1]: p.grad for name, p in adapter.named_parameters() if p.grad is not None}
    return out


def check_layer(layer: lorakit.AdaptedLinear, x: Tensor, mask: Tensor | None = None, rtol: float = 1e-5,
                atol: float = 1e-5) -> None:
    """Output and every adapter gradient of `layer` on x equal the float64 oracle's."""
    y = layer(x)
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(11)).to(y.dtype)
    y.backward(grad_out)
    expected, leaves = oracle_forward(layer, x, layer.weight.detach(), mask)
    expected.backward(grad_out.double())
    torch.testing.assert_close(y.double(), expected, rtol=rtol, atol=atol)
    for name in layer.active:
        grads = grads_by_name(layer.adapters[name])
        assert set(grads) == set(leaves)
        for key, leaf in leaves.items():
            torch.testing.assert_close(grads[key].double(), leaf.grad, rtol=max(rtol, 1e-4), atol=atol)

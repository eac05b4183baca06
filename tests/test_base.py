"""The frozen-base interface (lorakit.adapters.base): frozen half-precision products on CPUs without bfloat16 units
run in float32, and still give the float64 oracle's outputs and gradients to the precision of the dtype."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
from lorakit.adapters import base
from lorakit.adapters.base import FrozenLinearFunction, frozen_linear_forward, matmul_dtype
from lorakit.quant.nf4 import NF4Linear


@pytest.fixture
def no_native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(base, "cpu_has_native_bf16", lambda: False)


def test_matmul_dtype_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setattr(base, "cpu_has_native_bf16", lambda: False)
    assert matmul_dtype(torch.bfloat16, cpu) == torch.float32 and matmul_dtype(torch.float16, cpu) == torch.float32
    assert matmul_dtype(torch.float32, cpu) == torch.float32
    assert matmul_dtype(torch.bfloat16, torch.device("cuda")) == torch.bfloat16
    monkeypatch.setattr(base, "cpu_has_native_bf16", lambda: True)
    assert matmul_dtype(torch.bfloat16, cpu) == torch.bfloat16


@pytest.mark.usefixtures("no_native_bf16")
@pytest.mark.parametrize("has_bias", [True, False])
def test_frozen_half_linear_matches_the_float64_oracle(has_bias: bool) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(48, 80, bias=has_bias).to(torch.bfloat16).requires_grad_(False)
    if has_bias:
        layer.bias.requires_grad_(True)
    x = torch.randn(3, 5, 48, dtype=torch.bfloat16, requires_grad=True)
    y = frozen_linear_forward(layer, x)
    assert y.dtype == torch.bfloat16 and y.grad_fn.name().startswith("FrozenLinearFunction")
    grad = torch.randn_like(y)
    y.backward(grad)
    w, x64, g = layer.weight.double(), x.detach().double(), grad.double()
    expected = x64 @ w.T + (layer.bias.detach().double() if has_bias else 0)
    torch.testing.assert_close(y.double(), expected, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(x.grad.double(), g @ w, rtol=1e-2, atol=1e-2)
    if has_bias:
        torch.testing.assert_close(layer.bias.grad.double(), g.sum((0, 1)), rtol=1e-2, atol=1e-2)


def test_float32_and_trainable_layers_keep_their_own_forward(no_native_bf16: None) -> None:
    layer = nn.Linear(8, 4)
    x = torch.randn(2, 8)
    assert frozen_linear_forward(layer.requires_grad_(False), x).grad_fn is None  # plain F.linear, no custom function
    half = nn.Linear(8, 4).to(torch.bfloat16)  # weight still trainable: autograd must see it
    assert "FrozenLinear" not in frozen_linear_forward(half, x.to(torch.bfloat16)).grad_fn.name()
    assert FrozenLinearFunction is not None


@pytest.mark.usefixtures("no_native_bf16")
def test_bf16_lora_and_qlora_steps_match_float32(tmp_path: object) -> None:
    """A LoRA step on a bfloat16 dense or NF4 base: same loss and adapter gradients as on the float32 base, to bf16's
    precision (the half-precision products ran in float32)."""
    from conftest import tiny_llama

    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    grads = {}
    for name, dtype, quantize in (("fp32", torch.float32, False), ("bf16", torch.bfloat16, False),
                                  ("nf4-fp32", torch.float32, True), ("nf4-bf16", torch.bfloat16, True)):
        model = tiny_llama().to(dtype)
        if quantize:
            lorakit.quantize(model)
            assert any(isinstance(m, NF4Linear) for m in model.modules())
        torch.manual_seed(3)
        lorakit.adapt(model, lorakit.LoraConfig(r=4, target_modules="all-linear", init_lora_weights="gaussian"))
        for _, p in model.named_parameters():
            if p.requires_grad and "lora_B" in _:
                nn.init.normal_(p, std=0.1)
        model(input_ids=ids, labels=ids).loss.backward()
        grads[name] = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
    for dense, half in (("fp32", "bf16"), ("nf4-fp32", "nf4-bf16")):
        cosine = torch.nn.functional.cosine_similarity(grads[dense], grads[half], dim=0)
        assert cosine > 0.99, (dense, half, cosine)


@pytest.mark.usefixtures("no_native_bf16")
def test_a_half_precision_load_keeps_the_output_head_out_of_the_slow_kernel(tmp_path: object,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from lorakit.adapters.base import FrozenLinear
    from lorakit.models import load

    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(load, "matmul_dtype", lambda dtype, device: torch.float32)
    model, _ = lorakit.load_model("tiny-llama", dtype="bfloat16", progress=False)
    assert type(model.lm_head) is FrozenLinear and isinstance(model.lm_head, nn.Linear)
    dense, _ = lorakit.load_model("tiny-llama", dtype="float32", progress=False)
    ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits.float(), dense(ids).logits, rtol=5e-2, atol=5e-2)
    lorakit.adapt(model, lorakit.LoraConfig(r=4, target_modules="all-linear"))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.usefixtures("no_native_bf16")
def test_frozen_linear_casts_the_weight_in_row_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of rows give the same products as one block (the float32 copy in flight is one block)."""
    torch.manual_seed(1)
    weight = torch.randn(37, 16, dtype=torch.bfloat16)
    bias = torch.randn(37, dtype=torch.bfloat16)
    x = torch.randn(4, 16, dtype=torch.bfloat16, requires_grad=True)
    results = []
    for elements in (1 << 24, 16 * 5):  # one block; blocks of 5 rows (the last one 2)
        monkeypatch.setattr(base, "CAST_CHUNK_ELEMENTS", elements)
        x.grad = None
        y = FrozenLinearFunction.apply(x, weight, bias)
        y.backward(torch.ones_like(y))
        results.append((y.detach(), x.grad.clone()))
    assert torch.equal(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-2, atol=1e-2)

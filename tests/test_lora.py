"""LoRA against a float64 dense oracle, and the model-level operations (merge, unload, disable, targets)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import (
    BUILDERS,
    Holder,
    model_input,
    model_output,
    outputs_across_merging,
    randomize_adapters,
    tiny_llama,
    tiny_mlp,
)
from oracle import check_layer, oracle_forward
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit.adapters import base
from lorakit.adapters.deltas import LoRALinear, LoRAProduct


def make_layer(kind: str, bias: bool, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    if kind == "linear":
        layer = nn.Linear(10, 6, bias=bias)
    else:
        layer = Conv1D(6, 10)  # weight [in, out]; Conv1D always has a bias
        nn.init.normal_(layer.weight, std=0.3)
    if layer.bias is not None:
        nn.init.normal_(layer.bias)
    return Holder(layer.to(dtype))


def weight_out_in(layer: nn.Module) -> torch.Tensor:
    return layer.weight.T if isinstance(layer, Conv1D) else layer.weight


@pytest.mark.parametrize(("layer_kind", "has_bias"), [("linear", True), ("linear", False), ("conv1d", True)])
@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("bias_mode", ["none", "lora_only"])
def test_lora_matches_dense_float64_oracle(layer_kind: str, has_bias: bool, use_rslora: bool, bias_mode: str) -> None:
    model = make_layer(layer_kind, has_bias, torch.float32)
    base = copy.deepcopy(model.proj)
    config = lorakit.LoraConfig(r=3, lora_alpha=5, target_modules=["proj"], use_rslora=use_rslora, bias=bias_mode)
    lorakit.adapt(model, config)
    randomize_adapters(model, scale=0.3)
    adapter = model.proj.adapters["default"]
    a, b = adapter.delta.lora_A, adapter.delta.lora_B
    s = 5 / 3**0.5 if use_rslora else 5 / 3
    assert adapter.scaling == pytest.approx(s)

    x = torch.randn(4, 7, 10, requires_grad=True)
    y = model(x)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)

    # float64 oracle: y = x·(W + s·B·A)ᵀ + b
    x64 = x.detach().double().requires_grad_()
    a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    bias64 = None if base.bias is None else model.proj.bias.detach().double().requires_grad_()
    w_eff = weight_out_in(base).detach().double() + s * b64 @ a64
    y64 = x64 @ w_eff.T + (bias64 if bias64 is not None else 0)
    y64.backward(grad_out.double())

    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.grad.double(), a64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.grad.double(), b64.grad, rtol=1e-5, atol=1e-5)
    assert model.proj.base_layer.weight.grad is None
    if has_bias and bias_mode == "lora_only":
        torch.testing.assert_close(model.proj.bias.grad.double(), bias64.grad, rtol=1e-5, atol=1e-5)
    elif has_bias:
        assert model.proj.bias.grad is None


@pytest.mark.parametrize("native_bf16", [False, True])
def test_lora_on_a_bfloat16_base_trains_float32_weights(monkeypatch: pytest.MonkeyPatch, native_bf16: bool) -> None:
    """With or without bfloat16 units, the update of a bfloat16 layer is computed in float32 from float32 weights
    (no factor rounded to bfloat16), and the output stays bfloat16."""
    monkeypatch.setattr(base, "cpu_has_native_bf16", lambda: native_bf16)
    model = make_layer("linear", True, torch.bfloat16)  # 10 -> 6
    lorakit.adapt(model, lorakit.LoraConfig(r=2, target_modules=["proj"]))
    randomize_adapters(model)
    adapter = model.proj.adapters["default"]
    assert adapter.delta.lora_A.dtype == torch.float32
    x = torch.randn(3, 10, dtype=torch.bfloat16)
    check_layer(model.proj, x, rtol=2e-2, atol=2e-2)  # output and gradients against the float64 oracle
    assert model(x).dtype == torch.bfloat16
    assert adapter.delta.lora_A.grad.dtype == adapter.delta.lora_B.grad.dtype == torch.float32
    update = adapter.update(x, model.proj.base_layer(x), model.proj)  # [3, 6]
    assert update.dtype == torch.float32
    expected = x.double() @ adapter.delta_weight().double().T  # float64 oracle of s·ΔW·x
    torch.testing.assert_close(update.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("frozen", ["none", "x", "down"])
def test_the_lora_product_backward_is_its_derivative(frozen: str) -> None:
    """LoRAProduct's hand-written backward against finite differences in float64 (torch.autograd.gradcheck), with
    any input that needs no gradient left out."""
    x = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=frozen != "x")  # [batch, seq, in]
    down = torch.randn(3, 7, dtype=torch.float64, requires_grad=frozen != "down")  # [r, in]
    up = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)  # [out, r]
    assert torch.autograd.gradcheck(lambda *t: LoRAProduct.apply(*t, 0.5), (x, down, up))
    y = LoRAProduct.apply(x, down, up, 0.5)
    torch.testing.assert_close(y, 0.5 * x @ (up @ down).T)  # the function itself: s·ΔW·x
    y.sum().backward()
    assert (x.grad is None) == (frozen == "x") and (down.grad is None) == (frozen == "down")


@pytest.mark.parametrize("frozen", ["none", "x", "bias"])
def test_the_fused_lora_linear_is_base_plus_update_and_its_backward_is_its_derivative(frozen: str) -> None:
    """LoRALinear (base layer and LoRA as one function) equals x·Wᵀ + b + s·x·(B·A)ᵀ, and its backward passes
    torch.autograd.gradcheck in float64, with a frozen input or bias left out."""
    x = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=frozen != "x")  # [batch, seq, in]
    weight = torch.randn(4, 7, dtype=torch.float64)  # [out, in], frozen
    bias = torch.randn(4, dtype=torch.float64, requires_grad=frozen != "bias")  # [out]
    down = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)  # [r, in]
    up = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)  # [out, r]
    fused = lambda x, bias, down, up: LoRALinear.apply(x, weight, bias, down, up, 0.5)
    assert torch.autograd.gradcheck(fused, (x, bias, down, up))
    y = fused(x, bias, down, up)
    torch.testing.assert_close(y, x @ (weight + 0.5 * up @ down).T + bias)
    y.sum().backward()
    assert (x.grad is None) == (frozen == "x") and (bias.grad is None) == (frozen == "bias")


@pytest.mark.parametrize(("case", "fused"), [
    ("float32", True), ("bfloat16 native", True), ("bfloat16 emulated", False), ("dropout training", False),
    ("dropout eval", True), ("two adapters", False), ("dora", False), ("conv1d", False), ("trainable weight", False),
])
def test_a_plain_lora_on_a_dense_layer_runs_fused_and_matches_the_float64_oracle(
        monkeypatch: pytest.MonkeyPatch, case: str, fused: bool) -> None:
    """The fused path is taken exactly where its numerics are the general path's (one plain LoRA, no dropout at work,
    a frozen nn.Linear whose products run in its own dtype), gives the float64 oracle's output and gradients, and on a
    half-precision base keeps no float32 copy of the input for backward."""
    monkeypatch.setattr(base, "cpu_has_native_bf16", lambda: case != "bfloat16 emulated")
    dtype = torch.bfloat16 if case.startswith("bfloat16") else torch.float32
    model = make_layer("conv1d" if case == "conv1d" else "linear", True, dtype)  # 10 -> 6
    config = lorakit.LoraConfig(r=2, target_modules=["proj"], use_dora=case == "dora",
                                lora_dropout=0.5 if case.startswith("dropout") else 0.0)
    lorakit.adapt(model, config)
    if case == "two adapters":
        lorakit.adapt(model, config, "second")
        lorakit.set_adapter(model, ["default", "second"])
    if case == "trainable weight":
        model.proj.base_layer.weight.requires_grad_(True)
    randomize_adapters(model)
    model.train(case != "dropout eval")
    x = torch.randn(3, 4, 10, dtype=dtype, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = model(x)
    assert (y.grad_fn.name() == "LoRALinearBackward") == fused
    if fused and dtype == torch.bfloat16:
        assert not any(t.dtype == torch.float32 and t.shape[-1] == 10 and t.numel() == x.numel() for t in saved)
    if case == "two adapters":  # the oracle reports one adapter's gradients; its output holds both
        torch.testing.assert_close(y.double(), oracle_forward(model.proj, x, model.proj.weight.detach())[0],
                                   rtol=1e-5, atol=1e-5)
    elif not case.startswith("dropout"):
        tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-5
        check_layer(model.proj, x.detach(), rtol=tolerance, atol=tolerance)


def test_gaussian_init_and_identity_at_init(kind: str) -> None:
    model = BUILDERS[kind]()
    inputs = model_input(kind)
    reference = model_output(model, kind, inputs)
    lorakit.adapt(model, lorakit.LoraConfig(r=4, target_modules="all-linear", init_lora_weights="gaussian"))
    torch.testing.assert_close(model_output(model, kind, inputs), reference, rtol=0, atol=0)
    a = next(layer.adapters["default"].delta.lora_A for _, layer in lorakit.adapted_layers(model))
    assert a.std().item() == pytest.approx(1 / 4, rel=0.3)


def test_merge_unmerge_merge_and_unload_agree(kind: str) -> None:
    model = BUILDERS[kind]()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = model_input(kind)
    lorakit.adapt(model, lorakit.LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", use_rslora=True))
    randomize_adapters(model)
    outputs = outputs_across_merging(model, kind, inputs)
    for other in outputs.values():
        torch.testing.assert_close(other, outputs["unmerged"], rtol=1e-4, atol=1e-4)
    plain = lorakit.merge_and_unload(copy.deepcopy(model))
    assert not any(isinstance(m, lorakit.AdaptedLinear) for m in plain.modules())
    assert set(plain.state_dict()) == set(original)
    restored = lorakit.unload(model).state_dict()
    for key, value in original.items():
        torch.testing.assert_close(restored[key], value, rtol=0, atol=1e-6)


def test_unmerge_restores_the_weight() -> None:
    model = tiny_mlp()
    w0 = model.up.weight.detach().clone()
    lorakit.adapt(model, lorakit.LoraConfig(r=2, target_modules=["up"], init_lora_weights=False))
    lorakit.merge(model)
    assert not torch.allclose(model.up.weight, w0)
    lorakit.unmerge(model)
    torch.testing.assert_close(model.up.weight, w0, rtol=0, atol=1e-6)


def test_only_adapter_parameters_get_gradients() -> None:
    model = tiny_llama()
    lorakit.adapt(model, lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model)
    model.train()
    out = model(**model_input("llama"), labels=model_input("llama")["input_ids"])
    out.loss.backward()
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(".adapters.default.delta.lora_" in name for name in with_grad)
    assert len(with_grad) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)


def test_bias_all_trains_every_bias() -> None:
    model = BUILDERS["gpt2"]()
    lorakit.adapt(model, lorakit.LoraConfig(r=2, target_modules=["c_attn"], bias="all"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    all_biases = {n for n, _ in model.named_parameters() if n.endswith("bias")}
    assert all_biases <= trainable
    assert trainable - all_biases == {n for n in trainable if "lora_" in n}


def test_parameter_count_matches_the_lora_paper() -> None:
    """LoRA r=8 on q and v of a RoBERTa-base-shaped encoder: 12 layers x 2 x 8 x (768 + 768) = 294,912."""
    from transformers import BertConfig, BertModel

    config = BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=16,
                        vocab_size=8)
    model = BertModel(config)
    lorakit.adapt(model, lorakit.LoraConfig(r=8, target_modules=["query", "value"]))
    count = lorakit.trainable_parameters(model)
    assert count.trainable == 294_912
    assert count.total == sum(p.numel() for p in model.parameters())
    assert "trainable params: 294,912" in str(count)


def test_rank_and_alpha_patterns() -> None:
    model = tiny_llama()
    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                rank_pattern={"v_proj": 2, "layers.1.self_attn.q_proj": 6}, alpha_pattern={"v_proj": 1})
    lorakit.adapt(model, config)
    layers = dict(lorakit.adapted_layers(model))
    assert layers["model.layers.0.self_attn.q_proj"].adapters["default"].delta.r == 4
    assert layers["model.layers.1.self_attn.q_proj"].adapters["default"].delta.r == 6
    v = layers["model.layers.0.self_attn.v_proj"].adapters["default"]
    assert (v.delta.r, v.scaling) == (2, 0.5)


def test_unknown_target_lists_close_matches() -> None:
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"q_proj"):
        lorakit.adapt(model, lorakit.LoraConfig(target_modules=["q_prj"]))
    with pytest.raises(ValueError, match=r"not linear layers"):
        lorakit.adapt(model, lorakit.LoraConfig(target_modules=["input_layernorm"]))
    assert not list(lorakit.adapted_layers(model))


def test_regex_target_and_exclude() -> None:
    model = tiny_llama()
    lorakit.adapt(model, lorakit.LoraConfig(target_modules=r".*\.(q|k)_proj", exclude_modules=["layers.1.self_attn.k_proj"]))
    paths = {p for p, _ in lorakit.adapted_layers(model)}
    assert paths == {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.q_proj"}


def test_all_linear_skips_the_output_head() -> None:
    model = tiny_llama()
    lorakit.adapt(model, lorakit.LoraConfig(target_modules="all-linear"))
    paths = {p for p, _ in lorakit.adapted_layers(model)}
    assert "lm_head" not in paths and len(paths) == 2 * 7


def test_adapting_twice_does_not_stack_wrappers() -> None:
    model = tiny_mlp()
    lorakit.adapt(model, lorakit.LoraConfig(r=2, target_modules=["up"]))
    with pytest.raises(ValueError, match="already exists"):
        lorakit.adapt(model, lorakit.LoraConfig(r=2, target_modules=["up"]))
    lorakit.adapt(model, lorakit.LoraConfig(r=3, target_modules=["up", "down"]), adapter_name="second")
    assert isinstance(model.up.base_layer, nn.Linear)
    assert set(model.up.adapters) == {"default", "second"} and model.up.active == ["second"]
    assert sum(isinstance(m, lorakit.AdaptedLinear) for m in model.modules()) == 2


def test_disable_adapters_gives_the_base_output(kind: str) -> None:
    model = BUILDERS[kind]()
    inputs = model_input(kind)
    reference = model_output(model, kind, inputs)
    lorakit.adapt(model, lorakit.LoraConfig(target_modules="all-linear"))
    randomize_adapters(model)
    adapted = model_output(model, kind, inputs)
    lorakit.merge(model)
    with lorakit.disable_adapters(model):
        torch.testing.assert_close(model_output(model, kind, inputs), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model_output(model, kind, inputs), adapted, rtol=1e-4, atol=1e-4)


def test_safe_merge_refuses_non_finite_weights() -> None:
    model = tiny_mlp()
    lorakit.adapt(model, lorakit.LoraConfig(r=2, target_modules=["up", "down"], init_lora_weights=False))
    w_up, w_down = model.up.weight.clone(), model.down.weight.clone()
    with torch.no_grad():
        model.down.adapters["default"].delta.lora_B[0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        lorakit.merge(model, safe_merge=True)
    torch.testing.assert_close(model.down.weight, w_down, rtol=0, atol=0)
    torch.testing.assert_close(model.up.weight, w_up, rtol=0, atol=1e-6)
    assert model.up.merged == [] and model.down.merged == []


def test_modules_to_save_trains_a_copy_and_unload_restores_the_original() -> None:
    model = tiny_mlp()
    head = model.head.weight.detach().clone()
    lorakit.adapt(model, lorakit.LoraConfig(r=2, target_modules=["up"], modules_to_save=["head"]))
    assert model.head.copies["default"].weight.requires_grad and not model.head.original_module.weight.requires_grad
    with torch.no_grad():
        model.head.copies["default"].weight.add_(1.0)
    x = torch.randn(2, 12)
    with lorakit.disable_adapters(model):
        torch.testing.assert_close(model.head(torch.ones(1, 7)), torch.ones(1, 7) @ head.T + model.head.original_module.bias)
    plain = lorakit.unload(copy.deepcopy(model))
    torch.testing.assert_close(plain.head.weight, head)
    merged = lorakit.merge_and_unload(model)
    torch.testing.assert_close(merged.head.weight, head + 1.0)
    assert merged(x).shape == (2, 3)


def test_use_dora_on_vera_is_not_a_field() -> None:
    with pytest.raises(TypeError):
        lorakit.VeraConfig(target_modules=["up"], use_dora=True)  # type: ignore[call-arg]

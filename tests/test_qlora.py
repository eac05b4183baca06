"""QLoRA: every method on an NF4 base against the float64 oracle of the dequantized weight; training, merging,
saving and loading a quantized model, and the memory arithmetic."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import lorakit
from conftest import BUILDERS, Holder, model_input, model_output, randomize_adapters, tiny_llama, train_lm
from oracle import FixedMask, check_layer

METHODS = {
    "lora": lambda: lorakit.LoraConfig(r=3, lora_alpha=6, target_modules=["proj"]),
    "dora": lambda: lorakit.LoraConfig(r=3, lora_alpha=6, target_modules=["proj"], use_dora=True),
    "dora-dropout": lambda: lorakit.LoraConfig(r=3, target_modules=["proj"], use_dora=True, lora_dropout=0.3),
    "vera": lambda: lorakit.VeraConfig(r=4, target_modules=["proj"]),
}


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("bias", [True, False])
def test_every_method_on_an_nf4_base_matches_the_oracle(method: str, bias: bool) -> None:
    torch.manual_seed(0)
    model = Holder(nn.Linear(128, 32, bias=bias))
    lorakit.quantize(model)
    assert isinstance(model.proj, lorakit.NF4Linear)
    lorakit.adapt(model, METHODS[method]())
    randomize_adapters(model, scale=0.3)
    layer = model.proj
    mask = None
    if "dropout" in method:
        mask = (torch.rand(6, 128, generator=torch.Generator().manual_seed(2)) > 0.3) / 0.7
        layer.adapters["default"].dropout = FixedMask(mask)
    model.train()
    check_layer(layer, torch.randn(6, 128), mask)  # the oracle uses layer.weight: the dequantized NF4 weight
    assert torch.equal(layer.weight, layer.base_layer.quantized_weight().dequantize())


def test_qlora_training_lowers_the_loss_and_only_adapters_learn() -> None:
    model = tiny_llama()
    lorakit.quantize(model)
    lorakit.adapt(model, lorakit.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    packed_before = {n: b.clone() for n, b in model.named_buffers() if n.endswith("packed")}
    optimizer = lorakit.create_loraplus_optimizer(model, torch.optim.AdamW, lr=3e-3)
    batch = model_input("llama", batch=4, seq=16)["input_ids"]
    model.train()
    losses = train_lm(model, optimizer, batch, steps=15)
    assert losses[-1] < losses[0] - 0.5
    for name, buffer in model.named_buffers():
        if name in packed_before:
            assert torch.equal(buffer, packed_before[name])


def test_merge_to_dense_matches_unmerged_and_never_requantizes(kind: str) -> None:
    model = BUILDERS[kind]()
    inputs = model_input(kind)
    lorakit.quantize(model, skip=("lm_head", "head"))
    lorakit.adapt(model, lorakit.LoraConfig(r=4, target_modules="all-linear", use_dora=True))
    randomize_adapters(model)
    with torch.no_grad():
        expected = model_output(model, kind, inputs)
    with pytest.raises(TypeError, match="merge_and_unload"):
        lorakit.merge(model)
    dense = lorakit.merge_and_unload(copy.deepcopy(model))
    assert not any(isinstance(m, (lorakit.NF4Linear, lorakit.AdaptedLinear)) for m in dense.modules())
    with torch.no_grad():
        torch.testing.assert_close(model_output(dense, kind, inputs), expected, rtol=1e-4, atol=1e-4)
    half = lorakit.merge_and_unload(copy.deepcopy(model), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    with torch.no_grad():
        got = model_output(half, kind, {k: v for k, v in inputs.items()} if kind != "mlp" else
                           {"x": inputs["x"].bfloat16()})
    assert ((got.float() - expected).norm() / expected.norm()).item() < 0.05


def test_gpt2_conv1d_comes_back_as_conv1d() -> None:
    from transformers.pytorch_utils import Conv1D

    model = BUILDERS["gpt2"]()
    lorakit.quantize(model)
    dense = lorakit.merge_and_unload(model)
    assert isinstance(dense.transformer.h[0].attn.c_attn, Conv1D)


def test_saved_quantized_model_loads_identically_on_a_meta_skeleton(tmp_path: Path) -> None:
    model = tiny_llama()
    lorakit.quantize(model, double_quant=True)
    inputs = model_input("llama")
    with torch.no_grad():
        expected = model_output(model, "llama", inputs)
    lorakit.save_quantized(model, tmp_path)
    with torch.device("meta"):
        skeleton = type(model)(model.config)
    loaded = lorakit.load_quantized(skeleton, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(model_output(loaded, "llama", inputs), expected, rtol=0, atol=0)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight or not model.config.tie_word_embeddings


def test_corrupted_quantized_model_is_a_clear_error(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    model = tiny_llama()
    lorakit.quantize(model)
    lorakit.save_quantized(model, tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.packed"
    state[key] = state[key][:-2]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="layer model.layers.0.self_attn.q_proj"):
        lorakit.load_quantized(tiny_llama(), tmp_path)
    with pytest.raises(FileNotFoundError, match="not a lorakit quantized model"):
        lorakit.load_quantized(tiny_llama(), tmp_path / "missing")


def test_memory_footprint_of_a_4096_square_layer() -> None:
    layer = Holder(nn.Linear(4096, 4096, bias=False))
    with_dq = lorakit.memory_footprint(lorakit.quantize(copy.deepcopy(layer), double_quant=True))
    without = lorakit.memory_footprint(lorakit.quantize(layer, double_quant=False))
    n = 4096 * 4096
    assert with_dq.total <= 8_656_000
    assert 8 * with_dq.total / n == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-3)
    assert 8 * without.total / n == pytest.approx(4.5, abs=1e-6)
    assert with_dq.nf4_codes == n // 2 and with_dq.dense_frozen == 0


def test_quantize_skips_the_head_and_counts_logical_parameters() -> None:
    model = tiny_llama()
    total = sum(p.numel() for p in model.parameters())
    lorakit.quantize(model)
    assert isinstance(model.lm_head, nn.Linear)
    assert isinstance(model.model.layers[0].mlp.down_proj, lorakit.NF4Linear)
    lorakit.adapt(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    count = lorakit.trainable_parameters(model)
    assert count.total == total + count.trainable

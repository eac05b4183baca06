"""DoRA against the float64 oracle; merge/unmerge; PEFT round trips."""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit
from conftest import Holder, outputs_across_merging, BUILDERS, model_input, model_output, randomize_adapters
from oracle import FixedMask, check_layer, oracle_forward


def _layer(kind: str, bias: bool) -> Holder:
    torch.manual_seed(0)
    layer = nn.Linear(10, 6, bias=bias) if kind == "linear" else Conv1D(6, 10)
    if kind == "conv1d":
        nn.init.normal_(layer.weight, std=0.3)
        nn.init.normal_(layer.bias)
    return Holder(layer)


@pytest.mark.parametrize(("layer_kind", "has_bias"), [("linear", True), ("linear", False), ("conv1d", True)])
@pytest.mark.parametrize("dropout", [0.0, 0.5])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_dora_matches_dense_oracle(layer_kind: str, has_bias: bool, dropout: float, use_rslora: bool) -> None:
    model = _layer(layer_kind, has_bias)
    lorakit.adapt(model, lorakit.LoraConfig(r=3, lora_alpha=6, target_modules=["proj"], use_dora=True,
                                            lora_dropout=dropout, use_rslora=use_rslora))
    randomize_adapters(model, scale=0.3)
    layer = model.proj
    adapter = layer.adapters["default"]
    mask = None
    if dropout:
        mask = (torch.rand(5, 10, generator=torch.Generator().manual_seed(7)) > dropout).float() / (1 - dropout)
        adapter.dropout = FixedMask(mask)
    model.train()
    check_layer(layer, torch.randn(5, 10), mask)
    assert {n for n, p in adapter.named_parameters() if p.grad is not None} == {
        "delta.lora_A", "delta.lora_B", "lora_magnitude_vector"}


def test_magnitude_starts_at_the_row_norm_and_adapter_is_identity(kind: str) -> None:
    model = BUILDERS[kind]()
    inputs = model_input(kind)
    reference = model_output(model, kind, inputs)
    lorakit.adapt(model, lorakit.LoraConfig(r=4, target_modules="all-linear", use_dora=True))
    torch.testing.assert_close(model_output(model, kind, inputs), reference, rtol=1e-5, atol=1e-5)
    for _, layer in lorakit.adapted_layers(model):
        m = layer.adapters["default"].lora_magnitude_vector
        torch.testing.assert_close(m.double(), layer.weight.detach().double().norm(dim=1), rtol=1e-5, atol=1e-6)


def test_dora_merge_unmerge_and_save_load(kind: str, tmp_path: Path) -> None:
    model = BUILDERS[kind]()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = model_input(kind)
    lorakit.adapt(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True))
    randomize_adapters(model, scale=0.2)
    outputs = outputs_across_merging(model, kind, inputs)
    lorakit.save_adapter(model, tmp_path)
    with torch.no_grad():
        outputs["loaded"] = model_output(lorakit.load_adapter(BUILDERS[kind](), tmp_path), kind, inputs)
    for other in outputs.values():
        torch.testing.assert_close(other, outputs["unmerged"], rtol=1e-4, atol=1e-4)
    restored = lorakit.unload(model).state_dict()
    for key, value in original.items():
        torch.testing.assert_close(restored[key], value, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_dora_round_trips_with_peft(kind: str, tmp_path: Path) -> None:
    options = dict(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True)
    ours = lorakit.adapt(BUILDERS[kind](), lorakit.LoraConfig(**options))
    randomize_adapters(ours, scale=0.2)
    inputs = model_input(kind)
    with torch.no_grad():
        expected = model_output(ours, kind, inputs)
        lorakit.save_adapter(ours, tmp_path / "ours")
        got = model_output(peft.PeftModel.from_pretrained(BUILDERS[kind](), tmp_path / "ours"), kind, inputs)
    assert (got - expected).abs().max().item() <= 1e-5

    theirs = peft.get_peft_model(BUILDERS[kind](), peft.LoraConfig(**options))
    randomize_adapters(theirs, scale=0.2)
    with torch.no_grad():
        expected = model_output(theirs, kind, inputs)
        theirs.save_pretrained(tmp_path / "theirs")
        got = model_output(lorakit.load_adapter(BUILDERS[kind](), tmp_path / "theirs"), kind, inputs)
    assert (got - expected).abs().max().item() <= 1e-5


def test_dora_norm_follows_the_adapter_after_an_optimizer_step() -> None:
    model = _layer("linear", True)
    lorakit.adapt(model, lorakit.LoraConfig(r=2, target_modules=["proj"], use_dora=True))
    randomize_adapters(model)
    x = torch.randn(3, 10)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(x).sum().backward()
    optimizer.step()
    expected, _ = oracle_forward(model.proj, x, model.proj.weight.detach())
    torch.testing.assert_close(model(x).double(), expected, rtol=1e-5, atol=1e-5)

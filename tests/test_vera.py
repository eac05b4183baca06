"""VeRA against the float64 oracle, PEFT's projections bit for bit, round trips, and the paper's arithmetic."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lorakit
from conftest import outputs_across_merging, BUILDERS, model_input, model_output, randomize_adapters, tiny_llama
from oracle import FixedMask, check_layer


class TwoShapes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.wide = nn.Linear(10, 6)
        self.tall = nn.Linear(6, 14, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tall(self.wide(x))


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_vera_matches_dense_oracle_on_layers_of_different_shapes(dropout: float) -> None:
    model = TwoShapes()
    lorakit.adapt(model, lorakit.VeraConfig(r=5, target_modules=["wide", "tall"], vera_dropout=dropout))
    projections = model.wide.adapters["default"].delta.projections
    assert projections is model.tall.adapters["default"].delta.projections
    assert projections.vera_A.shape == (5, 10) and projections.vera_B.shape == (14, 5)
    randomize_adapters(model, scale=0.5)
    model.train()
    for layer in (model.wide, model.tall):
        x = torch.randn(4, layer.in_features)
        mask = None
        if dropout:
            mask = (torch.rand(4, layer.in_features, generator=torch.Generator().manual_seed(1)) > dropout) / (1 - dropout)
            layer.adapters["default"].dropout = FixedMask(mask)
        check_layer(layer, x, mask)


def test_projections_equal_peft_bit_for_bit() -> None:
    ours = lorakit.adapt(tiny_llama(), lorakit.VeraConfig(r=16, target_modules="all-linear", projection_prng_key=7))
    theirs = peft.get_peft_model(tiny_llama(), peft.VeraConfig(r=16, target_modules="all-linear", projection_prng_key=7))
    projections = next(layer for _, layer in lorakit.adapted_layers(ours)).adapters["default"].delta.projections
    assert torch.equal(projections.vera_A, theirs.base_model.vera_A["default"])
    assert torch.equal(projections.vera_B, theirs.base_model.vera_B["default"])


def test_vera_starts_as_identity_and_projections_are_not_trainable(kind: str) -> None:
    model = BUILDERS[kind]()
    inputs = model_input(kind)
    reference = model_output(model, kind, inputs)
    lorakit.adapt(model, lorakit.VeraConfig(r=8, target_modules="all-linear", d_initial=0.1))
    torch.testing.assert_close(model_output(model, kind, inputs), reference, rtol=0, atol=0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("vera_lambda_b", "vera_lambda_d")) for n in trainable)
    assert not any("vera_A" in key for key in model.state_dict())


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("save_projection", [True, False])
def test_vera_round_trips_with_peft(kind: str, save_projection: bool, tmp_path: Path) -> None:
    options = dict(r=8, target_modules="all-linear", save_projection=save_projection, projection_prng_key=3)
    inputs = model_input(kind)
    ours = lorakit.adapt(BUILDERS[kind](), lorakit.VeraConfig(**options))
    randomize_adapters(ours, scale=0.5)
    with torch.no_grad():
        expected = model_output(ours, kind, inputs)
        lorakit.save_adapter(ours, tmp_path / "ours")
        got = model_output(peft.PeftModel.from_pretrained(BUILDERS[kind](), tmp_path / "ours"), kind, inputs)
        again = model_output(lorakit.load_adapter(BUILDERS[kind](), tmp_path / "ours"), kind, inputs)
    assert (got - expected).abs().max().item() <= 1e-5
    torch.testing.assert_close(again, expected)
    keys = set(load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    assert ("base_model.vera_A" in keys) == save_projection
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["save_projection"] == save_projection

    theirs = peft.get_peft_model(BUILDERS[kind](), peft.VeraConfig(**options))
    randomize_adapters(theirs, scale=0.5)
    with torch.no_grad():
        expected = model_output(theirs, kind, inputs)
        theirs.save_pretrained(tmp_path / "theirs")
        got = model_output(lorakit.load_adapter(BUILDERS[kind](), tmp_path / "theirs"), kind, inputs)
    assert (got - expected).abs().max().item() <= 1e-5


def test_vera_merge_unmerge(kind: str) -> None:
    model = BUILDERS[kind]()
    inputs = model_input(kind)
    lorakit.adapt(model, lorakit.VeraConfig(r=8, target_modules="all-linear"))
    randomize_adapters(model, scale=0.5)
    outputs = outputs_across_merging(model, kind, inputs)
    for other in outputs.values():
        torch.testing.assert_close(other, outputs["unmerged"], rtol=1e-4, atol=1e-4)


class Stack(nn.Module):
    """`n` square layers named q and v per block, built on the meta device (no memory) for counting."""

    def __init__(self, blocks: int, dim: int, names: tuple[str, ...]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({n: nn.Linear(dim, dim, bias=False) for n in names})
                                    for _ in range(blocks))


def _count(config: lorakit.LoraConfig | lorakit.VeraConfig, blocks: int, dim: int, names: tuple[str, ...]) -> int:
    with torch.device("meta"):
        model = Stack(blocks, dim, names)
    lorakit.adapt(model, config)
    return lorakit.trainable_parameters(model).trainable


def test_parameter_counts_match_the_vera_paper() -> None:
    # RoBERTa-base shape: 12 layers, q and v of 768, r = 1024: 24 x (768 + 1024) = 43,008
    assert _count(lorakit.VeraConfig(r=1024, target_modules=["q", "v"]), 12, 768, ("q", "v")) == 43_008
    # 80 layers of 4096 x 4096 at r = 64: VeRA 80 x (4096 + 64) vs LoRA 80 x 64 x 8192
    assert _count(lorakit.VeraConfig(r=64, target_modules=["q"]), 80, 4096, ("q",)) == 332_800
    assert _count(lorakit.LoraConfig(r=64, target_modules=["q"]), 80, 4096, ("q",)) == 41_943_040


def test_saved_projections_are_used_when_present(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    model = lorakit.adapt(tiny_llama(), lorakit.VeraConfig(r=8, target_modules=["q_proj"]))
    lorakit.save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors["base_model.vera_A"] = torch.randn_like(tensors["base_model.vera_A"])
    save_file(tensors, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
    loaded = lorakit.load_adapter(tiny_llama(), tmp_path)
    projections = loaded.model.layers[0].self_attn.q_proj.adapters["default"].delta.projections
    assert torch.equal(projections.vera_A, tensors["base_model.vera_A"])

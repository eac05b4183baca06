"""LoRA+ parameter groups equal PEFT's create_loraplus_optimizer on the same model."""

from __future__ import annotations

import re

import peft
import pytest
import torch
from peft.optimizers import create_loraplus_optimizer as peft_loraplus

import lorakit
from conftest import BUILDERS


def _canonical(name: str) -> str:
    """One spelling for a parameter in both libraries: <module path>.<lora_A|lora_B|lora_magnitude_vector|param>."""
    name = name.removeprefix("base_model.model.")
    name = re.sub(r"\.adapters\.default\.delta\.(lora_[AB])$", r".\1", name)
    name = re.sub(r"\.adapters\.default\.(lora_magnitude_vector)$", r".\1", name)
    name = re.sub(r"\.(lora_[AB])\.default\.weight$", r".\1", name)
    name = re.sub(r"\.lora_magnitude_vector\.default\.weight$", ".lora_magnitude_vector", name)
    return name


def _settings(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> dict[str, tuple[float, float]]:
    return {
        _canonical(names[id(p)]): (group["lr"], group["weight_decay"])
        for group in optimizer.param_groups for p in group["params"]
    }


@pytest.mark.parametrize(("kind", "options"), [
    ("llama", dict(r=4, target_modules="all-linear")),
    ("gpt2", dict(r=2, target_modules=["c_attn", "c_proj"], bias="all")),
    ("mlp", dict(r=2, target_modules=["up"], bias="lora_only")),
])
def test_loraplus_groups_match_peft(kind: str, options: dict) -> None:
    ours = lorakit.adapt(BUILDERS[kind](), lorakit.LoraConfig(**options))
    theirs = peft.get_peft_model(BUILDERS[kind](), peft.LoraConfig(**options))
    kwargs = dict(lr=1e-3, loraplus_lr_ratio=8.0, loraplus_weight_decay=0.01)
    ours_opt = lorakit.create_loraplus_optimizer(ours, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=8.0,
                                                 weight_decay=0.01)
    theirs_opt = peft_loraplus(theirs, torch.optim.AdamW, **kwargs)
    ours_settings = _settings(ours_opt, {id(p): n for n, p in ours.named_parameters()})
    theirs_settings = _settings(theirs_opt, {id(p): n for n, p in theirs.named_parameters()})
    assert ours_settings == theirs_settings
    lrs = {lr for lr, _ in ours_settings.values()}
    assert lrs == {1e-3, 8e-3}


def test_param_groups_split_a_and_b() -> None:
    model = lorakit.adapt(BUILDERS["mlp"](), lorakit.LoraConfig(r=2, target_modules=["up", "down"]))
    groups = lorakit.loraplus_param_groups(model, lr=1e-4)
    slow, fast = groups
    assert slow["lr"] == 1e-4 and fast["lr"] == 16 * 1e-4
    assert {p.shape for p in slow["params"]} == {torch.Size([2, 12]), torch.Size([2, 20])}
    assert {p.shape for p in fast["params"]} == {torch.Size([20, 2]), torch.Size([7, 2])}

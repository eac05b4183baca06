"""Round trips with PEFT itself, both ways, and clear errors for bad adapter files."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from conftest import BUILDERS, model_input, model_output, randomize_adapters, tiny_llama, tiny_mlp

CASES = {
    "llama-qv": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    "llama-all-rslora": ("llama", dict(r=4, lora_alpha=16, target_modules="all-linear", use_rslora=True)),
    "llama-patterns": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                     rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 3})),
    "gpt2-all-bias": ("gpt2", dict(r=3, lora_alpha=6, target_modules="all-linear", bias="all")),
    "gpt2-lora-only": ("gpt2", dict(r=3, lora_alpha=6, target_modules=["c_attn", "c_fc"], bias="lora_only")),
    "mlp-head": ("mlp", dict(r=2, lora_alpha=4, target_modules=["up", "down"], modules_to_save=["head"])),
}


def _perturb_biases_and_heads(model: torch.nn.Module) -> None:
    randomize_adapters(model, scale=0.1)


@pytest.mark.parametrize("case", sorted(CASES))
def test_lorakit_to_peft(case: str, tmp_path: Path) -> None:
    kind, options = CASES[case]
    model = BUILDERS[kind]()
    lorakit.adapt(model, lorakit.LoraConfig(**options))
    _perturb_biases_and_heads(model)
    inputs = model_input(kind)
    with torch.no_grad():
        expected = model_output(model, kind, inputs)
    lorakit.save_adapter(model, tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert all(key.startswith("base_model.model.") for key in saved)
    peft_model = peft.PeftModel.from_pretrained(BUILDERS[kind](), tmp_path)
    with torch.no_grad():
        got = model_output(peft_model, kind, inputs)
    assert (got - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_to_lorakit(case: str, tmp_path: Path) -> None:
    kind, options = CASES[case]
    peft_model = peft.get_peft_model(BUILDERS[kind](), peft.LoraConfig(**options))
    _perturb_biases_and_heads(peft_model)
    inputs = model_input(kind)
    with torch.no_grad():
        expected = model_output(peft_model, kind, inputs)
    peft_model.save_pretrained(tmp_path)
    model = lorakit.load_adapter(BUILDERS[kind](), tmp_path)
    with torch.no_grad():
        got = model_output(model, kind, inputs)
    assert (got - expected).abs().max().item() <= 1e-5


def test_lorakit_round_trip_and_config_file(tmp_path: Path) -> None:
    model = tiny_llama()
    lorakit.adapt(model, lorakit.LoraConfig(r=4, target_modules="all-linear"))
    randomize_adapters(model)
    lorakit.save_adapter(model, tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "LORA" and data["task_type"] == "CAUSAL_LM"
    assert sorted(data["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    inputs = model_input("llama")
    loaded = lorakit.load_adapter(tiny_llama(), tmp_path)
    torch.testing.assert_close(model_output(loaded, "llama", inputs), model_output(model, "llama", inputs))
    assert lorakit.adapter_configs(loaded)["default"] == lorakit.adapter_configs(model)["default"].replace(
        target_modules=tuple(data["target_modules"]), task_type="CAUSAL_LM")


def test_gpt2_config_records_fan_in_fan_out(tmp_path: Path) -> None:
    model = BUILDERS["gpt2"]()
    lorakit.adapt(model, lorakit.LoraConfig(r=2, target_modules=["c_attn"]))
    lorakit.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    assert load_file(tmp_path / "adapter_model.safetensors")[
        "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (2, 48)


def _saved(tmp_path: Path) -> Path:
    model = tiny_mlp()
    lorakit.adapt(model, lorakit.LoraConfig(r=2, target_modules=["up", "down"]))
    return lorakit.save_adapter(model, tmp_path)


def _rewrite(path: Path, change: "callable") -> None:
    tensors = load_file(path / "adapter_model.safetensors")
    change(tensors)
    save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})


def test_shape_mismatch_names_the_tensor(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    key = "base_model.model.up.lora_A.weight"
    _rewrite(path, lambda t: t.__setitem__(key, torch.zeros(2, 13)))
    model = tiny_mlp()
    with pytest.raises(ValueError, match=rf"{key} has shape \(2, 13\) but the model needs \(2, 12\)"):
        lorakit.load_adapter(model, path)
    assert not list(lorakit.adapted_layers(model)) and not lorakit.adapter_configs(model)


def test_missing_and_unexpected_tensors_are_named(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    _rewrite(path, lambda t: t.pop("base_model.model.down.lora_B.weight"))
    with pytest.raises(ValueError, match=r"missing tensor base_model.model.down.lora_B.weight"):
        lorakit.load_adapter(tiny_mlp(), path)
    path = _saved(tmp_path)
    _rewrite(path, lambda t: t.__setitem__("base_model.model.head.lora_A.weight", torch.zeros(2, 7)))
    with pytest.raises(ValueError, match=r"unexpected tensor base_model.model.head.lora_A.weight"):
        lorakit.load_adapter(tiny_mlp(), path)


def test_wrong_peft_type_and_unknown_keys(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    config_file = path / "adapter_config.json"
    data = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**data, "peft_type": "PREFIX_TUNING"}))
    with pytest.raises(ValueError, match="peft_type 'PREFIX_TUNING' is not supported"):
        lorakit.load_adapter(tiny_mlp(), path)
    config_file.write_text(json.dumps({**data, "some_future_option": 3, "layers_to_transform": None}))
    with pytest.warns(UserWarning, match="some_future_option=3 is not supported"):
        lorakit.load_adapter(tiny_mlp(), path)


def test_corrupted_files_give_clear_errors(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    weights = path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(ValueError, match="corrupted or not a safetensors file"):
        lorakit.load_adapter(tiny_mlp(), path)
    (path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="invalid JSON"):
        lorakit.load_adapter(tiny_mlp(), path)
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter directory"):
        lorakit.load_adapter(tiny_mlp(), tmp_path / "nowhere")


def test_pickle_files_are_never_loaded(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    (path / "adapter_model.safetensors").unlink()
    (path / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match="pickle files, which lorakit never loads"):
        lorakit.load_adapter(tiny_mlp(), path)


def test_non_finite_tensor_is_refused(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    _rewrite(path, lambda t: t["base_model.model.up.lora_B.weight"].fill_(float("nan")))
    with pytest.raises(ValueError, match="up.lora_B.weight holds non-finite values"):
        lorakit.load_adapter(tiny_mlp(), path)

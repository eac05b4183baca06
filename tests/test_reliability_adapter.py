"""Hostile adapter configs and files: each is refused with one clear line, and the model is left exactly as it was."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import randomize_adapters, tiny_llama
from fuzzing import assert_clean_error, assert_refused, bounded, run_cli
from safetensors.torch import load_file, save_file
from torch import nn

import lorakit
from lorakit.adapters.registry import adapted_layers
from lorakit.formats.peft import CONFIG_NAME, WEIGHTS_NAME

TARGETS = ["q_proj", "v_proj"]
IDS = torch.tensor([[5, 9, 17, 33, 64, 100]])


def model_state(model: nn.Module) -> dict[str, Any]:
    """What "exactly as it was" compares: weights, module types, requires_grad flags, active adapters, configs."""
    return {
        "tensors": {key: value.detach().clone() for key, value in model.state_dict().items()},
        "modules": {name: type(module).__name__ for name, module in model.named_modules()},
        "requires_grad": {name: param.requires_grad for name, param in model.named_parameters()},
        "active": {name: list(layer.active) for name, layer in adapted_layers(model)},
        "adapters": sorted(lorakit.adapter_configs(model)),
    }


def assert_same_state(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert after["modules"] == before["modules"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["active"] == before["active"]
    assert after["adapters"] == before["adapters"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for key, value in before["tensors"].items():
        assert torch.equal(after["tensors"][key], value), key


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def saved_adapter(directory: Path, seed: int = 3, **options: Any) -> Path:
    model = lorakit.adapt(tiny_llama(), lorakit.LoraConfig(target_modules=TARGETS, r=4, **options))
    randomize_adapters(model, seed=seed)
    return lorakit.save_adapter(model, directory)


def edit_config(directory: Path, **changes: Any) -> Path:
    file = directory / CONFIG_NAME
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))
    return directory


def edit_tensors(directory: Path, change: Any) -> Path:
    file = directory / WEIGHTS_NAME
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file, metadata={"format": "pt"})
    return directory


def refused_load(model: nn.Module, directory: Path, name: str = "default") -> str:
    """load_adapter refuses cleanly and changes nothing; returns the message."""
    before = model_state(model)
    with pytest.raises(lorakit.cli.ERRORS) as info:
        lorakit.load_adapter(model, directory, name)
    assert_same_state(before, model_state(model))
    return assert_clean_error(info.value)


def one_tensor_dropped(tensors: dict[str, torch.Tensor]) -> None:
    del tensors[max(tensors)]


# -- nothing lost -------------------------------------------------------------------------------------------------

def test_failed_second_load_keeps_the_active_adapter(tmp_path: Path) -> None:
    model = lorakit.load_adapter(tiny_llama(), saved_adapter(tmp_path / "good"), "first")
    expected = logits(model)
    trainable = [name for name, param in model.named_parameters() if param.requires_grad]
    broken = edit_tensors(saved_adapter(tmp_path / "broken", seed=4), one_tensor_dropped)
    assert "missing tensor" in refused_load(model, broken, "second")
    assert all(layer.active == ["first"] for _, layer in adapted_layers(model))
    assert torch.equal(logits(model), expected)
    assert [name for name, param in model.named_parameters() if param.requires_grad] == trainable
    lorakit.load_adapter(model, saved_adapter(tmp_path / "second"), "second")  # the name is free again


def test_failed_load_into_a_plain_model_keeps_requires_grad(tmp_path: Path) -> None:
    model = tiny_llama()
    model.requires_grad_(True)
    refused_load(model, edit_tensors(saved_adapter(tmp_path / "broken"), one_tensor_dropped))
    assert all(param.requires_grad for param in model.parameters())
    assert not list(adapted_layers(model))


def test_config_error_found_after_wrapping_leaves_no_half_adapter(tmp_path: Path) -> None:
    good = saved_adapter(tmp_path / "good")
    model = tiny_llama()
    before = model_state(model)
    config = lorakit.LoraConfig(target_modules=TARGETS, r=4, modules_to_save=["nonexistent"])
    with pytest.raises(ValueError, match="nonexistent"):
        lorakit.adapt(model, config)
    assert_same_state(before, model_state(model))
    broken = edit_config(saved_adapter(tmp_path / "broken"), modules_to_save=["nonexistent"])
    assert "nonexistent" in refused_load(model, broken)
    lorakit.load_adapter(model, good)  # no "adapter 'default' already exists in this layer"


def test_failure_while_filling_restores_a_base_rewritten_by_its_initialisation(tmp_path: Path) -> None:
    directory = saved_adapter(tmp_path / "pissa", init_lora_weights="pissa")
    edit_config(directory, init_lora_weights="pissa")  # the residual form: loading recomputes W_res in place
    edit_tensors(directory, lambda tensors: tensors.update({key: value * float("nan") for key, value in
                                                            tensors.items() if key.endswith("v_proj.lora_B.weight")}))
    assert "non-finite" in refused_load(tiny_llama(), directory)


# -- crashes where a clear error is due -----------------------------------------------------------------------

def test_deeply_nested_config_json_is_refused(tmp_path: Path) -> None:
    directory = saved_adapter(tmp_path / "a")
    (directory / CONFIG_NAME).write_text('{"peft_type": "LORA", "x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    assert "nested deeper than" in refused_load(tiny_llama(), directory)


@pytest.mark.parametrize("change, names", [
    ({"alpha_pattern": "x"}, "alpha_pattern"),
    ({"rank_pattern": {"q_proj": 0}}, "rank_pattern"),
    ({"peft_type": ["LORA"]}, "peft_type"),
    ({"target_modules": "("}, "target_modules"),
    ({"r": float("inf")}, "r must be"),
    ({"lora_alpha": float("inf")}, "lora_alpha"),
    ({"use_rslora": "false"}, "use_rslora"),
    ({"lora_dropout": float("nan")}, "lora_dropout"),
    ({"init_lora_weights": 1}, "init_lora_weights"),
])
def test_bad_config_values_are_refused_naming_the_key(tmp_path: Path, change: dict[str, Any], names: str) -> None:
    directory = edit_config(saved_adapter(tmp_path / "a"), **change)  # json.dumps writes inf as Infinity
    message = refused_load(tiny_llama(), directory)
    assert names in message and CONFIG_NAME in message


def test_vera_seed_minus_infinity_is_refused(tmp_path: Path) -> None:
    model = lorakit.adapt(tiny_llama(), lorakit.VeraConfig(target_modules=TARGETS, r=4, save_projection=False))
    directory = edit_config(lorakit.save_adapter(model, tmp_path / "v"), projection_prng_key=float("-inf"))
    assert "projection_prng_key" in refused_load(tiny_llama(), directory)


@pytest.mark.parametrize("pattern, reason", [
    ("q_proj|" * 1_500_000, "characters"),  # 10 MB
    ("(a+)+b", "repetition"),
    ("(.*)*x", "repetition"),
    (".*.*.*.*x", "variable-length"),
    (r"(a)\1", "back-references"),
])
def test_target_regexes_that_could_hang_are_refused_at_once(pattern: str, reason: str) -> None:
    start = time.perf_counter()
    with pytest.raises(ValueError, match=reason) as info:
        lorakit.LoraConfig(target_modules=pattern)
    assert_clean_error(info.value)
    assert time.perf_counter() - start < 1.0


def test_config_rank_is_checked_against_the_file_before_anything_is_allocated(tmp_path: Path) -> None:
    for r in (1_000_000, 10**12):
        directory = edit_config(saved_adapter(tmp_path / str(r)), r=r)
        with bounded(seconds=20, memory_mib=64):
            message = refused_load(tiny_llama(), directory)
        in_file = f"rank {r}" in message and "lora_A.weight" in message
        assert in_file or f"r must be an integer in [1, {2**31 - 1}]" in message


def test_adapt_refuses_a_rank_whose_weights_cannot_fit() -> None:
    model = tiny_llama()
    before = model_state(model)
    with bounded(seconds=20, memory_mib=64), pytest.raises(ValueError, match="GiB are available") as info:
        lorakit.adapt(model, lorakit.LoraConfig(target_modules=TARGETS, r=2**31 - 1))
    assert_clean_error(info.value)
    assert_same_state(before, model_state(model))


# -- silent acceptance ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.uint8])
def test_integer_tensors_in_the_adapter_file_are_refused(tmp_path: Path, dtype: torch.dtype) -> None:
    directory = edit_tensors(saved_adapter(tmp_path / "a"),
                             lambda tensors: tensors.update({key: value.to(dtype) for key, value in tensors.items()}))
    message = refused_load(tiny_llama(), directory)
    assert "dtype" in message and "lora_" in message and WEIGHTS_NAME in message


def test_non_finite_values_in_the_adapter_file_are_refused_naming_the_tensor(tmp_path: Path) -> None:
    def poison(tensors: dict[str, torch.Tensor]) -> None:
        key = min(tensors)
        tensors[key] = tensors[key].clone()
        tensors[key][0, 0] = float("inf")
    message = refused_load(tiny_llama(), edit_tensors(saved_adapter(tmp_path / "a"), poison))
    assert "non-finite" in message and "q_proj" in message


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_damaged_safetensors_files_are_one_line_errors_naming_the_file(tmp_path: Path, damage: str) -> None:
    directory = saved_adapter(tmp_path / "a")
    file = directory / WEIGHTS_NAME
    data = bytearray(file.read_bytes())
    if damage == "truncate":
        data = data[: len(data) - 10]
    else:
        data[10:20] = b"\xff" * 10
    file.write_bytes(bytes(data))
    assert str(file) in refused_load(tiny_llama(), directory)


def test_a_typo_in_a_target_list_is_refused_with_the_close_match() -> None:
    model = tiny_llama()
    before = model_state(model)
    with pytest.raises(ValueError, match=r"qproj_typo.*Close matches: \[.*'q_proj'"):
        lorakit.adapt(model, lorakit.LoraConfig(target_modules=["q_proj", "qproj_typo"]))
    assert_same_state(before, model_state(model))


@pytest.fixture
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path_factory.getbasetemp() / "lorakit-cache"))


CLI_TRAIN = ["train", "--model", "tiny-llama", "--batch-size", "4", "--builtin-train-size", "16", "--eval-samples", "0",
             "--max-steps", "1"]


@pytest.mark.usefixtures("_cache")
@pytest.mark.parametrize("targets, says", [("(", "target_modules regex '('"), ("q_proj,qproj_typo", "q_proj")])
def test_cli_refuses_bad_targets(tmp_path: Path, targets: str, says: str) -> None:
    out = tmp_path / "run"
    message = assert_refused(run_cli([*CLI_TRAIN, "--targets", targets, "--output-dir", str(out)]))
    assert says in message
    assert not (out / "adapter" / WEIGHTS_NAME).exists()



def test_a_refused_load_reports_nothing_but_its_error(tmp_path: Path) -> None:
    """Options lorakit ignores are reported only when the load succeeds (a refusal stays one line in the CLI)."""
    directory = edit_tensors(edit_config(saved_adapter(tmp_path / "a"), some_future_option=3), one_tensor_dropped)
    with warnings.catch_warnings(record=True) as notes:
        warnings.simplefilter("always")
        refused_load(tiny_llama(), directory)
    assert not notes


@pytest.mark.parametrize("alpha", [0, -4, 1e-44])
def test_pissa_refuses_a_scaling_that_makes_its_factors_non_finite(alpha: float) -> None:
    model = tiny_llama()
    before = model_state(model)
    with pytest.raises(ValueError, match="non-finite factors"):
        lorakit.adapt(model, lorakit.LoraConfig(target_modules=TARGETS, r=4, lora_alpha=alpha, init_lora_weights="pissa"))
    assert_same_state(before, model_state(model))


def test_adapt_refuses_a_rank_on_expert_parameters_whose_weights_cannot_fit() -> None:
    from test_moe import tiny_mixtral

    model = tiny_mixtral()
    before = model_state(model)
    config = lorakit.LoraConfig(target_parameters=["mlp.experts.down_proj"], r=2**30)
    with bounded(seconds=20, memory_mib=64), pytest.raises(ValueError, match="GiB are available"):
        lorakit.adapt(model, config)
    assert_same_state(before, model_state(model))

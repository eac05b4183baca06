"""Model resolution and loading: built-in names, local directories, errors, and the atomic cache."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lorakit import models
from lorakit.models import (
    BUILTIN_MODELS,
    RECIPE_FILE,
    build_atomically,
    byte_tokenizer,
    ensure_builtin,
    load_model,
    resolve_model,
)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_builtin_names_include_the_default_and_tiny_models() -> None:
    assert {"smollm2-135m", "tiny-llama", "tiny-gpt2"} <= set(BUILTIN_MODELS)
    assert models.DEFAULT_MODEL == "smollm2-135m"


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_resolve_builtin_builds_once_into_the_cache(cache: Path, name: str) -> None:
    path = resolve_model(name)
    assert path == cache / "models" / name
    assert (path / "config.json").is_file() and (path / "tokenizer.json").is_file()
    assert json.loads((path / RECIPE_FILE).read_text()) == {"name": name, "version": BUILTIN_MODELS[name].version}
    stamp = (path / "config.json").stat().st_mtime_ns
    assert resolve_model(name) == path
    assert (path / "config.json").stat().st_mtime_ns == stamp


def test_resolve_local_dir_and_hub_id(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    assert resolve_model(model_dir) == model_dir
    assert resolve_model(str(model_dir)) == model_dir
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_unknown_name_lists_the_builtins() -> None:
    with pytest.raises(ValueError, match="unknown model 'smollm2'") as error:
        resolve_model("smollm2")
    message = str(error.value)
    assert all(name in message for name in BUILTIN_MODELS)
    assert "Did you mean 'smollm2-135m'?" in message


def test_path_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        resolve_model(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        resolve_model("./missing")
    with pytest.raises(ValueError, match=r"no config\.json"):
        resolve_model(tmp_path)
    (tmp_path / "weights.bin").write_text("")
    with pytest.raises(ValueError, match="got a file"):
        resolve_model(tmp_path / "weights.bin")


def test_load_local_dir_sets_pad_token_and_right_padding(tmp_path: Path) -> None:
    tokenizer = byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    original = LlamaForCausalLM(config).eval()
    original.save_pretrained(tmp_path)
    tokenizer.padding_side = "left"
    tokenizer.save_pretrained(tmp_path)

    model, loaded = load_model(tmp_path, dtype="float32")
    assert loaded.pad_token == loaded.eos_token == "<|im_end|>"
    assert loaded.padding_side == "right"
    assert model.generation_config.pad_token_id == loaded.pad_token_id
    ids = torch.tensor([loaded("hello")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits)


def test_load_tiny_gpt2_has_conv1d_layers(cache: Path) -> None:
    model, tokenizer = load_model("tiny-gpt2", dtype=torch.float64)
    assert type(model.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    assert model.dtype == torch.float64
    assert model(torch.tensor([tokenizer("hi")["input_ids"]])).logits.shape == (1, 2, len(tokenizer))


def test_tiny_models_are_the_same_everywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = []
    for folder in ("a", "b"):
        monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / folder))
        weights.append(load_model("tiny-llama")[0].state_dict())
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])


def test_byte_tokenizer_round_trips_text_and_specials() -> None:
    tokenizer = byte_tokenizer()
    text = "héllo wörld\n\t<|im_end|>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[:2] == [ord("h"), 0xC3]  # token id = byte value
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids) == text
    assert tokenizer.chat_template


def test_failed_build_leaves_no_cache(tmp_path: Path) -> None:
    target = tmp_path / "models" / "broken"

    def build(out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("killed halfway")

    with pytest.raises(RuntimeError, match="killed halfway"):
        build_atomically(target, build, {"version": 1})
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_orphaned_temp_dirs_are_cleaned_and_live_ones_kept(cache: Path) -> None:
    parent = cache / "models"
    orphan = parent / ".tiny-llama.tmp-999999999-abc"  # no such process
    live = parent / f".tiny-llama.tmp-{os.getppid()}-def"
    for folder in (orphan, live):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("half written")
    path = ensure_builtin("tiny-llama")
    assert (path / "model.safetensors").is_file()
    assert not orphan.exists() and live.exists()
    assert sorted(p.name for p in parent.iterdir()) == [live.name, "tiny-llama"]


def test_stale_cache_is_rebuilt(cache: Path) -> None:
    target = cache / "models" / "tiny-llama"
    target.mkdir(parents=True)
    (target / RECIPE_FILE).write_text(json.dumps({"name": "tiny-llama", "version": 0}))
    assert (ensure_builtin("tiny-llama") / "model.safetensors").is_file()


def test_concurrent_finisher_wins(tmp_path: Path) -> None:
    target = tmp_path / "models" / "m"

    def build(out: Path) -> None:
        build_atomically(target, lambda other: (other / "who").write_text("first"), {"version": 1})
        (out / "who").write_text("second")

    build_atomically(target, build, {"version": 1})
    assert (target / "who").read_text() == "first"
    assert [p.name for p in target.parent.iterdir()] == ["m"]


@pytest.fixture
def throwaway_cache(cache: Path) -> Iterator[Path]:
    """A cache removed after the test (a converted SmolLM2 takes 540 MB)."""
    yield cache
    shutil.rmtree(cache, ignore_errors=True)


@pytest.mark.slow
def test_smollm2_conversion_generates_sensibly(throwaway_cache: Path) -> None:
    cache = throwaway_cache
    model, tokenizer = load_model("smollm2-135m")
    path = cache / "models" / "smollm2-135m"
    assert {"model.safetensors", "tokenizer.json", "generation_config.json"} <= {p.name for p in path.iterdir()}
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert not hasattr(model.config, "quantization_config")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id == 2
    assert "<|im_start|>assistant" in (tokenizer.chat_template or "")
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    reply = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in reply

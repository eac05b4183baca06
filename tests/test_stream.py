"""The streaming loader (lorakit.models.stream, formats.checkpoint) against the eager path it replaces:
`from_pretrained(dtype)` then `quantize()`, compared bit for bit (packed codes, scales, dense tensors, logits)."""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import lorakit
from lorakit.formats.checkpoint import Checkpoint
from lorakit.models import byte_tokenizer
from lorakit.models.load import avoid_slow_half_matmuls, resolve_dtype
from lorakit.quant.nf4 import NF4Linear
from conftest import tiny_gpt2, tiny_llama


def _tied_llama() -> LlamaForCausalLM:
    torch.manual_seed(5)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                        max_position_embeddings=64, tie_word_embeddings=True)).eval()


def _qwen2() -> Qwen2ForCausalLM:  # q/k/v carry biases: a quantized layer's bias arrives as its own tensor
    torch.manual_seed(6)
    return Qwen2ForCausalLM(Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                        max_position_embeddings=64)).eval()


MODELS = {"llama": tiny_llama, "llama-tied": _tied_llama, "gpt2": tiny_gpt2, "qwen2": _qwen2}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _write(kind: str, directory: Path, stored: str = "float32", sharded: bool = True) -> Path:
    model = MODELS[kind]().to(DTYPES[stored])
    model.save_pretrained(directory, max_shard_size="40KB" if sharded else "1GB")
    byte_tokenizer().save_pretrained(directory)
    assert (directory / "model.safetensors.index.json").is_file() == sharded
    return directory


def _eager(directory: Path, dtype: torch.dtype, quantize: bool, skip: tuple[str, ...] = ("lm_head",)):
    """from_pretrained + quantize, and the loader's documented last step (dense half-precision layers on a CPU
    without bfloat16 units become FrozenLinear, whose products run in float32)."""
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()
    if quantize:
        lorakit.quantize(model, skip=skip)
    avoid_slow_half_matmuls(model)
    return model


def _assert_identical(eager: torch.nn.Module, streamed: torch.nn.Module) -> None:
    expected, got = eager.state_dict(), streamed.state_dict()
    assert sorted(expected) == sorted(got)
    for key, tensor in expected.items():
        assert got[key].dtype == tensor.dtype, key
        assert torch.equal(got[key], tensor), key
    assert {n: type(m).__name__ for n, m in eager.named_modules()} == \
        {n: type(m).__name__ for n, m in streamed.named_modules()}
    ids = torch.randint(3, 128, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(eager(ids).logits, streamed(ids).logits)


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("stored", sorted(DTYPES))
@pytest.mark.parametrize("sharded", [True, False], ids=["sharded", "single"])
def test_streamed_nf4_is_eager_load_then_quantize_bit_for_bit(tmp_path: Path, kind: str, stored: str,
                                                              sharded: bool) -> None:
    directory = _write(kind, tmp_path / "ckpt", stored, sharded)
    for dtype in ("float32", "bfloat16") if stored == "bfloat16" else ("float32",):
        streamed, _ = lorakit.load_model(directory, dtype=dtype, quantize="nf4", progress=False)
        assert any(isinstance(m, NF4Linear) for m in streamed.modules())
        _assert_identical(_eager(directory, DTYPES[dtype], quantize=True), streamed)


def test_tied_output_head_quantized_with_its_embedding_kept_dense(tmp_path: Path) -> None:
    directory = _write("llama-tied", tmp_path / "ckpt")
    streamed, _ = lorakit.load_model(directory, dtype="float32", quantize="nf4", skip=(), progress=False)
    assert isinstance(streamed.lm_head, NF4Linear) and not isinstance(streamed.model.embed_tokens, NF4Linear)
    _assert_identical(_eager(directory, torch.float32, quantize=True, skip=()), streamed)


def test_skip_keeps_the_named_layers_dense(tmp_path: Path) -> None:
    directory = _write("llama", tmp_path / "ckpt")
    skip = ("lm_head", "down_proj")
    streamed, _ = lorakit.load_model(directory, dtype="float32", quantize="nf4", skip=skip, progress=False)
    assert isinstance(streamed.model.layers[0].mlp.down_proj, torch.nn.Linear)
    _assert_identical(_eager(directory, torch.float32, quantize=True, skip=skip), streamed)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dense_streaming_is_from_pretrained(tmp_path: Path, dtype: str) -> None:
    directory = _write("qwen2", tmp_path / "ckpt", "bfloat16")
    streamed, _ = lorakit.load_model(directory, dtype=dtype, progress=False)
    _assert_identical(_eager(directory, DTYPES[dtype], quantize=False), streamed)
    assert all(p.requires_grad for p in streamed.parameters())  # as from_pretrained: adapt() freezes


@pytest.mark.parametrize("kind", ["llama", "gpt2", "llama-tied"])
def test_quantized_directory_loads_as_saved(tmp_path: Path, kind: str) -> None:
    source = _write(kind, tmp_path / "ckpt")
    eager = _eager(source, torch.float32, quantize=True)
    lorakit.save_quantized(eager, tmp_path / "nf4")
    byte_tokenizer().save_pretrained(tmp_path / "nf4")
    loaded, _ = lorakit.load_model(tmp_path / "nf4", progress=False)
    _assert_identical(eager.requires_grad_(False), loaded)
    as_bf16, _ = lorakit.load_model(tmp_path / "nf4", dtype="bfloat16", progress=False)
    nf4 = [m for m in as_bf16.modules() if isinstance(m, NF4Linear)]
    assert nf4 and all(m.compute_dtype == torch.bfloat16 for m in nf4)
    assert as_bf16.get_output_embeddings().weight.dtype == torch.bfloat16


def test_a_quantized_weight_is_dropped_before_the_next_tensor_is_read(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The loader holds the finished model plus one tensor in flight: no dense linear weight outlives its turn."""
    directory = _write("llama", tmp_path / "ckpt", "bfloat16")
    read = Checkpoint.read
    weights: list[tuple[str, weakref.ref]] = []
    alive_at_read: list[list[str]] = []

    def tracking_read(self: Checkpoint, name: str) -> torch.Tensor:
        gc.collect()
        alive_at_read.append([n for n, ref in weights if ref() is not None])
        tensor = read(self, name)
        if name.endswith("_proj.weight"):
            weights.append((name, weakref.ref(tensor)))
        return tensor

    monkeypatch.setattr(Checkpoint, "read", tracking_read)
    lorakit.load_model(directory, dtype="float32", quantize="nf4", progress=False)
    assert len(weights) == 14 and all(alive == [] for alive in alive_at_read)


# -- bad checkpoints: one clear error naming the file and the tensor ----------------------------------------------


def _first_shard(directory: Path) -> Path:
    return directory / sorted(set(json.loads((directory / "model.safetensors.index.json").read_text())
                                  ["weight_map"].values()))[0]


def test_truncated_shard(tmp_path: Path) -> None:
    directory = _write("llama", tmp_path / "ckpt")
    shard = _first_shard(directory)
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match=f"{shard.name}: corrupted, truncated or not a safetensors file"):
        lorakit.load_model(directory, quantize="nf4", progress=False)


def test_a_directory_without_a_usable_tokenizer_fails_before_any_weight_is_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = _write("llama", tmp_path / "ckpt")
    (directory / "tokenizer.json").unlink()
    (directory / "tokenizer_config.json").unlink()

    def no_reading(*args: object, **kwargs: object) -> None:
        raise AssertionError("the weights were read before the tokenizer was checked")

    monkeypatch.setattr("lorakit.models.load.stream_checkpoint", no_reading)
    with pytest.raises((OSError, ValueError)):
        lorakit.load_model(directory, progress=False)


def test_missing_shard(tmp_path: Path) -> None:
    directory = _write("llama", tmp_path / "ckpt")
    shard = _first_shard(directory)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=rf"tensor \S+ is in {shard.name}, which does not exist"):
        lorakit.load_model(directory, progress=False)


def test_index_naming_an_absent_tensor(tmp_path: Path) -> None:
    directory = _write("llama", tmp_path / "ckpt")
    index_file = directory / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"]["model.layers.0.mlp.extra.weight"] = _first_shard(directory).name
    index_file.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="the index names tensor model.layers.0.mlp.extra.weight, which this file"):
        lorakit.load_model(directory, progress=False)


def _edit_single_file(directory: Path, edit) -> Path:
    file = directory / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})
    return file


def test_unreadable_dtype(tmp_path: Path) -> None:
    directory = _write("llama", tmp_path / "ckpt", sharded=False)
    name = "model.layers.1.self_attn.q_proj.weight"
    _edit_single_file(directory, lambda t: t.update({name: t[name].to(torch.float8_e4m3fn)}))
    with pytest.raises(ValueError, match=f"tensor {name} is stored as F8_E4M3, which lorakit does not read"):
        lorakit.load_model(directory, quantize="nf4", progress=False)


@pytest.mark.parametrize("problem, message", [
    ("unexpected", "unexpected tensor model.layers.0.mlp.extra.weight: LlamaForCausalLM has no such"),
    ("missing", "missing tensor model.layers.1.mlp.up_proj.weight: no file of the checkpoint holds it"),
    ("misshapen", r"tensor model.norm.weight has shape \(3,\), the model expects \(64,\)"),
])
def test_unexpected_missing_and_misshapen_tensors(tmp_path: Path, problem: str, message: str) -> None:
    directory = _write("llama", tmp_path / "ckpt", sharded=False)
    edits = {
        "unexpected": lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(2, 2)}),
        "missing": lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
        "misshapen": lambda t: t.update({"model.norm.weight": torch.ones(3)}),
    }
    _edit_single_file(directory, edits[problem])
    for quantize in (None, "nf4"):
        with pytest.raises(ValueError, match=message):
            lorakit.load_model(directory, quantize=quantize, progress=False)


def test_pickle_only_checkpoint_is_refused(tmp_path: Path) -> None:
    directory = _write("llama", tmp_path / "ckpt", sharded=False)
    (directory / "model.safetensors").rename(directory / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin are pickle files, which lorakit never loads"):
        lorakit.load_model(directory, progress=False)


# -- dtype, progress, planner ---------------------------------------------------------------------------------


def test_auto_dtype_follows_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from lorakit.models import load

    monkeypatch.setattr(load, "cpu_has_native_bf16", lambda: False)
    assert resolve_dtype("auto", "cpu") == torch.float32
    monkeypatch.setattr(load, "cpu_has_native_bf16", lambda: True)
    assert resolve_dtype("auto", "cpu") == torch.bfloat16
    assert resolve_dtype("float16") == torch.float16 and resolve_dtype(torch.bfloat16) == torch.bfloat16
    with pytest.raises(ValueError, match="dtype 'int8': choose one of auto, float32, bfloat16, float16"):
        resolve_dtype("int8")


def test_progress_bar_counts_tensors_per_second(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = _write("llama", tmp_path / "ckpt")
    lorakit.load_model(directory, quantize="nf4", progress=True)
    err = capsys.readouterr().err
    assert "quantize: 100%" in err and "tensor/s" in err


def test_planned_weights_match_the_loaded_model(tmp_path: Path) -> None:
    from lorakit.inspect import plan

    directory = _write("llama", tmp_path / "ckpt")
    for quantize, dtype in ((None, "bfloat16"), ("nf4", "float32"), ("nf4", "bfloat16")):
        model, _ = lorakit.load_model(directory, dtype=dtype, quantize=quantize, progress=False)
        planned = plan(directory, "lora", 8, "all-linear", quantize=quantize, dtype=dtype).run.weights
        footprint = lorakit.memory_footprint(model)
        held = footprint.total - footprint.buffers  # rotary frequencies are not weights
        assert abs(planned - held) / held < 0.02, (quantize, dtype, planned, held)


def test_train_and_quantize_commands_stream_in_the_chosen_dtype(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    from lorakit.cli import main

    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert main(["train", "--model", "tiny-llama", "--quantize", "nf4", "--dtype", "bfloat16", "--max-steps", "3",
                 "--batch-size", "2", "--seq-len", "64", "--builtin-train-size", "8", "--eval-samples", "0",
                 "--output-dir", str(out)]) == 0
    assert json.loads((out / "train_config.json").read_text())["dtype"] == "bfloat16"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    nf4 = tmp_path / "nf4"
    assert main(["quantize", "--model", "tiny-llama", "--dtype", "bfloat16", "--output-dir", str(nf4)]) == 0
    assert "quantized weights in" in capsys.readouterr().out
    model, _ = lorakit.load_model(nf4, progress=False)
    assert {m.compute_dtype for m in model.modules() if isinstance(m, NF4Linear)} == {torch.bfloat16}
    assert main(["inspect", "plan", "--model", str(nf4), "--quantize", "nf4",
                 "--dtype", "bfloat16", "--targets", "all-linear"]) == 0
    assert "this run (NF4 linear layers, the rest in bfloat16)" in capsys.readouterr().out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_streaming_onto_cuda_quantizes_on_the_device(tmp_path: Path) -> None:
    directory = _write("llama", tmp_path / "ckpt", "bfloat16")
    on_gpu, _ = lorakit.load_model(directory, dtype="bfloat16", quantize="nf4", device="cuda", progress=False)
    assert {t.device.type for t in on_gpu.state_dict().values()} == {"cuda"}
    on_cpu, _ = lorakit.load_model(directory, dtype="bfloat16", quantize="nf4", progress=False)
    ids = torch.randint(3, 128, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(on_gpu(ids.cuda()).logits.float().cpu(), on_cpu(ids).logits.float(),
                                   rtol=2e-2, atol=2e-2)

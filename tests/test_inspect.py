"""`lorakit inspect`: the papers' arithmetic, spectra against dense SVDs, key-value components, the command line."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
from conftest import randomize_adapters
from lorakit import inspect as lk_inspect
from lorakit.models import byte_tokenizer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with a byte-level tokenizer, saved as a Hugging Face directory."""
    directory = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = byte_tokenizer()
    config = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=128)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def load(model_dir: Path) -> torch.nn.Module:
    return LlamaForCausalLM.from_pretrained(model_dir).eval()


def saved_adapter(model_dir: Path, out: Path, config: lorakit.LoraConfig | lorakit.VeraConfig) -> torch.nn.Module:
    model = lorakit.adapt(load(model_dir), config)
    randomize_adapters(model, seed=5, scale=0.3)
    lorakit.save_adapter(model, out)
    return model


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lorakit")
    lk_inspect.register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


# plan: the papers' arithmetic ------------------------------------------------------------------------------------


def test_llama_70b_at_16_bits_is_about_140_gb() -> None:
    result = lk_inspect.plan("llama-70b", "lora", 8)
    assert result.shape.parameters == pytest.approx(69e9, rel=0.01)
    assert result.base_bytes["16-bit"] == pytest.approx(140e9, rel=0.02)
    assert result.base_bytes["NF4+DQ"] < result.base_bytes["NF4"] < result.base_bytes["16-bit"] / 3
    assert lk_inspect.SHAPES["llama-7b"].parameters == pytest.approx(6.74e9, rel=0.005)


def test_vera_needs_126_times_fewer_parameters_than_lora() -> None:
    square = lk_inspect.ModelShape("80x4096", layers=80, hidden=4096, intermediate=11008, heads=32)
    lora = lk_inspect.plan(square, "lora", 64, ["q_proj"]).trainable
    vera = lk_inspect.plan(square, "vera", 64, ["q_proj"]).trainable
    assert lora == 41_943_040 and vera == 332_800
    assert lora / vera == pytest.approx(126.03, abs=0.01)


def test_double_quantization_cuts_scale_overhead_from_half_a_bit_to_0_127() -> None:
    assert lk_inspect.scale_overhead_bits(double_quant=False) == 0.5
    assert lk_inspect.scale_overhead_bits(double_quant=True) == pytest.approx(0.127, abs=5e-4)


def test_plan_from_a_model_directory_counts_what_adapt_trains(model_dir: Path) -> None:
    shape = lk_inspect.resolve_shape(model_dir)
    assert shape.parameters == sum(p.numel() for p in load(model_dir).parameters())
    for method, config in {
        "lora": lorakit.LoraConfig(r=4, target_modules="all-linear"),
        "dora": lorakit.LoraConfig(r=4, target_modules="all-linear", use_dora=True),
        "vera": lorakit.VeraConfig(r=4, target_modules="all-linear"),
    }.items():
        expected = lorakit.trainable_parameters(lorakit.adapt(load(model_dir), config)).trainable
        assert lk_inspect.plan(model_dir, method, 4, "all-linear").trainable == expected


def test_unknown_shape_and_target_are_clear_errors() -> None:
    with pytest.raises(ValueError, match=r"unknown shape 'llama-8b'.*llama-13b.*llama-70b.*llama-7b"):
        lk_inspect.plan("llama-8b")
    with pytest.raises(ValueError, match="unknown target"):
        lk_inspect.plan("llama-7b", targets=["qkv"])


def test_cli_plan(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["inspect", "plan", "--shape", "llama-70b", "--method", "vera", "--r", "64"]) == 0
    out = capsys.readouterr().out
    assert "llama-70b" in out and "| NF4+DQ |" in out and "vera r=64" in out


# adapter analysis ------------------------------------------------------------------------------------------------


def test_lora_spectra_match_a_dense_svd(model_dir: Path, tmp_path: Path) -> None:
    config = lorakit.LoraConfig(r=4, lora_alpha=6, use_rslora=True, target_modules=["q_proj", "down_proj"],
                                rank_pattern={"down_proj": 3})
    model = saved_adapter(model_dir, tmp_path, config)
    rows = lk_inspect.analyze_adapter(tmp_path)
    assert len(rows) == 4
    for row in rows:
        adapter = model.get_submodule(row.path).adapters["default"]
        b, a = adapter.delta.lora_B.detach().double(), adapter.delta.lora_A.detach().double()
        dense = config.scaling_for(row.path) * b @ a
        sigma = torch.linalg.svdvals(dense)
        torch.testing.assert_close(row.singular_values, sigma[: row.r])
        assert row.r == (3 if "down_proj" in row.path else 4)
        assert row.delta_norm == pytest.approx(float(dense.norm()))
        p = sigma[: row.r] / sigma[: row.r].sum()
        assert row.effective_rank == pytest.approx(float(torch.exp(-(p * p.log()).sum())))
        assert row.rank_above_1pct == int((sigma > 0.01 * sigma[0]).sum())
        assert row.magnitude_change is None
    table = lk_inspect.format_analysis(rows)
    assert rows[0].path in table and "n/a" in table


def test_dora_magnitude_and_direction_change_against_the_base(model_dir: Path, tmp_path: Path) -> None:
    config = lorakit.LoraConfig(r=2, target_modules=["v_proj"], use_dora=True)
    model = saved_adapter(model_dir, tmp_path, config)
    rows = lk_inspect.analyze_adapter(tmp_path, model=model_dir)
    assert len(rows) == 2
    for row in rows:
        layer = model.get_submodule(row.path)
        adapter = layer.adapters["default"]
        w = layer.weight.detach().double()
        b, a = adapter.delta.lora_B.detach().double(), adapter.delta.lora_A.detach().double()
        v = w + config.scaling_for(row.path) * b @ a
        m = adapter.lora_magnitude_vector.detach().double()
        w_adapted = (m / v.norm(dim=1))[:, None] * v  # W' = (m/‖V‖)·V
        assert row.magnitude_change == pytest.approx(float((m - w.norm(dim=1)).norm()), rel=1e-6)
        cosine = (w_adapted * w).sum(1) / (w_adapted.norm(dim=1) * w.norm(dim=1))
        assert row.direction_change == pytest.approx(float((1 - cosine).mean()), rel=1e-6, abs=1e-12)


def test_vera_spectra_need_the_model_and_match_a_dense_svd(model_dir: Path, tmp_path: Path) -> None:
    model = saved_adapter(model_dir, tmp_path, lorakit.VeraConfig(r=8, target_modules=["q_proj", "up_proj"]))
    with pytest.raises(ValueError, match="needs the base model"):
        lk_inspect.analyze_adapter(tmp_path)
    for row in lk_inspect.analyze_adapter(tmp_path, model=model_dir):
        dense = model.get_submodule(row.path).adapters["default"].delta.delta_weight().detach().double()
        torch.testing.assert_close(row.singular_values, torch.linalg.svdvals(dense)[:8], rtol=1e-6, atol=1e-9)


def test_cli_adapter_writes_a_table_and_a_png(model_dir: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    saved_adapter(model_dir, tmp_path / "adapter", lorakit.LoraConfig(r=4, target_modules="all-linear"))
    png = tmp_path / "out" / "spectra.png"
    assert run_cli(["inspect", "adapter", str(tmp_path / "adapter"), "--model", str(model_dir),
                    "--png", str(png)]) == 0
    assert "| model.layers.0.mlp.down_proj |" in capsys.readouterr().out
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_missing_or_mismatched_adapter_is_a_clear_error(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="adapter_config.json not found"):
        lk_inspect.analyze_adapter(tmp_path / "nowhere")
    other = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=259))
    lorakit.adapt(other, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    lorakit.save_adapter(other, tmp_path / "other")
    with pytest.raises(ValueError, match="has shape"):
        lk_inspect.analyze_adapter(tmp_path / "other", model=model_dir)


# key-value view --------------------------------------------------------------------------------------------------


def test_components_sum_back_to_each_layers_update(model_dir: Path) -> None:
    from lorakit.models import load_model

    model, tokenizer = load_model(model_dir, dtype="float32")
    lorakit.adapt(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    randomize_adapters(model, seed=2, scale=0.3)
    updates: dict[str, torch.Tensor] = {}

    def record(path: str):
        def hook(layer: lorakit.AdaptedLinear, args: tuple[torch.Tensor], out: torch.Tensor) -> None:
            updates[path] = (out - layer.base_layer(args[0]))[0].double()  # [T, out]
        return hook

    for path, layer in lorakit.adapted_layers(model):
        layer.register_forward_hook(record(path))
    maps = lk_inspect.key_value_maps(model, tokenizer, "Hello, lorakit!")
    assert len(maps) == 14 and maps[0].tokens[:2] == ["H", "e"]
    for kv in maps:
        torch.testing.assert_close(kv.update(), updates[kv.path], rtol=1e-4, atol=1e-5)
        expected = 2.0 * kv.activations.abs() * kv.values.norm(dim=0)
        torch.testing.assert_close(kv.contributions, expected)
    assert "| model.layers.0.self_attn.q_proj |" in lk_inspect.format_key_values(maps)


def test_cli_keys_writes_a_heat_map(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    saved_adapter(model_dir, tmp_path / "adapter", lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    png = tmp_path / "keys.png"
    assert run_cli(["inspect", "keys", str(tmp_path / "adapter"), "--model", str(model_dir), "--text", "abc abc",
                    "--png", str(png), "--layers", "2"]) == 0
    assert "| model.layers.1.self_attn.v_proj |" in capsys.readouterr().out
    assert png.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(FileNotFoundError):
        run_cli(["inspect", "keys", str(tmp_path / "missing"), "--model", str(model_dir), "--text", "x"])


def test_config_json_is_the_only_file_plan_reads(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "num_hidden_layers": 32, "hidden_size": 4096, "intermediate_size": 11008,
        "num_attention_heads": 32, "vocab_size": 32000}))
    assert lk_inspect.resolve_shape(tmp_path).parameters == lk_inspect.SHAPES["llama-7b"].parameters
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    with pytest.raises(ValueError, match="not a Llama-style config"):
        lk_inspect.resolve_shape(tmp_path)

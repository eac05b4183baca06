"""GGUF export without llama.cpp: names from gguf's tables, the rotary row order (checked by what it means: equal
attention scores under the two rotary conventions), the scale folded into B against a float64 dense oracle ΔW read
from the PEFT file, merged models read back with gguf.GGUFReader, and the refusals. llama.cpp itself loads the files
in test_serving.py (`pytest -m serving`)."""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf_models import LLAMA3_ROPE, bpe_tokenizer, random_adapter, tiny_model_dir
from safetensors.torch import load_file
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

import lorakit
from lorakit.cli import build_parser, main
from lorakit.formats.gguf import TensorNames, encode, rope_interleave
from lorakit.formats.gguf_vocab import pre_tokenizer_name, with_added_tokens
from lorakit.models import load_model

PREFIX = "base_model.model."
README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("llama") / "model", "llama")


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("qwen2") / "model", "qwen2", tied=True)


def _interleaved_index(heads: int, head_dim: int) -> list[int]:
    """llama.cpp's row order written out: new row h·d + 2i + j holds old row h·d + j·d/2 + i."""
    return [h * head_dim + j * (head_dim // 2) + i for h in range(heads) for i in range(head_dim // 2) for j in (0, 1)]


def _read(path: Path) -> tuple[dict[str, object], dict[str, np.ndarray]]:
    reader = gguf.GGUFReader(path)
    fields = {key: field.contents() for key, field in reader.fields.items()}
    tensors = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64) for t in reader.tensors}
    return fields, tensors


def test_rope_interleave_is_the_written_out_permutation() -> None:
    rows = torch.arange(4 * 16 * 3, dtype=torch.float64).reshape(64, 3)
    assert torch.equal(rope_interleave(rows, 4), rows[_interleaved_index(4, 16)])


def test_reordered_q_and_k_under_interleaved_rotary_give_hugging_faces_attention_scores() -> None:
    """What the reordering is for: HF rotates halves of a head, llama.cpp rotates adjacent pairs."""
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)
    names = TensorNames(config)
    torch.manual_seed(0)
    x = torch.randn(5, 64, dtype=torch.float64)
    w_q, w_k = torch.randn(64, 64, dtype=torch.float64), torch.randn(32, 64, dtype=torch.float64)
    positions = torch.arange(5)[None]
    cos, sin = LlamaRotaryEmbedding(config)(x[None].float(), positions)
    q = (x @ w_q.T).view(5, 4, 16).transpose(0, 1)[None]  # [1, heads, seq, d]
    k = (x @ w_k.T).view(5, 2, 16).transpose(0, 1)[None]
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos.double(), sin.double())
    scores_hf = q_hf[0] @ k_hf[0].repeat_interleave(2, 0).transpose(1, 2)

    def interleaved_rotary(t: torch.Tensor) -> torch.Tensor:  # pairs (2i, 2i+1) rotated by pos·θ_i
        theta = 10000.0 ** (-torch.arange(0, 16, 2, dtype=torch.float64) / 16)
        angle = torch.arange(5, dtype=torch.float64)[:, None] * theta  # [seq, d/2]
        even, odd = t[..., 0::2], t[..., 1::2]
        return torch.stack((even * angle.cos() - odd * angle.sin(), even * angle.sin() + odd * angle.cos()), -1).flatten(-2)

    q_cpp = (x @ names.in_gguf_order("model.layers.0.self_attn.q_proj.weight", w_q).T).view(5, 4, 16).transpose(0, 1)
    k_cpp = (x @ names.in_gguf_order("model.layers.0.self_attn.k_proj.weight", w_k).T).view(5, 2, 16).transpose(0, 1)
    scores_cpp = interleaved_rotary(q_cpp) @ interleaved_rotary(k_cpp).repeat_interleave(2, 0).transpose(1, 2)
    torch.testing.assert_close(scores_cpp, scores_hf, rtol=1e-5, atol=1e-5)
    v = torch.randn(32, 64)
    assert torch.equal(names.in_gguf_order("model.layers.0.self_attn.v_proj.weight", v), v)


@pytest.mark.parametrize("model_type, arch, reordered", [("llama", "llama", True), ("mistral", "llama", True),
                                                         ("qwen2", "qwen2", False)])
def test_names_follow_ggufs_table(model_type: str, arch: str, reordered: bool) -> None:
    config = LlamaConfig(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, hidden_size=64)
    config.model_type = model_type
    names = TensorNames(config)
    assert names.arch_name == arch
    assert names.gguf_name("model.layers.2.self_attn.q_proj.weight") == "blk.2.attn_q.weight"
    assert names.gguf_name("model.layers.0.mlp.down_proj.weight") == "blk.0.ffn_down.weight"
    assert names.gguf_name("model.embed_tokens.weight") == "token_embd.weight"
    assert names.gguf_name("lm_head.weight") == "output.weight"
    rows = torch.randn(64, 8)
    assert torch.equal(names.in_gguf_order("model.layers.1.self_attn.q_proj.weight", rows), rows) is not reordered
    with pytest.raises(ValueError, match="no GGUF name"):
        names.gguf_name("model.layers.0.self_attn.rotary.weight")


def _oracle_deltas(adapter: Path) -> dict[str, torch.Tensor]:
    """s·B·A per adapted module path, in float64, from the PEFT file and PEFT's rules written out here."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    tensors = {k: v.double() for k, v in load_file(adapter / "adapter_model.safetensors").items()}
    deltas = {}
    if config["peft_type"] == "VERA":
        vera_a, vera_b = tensors["base_model.vera_A"], tensors["base_model.vera_B"]
        for key, lambda_b in tensors.items():
            if key.endswith(".vera_lambda_b"):
                path = key[len(PREFIX):-len(".vera_lambda_b")]
                lambda_d = tensors[f"{PREFIX}{path}.vera_lambda_d"]
                in_features = {"o_proj": 64, "down_proj": 128}.get(path.rsplit(".", 1)[1], 64)
                b = lambda_b[:, None] * vera_b[: lambda_b.shape[0]]
                deltas[path] = b @ (lambda_d[:, None] * vera_a[:, :in_features])
        return deltas
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            path = key[len(PREFIX):-len(".lora_A.weight")]
            name = path.rsplit(".", 1)[1]
            r = config["rank_pattern"].get(name, config["r"])
            alpha = config["alpha_pattern"].get(name, config["lora_alpha"])
            scale = alpha / math.sqrt(r) if config["use_rslora"] else alpha / r
            deltas[path] = scale * tensors[f"{PREFIX}{path}.lora_B.weight"] @ a
    return deltas


ADAPTERS = {
    "lora": lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    "rslora+patterns": lorakit.LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules="all-linear",
                                          rank_pattern={"q_proj": 2, "down_proj": 6}, alpha_pattern={"v_proj": 3}),
    "vera": lorakit.VeraConfig(r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]),
}


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("method", sorted(ADAPTERS))
def test_llama_cpps_update_is_the_float64_oracles(kind: str, method: str, llama_dir: Path, qwen2_dir: Path,
                                                  tmp_path: Path) -> None:
    """llama.cpp adds (α_file / r_t)·B·A per tensor: that equals s·B·A of the PEFT file, rows in llama.cpp's order."""
    model_dir = llama_dir if kind == "llama" else qwen2_dir
    adapter = random_adapter(model_dir, ADAPTERS[method], tmp_path / "adapter")
    path = lorakit.export_gguf(adapter, tmp_path / "adapter.gguf")
    fields, tensors = _read(path)
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == kind
    alpha = fields["adapter.lora.alpha"]
    oracle = _oracle_deltas(adapter)
    names = {f"blk.{p.split('.')[2]}.{p.rsplit('.', 1)[1]}" for p in oracle}
    assert len(tensors) == 2 * len(oracle) and len(names) == len(oracle)
    table = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    for module_path, delta in oracle.items():
        layer, module = module_path.split(".")[2], module_path.rsplit(".", 1)[1]
        name = f"blk.{layer}.{table[module]}.weight"
        a, b = tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"]  # [r, in], [out, r]
        rank = b.shape[1]
        heads = {"q_proj": 4, "k_proj": 2}.get(module) if kind == "llama" else None
        expected = delta[_interleaved_index(heads, 16)] if heads else delta
        np.testing.assert_allclose(alpha / rank * b @ a, expected.numpy(), rtol=1e-5, atol=1e-6)
    if method == "lora":  # one scale for every tensor: B is written bit for bit
        source = load_file(adapter / "adapter_model.safetensors")
        up = source[f"{PREFIX}model.layers.0.mlp.up_proj.lora_B.weight"].double().numpy()
        assert np.array_equal(tensors["blk.0.ffn_up.weight.lora_b"], up)


@pytest.mark.parametrize("outtype, tolerance", [("f32", 0.0), ("f16", 2e-3), ("bf16", 1e-2), ("q8_0", 1e-2)])
def test_merged_model_reads_back(outtype: str, tolerance: float, llama_dir: Path, tmp_path: Path) -> None:
    adapter = random_adapter(llama_dir, ADAPTERS["lora"], tmp_path / "adapter")
    path = lorakit.export_gguf(adapter, tmp_path / "model.gguf", merged=True, outtype=outtype)
    fields, tensors = _read(path)
    model, tokenizer = load_model(llama_dir, dtype="float32")
    merged = lorakit.merge_and_unload(lorakit.load_adapter(model, adapter)).state_dict()
    assert fields["general.type"] == "model" and fields["llama.block_count"] == 2
    assert fields["llama.attention.head_count_kv"] == 2 and fields["llama.rope.dimension_count"] == 16
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.tokens"][256] == "Ġt" and fields["tokenizer.ggml.merges"] == ["Ġ t"]
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template
    assert len(tensors) == len(merged)
    q = merged["model.layers.1.self_attn.q_proj.weight"].double()[_interleaved_index(4, 16)]
    for name, expected in [("blk.1.attn_q.weight", q), ("blk.0.ffn_down.weight", merged["model.layers.0.mlp.down_proj.weight"]),
                           ("output.weight", merged["lm_head.weight"]), ("blk.0.attn_norm.weight",
                                                                        merged["model.layers.0.input_layernorm.weight"])]:
        error = np.abs(tensors[name] - expected.double().numpy()).max() / np.abs(expected.numpy()).max()
        assert error <= (0.0 if name.endswith("norm.weight") else tolerance), name


def test_a_tied_head_is_left_to_the_embedding_and_qwen2_keeps_its_biases(qwen2_dir: Path, tmp_path: Path) -> None:
    path = lorakit.export_gguf(None, tmp_path / "base.gguf", model=str(qwen2_dir), merged=True, outtype="f32")
    fields, tensors = _read(path)
    model, _ = load_model(qwen2_dir, dtype="float32")
    assert fields["general.architecture"] == "qwen2" and "output.weight" not in tensors
    bias = model.state_dict()["model.layers.0.self_attn.k_proj.bias"]
    np.testing.assert_array_equal(tensors["blk.0.attn_k.bias"], bias.double().numpy())  # no reordering in Qwen2


def test_encode_keeps_vectors_float32_and_short_q8_rows_float16() -> None:
    assert encode(torch.ones(64), "q8_0")[1] == gguf.GGMLQuantizationType.F32
    assert encode(torch.ones(4, 48), "q8_0")[1] == gguf.GGMLQuantizationType.F16
    assert encode(torch.ones(4, 64), "q8_0")[1] == gguf.GGMLQuantizationType.Q8_0
    with pytest.raises(ValueError, match="outtype 'q4'"):
        encode(torch.ones(4, 64), "q4")


@pytest.mark.parametrize("pre, name", [
    ({"type": "ByteLevel", "use_regex": True}, "gpt-2"),
    ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                            {"type": "ByteLevel", "use_regex": True}]}, "smollm"),
    ({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?"
                                               r"[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"}},
        {"type": "ByteLevel", "use_regex": False}]}, "llama-bpe"),
])
def test_pre_tokenizers_get_llama_cpps_names(pre: dict[str, object], name: str) -> None:
    assert pre_tokenizer_name(pre) == name


def test_an_unknown_pre_tokenizer_is_refused() -> None:
    with pytest.raises(NotImplementedError, match="no llama.cpp pre-tokenizer"):
        pre_tokenizer_name({"type": "Whitespace"})


def test_the_tiny_tokenizer_has_what_llama_cpp_needs() -> None:
    tokenizer = bpe_tokenizer()
    assert tokenizer(" t")["input_ids"] == [256]


@pytest.mark.parametrize("config, reason", [
    (lorakit.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True), "DoRA cannot be exported"),
    (lorakit.LoraConfig(r=4, target_modules=["q_proj"], bias="lora_only"), "trains biases"),
    (lorakit.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]), "trains whole modules"),
    (lorakit.LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"]), "not a LoRA pair of a linear layer"),
    (lorakit.LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=[5, 6]), "not a LoRA pair"),
])
def test_what_a_llama_cpp_lora_cannot_hold_is_refused_with_the_way_out(config: lorakit.LoraConfig, reason: str,
                                                                       llama_dir: Path, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    adapter = random_adapter(llama_dir, config, tmp_path / "adapter")
    assert main(["export", "--adapter", str(adapter), "--output", str(tmp_path / "a.gguf")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("lorakit: error: ") and reason in error and "--merged" in error and error.count("\n") == 1
    assert not (tmp_path / "a.gguf").exists()
    assert main(["export", "--adapter", str(adapter), "--merged", "--output", str(tmp_path / "m.gguf")]) == 0
    assert gguf.GGUFReader(tmp_path / "m.gguf").fields["general.type"].contents() == "model"


def test_cli_writes_an_adapter_for_the_base_it_names(llama_dir: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    adapter = random_adapter(llama_dir, ADAPTERS["lora"], tmp_path / "adapter")
    assert main(["export", "--adapter", str(adapter), "--output", str(tmp_path / "a.gguf"), "--outtype", "f16"]) == 0
    assert "LoRA adapter" in capsys.readouterr().out
    reader = gguf.GGUFReader(tmp_path / "a.gguf")
    assert {t.tensor_type for t in reader.tensors} == {gguf.GGMLQuantizationType.F16}


@pytest.mark.parametrize("argv, message", [
    (["--model", "tiny-llama"], "needs --adapter"),
    (["--merged"], "give it with --model"),
    (["--adapter", "{missing}"], "not found"),
    (["--adapter", "{adapter}", "--outtype", "q8_0"], "f32, f16 or bf16"),
    (["--adapter", "{adapter}", "--model", "tiny-gpt2"], "supports the model types"),
    (["--adapter", "{nameless}"], "names no base model"),
    (["--adapter", "{moved}"], "give the base with --model"),
])
def test_cli_errors(argv: list[str], message: str, llama_dir: Path, tmp_path: Path,
                    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    adapter = random_adapter(llama_dir, ADAPTERS["lora"], tmp_path / "adapter")
    nameless = tmp_path / "nameless"
    nameless.mkdir()
    config = json.loads((adapter / "adapter_config.json").read_text()) | {"base_model_name_or_path": None}
    (nameless / "adapter_config.json").write_text(json.dumps(config))
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": "/gone/model"}))
    paths = {"missing": tmp_path / "missing", "adapter": adapter, "nameless": nameless, "moved": moved}
    argv = [arg.format(**paths) for arg in argv]
    assert main(["export", *argv, "--output", str(tmp_path / "out.gguf")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("lorakit: error:") and message in error and error.count("\n") == 1


def test_an_nf4_trained_adapter_merges_into_the_dense_base(llama_dir: Path, tmp_path: Path) -> None:
    """QLoRA trains on NF4 weights, but the merged export adds the update to the float base, never to 4-bit codes."""
    model, _ = load_model(llama_dir, dtype="float32", quantize="nf4")
    lorakit.adapt(model, ADAPTERS["lora"])
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.normal_(0, 0.2)
    adapter = lorakit.save_adapter(model, tmp_path / "adapter")
    _, tensors = _read(lorakit.export_gguf(adapter, tmp_path / "model.gguf", merged=True, outtype="f32"))
    dense, _ = load_model(llama_dir, dtype="float32")
    expected = dense.state_dict()["model.layers.0.mlp.down_proj.weight"].double() + _oracle_deltas(adapter)[
        "model.layers.0.mlp.down_proj"]
    np.testing.assert_allclose(tensors["blk.0.ffn_down.weight"], expected.numpy(), rtol=0, atol=1e-6)


def test_the_readme_export_lines_parse() -> None:
    lines = [shlex.split(line.split("#")[0]) for line in README.read_text().splitlines()
             if line.strip().startswith("lorakit export ")]
    assert len(lines) >= 3
    for argv in lines:
        args = build_parser().parse_args(argv[1:])
        assert args.command == "export" and args.output.endswith(".gguf")


def test_llama3_rope_scaling_is_written_as_llama_cpps_frequency_divisors(tmp_path: Path) -> None:
    """Meta's Llama 3.1 rule written out: wavelengths beyond old_len / low_freq_factor are slowed by `factor`, those
    under old_len / high_freq_factor kept, those between blended."""
    directory = tiny_model_dir(tmp_path / "model", "llama", rope=LLAMA3_ROPE)
    _, tensors = _read(lorakit.export_gguf(None, tmp_path / "m.gguf", model=str(directory), merged=True))
    theta, factor, low, high, old = (LLAMA3_ROPE[k] for k in ("rope_theta", "factor", "low_freq_factor",
                                                               "high_freq_factor", "original_max_position_embeddings"))
    expected = []
    for i in range(8):  # head_dim 16
        wavelength = 2 * math.pi * theta ** (2 * i / 16)
        if wavelength < old / high:
            expected.append(1.0)
        elif wavelength > old / low:
            expected.append(factor)
        else:
            smooth = (old / wavelength - low) / (high - low)
            expected.append(1 / ((1 - smooth) / factor + smooth))
    assert 1.0 in expected and factor in expected and any(1 < e < factor for e in expected)
    np.testing.assert_allclose(tensors["rope_freqs.weight"], expected, rtol=1e-5)


def test_vera_without_saved_projections_exports_the_same_file(llama_dir: Path, tmp_path: Path) -> None:
    """A seed-only VeRA file regenerates its projections from projection_prng_key: the same GGUF as a saved one."""
    files = []
    for saved in (True, False):
        config = lorakit.VeraConfig(r=16, target_modules=["q_proj", "down_proj"], save_projection=saved)
        adapter = random_adapter(llama_dir, config, tmp_path / f"adapter-{saved}")
        files.append(_read(lorakit.export_gguf(adapter, tmp_path / f"{saved}.gguf"))[1])
    assert "base_model.vera_A" not in load_file(tmp_path / "adapter-False" / "adapter_model.safetensors")
    assert files[0].keys() == files[1].keys()
    for name in files[0]:
        np.testing.assert_array_equal(files[0][name], files[1][name])


def test_tokens_an_adapter_added_are_in_the_merged_models_vocabulary(llama_dir: Path, tmp_path: Path) -> None:
    model, tokenizer = load_model(llama_dir, dtype="float32")
    spec = lorakit.add_tokens(model, tokenizer, ["<ledger>", "<iso>"])
    lorakit.adapt(model, lorakit.LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=spec))
    adapter = lorakit.save_adapter(model, tmp_path / "adapter")
    tokenizer.save_pretrained(adapter)
    fields, tensors = _read(lorakit.export_gguf(adapter, tmp_path / "model.gguf", merged=True, outtype="f32"))
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == len(tokenizer) == tensors["token_embd.weight"].shape[0]
    assert tokens[-2:] == ["<ledger>", "<iso>"] and fields["tokenizer.ggml.token_type"][-2:] == [4, 4]


def test_copied_tokenizer_keys_grow_by_the_added_tokens() -> None:
    tokenizer = bpe_tokenizer()
    tokenizer.add_tokens(["<ledger>"])
    keys = gguf.Keys.Tokenizer
    array, string, int32 = gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING, gguf.GGUFValueType.INT32
    copied = [(keys.MODEL, "gpt2", string, None), (keys.LIST, ["a"] * 260, array, string),
              (keys.TOKEN_TYPE, [1] * 260, array, int32)]
    grown = {key: value for key, value, _, _ in with_added_tokens(copied, tokenizer, 262)}
    assert grown[keys.LIST][260:] == ["<ledger>", "[PAD261]"] and grown[keys.TOKEN_TYPE][260:] == [4, 5]
    assert grown[keys.MODEL] == "gpt2"

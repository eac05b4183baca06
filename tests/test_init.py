"""PiSSA, OLoRA and LoftQ initialisations: identity at init, float64 oracles of their factors, the plain-LoRA and
residual forms of saved adapters in round trips with PEFT, and the errors for what cannot work."""

from __future__ import annotations

import copy
from pathlib import Path

import peft
import pytest
import torch
from conftest import model_input, model_output, randomize_adapters, tiny_gpt2, tiny_llama
from transformers import Qwen2Config, Qwen2ForCausalLM

import lorakit
from lorakit.adapters.config import LoftQConfig
from lorakit.quant.nf4 import NF4Linear


def tiny_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    return Qwen2ForCausalLM(config).eval()


MODELS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gpt2": tiny_gpt2}
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "qwen2": ["q_proj", "k_proj", "up_proj"],
           "gpt2": ["c_attn", "c_fc"]}


def _logits(model: torch.nn.Module, kind: str = "llama") -> torch.Tensor:
    with torch.no_grad():
        return model_output(model, kind, model_input(kind))


def _config(kind: str, init: str, **options: object) -> lorakit.LoraConfig:
    settings = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS[kind], "init_lora_weights": init}
    if init == "loftq":
        settings["loftq_config"] = LoftQConfig()
    return lorakit.LoraConfig(**{**settings, **options})


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_identity_at_init(kind: str, init: str) -> None:
    base = MODELS[kind]()
    expected = _logits(base, kind)
    model = lorakit.adapt(copy.deepcopy(base), _config(kind, init, use_rslora=init == "olora"))
    assert (_logits(model, kind) - expected).abs().max().item() <= 1e-5


def _weights(model: torch.nn.Module, path: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """(W_res, A, B, s) of one adapted layer, float64."""
    layer = model.get_submodule(path)
    adapter = layer.adapters["default"]
    delta = adapter.delta
    return layer.weight.double(), delta.lora_A.double(), delta.lora_B.double(), adapter.scaling


def test_pissa_factors_against_a_float64_svd() -> None:
    base = tiny_llama()
    w = base.model.layers[0].mlp.down_proj.weight.detach().double()  # [64, 96]
    model = lorakit.adapt(copy.deepcopy(base), _config("llama", "pissa", lora_alpha=12))
    w_res, a, b, s = _weights(model, "model.layers.0.mlp.down_proj")
    u, sv, vh = torch.linalg.svd(w, full_matrices=False)
    top = u[:, :4] @ torch.diag(sv[:4]) @ vh[:4]  # the best rank-4 approximation
    assert torch.allclose(s * b @ a, top, atol=1e-5)
    assert torch.allclose(w_res, w - top, atol=1e-5)
    assert torch.allclose(b.T @ b, a @ a.T, atol=1e-5)  # √S on both sides: B = U√(S/s), A = √(S/s)Vᵀ


def test_pissa_niter_finds_the_top_subspace_of_a_decaying_spectrum() -> None:
    base = tiny_llama()
    layer = base.model.layers[0].mlp.down_proj
    generator = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(64, 64, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(96, 64, generator=generator))
    spectrum = torch.cat([torch.tensor([8.0, 6.0, 5.0, 4.0]), 0.05 * torch.ones(60)])
    with torch.no_grad():
        layer.weight.copy_(u @ torch.diag(spectrum) @ v.T)
    w = layer.weight.detach().double()
    model = lorakit.adapt(copy.deepcopy(base), _config("llama", "pissa_niter_4"))
    _, a, b, s = _weights(model, "model.layers.0.mlp.down_proj")
    top = (u[:, :4] @ torch.diag(spectrum[:4]) @ v[:, :4].T).double()
    assert (s * b @ a - top).norm() / top.norm() < 1e-3
    assert torch.allclose(model.model.layers[0].mlp.down_proj.weight.double() + s * b @ a, w, atol=1e-5)


def test_olora_factors_against_a_float64_qr() -> None:
    base = tiny_llama()
    w = base.model.layers[1].self_attn.q_proj.weight.detach().double()
    model = lorakit.adapt(copy.deepcopy(base), _config("llama", "olora"))
    w_res, a, b, s = _weights(model, "model.layers.1.self_attn.q_proj")
    q, upper = torch.linalg.qr(w)
    assert torch.allclose(b @ a, q[:, :4] @ upper[:4], atol=1e-5)  # QR signs cancel in the product
    assert torch.allclose(b.T @ b, torch.eye(4, dtype=torch.float64), atol=1e-5)  # B orthonormal
    assert torch.allclose(w_res, w - s * b @ a, atol=1e-5)


def test_loftq_starts_closer_to_the_dense_model_than_qlora() -> None:
    base = tiny_llama()
    path = "model.layers.0.mlp.down_proj"
    w = base.get_submodule(path).weight.detach().double()
    qlora_error = (NF4Linear.from_weight(w.float()).dense_weight(torch.float32).double() - w).norm()
    errors = []
    for iters in (1, 3):
        model = lorakit.adapt(copy.deepcopy(base), lorakit.LoraConfig(
            r=4, lora_alpha=16, target_modules=[path], init_lora_weights="loftq", loftq_config=LoftQConfig(4, iters)))
        layer = model.get_submodule(path)
        assert isinstance(layer.base_layer, NF4Linear)
        q = layer.weight.double()
        _, a, b, s = _weights(model, path)
        if iters == 1:  # oracle: s·B·A is the best rank-r approximation of W − deq(NF4(W))
            u, sv, vh = torch.linalg.svd(w - q, full_matrices=False)
            assert torch.allclose(s * b @ a, u[:, :4] @ torch.diag(sv[:4]) @ vh[:4], atol=1e-5)
            assert torch.equal(q.float(), NF4Linear.from_weight(w.float()).dense_weight(torch.float32))
        errors.append((q + s * b @ a - w).norm())
    assert errors[0] < qlora_error
    assert errors[1] <= errors[0] * 1.01


def test_loftq_model_is_closer_to_the_dense_one_than_qlora() -> None:
    base = tiny_llama()
    dense = _logits(base)
    qlora = lorakit.adapt(lorakit.quantize(copy.deepcopy(base)), lorakit.LoraConfig(r=8, target_modules="all-linear"))
    loftq = lorakit.adapt(copy.deepcopy(base), lorakit.LoraConfig(
        r=8, target_modules="all-linear", init_lora_weights="loftq", loftq_config=LoftQConfig(loftq_iter=2)))
    lorakit.quantize(loftq)  # the layers LoftQ did not touch: already NF4 ones stay as they are
    assert sum(isinstance(m, NF4Linear) for m in loftq.modules()) == sum(isinstance(m, NF4Linear) for m in qlora.modules())
    assert (_logits(loftq) - dense).abs().mean() < 0.7 * (_logits(qlora) - dense).abs().mean()


def _original_with_loftq_base(kind: str, trained: torch.nn.Module) -> torch.nn.Module:
    """The original model with every LoftQ-quantized weight written back densely (what PEFT's LoftQ saves)."""
    plain = MODELS[kind]()
    with torch.no_grad():
        for path, layer in lorakit.adapted_layers(trained):
            target = plain.get_submodule(path).weight
            target.copy_(layer.weight.T if layer.fan_in_fan_out else layer.weight)
    return plain


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("init", ["pissa", "olora", "loftq"])
@pytest.mark.parametrize("residual", [False, True])
def test_lorakit_to_peft(kind: str, init: str, residual: bool, tmp_path: Path) -> None:
    if init == "olora" and kind == "gpt2":
        pytest.skip("PEFT's OLoRA does not transpose Conv1D weights")
    model = lorakit.adapt(MODELS[kind](), _config(kind, init, use_rslora=True, rank_pattern={TARGETS[kind][0]: 2}))
    randomize_adapters(model, scale=0.05)
    expected = _logits(model, kind)
    lorakit.save_adapter(model, tmp_path, residual=residual)
    # the plain form of LoftQ applies to its quantized base; every other file to the original model
    quantized_base = init == "loftq" and not residual
    if not (init == "loftq" and residual):  # PEFT recomputes LoftQ only with bitsandbytes on a GPU
        base = _original_with_loftq_base(kind, model) if quantized_base else MODELS[kind]()
        loaded = peft.PeftModel.from_pretrained(base, tmp_path)
        assert (_logits(loaded, kind) - expected).abs().max().item() <= 1e-5
    again = _original_with_loftq_base(kind, model) if quantized_base else MODELS[kind]()
    lorakit.load_adapter(again, tmp_path)
    assert (_logits(again, kind) - expected).abs().max().item() <= 1e-5


def test_the_plain_lora_form_has_rank_2r(tmp_path: Path) -> None:
    model = lorakit.adapt(tiny_llama(), _config("llama", "pissa", rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 3}))
    lorakit.save_adapter(model, tmp_path)
    config = lorakit.read_adapter_config(tmp_path)
    assert (config.r, config.lora_alpha, config.init_lora_weights) == (8, 16, True)
    assert config.rank_pattern == {"v_proj": 4} and config.alpha_pattern == {"q_proj": 6}
    residual = lorakit.read_adapter_config(lorakit.save_adapter(model, tmp_path / "residual", residual=True))
    assert (residual.r, residual.init_lora_weights) == (4, "pissa")
    loftq = lorakit.adapt(tiny_llama(), _config("llama", "loftq"))
    saved = lorakit.read_adapter_config(lorakit.save_adapter(loftq, tmp_path / "loftq"))
    assert (saved.r, saved.init_lora_weights, saved.loftq_config) == (4, "loftq", LoftQConfig(4, 1))


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("converted", [False, True])
def test_peft_to_lorakit(kind: str, init: str, converted: bool, tmp_path: Path) -> None:
    if init == "olora" and kind == "gpt2":
        pytest.skip("PEFT's OLoRA does not transpose Conv1D weights")
    options = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS[kind], "init_lora_weights": init}
    peft_model = peft.get_peft_model(MODELS[kind](), peft.LoraConfig(**options))
    if converted:  # PEFT's own conversion needs the adapter as it was at init, saved first
        peft_model.save_pretrained(tmp_path / "init")
    randomize_adapters(peft_model, scale=0.05)
    expected = _logits(peft_model, kind)
    conversion = {"path_initial_model_for_weight_conversion": str(tmp_path / "init")} if converted else {}
    peft_model.save_pretrained(tmp_path / "trained", **conversion)
    model = lorakit.load_adapter(MODELS[kind](), tmp_path / "trained")
    assert (_logits(model, kind) - expected).abs().max().item() <= 1e-5


def test_dora_with_pissa_starts_as_the_base_and_saves_only_residual(tmp_path: Path) -> None:
    base = tiny_llama()
    model = lorakit.adapt(copy.deepcopy(base), _config("llama", "pissa", use_dora=True))
    assert (_logits(model) - _logits(base)).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="residual=True"):
        lorakit.save_adapter(model, tmp_path)
    randomize_adapters(model, scale=0.05)
    lorakit.save_adapter(model, tmp_path, residual=True)
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert (_logits(loaded) - _logits(model)).abs().max().item() <= 1e-5


def test_merging_a_pissa_adapter_gives_the_same_model() -> None:
    model = lorakit.adapt(tiny_llama(), _config("llama", "pissa"))
    randomize_adapters(model, scale=0.05)
    expected = _logits(model)
    assert (_logits(lorakit.merge_and_unload(model)) - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("options, message", [
    ({"init_lora_weights": "pissa_niter"}, "pissa_niter_<N>"),
    ({"init_lora_weights": "svd"}, "init_lora_weights must be"),
    ({"init_lora_weights": "loftq"}, "go together"),
    ({"loftq_config": LoftQConfig()}, "go together"),
])
def test_bad_options(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        lorakit.LoraConfig(target_modules=["q_proj"], **options)
    with pytest.raises(ValueError, match="loftq_bits must be 4"):
        LoftQConfig(loftq_bits=8)


def test_inits_that_rewrite_the_base_refuse_a_quantized_one_and_a_rank_beyond_it() -> None:
    model = lorakit.quantize(tiny_llama())
    with pytest.raises(ValueError, match="adapt the dense model, then quantize"):
        lorakit.adapt(model, _config("llama", "pissa"))
    with pytest.raises(ValueError, match="r <= min"):
        lorakit.adapt(tiny_llama(), lorakit.LoraConfig(r=80, target_modules=["q_proj"], init_lora_weights="olora"))


def test_qpissa_is_pissa_then_quantize() -> None:
    base = tiny_llama()
    model = lorakit.quantize(lorakit.adapt(copy.deepcopy(base), _config("llama", "pissa")))
    qlora = lorakit.quantize(lorakit.adapt(copy.deepcopy(base), _config("llama", True)))
    dense = _logits(base)
    assert isinstance(model.model.layers[0].self_attn.q_proj.base_layer, NF4Linear)
    assert (_logits(model) - dense).abs().mean() < (_logits(qlora) - dense).abs().mean()


CLI_FAST = ["--model", "tiny-llama", "--batch-size", "4", "--builtin-train-size", "16", "--eval-samples", "0",
            "--max-steps", "2", "--save-every", "1"]


@pytest.fixture
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path_factory.getbasetemp() / "lorakit-cache"))


@pytest.mark.usefixtures("_cache")
@pytest.mark.parametrize("flags, saved_r, saved_init", [
    (["--init", "pissa", "--quantize", "nf4"], 16, True),
    (["--init", "pissa", "--pissa-niter", "2"], 16, True),
    (["--init", "olora"], 16, True),
    (["--init", "loftq", "--quantize", "nf4", "--loftq-iter", "2"], 8, "loftq"),
])
def test_cli_inits_train_save_and_resume(flags: list[str], saved_r: int, saved_init: object, tmp_path: Path) -> None:
    from lorakit.cli import main

    out = str(tmp_path / "run")
    assert main(["train", *CLI_FAST, *flags, "--output-dir", out]) == 0
    config = lorakit.read_adapter_config(Path(out) / "adapter")
    assert (config.r, config.init_lora_weights) == (saved_r, saved_init)
    assert main(["train", *CLI_FAST[:-3], "3", *flags, "--output-dir", out, "--resume"]) == 0
    assert main(["eval", "--model", "tiny-llama", "--adapter", str(Path(out) / "adapter"), "--eval-samples", "0",
                 "--data", str(_one_record(tmp_path))]) == 0


def _one_record(tmp_path: Path) -> Path:
    file = tmp_path / "eval.jsonl"
    file.write_text('{"prompt": "2024-03-07", "completion": "07 MAR 2024 / Q1"}\n')
    return file


@pytest.mark.usefixtures("_cache")
@pytest.mark.parametrize("flags, message", [
    (["--init", "loftq"], "--init loftq quantizes the adapted layers to NF4: add --quantize nf4"),
    (["--init", "olora", "--method", "vera"], "--init olora initialises LoRA factors; VeRA has none"),
    (["--pissa-niter", "3"], "--pissa-niter goes with --init pissa"),
])
def test_cli_init_errors(flags: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lorakit.cli import main

    assert main(["train", *CLI_FAST, *flags, "--output-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"lorakit: error: {message}"


def test_combining_refuses_adapters_counted_from_their_init() -> None:
    model = lorakit.adapt(tiny_llama(), _config("llama", "pissa"))
    with pytest.raises(ValueError, match="initialised from the base weight"):
        lorakit.combine_adapters(model, ["default"], [1.0], "cat", new_name="mix")


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_unload_gives_back_the_original_weights(init: str) -> None:
    base = tiny_llama()
    model = lorakit.adapt(copy.deepcopy(base), _config("llama", init))
    randomize_adapters(model, scale=0.05)
    plain = lorakit.unload(model)
    for name, param in base.named_parameters():
        assert torch.allclose(plain.get_parameter(name), param, atol=1e-6), name

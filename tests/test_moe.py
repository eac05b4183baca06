"""LoRA on raw parameters (`target_parameters`): the fused experts of tiny random Mixtral, Qwen3-MoE and gpt-oss
(whose experts are stored transposed) against a float64 oracle and in round trips with PEFT."""

from __future__ import annotations

import copy
from pathlib import Path

import peft
import pytest
import torch
from conftest import randomize_adapters, train_lm
from torch.func import functional_call
from transformers import (
    GptOssConfig,
    GptOssForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    PreTrainedModel,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

import lorakit

SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 64,
             "max_position_embeddings": 64}


def tiny_mixtral() -> MixtralForCausalLM:
    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
                                            **SMALL)).eval()


def tiny_qwen3_moe() -> Qwen3MoeForCausalLM:
    torch.manual_seed(0)
    return Qwen3MoeForCausalLM(Qwen3MoeConfig(intermediate_size=48, moe_intermediate_size=24, head_dim=8, num_experts=4,
                                              num_experts_per_tok=2, **SMALL)).eval()


def tiny_gpt_oss() -> GptOssForCausalLM:
    torch.manual_seed(0)
    return GptOssForCausalLM(GptOssConfig(intermediate_size=24, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
                                          **SMALL)).eval()


MODELS = {"mixtral": tiny_mixtral, "qwen3_moe": tiny_qwen3_moe, "gpt_oss": tiny_gpt_oss}
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
INPUT = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT).logits


def _options(**extra: object) -> dict[str, object]:
    return {"r": 2, "lora_alpha": 6, "target_modules": ["q_proj"], "target_parameters": EXPERTS, **extra}


def _float64(model: PreTrainedModel) -> PreTrainedModel:
    model.set_experts_implementation("eager")  # torch's grouped_mm has no float64 kernel
    return model.double()


def _oracle_weights(model: PreTrainedModel, trained: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """W + s·B_e·A_e per expert, written out from the saved factors (B_e: every E-th column of B)."""
    state = lorakit.adapter_state_dict(trained)
    weights = {}
    for layer in range(model.config.num_hidden_layers):
        experts = model.model.layers[layer].mlp.experts
        for name, nesting in (("gate_up_proj", ".base_layer"), ("down_proj", "")):
            w = getattr(experts, name).detach().to(dtype)
            a = state[f"base_model.model.model.layers.{layer}.mlp.experts{nesting}.lora_A.weight"].to(dtype)
            b = state[f"base_model.model.model.layers.{layer}.mlp.experts{nesting}.lora_B.weight"].to(dtype)
            e, r = w.shape[0], a.shape[0] // w.shape[0]
            delta = torch.stack([b[:, i::e] @ a[i * r:(i + 1) * r] for i in range(e)])  # [E, out, in]
            if getattr(experts, "is_transposed", False):
                delta = delta.transpose(-1, -2)
            weights[f"model.layers.{layer}.mlp.experts.{name}"] = w + 3.0 * delta  # s = 6 / 2
    return weights


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_outputs_against_a_float64_oracle(kind: str) -> None:
    base = _float64(MODELS[kind]())
    model = lorakit.adapt(copy.deepcopy(base), lorakit.LoraConfig(**_options(target_modules=None))).double()
    assert (_logits(model) - _logits(base)).abs().max().item() == 0  # B = 0: identity at init
    randomize_adapters(model, scale=0.1)
    oracle = functional_call(base, _oracle_weights(base, model, torch.float64), args=(), kwargs={"input_ids": INPUT})
    assert (_logits(model) - oracle.logits.detach()).abs().max().item() <= 1e-10


def test_gradients_against_a_float64_oracle() -> None:
    base = _float64(tiny_mixtral())
    model = lorakit.adapt(copy.deepcopy(base), lorakit.LoraConfig(**_options(target_modules=None))).double()
    randomize_adapters(model, scale=0.1)
    path = "model.layers.1.mlp.experts.down_proj"
    delta = model.get_submodule("model.layers.1.mlp.experts").parametrizations["down_proj"][0].adapters["default"].delta
    model(input_ids=INPUT).logits.square().mean().backward()
    a = delta.lora_A.detach().clone().requires_grad_(True)  # [E·r, in]
    b = delta.lora_B.detach().clone().requires_grad_(True)  # [out, r·E]
    weights = _oracle_weights(base, model, torch.float64)
    w = base.get_submodule("model.layers.1.mlp.experts").down_proj.detach()
    weights[path] = w + 3.0 * torch.stack([b[:, i::4] @ a[i * 2:(i + 1) * 2] for i in range(4)])
    functional_call(base, weights, args=(), kwargs={"input_ids": INPUT}).logits.square().mean().backward()
    assert torch.allclose(delta.lora_A.grad, a.grad, atol=1e-12)
    assert torch.allclose(delta.lora_B.grad, b.grad, atol=1e-12)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_lorakit_to_peft_and_back(kind: str, tmp_path: Path) -> None:
    model = lorakit.adapt(MODELS[kind](), lorakit.LoraConfig(**_options(rank_pattern={"down_proj": 3})))
    randomize_adapters(model, scale=0.1)
    expected = _logits(model)
    lorakit.save_adapter(model, tmp_path)
    assert (_logits(peft.PeftModel.from_pretrained(MODELS[kind](), tmp_path)) - expected).abs().max().item() <= 1e-5
    assert (_logits(lorakit.load_adapter(MODELS[kind](), tmp_path)) - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_peft_to_lorakit(kind: str, tmp_path: Path) -> None:
    peft_model = peft.get_peft_model(MODELS[kind](), peft.LoraConfig(**_options(target_modules=[])))
    randomize_adapters(peft_model, scale=0.1)
    expected = _logits(peft_model)
    peft_model.save_pretrained(tmp_path)
    model = lorakit.load_adapter(MODELS[kind](), tmp_path)
    assert (_logits(model) - expected).abs().max().item() <= 1e-5
    assert lorakit.trainable_parameters(model).trainable == sum(
        p.numel() for p in peft_model.parameters() if p.requires_grad)


def test_merge_unmerge_disable_delete_unload() -> None:
    base = tiny_qwen3_moe()
    plain = _logits(base)
    model = lorakit.adapt(copy.deepcopy(base), lorakit.LoraConfig(**_options()))
    randomize_adapters(model, scale=0.1)
    adapted = _logits(model)
    lorakit.merge(model)
    assert (_logits(model) - adapted).abs().max().item() <= 1e-5
    lorakit.unmerge(model)
    experts = model.model.layers[0].mlp.experts
    assert torch.allclose(experts.parametrizations["down_proj"].original, base.model.layers[0].mlp.experts.down_proj,
                          atol=1e-6)
    with lorakit.disable_adapters(model):
        assert (_logits(model) - plain).abs().max().item() <= 1e-6
    lorakit.adapt(model, lorakit.LoraConfig(**_options()), "second")  # a second adapter joins the same parameters
    assert len(experts.parametrizations["down_proj"]) == 1
    lorakit.set_adapter(model, "default")
    assert (_logits(model) - adapted).abs().max().item() <= 1e-6
    lorakit.delete_adapter(model, "second")
    merged = lorakit.merge_and_unload(copy.deepcopy(model))
    assert not hasattr(merged.model.layers[0].mlp.experts, "parametrizations")
    assert (_logits(merged) - adapted).abs().max().item() <= 1e-5
    lorakit.unload(model)
    assert isinstance(model.model.layers[0].mlp.experts.down_proj, torch.nn.Parameter)
    assert (_logits(model) - plain).abs().max().item() <= 1e-6  # merged and unmerged once: float32 rounding


def test_training_moves_only_the_adapters() -> None:
    model = lorakit.adapt(tiny_mixtral().train(), lorakit.LoraConfig(**_options(target_modules=None, lora_alpha=16)))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = train_lm(model, optimizer, INPUT, steps=8)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("options, message", [
    ({"lora_dropout": 0.1}, "lora_dropout, use_dora"),
    ({"use_dora": True}, "lora_dropout, use_dora"),
    ({"init_lora_weights": "pissa"}, "lora_dropout, use_dora"),
])
def test_options_that_cannot_apply_to_a_parameter(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        lorakit.LoraConfig(**_options(**options))


def test_a_target_that_matches_nothing_is_an_error() -> None:
    with pytest.raises(ValueError, match="matches no parameter"):
        lorakit.adapt(tiny_mixtral(), lorakit.LoraConfig(target_parameters=["mlp.experts.up_proj"]))


def test_cli_trains_experts_of_a_model_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from lorakit.cli import main
    from lorakit.models import byte_tokenizer

    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    directory = tmp_path / "gpt-oss"
    torch.manual_seed(0)
    config = GptOssConfig(intermediate_size=24, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
                          **{**SMALL, "vocab_size": 300, "num_hidden_layers": 1, "max_position_embeddings": 128})
    GptOssForCausalLM(config).save_pretrained(directory)  # gpt-oss checkpoints hold the experts fused
    byte_tokenizer().save_pretrained(directory)
    run = ["train", "--model", str(directory), "--batch-size", "2", "--builtin-train-size", "8", "--eval-samples",
           "0", "--targets", "q_proj", "--target-parameters", ",".join(EXPERTS),
           "--output-dir", str(tmp_path / "run")]
    assert main([*run, "--max-steps", "2"]) == 0
    assert main([*run, "--max-steps", "3", "--resume"]) == 0
    saved = lorakit.read_adapter_config(tmp_path / "run" / "adapter")
    assert saved.target_parameters == tuple(EXPERTS)
    base = GptOssForCausalLM.from_pretrained(directory)
    assert isinstance(peft.PeftModel.from_pretrained(base, tmp_path / "run" / "adapter"), peft.PeftModel)
    assert main([*run, "--method", "vera"]) == 2
    assert "VeRA adapts linear layers only" in capsys.readouterr().err


def test_a_mixed_batch_refuses_adapters_on_parameters() -> None:
    model = lorakit.adapt(tiny_mixtral(), lorakit.LoraConfig(**_options()))
    with pytest.raises(ValueError, match="cannot route them per sample"), lorakit.mixed_batch(model, ["default"] * 2):
        pass

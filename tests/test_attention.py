"""Size-aware attention: eager for small score matrices on the CPU, SDPA for large ones, each the same function of the
inputs as the model's own attention (its SDPA in float64 is the oracle), with padding, gradients and generation."""

from __future__ import annotations

import sys
from collections.abc import Callable

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from torch import nn

from lorakit.models import attention
from lorakit.models.attention import IMPLEMENTATION, size_aware_attention
from lorakit.training.setup import choose_attention

MODELS: dict[str, Callable[[], nn.Module]] = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def batch() -> dict[str, torch.Tensor]:
    """Right padding on one row, left padding on another: masks that are neither none nor purely causal."""
    ids = torch.randint(3, 128, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[2, :4] = 0
    return {"input_ids": ids, "attention_mask": mask}


def logits_and_grads(model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad()
    logits = model(**inputs).logits  # [batch, seq, vocab]
    keep = inputs["attention_mask"].bool()
    (logits[keep].sin().sum()).backward()
    return logits[keep].detach().double(), [p.grad.double() for p in model.parameters() if p.grad is not None]


def spy_on_eager(model: nn.Module, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count calls of the eager attention of `model`'s modeling file."""
    module = sys.modules[type(model).__module__]
    calls: list[int] = []
    eager = module.eager_attention_forward

    def counted(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return eager(*args, **kwargs)

    monkeypatch.setattr(module, "eager_attention_forward", counted)
    return calls


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("small", [True, False])
def test_size_aware_attention_matches_the_float64_oracle(name: str, small: bool,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    oracle = MODELS[name]().double()  # the model's own SDPA, in float64
    expected, expected_grads = logits_and_grads(oracle, batch())

    model = MODELS[name]()
    assert size_aware_attention(model) and model.config._attn_implementation == IMPLEMENTATION
    monkeypatch.setattr(attention, "EAGER_MAX_SCORES", 1 << 20 if small else 0)
    calls = spy_on_eager(model, monkeypatch)
    got, grads = logits_and_grads(model, batch())

    assert bool(calls) == small  # small calls take eager, large ones SDPA
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert len(grads) == len(expected_grads)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-3)  # float32 sums over the batch


def test_the_eager_branch_of_a_bfloat16_model_computes_in_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a bfloat16 model, small calls are as accurate as the model's SDPA (which accumulates in float32) against
    a float64 oracle, where the model file's eager attention in bfloat16 rounds scores and probabilities; the
    output and its gradients stay bfloat16."""
    model = tiny_llama().to(torch.bfloat16)
    size_aware_attention(model)
    module = model.model.layers[0].self_attn
    eager = sys.modules[type(module).__module__].eager_attention_forward
    generator = torch.Generator().manual_seed(0)
    head_dim, kv_heads = module.head_dim, model.config.num_key_value_heads
    query = (3 * torch.randn(4, model.config.num_attention_heads, 32, head_dim, generator=generator)).bfloat16()
    key, value = (torch.randn(4, kv_heads, 32, head_dim, generator=generator).bfloat16() for _ in range(2))
    mask = torch.triu(torch.full((32, 32), torch.finfo(torch.bfloat16).min), 1)[None, None].bfloat16()  # causal
    scaling = head_dim ** -0.5
    expected = eager(module, query.double(), key.double(), value.double(), mask.double(), scaling=scaling)[0]

    def error(out: torch.Tensor) -> float:
        return (out.double() - expected).abs().mean().item()

    calls = spy_on_eager(model, monkeypatch)
    query.requires_grad_(True)
    got = attention._attention(module, query, key, value, mask, scaling=scaling)[0]
    assert calls and got.dtype == torch.bfloat16
    got.sum().backward()
    assert query.grad.dtype == torch.bfloat16
    with torch.no_grad():
        sdpa = attention.sdpa_attention_forward(module, query, key, value, mask, scaling=scaling)[0]
        plain = eager(module, query, key, value, mask, scaling=scaling)[0]
    assert error(got) <= 1.1 * error(sdpa) < error(plain)


def test_the_limit_counts_score_elements_per_call(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_llama()
    size_aware_attention(model)
    calls = spy_on_eager(model, monkeypatch)
    inputs = batch()  # 3 rows × 4 heads × 12 × 12 score elements per layer
    monkeypatch.setattr(attention, "EAGER_MAX_SCORES", 3 * 4 * 12 * 12)
    model(**inputs)
    assert len(calls) == 2  # both layers
    monkeypatch.setattr(attention, "EAGER_MAX_SCORES", 3 * 4 * 12 * 12 - 1)
    model(**inputs)
    assert len(calls) == 2


@pytest.mark.parametrize("small", [True, False])
def test_generation_is_unchanged(small: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    inputs = batch()
    expected = tiny_llama().generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=0)
    model = tiny_llama()
    size_aware_attention(model)
    monkeypatch.setattr(attention, "EAGER_MAX_SCORES", 1 << 20 if small else 0)
    got = model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(got, expected)


def test_only_sdpa_models_on_the_cpu_are_switched() -> None:
    model = tiny_llama()
    model.set_attn_implementation("eager")
    assert not size_aware_attention(model)  # the user's own choice stays
    assert model.config._attn_implementation == "eager"
    model = tiny_llama()
    choose_attention(model, "auto", torch.device("cuda"))  # nothing moves: only the name is set
    assert model.config._attn_implementation == "sdpa"
    choose_attention(model, "auto", torch.device("cpu"))
    assert model.config._attn_implementation == IMPLEMENTATION


def test_an_explicit_implementation_is_taken_and_a_wrong_one_named() -> None:
    model = tiny_llama()
    choose_attention(model, "eager", torch.device("cpu"))
    assert model.config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="--attn-implementation eagr: .*eager"):
        choose_attention(model, "eagr", torch.device("cpu"))

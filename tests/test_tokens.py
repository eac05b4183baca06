"""Trainable tokens (`trainable_token_indices`) and LoRA on nn.Embedding: float64 oracles of the effective tables,
gradients only on chosen rows, tied heads, round trips with PEFT, merging, and `--add-tokens` end to end."""

from __future__ import annotations

import copy
from pathlib import Path

import peft
import pytest
import torch
from conftest import model_input, model_output, randomize_adapters, tiny_gpt2, tiny_llama
from test_init import tiny_qwen2
from torch.func import functional_call

import lorakit
from lorakit.adapters.tokens import add_tokens
from lorakit.models import byte_tokenizer

MODELS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gpt2": tiny_gpt2}
EMBEDDING = {"llama": "model.embed_tokens", "qwen2": "model.embed_tokens", "gpt2": "transformer.wte"}
TOKENS = [3, 5, 7, 100]


def _logits(model: torch.nn.Module, kind: str) -> torch.Tensor:
    with torch.no_grad():
        return model_output(model, kind, model_input(kind))


def _oracle(base: torch.nn.Module, kind: str, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """The base model run with some weights replaced (ties left alone: only the named tensors change)."""
    inputs = model_input(kind)
    return functional_call(base, weights, args=(), kwargs=inputs, tie_weights=False).logits.detach()


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_trainable_tokens_against_a_float64_oracle(kind: str) -> None:
    base = MODELS[kind]().double()
    model = lorakit.adapt(copy.deepcopy(base), lorakit.LoraConfig(target_modules=None, trainable_token_indices=TOKENS))
    model.double()
    assert (_logits(model, kind) - _logits(base, kind)).abs().max().item() == 0
    randomize_adapters(model, scale=0.1)
    values = lorakit.adapter_state_dict(model)[f"base_model.model.{EMBEDDING[kind]}.token_adapter.trainable_tokens_delta"]
    table = base.get_submodule(EMBEDDING[kind]).weight.detach().clone()
    table[TOKENS] = values.double()
    weights = {f"{EMBEDDING[kind]}.weight": table}
    if kind == "gpt2":  # tied: the output head reads the same rows
        weights["lm_head.weight"] = table
    assert (_logits(model, kind) - _oracle(base, kind, weights)).abs().max().item() <= 1e-10


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_embedding_lora_against_a_float64_oracle(kind: str) -> None:
    base = MODELS[kind]().double()
    name = EMBEDDING[kind].rsplit(".", 1)[1]
    model = lorakit.adapt(copy.deepcopy(base), lorakit.LoraConfig(r=3, lora_alpha=6, target_modules=[name])).double()
    assert (_logits(model, kind) - _logits(base, kind)).abs().max().item() == 0  # A = 0 at init
    randomize_adapters(model, scale=0.1)
    state = lorakit.adapter_state_dict(model)
    a = state[f"base_model.model.{EMBEDDING[kind]}.lora_embedding_A"]  # [r, num]
    b = state[f"base_model.model.{EMBEDDING[kind]}.lora_embedding_B"]  # [dim, r]
    table = base.get_submodule(EMBEDDING[kind]).weight.detach() + 2.0 * (b @ a).T
    weights = {f"{EMBEDDING[kind]}.weight": table}  # a tied head keeps the original table
    assert (_logits(model, kind) - _oracle(base, kind, weights)).abs().max().item() <= 1e-10


def test_only_the_chosen_rows_train() -> None:
    model = lorakit.adapt(tiny_gpt2().train(), lorakit.LoraConfig(target_modules=None, trainable_token_indices=TOKENS))
    table = model.transformer.wte.base_layer.weight
    before = table.detach().clone()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert [tuple(p.shape) for p in trainable] == [(4, 48)]
    optimizer = torch.optim.SGD(trainable, lr=1.0)
    ids = torch.tensor([[3, 9, 5, 11, 100, 7]])
    model(input_ids=ids, labels=ids).loss.backward()
    assert trainable[0].grad.abs().sum(1).min() > 0  # every chosen row is used (as input or output)
    optimizer.step()
    assert torch.equal(table, before)  # the frozen table never changes
    effective = lorakit.merge_and_unload(model).transformer.wte.weight
    changed = (effective != before).any(1).nonzero().flatten().tolist()
    assert changed == TOKENS


CASES = {
    "llama-list": ("llama", {"target_modules": ["q_proj"], "trainable_token_indices": TOKENS}),
    "llama-dict-head": ("llama", {"target_modules": ["q_proj"],
                                  "trainable_token_indices": {"embed_tokens": TOKENS, "lm_head": [5, 9]}}),
    "qwen2-list": ("qwen2", {"target_modules": ["v_proj"], "trainable_token_indices": TOKENS}),
    "gpt2-tied": ("gpt2", {"target_modules": ["c_attn"], "trainable_token_indices": TOKENS}),
    "llama-embedding-lora": ("llama", {"target_modules": ["embed_tokens", "q_proj"], "lora_alpha": 16}),
    "gpt2-embedding-lora": ("gpt2", {"target_modules": ["wte", "c_fc"], "lora_alpha": 16}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_lorakit_to_peft(case: str, tmp_path: Path) -> None:
    kind, options = CASES[case]
    model = lorakit.adapt(MODELS[kind](), lorakit.LoraConfig(r=2, **options))
    randomize_adapters(model, scale=0.1)
    expected = _logits(model, kind)
    lorakit.save_adapter(model, tmp_path)
    assert (_logits(peft.PeftModel.from_pretrained(MODELS[kind](), tmp_path), kind) - expected).abs().max() <= 1e-5
    assert (_logits(lorakit.load_adapter(MODELS[kind](), tmp_path), kind) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_to_lorakit(case: str, tmp_path: Path) -> None:
    kind, options = CASES[case]
    peft_model = peft.get_peft_model(MODELS[kind](), peft.LoraConfig(r=2, **options))
    randomize_adapters(peft_model, scale=0.1)
    expected = _logits(peft_model, kind)
    peft_model.save_pretrained(tmp_path)
    model = lorakit.load_adapter(MODELS[kind](), tmp_path)
    assert (_logits(model, kind) - expected).abs().max().item() <= 1e-5
    assert lorakit.trainable_parameters(model).trainable == sum(
        p.numel() for p in peft_model.parameters() if p.requires_grad)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_merge_unmerge_and_disable(kind: str) -> None:
    base = MODELS[kind]()
    model = lorakit.adapt(copy.deepcopy(base), lorakit.LoraConfig(r=2, target_modules=None, trainable_token_indices=TOKENS))
    randomize_adapters(model, scale=0.1)
    expected = _logits(model, kind)
    lorakit.merge(model)
    assert (_logits(model, kind) - expected).abs().max().item() <= 1e-5
    lorakit.unmerge(model)
    assert torch.equal(model.get_submodule(EMBEDDING[kind]).base_layer.weight, base.get_submodule(EMBEDDING[kind]).weight)
    with lorakit.disable_adapters(model):
        assert (_logits(model, kind) - _logits(base, kind)).abs().max().item() == 0
    assert (_logits(lorakit.merge_and_unload(model), kind) - expected).abs().max().item() <= 1e-5


def test_a_lora_embedding_tied_to_the_head_is_untied_when_merged() -> None:
    model = lorakit.adapt(tiny_gpt2(), lorakit.LoraConfig(r=2, target_modules=["wte"]))
    randomize_adapters(model, scale=0.1)
    expected = _logits(model, "gpt2")
    with pytest.raises(ValueError, match="tied embeddings"):
        lorakit.merge(model)
    merged = lorakit.merge_and_unload(model)
    assert merged.lm_head.weight is not merged.transformer.wte.weight
    assert (_logits(merged, "gpt2") - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("options, message", [
    ({"trainable_token_indices": [500]}, r"ids must lie in \[0, 128\)"),
    ({"trainable_token_indices": {"nothing": [1]}}, "no module matches 'nothing'"),
    ({"target_modules": ["embed_tokens"], "trainable_token_indices": [1]}, "in target_modules and in trainable_token"),
    ({"target_modules": ["embed_tokens"], "use_dora": True}, "use_dora and LoftQ apply to linear layers only"),
])
def test_bad_token_options(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        lorakit.adapt(tiny_llama(), lorakit.LoraConfig(**{"target_modules": None, **options}))


def test_all_linear_leaves_embeddings_alone() -> None:
    model = lorakit.adapt(tiny_llama(), lorakit.LoraConfig(target_modules="all-linear", trainable_token_indices=[3]))
    lorakit.adapt(model, lorakit.LoraConfig(target_modules="all-linear"), "second")
    assert "second" not in model.model.embed_tokens.adapters and "second" not in model.lm_head.__dict__.get("adapters", {})


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_add_tokens_grows_the_vocabulary_and_names_the_rows(kind: str) -> None:
    model, tokenizer = MODELS[kind](), byte_tokenizer()
    model.resize_token_embeddings(len(tokenizer))
    spec = add_tokens(model, tokenizer, ["<date>", "</date>"])
    ids = tuple(tokenizer.convert_tokens_to_ids(["<date>", "</date>"]))
    assert model.get_input_embeddings().num_embeddings == len(tokenizer) == max(ids) + 1
    head = {} if kind == "gpt2" else {"lm_head": ids}  # GPT-2's head is tied: its rows are the embedding's
    assert spec == {EMBEDDING[kind]: ids, **head}


def test_cli_add_tokens_trains_saves_and_reloads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lorakit.cli import main
    from lorakit.models import load_model

    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    run = ["train", "--model", "tiny-llama", "--batch-size", "4", "--builtin-train-size", "16", "--eval-samples", "0",
           "--add-tokens", "<q>,</q>", "--output-dir", str(out)]
    assert main([*run, "--max-steps", "2", "--save-every", "1"]) == 0
    assert main([*run, "--max-steps", "3", "--resume"]) == 0
    config = lorakit.read_adapter_config(out / "adapter")
    trained, _ = load_model("tiny-llama")
    tied = trained.lm_head.weight is trained.model.embed_tokens.weight
    assert set(config.trainable_token_indices) == {"model.embed_tokens"} | (set() if tied else {"lm_head"})
    before = trained.get_input_embeddings().num_embeddings
    lorakit.load_adapter(trained, out / "adapter")
    assert trained.model.embed_tokens.base_layer.num_embeddings == before + 2
    assert main(["eval", "--model", "tiny-llama", "--adapter", str(out / "adapter"), "--eval-samples", "0",
                 "--data", str(_record(tmp_path))]) == 0


def _record(tmp_path: Path) -> Path:
    file = tmp_path / "eval.jsonl"
    file.write_text('{"prompt": "2024-03-07", "completion": "07 MAR 2024 / Q1"}\n')
    return file


def test_combining_refuses_token_rows() -> None:
    model = lorakit.adapt(tiny_llama(), lorakit.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[3]))
    with pytest.raises(ValueError, match="parameters or token rows"):
        lorakit.combine_adapters(model, ["default"], [1.0], "cat", new_name="mix")

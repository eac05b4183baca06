"""AdaLoRA: the SVD-form update against a float64 oracle, the budget schedule, the allocator and the orthogonality
penalty step for step against PEFT's own AdaLoRA, pruned adapters in round trips with PEFT, and the CLI."""

from __future__ import annotations

import copy
from pathlib import Path

import peft
import pytest
import torch
from conftest import model_input, randomize_adapters, tiny_gpt2, tiny_llama

import lorakit
from lorakit.adapters.adalora import RankAllocator

OPTIONS = {"init_r": 4, "target_r": 2, "total_step": 10, "tinit": 2, "tfinal": 2, "lora_alpha": 8,
           "target_modules": ["q_proj", "v_proj", "down_proj"]}
INPUT = model_input("llama")["input_ids"]


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT).logits


def test_update_against_a_float64_oracle() -> None:
    base = tiny_llama().double()
    model = lorakit.adapt(copy.deepcopy(base), lorakit.AdaLoraConfig(**OPTIONS)).double()
    assert (_logits(model) - _logits(base)).abs().max().item() == 0  # Λ = 0 at init
    randomize_adapters(model, scale=0.1)
    layer = model.model.layers[1].mlp.down_proj
    delta = layer.adapters["default"].delta
    x = torch.randn(3, 96, dtype=torch.float64)
    w = base.model.layers[1].mlp.down_proj.weight.detach()
    p, lam, q = delta.lora_B.detach(), delta.lora_E.detach(), delta.lora_A.detach()
    expected = x @ (w + 8 / (4 + 1e-5) * p @ torch.diag(lam[:, 0]) @ q).T  # s·P·Λ·Q / r₀
    assert (layer(x) - expected).abs().max().item() <= 1e-12


def test_budget_schedule_is_cubic() -> None:
    model = lorakit.adapt(tiny_llama(), lorakit.AdaLoraConfig(**{**OPTIONS, "total_step": 22, "tfinal": 4}))
    allocator = RankAllocator(model)
    initial, target = 4 * 6, 2 * 6
    assert (allocator.initial_budget, allocator.target_budget) == (initial, target)
    assert allocator.budget(2) == (initial, False)
    for step in range(3, 18):
        left = 1 - (step - 2) / (22 - 4 - 2)
        assert allocator.budget(step)[0] == int((initial - target) * left**3 + target)
    assert allocator.budget(19) == (target, True)


def _train(model: torch.nn.Module, step_fn: object, steps: int = 10) -> list[float]:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    losses = []
    for step in range(steps):
        loss = step_fn(model)
        loss.backward()
        optimizer.step()
        step_fn.allocate(step)
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_allocation_matches_peft_step_for_step(tmp_path: Path) -> None:
    # CAUSAL_LM: PEFT adds the orthogonality penalty in AdaLoraModel.forward, which only that task type calls
    peft_model = peft.get_peft_model(tiny_llama(), peft.AdaLoraConfig(**OPTIONS, task_type="CAUSAL_LM"))
    randomize_adapters(peft_model, scale=0.05)  # Λ ≠ 0, so every triplet has a gradient
    peft_model.save_pretrained(tmp_path)
    ours = lorakit.load_adapter(tiny_llama(), tmp_path)
    allocator = RankAllocator(ours)

    class PeftStep:
        def __call__(self, model: torch.nn.Module) -> torch.Tensor:
            return model(input_ids=INPUT, labels=INPUT).loss  # PEFT adds the penalty itself

        def allocate(self, step: int) -> None:
            peft_model.base_model.update_and_allocate(step)

    class OurStep:
        def __call__(self, model: torch.nn.Module) -> torch.Tensor:
            return model(input_ids=INPUT, labels=INPUT).loss + allocator.orthogonal_penalty()

        def allocate(self, step: int) -> None:
            allocator.update_and_allocate(step)

    peft_losses = _train(peft_model, PeftStep())
    our_losses = _train(ours, OurStep())
    assert our_losses == pytest.approx(peft_losses, abs=1e-5)
    theirs = peft_model.peft_config["default"].rank_pattern
    theirs = {key.replace(".default", ""): value for key, value in theirs.items()}
    assert lorakit.adapter_configs(ours)["default"].rank_pattern == theirs
    assert (_logits(ours) - _logits(peft_model)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_pruned_adapter_round_trips_with_peft(kind: str, tmp_path: Path) -> None:
    builder = {"llama": tiny_llama, "gpt2": tiny_gpt2}[kind]
    options = OPTIONS if kind == "llama" else {**OPTIONS, "target_modules": ["c_attn", "c_fc"]}
    model = lorakit.adapt(builder(), lorakit.AdaLoraConfig(**options))
    randomize_adapters(model, scale=0.05)
    allocator = RankAllocator(model)
    for step in range(10):
        (model(input_ids=INPUT, labels=INPUT).loss + allocator.orthogonal_penalty()).backward()
        allocator.update_and_allocate(step)
        model.zero_grad()
    expected = _logits(model)
    lorakit.save_adapter(model, tmp_path)
    config = lorakit.read_adapter_config(tmp_path)
    assert sum(sum(mask) for mask in config.rank_pattern.values()) == allocator.target_budget
    assert (_logits(peft.PeftModel.from_pretrained(builder(), tmp_path)) - expected).abs().max().item() <= 1e-5
    assert (_logits(lorakit.load_adapter(builder(), tmp_path)) - expected).abs().max().item() <= 1e-5
    kept = lorakit.trainable_parameters(lorakit.load_adapter(builder(), tmp_path)).trainable
    assert kept < lorakit.trainable_parameters(model).trainable


def test_peft_to_lorakit_after_peft_pruned(tmp_path: Path) -> None:
    peft_model = peft.get_peft_model(tiny_llama(), peft.AdaLoraConfig(**OPTIONS))
    randomize_adapters(peft_model, scale=0.05)
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    for step in range(10):
        peft_model(input_ids=INPUT, labels=INPUT).loss.backward()
        optimizer.step()
        peft_model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    peft_model.save_pretrained(tmp_path)
    assert (_logits(lorakit.load_adapter(tiny_llama(), tmp_path)) - _logits(peft_model)).abs().max().item() <= 1e-5


def test_merge_and_orthogonality_penalty() -> None:
    model = lorakit.adapt(tiny_llama(), lorakit.AdaLoraConfig(**OPTIONS))
    randomize_adapters(model, scale=0.05)
    expected = _logits(model)
    assert (_logits(lorakit.merge_and_unload(copy.deepcopy(model))) - expected).abs().max().item() <= 1e-5
    allocator = RankAllocator(model)
    deltas = list(allocator.deltas.values())
    manual = torch.stack([torch.linalg.matrix_norm(m - torch.eye(4)) for d in deltas
                          for m in (d.lora_A @ d.lora_A.T, d.lora_B.T @ d.lora_B)]).mean() * 0.5
    assert torch.allclose(allocator.orthogonal_penalty(), manual)


@pytest.mark.parametrize("options, message", [
    ({"target_r": 5}, "0 < target_r <= init_r"),
    ({"tinit": 8}, "leave no budgeting phase"),
    ({"beta1": 1.0}, r"beta1 must be a finite number in \(0, 1\)"),
    ({"use_dora": True}, "do not apply"),
])
def test_bad_options(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        lorakit.AdaLoraConfig(**{**OPTIONS, **options})


def test_allocator_needs_an_adalora_adapter_and_total_step() -> None:
    with pytest.raises(ValueError, match="not an AdaLoRA adapter"):
        RankAllocator(lorakit.adapt(tiny_llama(), lorakit.LoraConfig(target_modules=["q_proj"])))
    model = lorakit.adapt(tiny_llama(), lorakit.AdaLoraConfig(**{**OPTIONS, "total_step": None}))
    with pytest.raises(ValueError, match="needs total_step"):
        RankAllocator(model)
    assert RankAllocator(model, total_step=10).config.total_step == 10


def test_cli_method_adalora(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lorakit.cli import main

    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert main(["train", "--model", "tiny-llama", "--batch-size", "4", "--builtin-train-size", "16",
                 "--eval-samples", "0", "--max-steps", "6", "--method", "adalora", "--rank", "4", "--target-r", "2",
                 "--adalora-tinit", "1", "--adalora-tfinal", "1", "--output-dir", str(out)]) == 0
    config = lorakit.read_adapter_config(out / "adapter")
    assert isinstance(config, lorakit.AdaLoraConfig) and config.total_step == 6
    assert sum(sum(mask) for mask in config.rank_pattern.values()) == 2 * len(config.rank_pattern)
    assert isinstance(peft.PeftModel.from_pretrained(lorakit.load_model("tiny-llama")[0], out / "adapter"),
                      peft.PeftModel)


def test_cli_adalora_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lorakit.cli import main

    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    run = ["train", "--model", "tiny-llama", "--batch-size", "4", "--builtin-train-size", "16", "--eval-samples", "0",
           "--method", "adalora", "--rank", "4", "--adalora-tinit", "1", "--adalora-tfinal", "2", "--save-every", "1",
           "--output-dir", str(tmp_path / "run")]
    assert main([*run, "--max-steps", "5"]) == 0
    assert main([*run, "--max-steps", "6", "--resume"]) == 0
    config = lorakit.read_adapter_config(tmp_path / "run" / "adapter")
    assert sum(sum(mask) for mask in config.rank_pattern.values()) == 2 * len(config.rank_pattern)

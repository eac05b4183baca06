"""Tiny models built from configs (no files, no network) shared by the tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.utils import logging

logging.set_verbosity_error()


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=48, n_layer=2, n_head=4, vocab_size=128, n_positions=64, bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(config).eval()


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(12, 20)
        self.act = nn.GELU()
        self.down = nn.Linear(20, 7, bias=False)
        self.head = nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.down(self.act(self.up(x))))


def tiny_mlp(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP().eval()


BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "mlp": tiny_mlp}


def model_input(kind: str, batch: int = 2, seq: int = 10, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        return {"x": torch.randn(batch, seq, 12, generator=generator)}
    return {"input_ids": torch.randint(3, 128, (batch, seq), generator=generator)}


def model_output(model: nn.Module, kind: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**inputs)
    return out if kind == "mlp" else out.logits


def train_lm(model: nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor, steps: int) -> list[float]:
    """`steps` optimizer steps of the language-model loss on `ids` (labels = inputs); the loss of each."""
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def randomize_adapters(model: nn.Module, seed: int = 3, scale: float = 0.2) -> None:
    """Move every adapter tensor away from its (identity) init."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator).to(param) * scale)


@pytest.fixture(params=["llama", "gpt2", "mlp"])
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


class Holder(nn.Module):
    """A model of one layer called `proj`."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.proj = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def outputs_across_merging(model: nn.Module, kind: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Outputs unmerged, merged, unmerged again, and after merge_and_unload of a copy."""
    import copy

    import lorakit

    with torch.no_grad():
        unmerged = model_output(model, kind, inputs)
        lorakit.merge(model)
        merged = model_output(model, kind, inputs)
        lorakit.unmerge(model)
        again = model_output(model, kind, inputs)
        plain = model_output(lorakit.merge_and_unload(copy.deepcopy(model)), kind, inputs)
    return {"unmerged": unmerged, "merged": merged, "unmerged_again": again, "merge_and_unload": plain}


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The fuzz suite's case counts per surface (and LORAKIT_FUZZ_REPORT, a JSON file of them, when set)."""
    import json
    import os
    import sys

    fuzzing = sys.modules.get("fuzzing")
    if fuzzing is None or not fuzzing.CASES:
        return
    cases = dict(sorted(fuzzing.CASES.items()))
    terminalreporter.write_line(f"fuzz cases: {sum(cases.values())} ({', '.join(f'{k} {v}' for k, v in cases.items())})")
    if report := os.environ.get("LORAKIT_FUZZ_REPORT"):
        with open(report, "w") as file:
            json.dump({"profile": os.environ.get("LORAKIT_FUZZ", "fast"), "cases": cases}, file, indent=1)

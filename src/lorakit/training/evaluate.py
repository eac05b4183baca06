"""Evaluation: mean token loss, perplexity = exp(loss), and exact match of greedy generations against references."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from .data import Example, collate
from .loss import loss_token_count, summed_token_loss
from .task import exact_match


@torch.no_grad()
def evaluate_loss(model: nn.Module, examples: Sequence[Example], batch_size: int, pad_id: int,
                  autocast_dtype: torch.dtype | None = None) -> dict[str, float]:
    """Token-weighted mean loss over `examples` (labels IGNORE_INDEX excluded) and its perplexity."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start:start + batch_size], pad_id).items()}
        with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            total += summed_token_loss(model, batch).item()
        count += loss_token_count(batch)
    model.train(was_training)
    loss = total / max(count, 1)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}


@torch.no_grad()
def generate_batch(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[list[int]],
                   max_new_tokens: int, **generate_kwargs: Any) -> list[str]:
    """Greedy (or sampled, via kwargs) continuations of token-id prompts, left-padded into one batch."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], device=device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    generate_kwargs.setdefault("do_sample", False)
    output = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                            pad_token_id=pad, **generate_kwargs)
    return tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)


def evaluate_exact_match(model: nn.Module, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example],
                         batch_size: int = 16, max_new_tokens: int | None = None) -> dict[str, Any]:
    """Share of examples whose greedy answer equals the reference (whitespace-normalized), with a few samples."""
    scored = [e for e in examples if "prompt_ids" in e and "answer" in e]
    if not scored:
        return {}
    was_training = model.training
    model.eval()
    if max_new_tokens is None:
        max_new_tokens = max(len(tokenizer(e["answer"])["input_ids"]) for e in scored) + 4
    hits, samples = 0, []
    for start in range(0, len(scored), batch_size):
        chunk = scored[start:start + batch_size]
        predictions = generate_batch(model, tokenizer, [e["prompt_ids"] for e in chunk], max_new_tokens)
        for example, prediction in zip(chunk, predictions):
            hits += exact_match(prediction, example["answer"])
            if len(samples) < 3:
                samples.append({"answer": example["answer"], "prediction": prediction.strip()})
    model.train(was_training)
    return {"exact_match": hits / len(scored), "n_scored": len(scored), "samples": samples}

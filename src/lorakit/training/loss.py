"""The training loss: cross-entropy summed over the tokens that carry a label, computed only where a label is.

Token t predicts token t + 1, so logits are needed only at the positions t whose next label is not ignored. Prompt
tokens of prompt/completion and chat data carry no label; computing the output head (hidden × vocab per position)
and a vocab-wide softmax there is wasted work. Causal LMs of transformers take `logits_to_keep`, a 1-D index tensor
of positions applied to every row: the loss keeps the union of the batch's label positions, so the model's own head
(and any logit scaling or soft-capping it applies) computes exactly the logits the full forward would have given there.
Models without `logits_to_keep` compute all logits. The sum, divided by the global count of loss tokens, is the
per-token mean on one process and under DDP/FSDP alike (see distributed.py).
"""

from __future__ import annotations

import inspect

import torch.nn.functional as F
from torch import Tensor, nn

from .data import IGNORE_INDEX


def loss_token_count(batch: dict[str, Tensor]) -> int:
    """Tokens that carry loss: labels after the first position (token t predicts t + 1) that are not ignored."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def summed_token_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Cross-entropy summed over the batch's loss tokens, in float32: the numerator of a per-token mean."""
    targets = batch["labels"][:, 1:]  # [batch, seq - 1]: position t predicts t + 1
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if _takes_logits_to_keep(model):
        keep = (targets != IGNORE_INDEX).any(0).nonzero().squeeze(1)  # [k] positions with a label in some row
        logits = model(**inputs, logits_to_keep=keep).logits  # [batch, k, vocab]
        targets = targets[:, keep]  # [batch, k]
    else:
        logits = model(**inputs).logits[:, :-1]  # [batch, seq - 1, vocab]
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def _takes_logits_to_keep(model: nn.Module) -> bool:
    inner = getattr(model, "module", model)  # DDP keeps the model as .module
    return "logits_to_keep" in inspect.signature(inner.forward).parameters

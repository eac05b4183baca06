"""Attention for short sequences on the CPU: the model's own eager attention where its score matrix is small, SDPA
where it is large.

softmax(Q·Kᵀ·scale + mask)·V is computed either materialized (eager: the scores [batch, heads, q, k] in memory,
two batched matmuls) or tiled (SDPA's flash kernel, Dao et al. 2022: O(q + k) memory). On CPUs, torch's flash kernel
pays a fixed cost per call for its tiling buffers: measured on 2 cores for 9 heads of 64, batch × length = 240
tokens, forward plus backward of one attention call took 3.2–4.6 ms with SDPA and 0.8–1.3 ms eager at 30–64 tokens
(eager is also faster at 256 tokens, but keeps six bytes per score element for the backward, which at long lengths
costs more memory than the rest of the layer). Training short examples on a CPU spends a sixth of the step there.

`size_aware_attention(model)` registers one attention implementation with transformers that decides per call:
eager while batch·heads·q·k ≤ EAGER_MAX_SCORES and the tensors are on the CPU, SDPA otherwise. Eager is the model
file's own `eager_attention_forward` (which also keeps model-specific terms); a model file without one keeps SDPA.
Both read the same additive float mask (transformers' eager mask, which SDPA accepts), so each call's choice is free.
Only models that run SDPA are switched; any other implementation the user chose stays.

On a half-precision model the eager branch runs in float32 and rounds only its output, as SDPA's CPU kernel
accumulates in float32. A model file's eager attention rounds the scores Q·Kᵀ and the probabilities to bfloat16
(8-bit mantissa: a score of 20 moves by up to 0.06): for one SmolLM2-shaped call (9 heads of 64, 8 × 30 tokens,
causal), its mean error against float64 is 1.5–2.7× SDPA's, in float32 it is 0.9× SDPA's. The float32 branch costs
about 4% of a bfloat16 training step on short examples (528 vs 507 ms interleaved, built-in task), 1% on chat ones.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask

IMPLEMENTATION = "lorakit_size_aware"
EAGER_MAX_SCORES = 1 << 21  # score elements per call: 16 MiB kept for backward (the float32 probabilities)


def size_aware_attention(model: nn.Module) -> bool:
    """Switch a transformers model that runs SDPA to the size-aware implementation; True when it was switched."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(IMPLEMENTATION, _attention)
    AttentionMaskInterface.register(IMPLEMENTATION, eager_mask)
    model.set_attn_implementation(IMPLEMENTATION)
    return True


def _attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
               **kwargs: Any) -> tuple[Tensor, Tensor | None]:
    # query [batch, heads, q, head_dim]; key, value [batch, kv_heads, k, head_dim]
    batch, heads, q_len, _ = query.shape
    eager = _eager_of(module)
    if eager is not None and query.device.type == "cpu" and batch * heads * q_len * key.shape[2] <= EAGER_MAX_SCORES:
        if query.dtype not in (torch.float16, torch.bfloat16):
            return eager(module, query, key, value, attention_mask, **kwargs)
        out, weights = eager(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)
        return out.to(query.dtype), None if weights is None else weights.to(query.dtype)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _eager_of(module: nn.Module) -> Callable[..., tuple[Tensor, Tensor | None]] | None:
    """The eager attention function of the model file that defines `module`'s class."""
    return getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)

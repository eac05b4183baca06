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
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask

IMPLEMENTATION = "lorakit_size_aware"
EAGER_MAX_SCORES = 1 << 21  # score elements per call: 12 MiB kept for backward in bfloat16 (6 bytes each)


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
        return eager(module, query, key, value, attention_mask, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _eager_of(module: nn.Module) -> Callable[..., tuple[Tensor, Tensor | None]] | None:
    """The eager attention function of the model file that defines `module`'s class."""
    return getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)

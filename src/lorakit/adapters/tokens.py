"""Trainable tokens (PEFT's `trainable_token_indices`): train only chosen rows of an embedding table, e.g. the rows
of tokens just added to a tokenizer, and leave every other row frozen.

`trainable_token_indices=[ids]` names rows of the model's input embedding; `{"module": [ids], ...}` names rows of
any embedding (or output head) by module path or suffix. The rows are an adapter (`TrainableTokensDelta` in
`deltas.py`) on the layer, so switching, disabling, merging and saving work as for LoRA. When the output head shares
its weight with the input embedding (tied embeddings, e.g. GPT-2), the head gets the same rows
(`HeadTokensDelta`, shared): one set of parameters, saved once, as PEFT does. `add_tokens` extends a tokenizer
and the model's embeddings for new tokens and names their rows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from .config import LoraConfig
from .deltas import HeadTokensDelta, TrainableTokensDelta
from .layer import AdaptedLinear, Adapter
from .targets import matches, output_head_paths


def _embedding_path(model: nn.Module) -> str:
    get_input = getattr(model, "get_input_embeddings", None)
    embedding = get_input() if callable(get_input) else None
    paths = [name for name, module in model.named_modules() if module is embedding]
    if not paths:
        raise ValueError(f"trainable_token_indices as a list needs the model's input embedding, and "
                         f"{type(model).__name__} names none: give {{'<embedding module>': [ids]}}")
    return paths[0]


def _table(module: nn.Module) -> nn.Parameter:
    """The stored table [num, dim] of an embedding, or [vocab, dim] of an output head."""
    base = module.base_layer if isinstance(module, AdaptedLinear) else module
    if not isinstance(base, (nn.Embedding, nn.Linear)):
        raise ValueError(f"trainable_token_indices: {type(base).__name__} is not an embedding or a linear head")
    return base.weight


def token_targets(model: nn.Module, config: LoraConfig) -> dict[str, list[int]]:
    """Module path -> token ids, from the list or dict form of `trainable_token_indices`."""
    spec = config.trainable_token_indices
    if not isinstance(spec, dict):
        return {_embedding_path(model): list(spec)}
    out = {}
    for key, ids in spec.items():
        paths = [name for name, module in model.named_modules()
                 if name and matches(name, (key,)) and not name.endswith(".base_layer")]
        if not paths:
            raise ValueError(f"trainable_token_indices: no module matches {key!r}")
        out |= {path: list(ids) for path in paths}
    return out


def add_token_adapters(model: nn.Module, config: LoraConfig, adapter_name: str,
                       wrap: Callable[[nn.Module, str], AdaptedLinear]) -> None:
    """Add adapter `adapter_name`'s trainable rows to the modules `config` names (and a tied head)."""
    for path, ids in token_targets(model, config).items():
        table = _table(model.get_submodule(path))
        if not ids or min(ids) < 0 or max(ids) >= table.shape[0]:
            raise ValueError(f"trainable_token_indices for {path}: ids must lie in [0, {table.shape[0]}), got {ids}")
        layer = wrap(model, path)
        if adapter_name in layer.adapters:
            raise ValueError(f"{path} is in target_modules and in trainable_token_indices; choose one")
        tokens = TrainableTokensDelta(table, sorted(set(ids)))
        if isinstance(layer.base_layer, nn.Linear):  # an output head named directly
            layer.add_adapter(adapter_name, Adapter(HeadTokensDelta(tokens, shared=False), 1.0, 0.0))
            continue
        layer.add_adapter(adapter_name, Adapter(tokens, 1.0, 0.0))
        for head in output_head_paths(model):
            head_module = model.get_submodule(head)
            head_base = head_module.base_layer if isinstance(head_module, AdaptedLinear) else head_module
            if head != path and head_base.weight.data_ptr() == table.data_ptr():  # tied embeddings
                wrap(model, head).add_adapter(adapter_name, Adapter(HeadTokensDelta(tokens, shared=True), 1.0, 0.0))


def add_tokens(model: nn.Module, tokenizer: Any, tokens: list[str]) -> dict[str, tuple[int, ...]]:
    """Add `tokens` to the tokenizer, grow the model's embedding (and untied head) to match, and return the
    `trainable_token_indices` that train exactly their rows (the head's too when it is not tied)."""
    if not tokens:
        raise ValueError("no tokens to add")
    tokenizer.add_tokens(tokens)
    ids = tuple(tokenizer.convert_tokens_to_ids(tokens))
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))  # new rows drawn around the old rows' mean
    spec = {_embedding_path(model): ids}
    table = model.get_input_embeddings().weight
    for head in output_head_paths(model):
        if model.get_submodule(head).weight.data_ptr() != table.data_ptr():
            spec[head] = ids
    return spec

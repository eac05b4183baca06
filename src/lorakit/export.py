"""`lorakit export`: what lorakit trains, served by llama.cpp, Ollama and LM Studio (GGUF files).

- A GGUF LoRA adapter (default): per adapted weight the pair (A, B) with ΔW = s·B·A, named, reordered and scaled for
  llama.cpp (`formats/gguf.py`), for `llama-cli -m base.gguf --lora adapter.gguf` or Ollama's `ADAPTER`. LoRA with
  rsLoRA, rank_pattern and alpha_pattern, and VeRA, which is exactly the LoRA ΔW = (λ_b ⊙ B_s)·(λ_d ⊙ A_s). DoRA
  scales each output row by m / ‖W + s·B·A‖, a function of the base weight that no LoRA pair expresses: it is
  refused, pointing to the merged export; so are trained biases and modules_to_save, which llama.cpp adapters lack.
- A merged GGUF model (`merged=True`): the adapter merged into the float32 base (`merge_and_unload`; an adapter
  trained on an NF4 base merges into the dense base it was quantized from, never into 4-bit weights), written whole
  with hyperparameters, tokenizer and chat template. Without an adapter: the base alone, to put adapters on.

The base defaults to the one the adapter names (adapter_config.json's base_model_name_or_path).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .adapters.config import AdapterConfig, LoraConfig
from .adapters.deltas import LoRADelta, SVDDelta, VeRADelta
from .adapters.model import merge_and_unload
from .adapters.registry import adapted_layers
from .formats.gguf import LoraFactors, Metadata, architecture, write_lora_adapter, write_model
from .formats.gguf_vocab import copy_tokenizer, hf_tokenizer_metadata, with_added_tokens
from .formats.peft import PREFIX, load_adapter, read_adapter_config, read_adapter_tensors
from .models.builtin import RECIPE_FILE, smollm2_gguf_path
from .models.load import empty_model, load_model, read_config, resolve_model

LOW_RANK_DELTAS = (LoRADelta, SVDDelta, VeRADelta)  # linear layers' updates that are a LoRA pair (AdaLoRA's SVD too)
GGUF_SOURCES = {"smollm2-135m": smollm2_gguf_path}  # built-in bases that come from a GGUF file


def export_gguf(adapter: str | os.PathLike[str] | None, output: str | os.PathLike[str], *, model: str | None = None,
                merged: bool = False, outtype: str | None = None) -> Path:
    """Write `adapter` as a GGUF LoRA adapter for llama.cpp, or with `merged=True` the merged model as a GGUF model.

    `model`: the base (built-in name, local directory or hub id); default: the one the adapter names. `outtype`:
    f32, f16, bf16 (adapters; default f32) or also q8_0 (merged models; default f16). Returns the written path.
    """
    config = read_adapter_config(adapter) if adapter is not None else None
    if config is None and not merged:
        raise ValueError("exporting a GGUF LoRA adapter needs --adapter (only a merged export can be the base alone)")
    if config is None and model is None:
        raise ValueError("a merged export without --adapter converts the base alone: give it with --model")
    base = model or (config.base_model_name_or_path if config else None)
    if not base:
        raise ValueError(f"{adapter}: adapter_config.json names no base model; give it with --model")
    if model is None:
        try:
            resolve_model(base)
        except FileNotFoundError as error:
            raise FileNotFoundError(f"{error} (the base adapter_config.json names); give the base with --model") \
                from None
    if merged:
        return _export_merged(base, adapter, Path(output), outtype or "f16")
    return _export_lora(base, adapter, config, Path(output), outtype or "f32")


def _export_lora(base: str, adapter: str | os.PathLike[str], config: AdapterConfig, output: Path,
                 outtype: str) -> Path:
    _check_expressible(config)
    model_config = read_config(resolve_model(base))
    architecture(model_config)  # an unsupported model type is refused before anything loads
    # Only the adapter and the layers' shapes are needed: the base's weights are allocated, never read.
    skeleton = load_adapter(empty_model(model_config, torch.bfloat16).to_empty(device="cpu"), adapter)
    adapters = {path: layer.adapters["default"] for path, layer in adapted_layers(skeleton)
                if type(layer.adapters["default"].delta) in LOW_RANK_DELTAS}  # exact types: no embedding subclasses
    _check_covered(read_adapter_tensors(adapter), set(adapters))
    factors = [LoraFactors(path, *one.delta.factors(), one.scaling) for path, one in adapters.items()]
    alpha = float(config.lora_alpha if isinstance(config, LoraConfig) else config.r)
    return write_lora_adapter(output, model_config, factors, alpha, outtype, name=Path(adapter).name)


def _check_expressible(config: AdapterConfig) -> None:
    """Refuse what a llama.cpp LoRA adapter cannot hold, saying why and what to do instead."""
    if isinstance(config, LoraConfig) and config.use_dora:
        raise NotImplementedError(
            "DoRA cannot be exported as a llama.cpp LoRA adapter: it rescales each output row by m / ||W + s*B*A||, "
            "which depends on the base weight and is no low-rank update; export the merged model instead (--merged)")
    if config.bias != "none":
        raise NotImplementedError(f"the adapter trains biases (bias={config.bias!r}), which a llama.cpp LoRA adapter "
                                  "cannot hold; export the merged model instead (--merged)")
    if config.modules_to_save:
        raise NotImplementedError(f"the adapter trains whole modules ({list(config.modules_to_save)}), which a "
                                  "llama.cpp LoRA adapter cannot hold; export the merged model instead (--merged)")


def _check_covered(keys: Iterable[str], adapted: set[str]) -> None:
    """Every tensor of the adapter file belongs to an adapted linear layer (or is VeRA's shared pair): anything else
    (LoRA on embeddings, trainable tokens, expert parameters) has no place in a llama.cpp LoRA adapter."""
    for key in keys:
        parts = key.removeprefix(PREFIX).split(".")
        if key.startswith("base_model.vera_") or any(".".join(parts[:i]) in adapted for i in range(1, len(parts))):
            continue
        raise NotImplementedError(f"the adapter's tensor {key} is not a LoRA pair of a linear layer, which is all a "
                                  "llama.cpp LoRA adapter holds; export the merged model instead (--merged)")


def _export_merged(base: str, adapter: str | os.PathLike[str] | None, output: Path, outtype: str) -> Path:
    architecture(read_config(resolve_model(base)))
    model, tokenizer = load_model(base, dtype="float32")
    if adapter is not None:
        model = merge_and_unload(load_adapter(model, adapter), dtype=torch.float32)
    if adapter is not None and (Path(adapter) / "tokenizer_config.json").is_file():  # it trained new tokens
        tokenizer = AutoTokenizer.from_pretrained(adapter)
    metadata = _tokenizer_metadata(resolve_model(base), tokenizer, model.config.vocab_size)
    name = Path(adapter).name if adapter is not None else Path(base).name
    return write_model(output, model.config, model.state_dict().items(), metadata, outtype, name=name)


def _tokenizer_metadata(source: Path | str, tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> list[Metadata]:
    """A built-in base converted from a GGUF file keeps that file's tokenizer keys; others are converted."""
    recipe = Path(source) / RECIPE_FILE
    name = json.loads(recipe.read_text()).get("name") if isinstance(source, Path) and recipe.is_file() else None
    if name in GGUF_SOURCES:
        return with_added_tokens(copy_tokenizer(GGUF_SOURCES[name]()), tokenizer, vocab_size)
    return hf_tokenizer_metadata(tokenizer, vocab_size)

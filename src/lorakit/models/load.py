"""Loading base models offline: built-in names, local Hugging Face directories (also `lorakit quantize` output), hub ids.

Built-ins and local directories load with ``local_files_only=True``; only an explicit hub id (``owner/name``) is
handed to transformers as is, and loading it needs a network.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..formats.quantized import is_quantized_dir, load_quantized
from .builtin import BUILTIN_MODELS, ensure_builtin, unknown_model_message

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model(name_or_path: str | os.PathLike[str]) -> Path | str:
    """Turn a model reference into something ``from_pretrained`` loads.

    A built-in name gives its (built on demand) cache directory; an existing directory gives itself; an ``owner/name``
    string that is not a local path is returned unchanged as a hub id (loading it needs a network). Anything else
    raises: ``FileNotFoundError`` for a missing path, ``ValueError`` for an unknown name (listing the built-ins).
    """
    text = os.fspath(name_or_path)
    if text in BUILTIN_MODELS:
        return ensure_builtin(text)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{path}: not a Hugging Face model directory (no config.json)")
        return path
    if path.exists():
        raise ValueError(f"{path}: expected a model directory, got a file")
    if _looks_like_path(text):
        raise FileNotFoundError(f"{path}: no such model directory")
    if _HUB_ID.match(text):
        return text
    raise ValueError(unknown_model_message(text))


def _looks_like_path(text: str) -> bool:
    """Hub ids are ``owner/name``; anything rooted, relative-dotted or deeper is meant as a local path."""
    return text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text


def load_model(
    name_or_path: str | os.PathLike[str], dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, ready for training: pad token set (EOS if missing), right padding."""
    source = resolve_model(name_or_path)
    local = isinstance(source, Path)
    if local and is_quantized_dir(source):  # written by `lorakit quantize`: NF4 layers into a meta skeleton
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source, local_files_only=True))
        model = load_quantized(model, source)
    else:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=local)
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local)
    prepare_tokenizer(tokenizer)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.to(device), tokenizer


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give `tokenizer` a pad token (its EOS when it has none) and right padding, in place."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("tokenizer has neither a pad token nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer

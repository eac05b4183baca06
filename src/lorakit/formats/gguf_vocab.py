"""The tokenizer of a GGUF model: llama.cpp's `tokenizer.ggml.*` keys and the chat template, as metadata entries
(key, value, GGUF type, element type of an array).

Two sources:
- the GGUF file the base came from (the built-in SmolLM2 ships as one): its tokenizer keys are copied unchanged,
  so llama.cpp tokenizes the exported model exactly as it tokenizes that file;
- a Hugging Face byte-level BPE tokenizer (GPT-2, SmolLM, Llama 3 and Qwen2 families): model "gpt2", the tokens in
  id order (ids past the tokenizer's end padded as unused), merges as "left right", token types (control for
  special added tokens, user-defined for other added tokens), the pre-tokenizer under llama.cpp's name for its
  splitting rule, the special token ids, whether BOS is prepended, and the chat template.
"""

from __future__ import annotations

import json
import os
from typing import Any

import gguf
from gguf import GGUFValueType, TokenType

from .gguf import Metadata

# The splitting rules of the Qwen2 and Llama 3 tokenizers (tokenizer.json's Split pattern), by llama.cpp's names.
_LETTERS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_REST = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
SPLIT_PATTERNS = {_LETTERS + r"\p{N}" + _REST: "qwen2", _LETTERS + r"\p{N}{1,3}" + _REST: "llama-bpe"}


def copy_tokenizer(path: str | os.PathLike[str]) -> list[Metadata]:
    """Every `tokenizer.*` key of the GGUF file at `path`, as it is there."""
    entries = []
    for key, field in gguf.GGUFReader(path).fields.items():
        if key.startswith("tokenizer."):
            element = field.types[1] if field.types[0] == GGUFValueType.ARRAY else None
            entries.append((key, field.contents(), field.types[0], element))
    return entries


def with_added_tokens(entries: list[Metadata], tokenizer: Any, vocab_size: int) -> list[Metadata]:
    """Copied tokenizer keys extended to `vocab_size` tokens with those `tokenizer` added after them (a fine-tune's
    new tokens: user-defined; ids it does not know: unused padding)."""
    keys = gguf.Keys.Tokenizer
    found = {key: value for key, value, _, _ in entries}
    added = [tokenizer.convert_ids_to_tokens(i) if i < len(tokenizer) else None
             for i in range(len(found[keys.LIST]), vocab_size)]
    start = len(found[keys.LIST])
    tokens = found[keys.LIST] + [text or f"[PAD{start + n}]" for n, text in enumerate(added)]
    types = found[keys.TOKEN_TYPE] + [int(TokenType.USER_DEFINED if text else TokenType.UNUSED) for text in added]
    grown = {keys.LIST: tokens, keys.TOKEN_TYPE: types}
    return [(key, grown.get(key, value), kind, element) for key, value, kind, element in entries]


def pre_tokenizer_name(pre_tokenizer: dict[str, Any] | None) -> str:
    """llama.cpp's name for a byte-level tokenizer's splitting rule (tokenizer.json's `pre_tokenizer`)."""
    steps = (pre_tokenizer or {}).get("pretokenizers") or [pre_tokenizer or {}]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        name = SPLIT_PATTERNS.get(steps[0].get("pattern", {}).get("Regex"))
        if name:
            return name
    raise NotImplementedError(f"GGUF export: no llama.cpp pre-tokenizer is known for {json.dumps(pre_tokenizer)}")


def hf_tokenizer_metadata(tokenizer: Any, vocab_size: int) -> list[Metadata]:
    """The GGUF tokenizer keys of a Hugging Face fast byte-level BPE tokenizer, for a model of `vocab_size` rows."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise NotImplementedError("GGUF export supports byte-level BPE tokenizers (GPT-2, SmolLM, Llama 3, Qwen2 "
                                  f"families), not this {model.get('type')} tokenizer")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if not merges:
        raise ValueError("the tokenizer has no BPE merges; llama.cpp's BPE tokenizer needs them")
    text = {index: token for token, index in model["vocab"].items()}
    kinds = {index: TokenType.NORMAL for index in text}
    for added in spec.get("added_tokens", []):
        text[added["id"]] = added["content"]
        kinds[added["id"]] = TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED
    if max(text) >= vocab_size:
        raise ValueError(f"the tokenizer has token id {max(text)} but the model only {vocab_size} embedding rows")
    tokens = [text.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    types = [int(kinds.get(i, TokenType.UNUSED)) for i in range(vocab_size)]
    keys = gguf.Keys.Tokenizer
    entries: list[Metadata] = [
        (keys.MODEL, "gpt2", GGUFValueType.STRING, None),
        (keys.PRE, pre_tokenizer_name(spec.get("pre_tokenizer")), GGUFValueType.STRING, None),
        (keys.LIST, tokens, GGUFValueType.ARRAY, GGUFValueType.STRING),
        (keys.TOKEN_TYPE, types, GGUFValueType.ARRAY, GGUFValueType.INT32),
        (keys.MERGES, merges, GGUFValueType.ARRAY, GGUFValueType.STRING),
    ]
    for key, token_id in ((keys.BOS_ID, tokenizer.bos_token_id), (keys.EOS_ID, tokenizer.eos_token_id),
                          (keys.UNK_ID, tokenizer.unk_token_id), (keys.PAD_ID, tokenizer.pad_token_id)):
        if token_id is not None:
            entries.append((key, int(token_id), GGUFValueType.UINT32, None))
    adds_bos = tokenizer.bos_token_id is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
    entries.append((keys.ADD_BOS, adds_bos, GGUFValueType.BOOL, None))
    if isinstance(tokenizer.chat_template, str):
        entries.append((keys.CHAT_TEMPLATE, tokenizer.chat_template, GGUFValueType.STRING, None))
    return entries

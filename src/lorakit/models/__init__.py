"""Base models: built-in names built offline and cached (`builtin`), local directories and hub ids (`load`)."""

from .builtin import (BUILTIN_MODELS, DEFAULT_MODEL, RECIPE_FILE, SMOLLM2_GGUF, SMOLLM2_PACKAGE, TINY_CHAT_TEMPLATE,
                      TINY_SPECIAL_TOKENS, BuiltinModel, build_atomically, builtin_cache_dir, byte_tokenizer,
                      cache_root, ensure_builtin, smollm2_gguf_path, unknown_model_message)
from .load import load_model, prepare_tokenizer, resolve_model

__all__ = [
    "BUILTIN_MODELS", "DEFAULT_MODEL", "RECIPE_FILE", "SMOLLM2_GGUF", "SMOLLM2_PACKAGE", "TINY_CHAT_TEMPLATE",
    "TINY_SPECIAL_TOKENS", "BuiltinModel", "build_atomically", "builtin_cache_dir", "byte_tokenizer", "cache_root",
    "ensure_builtin", "load_model", "prepare_tokenizer", "resolve_model", "smollm2_gguf_path", "unknown_model_message",
]

"""Tiny Llama / Qwen2 model directories and adapters for the GGUF tests: random-init, built from configs in
milliseconds, with a byte-level BPE tokenizer that has merges (llama.cpp's BPE tokenizer needs some)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

import lorakit
from lorakit.adapters.config import AdapterConfig
from lorakit.models import TINY_CHAT_TEMPLATE, TINY_SPECIAL_TOKENS, byte_tokenizer, load_model

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 100.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}  # all three regimes at head_dim 16
ARCHITECTURES = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """The 256 byte tokens, one merge ("Ġ" + "t"), ChatML special tokens and chat template."""
    vocab = {token: index for token, index in byte_tokenizer().get_vocab().items() if index < 256}
    vocab["Ġt"] = 256
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("Ġ", "t")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    bos, start, eos = TINY_SPECIAL_TOKENS
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos,
                                        additional_special_tokens=[start])
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def tiny_model_dir(path: Path, kind: str = "llama", tied: bool = False, seed: int = 0,
                   rope: dict[str, object] | None = None) -> Path:
    """A random-init model of `kind` (hidden 64, 4 heads, 2 KV heads, 2 layers) saved with its tokenizer; `rope`:
    rope parameters (transformers' `rope_parameters`)."""
    config_class, model_class = ARCHITECTURES[kind]
    tokenizer = bpe_tokenizer()
    config = config_class(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          tie_word_embeddings=tied, rms_norm_eps=1e-6, **({"rope_parameters": rope} if rope else {}))
    torch.manual_seed(seed)
    model = model_class(config)
    with torch.no_grad():  # norms away from 1, so that a mix-up of norm tensors shows
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def random_adapter(model_dir: Path, config: AdapterConfig, out: Path, seed: int = 1) -> Path:
    """`config` on the model at `model_dir` with every trainable tensor random (a clearly non-zero update), saved."""
    model, _ = load_model(model_dir, dtype="float32")
    lorakit.adapt(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and "magnitude" not in name:  # DoRA keeps m = ‖W‖: a sane model
                fan = param.shape[-1] if "lora_" in name else 1
                param.copy_(torch.randn(param.shape, generator=generator) / fan**0.5)
    lorakit.save_adapter(model, out)
    return out

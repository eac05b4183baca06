"""GGUF files for llama.cpp, Ollama and LM Studio: LoRA adapters (`llama-cli --lora`) and whole models, written with
the `gguf` package (its writer, tensor-name tables and quantizers).

Names. A Hugging Face tensor name maps to its GGUF name through gguf's own table for the architecture
(`model.layers.0.self_attn.q_proj.weight` -> `blk.0.attn_q.weight`). An adapter's factors of that weight are
`blk.0.attn_q.weight.lora_a` = A [r, in] and `....lora_b` = B [out, r] (numpy shapes; ggml lists them reversed).

Rotary order. llama.cpp's Llama-family graph rotates interleaved pairs of a head's dimensions, Hugging Face rotates
halves, so llama.cpp's conversion reorders the rows of q_proj and k_proj within each head (d = head dim):
    new row 2i + j  <-  old row j·d/2 + i,    i < d/2, j in {0, 1},  per head of q (n_head) and of k (n_kv_head).
A row permutation P acts on an update as P·ΔW = (P·B)·A, so it goes into B. Qwen2 rotates halves: no reordering.

Scale. llama.cpp adds c_t·B·A with c_t = α_file / r_t, r_t the rank of that tensor (B's column count), or c_t = 1
when α_file = 0; one α_file per file. lorakit's scale s_t (α/r, α/√r with rsLoRA, per-module rank_pattern and
alpha_pattern; 1 for VeRA) is folded into B:  B' = (s_t / c_t)·B,  so c_t·B'·A = s_t·B·A. For plain LoRA,
α_file = lora_alpha makes s_t / c_t = 1 and B is written bit for bit.

Rope scaling. Linear scaling is two keys; Llama 3.1's "llama3" scaling is the tensor `rope_freqs.weight` of
per-frequency divisors f_i / f'_i, which llama.cpp applies to each rotary frequency f_i.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from torch import Tensor
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from .files import atomic_write

LORA_A, LORA_B = "lora_a", "lora_b"
Metadata = tuple[str, Any, gguf.GGUFValueType, gguf.GGUFValueType | None]  # key, value, type, array element type
OUTTYPES = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}


@dataclass(frozen=True)
class Architecture:
    """How llama.cpp names and lays out one Hugging Face model type."""

    arch: gguf.MODEL_ARCH
    interleaved_rope: bool  # llama.cpp's conversion reorders the rows of q_proj and k_proj


ARCHITECTURES = {
    "llama": Architecture(gguf.MODEL_ARCH.LLAMA, True),
    "mistral": Architecture(gguf.MODEL_ARCH.LLAMA, True),
    "qwen2": Architecture(gguf.MODEL_ARCH.QWEN2, False),
}


def architecture(config: Any) -> Architecture:
    """The GGUF architecture of a Hugging Face config; other model types are refused by name."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise NotImplementedError(f"GGUF export supports the model types {sorted(ARCHITECTURES)}, not {model_type!r}")
    return ARCHITECTURES[model_type]


def rope_interleave(rows: Tensor, heads: int) -> Tensor:
    """Reorder the rows of q_proj / k_proj (or of a LoRA B) [heads·d, ...] from halves to interleaved pairs per head."""
    half = rows.shape[0] // heads // 2
    return rows.reshape(heads, 2, half, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


class TensorNames:
    """Hugging Face tensor names to GGUF names, and rows into llama.cpp's order, for one model config."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self.architecture = architecture(config)
        self.table = gguf.get_tensor_name_map(self.architecture.arch, config.num_hidden_layers)

    @property
    def arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.architecture.arch]

    def gguf_name(self, hf_name: str) -> str:
        name = self.table.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"tensor {hf_name!r} has no GGUF name for {self.arch_name}")
        return name

    def in_gguf_order(self, hf_name: str, rows: Tensor) -> Tensor:
        """`rows` [out, ...] of the weight or bias `hf_name` (or of its LoRA B) in llama.cpp's row order."""
        if not self.architecture.interleaved_rope:
            return rows
        module = hf_name.removesuffix(".weight").removesuffix(".bias")
        if module.endswith("q_proj"):
            return rope_interleave(rows, self.config.num_attention_heads)
        if module.endswith("k_proj"):
            heads = getattr(self.config, "num_key_value_heads", None) or self.config.num_attention_heads
            return rope_interleave(rows, heads)
        return rows


def llama_cpp_scale(alpha: float, rank: int) -> float:
    """The scale llama.cpp applies to a LoRA tensor pair of rank `rank` in a file declaring `alpha`."""
    return alpha / rank if alpha else 1.0


@dataclass(frozen=True)
class LoraFactors:
    """One adapted weight: ΔW = scale·up·down, down [r, in], up [out, r], under its Hugging Face module path."""

    path: str
    down: Tensor
    up: Tensor
    scale: float


def gguf_lora_pair(names: TensorNames, factors: LoraFactors, alpha: float) -> dict[str, Tensor]:
    """The two GGUF tensors of one adapted weight, in float64: A as is, B scaled (see Scale) and in rotary order."""
    weight = f"{factors.path}.weight"
    rank = factors.down.shape[0]
    fold = factors.scale / llama_cpp_scale(alpha, rank)
    up = factors.up.detach().double()  # [out, r]
    up = up if fold == 1.0 else up * fold
    name = names.gguf_name(weight)
    return {f"{name}.{LORA_A}": factors.down.detach().double(), f"{name}.{LORA_B}": names.in_gguf_order(weight, up)}


def encode(tensor: Tensor, outtype: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """A tensor as the bytes of `outtype`; 1-D tensors (norms, biases) stay float32, as llama.cpp keeps them, and
    rows that do not fill whole Q8_0 blocks fall back to float16."""
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype {outtype!r}: choose one of {', '.join(OUTTYPES)}")
    data = tensor.detach().to(torch.float32).contiguous().numpy()
    kind = OUTTYPES[outtype][0] if data.ndim > 1 else gguf.GGMLQuantizationType.F32
    if kind == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % gguf.GGML_QUANT_SIZES[kind][0]:
        kind = gguf.GGMLQuantizationType.F16
    return gguf.quants.quantize(data, kind), kind


def _write(path: str | os.PathLike[str], writer: gguf.GGUFWriter, tensors: Iterable[tuple[str, Tensor]],
           outtype: str) -> Path:
    """Add `tensors` in `outtype` and write the file atomically (never half a file at `path`)."""
    for name, tensor in tensors:
        data, kind = encode(tensor, outtype)
        writer.add_tensor(name, data, raw_dtype=kind)

    def write(tmp: str) -> None:
        writer.write_header_to_file(Path(tmp))
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    target = Path(path)
    atomic_write(target, write)
    return target


def write_lora_adapter(path: str | os.PathLike[str], model_config: Any, factors: Iterable[LoraFactors],
                       alpha: float, outtype: str = "f32", name: str | None = None) -> Path:
    """A GGUF LoRA adapter that llama.cpp loads with `--lora` on a GGUF of the model `model_config` describes."""
    if outtype == "q8_0":
        raise ValueError("a GGUF LoRA adapter is written as f32, f16 or bf16 (its B rows are too short for q8_0)")
    names = TensorNames(model_config)
    writer = gguf.GGUFWriter(None, names.arch_name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    if name:
        writer.add_name(name)
    pairs = [item for one in factors for item in gguf_lora_pair(names, one, alpha).items()]
    if not pairs:
        raise ValueError("the adapter adapts no weight: nothing to export")
    return _write(path, writer, pairs, outtype)


def write_model(path: str | os.PathLike[str], config: Any, state: Iterable[tuple[str, Tensor]],
                metadata: Iterable[Metadata],
                outtype: str = "f16", name: str | None = None) -> Path:
    """A complete GGUF model: hyperparameters from `config`, `metadata` (the tokenizer's keys), and the Hugging Face
    `state` renamed and reordered for llama.cpp (a tied output head is left out: llama.cpp reuses the embedding)."""
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype {outtype!r}: choose one of {', '.join(OUTTYPES)}")
    names = TensorNames(config)
    writer = gguf.GGUFWriter(None, names.arch_name)
    writer.add_type(gguf.GGUFType.MODEL)
    if name:
        writer.add_name(name)
    add_hyperparameters(writer, config)
    writer.add_file_type(OUTTYPES[outtype][1])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value, kind, sub_kind in metadata:
        writer.add_key_value(key, value, kind, sub_kind)
    tied = getattr(config, "tie_word_embeddings", False)
    tensors = ((names.gguf_name(key), names.in_gguf_order(key, value)) for key, value in state
               if not (tied and key == "lm_head.weight"))
    return _write(path, writer, itertools.chain(rope_tensors(config), tensors), outtype)


def add_hyperparameters(writer: gguf.GGUFWriter, config: Any) -> None:
    """The `<arch>.*` keys llama.cpp reads for a Llama-family or Qwen2 model."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    _add_rope_keys(writer, config)


def rope_tensors(config: Any) -> list[tuple[str, Tensor]]:
    """Rope scaling as llama.cpp reads it: keys for linear scaling (added by `add_hyperparameters`), and for Llama 3.1's
    "llama3" scaling the tensor `rope_freqs.weight` [head_dim / 2] of divisors f_i / f'_i, where f'_i are the
    frequencies transformers' own llama3 rule gives (low frequencies divided by `factor`, high ones kept, a smooth
    blend between)."""
    rope = _rope_parameters(config)
    if rope.get("rope_type", rope.get("type", "default")) != "llama3":
        return []
    if architecture(config).arch != gguf.MODEL_ARCH.LLAMA:
        raise NotImplementedError("GGUF export: llama3 rope scaling is supported for Llama-family models only")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    plain = 1.0 / rope["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # [d/2]
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config)  # [d/2]
    name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
    return [(name, (plain / scaled.double()).float())]


def _rope_parameters(config: Any) -> dict[str, Any]:
    """Rope settings under transformers 5 (`rope_parameters`) or earlier (`rope_theta`, `rope_scaling`)."""
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if "rope_theta" not in rope and getattr(config, "rope_theta", None) is not None:
        rope["rope_theta"] = config.rope_theta
    return rope


def _add_rope_keys(writer: gguf.GGUFWriter, config: Any) -> None:
    rope = _rope_parameters(config)
    if "rope_theta" in rope:
        writer.add_rope_freq_base(float(rope["rope_theta"]))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind not in ("default", "llama3"):
        raise NotImplementedError(f"GGUF export: rope scaling {kind!r} is not supported (none, linear or llama3)")

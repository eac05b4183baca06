"""Loading base models: built-in names, local Hugging Face directories (also `lorakit quantize` output), hub ids.

Every source goes through one loader: a built-in name resolves to its cache directory, a hub id (``owner/name``,
which needs a network) to its downloaded files, and the directory's safetensors stream into a skeleton one tensor at
a time (`stream.py`), quantized to NF4 on the way when asked. Only safetensors are read: never a pickle.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ..adapters.base import FrozenLinear, cpu_has_native_bf16, matmul_dtype
from ..formats.checkpoint import Checkpoint
from ..formats.quantized import QUANT_WEIGHTS_NAME, is_quantized_dir, read_manifest
from .builtin import BUILTIN_MODELS, ensure_builtin, unknown_model_message
from .stream import NF4Options, parameters_on_meta, stream_checkpoint

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GENERATION_CONFIG_NAME = "generation_config.json"

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
    name_or_path: str | os.PathLike[str],
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    quantize: str | None = None,
    double_quant: bool = True,
    skip: tuple[str, ...] = ("lm_head",),
    progress: bool | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, ready for training: pad token set (EOS if missing), right padding.

    The weights stream in tensor by tensor (`stream.py`): with `quantize="nf4"` every linear layer but `skip` is
    quantized as it arrives (QLoRA), so the dense model is never whole in memory. `dtype` ("auto", "float32",
    "bfloat16", "float16" or a torch dtype) is that of the frozen dense tensors and the NF4 compute dtype; "auto"
    picks it for the device (`resolve_dtype`). A directory written by `lorakit quantize` loads its NF4 layers as
    stored (its dense tensors in `dtype` when one is given). `progress`: a progress bar (None: on a terminal only).
    """
    if quantize not in (None, "nf4"):
        raise ValueError(f"quantize={quantize!r}: lorakit quantizes to 'nf4' (or None for a dense base)")
    device = torch.device(device)
    source = resolve_model(name_or_path)
    directory = source if isinstance(source, Path) else _download(source)
    config = read_config(directory)
    tokenizer = prepare_tokenizer(read_tokenizer(directory))  # before the weights: fail fast
    if is_quantized_dir(directory):
        model = load_quantized(empty_model(config, torch.float32), directory,
                               None if dtype == "auto" else resolve_dtype(dtype, device), device, progress)
    else:
        chosen = resolve_dtype(dtype, device)
        nf4 = NF4Options(skip, double_quant=double_quant) if quantize else None
        model = stream_checkpoint(empty_model(config, chosen), Checkpoint(directory), chosen, device, nf4,
                                  progress=progress)
    avoid_slow_half_matmuls(model)
    model.config.name_or_path = str(source)
    if (directory / GENERATION_CONFIG_NAME).is_file():
        model.generation_config = _read_file(directory / GENERATION_CONFIG_NAME, GenerationConfig.from_pretrained,
                                             directory, local_files_only=True)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def read_config(source: Path | str) -> PretrainedConfig:
    """A model directory's config.json (or a hub id's, fetched); one that is not a JSON object, or that transformers
    refuses (an unknown model type, a value of the wrong type), raises a one-line ValueError naming the file."""
    if not isinstance(source, Path):
        return _read_file(source, AutoConfig.from_pretrained, source)
    directory = source
    file = directory / "config.json"
    try:
        data = json.loads(file.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{file}: not valid JSON ({_first_line(error)})") from None
    except OSError as error:
        raise ValueError(f"{file}: cannot be read ({error.strerror or error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(data).__name__}")  # noqa: TRY004
    return _read_file(file, AutoConfig.from_pretrained, directory, local_files_only=True)


def read_tokenizer(directory: Path) -> PreTrainedTokenizerBase:
    """A model directory's tokenizer; broken tokenizer files raise a one-line ValueError naming the directory."""
    return _read_file(f"{directory} (tokenizer files)", AutoTokenizer.from_pretrained, directory,
                      local_files_only=True)


def _read_file(file: Path | str, reader: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`reader(*args, **kwargs)`, a transformers/tokenizers loader of `file`: whatever it raises for a malformed file
    (ValueError, OSError, TypeError, KeyError, huggingface_hub's validation errors, the tokenizers library's plain
    Exception) becomes one ValueError naming the file, its cause chained."""
    try:
        return reader(*args, **kwargs)
    except Exception as error:
        raise ValueError(f"{file}: {_first_line(error)}") from error


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines[:2])[:300] or type(error).__name__


def empty_model(config: PretrainedConfig, dtype: torch.dtype) -> PreTrainedModel:
    """The causal LM `config` describes, its parameters on the meta device (nothing allocated), its buffers real."""
    with parameters_on_meta():
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def load_quantized(model: nn.Module, path: str | os.PathLike[str], dtype: torch.dtype | None = None,
                   device: str | torch.device = "cpu", progress: bool | None = None) -> nn.Module:
    """Fill `model` (the same architecture, e.g. built on the meta device) from a directory written by
    `save_quantized`, tensor by tensor. NF4 layers come back as stored (compute dtype: `dtype` if given); the other
    tensors keep their stored dtype unless `dtype` is given. Everything is frozen."""
    directory = Path(path)
    manifest = read_manifest(directory)
    for alias, source in manifest.get("tied", {}).items():  # share before loading: the alias is never in the file
        owner, _, name = alias.rpartition(".")
        setattr(model.get_submodule(owner) if owner else model, name, model.get_parameter(source))
    checkpoint = Checkpoint(directory, QUANT_WEIGHTS_NAME)
    stream_checkpoint(model, checkpoint, dtype, device, quantized_layers=manifest["layers"], progress=progress)
    return model.requires_grad_(False)


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """A dtype name or torch dtype; "auto" is bfloat16 on a CUDA device that computes in it (else float16) and on a
    CPU with native bfloat16 matrix units (AVX512-BF16, AMX), and float32 on other CPUs: there a bfloat16 matmul
    runs 3x slower than float32 or, for the backward's grad·W product, falls back to a scalar kernel (see
    `adapters.base.matmul_dtype`), so halving the frozen weights' memory would cost speed on every step."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r}: choose one of auto, {', '.join(DTYPES)}")
        return DTYPES[dtype]
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else torch.float32


def avoid_slow_half_matmuls(model: nn.Module) -> None:
    """Half-precision dense layers on a CPU without native bfloat16 become FrozenLinear (see adapters.base)."""
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if type(module) is nn.Linear and matmul_dtype(weight.dtype, weight.device) != weight.dtype:
            module.__class__ = FrozenLinear


def _download(hub_id: str) -> Path:
    """A hub model's safetensors, configs and tokenizer files, through the hub cache (needs a network)."""
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(hub_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]))


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give `tokenizer` a pad token (its EOS when it has none) and right padding, in place."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("tokenizer has neither a pad token nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer

"""Save and load adapters in PEFT's directory format, so they move freely between lorakit, PEFT and serving engines.

A directory holds `adapter_config.json` (PEFT's config fields) and `adapter_model.safetensors` with keys
`base_model.model.<module path>.<tensor>`:
- LoRA `lora_A.weight` [r, in], `lora_B.weight` [out, r] (Linear layout, also for Conv1D); DoRA `lora_magnitude_vector` [out];
  on a parameter (`target_parameters`) `<module>[.base_layer…].lora_A.weight` [E·r, in], `lora_B.weight` [out, r·E];
- VeRA `vera_lambda_b` [out], `vera_lambda_d` [r], and once `base_model.vera_A` [r, max_in], `base_model.vera_B`
  [max_out, r] when save_projection is true (otherwise they are regenerated from projection_prng_key);
- trained biases `<path>.bias` (`<layer>.base_layer.bias` for adapted layers) and modules_to_save `<path>.<param>`.
Adapters whose initialisation rewrote the base (PiSSA, OLoRA: W = W_res + s·B₀·A₀; LoftQ: NF4(W_res) + s·B₀·A₀ ≈ W)
come in two forms. The residual form holds the factors as trained and the config names the initialisation: lorakit
and PEFT load it onto the original base by recomputing the residual (exact for "pissa" and "olora"; PEFT recomputes
LoftQ only with bitsandbytes on a GPU). The plain-LoRA form has init_lora_weights=True: for PiSSA/OLoRA the LoRA of rank
2r that gives the same outputs on the original base, ΔW = B·A − B₀·A₀ = [B | −B₀]·[A; A₀] with r and lora_alpha
doubled (α·√2 under rsLoRA), as PEFT's `path_initial_model_for_weight_conversion` writes it; for LoftQ the adapter
of its quantized base, which must then be saved too. By default PiSSA/OLoRA are saved plain, LoftQ residual.
Only JSON and safetensors are read: nothing is ever unpickled.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from ..adapters.config import AdaLoraConfig, AdapterConfig, LoraConfig, VeraConfig, config_from_peft_dict
from ..adapters.deltas import EmbeddingLoRADelta, HeadTokensDelta, SVDDelta, TrainableTokensDelta, VeRADelta
from ..adapters.layer import AdaptedLinear
from ..adapters.model import adapt_checked
from ..adapters.parameters import adapted_parameters
from ..adapters.registry import adapted_layers, adapter_configs, saved_module_wrappers
from ..adapters.targets import ALL_LINEAR, compact_target_list, find_targets
from ..adapters.transaction import all_or_nothing
from .files import atomic_write, read_json_object

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # safetensors' names of the dtypes an adapter file may hold


def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, Tensor]:
    """The adapter's tensors under PEFT's keys; the values are the live parameters (detached views)."""
    config = adapter_configs(model)[adapter_name]
    out: dict[str, Tensor] = {}
    projections = None
    for path, layer in adapted_layers(model):
        if adapter_name not in layer.adapters:
            continue
        adapter = layer.adapters[adapter_name]
        delta = adapter.delta
        if isinstance(delta, VeRADelta):
            projections = delta.projections
            out[f"{PREFIX}{path}.vera_lambda_b"] = delta.vera_lambda_b
            out[f"{PREFIX}{path}.vera_lambda_d"] = delta.vera_lambda_d
        elif isinstance(delta, (TrainableTokensDelta, HeadTokensDelta)):
            if not getattr(delta, "shared", False):  # a tied head's rows are the embedding's, saved there
                out[f"{PREFIX}{path}.token_adapter.trainable_tokens_delta"] = delta.values
        elif isinstance(delta, SVDDelta):
            out[f"{PREFIX}{path}.lora_A"] = delta.lora_A
            out[f"{PREFIX}{path}.lora_E"] = delta.lora_E
            out[f"{PREFIX}{path}.lora_B"] = delta.lora_B
        elif isinstance(delta, EmbeddingLoRADelta):
            out[f"{PREFIX}{path}.lora_embedding_A"] = delta.lora_A
            out[f"{PREFIX}{path}.lora_embedding_B"] = delta.lora_B
        else:
            out[f"{PREFIX}{path}.lora_A.weight"] = delta.lora_A
            out[f"{PREFIX}{path}.lora_B.weight"] = delta.lora_B
        if adapter.lora_magnitude_vector is not None:
            out[f"{PREFIX}{path}.lora_magnitude_vector"] = adapter.lora_magnitude_vector
        if config.bias == "lora_only" and layer.bias is not None:
            out[f"{PREFIX}{path}.base_layer.bias"] = layer.bias
    for path, param in adapted_parameters(model):  # target_parameters: keys of PEFT's nested wrappers
        if adapter_name in param.adapters:
            owner = path.rpartition(".")[0] + ".base_layer" * param.nesting
            out[f"{PREFIX}{owner}.lora_A.weight"] = param.adapters[adapter_name].delta.lora_A
            out[f"{PREFIX}{owner}.lora_B.weight"] = param.adapters[adapter_name].delta.lora_B
    if isinstance(config, VeraConfig) and config.save_projection and projections is not None:
        out["base_model.vera_A"] = projections.vera_A
        out["base_model.vera_B"] = projections.vera_B
    wrappers = [path + "." for path, _ in saved_module_wrappers(model)]
    if config.bias == "all":
        for name, param in model.named_parameters():
            if name.endswith("bias") and not any(name.startswith(w) for w in wrappers):
                out[PREFIX + name] = param
    for path, wrapper in saved_module_wrappers(model):
        if adapter_name in wrapper.copies:
            for name, tensor in wrapper.copies[adapter_name].state_dict(keep_vars=True).items():
                out[f"{PREFIX}{path}.{name}"] = tensor
    return {key: value.detach() for key, value in out.items()}


def _config_for_file(model: nn.Module, config: AdapterConfig, adapter_name: str) -> dict[str, Any]:
    data = config.to_peft_dict()
    if config.target_modules is None:  # target_parameters alone
        data["target_modules"] = []
    if config.target_modules == ALL_LINEAR:  # PEFT writes the expanded module list
        targets = [path for path, layer in adapted_layers(model) if adapter_name in layer.adapters
                   and not isinstance(layer.adapters[adapter_name].delta, (TrainableTokensDelta, HeadTokensDelta))]
        data["target_modules"] = compact_target_list(model, targets)
    if data["base_model_name_or_path"] is None:
        data["base_model_name_or_path"] = getattr(getattr(model, "config", None), "name_or_path", None) or None
    if data["task_type"] is None and type(model).__name__.endswith("ForCausalLM"):
        data["task_type"] = "CAUSAL_LM"
    return data


def _as_plain_lora(
    model: nn.Module, config: LoraConfig, adapter_name: str, tensors: dict[str, Tensor], data: dict[str, Any]
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The adapter as a plain LoRA (init_lora_weights=True) for the base it was initialised from (module doc)."""
    data = {**data, "init_lora_weights": True, "loftq_config": {}}
    if config.init_lora_weights == "loftq":
        return tensors, data  # its base is the quantized residual: save that base too (lorakit.save_quantized)
    if config.use_dora:
        raise ValueError(f"a DoRA adapter initialised with {config.init_lora_weights!r} has no plain-LoRA form for "
                         "the original base; save it with residual=True")
    tensors = dict(tensors)
    for path, layer in adapted_layers(model):
        if adapter_name in layer.adapters:
            delta = layer.adapters[adapter_name].delta
            key = f"{PREFIX}{path}"
            tensors[f"{key}.lora_A.weight"] = torch.cat([delta.lora_A, delta.init_A], 0).detach()  # [2r, in]
            tensors[f"{key}.lora_B.weight"] = torch.cat([delta.lora_B, -delta.init_B], 1).detach()  # [out, 2r]
    alpha_factor = math.sqrt(2) if config.use_rslora else 2  # s = α/r or α/√r stays the same at rank 2r
    data["r"] = 2 * config.r
    data["lora_alpha"] = alpha_factor * config.lora_alpha
    data["rank_pattern"] = {key: 2 * value for key, value in config.rank_pattern.items()}
    data["alpha_pattern"] = {key: alpha_factor * value for key, value in config.alpha_pattern.items()}
    return tensors, data


def _pruned(tensors: dict[str, Tensor], rank_pattern: dict[str, list[bool]]) -> dict[str, Tensor]:
    """AdaLoRA's kept triplets only (rows of lora_A and lora_E, columns of lora_B), as PEFT saves them."""
    out = dict(tensors)
    for key, mask in rank_pattern.items():
        keep = torch.tensor(mask, dtype=torch.bool)
        module = PREFIX + key.removesuffix(".lora_E")
        if out[f"{module}.lora_E"].shape[0] != len(mask):
            continue  # loaded already pruned
        for name in ("lora_A", "lora_E"):
            out[f"{module}.{name}"] = out[f"{module}.{name}"][keep.to(out[f"{module}.{name}"].device)]
        out[f"{module}.lora_B"] = out[f"{module}.lora_B"][:, keep.to(out[f"{module}.lora_B"].device)]
    return out


def save_adapter(
    model: nn.Module, path: str | os.PathLike[str], adapter_name: str = "default", residual: bool | None = None
) -> Path:
    """Write `adapter_name` as a PEFT adapter directory; files are replaced atomically.

    `residual` chooses the form of an adapter initialised from the base weight (module doc): None (default) writes
    PiSSA/OLoRA as the plain LoRA of the original base and LoftQ in its residual form. residual=True writes every
    adapter exactly as it lives in the model (also AdaLoRA's pruned triplets, as zeros), as checkpoints need.
    """
    configs = adapter_configs(model)
    if adapter_name not in configs:
        raise ValueError(f"unknown adapter {adapter_name!r}; this model has {sorted(configs)}")
    config = configs[adapter_name]
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = adapter_state_dict(model, adapter_name)
    data = _config_for_file(model, config, adapter_name)
    if residual is None:
        residual = isinstance(config, LoraConfig) and config.init_lora_weights == "loftq"
    if isinstance(config, LoraConfig) and config.changes_base and not residual:
        tensors, data = _as_plain_lora(model, config, adapter_name, tensors, data)
    if isinstance(config, AdaLoraConfig) and config.rank_pattern and not residual:
        tensors = _pruned(tensors, config.rank_pattern)
    tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    text = json.dumps(data, indent=2, sort_keys=True)
    atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text + "\n"))
    return directory


def read_adapter_config(path: str | os.PathLike[str]) -> AdapterConfig:
    file = Path(path) / CONFIG_NAME
    return config_from_peft_dict(read_json_object(file, "PEFT adapter"), str(file))


def read_adapter_tensors(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """The adapter file's tensors; a file that is not valid safetensors, or a tensor that is not floating point (an
    adapter of integers would be silently cast), is a ValueError naming the file and the tensor."""
    directory = Path(path)
    file = directory / WEIGHTS_NAME
    if not file.is_file():
        pickled = [p.name for p in directory.glob("*.bin")]
        hint = f" ({pickled} are pickle files, which lorakit never loads; convert them to safetensors)" if pickled else ""
        raise FileNotFoundError(f"{file} not found{hint}")
    key = None
    try:
        with safe_open(file, framework="pt") as handle:
            tensors = {}
            for key in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                dtype = handle.get_slice(key).get_dtype()
                if dtype not in FLOAT_DTYPES:
                    raise ValueError(f"{file}: tensor {_shown(key)} has dtype {dtype}; adapter tensors are floating "
                                     f"point ({', '.join(FLOAT_DTYPES)})")
                tensors[key] = handle.get_tensor(key)
            return tensors
    except (SafetensorError, OSError, RuntimeError, OverflowError, UnicodeError) as error:
        where = f" (tensor {_shown(key)})" if key is not None else ""
        reason = (str(error).splitlines() or [type(error).__name__])[0][:200]
        raise ValueError(f"{file}: corrupted or not a safetensors file{where}: {reason}") from None


def _check_ranks(model: nn.Module, config: AdapterConfig, tensors: dict[str, Tensor], file: Path) -> None:
    """Before anything is allocated: the tensor that carries each targeted layer's rank is in the file with the rank
    the config gives that layer (so a config's r, however large, never sizes an allocation the file does not back)."""
    if not config.target_modules:
        return  # target_parameters or trainable_token_indices alone: their sizes come from the model
    targets = find_targets(model, config.target_modules, config.exclude_modules, isinstance(config, LoraConfig),
                           every_name=False)
    for path in targets:
        module = model.get_submodule(path)
        base = module.base_layer if isinstance(module, AdaptedLinear) else module
        suffix = ".vera_lambda_d" if isinstance(config, VeraConfig) else \
            ".lora_A" if isinstance(config, AdaLoraConfig) else \
            ".lora_embedding_A" if isinstance(base, nn.Embedding) else ".lora_A.weight"
        key, rank = f"{PREFIX}{path}{suffix}", config.rank_for(path)
        if key not in tensors:
            raise ValueError(f"{file}: missing tensor {key}")
        shape = tuple(tensors[key].shape)
        if not shape or shape[0] != rank:
            raise ValueError(f"{file}: tensor {key} has shape {shape} but the config gives {path} rank {rank}")


def load_adapter(
    model: nn.Module, path: str | os.PathLike[str], adapter_name: str = "default"
) -> nn.Module:
    """Add the PEFT adapter at `path` (written by PEFT or lorakit) to `model` as `adapter_name` and activate it.

    All or nothing: the config is checked in full and the file's tensors (dtypes, and the ranks the config implies)
    before the model is touched; a missing, unexpected, misshapen or non-finite tensor found while filling the
    adapter is an error that names it, and the model is restored exactly as it was (modules, adapters, active
    adapters, requires_grad flags, weights).
    """
    directory = Path(path)
    with warnings.catch_warnings(record=True) as notes:  # options lorakit ignores: reported once the load succeeds
        warnings.simplefilter("always")
        config = read_adapter_config(directory)
    tensors = read_adapter_tensors(directory)
    file = directory / WEIGHTS_NAME
    _check_ranks(model, config, tensors, file)

    def fill() -> None:
        expected = adapter_state_dict(model, adapter_name)
        optional = {"base_model.vera_A", "base_model.vera_B"} if isinstance(config, VeraConfig) else set()
        for layer_path, layer in adapted_layers(model):  # PEFT saves an embedding that carries LoRA whole
            if isinstance(layer.adapters[adapter_name].delta if adapter_name in layer.adapters else None,
                          EmbeddingLoRADelta):
                key = f"{PREFIX}{layer_path}.base_layer.weight"
                expected[key] = layer.base_layer.weight.detach()
                optional.add(key)
        _copy_into(expected, tensors, config, optional, file)

    with all_or_nothing(model):
        _grow_vocabulary(model, directory, config)
        adapt_checked(model, config, adapter_name, every_name=False, fill=fill)
    for note in notes:
        warnings.warn(note.message, note.category, stacklevel=2)
    return model


def _grow_vocabulary(model: nn.Module, directory: Path, config: AdapterConfig) -> None:
    """An adapter that trains new tokens, saved with its extended tokenizer: grow the base's embeddings to match (the
    new rows' values come from the adapter)."""
    if not getattr(config, "trainable_token_indices", None) or not (directory / "tokenizer_config.json").is_file():
        return
    from transformers import AutoTokenizer

    size = len(AutoTokenizer.from_pretrained(directory))
    if size > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(size)


def _copy_into(expected: dict[str, Tensor], found: dict[str, Tensor], config: AdapterConfig, optional: set[str],
               file: Path) -> None:
    missing = sorted(set(expected) - set(found) - optional)
    unexpected = sorted(set(found) - set(expected) - optional)
    if missing:
        raise ValueError(f"{file}: missing tensor {missing[0]}" + (f" (and {len(missing) - 1} more)" if missing[1:] else ""))
    if unexpected:
        hint = _unexpected_hint(unexpected[0], config)
        raise ValueError(f"{file}: unexpected tensor {_shown(unexpected[0])}{hint}" + (
            f" (and {len(unexpected) - 1} more)" if unexpected[1:] else ""))
    with torch.no_grad():
        for key, target in expected.items():
            if key not in found:  # VeRA projections not saved (regenerated from the seed), an embedding not saved
                continue
            source = found[key]
            if source.shape != target.shape:
                raise ValueError(
                    f"{file}: tensor {key} has shape {tuple(source.shape)} but the model needs {tuple(target.shape)}"
                )
            source = source.to(target.dtype)
            if not torch.isfinite(source).all():
                raise ValueError(f"{file}: tensor {key} holds non-finite values (NaN or Inf in {target.dtype})")
            target.copy_(source)


def _shown(key: str) -> str:
    """A tensor name from a file as one short line (names are any string in safetensors)."""
    return key if key.isprintable() and len(key) <= 200 else repr(key[:200]) + ("..." if len(key) > 200 else "")


def _unexpected_hint(key: str, config: AdapterConfig) -> str:
    if key.endswith("lora_B.bias"):
        return " (lora_bias is not supported by lorakit)"
    if isinstance(config, LoraConfig) and not key.startswith("base_model.model."):
        return " (keys must start with 'base_model.model.')"
    return " (the model has no such adapted module: wrong base model or target_modules?)"

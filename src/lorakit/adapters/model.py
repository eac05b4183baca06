"""Model-level operations: inject adapters, choose which run, merge them in, take them out.

`adapt(model, config)` replaces every targeted linear layer in place by an `AdaptedLinear` around it (module paths
stay the model's own, so PEFT's file keys line up) and freezes everything that is not trained. All other operations
walk the same AdaptedLinear layers; nothing here knows which method or which base a layer holds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .base import base_dims, dense_module, dense_weight, is_weight_provider
from .config import CONFIG_CLASSES, AdaLoraConfig, AdapterConfig, LoraConfig, VeraConfig
from .deltas import EmbeddingLoRADelta, LoRADelta, SVDDelta, VeRADelta, VeRAProjections
from .init import initialize_from_base
from .layer import AdaptedLinear, Adapter
from .memory import check_adapter_fits
from .modules_to_save import ModulesToSave
from .parameters import AdaptedParameter, adapt_parameters, adapted_parameters
from .registry import CONFIGS_ATTR, adapted_layers, adapter_configs, module_device, saved_module_wrappers
from .routing import accept_adapter_names, mixed_batch, refuse_adapter_names
from .targets import find_targets, matches, output_head_paths, replace_module
from .tokens import add_token_adapters
from .transaction import all_or_nothing


def _wrap(model: nn.Module, path: str) -> AdaptedLinear:
    module = model.get_submodule(path)
    if isinstance(module, AdaptedLinear):
        return module
    layer = AdaptedLinear(module)
    replace_module(model, path, layer)
    return layer


def _make_adapters(config: AdapterConfig, layers: dict[str, AdaptedLinear]) -> dict[str, Adapter]:
    """One Adapter per layer, float32 on the layer's device (adapters train in full precision on any base)."""
    projections = None
    if isinstance(config, VeraConfig):
        max_out = max(layer.out_features for layer in layers.values())
        max_in = max(layer.in_features for layer in layers.values())
        projections = VeRAProjections(config.r, max_in, max_out, config.projection_prng_key)
    adapters = {}
    for path, layer in layers.items():
        device = module_device(layer.base_layer)
        if isinstance(config, AdaLoraConfig):
            if isinstance(layer.base_layer, nn.Embedding):
                raise ValueError(f"{path} is an embedding: AdaLoRA adapts linear layers")
            delta = SVDDelta(layer.in_features, layer.out_features, config.rank_for(path), config.init_r,
                             config.init_lora_weights).to(device)
            adapter = Adapter(delta, config.scaling_for(path), config.lora_dropout)
        elif isinstance(config, LoraConfig):
            init = True if config.changes_base else config.init_lora_weights
            embedding = isinstance(layer.base_layer, nn.Embedding)
            if embedding and (config.use_dora or config.init_lora_weights == "loftq"):
                raise ValueError(f"{path} is an embedding: use_dora and LoftQ apply to linear layers only")
            delta = EmbeddingLoRADelta(layer.in_features, layer.out_features, config.rank_for(path), init,
                                       layer.base_layer.padding_idx) if embedding else \
                LoRADelta(layer.in_features, layer.out_features, config.rank_for(path), init)
            delta = delta.to(device)
            adapter = Adapter(delta, config.scaling_for(path), 0.0 if embedding else config.lora_dropout)
            if config.changes_base:
                initialize_from_base(layer, delta, config, adapter.scaling)
            if config.use_dora:  # m starts at ‖W + s·ΔW‖ per row; with B = 0 that is ‖W‖, no W·Aᵀ needed
                zero_delta = config.init_lora_weights in (True, "gaussian")
                norm = layer.weight_row_norm_sq().sqrt() if zero_delta else adapter.weight_norm(layer)
                adapter.lora_magnitude_vector = nn.Parameter(norm.clone())
        else:
            delta = VeRADelta(layer.in_features, layer.out_features, projections, config.d_initial)
            adapter = Adapter(delta.to(device), 1.0, config.vera_dropout)
        adapters[path] = adapter
    return adapters


def adapt(model: nn.Module, config: AdapterConfig, adapter_name: str = "default") -> nn.Module:
    """Add adapter `adapter_name` to every layer `config` targets, make it the active one, freeze the rest.

    Adapting again with another name adds a second adapter to the same wrappers (never a wrapper in a wrapper).
    All or nothing: the config, the names it targets (every name of a target list must match a module) and the
    memory its weights need are checked before the model is touched, and if anything fails later the model is
    restored exactly (`transaction.py`).
    """
    return adapt_checked(model, config, adapter_name, every_name=True)


def adapt_checked(model: nn.Module, config: AdapterConfig, adapter_name: str, every_name: bool,
                  fill: Callable[[], None] | None = None) -> nn.Module:
    """`adapt`, where `every_name` says whether each name of a target list must match (a file PEFT wrote may list
    names its model lacks) and `fill`, if given, runs in the same transaction once the adapter is in (loading its
    weights: if that fails, the model is restored too)."""
    if getattr(config, "peft_type", None) not in CONFIG_CLASSES:
        raise ValueError(f"config must be a LoraConfig, VeraConfig or AdaLoraConfig, got {type(config).__name__}")
    configs = adapter_configs(model)
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name or adapter_name == "__base__" \
            or hasattr(nn.ModuleDict, adapter_name):
        raise ValueError(f"invalid adapter name {adapter_name!r}")
    if adapter_name in configs:
        raise ValueError(f"adapter {adapter_name!r} already exists; delete_adapter() it or choose another name")
    parameters = getattr(config, "target_parameters", None)
    tokens = getattr(config, "trainable_token_indices", None)
    targets = find_targets(model, config.target_modules, config.exclude_modules, isinstance(config, LoraConfig),
                           every_name) if config.target_modules or not (parameters or tokens) else []
    check_adapter_fits(model, config, targets)
    saved_paths = _modules_to_save_paths(model, config)
    # PiSSA and OLoRA write W_res into the base weight in place: the transaction keeps a copy of those weights (LoftQ
    # puts a new quantized base in the layer's place, which the transaction undoes without copying anything)
    in_place = getattr(config, "changes_base", False) and config.init_lora_weights != "loftq"
    rewritten = [model.get_submodule(path) for path in targets] if in_place else []
    with all_or_nothing(model, values=rewritten):
        _add(model, config, adapter_name, targets, saved_paths)
        if fill is not None:
            fill()
    return model


def _add(model: nn.Module, config: AdapterConfig, adapter_name: str, targets: list[str],
         saved_paths: list[str]) -> None:
    """Wrap the targets and add the adapter everywhere (`adapt`, inside its transaction)."""
    configs = adapter_configs(model)
    layers = {path: _wrap(model, path) for path in targets}
    for path, adapter in _make_adapters(config, layers).items():
        layers[path].add_adapter(adapter_name, adapter)
    if getattr(config, "target_parameters", None):
        adapt_parameters(model, config, adapter_name)
    if getattr(config, "trainable_token_indices", None):
        add_token_adapters(model, config, adapter_name, _wrap)
    for path in saved_paths:
        wrapper = model.get_submodule(path)
        if not isinstance(wrapper, ModulesToSave):
            wrapper = ModulesToSave(wrapper)
            replace_module(model, path, wrapper)
        wrapper.add_copy(adapter_name)
    if any(layer.fan_in_fan_out for layer in layers.values()):
        config = config.replace(fan_in_fan_out=True)
    configs[adapter_name] = config
    set_adapter(model, adapter_name)
    accept_adapter_names(model)


def _holders(model: nn.Module) -> list[AdaptedLinear | AdaptedParameter]:
    """Everything that holds adapters: wrapped layers and parametrized parameters."""
    return [layer for _, layer in adapted_layers(model)] + [param for _, param in adapted_parameters(model)]


def _modules_to_save_paths(model: nn.Module, config: AdapterConfig) -> list[str]:
    if not config.modules_to_save:
        return []
    wrappers = [name + "." for name, _ in saved_module_wrappers(model)]
    paths = [
        name for name, _ in model.named_modules()
        if name and matches(name, config.modules_to_save) and not any(name.startswith(w) for w in wrappers)
    ]
    missing = [key for key in config.modules_to_save if not any(matches(p, (key,)) for p in paths)]
    if missing:
        raise ValueError(f"modules_to_save {missing} match no module of {type(model).__name__}")
    return paths


def set_adapter(model: nn.Module, names: str | list[str]) -> None:
    """Make `names` the active adapters (their updates add up) and the only trainable parameters."""
    names = [names] if isinstance(names, str) else list(names)
    configs = adapter_configs(model)
    unknown = [n for n in names if n not in configs]
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}; this model has {sorted(configs)}")
    for layer in _holders(model):
        layer.active = [n for n in names if n in layer.adapters]
    with_copies = [n for n in names if configs[n].modules_to_save]
    if len(with_copies) > 1:
        raise ValueError(f"adapters {with_copies} each train their own modules_to_save; only one can be active")
    for _, wrapper in saved_module_wrappers(model):
        wrapper.active = next((n for n in with_copies if n in wrapper.copies), None)
    _set_trainable(model, names)


def _set_trainable(model: nn.Module, names: list[str]) -> None:
    """Freeze everything, then unfreeze the active adapters, their module copies and the biases their configs train."""
    configs = adapter_configs(model)
    for param in model.parameters():
        param.requires_grad_(False)
    bias_modes = {configs[n].bias for n in names}
    if "all" in bias_modes:
        for param_name, param in model.named_parameters():
            if param_name.endswith("bias"):
                param.requires_grad_(True)
    for _, layer in adapted_layers(model):
        for name in layer.active:
            layer.adapters[name].requires_grad_(True)
        if "lora_only" in bias_modes and layer.active and layer.bias is not None:
            layer.bias.requires_grad_(True)
    for _, param in adapted_parameters(model):
        for name in param.active:
            param.adapters[name].requires_grad_(True)
    for _, wrapper in saved_module_wrappers(model):
        if wrapper.active is not None:
            wrapper.copies[wrapper.active].requires_grad_(True)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name` everywhere; layers left with no adapter go back to their plain base layer."""
    configs = adapter_configs(model)
    if name not in configs:
        raise ValueError(f"unknown adapter {name!r}; this model has {sorted(configs)}")
    for path, layer in [*adapted_layers(model), *adapted_parameters(model)]:
        if name in layer.merged:
            raise ValueError(f"adapter {name!r} is merged into {path}; unmerge() first")
        if name in layer.adapters:
            del layer.adapters[name]
            layer.active = [n for n in layer.active if n != name]
        if layer.adapters:
            continue
        if isinstance(layer, AdaptedParameter):
            layer.remove()
        else:
            replace_module(model, path, layer.base_layer)
    for path, wrapper in list(saved_module_wrappers(model)):
        if name in wrapper.copies:
            del wrapper.copies[name]
            wrapper.active = None if wrapper.active == name else wrapper.active
        if not wrapper.copies:
            replace_module(model, path, wrapper.original_module)
    del configs[name]
    if not configs:
        refuse_adapter_names(model)
    remaining = [n for n in configs if any(n in layer.active for layer in _holders(model))]
    _set_trainable(model, remaining)


def _heads_tied_to_lora_embeddings(model: nn.Module) -> list[nn.Module]:
    """Output heads sharing their weight with an embedding that carries an active LoRA: merging it would change the
    head too (the unmerged model applies the update to token lookups only)."""
    tables = [layer.base_layer.weight for _, layer in adapted_layers(model)
              if any(isinstance(layer.adapters[n].delta, EmbeddingLoRADelta) for n in layer.active)]
    heads = [model.get_submodule(path) for path in output_head_paths(model)]
    heads = [head.base_layer if isinstance(head, AdaptedLinear) else head for head in heads]
    return [head for head in heads if any(head.weight is table for table in tables)]


def merge(model: nn.Module, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
    """Fold adapters (default: the active ones) into dense base weights; the forward then costs nothing extra.

    With safe_merge, a merge that would write a non-finite weight is undone everywhere and raises.
    """
    if _heads_tied_to_lora_embeddings(model):
        raise ValueError("an embedding with LoRA shares its weight with the output head (tied embeddings): merging "
                         "would change the head too; use merge_and_unload, which unties them")
    done: list[AdaptedLinear | AdaptedParameter] = []
    try:
        for layer in _holders(model):
            layer.merge([n for n in adapter_names if n in layer.adapters] if adapter_names else None, safe_merge)
            done.append(layer)
    except ValueError:
        for layer in done:
            layer.unmerge()
        raise


def unmerge(model: nn.Module) -> None:
    """Take every merged adapter back out of the base weights."""
    for layer in _holders(model):
        layer.unmerge()


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone inside the block (merged adapters are unmerged for it and merged back after)."""
    layers = _holders(model)
    wrappers = [wrapper for _, wrapper in saved_module_wrappers(model)]
    merged = {id(layer): list(layer.merged) for layer in layers}
    for layer in layers:
        layer.unmerge()
        layer.disabled = True
    for wrapper in wrappers:
        wrapper.disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False
            layer.merge(merged[id(layer)])
        for wrapper in wrappers:
            wrapper.disabled = False


def merge_and_unload(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Merge the active adapters and return the plain model: no lorakit module or attribute is left.

    Quantized bases are dequantized to `dtype` (default float32) and the update is added in float32, never rounded
    back to 4 bits; dense bases keep their dtype unless `dtype` is given.
    """
    with torch.no_grad():
        for head in _heads_tied_to_lora_embeddings(model):  # untie: the head keeps the weight as it was
            head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
            if getattr(model, "config", None) is not None:
                model.config.tie_word_embeddings = False
        for path, layer in list(adapted_layers(model)):
            if is_weight_provider(layer.base_layer):
                weight = layer.weight.float()
                for name in layer.active:
                    if name not in layer.merged:
                        weight = layer.adapters[name].merged_weight(weight, layer)
                replace_module(model, path, dense_module(layer.base_layer, weight, dtype or torch.float32))
            else:
                layer.merge()
                replace_module(model, path, layer.base_layer)
        for _, param in list(adapted_parameters(model)):
            param.merge()
            param.remove()
        for path, module in list(model.named_modules()):
            if path and is_weight_provider(module):
                replace_module(model, path, dense_module(module, module.dense_weight(torch.float32), dtype or torch.float32))
        for path, wrapper in list(saved_module_wrappers(model)):
            replace_module(model, path, wrapper.current)
    model.__dict__.pop(CONFIGS_ATTR, None)
    refuse_adapter_names(model)
    if dtype is not None:
        model.to(dtype)
    model.requires_grad_(False)
    return model


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter without merging and return the original model (merged adapters are taken out first).

    A dense base that PiSSA or OLoRA turned into W_res gets W_res + s·B₀·A₀ = W back; a LoftQ base stays NF4.
    """
    for path, layer in list(adapted_layers(model)):
        layer.unmerge()
        for adapter in reversed(list(layer.adapters.values())):  # the last initialised was taken from the rest
            initial = getattr(adapter.delta, "init_A", None)
            if initial is not None and not is_weight_provider(layer.base_layer):
                restored = layer.weight.float() + adapter.scaling * (adapter.delta.init_B.float() @ initial.float())
                layer.write_weight(restored)
        replace_module(model, path, layer.base_layer)
    for _, param in list(adapted_parameters(model)):
        param.unmerge()
        param.remove()
    for path, wrapper in list(saved_module_wrappers(model)):
        replace_module(model, path, wrapper.original_module)
    model.__dict__.pop(CONFIGS_ATTR, None)
    refuse_adapter_names(model)
    return model


@dataclass(frozen=True)
class ParameterCount:
    trainable: int
    total: int

    @property
    def share(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {100 * self.share:.4f}"


def trainable_parameters(model: nn.Module) -> ParameterCount:
    """Trainable and total parameter counts; a quantized weight counts as its out×in logical parameters."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    total += sum(m.out_features * m.in_features for m in model.modules() if is_weight_provider(m))
    return ParameterCount(trainable, total)


__all__ = [
    "adapt", "adapted_layers", "adapter_configs", "base_dims", "delete_adapter", "dense_weight", "disable_adapters",
    "merge", "merge_and_unload", "mixed_batch", "set_adapter", "trainable_parameters", "unload", "unmerge", "ParameterCount",
]

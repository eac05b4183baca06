"""LoRA+ (Hayou et al. 2024): train B faster than A, an optimizer-grouping concern only.

With η the base learning rate and λ = loraplus_lr_ratio (paper §4: λ ≈ 2^4 works well), the groups are PEFT's:
- A matrices and every other matrix:                                        lr = η,  weight decay = wd
- adapters on embedding layers:                                             lr = loraplus_lr_embedding
- B matrices and every 1-D trainable tensor (DoRA m, VeRA λ, biases, norms): lr = λ·η; decay wd, except biases and
  LayerNorm parameters, which get none.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _no_decay_names(model: nn.Module) -> set[str]:
    """Biases and LayerNorm parameters: trained without weight decay in the fast group."""
    names = set()
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            if isinstance(module, nn.LayerNorm) or "bias" in full:
                names.add(full)
    return names


def loraplus_param_groups(
    model: nn.Module,
    lr: float,
    loraplus_lr_ratio: float = 16.0,
    loraplus_lr_embedding: float = 1e-6,
    weight_decay: float = 0.0,
) -> list[dict[str, Any]]:
    """Parameter groups for any torch optimizer; empty groups are left out."""
    no_decay = _no_decay_names(model)
    modules = dict(model.named_modules())
    slow, embedding, fast, fast_no_decay = [], [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        owner = modules.get(name.rsplit(".", 2)[0]) if name.count(".") >= 2 else None
        if isinstance(owner, nn.Embedding):
            embedding.append(param)
        elif "lora_B" in name or param.ndim == 1:
            (fast_no_decay if name in no_decay else fast).append(param)
        else:
            slow.append(param)
    groups = [
        {"params": slow, "lr": lr, "weight_decay": weight_decay},
        {"params": embedding, "lr": loraplus_lr_embedding, "weight_decay": weight_decay},
        {"params": fast, "lr": lr * loraplus_lr_ratio, "weight_decay": weight_decay},
        {"params": fast_no_decay, "lr": lr * loraplus_lr_ratio, "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


def create_loraplus_optimizer(
    model: nn.Module,
    optimizer_cls: type[torch.optim.Optimizer],
    lr: float,
    loraplus_lr_ratio: float = 16.0,
    loraplus_lr_embedding: float = 1e-6,
    weight_decay: float = 0.0,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """An optimizer over the trainable parameters with LoRA+ learning rates, e.g. (model, torch.optim.AdamW, 2e-4)."""
    groups = loraplus_param_groups(model, lr, loraplus_lr_ratio, loraplus_lr_embedding, weight_decay)
    return optimizer_cls(groups, lr=lr, **kwargs)

"""Everything a training run is built from, before its first step: the data, the adapted model, the optimizer.

- data: the JSONL files (or the built-in task), split and tokenized (`load_datasets`);
- model: the base streamed in, quantized to NF4 as it loads when asked (QLoRA), adapted with the same seed on every rank, wrapped for
  DDP/FSDP under torchrun (`prepare_run`);
- optimizer: AdamW, with LoRA+ groups when `loraplus_ratio` is set, and a linear warmup then cosine decay to zero.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..adapters.adalora import RankAllocator
from ..adapters.config import AdaLoraConfig
from ..adapters.loraplus import loraplus_param_groups
from ..adapters.model import adapt
from ..adapters.tokens import add_tokens
from ..models.attention import size_aware_attention
from ..models.load import load_model
from ..quant.quantize import quantize
from .batches import BatchStream
from .config import DEFAULT_SEQ_LEN, TrainConfig
from .data import DataStats, Example, load_jsonl, pack_examples, tokenize_records
from .distributed import DistContext
from .jsonl import display_path
from .task import make_builtin_task


@dataclass
class Datasets:
    train: list[Example]
    eval: list[Example]
    stats: DataStats
    seq_len: int  # the resolved --seq-len
    notes: list[str]  # what the user should know about how the data was read


def resolve_seq_len(requested: int | None, max_positions: int | None) -> tuple[int, list[str]]:
    """The tokens per example: as asked (an error beyond the model's context), or the default clamped to it."""
    if requested is None:
        if max_positions is not None and max_positions < DEFAULT_SEQ_LEN:
            return max_positions, [f"--seq-len defaults to {DEFAULT_SEQ_LEN}, more than the model's context of "
                                   f"{max_positions} tokens: using {max_positions}"]
        return DEFAULT_SEQ_LEN, []
    if requested <= 0:
        raise ValueError(f"--seq-len must be positive, got {requested}")
    if max_positions is not None and requested > max_positions:
        raise ValueError(f"--seq-len {requested} exceeds the model's context of {max_positions} tokens")
    return requested, []


def load_datasets(config: TrainConfig, tokenizer: Any, max_positions: int | None) -> Datasets:
    """Read (or generate), split and tokenize the data; raises ValueError with the reason for bad input."""
    seq_len, notes = resolve_seq_len(config.seq_len, max_positions)
    if config.data is None:
        train_records, eval_records = make_builtin_task(config.seed, config.builtin_train_size, config.eval_samples)
    else:
        train_records = load_jsonl(config.data)
        if config.eval_data is not None:
            eval_records = load_jsonl(config.eval_data)
        else:
            order = random.Random(config.seed).sample(range(len(train_records)), len(train_records))
            n_eval = max(1, int(len(train_records) * config.eval_fraction)) if len(train_records) > 1 else 0
            eval_records = [train_records[i] for i in order[:n_eval]]
            train_records = [train_records[i] for i in sorted(order[n_eval:])]
    train, stats = tokenize_records(train_records, tokenizer, seq_len, chat=config.chat)
    evaluation, _ = tokenize_records(eval_records, tokenizer, seq_len, chat=config.chat)
    if not train:
        source = display_path(config.data or "the built-in task")
        raise ValueError(f"{source}: no usable example (the loss tokens of all {stats.n_dropped} training records "
                         f"lie beyond --seq-len {seq_len})")
    if config.pack:
        train = pack_examples(train, seq_len)
    return Datasets(train, evaluation, stats, seq_len, notes)


def cosine_with_warmup(warmup: int, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    if config.loraplus_ratio:
        groups = loraplus_param_groups(model, config.lr, config.loraplus_ratio, weight_decay=config.weight_decay)
    else:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": config.weight_decay}]
    return torch.optim.AdamW(groups, lr=config.lr, fused=True)


@dataclass
class PreparedRun:
    """The pieces of one run: `model` is the adapted model, `wrapped` the same under DDP/FSDP (or itself)."""

    model: nn.Module
    tokenizer: Any
    data: Datasets
    wrapped: nn.Module
    stream: BatchStream
    total_steps: int
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    allocator: RankAllocator | None = None  # AdaLoRA: ranks pruned after every step, its penalty added to the loss


def choose_attention(model: nn.Module, implementation: str, device: torch.device) -> None:
    """`--attn-implementation`: a name goes to transformers as it is; auto makes SDPA size-aware on the CPU."""
    if implementation != "auto":
        try:
            model.set_attn_implementation(implementation)
        except (ValueError, ImportError) as error:  # an unknown name, or a kernel whose package is missing
            raise ValueError(f"--attn-implementation {implementation}: {error}") from None
    elif device.type == "cpu":
        size_aware_attention(model)


def prepare_run(config: TrainConfig, dist: DistContext) -> PreparedRun:
    """Seed, load, quantize, adapt and wrap the model; read the data; build the optimizer and schedule."""
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    # Deterministic mode also fills every new tensor with NaN (a debugging aid against reads of uninitialized memory):
    # about a sixth of a CPU training step, spent on no result. Kernels stay the deterministic ones.
    torch.utils.deterministic.fill_uninitialized_memory = False
    adapter_config = config.adapter_config()
    quantize_late = config.quantize if config.init_reads_base else None  # PiSSA/OLoRA/LoftQ read the dense base
    with dist.main_first():  # one process per node builds a built-in model's cache
        model, tokenizer = load_model(config.model, config.dtype, dist.load_device(config.fsdp),
                                      None if quantize_late else config.quantize,
                                      progress=None if dist.is_main else False)
    choose_attention(model, config.attn_implementation, dist.device)
    if config.add_tokens:  # new embedding rows drawn with the seed: the same on every rank and in every run
        torch.manual_seed(config.seed)
        tokens = [t.strip() for t in config.add_tokens.split(",") if t.strip()]
        adapter_config = adapter_config.replace(trainable_token_indices=add_tokens(model, tokenizer, tokens))
    data = load_datasets(config, tokenizer, getattr(model.config, "max_position_embeddings", None))
    torch.manual_seed(config.seed)  # the same adapter init on every rank and in every run
    adapt(model, adapter_config)
    if quantize_late:
        quantize(model)  # the residual bases and the layers without adapters (LoftQ's are NF4 already)
    if dist.active:
        torch.manual_seed(config.seed + dist.rank)  # each rank its own dropout masks
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    wrapped = dist.wrap(model, fsdp=config.fsdp)
    stream = BatchStream(data.train, config.batch_size * config.grad_accum, seed=config.seed, rank=dist.rank,
                         world_size=dist.world_size, group_by_length=config.group_by_length)
    total_steps = config.max_steps or max(1, math.ceil(config.epochs * stream.steps_per_epoch))
    optimizer = build_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(config.warmup_steps, total_steps))
    allocator = RankAllocator(model, total_step=total_steps) if isinstance(adapter_config, AdaLoraConfig) else None
    return PreparedRun(model, tokenizer, data, wrapped, stream, total_steps, optimizer, scheduler, allocator)

"""The training loop behind `lorakit train`: AdamW (optionally LoRA+), warmup + cosine schedule, gradient accumulation
and clipping, periodic evaluation, atomic checkpoints with exact resume, metrics and a loss plot.

Every option is a field of `TrainConfig`; the command line is generated from those fields, and a YAML/TOML file can
set any of them. On CPU a run is deterministic: killed and resumed, it ends with the same adapter bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .checkpoint import load_checkpoint, save_checkpoint
from .config import LoraConfig, VeraConfig
from .data import (BatchStream, DataStats, Example, collate, load_jsonl, make_builtin_task, pack_examples,
                   tokenize_records)
from .evaluate import evaluate_exact_match, evaluate_loss
from .metrics import MetricsLog, plot_metrics
from .model import adapt, trainable_parameters
from .models import load_model
from .optim import loraplus_param_groups
from .peft_format import save_adapter
from .quantize import quantize

METHODS = ("lora", "dora", "vera")


def _opt(default: Any, help: str, **kwargs: Any) -> Any:
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class TrainConfig:
    """Every option of `lorakit train` (flags are the field names with dashes)."""

    model: str = _opt("smollm2-135m", "built-in model name, local Hugging Face directory, or hub id")
    data: str | None = _opt(None, "training JSONL file (text, prompt/completion or messages); default: the "
                                  "built-in date-formatting task")
    eval_data: str | None = _opt(None, "evaluation JSONL file; default: a held-out fraction of --data")
    eval_fraction: float = _opt(0.05, "held-out share of --data when no --eval-data is given")
    output_dir: str = _opt("runs/lorakit", "where the adapter, checkpoints, metrics and plot go")
    method: str = _opt("lora", "adapter method", choices=METHODS)
    r: int = _opt(8, "rank (VeRA: size of the shared projections, e.g. 256)")
    alpha: float = _opt(16.0, "lora_alpha: the update is scaled by alpha/r (alpha/sqrt(r) with --rslora)")
    dropout: float = _opt(0.0, "dropout on the adapter input")
    targets: str = _opt("all-linear", "modules to adapt: 'all-linear', comma-separated names, or a regex")
    rslora: bool = _opt(False, "rank-stabilized scaling alpha/sqrt(r)")
    quantize: str | None = _opt(None, "quantize the frozen base: 'nf4' (QLoRA, with double quantization)",
                                choices=(None, "nf4"))
    loraplus_ratio: float | None = _opt(None, "LoRA+: learning-rate ratio of B over A (e.g. 16); off by default")
    lr: float = _opt(1e-3, "peak learning rate")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    warmup_steps: int = _opt(10, "linear warmup steps, then cosine decay to zero")
    max_steps: int | None = _opt(None, "optimizer steps (overrides --epochs)")
    epochs: float = _opt(1.0, "passes over the training data when --max-steps is not given")
    batch_size: int = _opt(8, "examples per micro-batch (per process)")
    grad_accum: int = _opt(1, "micro-batches per optimizer step")
    max_grad_norm: float = _opt(1.0, "gradient clipping norm (0 disables)")
    seq_len: int = _opt(256, "maximum tokens per example (longer ones are truncated and counted)")
    pack: bool = _opt(False, "pack examples into blocks of --seq-len tokens")
    chat: bool = _opt(False, "render prompt/completion records through the tokenizer's chat template")
    gradient_checkpointing: bool = _opt(False, "recompute activations in backward to save memory")
    bf16: bool = _opt(False, "bfloat16 autocast for the forward pass")
    seed: int = _opt(0, "seed for adapter init, data order and dropout")
    eval_every: int = _opt(0, "evaluate every N steps (0: only before and after training)")
    eval_samples: int = _opt(100, "held-out examples scored by exact match")
    save_every: int = _opt(50, "checkpoint every N steps (0: only at the end and on Ctrl-C)")
    log_every: int = _opt(10, "write training metrics every N steps")
    resume: bool = _opt(False, "continue from the checkpoint in --output-dir")
    threads: int | None = _opt(None, "torch CPU threads (default: torch's choice)")
    fsdp: bool = _opt(False, "under torchrun: shard the frozen base over the processes with FSDP2 (adapters stay "
                             "whole on every process) instead of replicating it with DDP")
    builtin_train_size: int = _opt(800, "size of the built-in task's training split")

    def adapter_config(self) -> LoraConfig | VeraConfig:
        targets = self.target_spec()
        if self.method == "vera":
            return VeraConfig(r=self.r, target_modules=targets, vera_dropout=self.dropout)
        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=targets,
                          use_rslora=self.rslora, use_dora=self.method == "dora")

    def target_spec(self) -> str | tuple[str, ...]:
        if self.targets == "all-linear" or not all(c.isalnum() or c in "_,. " for c in self.targets):
            return self.targets  # "all-linear" or a regex
        return tuple(t.strip() for t in self.targets.split(",") if t.strip())


@dataclass
class Datasets:
    train: list[Example]
    eval: list[Example]
    stats: DataStats


def load_datasets(config: TrainConfig, tokenizer: Any, max_positions: int | None) -> Datasets:
    """Read (or generate), split and tokenize the data; raises ValueError with the reason for bad input."""
    if max_positions is not None and config.seq_len > max_positions:
        raise ValueError(f"--seq-len {config.seq_len} exceeds the model's context of {max_positions} tokens")
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
    train, stats = tokenize_records(train_records, tokenizer, config.seq_len, chat=config.chat)
    evaluation, _ = tokenize_records(eval_records, tokenizer, config.seq_len, chat=config.chat)
    if not train:
        raise ValueError("the training data holds no usable example")
    if config.pack:
        train = pack_examples(train, config.seq_len)
    return Datasets(train, evaluation, stats)


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
    return torch.optim.AdamW(groups, lr=config.lr, foreach=False)


class Trainer:
    """One training run; `run()` returns the final metrics. Works alone or under torchrun (see distributed.py)."""

    def __init__(self, config: TrainConfig, echo: Callable[[str], None] = print) -> None:
        self.config = config
        self.out = Path(config.output_dir)
        self.dist = distributed.context()
        self.echo = echo if self.dist.is_main else (lambda _: None)
        if config.threads:
            torch.set_num_threads(config.threads)
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        torch.use_deterministic_algorithms(True, warn_only=True)
        with self.dist.main_first():  # one process per node builds a built-in model's cache
            self.model, self.tokenizer = load_model(config.model, device=self.dist.load_device(config.fsdp))
        max_positions = getattr(self.model.config, "max_position_embeddings", None)
        self.data = load_datasets(config, self.tokenizer, max_positions)
        if config.quantize == "nf4":
            quantize(self.model)
        torch.manual_seed(config.seed)  # the same adapter init on every rank and in every run
        adapt(self.model, config.adapter_config())
        if self.dist.active:
            torch.manual_seed(config.seed + self.dist.rank)  # each rank its own dropout masks
        if config.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.model.enable_input_require_grads()
        self.wrapped = self.dist.wrap(self.model, fsdp=config.fsdp)
        self.stream = BatchStream(self.data.train, config.batch_size * config.grad_accum, seed=config.seed,
                                  rank=self.dist.rank, world_size=self.dist.world_size)
        self.total_steps = config.max_steps or max(1, math.ceil(config.epochs * self.stream.steps_per_epoch))
        self.optimizer = build_optimizer(self.model, config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, cosine_with_warmup(config.warmup_steps, self.total_steps))
        self.step = 0
        self.metrics = MetricsLog(self.out / "metrics.jsonl", enabled=self.dist.is_main)
        self.autocast = torch.bfloat16 if config.bf16 else None

    # -- the run ---------------------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        config = self.config
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        resumed = config.resume and (self.out / "checkpoint").is_dir()
        if resumed:
            self._resume()
        else:
            self.metrics.reset()
        self.echo(f"lorakit: {config.method} on {config.model}: {trainable_parameters(self.model)}")
        self.echo(f"lorakit: {len(self.data.train)} training / {len(self.data.eval)} eval examples, "
                  f"{self.data.stats.n_truncated} truncated to {config.seq_len} tokens")
        if not resumed:
            self._write_config()
            self._evaluate("base")
        interrupted = self._train_loop()
        if interrupted:
            self._save_checkpoint()
            self.echo(f"lorakit: interrupted at step {self.step}; checkpoint saved, continue with --resume")
            return {"interrupted": True, "step": self.step}
        final = self._evaluate("tuned")
        if self.dist.is_main:
            save_adapter(self.model, self.out / "adapter")
            plot_metrics(self.out / "metrics.jsonl", self.out / "loss.png")
        self._save_checkpoint()  # on every rank: it gathers their RNG states and waits for rank 0's files
        self.echo(f"lorakit: adapter: {self.out / 'adapter'}  metrics: {self.out / 'metrics.jsonl'}  "
                  f"plot: {self.out / 'loss.png'}")
        return final

    def _train_loop(self) -> bool:
        """Train to total_steps; returns True if interrupted by Ctrl-C / SIGTERM (after finishing the step)."""
        config = self.config
        stop = {"now": False}
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

        def request_stop(signum: int, frame: Any) -> None:
            stop["now"] = True

        for sig in previous:
            signal.signal(sig, request_stop)
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not self.dist.is_main, dynamic_ncols=True,
                   desc="train", file=sys.stderr)
        window_tokens, window_start = 0, time.perf_counter()
        try:
            self.wrapped.train()
            while self.step < self.total_steps:
                if self.dist.any(stop["now"]):
                    return True
                loss, tokens = self._optimizer_step()
                self.step += 1
                window_tokens += tokens
                lr = self.scheduler.get_last_lr()[0]
                rate = window_tokens / max(time.perf_counter() - window_start, 1e-9)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{rate:,.0f}")
                bar.update(1)
                if self.step % config.log_every == 0 or self.step == self.total_steps:
                    self.metrics.write({"step": self.step, "loss": loss, "lr": lr, "tokens_per_s": rate})
                    window_tokens, window_start = 0, time.perf_counter()
                if config.eval_every and self.step % config.eval_every == 0 and self.step < self.total_steps:
                    self._evaluate("eval", exact=False)
                if config.save_every and self.step % config.save_every == 0 and self.step < self.total_steps:
                    self._save_checkpoint()
        finally:
            bar.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return False

    def _optimizer_step(self) -> tuple[float, int]:
        """One optimizer step over grad_accum micro-batches; returns the loss (all ranks) and tokens seen (all ranks).

        One micro-batch on one process uses the model's own mean token loss; otherwise the step's loss is the sum over
        every loss token of every micro-batch and rank divided by their global count (see distributed.py).
        """
        config = self.config
        examples = next(self.stream)
        batches = [{k: v.to(self.dist.device) for k, v in collate(examples[i:i + config.batch_size],
                                                                   self.tokenizer.pad_token_id).items()}
                   for i in range(0, len(examples), config.batch_size)]
        summed = self.dist.active or len(batches) > 1
        loss_tokens, tokens = self.dist.sum_ints([sum(map(distributed.loss_token_count, batches)),
                                                  sum(int(b["attention_mask"].sum()) for b in batches)])
        total_loss = 0.0
        for index, batch in enumerate(batches):
            with self.dist.no_sync(self.wrapped, last=index == len(batches) - 1):
                with torch.autocast(self.dist.device.type, dtype=torch.bfloat16, enabled=self.autocast is not None):
                    if summed:
                        loss = distributed.summed_token_loss(self.wrapped, batch) / max(loss_tokens, 1)
                    else:
                        loss = self.wrapped(**batch).loss
                self.dist.scale_loss(loss).backward()
            total_loss += loss.item()
        self.dist.reduce_gradients(self.wrapped)
        if config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                                           config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return self.dist.sum(total_loss), tokens

    # -- evaluation, checkpoints ----------------------------------------------------------------------------------

    def _evaluate(self, tag: str, exact: bool = True) -> dict[str, Any]:
        evaluates = self.dist.is_main or distributed.is_sharded(self.wrapped)  # a sharded forward needs every rank
        if not self.data.eval or not evaluates:
            self.dist.barrier()
            return {}
        result: dict[str, Any] = evaluate_loss(self.model, self.data.eval, self.config.batch_size,
                                               self.tokenizer.pad_token_id, self.autocast)
        if exact:
            result |= evaluate_exact_match(self.model, self.tokenizer, self.data.eval[: self.config.eval_samples])
        self.metrics.write({"step": self.step, "tag": tag, **{k: v for k, v in result.items() if k != "samples"}})
        line = f"lorakit: [{tag} @ step {self.step}] eval loss {result['eval_loss']:.4f}, ppl {result['eval_ppl']:.2f}"
        if "exact_match" in result:
            line += f", exact match {100 * result['exact_match']:.1f}% of {result['n_scored']}"
            sample = result["samples"][0]
            line += f"\n         e.g. expected {sample['answer']!r}, got {sample['prediction'][:60]!r}"
        self.echo(line)
        self.dist.barrier()
        return result

    def _save_checkpoint(self) -> None:
        rng_states = self.dist.rng_states()
        if self.dist.is_main:
            extra = {"step": self.step, "stream": self.stream.state_dict(), "world_size": self.dist.world_size,
                     "config": dataclasses.asdict(self.config)}
            save_checkpoint(self.out / "checkpoint", self.model, self.optimizer, self.scheduler, extra,
                            rng_states=rng_states)
        self.dist.barrier()

    def _resume(self) -> None:
        state = load_checkpoint(self.out / "checkpoint", self.model, self.optimizer, self.scheduler,
                                rank=self.dist.rank)
        saved = state["config"]
        for key in ("model", "method", "r", "targets", "quantize", "batch_size", "grad_accum", "seed"):
            if saved.get(key) != getattr(self.config, key):
                raise ValueError(f"--resume: the checkpoint was made with {key}={saved.get(key)!r}, "
                                 f"not {getattr(self.config, key)!r}")
        if state["world_size"] != self.dist.world_size:
            raise ValueError(f"--resume: the checkpoint was made with {state['world_size']} processes")
        self.stream.load_state_dict({**state["stream"], "global_batch_size": self.stream.global_batch_size})
        self.step = int(state["step"])
        self.metrics.truncate_after(self.step)
        self.echo(f"lorakit: resumed from step {self.step}")

    def _write_config(self) -> None:
        if self.dist.is_main:
            resolved = dataclasses.asdict(self.config) | {"total_steps": self.total_steps,
                                                          "adapter": self.config.adapter_config().to_peft_dict()}
            (self.out / "train_config.json").write_text(json.dumps(resolved, indent=2, default=str) + "\n")


def train(config: TrainConfig) -> dict[str, Any]:
    """Run `lorakit train` from Python."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return Trainer(config).run()

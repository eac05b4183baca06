"""The training loop behind `lorakit train`: gradient accumulation and clipping, periodic evaluation, atomic
checkpoints with exact resume, metrics and a loss plot, Ctrl-C / SIGTERM turned into a checkpoint and a clean stop.

What the loop runs on (data, adapted model, optimizer, schedule) is built by `setup.prepare_run`. On CPU a run is
deterministic: killed and resumed, it ends with the same adapter bit for bit.

`--resume` reads and checks the checkpoint (checkpoint.py) before the model is loaded, and refuses with one line
when there is nothing whole to resume from: it never starts again from step 0. A non-finite loss stops the run with
an error before anything is saved, so the last checkpoint written stays the last good one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..adapters.model import trainable_parameters
from ..formats.peft import save_adapter
from ..models.stream import limit_heap_retention
from . import distributed
from .checkpoint import SavedCheckpoint, find_resumable, remove_stale_temporaries, restore, save_checkpoint
from .config import TrainConfig
from .data import collate
from .evaluate import evaluate_exact_match, evaluate_loss
from .loss import loss_token_count, summed_token_loss
from .metrics import MetricsLog, plot_metrics
from .setup import prepare_run
from .trackers import check_libraries, open_trackers, parse_report_to


class Trainer:
    """One training run; `run()` returns the final metrics. Works alone or under torchrun (see distributed.py)."""

    def __init__(self, config: TrainConfig, echo: Callable[[str], None] = print) -> None:
        self.config = config
        self.out = Path(config.output_dir)
        self.dist = distributed.context()
        self.echo = echo if self.dist.is_main else (lambda _: None)
        if self.out.exists() and not self.out.is_dir():
            raise NotADirectoryError(f"--output-dir {self.out} is a file, not a directory")
        self.saved, self.recovered = self._find_checkpoint() if config.resume else (None, None)
        self.report_to = parse_report_to(config.report_to)
        if self.dist.is_main:
            check_libraries(self.report_to)
        prepared = prepare_run(config, self.dist)
        self.model, self.tokenizer, self.data = prepared.model, prepared.tokenizer, prepared.data
        self.wrapped, self.stream, self.total_steps = prepared.wrapped, prepared.stream, prepared.total_steps
        self.optimizer, self.scheduler = prepared.optimizer, prepared.scheduler
        self.allocator = prepared.allocator
        self.step = 0
        self.metrics = MetricsLog(self.out / "metrics.jsonl", enabled=self.dist.is_main)
        self.autocast = torch.bfloat16 if config.bf16 else None

    # -- the run ---------------------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        config = self.config
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        resumed = self.saved is not None
        if resumed:
            self._resume()
        else:
            self.metrics.reset()
        if self.dist.is_main:
            self._say_removed(remove_stale_temporaries(self.out / "checkpoint", olds=False))
        self.echo(f"lorakit: {config.method} on {config.model}: {trainable_parameters(self.model)}")
        for note in self.data.notes:
            self.echo(f"lorakit: {note}")
        self.echo(f"lorakit: {len(self.data.train)} training / {len(self.data.eval)} eval examples, "
                  f"{self.data.stats.n_truncated} truncated to {self.data.seq_len} tokens")
        trackers = open_trackers(self.report_to, self.out, self.out.name, self._resolved_config(), self.dist.is_main)
        self.metrics.also = trackers.log
        try:
            return self._run(resumed)
        finally:
            trackers.finish()
            self.metrics.also = None

    def _run(self, resumed: bool) -> dict[str, Any]:
        if not resumed:
            self._write_config()
            self._evaluate("base")
        interrupted = self._train_loop()
        if interrupted:
            self._save_checkpoint()
            self.echo(f"lorakit: interrupted at step {self.step}; checkpoint saved, continue with --resume")
            return {"interrupted": True, "step": self.step}
        final = self._evaluate("tuned")
        plot = None
        if self.dist.is_main:
            save_adapter(self.model, self.out / "adapter")
            if self.config.add_tokens:  # the extended tokenizer goes with the adapter; load_adapter grows the base
                self.tokenizer.save_pretrained(self.out / "adapter")
            plot = plot_metrics(self.out / "metrics.jsonl", self.out / "loss.png")
        self._save_checkpoint()  # on every rank: it gathers their RNG states and waits for rank 0's files
        self.echo(f"lorakit: adapter: {self.out / 'adapter'}  metrics: {self.out / 'metrics.jsonl'}  "
                  + (f"plot: {plot}" if plot else "no plot written: matplotlib is missing (pip install matplotlib)"))
        return final

    def _train_loop(self) -> bool:
        """Train to total_steps; returns True if interrupted by Ctrl-C / SIGTERM (after finishing the step)."""
        config = self.config
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not self.dist.is_main, dynamic_ncols=True,
                   desc="train", file=sys.stderr)
        window_tokens, window_start = 0, time.perf_counter()
        with bar, stop_signals() as stop:
            self.wrapped.train()
            while self.step < self.total_steps:
                if self.dist.any(stop.requested):
                    return True
                loss, tokens = self._optimizer_step()
                if not math.isfinite(loss):
                    raise ValueError(f"training diverged: the loss of step {self.step + 1} is {loss}; stopped "
                                     "without saving, the last checkpoint is kept (lower --lr or --max-grad-norm)")
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
        return False

    def _optimizer_step(self) -> tuple[float, int]:
        """One optimizer step over grad_accum micro-batches; returns the loss (all ranks) and tokens seen (all ranks).

        The step's loss is the sum over every loss token of every micro-batch and rank divided by their global count
        (loss.py; logits only where a label is).
        """
        config = self.config
        examples = next(self.stream)
        batches = [{k: v.to(self.dist.device) for k, v in collate(examples[i:i + config.batch_size],
                                                                   self.tokenizer.pad_token_id).items()}
                   for i in range(0, len(examples), config.batch_size)]
        loss_tokens, tokens = self.dist.sum_ints([sum(map(loss_token_count, batches)),
                                                  sum(int(b["attention_mask"].sum()) for b in batches)])
        total_loss = 0.0
        for index, batch in enumerate(batches):
            with self.dist.no_sync(self.wrapped, last=index == len(batches) - 1):
                with torch.autocast(self.dist.device.type, dtype=torch.bfloat16, enabled=self.autocast is not None):
                    loss = summed_token_loss(self.wrapped, batch) / max(loss_tokens, 1)
                penalty = self.allocator.orthogonal_penalty() / len(batches) if self.allocator else 0.0  # AdaLoRA
                self.dist.scale_loss(loss + penalty).backward()
            total_loss += loss.item()
        self.dist.reduce_gradients(self.wrapped)
        if config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                                           config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        if self.allocator:
            self.allocator.update_and_allocate(self.step)
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
            self._say_removed(save_checkpoint(self.out / "checkpoint", self.model, self.optimizer, self.scheduler,
                                              extra, rng_states=rng_states))
        self.dist.barrier()

    def _say_removed(self, removed: list[Path]) -> None:
        if removed:
            self.echo(f"lorakit: removed {len(removed)} unfinished checkpoint temporaries of runs no longer running: "
                      + ", ".join(path.name for path in removed))

    def _find_checkpoint(self) -> tuple[SavedCheckpoint, str | None]:
        """The checkpoint --resume continues from, read and checked before any model is loaded."""
        try:
            saved, recovered = find_resumable(self.out / "checkpoint")
        except (ValueError, OSError) as error:
            kind = FileNotFoundError if isinstance(error, FileNotFoundError) else ValueError
            raise kind(f"--resume: {error}") from None
        config = saved.extra["config"]
        for key in ("model", "method", "r", "targets", "quantize", "batch_size", "grad_accum", "seed"):
            if config.get(key) != getattr(self.config, key):
                raise ValueError(f"--resume: the checkpoint {saved.path} was made with {key}={config.get(key)!r}, "
                                 f"not {getattr(self.config, key)!r}")
        if saved.state["world_size"] != self.dist.world_size:
            raise ValueError(f"--resume: the checkpoint {saved.path} was made with {saved.state['world_size']} "
                             f"process(es), not {self.dist.world_size}")
        return saved, recovered

    def _resume(self) -> None:
        assert self.saved is not None
        stream = self.saved.state["stream"]
        for key, value in self.stream.state_dict().items():  # where it stood may differ, not what it streams
            if key not in ("epoch", "index") and (type(stream[key]) is not type(value) or stream[key] != value):
                raise ValueError(f"--resume: the checkpoint {self.saved.path} was made with stream {key}="
                                 f"{stream[key]!r}, this run has {value!r} (different data, batch size or seed?)")
        if self.saved.step > self.total_steps:
            raise ValueError(f"--resume: the checkpoint {self.saved.path} is at step {self.saved.step}, past this "
                             f"run's {self.total_steps} steps (raise --max-steps or --epochs)")
        restore(self.saved, self.model, self.optimizer, self.scheduler, rank=self.dist.rank)
        self.stream.load_state_dict(stream)
        self.step = self.saved.step
        try:
            self.metrics.truncate_after(self.step)
        except (ValueError, TypeError, KeyError) as error:
            raise ValueError(f"--resume: {self.metrics.path}: not a lorakit metrics log ({error!r:.80})") from None
        if self.recovered:
            self.echo(f"lorakit: {self.recovered}")
        self.echo(f"lorakit: resumed from step {self.step}")

    def _resolved_config(self) -> dict[str, Any]:
        """Every option as this run resolved it (train_config.json, and the trackers' config)."""
        return dataclasses.asdict(self.config) | {"seq_len": self.data.seq_len, "total_steps": self.total_steps,
                                                  "adapter": self.config.adapter_config().to_peft_dict()}

    def _write_config(self) -> None:
        if self.dist.is_main:
            text = json.dumps(self._resolved_config(), indent=2, default=str)
            (self.out / "train_config.json").write_text(text + "\n")


class StopRequest:
    """Set by SIGINT / SIGTERM inside `stop_signals()`; the loop stops after the step in progress."""

    requested = False


@contextlib.contextmanager
def stop_signals() -> Iterator[StopRequest]:
    """Turn Ctrl-C and SIGTERM into a request to stop cleanly; the previous handlers come back on exit."""
    request = StopRequest()

    def handle(signum: int, frame: Any) -> None:
        request.requested = True

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, handle)
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def train(config: TrainConfig) -> dict[str, Any]:
    """Run `lorakit train` from Python."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    limit_heap_retention()
    return Trainer(config).run()

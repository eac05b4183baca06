"""The main job, `lorakit train`, against the same run written the usual way: PEFT + `transformers.Trainer`.

What: per data set, a LoRA fine-tune of the same base with the same data, adapter and schedule, once by lorakit and
once by PEFT + transformers.Trainer, compared on step time, tokens/s, peak memory, final exact match and final loss.
Goals: lorakit's median step ≤ 0.75× the peer's, peak RSS no higher, exact match no lower.

How: every run is a subprocess of this script (`--worker ...`), started one after the other and measured by
`memwatch.run_measured` (peak anonymous and total RSS of its process tree, wall time). The two timed sides run once
per seed of `--seeds` (default 0,1,2: the seed draws the built-in task's dates, the initial adapter and the batch
order, the same on both sides), in the order lorakit, peer, peer, lorakit, …, so that a drift in the machine's speed
during the run hits both; each side's figures pool its seeds (exact match: the mean, since one seed's exact match
moves by an example or two with the trajectory):
- `lorakit`: lorakit's own Trainer (`lorakit.training.Trainer`, the object behind `lorakit train`) driven from
  Python so that each `trainer._optimizer_step()` (batch fetch + collate, forward, backward, clip, AdamW, schedule)
  is timed on its own, with the heap setting `lorakit train` makes (`limit_heap_retention`); then `evaluate_exact_match` on the held-out examples. No base evaluation, no saving.
- `peer`: `AutoModelForCausalLM.from_pretrained` + `peft.PeftModel.from_pretrained(..., is_trainable=True)` on
  lorakit's initial adapter for the seed (written before both runs by an unmeasured `--worker initial`) + `transformers.Trainer`; each
  optimizer step timed by a TrainerCallback from on_step_begin to on_step_end (forward, backward, clip, AdamW,
  schedule; the batch is fetched and collated before on_step_begin, so the peer's window is the narrower one);
  then the same `evaluate_exact_match` on the same examples.
- `cli`: the real command line (first seed), for its full wall time and peak memory (it also evaluates the base first and writes
  the adapter and a checkpoint); its exact match and last loss come from its metrics.jsonl.
The first 2 steps of each timed run are warm-up and left out of the medians and tokens/s.

Commands (M = --model, N = --steps, OUT a temporary directory; chat adds `--data train.jsonl --eval-data eval.jsonl
--chat`):
    python benchmarks/bench_main_job.py                    # smollm2-135m, 60 steps, both data sets
    python benchmarks/bench_main_job.py --quick            # tiny-llama, 4 steps, 16 held-out examples: a smoke run
    python -m lorakit train --model M --max-steps N --batch-size 8 --rank 8 --alpha 16 --dropout 0 \
        --targets all-linear --lr 1e-3 --warmup-steps 10 --max-grad-norm 1.0 --seed 0 --eval-samples 100 \
        --save-every 0 --log-every 1 --threads 2 --dtype float32 --builtin-train-size 800 --output-dir OUT

Data: (1) the built-in date task, `make_builtin_task(seed=0, n_train=800, n_eval=100)`, prompt/completion (loss on
the completion + EOS); (2) the same dates as chat: `{"messages": [system?, user, assistant]}` JSONL, the user asking
"Convert 2024-03-07 to ledger format.", the assistant answering "07 MAR 2024 / Q1", half the records with a system
turn of one of several lengths; rendered by the tokenizer's chat template, loss on the assistant turn only.

Fairness: both sides tokenize through lorakit's own `load_datasets` (`tokenize_records`) with the same options, so
the token ids, labels and held-out prompts are identical (checked: a hash of them is compared); the same base
weights in float32; LoRA r=8, alpha=16, dropout 0 on every linear layer but lm_head ("all-linear" on both sides,
checked by the trainable parameter count) and the same initial adapter values (checked: a hash of them); batch 8;
each side's default AdamW (lr 1e-3, weight decay 0; the fused kernel on both: the Trainer's `adamw_torch_fused`,
built by `Trainer.get_optimizer_cls_and_kwargs`) with the same LambdaLR built from lorakit's
`cosine_with_warmup(10, N)` (checked: the learning rate of every step is compared);
max_grad_norm 1.0; the same seed; 2 threads; no workers, no evaluation during training, no checkpoints in the timed runs.
Same batches: the peer's Trainer reads, in order (`train_sampling_strategy="sequential"`), the examples lorakit's
seeded BatchStream yields for the run's steps, so step k of both sides is the same 8 examples and the step times
compare like for like (with each side's own sampler the steps drew different lengths, and the medians moved by
about ±20% with the draw). The loss is the per-token mean on both sides
(lorakit computes logits only where a label is; the peer's model computes them everywhere, as it normally does).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

BATCH, RANK, ALPHA, LR, WARMUP, SEED, MAX_GRAD_NORM, THREADS = 8, 8, 16, 1e-3, 10, 0, 1.0, 2  # SEED: the chat data's
N_TRAIN = 800
SKIP = 2  # warm-up steps left out of the timings
DATASETS = ("builtin", "chat")
RUNNERS = ("lorakit", "peer", "cli")
PAIR = ("lorakit", "peer")  # the timed sides, run in alternating order over --seeds
LABELS = {"lorakit": "lorakit (Trainer, timed)", "peer": "PEFT + transformers.Trainer", "cli": "`lorakit train` (CLI)"}
TARGET_RATIO = 0.75
SYSTEM_PROMPTS = (
    "You are a careful assistant.",
    "You convert dates for an accounting team. Answer with the converted date only.",
    ("You are a meticulous bookkeeping assistant. Our ledgers write a date as the day, the month's abbreviation in "
     "capitals, the year, a slash and the quarter."),
    "Be brief.",
)


# ---------------------------------------------------------------------------------------------------------------
# Data and configuration shared by the parent and the workers


def write_chat_data(directory: Path, n_eval: int) -> tuple[Path, Path]:
    """The built-in task's records as chat conversations: train.jsonl and eval.jsonl under `directory`."""
    from lorakit.training.task import make_builtin_task

    train, held_out = make_builtin_task(seed=SEED, n_train=N_TRAIN, n_eval=n_eval)
    rng = random.Random(f"bench-main-job-chat:{SEED}")
    paths = []
    for name, records in (("train", train), ("eval", held_out)):
        path = directory / f"{name}.jsonl"
        with path.open("w") as file:
            for record in records:
                messages = []
                if rng.random() < 0.5:
                    messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
                messages += [{"role": "user", "content": record["prompt"].strip()},
                             {"role": "assistant", "content": record["completion"]}]
                file.write(json.dumps({"messages": messages}) + "\n")
        paths.append(path)
    return paths[0], paths[1]


def train_options(model: str, steps: int, n_eval: int, dataset: str, data_dir: Path, output_dir: Path,
                  dtype: str, seed: int) -> dict[str, Any]:
    """The `TrainConfig` fields of every run (the CLI flags are derived from them)."""
    options: dict[str, Any] = {
        "model": model, "max_steps": steps, "batch_size": BATCH, "r": RANK, "alpha": float(ALPHA), "dropout": 0.0,
        "targets": "all-linear", "lr": LR, "warmup_steps": WARMUP, "max_grad_norm": MAX_GRAD_NORM, "seed": seed,
        "eval_samples": n_eval, "save_every": 0, "log_every": 1, "threads": THREADS, "dtype": dtype,
        "output_dir": str(output_dir),
    }
    if dataset == "builtin":
        options["builtin_train_size"] = N_TRAIN
    else:
        options |= {"data": str(data_dir / "train.jsonl"), "eval_data": str(data_dir / "eval.jsonl"), "chat": True}
    return options


def cli_args(options: dict[str, Any]) -> list[str]:
    flags = {"r": "--rank"}
    args = []
    for key, value in options.items():
        flag = flags.get(key, "--" + key.replace("_", "-"))
        args += [flag] if value is True else [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    return ["-m", "lorakit", "train", *args]


def data_digest(train: list[dict], held_out: list[dict]) -> str:
    """A hash of the training token ids and labels and of the held-out prompts and answers."""
    payload = json.dumps([[(e["input_ids"], e["labels"]) for e in train],
                          [(e.get("prompt_ids"), e.get("answer")) for e in held_out]])
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def tensors_digest(tensors: dict[str, Any]) -> str:
    """A hash of named tensors' float32 values, in the names' order (adapter files' keys on both sides)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------
# Workers (each in its own process)


def initial_adapter_worker(ns: argparse.Namespace, options: dict[str, Any]) -> None:
    """lorakit's initial adapter for this seed, in PEFT's format: both timed sides start from these values."""
    from lorakit import save_adapter
    from lorakit.training import TrainConfig, Trainer

    save_adapter(Trainer(TrainConfig(**options), echo=lambda _: None).model, ns.initial_adapter)


def lorakit_worker(ns: argparse.Namespace, options: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(THREADS)
    from lorakit import adapter_state_dict
    from lorakit.models.stream import limit_heap_retention
    from lorakit.training import TrainConfig, Trainer
    from lorakit.training.evaluate import evaluate_exact_match

    limit_heap_retention()  # as `lorakit train` (training.train) does before it builds its Trainer
    trainer = Trainer(TrainConfig(**options), echo=lambda _: None)
    initial = tensors_digest(adapter_state_dict(trainer.model))  # now: the tensors are the live parameters
    trainer.wrapped.train()
    times, tokens, lrs, losses = [], [], [], []
    for _ in range(trainer.total_steps):
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
        start = time.perf_counter()
        loss, n_tokens = trainer._optimizer_step()
        times.append(time.perf_counter() - start)
        trainer.step += 1
        tokens.append(n_tokens)
        losses.append(loss)
    held_out = trainer.data.eval[:ns.eval_samples]
    scores = evaluate_exact_match(trainer.model, trainer.tokenizer, held_out)
    return {"times": times, "tokens": tokens, "lrs": lrs, "final_loss": losses[-1],
            "exact_match": scores.get("exact_match"), "n_scored": scores.get("n_scored"),
            "sample": (scores.get("samples") or [None])[0],
            "trainable": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
            "digest": data_digest(trainer.data.train, held_out), "n_train": len(trainer.data.train),
            "seq_len": trainer.data.seq_len, "initial_digest": initial}


def peer_worker(ns: argparse.Namespace, options: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(THREADS)
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    from lorakit.models import prepare_tokenizer, resolve_model
    from lorakit.training import TrainConfig, cosine_with_warmup, load_datasets
    from lorakit.training.batches import BatchStream
    from lorakit.training.data import collate
    from lorakit.training.evaluate import evaluate_exact_match

    config = TrainConfig(**options)
    directory = resolve_model(config.model)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=getattr(torch, config.dtype))
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(directory))
    data = load_datasets(config, tokenizer, getattr(model.config, "max_position_embeddings", None))
    stream = BatchStream(data.train, BATCH, seed=config.seed, group_by_length=config.group_by_length)
    in_lorakit_order = [example for _ in range(config.max_steps) for example in next(stream)]
    torch.manual_seed(config.seed)
    model = peft.PeftModel.from_pretrained(model, ns.initial_adapter, is_trainable=True)
    initial = tensors_digest(peft.get_peft_model_state_dict(model))  # now: the tensors are the live parameters
    params = [p for p in model.parameters() if p.requires_grad]
    tokens: list[int] = []

    def collator(batch: list[dict]) -> dict[str, torch.Tensor]:
        out = collate(batch, tokenizer.pad_token_id)
        tokens.append(int(out["attention_mask"].sum()))
        return out

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.lrs: list[float] = []
            self.losses: list[float] = []
            self.start = 0.0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.lrs.append(kwargs["optimizer"].param_groups[0]["lr"])
            self.start = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.times.append(time.perf_counter() - self.start)

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    timer = StepTimer()
    arguments = TrainingArguments(
        output_dir=options["output_dir"], per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
        max_steps=config.max_steps, learning_rate=LR, max_grad_norm=MAX_GRAD_NORM, seed=config.seed, logging_steps=1,
        save_strategy="no", eval_strategy="no", report_to=[], dataloader_num_workers=0, remove_unused_columns=False,
        use_cpu=True, disable_tqdm=True, label_names=["labels"], train_sampling_strategy="sequential")
    optimizer_class, optimizer_options = Trainer.get_optimizer_cls_and_kwargs(arguments)  # the Trainer's default
    optimizer = optimizer_class(params, **optimizer_options)  # AdamW(fused=True), weight decay 0
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(WARMUP, config.max_steps))
    trainer = Trainer(model=model, args=arguments, train_dataset=in_lorakit_order, data_collator=collator,
                      optimizers=(optimizer, scheduler), callbacks=[timer])
    trainer.train()
    held_out = data.eval[:ns.eval_samples]
    scores = evaluate_exact_match(model, tokenizer, held_out)
    return {"times": timer.times, "tokens": tokens[:len(timer.times)], "lrs": timer.lrs,
            "final_loss": timer.losses[-1] if timer.losses else None,
            "exact_match": scores.get("exact_match"), "n_scored": scores.get("n_scored"),
            "sample": (scores.get("samples") or [None])[0], "trainable": sum(p.numel() for p in params),
            "digest": data_digest(data.train, held_out), "n_train": len(data.train), "seq_len": data.seq_len,
            "initial_digest": initial}


def run_worker(ns: argparse.Namespace) -> None:
    options = train_options(ns.model, ns.steps, ns.eval_samples, ns.dataset, ns.data_dir, ns.output_dir, ns.dtype,
                            ns.seed)
    if ns.worker == "initial":
        initial_adapter_worker(ns, options)
        return
    result = (lorakit_worker if ns.worker == "lorakit" else peer_worker)(ns, options)
    ns.result.write_text(json.dumps(result) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# The parent: run, measure, report


def cli_result(output_dir: Path) -> dict[str, Any]:
    """Exact match and last loss of a `lorakit train` run, from its metrics.jsonl."""
    path = output_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train = [r for r in records if "loss" in r and "tag" not in r]
    tuned = next((r for r in records if r.get("tag") == "tuned"), {})
    rates = [r["tokens_per_s"] for r in train][SKIP:] or [r["tokens_per_s"] for r in train]
    return {"final_loss": train[-1]["loss"] if train else None, "exact_match": tuned.get("exact_match"),
            "n_scored": tuned.get("n_scored"), "tokens_per_s_median": statistics.median(rates) if rates else None}


def run_one(runner: str, dataset: str, args: argparse.Namespace, work: Path, seed: int) -> dict[str, Any]:
    from memwatch import run_measured

    out = work / f"{dataset}-{runner}-seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    result_file = work / f"{dataset}-{runner}-seed{seed}.json"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    if runner == "cli":
        command = [sys.executable, *cli_args(train_options(args.model, args.steps, args.eval_samples, dataset, work,
                                                           out, args.dtype, seed))]
    else:
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", runner, "--dataset", dataset,
                   "--model", args.model, "--steps", str(args.steps), "--eval-samples", str(args.eval_samples),
                   "--dtype", args.dtype, "--seed", str(seed), "--data-dir", str(work), "--output-dir", str(out),
                   "--result", str(result_file),
                   "--initial-adapter", str(work / f"{dataset}-initial-adapter-seed{seed}")]
    if runner == "initial":  # not measured: the adapter both timed runs of this seed start from
        subprocess.run(command, env=env, cwd=ROOT, check=True, capture_output=True)
        return {}
    print(f"[{dataset}] {runner}: {shlex.join(['python', *command[1:]])}", file=sys.stderr, flush=True)
    measured = run_measured(command, env=env, cwd=ROOT)
    row: dict[str, Any] = {"runner": runner, "dataset": dataset, "returncode": measured.returncode,
                           "peak_anon_mib": measured.peak_anon_mib, "peak_total_mib": measured.peak_total_mib,
                           "wall_s": measured.wall_s}
    if measured.returncode != 0:
        print(f"[{dataset}] {runner} failed (status {measured.returncode}):\n{measured.stderr_tail[-3000:]}",
              file=sys.stderr, flush=True)
        return row
    if runner == "cli":
        return row | cli_result(out)
    return row | json.loads(result_file.read_text())


def pooled(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One side's seeds as one row: step median and tokens/s over every run's timed steps, the highest peak memory,
    the median wall time, the mean exact match and final loss; each seed's step median, exact match and checks kept."""
    failed = [run for run in runs if run["returncode"] != 0]
    if failed:
        return failed[0]
    kept = slice(SKIP, None)
    times = [t for run in runs for t in run["times"][kept]]
    tokens = [n for run in runs for n in run["tokens"][kept]]
    return runs[0] | {"step_ms": 1000 * statistics.median(times), "tokens_per_s": sum(tokens) / sum(times),
                      "exact_match": statistics.mean(run["exact_match"] for run in runs),
                      "final_loss": statistics.mean(run["final_loss"] for run in runs),
                      "seed_step_ms": [1000 * statistics.median(run["times"][kept]) for run in runs],
                      "seed_exact_match": [run["exact_match"] for run in runs],
                      "tokens": [run["tokens"] for run in runs], "lrs": [lr for run in runs for lr in run["lrs"]],
                      "digest": [run["digest"] for run in runs],
                      "initial_digest": [run["initial_digest"] for run in runs],
                      "peak_anon_mib": max(run["peak_anon_mib"] for run in runs),
                      "peak_total_mib": max(run["peak_total_mib"] for run in runs),
                      "wall_s": statistics.median(run["wall_s"] for run in runs)}


def fmt(value: Any, spec: str, scale: float = 1.0) -> str:
    return "—" if value is None else format(value * scale, spec)


def dataset_section(dataset: str, rows: dict[str, dict[str, Any]]) -> str:
    ours, peer, cli = rows.get("lorakit", {}), rows.get("peer", {}), rows.get("cli", {})
    header = ["run", "median step (ms)", "tokens/s", "peak anon RSS (MiB)", "peak total RSS (MiB)", "wall (s)",
              "exact match", "final loss"]
    body = []
    for runner in RUNNERS:
        row = rows.get(runner, {})
        if not row or row.get("returncode"):
            body.append([LABELS[runner], *["failed"] + ["—"] * (len(header) - 2)])
            continue
        rate = row.get("tokens_per_s", row.get("tokens_per_s_median"))
        em = row.get("exact_match")
        body.append([LABELS[runner], fmt(row.get("step_ms"), ".0f"), fmt(rate, ",.0f"),
                     fmt(row["peak_anon_mib"], ".0f"), fmt(row["peak_total_mib"], ".0f"), fmt(row["wall_s"], ".1f"),
                     "—" if em is None else f"{100 * em:.1f}% of {row.get('n_scored')}, mean of "
                     f"{len(row['seed_exact_match'])} seeds" if "seed_exact_match" in row else
                     f"{100 * em:.0f}% of {row.get('n_scored')}",
                     fmt(row.get("final_loss"), ".4f")])
    name = {"builtin": "built-in date task (prompt/completion)",
            "chat": "chat-format date task (messages, system turn on half)"}[dataset]
    lines = [f"**{name}**", "", table(header, body), ""]
    if not ours.get("step_ms") or not peer.get("step_ms"):
        return "\n".join(lines + ["- Not compared: a run failed (see the log)."])
    checks = []
    checks.append("identical token ids" if ours["digest"] == peer["digest"] else "**token ids differ**")
    lr_gap = max(abs(a - b) for a, b in zip(ours["lrs"], peer["lrs"])) if ours["lrs"] and peer["lrs"] else None
    checks.append("the same tokens at every step" if ours["tokens"] == peer["tokens"] else "**batches differ**")
    checks.append(f"learning rates of all {len(ours['lrs'])} steps equal" if lr_gap is not None and lr_gap < 1e-12
                  else f"**learning rates differ** (max gap {lr_gap})")
    checks.append(f"{ours['trainable']:,} trainable parameters on both sides" if ours["trainable"] == peer["trainable"]
                  else f"**trainable parameters differ** ({ours['trainable']:,} vs {peer['trainable']:,})")
    checks.append("the same initial adapter values" if ours["initial_digest"] == peer["initial_digest"]
                  else "**initial adapter values differ**")
    lines.append(f"Checks: {', '.join(checks)}; {ours['n_train']} training examples of at most {ours['seq_len']} "
                 "tokens.")
    seeds = "; ".join(f"{LABELS[side]} {', '.join(f'{ms:.0f}' for ms in row['seed_step_ms'])} ms (exact match "
                      f"{', '.join(fmt(em, '.0%') for em in row['seed_exact_match'])})" for side, row in
                      (("lorakit", ours), ("peer", peer)))
    lines.append(f"Each seed's median step (run order lorakit, peer, peer, lorakit, …): {seeds}.")
    ratio = round(ours["step_ms"] / peer["step_ms"], 2)
    rate_ratio = ours["tokens_per_s"] / peer["tokens_per_s"]
    lines.append(f"- Step time ≤ {TARGET_RATIO}× the peer's: {verdict(ratio <= TARGET_RATIO)} ({ratio:.2f}×; "
                 f"tokens/s {rate_ratio:.2f}× the peer's).")
    anon, total = ours["peak_anon_mib"] / peer["peak_anon_mib"], ours["peak_total_mib"] / peer["peak_total_mib"]
    cli_note = (f"; the CLI, which also evaluates the base and saves, {cli['peak_anon_mib'] / peer['peak_anon_mib']:.2f}×"
                f" / {cli['peak_total_mib'] / peer['peak_total_mib']:.2f}×" if cli.get("returncode") == 0 else "")
    lines.append(f"- Peak memory no higher than the peer's: {verdict(round(anon, 2) <= 1 and round(total, 2) <= 1)} "
                 f"(anonymous {anon:.2f}×, total {total:.2f}×{cli_note}).")
    if ours.get("exact_match") is not None and peer.get("exact_match") is not None:
        lines.append(f"- Exact match no lower than the peer's: {verdict(ours['exact_match'] >= peer['exact_match'])}"
                     f" ({100 * ours['exact_match']:.1f}% vs {100 * peer['exact_match']:.1f}%, the mean over the "
                     f"seeds; final loss {ours['final_loss']:.4f} vs {peer['final_loss']:.4f}).")
    return "\n".join(lines)


def describe(args: argparse.Namespace) -> str:
    return (f"`{args.model}`, frozen base in {args.dtype} (adapters float32 on both sides), LoRA r={RANK} alpha={ALPHA} dropout 0 on all linear layers but lm_head, batch "
            f"{BATCH}, AdamW lr {LR:g} (weight decay 0), {WARMUP} warm-up steps then cosine to 0 over {args.steps} "
            f"steps, max_grad_norm {MAX_GRAD_NORM}, seeds {args.seeds}, {THREADS} threads; {N_TRAIN} training / "
            f"{args.eval_samples} held-out examples, exact match by greedy decoding (`evaluate_exact_match`) on the same held-out "
            "examples for both. Each run is its own process, one after the other, each side run once per seed "
            "(the seed draws the built-in task's dates, the initial adapter and the batch order, the same on both "
            "sides) in the order lorakit, peer, peer, lorakit… (a drift in the machine's speed hits both sides); the "
            "step median and tokens/s pool the seeds' steps, leaving out each run's first "
            f"{SKIP}; exact match and final loss are the means over the seeds; peak RSS of its process tree "
            "(`memwatch`), the highest of the seeds. The timed lorakit run drives "
            "`lorakit.training.Trainer` and times `_optimizer_step()` (batch fetch and collate included); the peer's "
            "window is on_step_begin→on_step_end (batch already collated). Both sides train on the same batches in "
            "the same order (the Trainer reads lorakit's BatchStream order sequentially) from the same initial "
            "adapter (the peer loads lorakit's with `PeftModel.from_pretrained`), each with its own default "
            "optimizer: AdamW with the fused kernel. The CLI row is the real `lorakit train` command (base evaluation, adapter and checkpoint "
            "saving included), on the first seed: its tokens/s is the median of metrics.jsonl's per-step figures."
            + (f" **--quick**: {args.steps} steps of a tiny model; the figures only show that every run works, the "
               "timings are noise." if args.quick else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="base model (default: smollm2-135m; --quick: tiny-llama)")
    parser.add_argument("--steps", type=int, help="optimizer steps (default: 60; --quick: 4)")
    parser.add_argument("--eval-samples", type=int, help="held-out examples scored (default: 100; --quick: 16)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="the frozen base's dtype on both sides (bfloat16 pays on CPUs with AVX512-BF16 or AMX)")
    parser.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated subset of builtin,chat")
    parser.add_argument("--quick", action="store_true", help="tiny-llama, 4 steps, 16 held-out examples: checks that everything runs")
    parser.add_argument("--seeds", default="0,1,2",
                        help="comma-separated seeds, one timed run per side each, in the order lorakit, peer, peer, "
                             "lorakit, … (default: 0,1,2)")
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=(*PAIR, "initial"), help=argparse.SUPPRESS)
    parser.add_argument("--initial-adapter", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--dataset", choices=DATASETS, help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--output-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    add_report_options(parser)
    args = parser.parse_args()
    args.model = args.model or ("tiny-llama" if args.quick else "smollm2-135m")
    args.steps = args.steps or (4 if args.quick else 60)
    args.eval_samples = args.eval_samples or (16 if args.quick else 100)
    if args.worker:
        run_worker(args)
        return
    try:
        seeds = [int(seed) for seed in args.seeds.split(",") if seed.strip()]
    except ValueError:
        parser.error(f"--seeds takes comma-separated integers, not {args.seeds!r}")
    if not seeds:
        parser.error("--seeds needs at least one seed")
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    unknown = set(datasets) - set(DATASETS)
    if unknown:
        parser.error(f"unknown data set(s) {', '.join(sorted(unknown))}; choose from {', '.join(DATASETS)}")
    from lorakit.models import resolve_model

    resolve_model(args.model)  # build a built-in model's cache before any measured run
    sections = [describe(args)]
    failed = False
    with tempfile.TemporaryDirectory(prefix="bench-main-job-") as tmp:
        work = Path(tmp)
        if "chat" in datasets:
            write_chat_data(work, args.eval_samples)
        for dataset in datasets:
            runs: dict[str, list[dict[str, Any]]] = {"lorakit": [], "peer": []}
            for index, seed in enumerate(seeds):  # lorakit, peer, peer, lorakit, …: a drift in speed hits both
                run_one("initial", dataset, args, work, seed)
                for runner in PAIR if index % 2 == 0 else PAIR[::-1]:
                    runs[runner].append(run_one(runner, dataset, args, work, seed))
            rows = {runner: pooled(side) for runner, side in runs.items()}
            rows["cli"] = run_one("cli", dataset, args, work, seeds[0])
            for row in rows.values():
                print(json.dumps({k: v for k, v in row.items() if k not in ("times", "tokens", "lrs", "sample")}),
                      flush=True)
                failed |= row["returncode"] != 0
            sections.append(dataset_section(dataset, rows))
    sections.append("Exact commands: `python -m lorakit train --model M --max-steps N --batch-size 8 --rank 8 "
                    "--alpha 16 --dropout 0 --targets all-linear --lr 0.001 --warmup-steps 10 --max-grad-norm 1 "
                    "--seed S --eval-samples E --save-every 0 --log-every 1 --threads 2 --dtype D "
                    "--output-dir OUT` (S = the first seed, E = --eval-samples, D = --dtype) plus `--builtin-train-size 800` (built-in task) or `--data train.jsonl "
                    "--eval-data eval.jsonl --chat` (chat); the workers are this script's hidden `--worker` modes.")
    emit(args, f"Main job vs PEFT + transformers.Trainer: {args.model}, {args.dtype} base", "\n\n".join(sections))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))  # report.py and memwatch.py, also when run from elsewhere
    from report import add_report_options, emit, table, verdict

    main()

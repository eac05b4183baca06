"""Big bases: peak memory of LoRA / QLoRA training on real-shape checkpoints, lorakit's streaming NF4 load against
PEFT + transformers + bitsandbytes, the planner's prediction against the measurement, and NF4 quantize throughput.

    python benchmarks/bench_big_base.py                                  # TinyLlama-1.1B shape, 2 steps, seq 64
    python benchmarks/bench_big_base.py --shapes tinyllama-1.1b,llama2-7b  # also Llama-2-7B (seq 128; ~14 GB disk)
    python benchmarks/bench_big_base.py --quick                          # the "tiny" shape, 1 step: a smoke run
    python benchmarks/bench_big_base.py --workdir /tmp/big               # reuse checkpoints written there before

What it measures, per shape (a random-init bf16 checkpoint written by `big_models.write_model` under --workdir, with
lorakit's byte tokenizer saved next to it), each case a separate process run to completion, one at a time, its
whole process tree sampled by `memwatch.run_measured` every 50 ms:
- lorakit, through its command line (`python -m lorakit train --model DIR --output-dir OUT --max-steps S
  --batch-size 1 --seq-len L --eval-samples 0 --data TRAIN.jsonl --save-every 0 --log-every 1 --r 8
  --targets all-linear` plus `--quantize nf4 --dtype float32`, `--quantize nf4 --dtype bfloat16`, `--dtype bfloat16`
  or `--dtype float32`; the dense float32 case is skipped above 3B parameters). TRAIN.jsonl holds 16 texts of L-1
  random letters, i.e. exactly L byte tokens with the EOS, so every step sees batch 1 x L tokens like the peer and the
  planner (the built-in date task, `--builtin-data`, gives 54-token examples whatever L is). The CLI holds one of
  them out and scores its loss before and after training (it refuses an empty eval set); `--eval-samples 0` turns
  off the generation-based exact-match evaluation.
- the peer, this script in its hidden `--peer-run` mode: `AutoModelForCausalLM.from_pretrained(DIR,
  quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
  bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=DT), dtype=DT)` for NF4 (DT float32 and bfloat16), or
  `from_pretrained(DIR, dtype=bfloat16)` for the dense comparison, then `peft.get_peft_model` with
  `LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")`, AdamW lr 1e-3, S steps of
  batch 1 x L random token ids (labels = input ids). `peft.prepare_model_for_kbit_training` is not called: it casts
  every non-quantized weight to float32, which a user on a small machine would skip.
- the runtime: a process that imports torch, transformers and lorakit and exits.
- the plan: `python -m lorakit inspect plan --model DIR --method lora --r 8 --targets all-linear --batch 1 --seq L
  --no-gradient-checkpointing [--quantize nf4] --dtype DT` (its CLI entry point called in this process, which only
  reads config.json), whose "this run ... peak X GB" (10^9 bytes) plus the runtime's anonymous peak is the
  prediction compared with each lorakit case's anonymous peak.
- quantize throughput on the same tensors: `lorakit.load_model(DIR, dtype="bfloat16", quantize="nf4")` timed in a
  process of its own (reading, building the model and quantizing every *_proj weight of the decoder layers), against
  `bitsandbytes.functional.quantize_4bit(t, blocksize=64, compress_statistics=True, quant_type="nf4")` on each of
  those tensors read with `safetensors.safe_open` (quantize calls and reads timed separately).

Why two memory figures: VmRSS ("total", what `top` shows) also counts the pages of files a process has mmapped, such
as the safetensors shards transformers and lorakit read from; those are page cache the kernel can drop at any time.
RssAnon + RssShmem ("anonymous": heap, tensors) is what must fit in RAM, so the targets are mostly on it; total is
given because it is what users see, and because a loader that maps the whole checkpoint at once inflates it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import random
import re
import shutil
import string
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from big_models import SHAPES, tensor_specs, write_model
from memwatch import Measurement, run_measured
from report import add_report_options, emit, table, verdict

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TITLE = "Big bases: streaming load, NF4 and memory"
DEFAULT_SEQ = {"tinyllama-1.1b": 64, "llama2-7b": 128, "llama2-13b": 128, "tiny": 64}
DENSE_FP32_MAX_PARAMS = 3e9  # above this the float32 dense case would need > 12 GB (27 GB for 7B): skipped
TRAIN_RECORDS = 16
MIB = 2**20
GIB = 2**30
UNITS = {"GB": 1e9, "MB": 1e6, "KB": 1e3, "B": 1.0}
QUANTIZED_NAME = re.compile(r"model\.layers\.\d+\..+_proj\.weight")
# targets (lorakit / peer ratios are judged as printed, to 2 decimals; deviations to whole percent)
SMALL_NF4_ANON, SMALL_NF4_TOTAL, PLAN_DEVIATION = 0.9, 0.75, 25
BIG_NF4_ANON_GIB, BIG_NF4_TOTAL_GIB, BIG_DENSE_BF16_ANON_GIB = 5, 7, 16
QUANTIZE_SPEEDUP = 1.5
STDERR_SHOWN = 1500


@dataclass(frozen=True)
class Case:
    key: str
    label: str
    library: str  # "lorakit", "peer" or "runtime"
    quantize: bool = False
    dtype: str = "float32"
    peer: str | None = None  # key of the matching peer case

    def plan_args(self, directory: Path, seq: int) -> list[str]:
        return ["inspect", "plan", "--model", str(directory), "--method", "lora", "--r", "8", "--targets",
                "all-linear", "--batch", "1", "--seq", str(seq), "--no-gradient-checkpointing",
                *(["--quantize", "nf4"] if self.quantize else []), "--dtype", self.dtype]


@dataclass
class Result:
    shape: str
    case: str
    measurement: Measurement | None = None
    plan_bytes: float | None = None
    plan_error: str | None = None
    notes: list[str] = field(default_factory=list)
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.measurement is not None and self.measurement.returncode == 0


# ---------------------------------------------------------------------------------------------------------------
# Hidden modes: the peer's training run and the two quantize-throughput runs, each in a process of its own


def peer_run(args: argparse.Namespace) -> None:
    import peft
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = getattr(torch, args.peer_dtype)
    start = time.perf_counter()
    if args.peer_quantize == "nf4":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=dtype)
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, quantization_config=quant, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype)
    load_s = time.perf_counter() - start
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, config).train()
    ids = torch.randint(0, model.config.vocab_size, (1, args.seq), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses, step_s = [], []
    for _ in range(args.steps):
        begin = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_s.append(time.perf_counter() - begin)
        losses.append(loss.item())
    print("RESULT " + json.dumps({"load_s": load_s, "step_s": step_s, "losses": losses}), flush=True)


def checkpoint_tensors(directory: Path) -> dict[str, Path]:
    """Tensor name -> shard file, from the index (sharded) or the single file's header."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        return {name: directory / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    from safetensors import safe_open

    single = directory / "model.safetensors"
    with safe_open(single, framework="pt") as handle:
        return dict.fromkeys(handle.keys(), single)


def quantize_run_lorakit(directory: Path) -> None:
    import lorakit
    from lorakit import NF4Linear

    start, cpu_start = time.perf_counter(), time.process_time()
    model, _ = lorakit.load_model(directory, dtype="bfloat16", quantize="nf4", progress=False)
    seconds, cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    params = sum(m.out_features * m.in_features for m in model.modules() if isinstance(m, NF4Linear))
    layers = sum(isinstance(m, NF4Linear) for m in model.modules())
    print("RESULT " + json.dumps({"seconds": seconds, "cpu_s": cpu_s, "params": params, "tensors": layers}),
          flush=True)


def quantize_run_bnb(directory: Path) -> None:
    import bitsandbytes.functional as bnbf
    import torch
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for name, file in checkpoint_tensors(directory).items():
        if QUANTIZED_NAME.fullmatch(name):
            by_file.setdefault(file, []).append(name)
    read_s = quantize_s = cpu_s = 0.0
    params = tensors = 0
    for file, names in sorted(by_file.items()):
        with safe_open(file, framework="pt") as handle:
            for name in sorted(names):
                begin = time.perf_counter()
                tensor = handle.get_tensor(name).to(torch.bfloat16)  # already bf16: no copy
                read_s += time.perf_counter() - begin
                begin, cpu_begin = time.perf_counter(), time.process_time()
                quantized = bnbf.quantize_4bit(tensor, blocksize=64, compress_statistics=True, quant_type="nf4")
                quantize_s += time.perf_counter() - begin
                cpu_s += time.process_time() - cpu_begin
                params += tensor.numel()
                tensors += 1
                del tensor, quantized
    print("RESULT " + json.dumps({"read_s": read_s, "quantize_s": quantize_s, "cpu_s": cpu_s, "params": params,
                                  "tensors": tensors}), flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Set-up


def shape_params(shape: str) -> int:
    return sum(math.prod(spec.shape) for spec in tensor_specs(SHAPES[shape]))


def prepare_model(shape: str, workdir: Path) -> Path:
    """The checkpoint (written unless already complete, with lorakit's byte tokenizer)."""
    directory = workdir / shape
    start = time.perf_counter()
    write_model(shape, directory)
    if time.perf_counter() - start > 1:
        print(f"wrote {shape} to {directory} in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return directory


def warm_page_cache(directory: Path) -> None:
    """Read every shard once, so each case (the first included) reads the checkpoint from the page cache."""
    for path in sorted(directory.glob("*.safetensors")):
        with path.open("rb") as file:
            while file.read(64 * MIB):
                pass


def training_data(workdir: Path, seq: int) -> Path:
    """16 texts of seq-1 random letters: with the byte tokenizer's EOS, exactly `seq` tokens each (checked)."""
    from lorakit.models import byte_tokenizer
    from lorakit.training.data import tokenize_records

    path = workdir / "data" / f"train-{seq}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seq)
    records = [{"text": "".join(rng.choice(string.ascii_lowercase + " ") for _ in range(seq - 1))}
               for _ in range(TRAIN_RECORDS)]
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    examples, _ = tokenize_records(records, byte_tokenizer(), seq, chat=False)
    lengths = {len(example["input_ids"]) for example in examples}
    if lengths != {seq}:
        print(f"warning: training texts tokenize to {sorted(lengths)} tokens, not {seq}", file=sys.stderr)
    return path


def source_version() -> str:
    """lorakit's commit, and whether src/ has uncommitted changes (a benchmark of moving code says so)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" + uncommitted changes in src/" if dirty else "")


def default_dtype() -> str:
    """What lorakit's --dtype auto picks on this machine (float32 on CPUs without native bfloat16)."""
    from lorakit.models.load import resolve_dtype

    return str(resolve_dtype("auto", "cpu")).removeprefix("torch.")


def cases_for(shape: str) -> list[Case]:
    cases = [
        Case("lorakit-nf4-float32", "lorakit NF4, float32", "lorakit", True, "float32", "peer-nf4-float32"),
        Case("peer-nf4-float32", "PEFT+bnb NF4, float32", "peer", True, "float32"),
        Case("lorakit-nf4-bfloat16", "lorakit NF4, bfloat16", "lorakit", True, "bfloat16", "peer-nf4-bfloat16"),
        Case("peer-nf4-bfloat16", "PEFT+bnb NF4, bfloat16", "peer", True, "bfloat16"),
        Case("lorakit-dense-bfloat16", "lorakit dense, bfloat16", "lorakit", False, "bfloat16",
             "peer-dense-bfloat16"),
        Case("peer-dense-bfloat16", "PEFT dense, bfloat16", "peer", False, "bfloat16"),
    ]
    if shape_params(shape) <= DENSE_FP32_MAX_PARAMS:
        cases.append(Case("lorakit-dense-float32", "lorakit dense, float32", "lorakit", False, "float32"))
    return cases


# ---------------------------------------------------------------------------------------------------------------
# Running the cases


def python() -> str:
    return sys.executable


def case_command(case: Case, directory: Path, out: Path, data: Path | None, args: argparse.Namespace,
                 seq: int) -> list[str]:
    if case.library == "peer":
        return [python(), str(Path(__file__).resolve()), "--peer-run", "--model-dir", str(directory), "--peer-quantize",
                "nf4" if case.quantize else "none", "--peer-dtype", case.dtype, "--steps", str(args.steps),
                "--seq-len", str(seq)]
    source = ["--builtin-train-size", "16"] if data is None else ["--data", str(data)]
    return [python(), "-m", "lorakit", "train", "--model", str(directory), "--output-dir", str(out), "--max-steps",
            str(args.steps), "--batch-size", "1", "--seq-len", str(seq), "--eval-samples", "0", *source,
            "--save-every", "0", "--log-every", "1", "--r", "8", "--targets", "all-linear",
            *(["--quantize", "nf4"] if case.quantize else []), "--dtype", case.dtype]


def result_line(text: str) -> dict[str, object]:
    for line in reversed(text.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {}


def plan_peak_bytes(case: Case, directory: Path, seq: int) -> tuple[float | None, str | None]:
    """The planner's "this run ... peak X" in bytes, from lorakit's CLI entry point (it reads config.json only)."""
    from lorakit.cli import main as lorakit_cli

    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            code = lorakit_cli(case.plan_args(directory, seq))
    except BaseException as error:  # noqa: BLE001 - an argparse exit or any planner error is reported, not fatal
        return None, f"{type(error).__name__}: {error} {buffer.getvalue()[-300:]}"
    for line in buffer.getvalue().splitlines():
        if line.startswith("this run"):
            match = re.search(r"peak ([\d.]+) (GB|MB|KB|B)\b", line)
            if match:
                return float(match.group(1)) * UNITS[match.group(2)], None
    return None, f"no 'this run ... peak' line (exit {code}): {buffer.getvalue()[-300:]}"


def report_json(shape: str, case: str, result: Result) -> None:
    m = result.measurement
    record = {"shape": shape, "case": case}
    if m is not None:
        record |= {k: v for k, v in asdict(m).items() if k not in ("stdout_tail", "stderr_tail")}
        if m.returncode != 0:
            record["stderr_tail"] = m.stderr_tail[-STDERR_SHOWN:]
    if result.plan_bytes is not None:
        record["plan_peak_bytes"] = result.plan_bytes
    record |= result.extra
    if result.notes:
        record["notes"] = result.notes
    print(json.dumps(record), flush=True)


def run_case(case: Case, shape: str, directory: Path, data: Path | None, args: argparse.Namespace,
             seq: int) -> Result:
    out = args.workdir / "runs" / shape / case.key
    shutil.rmtree(out, ignore_errors=True)
    print(f"[{shape}] {case.label} ...", file=sys.stderr, flush=True)
    measurement = run_measured(case_command(case, directory, out, data, args, seq), cwd=ROOT)
    result = Result(shape, case.key, measurement)
    if case.library == "peer":
        result.extra = result_line(measurement.stdout_tail)
    elif measurement.returncode == 0:
        metrics = out / "metrics.jsonl"
        rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
        steps = [row for row in rows if "loss" in row]
        result.extra = {"steps_logged": len(steps), "losses": [row["loss"] for row in steps],
                        "evals": sum("eval_loss" in row for row in rows)}
        if len(steps) != args.steps:
            result.notes.append(f"logged {len(steps)} training steps, not {args.steps}")
    if case.library == "lorakit":
        result.plan_bytes, result.plan_error = plan_peak_bytes(case, directory, seq)
        if result.plan_error:
            result.notes.append(f"plan: {result.plan_error}")
    shutil.rmtree(out, ignore_errors=True)
    report_json(shape, case.key, result)
    return result


def run_quantize(directory: Path, shape: str) -> dict[str, Result]:
    results = {}
    for library in ("lorakit", "bnb"):
        warm_page_cache(directory)
        print(f"[{shape}] quantize throughput: {library} ...", file=sys.stderr, flush=True)
        measurement = run_measured([python(), str(Path(__file__).resolve()), "--quantize-run", library,
                                    "--model-dir", str(directory)], cwd=ROOT)
        result = Result(shape, f"quantize-{library}", measurement, extra=result_line(measurement.stdout_tail))
        report_json(shape, result.case, result)
        results[library] = result
    return results


# ---------------------------------------------------------------------------------------------------------------
# The section


def millions(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.3g}M"


def ratio(a: float, b: float) -> float:
    return round(a / b, 2)


def deviation(result: Result, runtime: Result | None) -> int | None:
    """(plan + runtime - measured anonymous peak) / measured, in whole percent."""
    if result.plan_bytes is None or not result.ok or runtime is None or not runtime.ok:
        return None
    predicted = result.plan_bytes / MIB + runtime.measurement.peak_anon_mib
    return round(100 * (predicted - result.measurement.peak_anon_mib) / result.measurement.peak_anon_mib)


def shape_table(cases: list[Case], results: dict[str, Result], runtime: Result | None, default: str) -> str:
    rows = []
    for case in cases:
        result = results[case.key]
        label = case.label + (" (default dtype here)" if case.library == "lorakit" and case.quantize
                              and case.dtype == default else "")
        m = result.measurement
        if not result.ok:
            rows.append([label, f"**failed** (exit {m.returncode if m else '?'})", "", f"{m.wall_s:.0f}" if m else "",
                         "", "", "", ""])
            continue
        peer = results.get(case.peer) if case.peer else None
        peer_ok = peer is not None and peer.ok
        anon = f"{ratio(m.peak_anon_mib, peer.measurement.peak_anon_mib):.2f}×" if peer_ok else "—"
        total = f"{ratio(m.peak_total_mib, peer.measurement.peak_total_mib):.2f}×" if peer_ok else "—"
        plan = dev = "—"
        if result.plan_bytes is not None and runtime is not None and runtime.ok:
            plan_mib, runtime_mib = result.plan_bytes / MIB, runtime.measurement.peak_anon_mib
            plan = f"{plan_mib + runtime_mib:.0f} ({plan_mib:.0f} + {runtime_mib:.0f})"
            dev = f"{deviation(result, runtime):+d}%"
        rows.append([label, f"{m.peak_anon_mib:.0f}", f"{m.peak_total_mib:.0f}", f"{m.wall_s:.0f}", anon, total,
                     plan, dev])
    if runtime is not None and runtime.ok:
        r = runtime.measurement
        rows.append(["runtime (imports only)", f"{r.peak_anon_mib:.0f}", f"{r.peak_total_mib:.0f}", f"{r.wall_s:.0f}",
                     "", "", "", ""])
    header = ["case", "peak anon (MiB)", "peak total (MiB)", "wall (s)", "anon vs peer", "total vs peer",
              "plan + runtime (MiB)", "deviation"]
    return table(header, rows)


def failures(results: dict[str, Result]) -> list[str]:
    blocks = []
    for key, result in results.items():
        m = result.measurement
        if m is not None and m.returncode != 0:
            blocks.append(f"`{key}` exited with status {m.returncode}; its stderr ends with:\n\n```\n"
                          f"{m.stderr_tail[-STDERR_SHOWN:].strip()}\n```")
        for note in result.notes:
            blocks.append(f"`{key}`: {note}.")
    return blocks


def cpu(figures: dict[str, float]) -> str:
    return f"{figures['cpu_s']:.3g}" if "cpu_s" in figures else ""


def quantize_table(shape: str, quant: dict[str, Result]) -> tuple[str, dict[str, float] | None, list[str]]:
    ours, theirs = quant["lorakit"], quant["bnb"]
    problems = [f"`{r.case}` ({shape}) exited with status {r.measurement.returncode}:\n\n```\n"
                f"{r.measurement.stderr_tail[-STDERR_SHOWN:].strip()}\n```" for r in (ours, theirs) if not r.ok]
    if problems or not ours.extra or not theirs.extra:
        return "", None, problems or [f"quantize throughput ({shape}): no result line."]
    o, t = ours.extra, theirs.extra
    if o["params"] != t["params"]:
        problems.append(f"quantize throughput ({shape}): lorakit quantized {o['params']:,} parameters "
                        f"({o['tensors']} tensors), the bitsandbytes run {t['params']:,} ({t['tensors']}).")
    ours_rate = o["params"] / o["seconds"]
    only_rate = t["params"] / t["quantize_s"]
    both_rate = t["params"] / (t["read_s"] + t["quantize_s"])
    ratios = {"quantize_only": ratio(ours_rate, only_rate), "read_quantize": ratio(ours_rate, both_rate)}
    if "cpu_s" in o and "cpu_s" in t:  # CPU time: what the work costs, whatever else the machine runs
        ratios["cpu"] = ratio(o["params"] / o["cpu_s"], t["params"] / t["cpu_s"])
    rows = [
        [shape, "lorakit `load_model(..., quantize=\"nf4\")` (read + build + quantize)", f"{o['params'] / 1e6:.4g}",
         f"{o['seconds']:.3g}", cpu(o), f"{ours_rate / 1e6:.3g}", "", f"{ours.measurement.peak_anon_mib:.0f}"],
        [shape, "bitsandbytes `quantize_4bit`, quantize only", f"{t['params'] / 1e6:.4g}", f"{t['quantize_s']:.3g}",
         cpu(t), f"{only_rate / 1e6:.3g}", f"{ratios['quantize_only']:.2f}×", f"{theirs.measurement.peak_anon_mib:.0f}"],
        [shape, "bitsandbytes, read (`safe_open`) + quantize", f"{t['params'] / 1e6:.4g}",
         f"{t['read_s'] + t['quantize_s']:.3g}", "", f"{both_rate / 1e6:.3g}", f"{ratios['read_quantize']:.2f}×", ""],
    ]
    header = ["shape", "what is timed", "params (M)", "seconds", "CPU seconds", "M params/s", "lorakit ÷ this",
              "peak anon (MiB)"]
    return table(header, rows), ratios, problems


def nf4_verdicts(shape: str, results: dict[str, Result], runtime: Result | None, default: str,
                 cases: list[Case]) -> list[str]:
    lines = []
    for case in cases:
        if case.library != "lorakit" or not case.quantize:
            continue
        name = f"{shape} NF4 {case.dtype}" + (" (default dtype)" if case.dtype == default else "")
        ours, peer = results[case.key], results.get(case.peer or "")
        if not ours.ok or peer is None or not peer.ok:
            lines.append(f"- {name}: not measured (a case failed).")
            continue
        m, p = ours.measurement, peer.measurement
        anon, total = ratio(m.peak_anon_mib, p.peak_anon_mib), ratio(m.peak_total_mib, p.peak_total_mib)
        if shape in ("llama2-7b", "llama2-13b"):
            anon_gib, total_gib = m.peak_anon_mib / 1024, m.peak_total_mib / 1024
            lines.append(
                f"- {name}: anonymous {anon_gib:.2f} GiB ≤ {BIG_NF4_ANON_GIB} GiB and below the peer's "
                f"({p.peak_anon_mib / 1024:.2f} GiB): {verdict(anon_gib <= BIG_NF4_ANON_GIB and anon < 1)}; "
                f"total {total_gib:.2f} GiB ≤ {BIG_NF4_TOTAL_GIB} GiB: {verdict(total_gib <= BIG_NF4_TOTAL_GIB)}.")
            continue
        dev = deviation(ours, runtime)
        dev_text = (f"plan deviation {dev:+d}% (|·| ≤ {PLAN_DEVIATION}%): {verdict(abs(dev) <= PLAN_DEVIATION)}"
                    if dev is not None else "plan deviation: not available")
        lines.append(f"- {name}: anonymous {anon:.2f}× the peer's (≤ {SMALL_NF4_ANON}×): "
                     f"{verdict(anon <= SMALL_NF4_ANON)}; total {total:.2f}× (≤ {SMALL_NF4_TOTAL}×): "
                     f"{verdict(total <= SMALL_NF4_TOTAL)}; {dev_text}.")
    if shape in ("llama2-7b", "llama2-13b"):
        dense = results.get("lorakit-dense-bfloat16")
        if dense is not None and dense.ok:
            gib = dense.measurement.peak_anon_mib / 1024
            lines.append(f"- {shape} dense bfloat16: anonymous {gib:.2f} GiB ≤ {BIG_DENSE_BF16_ANON_GIB} GiB: "
                         f"{verdict(gib <= BIG_DENSE_BF16_ANON_GIB)}.")
        else:
            lines.append(f"- {shape} dense bfloat16 ≤ {BIG_DENSE_BF16_ANON_GIB} GiB: not measured (the case failed).")
    return lines


def describe(args: argparse.Namespace, seqs: dict[str, int], default: str) -> str:
    shapes = ", ".join(f"{shape} ({millions(shape_params(shape))} parameters, seq {seqs[shape]})"
                       for shape in args.shapes)
    data = ("the built-in date task (`--builtin-train-size 16`: 54-token examples whatever the seq length)"
            if args.builtin_data else
            f"{TRAIN_RECORDS} texts of exactly L byte tokens (`--data`; the CLI holds one out and scores its loss "
            "before and after training, as it refuses an empty eval set; `--eval-samples 0` skips generation)")
    return (
        f"Random-init bf16 checkpoints of real shapes ({shapes}), {args.steps} training step(s) of batch 1 × L "
        "tokens, LoRA r=8 (alpha 16) on all linear layers, AdamW lr 1e-3, no gradient checkpointing. lorakit runs "
        f"through `python -m lorakit train` on {data}; the peer is transformers `from_pretrained` (+ bitsandbytes "
        "NF4 with double quantization for the NF4 cases) + PEFT `get_peft_model` on random token ids, without "
        "`prepare_model_for_kbit_training` (it casts every non-quantized weight to float32, which a user on a small "
        "machine would skip). Each case is one process, run alone and sampled every 50 ms over its whole process "
        "tree: **anonymous** = RssAnon + RssShmem (heap and tensors: what must fit in RAM), **total** = VmRSS (also "
        "the mmapped checkpoint pages, which are droppable page cache). Ratios are lorakit ÷ the peer of the same "
        "dtype and format. The plan column is `lorakit inspect plan`'s predicted peak (1 GB = 10⁹ B) plus the "
        "measured runtime (a process that only imports torch, transformers and lorakit); deviation = (that − "
        f"measured anonymous peak) ÷ measured. lorakit's `--dtype auto` is {default} on this machine. The "
        "page cache is warmed before each shape, so wall times exclude disk reads."
    )


# ---------------------------------------------------------------------------------------------------------------


def parse_seq(text: str | None, shapes: list[str]) -> dict[str, int]:
    seqs = {shape: DEFAULT_SEQ.get(shape, 128) for shape in shapes}
    if not text:
        return seqs
    if "=" not in text:
        return dict.fromkeys(shapes, int(text))
    for item in text.split(","):
        shape, _, value = item.partition("=")
        seqs[shape.strip()] = int(value)
    return seqs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="tinyllama-1.1b",
                        help=f"comma-separated, of {', '.join(SHAPES)} (default: tinyllama-1.1b)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lorakit-big"),
                        help="checkpoints (<workdir>/<shape>, reused when complete), data and run outputs")
    parser.add_argument("--steps", type=int, default=2, help="training steps per case")
    parser.add_argument("--seq-len", help="tokens per step: one number for every shape, or shape=L,... "
                                          f"(default: {', '.join(f'{k} {v}' for k, v in DEFAULT_SEQ.items())})")
    parser.add_argument("--builtin-data", action="store_true",
                        help="train lorakit on the built-in date task (--builtin-train-size 16) instead of texts of "
                             "exactly L tokens")
    parser.add_argument("--no-quantize-throughput", dest="quantize_throughput", action="store_false")
    parser.add_argument("--quick", action="store_true", help="the tiny shape, 1 step: checks that everything runs")
    add_report_options(parser)
    parser.add_argument("--peer-run", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--peer-quantize", choices=("nf4", "none"), default="nf4", help=argparse.SUPPRESS)
    parser.add_argument("--peer-dtype", choices=("float32", "bfloat16"), default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--quantize-run", choices=("lorakit", "bnb"), help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer_run:
        args.seq = int(args.seq_len)
        return peer_run(args)
    if args.quantize_run:
        return quantize_run_lorakit(args.model_dir) if args.quantize_run == "lorakit" else quantize_run_bnb(
            args.model_dir)

    if args.quick:
        args.shapes, args.steps = "tiny", 1
    args.shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in args.shapes if s not in SHAPES]
    if unknown:
        parser.error(f"unknown shape(s) {', '.join(unknown)}; choose from {', '.join(SHAPES)}")
    seqs = parse_seq(args.seq_len, args.shapes)
    args.workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    default = default_dtype()
    version_start = source_version()
    print(json.dumps({"lorakit_source_at_start": version_start}), flush=True)

    print("[runtime] imports only ...", file=sys.stderr, flush=True)
    runtime = Result("-", "runtime", run_measured([python(), "-c", "import torch, transformers, lorakit"], cwd=ROOT))
    report_json("-", "runtime", runtime)
    if not runtime.ok:
        runtime_note = [f"The runtime process failed:\n\n```\n{runtime.measurement.stderr_tail[-STDERR_SHOWN:]}\n```"]
    else:
        runtime_note = []

    sections, verdicts, quant_tables, quant_problems = [], [], [], []
    for shape in args.shapes:
        directory = prepare_model(shape, args.workdir)
        data = None if args.builtin_data else training_data(args.workdir, seqs[shape])
        warm_page_cache(directory)
        cases = cases_for(shape)
        results = {case.key: run_case(case, shape, directory, data, args, seqs[shape]) for case in cases}
        skipped = ("" if any(c.key == "lorakit-dense-float32" for c in cases) else
                   f" (dense float32 skipped: {shape_params(shape) * 4 / 1e9:.0f} GB of weights alone)")
        sections.append(f"**{shape}**, seq {seqs[shape]}, {args.steps} step(s){skipped}:\n\n"
                        + shape_table(cases, results, runtime, default))
        sections += failures(results)
        verdicts += nf4_verdicts(shape, results, runtime, default, cases)
        if args.quantize_throughput and directory.is_dir():
            quant_table, ratios, problems = quantize_table(shape, run_quantize(directory, shape))
            quant_problems += problems
            if quant_table:
                quant_tables.append(quant_table)
            if ratios:
                verdicts.append(
                    f"- {shape} quantize throughput ≥ {QUANTIZE_SPEEDUP}× bitsandbytes: against its quantize calls "
                    f"alone {ratios['quantize_only']:.2f}× ({verdict(ratios['quantize_only'] >= QUANTIZE_SPEEDUP)}),"
                    f" against its reads + quantize calls {ratios['read_quantize']:.2f}× "
                    f"({verdict(ratios['read_quantize'] >= QUANTIZE_SPEEDUP)}); lorakit's time includes reading "
                    "the checkpoint and building the model."
                    + (f" In CPU time (robust to a shared machine): {ratios['cpu']:.2f}× "
                       f"({verdict(ratios['cpu'] >= QUANTIZE_SPEEDUP)})." if "cpu" in ratios else ""))
            else:
                verdicts.append(f"- {shape} quantize throughput ≥ {QUANTIZE_SPEEDUP}× bitsandbytes: not measured "
                                "(a run failed).")
    if not any(s in ("llama2-7b", "llama2-13b") for s in args.shapes):
        verdicts.append(f"- 7B NF4 (anonymous ≤ {BIG_NF4_ANON_GIB} GiB and below the peer, total ≤ "
                        f"{BIG_NF4_TOTAL_GIB} GiB) and 7B dense bfloat16 (≤ {BIG_DENSE_BF16_ANON_GIB} GiB): not "
                        "measured in this run (`--shapes tinyllama-1.1b,llama2-7b`).")
    if "tinyllama-1.1b" not in args.shapes:
        verdicts.append("- The 1.1B targets are judged on tinyllama-1.1b only; the lines above apply the same "
                        "thresholds to the shapes run here.")

    quant_text = ("NF4 quantize throughput, on the same tensors (every `*_proj.weight` of the decoder layers; "
                  "lm_head stays dense), each side in a process of its own after warming the page cache; "
                  "lorakit ÷ this compares parameters per second:\n\n" + "\n\n".join(quant_tables)
                  if quant_tables else "")
    markdown = "\n\n".join(part for part in [
        describe(args, seqs, default), *runtime_note, *sections, quant_text, *quant_problems,
        "Against the targets:\n" + "\n".join(verdicts),
    ] if part)
    version_end = source_version()
    version = (f"lorakit source: {version_start}." if version_end == version_start else
               f"lorakit source changed during the run: {version_start} at the start, {version_end} at the end.")
    markdown += f"\n\n{version} Whole run: {(time.perf_counter() - start) / 60:.0f} min."
    print(json.dumps({"total_wall_s": time.perf_counter() - start, "lorakit_source_at_end": version_end}), flush=True)
    emit(args, TITLE, markdown)


if __name__ == "__main__":
    main()

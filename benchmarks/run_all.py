"""Run the benchmark suite and rewrite RESULTS.md and the PNG plots: `make bench` (full) or `make bench-quick`.

    python benchmarks/run_all.py                      # everything, about 3 hours on 2 cores -> benchmarks/RESULTS.md
    python benchmarks/run_all.py --quick              # a smoke run, ≤ 5 min -> benchmarks/quick/RESULTS.md
    python benchmarks/run_all.py --parts nf4,inference  # re-run some parts; the others keep their last figures

Each part is one script run in its own process (see report.py for the contract); peers and lorakit always run in
the same script on the same model and data, so the ratios are the figures to read. Processes run at real-time
priority (`chrt -f 5`) when the system allows it, so that a shared machine measures the code, not the scheduler.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


@dataclass(frozen=True)
class Part:
    name: str
    script: str
    full: tuple[str, ...] = ()
    quick: tuple[str, ...] = ("--quick",)


PARTS = (
    Part("train_step_llama", "bench_train_step.py", ("--rounds", "1", "--steps", "3", "--warmup", "1")),
    Part("train_step_smollm2", "bench_train_step.py",
         ("--model", "smollm2-135m", "--rounds", "1", "--steps", "3", "--warmup", "1"),
         ("--model", "smollm2-135m", "--quick")),
    Part("injection", "bench_injection.py"),
    Part("inference", "bench_inference.py"),
    Part("nf4", "bench_nf4.py"),
    Part("mixed_batch", "bench_mixed_batch.py", ("--rounds", "7")),
    Part("ddp", "bench_ddp.py", ("--rounds", "1", "--steps", "3", "--warmup", "1")),
    Part("quantization", "claim_quantization.py"),
    Part("finetune", "claim_finetune.py"),
    Part("init_claims", "claim_init.py"),
    Part("big_base", "bench_big_base.py"),  # full: the TinyLlama-1.1B shape; --quick: the tiny shape
    Part("main_job", "bench_main_job.py",
         ("--model", "smollm2-135m", "--steps", "60", "--eval-samples", "100", "--datasets", "builtin,chat"),
         ("--quick",)),
    Part("main_job_bf16", "bench_main_job.py",
         ("--model", "smollm2-135m", "--steps", "60", "--eval-samples", "100", "--datasets", "builtin,chat",
          "--dtype", "bfloat16", "--seeds", "0,1,2,3,4"),
         ("--quick", "--dtype", "bfloat16")),
)
PEERS = ("torch", "transformers", "peft", "bitsandbytes", "torchao")
# Sections written before run_all recorded the machine ran on a 2-core, 24 GiB x86-64 machine with AVX2 only.
OLDER_MACHINE = "machine not recorded: 2 cores, AVX2 without native bfloat16, 24 GiB"


def priority_prefix() -> list[str]:
    try:
        ok = subprocess.run(["chrt", "-f", "5", "true"], check=False, capture_output=True).returncode == 0
    except FileNotFoundError:
        ok = False
    return ["chrt", "-f", "5"] if ok else []


def run_part(part: Part, quick: bool, out: Path, prefix: list[str]) -> dict:
    """Run one part's script; returns its section with the command, wall time and exit status added."""
    raw = out / "raw" / f"{part.name}.json"
    raw.unlink(missing_ok=True)
    args = [*(part.quick if quick else part.full), "--report", str(raw.relative_to(ROOT)),
            "--plots", str((out / "plots").relative_to(ROOT))]
    command = [*prefix, sys.executable, f"benchmarks/{part.script}", *args]
    shown = " ".join(shlex.quote(a) for a in [*prefix, "python", f"benchmarks/{part.script}", *args])
    print(f"\n=== {part.name}: {shown}", flush=True)
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    with open(out / "raw" / f"{part.name}.log", "w") as log:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
        code = proc.wait()
    seconds = time.perf_counter() - start
    if raw.exists():  # a part that failed late may still have written what it measured
        section = json.loads(raw.read_text())
        if code != 0:
            section["markdown"] += f"\n\n**This part exited with status {code}**; see its log."
    else:
        section = {"title": part.name, "plots": [],
                   "markdown": f"**Failed** (exit status {code}); see `{(out / 'raw' / (part.name + '.log')).name}`."}
    section |= {"command": shown, "seconds": seconds, "ok": code == 0, "date": dt.date.today().isoformat(),
                "machine": machine()}
    raw.write_text(json.dumps(section, indent=2) + "\n")
    return section


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    simd = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    versions = []
    for name in PEERS:
        try:
            versions.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{name} (not installed)")
    return (f"{os.cpu_count()} × {cpu} ({simd}), {memory:.0f} GiB, Python {platform.python_version()}; "
            + ", ".join(versions))


def write_results(out: Path, quick: bool, prefix: list[str]) -> Path:
    sections = []
    for part in PARTS:
        raw = out / "raw" / f"{part.name}.json"
        if raw.exists():
            sections.append(json.loads(raw.read_text()))
    lines = [
        "# lorakit benchmark results" + (" (quick smoke run: not the published figures)" if quick else ""),
        "",
        (f"Written by `python benchmarks/run_all.py{' --quick' if quick else ''}` (`make bench{'-quick' if quick else ''}`)"
         f" on {dt.date.today().isoformat()}; the parts take {sum(s['seconds'] for s in sections) / 60:.1f} min in all"
         " (each section gives its command, wall time and date; `--parts` re-runs some of them)."),
        "",
        (f"Machine of this run: {machine()}; each section names the machine it ran on. Priority: {'real-time (`chrt -f 5`)' if prefix else 'normal (chrt not permitted)'}."
        " Every comparison runs lorakit and the peer in the same script on the same model and data; read the ratios,"
        " absolute seconds drift on a shared machine. Background and deeper analyses: `nf4_notes.md`,"
        " `data_notes.md`, `multi_notes.md`, `ddp_notes.md`, `main_job_notes.md`."),
        "",
        "Contents: " + ", ".join(f"[{s['title']}](#{anchor(s['title'])})" for s in sections) + ".",
    ]
    for section in sections:
        where = section.get("machine", OLDER_MACHINE)
        lines += ["", f"## {section['title']}", "",
                  f"`{section['command']}` ({section['seconds']:.0f} s, {section['date']}; {where})", "",
                  section["markdown"]]
        lines += [f"\n![{name}](plots/{name})" for name in section["plots"]]
    path = out / "RESULTS.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def anchor(title: str) -> str:
    keep = "".join(c for c in title.lower() if c.isalnum() or c in " -_")
    return keep.replace(" ", "-")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes and few steps: checks that every part runs")
    parser.add_argument("--parts", default=",".join(p.name for p in PARTS), help="comma-separated part names")
    parser.add_argument("--out", type=Path, help="default: benchmarks/ (full) or benchmarks/quick/ (--quick)")
    args = parser.parse_args()
    out = (args.out or (HERE / "quick" if args.quick else HERE)).resolve()
    names = [n.strip() for n in args.parts.split(",") if n.strip()]
    known = {p.name: p for p in PARTS}
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    (out / "raw").mkdir(parents=True, exist_ok=True)
    prefix = priority_prefix()
    start = time.perf_counter()
    failed = [n for n in names if not run_part(known[n], args.quick, out, prefix)["ok"]]
    path = write_results(out, args.quick, prefix)
    print(f"\nwrote {path.relative_to(ROOT)} in {(time.perf_counter() - start) / 60:.1f} min"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

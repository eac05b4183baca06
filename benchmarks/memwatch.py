"""Peak memory of a command's whole process tree, split into anonymous and total resident memory.

    python benchmarks/memwatch.py -- python train.py --steps 10
    python benchmarks/memwatch.py --interval 0.02 -- torchrun --nproc-per-node 2 bench.py

prints one JSON line: peak_anon_mib, peak_total_mib, wall_s, returncode, samples, stdout_tail, stderr_tail.

Why two figures: a process's resident set (VmRSS) also counts pages of files it has mmapped, such as safetensors
checkpoints loaded lazily; those are page cache the kernel can drop at any time, not memory the program allocated.
"anonymous" (RssAnon + RssShmem: heap, tensors, shared memory between DataLoader or DDP workers) is what actually
has to fit in RAM; "total" (VmRSS) is what `top` shows. Both are summed over the command and all its descendants,
sampled every `interval` seconds from /proc/<pid>/status, so peaks shorter than the interval can be missed, and
processes that outlive the command after being re-parented are not followed. Linux only. A file mmapped from a
tmpfs (such as /dev/shm) counts as RssShmem, hence as anonymous: it does live in RAM.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

TAIL_CHARS = 4000
KIB_PER_MIB = 1024


@dataclass(frozen=True)
class Measurement:
    peak_anon_mib: float  # RssAnon + RssShmem, summed over the process tree, highest sample
    peak_total_mib: float  # VmRSS, summed over the process tree, highest sample
    wall_s: float
    returncode: int  # negative: killed by that signal, as subprocess reports it
    samples: int
    stdout_tail: str
    stderr_tail: str


def parent_pids() -> dict[int, int]:
    """pid -> parent pid for every process now running, from /proc/<pid>/stat."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # the process exited meanwhile
            continue
        fields = text[text.rindex(")") + 2 :].split()  # the command name before ")" may hold spaces
        parents[int(stat.parent.name)] = int(fields[1])
    return parents


def process_tree(root: int) -> Iterator[int]:
    """`root` and all its descendants."""
    children: dict[int, list[int]] = {}
    for pid, parent in parent_pids().items():
        children.setdefault(parent, []).append(pid)
    pending = [root]
    while pending:
        pid = pending.pop()
        yield pid
        pending += children.get(pid, [])


def memory_kib(pid: int) -> tuple[int, int]:
    """(RssAnon + RssShmem, VmRSS) of one process in KiB; zeros once it has exited or become a zombie."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return 0, 0
    values = {
        key: int(rest.split()[0]) for key, _, rest in (line.partition(":") for line in lines) if rest.endswith("kB")
    }
    return values.get("RssAnon", 0) + values.get("RssShmem", 0), values.get("VmRSS", 0)


def tree_memory_kib(root: int) -> tuple[int, int]:
    """(anonymous, total) KiB summed over `root`'s process tree."""
    anon = total = 0
    for pid in process_tree(root):
        pid_anon, pid_total = memory_kib(pid)
        anon += pid_anon
        total += pid_total
    return anon, total


def wait_or_timeout(process: subprocess.Popen[bytes], seconds: float) -> None:
    """Sleep `seconds`, or less if the process exits first (so wall_s is not rounded up to the interval)."""
    try:
        process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        pass


def tail(file: IO[bytes]) -> str:
    file.seek(0, os.SEEK_END)
    file.seek(max(0, file.tell() - 4 * TAIL_CHARS))
    return file.read().decode(errors="replace")[-TAIL_CHARS:]


def run_measured(
    cmd: list[str], interval: float = 0.05, env: Mapping[str, str] | None = None, cwd: str | Path | None = None
) -> Measurement:
    """Run `cmd` to completion, sampling its process tree's memory every `interval` seconds.

    env: the child's whole environment, as for subprocess.Popen (None: inherit this process's).
    Output goes to temporary files rather than pipes, so a chatty command cannot block on a full pipe.
    """
    with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
        start = time.perf_counter()
        process = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, env=env, cwd=cwd)
        peak_anon = peak_total = samples = 0
        while process.poll() is None:
            anon, total = tree_memory_kib(process.pid)
            peak_anon, peak_total, samples = max(peak_anon, anon), max(peak_total, total), samples + 1
            wait_or_timeout(process, interval)
        wall_s = time.perf_counter() - start
        return Measurement(
            peak_anon_mib=peak_anon / KIB_PER_MIB,
            peak_total_mib=peak_total / KIB_PER_MIB,
            wall_s=wall_s,
            returncode=process.returncode,
            samples=samples,
            stdout_tail=tail(stdout),
            stderr_tail=tail(stderr),
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between samples")
    parser.add_argument("cmd", nargs=argparse.REMAINDER, help="-- then the command and its arguments")
    args = parser.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        parser.error("no command given")
    measurement = run_measured(cmd, args.interval)
    print(json.dumps(asdict(measurement)))
    sys.exit(0 if measurement.returncode == 0 else 1)


if __name__ == "__main__":
    main()

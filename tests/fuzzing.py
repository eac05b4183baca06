"""The fuzz suite's invariants, shared by the tests/test_fuzz_*.py properties.

Every generated case must end in one of two ways: it works, or it is refused cleanly. Refused cleanly means
  - through the command line: exit status 2 and exactly one line on stderr, `lorakit: error: ...`, no traceback;
  - through the Python API: a `ValueError` (or one of the CLI's `ERRORS`) whose message is one line;
and, either way, nothing lost: the model, its active adapters and `requires_grad` flags, and the files on disk are
as they were. Hangs and memory blow-ups are failures too: `bounded` runs a case under a wall-clock alarm and samples
the process's resident memory while it runs.

Profiles (LORAKIT_FUZZ=fast|long): `fast` is the slice `make test` runs, derandomized so CI is repeatable; `long` is
`make fuzz`, random, with LORAKIT_FUZZ_EXAMPLES examples per property. Each case is counted per surface
(`count_case`); the totals are printed at the end of the run and written to LORAKIT_FUZZ_REPORT when set.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from hypothesis import HealthCheck, settings

from lorakit.cli import ERRORS, main

SUPPRESSED = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large,
              HealthCheck.filter_too_much]
settings.register_profile("fast", max_examples=int(os.environ.get("LORAKIT_FUZZ_EXAMPLES", "30")), deadline=None,
                          derandomize=True, suppress_health_check=SUPPRESSED, print_blob=True)
settings.register_profile("long", max_examples=int(os.environ.get("LORAKIT_FUZZ_EXAMPLES", "1500")), deadline=None,
                          suppress_health_check=SUPPRESSED, print_blob=True)
settings.load_profile(os.environ.get("LORAKIT_FUZZ", "fast"))

CASES: Counter[str] = Counter()  # surface -> cases run


def count_case(surface: str) -> None:
    """Count one generated case of `surface` ("adapter", "data", "cli", "checkpoint")."""
    CASES[surface] += 1


class Hang(AssertionError):
    """A case ran past its time limit."""


class MemoryBlowUp(AssertionError):
    """A case grew the process's resident memory past its limit."""


def _resident_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


@contextlib.contextmanager
def bounded(seconds: float = 60.0, memory_mib: float = 512.0) -> Iterator[None]:
    """Fail the case if it runs longer than `seconds` or grows resident memory by more than `memory_mib`."""
    start = _resident_mib()
    peak = [start]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            peak[0] = max(peak[0], _resident_mib())

    def alarm(signum: int, frame: object) -> None:
        raise Hang(f"case still running after {seconds:.0f} s")

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        done.set()
        sampler.join()
    peak[0] = max(peak[0], _resident_mib())
    if peak[0] - start > memory_mib:
        raise MemoryBlowUp(f"resident memory grew by {peak[0] - start:.0f} MiB (limit {memory_mib:.0f} MiB)")


@dataclass
class Outcome:
    """What one in-process `lorakit` command did."""

    code: int
    stdout: str
    stderr: str


def run_cli(argv: Sequence[str], seconds: float = 120.0, memory_mib: float = 1024.0) -> Outcome:
    """Run `lorakit ARGV` in this process; any exception other than SystemExit escapes (a crash is a failure)."""
    out, err = io.StringIO(), io.StringIO()
    with bounded(seconds, memory_mib), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    return Outcome(code, out.getvalue(), err.getvalue())


def assert_refused(outcome: Outcome) -> str:
    """Exit 2, one `lorakit: error: ...` line on stderr and nothing else there; returns the message."""
    lines = outcome.stderr.splitlines()
    assert outcome.code == 2, f"exit {outcome.code}, stderr {outcome.stderr!r}"
    assert len(lines) == 1 and lines[0].startswith("lorakit: error: "), f"stderr is not one error line: {lines!r}"
    return lines[0].removeprefix("lorakit: error: ")


def assert_clean_error(error: BaseException) -> str:
    """An API refusal: one of the CLI's ERRORS (so the CLI prints it as one line) with a one-line message."""
    assert isinstance(error, ERRORS), f"{type(error).__name__}: {error}"
    message = str(error.args[0] if isinstance(error, KeyError) and error.args else error)
    assert message and "\n" not in message, f"error message is not one line: {message!r}"
    return message

"""The contract between the benchmark scripts and `run_all.py`.

Every script prints its markdown section (a table and one-sentence verdicts) and, given `--report FILE`, also
writes it as JSON: {"title": ..., "markdown": ..., "plots": [file names under --plots]}. `run_all.py` runs the
scripts, collects those files and writes RESULTS.md with the exact commands, the machine and the peer versions.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path


def add_report_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--report", type=Path, help="also write this section as JSON here (for run_all.py)")
    parser.add_argument("--plots", type=Path, default=Path("benchmarks/plots"), help="directory for PNG plots")


def plot_path(args: argparse.Namespace, name: str) -> Path:
    """Where a script saves the PNG called `name` (the directory is created)."""
    args.plots.mkdir(parents=True, exist_ok=True)
    return args.plots / name


def emit(args: argparse.Namespace, title: str, markdown: str, plots: Sequence[Path] = ()) -> None:
    """Print the section, and write it for run_all.py when --report was given."""
    print(f"\n## {title}\n\n{markdown.strip()}\n")
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        section = {"title": title, "markdown": markdown.strip(), "plots": [Path(p).name for p in plots]}
        args.report.write_text(json.dumps(section, indent=2) + "\n")


def verdict(met: bool) -> str:
    return "met" if met else "**not met**"


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table; floats are written as given by the caller (format them first)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)

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
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def add_report_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--report", type=Path, help="also write this section as JSON here (for run_all.py)")
    parser.add_argument("--plots", type=Path, default=Path("benchmarks/plots"), help="directory for PNG plots")


def pyplot() -> ModuleType:
    """matplotlib.pyplot on the file-only Agg backend (the benchmarks run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(args: argparse.Namespace, figure: Figure, name: str, dpi: int = 100) -> Path:
    """Lay out `figure`, write it as PNG `name` under --plots (created if needed), close it; returns the path."""
    args.plots.mkdir(parents=True, exist_ok=True)
    path = args.plots / name
    figure.tight_layout()
    figure.savefig(path, dpi=dpi)
    pyplot().close(figure)
    return path


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

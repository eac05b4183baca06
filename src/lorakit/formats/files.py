"""Small file helpers every lorakit format uses: a JSON object read with one clear error, an atomic write."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(target: Path, write: Callable[[str], Any]) -> None:
    """Call `write(tmp)` on a temporary file next to `target`, then rename it over `target` (never half a file)."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_json_object(file: Path, kind: str) -> dict[str, Any]:
    """A JSON object from `file`, with one clear error for a missing file, bad JSON or another JSON type."""
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: not a {kind} directory")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{file}: invalid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object")
    return data

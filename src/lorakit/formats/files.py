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


MAX_JSON_DEPTH = 32  # lorakit's own files nest at most 4 deep; PEFT's configs 3


def _depth(value: Any) -> int:
    """How deeply `value` nests lists and objects (a scalar: 0), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level + 1)
            if level + 1 <= MAX_JSON_DEPTH:
                stack.extend((child, level + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def read_json_object(file: Path, kind: str) -> dict[str, Any]:
    """A JSON object from `file`, with one clear error for a missing file, bad JSON (also bad UTF-8, numbers of
    too many digits, nesting deeper than MAX_JSON_DEPTH) or another JSON type."""
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: not a {kind} directory")
    try:
        data = json.loads(file.read_bytes().decode("utf-8"))
    except RecursionError:
        raise ValueError(f"{file}: invalid JSON (nested deeper than {MAX_JSON_DEPTH} levels)") from None
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError, an integer of too many digits
        reason = (str(error).splitlines() or [type(error).__name__])[0][:200]
        raise ValueError(f"{file}: invalid JSON ({reason})") from None
    problem = "expected a JSON object" if not isinstance(data, dict) else \
        f"invalid JSON (nested deeper than {MAX_JSON_DEPTH} levels)" if _depth(data) > MAX_JSON_DEPTH else None
    if problem:
        raise ValueError(f"{file}: {problem}")
    return data

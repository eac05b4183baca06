"""JSON Lines files read strictly: one JSON value per line, every error naming ``file:line`` and what is wrong.

- Lines end at ``\\n`` (``\\r\\n`` works too: ``\\r`` is JSON whitespace); a line of JSON whitespace alone (space, tab,
  ``\\r``) is skipped. A UTF-8 byte order mark is allowed at the start of the file only. A line holds at most
  ``MAX_LINE_BYTES`` (line break included), so a file without line breaks cannot fill the memory.
- Each line must be strict UTF-8 and one complete JSON value, with no duplicate key in an object and nesting no
  deeper than Python's parser allows.
- Numbers (and Python's extra ``NaN``/``Infinity``) are kept as `JSONNumber`, their text never converted, so no digit
  limit or overflow applies while reading; whoever validates the values decides what a number may be.
"""

from __future__ import annotations

import codecs
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

JSON_WHITESPACE = b" \t\r\n"
MAX_LINE_BYTES = 64 << 20


@dataclass(frozen=True)
class JSONNumber:
    """A JSON number as written in the file."""

    text: str


def json_type(value: object) -> str:
    """The JSON name of a parsed value's type (``string``, ``number``, ``array``, ...), for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, JSONNumber | int | float):
        return "number"
    names = {str: "string", list: "array", dict: "object"}
    return next((name for kind, name in names.items() if isinstance(value, kind)), type(value).__name__)


class _DuplicateKey(ValueError):
    pass


def _object(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(f"duplicate key {shorten(key)}")
        result[key] = value
    return result


def shorten(text: str, limit: int = 40) -> str:
    """`text` quoted and escaped on one line, cut to about `limit` characters."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


def parse_line(line: bytes, where: str) -> object:
    """Decode one line (strict UTF-8) and parse its JSON value; a ValueError prefixed with `where` if it is not."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{where}: not valid UTF-8 (byte 0x{line[error.start]:02x} at byte {error.start + 1})") from None
    try:
        return json.loads(text, object_pairs_hook=_object, parse_int=JSONNumber, parse_float=JSONNumber,
                          parse_constant=JSONNumber)
    except json.JSONDecodeError as error:
        message = error.msg.removesuffix(" at")  # "Invalid control character at": the column follows
        raise ValueError(f"{where}: malformed JSON ({message} at column {error.colno})") from None
    except _DuplicateKey as error:
        raise ValueError(f"{where}: {error}") from None
    except RecursionError:
        raise ValueError(f"{where}: malformed JSON (nested too deeply)") from None


def display_path(path: str | os.PathLike[str]) -> str:
    """`path` as error messages show it: as is, or quoted and escaped if it holds a line break or other control."""
    text = os.fspath(path)
    return text if text.isprintable() else repr(text)


def read_jsonl(path: str | os.PathLike[str]) -> Iterator[tuple[str, object]]:
    """Yield ``(where, value)`` for each non-blank line of `path`, `where` being ``file:line`` (1-based)."""
    path, name = Path(path), display_path(path)
    _require_regular_file(path, name)
    try:
        with path.open("rb") as lines:
            for number, line in enumerate(iter(lambda: lines.readline(MAX_LINE_BYTES + 1), b""), start=1):
                if len(line) > MAX_LINE_BYTES:
                    raise ValueError(f"{name}:{number}: line longer than {MAX_LINE_BYTES >> 20} MiB; split the record")
                if number == 1 and line.startswith(codecs.BOM_UTF8):
                    line = line[len(codecs.BOM_UTF8):]
                if line.strip(JSON_WHITESPACE):
                    yield f"{name}:{number}", parse_line(line, f"{name}:{number}")
    except PermissionError:
        raise PermissionError(f"{name}: permission denied") from None
    except OSError as error:
        raise ValueError(f"{name}: cannot read ({error.strerror or error})") from None


def _require_regular_file(path: Path, name: str) -> None:
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{name}: no such data file") from None
    except NotADirectoryError:
        raise NotADirectoryError(f"{name}: a parent of it is not a directory") from None
    except PermissionError:
        raise PermissionError(f"{name}: permission denied") from None
    except (OSError, ValueError) as error:  # a name too long, a NUL byte in it...
        raise ValueError(f"{name}: not a readable path ({getattr(error, 'strerror', None) or error})") from None
    if stat.S_ISDIR(mode):
        raise ValueError(f"{name}: is a directory, not a JSONL file")
    if not stat.S_ISREG(mode):
        raise ValueError(f"{name}: not a regular file")

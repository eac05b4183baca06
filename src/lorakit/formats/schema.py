"""A small schema language for JSON values read from lorakit's own files, and a reader that applies one.

A check is a function `(value, key)` that raises `SchemaError` naming the dotted `key` of the first value that is not
what it expects: `integer`, `number` (finite), `boolean`, `text`, `anything`, `optional(check)`,
`array(check, length)`, `obj(fields, values)`. Types are strict: `true` is not an integer and `1` is not true.
`read_json(file, schema)` reads a file with one clear, one-line error for unreadable bytes, bad JSON (also bad UTF-8,
numbers of too many digits, nesting too deep to parse) or a value the schema refuses, each naming the file.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

Check = Callable[[Any, str], None]


class SchemaError(ValueError):
    """A JSON value that is not what the schema expects; `key` is its dotted path."""

    def __init__(self, key: str, expected: str | None, value: Any = None) -> None:
        shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
        name = key or "(top level)"
        super().__init__(f"key {name} is missing" if expected is None else f"key {name} must be {expected}, "
                         f"found {shown[:60]}")


def integer(minimum: int | None = None, maximum: int | None = None) -> Check:
    def check(value: Any, key: str) -> None:
        if type(value) is not int or (minimum is not None and value < minimum) or (
                maximum is not None and value > maximum):
            bounds = f" in [{minimum}, {maximum}]" if maximum is not None else (
                f" >= {minimum}" if minimum is not None else "")
            raise SchemaError(key, f"an integer{bounds}", value)
    return check


def number(minimum: float | None = None) -> Check:
    def check(value: Any, key: str) -> None:
        if type(value) not in (int, float) or not math.isfinite(value) or (minimum is not None and value < minimum):
            raise SchemaError(key, "a finite number" + (f" >= {minimum}" if minimum is not None else ""), value)
    return check


def boolean(value: Any, key: str) -> None:
    if type(value) is not bool:
        raise SchemaError(key, "true or false", value)


def text(value: Any, key: str) -> None:
    if type(value) is not str:
        raise SchemaError(key, "a string", value)


def optional(inner: Check) -> Check:
    def check(value: Any, key: str) -> None:
        if value is not None:
            inner(value, key)
    return check


def array(item: Check, length: int | None = None, min_length: int = 0) -> Check:
    def check(value: Any, key: str) -> None:
        if type(value) is not list or (length is not None and len(value) != length) or len(value) < min_length:
            size = f" of {length}" if length is not None else (f" of at least {min_length}" if min_length else "")
            raise SchemaError(key, f"a list{size}", value)
        for index, element in enumerate(value):
            item(element, f"{key}[{index}]")
    return check


def obj(fields: dict[str, Check], values: Check | None = None) -> Check:
    """A JSON object with (at least) `fields`; `values` checks every other member too when given."""
    def check(value: Any, key: str) -> None:
        if type(value) is not dict:
            raise SchemaError(key, "an object", value)
        for name, field in fields.items():
            if name not in value:
                raise SchemaError(f"{key}.{name}".lstrip("."), None)
            field(value[name], f"{key}.{name}".lstrip("."))
        if values is not None:
            for name, member in value.items():
                if name not in fields:
                    values(member, f"{key}.{name}".lstrip("."))
    return check


def anything(value: Any, key: str) -> None:
    """Any JSON value (checked elsewhere)."""


def read_bytes(file: Path) -> bytes:
    """The bytes of `file`; an unreadable file is a ValueError naming it (PermissionError stays itself)."""
    try:
        return file.read_bytes()
    except PermissionError:
        raise
    except OSError as error:
        raise ValueError(f"{file}: cannot read ({error.strerror or error})") from None


def read_json(file: Path, schema: Check) -> Any:
    """The JSON value in `file`, checked by `schema`; every problem is a one-line ValueError naming the file."""
    try:
        data = json.loads(read_bytes(file))
    except (ValueError, RecursionError) as error:
        reason = str(error).splitlines()[0][:80] if str(error) else type(error).__name__
        raise ValueError(f"{file}: not valid JSON ({reason})") from None
    try:
        schema(data, "")
    except SchemaError as error:
        raise ValueError(f"{file}: {error}") from None
    return data

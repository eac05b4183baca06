"""Rules for option values, declared once per option and applied wherever a value arrives: a command-line flag
(a `Rule` is argparse's `type=`), a `--config` YAML/TOML file, or a `TrainConfig(...)` built in Python.

A rule converts a value and refuses anything outside it with a one-line `ValueError` saying why: a number that is
not finite or out of range, a bool, float or list where an integer is due, empty text or text with a NUL character,
a name outside the choices (with the close matches). Text such as `"1e-3"` (what YAML 1.1 reads for `lr: 1e-3`) is
read as a flag would be. Also here: the checks every writing command runs on its output path before any work.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import math
import os
import re
import reprlib
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

INT_MAX = 2**63 - 1  # what torch takes as a seed or a count
_INT_TEXT = re.compile(r"[+-]?[0-9]+")
_FLOAT_TEXT = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?|[+-]?(inf|infinity|nan)", re.IGNORECASE)
_MAX_DIGITS = 4000
NAME_MAX, PATH_MAX = 255, 4096  # Linux's limits on one file name and a whole path, in bytes  # below Python's int-parsing limit; any such integer is out of every range here anyway

_SHOW = reprlib.Repr()
_SHOW.maxstring = _SHOW.maxother = 60
_SHOW.maxlist = _SHOW.maxdict = _SHOW.maxtuple = _SHOW.maxset = 4
_SHOW.maxlevel = 2


def show(value: Any) -> str:
    """A value as a short one-line repr (strings quoted and escaped, long or nested values abridged)."""
    return _SHOW.repr(value)


def quote(path: str | os.PathLike[str]) -> str:
    """A file name for a message: as it is, or as a repr when it holds line breaks or other unprintable characters."""
    text = os.fspath(path)
    return text if text.isprintable() else repr(text)


def one_line(text: object) -> str:
    """`text` on one line: line breaks become spaces."""
    return " ".join(str(text).split("\n")).replace("\r", " ")


@dataclass(frozen=True)
class Rule:
    """The values one option takes. `kind` is int, float, str or bool; numbers must be finite and within
    `low`/`high` (exclusive when `low_open`/`high_open`); text must be non-empty, without NUL characters, and one of
    `choices` when given; `None` only when `optional`; `check` adds a test of the converted value (raises ValueError).
    Called with a flag's text (argparse `type=`), it raises argparse's error type with the same message."""

    kind: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    optional: bool = False
    choices: tuple[str, ...] = ()
    check: Callable[[Any], object] | None = None

    def describe(self) -> str:
        """What a valid value is, in words ("an integer >= 1", "a finite number in (0, 1)", "one of a, b")."""
        if self.kind is bool:
            return "true or false"
        if self.kind is str:
            return f"one of {', '.join(self.choices)}" if self.choices else "non-empty text"
        noun = "an integer" if self.kind is int else "a finite number"
        if self.low is not None and self.high is not None and self.high != INT_MAX:
            return f"{noun} in {'(' if self.low_open else '['}{_num(self.low)}, {_num(self.high)}" \
                   f"{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{noun} {'>' if self.low_open else '>='} {_num(self.low)}"
        return noun

    def convert(self, value: Any) -> Any:
        """`value` (a flag's text, a config file's value or a Python value) as this option's type, or ValueError."""
        if value is None:
            if self.optional:
                return None
            raise ValueError(f"must be {self.describe()}, got none")
        if self.kind is bool:
            if not isinstance(value, bool):
                raise ValueError(f"must be true or false, got {show(value)}")
            return value
        converted = self._text(value) if self.kind is str else self._number(value)
        if self.check is not None:
            self.check(converted)
        return converted

    def __call__(self, text: str) -> Any:
        try:
            return self.convert(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    def _text(self, value: Any) -> str:
        if not isinstance(value, str):
            raise ValueError(f"must be {self.describe()}, got {show(value)}")  # noqa: TRY004
        if self.choices and value not in self.choices:
            close = difflib.get_close_matches(value, self.choices, n=3)
            hint = f" (did you mean {' or '.join(close)}?)" if close else ""
            raise ValueError(f"must be {self.describe()}, got {show(value)}{hint}")
        if not value:
            raise ValueError("must not be empty")
        if "\0" in value:
            raise ValueError(f"must not contain a NUL character, got {show(value)}")
        return value

    def _number(self, value: Any) -> int | float:
        if isinstance(value, str):
            number = self._parse(value)
        elif isinstance(value, bool) or not isinstance(value, (int, float)) \
                or (self.kind is int and not isinstance(value, int)):
            raise ValueError(f"must be {self.describe()}, got {show(value)}")
        else:
            number = value
        if self.kind is float:
            try:
                number = float(number)
            except OverflowError:
                raise ValueError(f"must be {self.describe()}, got {show(value)}") from None
        if not math.isfinite(number) or not self._in_range(number):
            limit = f" (at most {INT_MAX})" if self.high == INT_MAX and number > INT_MAX else ""
            raise ValueError(f"must be {self.describe()}{limit}, got {show(value)}")
        return number

    def _parse(self, text: str) -> int | float:
        stripped = text.strip()
        pattern = _INT_TEXT if self.kind is int else _FLOAT_TEXT
        if not pattern.fullmatch(stripped) or len(stripped) > _MAX_DIGITS:
            raise ValueError(f"must be {self.describe()}, got {show(text)}")
        return int(stripped) if self.kind is int else float(stripped)

    def _in_range(self, number: float) -> bool:
        above = self.low is None or (number > self.low if self.low_open else number >= self.low)
        below = self.high is None or (number < self.high if self.high_open else number <= self.high)
        return above and below


def _num(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def integer(low: int, high: int = INT_MAX, optional: bool = False) -> Rule:
    return Rule(int, low, high, optional=optional)


def positive_int(optional: bool = False, high: int = INT_MAX) -> Rule:
    return integer(1, high, optional)


def non_negative_int(optional: bool = False) -> Rule:
    return integer(0, optional=optional)


def finite_float(low: float | None = None, high: float | None = None, *, low_open: bool = False,
                 high_open: bool = False, optional: bool = False, check: Callable[[Any], object] | None = None) -> Rule:
    return Rule(float, low, high, low_open, high_open, optional, check=check)


def positive_float(optional: bool = False) -> Rule:
    return finite_float(0.0, low_open=True, optional=optional)


def fraction() -> Rule:
    """Strictly between 0 and 1."""
    return finite_float(0.0, 1.0, low_open=True, high_open=True)


def text(optional: bool = False, check: Callable[[Any], object] | None = None) -> Rule:
    return Rule(str, optional=optional, check=check)


def choice(*names: str, optional: bool = False) -> Rule:
    return Rule(str, optional=optional, choices=names)


FLAG = Rule(bool)
SEED = integer(0)
THREADS = positive_int(optional=True, high=os.cpu_count() or 1)


# -- output paths ------------------------------------------------------------------------------------------------


def _kind(path: Path, flag: str, given: str) -> str:
    """"missing", "dir", "file" (regular) or "other" (device, socket...); a path that cannot be looked at raises."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "missing"
    except OSError as error:
        if error.errno == errno.ENOTDIR:
            raise NotADirectoryError(f"{flag} {quote(given)}: a part of the path is not a directory") from None
        raise ValueError(f"{flag} {quote(given)}: {error.strerror}") from None
    except ValueError:
        raise ValueError(f"{flag} {quote(given)}: must not contain a NUL character") from None
    return "dir" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else "other"


def _check_name_length(flag: str, given: str) -> None:
    """File names (each part) of at most NAME_MAX bytes, the whole at most PATH_MAX: a longer one fails only once
    something is written, after the work."""
    if len(os.fsencode(given)) >= PATH_MAX or any(len(os.fsencode(part)) > NAME_MAX for part in given.split("/")):
        raise ValueError(f"{flag} {quote(given)}: file name too long")


def _check_parent(path: Path, flag: str, given: str) -> None:
    """The nearest existing ancestor of `path` (none of which is a file: `_kind` saw to that) is a directory this
    process may create entries in."""
    for parent in path.parents:
        if _kind(parent, flag, given) == "missing":
            continue
        if not os.access(parent, os.W_OK | os.X_OK):
            raise PermissionError(f"{flag} {quote(given)}: cannot write in {parent}")
        return


def check_output_dir(path: str | os.PathLike[str], flag: str) -> Path:
    """Refuse, before any work, an output directory that cannot be one: an existing file (or device, such as
    /dev/null), a path under a file, or a place this process may not write."""
    given = os.fspath(path)
    target = Path(os.path.abspath(given))  # ".." taken lexically, as mkdir(parents=True) takes it
    _check_name_length(flag, given)
    kind = _kind(target, flag, given)
    if kind == "dir":
        if not os.access(target, os.W_OK | os.X_OK):
            raise PermissionError(f"{flag} {quote(given)}: directory not writable")
    elif kind != "missing":
        raise NotADirectoryError(f"{flag} {quote(given)}: exists and is not a directory")
    else:
        _check_parent(target, flag, given)
    return target


def check_output_file(path: str | os.PathLike[str], flag: str) -> Path:
    """Refuse, before any work, an output file that cannot be written: a directory, a device or other special file,
    a read-only file, a path under a file, or a directory this process may not write in."""
    given = os.fspath(path)
    target = Path(os.path.abspath(given))  # ".." taken lexically, as mkdir(parents=True) takes it
    _check_name_length(flag, given)
    if given.rsplit("/", 1)[-1] in ("", ".", ".."):
        raise ValueError(f"{flag} {quote(given)}: expected a file name")
    kind = _kind(target, flag, given)
    if kind == "dir":
        raise ValueError(f"{flag} {quote(given)}: is a directory, expected a file name")
    if kind == "other":
        raise ValueError(f"{flag} {quote(given)}: exists and is not a regular file")
    if kind == "file" and not os.access(target, os.W_OK):
        raise PermissionError(f"{flag} {quote(given)}: file not writable")
    _check_parent(target, flag, given)
    return target

"""Regular expressions from configs (target_modules, exclude_modules, rank_pattern and alpha_pattern keys), compiled
only when they are small and cannot backtrack without end.

Python's `re` has no size limit and no timeout, and a backtracking pattern such as `(a+)+x` takes exponential time on
a path it does not match. A pattern is accepted when
- it has at most MAX_PATTERN_CHARS characters and compiles;
- no variable-length repetition contains another one, or an alternation (`(a+)+`, `(a|ab)*`: exponential);
- it holds at most MAX_VARIABLE_REPEATS variable-length repetitions in all (each one multiplies the ways a path can
  be split: `.*` four times on a 200-character path already takes 0.1 s per path), and no back-reference;
and it is only ever matched against module paths of at most MAX_PATH_CHARS characters (real models' paths are under
100). Under these limits the slowest patterns (three `.*?` before a character the path lacks) take about 30 ms on a
256-character path, and microseconds on real paths.
"""

from __future__ import annotations

import functools
import re
import re._constants as sre_constants  # the parsed form of a pattern: no public API offers it
import re._parser as sre_parser
from typing import Any

MAX_PATTERN_CHARS = 1000
MAX_VARIABLE_REPEATS = 3
MAX_PATH_CHARS = 256

_REPEATS = {sre_constants.MAX_REPEAT, sre_constants.MIN_REPEAT, sre_constants.POSSESSIVE_REPEAT}
_BACKREFERENCES = {sre_constants.GROUPREF, sre_constants.GROUPREF_EXISTS}


def _children(op: Any, av: Any) -> list[Any]:
    """The sub-patterns directly inside one parsed item."""
    if op in _REPEATS:
        return [av[2]]
    if op == sre_constants.SUBPATTERN:
        return [av[3]]
    if op == sre_constants.BRANCH:
        return list(av[1])
    if op in (sre_constants.ASSERT, sre_constants.ASSERT_NOT):
        return [av[1]]
    if op == sre_constants.ATOMIC_GROUP:
        return [av]
    return []


def _problem(items: Any, inside_repeat: bool, counts: list[int]) -> str | None:
    """Why the parsed pattern `items` could backtrack without end, or None."""
    for op, av in items:
        if op in _BACKREFERENCES:
            return "back-references are not allowed"
        variable = op in _REPEATS and av[1] != av[0]
        if inside_repeat and (variable or op == sre_constants.BRANCH):
            return "a repetition contains another repetition or an alternation (it could backtrack without end)"
        counts[0] += variable
        repeated = inside_repeat or (op in _REPEATS and av[1] > 1)
        for child in _children(op, av):
            problem = _problem(child, repeated, counts)
            if problem:
                return problem
    if counts[0] > MAX_VARIABLE_REPEATS:
        return f"more than {MAX_VARIABLE_REPEATS} variable-length repetitions (*, +, {{m,n}})"
    return None


@functools.lru_cache(maxsize=1024)
def safe_regex(pattern: str, what: str) -> re.Pattern[str]:
    """`pattern` compiled, or a one-line ValueError naming `what` (e.g. "target_modules") and the reason."""
    shown = repr(pattern if len(pattern) <= 60 else pattern[:60] + "...")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise ValueError(f"{what} regex {shown} has {len(pattern)} characters (at most {MAX_PATTERN_CHARS})")
    try:
        compiled = re.compile(pattern)
        problem = _problem(sre_parser.parse(pattern), False, [0])
    except (re.error, RecursionError, OverflowError, ValueError) as error:
        reason = (str(error).splitlines() or [type(error).__name__])[0][:200]
        raise ValueError(f"{what} regex {shown} is invalid ({reason})") from None
    if problem:
        raise ValueError(f"{what} regex {shown} is refused: {problem}")
    return compiled


def regex_matches(pattern: str, path: str, what: str, whole: bool = True) -> bool:
    """Does `pattern` fullmatch (or, with whole=False, match from the start) module path `path`?"""
    if len(path) > MAX_PATH_CHARS:
        raise ValueError(f"module path {path[:60]!r}... has {len(path)} characters: {what} regexes are matched on "
                         f"paths of at most {MAX_PATH_CHARS}")
    compiled = safe_regex(pattern, what)
    return (compiled.fullmatch(path) if whole else compiled.match(path)) is not None

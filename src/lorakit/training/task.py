"""The built-in demo task and its score: convert an ISO date to a made-up "ledger" format (`2024-03-07` ->
`07 MAR 2024 / Q1`), generated with a seed, held-out dates never seen in training, scored by exact match of greedy
generations (whitespace-normalised). A base model fails it; a few minutes of LoRA fix it.
"""

from __future__ import annotations

import calendar
import datetime as dt
import random


def normalize_answer(text: str) -> str:
    """Collapse runs of whitespace and strip the ends."""
    return " ".join(text.split())


def exact_match(prediction: str, answer: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(answer)


_FIRST_DAY = dt.date(1900, 1, 1)
_N_DAYS = (dt.date(2099, 12, 31) - _FIRST_DAY).days + 1


def ledger_format(day: dt.date) -> str:
    """The demo task's target: ``2024-03-07`` -> ``07 MAR 2024 / Q1``."""
    month = calendar.month_abbr[day.month].upper()
    return f"{day.day:02d} {month} {day.year} / Q{(day.month - 1) // 3 + 1}"


def make_builtin_task(seed: int = 0, n_train: int = 2000, n_eval: int = 100) -> tuple[list[dict], list[dict]]:
    """Generate the demo task's train and held-out records: ISO date -> made-up ledger format.

    Prompt/completion records, e.g. ``{"prompt": "Convert 2024-03-07 to ledger format.\\n", "completion":
    "07 MAR 2024 / Q1"}``. Dates are drawn without replacement from 1900-2099, so the two splits never share a
    date; the same seed gives the same records.
    """
    if n_train < 0 or n_eval < 0 or n_train + n_eval > _N_DAYS:
        raise ValueError(f"n_train and n_eval must be non-negative and sum to at most {_N_DAYS}")
    offsets = random.Random(f"lorakit-task:{seed}").sample(range(_N_DAYS), n_train + n_eval)
    records = [_ledger_record(_FIRST_DAY + dt.timedelta(days=offset)) for offset in offsets]
    return records[:n_train], records[n_train:]


def _ledger_record(day: dt.date) -> dict[str, str]:
    return {"prompt": f"Convert {day.isoformat()} to ledger format.\n", "completion": ledger_format(day)}

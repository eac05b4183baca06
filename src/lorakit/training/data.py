"""Training data: JSONL records to token ids with loss masks, packing and padding.

Record formats (one JSON object per line):

- ``{"text": ...}``: loss on every token, EOS appended.
- ``{"prompt": ..., "completion": ...}``: the completion follows the prompt directly (put any separator in the
  prompt); loss on the completion tokens and the appended EOS only. With ``chat=True`` the pair is rendered as one
  user turn and one assistant turn of the tokenizer's chat template instead.
- ``{"messages": [{"role": ..., "content": ...}, ...]}``: rendered with the tokenizer's chat template; loss on the
  assistant replies up to and including the EOS token the template closes them with. Masks come from rendering the
  conversation prefix by prefix and diffing the strings, so they hold for any template that renders prefixes
  consistently. A tokenizer without a chat template gets ``FALLBACK_CHAT_TEMPLATE`` (``role:`` lines, EOS after
  each assistant reply).

Prompt/completion and messages examples also keep ``prompt_ids`` (the tokens up to the last reply) and ``answer``
(its reference text) so an evaluator can greedy-decode and score exact match (`task.exact_match`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypedDict

import torch
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
FORMATS: dict[str, frozenset[str]] = {
    "text": frozenset({"text"}),
    "prompt/completion": frozenset({"prompt", "completion"}),
    "messages": frozenset({"messages"}),
}
ROLES = ("system", "user", "assistant")
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] + ':\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant:\n' }}{% endif %}"
)
_KNOWN_FIELDS = frozenset().union(*FORMATS.values())


class _ExampleIds(TypedDict):
    input_ids: list[int]
    labels: list[int]


class Example(_ExampleIds, total=False):
    """Token ids and labels (``IGNORE_INDEX`` where no loss); ``prompt_ids``/``answer`` for exact-match scoring."""

    prompt_ids: list[int]
    answer: str


@dataclass
class DataStats:
    """What tokenization kept and cut."""

    n_examples: int = 0
    n_tokens: int = 0
    n_loss_tokens: int = 0
    n_truncated: int = 0
    n_dropped: int = 0  # examples left with no loss token after truncation

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------------------
# Reading and validating records


def load_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read and validate a JSONL file of records; errors name the file, the line and the field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    records = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: malformed JSON ({error.msg} at column {error.colno})") from None
            record_format(record, where)
            records.append(record)
    if not records:
        raise ValueError(f"{path}: empty dataset (no records)")
    return records


def record_format(record: object, where: str) -> str:
    """Return the format name of `record` (a key of ``FORMATS``), or raise a ValueError prefixed with `where`."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    unknown = sorted(set(record) - _KNOWN_FIELDS)
    if unknown:
        raise ValueError(f"{where}: unknown field {unknown[0]!r} (formats: {_format_list()})")
    fields = frozenset(record)
    name = next((name for name, required in FORMATS.items() if fields == required), None)
    if name is None:
        raise ValueError(f"{where}: fields {sorted(fields)} match no format (formats: {_format_list()})")
    if name == "messages":
        _check_messages(record["messages"], where)
    else:
        for field in fields:
            _check_string(record[field], f"{where}: field {field!r}")
    return name


def _format_list() -> str:
    return " | ".join("+".join(sorted(fields)) for fields in FORMATS.values())


def _check_string(value: object, what: str) -> None:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__}")


def _check_messages(messages: object, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: field 'messages' must be a non-empty list")
    for i, message in enumerate(messages):
        what = f"{where}: messages[{i}]"
        if not isinstance(message, dict):
            raise ValueError(f"{what} must be an object with 'role' and 'content'")
        extra = sorted(set(message) - {"role", "content"})
        if extra:
            raise ValueError(f"{what}: unknown field {extra[0]!r}")
        if message.get("role") not in ROLES:
            raise ValueError(f"{what}: field 'role' must be one of {', '.join(ROLES)}, got {message.get('role')!r}")
        _check_string(message.get("content"), f"{what}: field 'content'")
    if not any(message["role"] == "assistant" for message in messages):
        raise ValueError(f"{where}: field 'messages' has no assistant turn to learn from")


# ---------------------------------------------------------------------------------------------------------------
# Tokenization with loss masks

Segment = tuple[str, bool]  # (text, carries loss)


def tokenize_records(
    records: Sequence[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    max_len: int,
    *,
    chat: bool = False,
) -> tuple[list[Example], DataStats]:
    """Tokenize records into examples of at most `max_len` tokens (longer ones are cut at the end and counted).

    `chat` renders prompt/completion records through the chat template (one user and one assistant turn).
    Examples whose loss tokens were all cut away are dropped and counted in ``n_dropped``.
    """
    if max_len < 2:
        raise ValueError(f"max_len must be at least 2, got {max_len}")
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no EOS token; lorakit appends EOS to every example")
    examples: list[Example] = []
    stats = DataStats()
    for index, record in enumerate(records):
        example = tokenize_record(record, tokenizer, chat=chat, where=f"record {index}")
        if len(example["input_ids"]) > max_len:
            example["input_ids"] = example["input_ids"][:max_len]
            example["labels"] = example["labels"][:max_len]
            stats.n_truncated += 1
        loss_tokens = sum(label != IGNORE_INDEX for label in example["labels"])
        if loss_tokens == 0:
            stats.n_dropped += 1
            continue
        examples.append(example)
        stats.n_examples += 1
        stats.n_tokens += len(example["input_ids"])
        stats.n_loss_tokens += loss_tokens
    return examples, stats


def tokenize_record(
    record: dict[str, Any], tokenizer: PreTrainedTokenizerBase, *, chat: bool = False, where: str = "record"
) -> Example:
    """Tokenize one record (untruncated)."""
    kind = record_format(record, where)
    eos = tokenizer.eos_token_id
    if kind == "text":
        example = _encode_segments([(record["text"], True)], tokenizer, _bos_prefix(tokenizer))
        example["input_ids"].append(eos)
        example["labels"].append(eos)
        return example
    if kind == "prompt/completion" and not chat:
        prefix = _bos_prefix(tokenizer)
        example = _encode_segments([(record["prompt"], False), (record["completion"], True)], tokenizer, prefix)
        example["input_ids"].append(eos)
        example["labels"].append(eos)
        example["prompt_ids"] = prefix + _encode(record["prompt"], tokenizer)
        example["answer"] = record["completion"]
        return example
    messages = record["messages"] if kind == "messages" else _as_messages(record)
    segments = chat_segments(messages, tokenizer, where)
    example = _encode_segments(segments, tokenizer, [])
    example["prompt_ids"] = _encode_segments(segments[: _last_loss_segment(segments)], tokenizer, [])["input_ids"]
    example["answer"] = next(m["content"] for m in reversed(messages) if m["role"] == "assistant")
    return example


def _as_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]


def _last_loss_segment(segments: Sequence[Segment]) -> int:
    return max(i for i, (_, loss) in enumerate(segments) if loss)


def _encode(text: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _bos_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The BOS token when the tokenizer itself prepends one to plain text (Llama-2 style), else nothing."""
    bos = tokenizer.bos_token_id
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if bos is not None and with_special[:1] == [bos] else []


def _encode_segments(segments: Sequence[Segment], tokenizer: PreTrainedTokenizerBase, prefix: list[int]) -> Example:
    input_ids = list(prefix)
    labels = [IGNORE_INDEX] * len(prefix)
    for text, loss in segments:
        ids = _encode(text, tokenizer)
        input_ids += ids
        labels += ids if loss else [IGNORE_INDEX] * len(ids)
    return {"input_ids": input_ids, "labels": labels}


def chat_segments(
    messages: Sequence[dict[str, str]], tokenizer: PreTrainedTokenizerBase, where: str = "record"
) -> list[Segment]:
    """Split a templated conversation into text segments, marking assistant replies (through EOS) as loss-bearing.

    Each reply's span is what rendering ``messages[:i+1]`` adds to ``messages[:i]`` with the generation prompt.
    """
    template = None if tokenizer.chat_template else FALLBACK_CHAT_TEMPLATE
    eos = tokenizer.eos_token or ""

    def render(upto: int, generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            list(messages[:upto]), tokenize=False, add_generation_prompt=generation_prompt, chat_template=template
        )

    segments: list[Segment] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start, end = render(i, True), render(i + 1, False)
        _require_prefix(done, start, where)
        _require_prefix(start, end, where)
        reply = end[len(start) :]
        cut = reply.rfind(eos) + len(eos) if eos and eos in reply else len(reply)
        segments += [(start[len(done) :], False), (reply[:cut], True), (reply[cut:], False)]
        done = end
    full = render(len(messages), False)
    _require_prefix(done, full, where)
    segments.append((full[len(done) :], False))
    return _merge_segments(segments)


def _require_prefix(prefix: str, text: str, where: str) -> None:
    if not text.startswith(prefix):
        raise ValueError(
            f"{where}: the chat template does not render this conversation prefix by prefix consistently, "
            "so assistant turns cannot be masked"
        )


def _merge_segments(segments: Sequence[Segment]) -> list[Segment]:
    """Drop empty segments and join neighbours with the same loss flag."""
    merged: list[Segment] = []
    for text, loss in segments:
        if not text:
            continue
        if merged and merged[-1][1] == loss:
            merged[-1] = (merged[-1][0] + text, loss)
        else:
            merged.append((text, loss))
    return merged


# ---------------------------------------------------------------------------------------------------------------
# Packing and padding


def pack_examples(examples: Sequence[Example], seq_len: int) -> list[Example]:
    """Pack examples in order into blocks of at most `seq_len` tokens, labels kept.

    An example is never split across blocks unless it is longer than `seq_len` on its own; a block is closed when
    the next example does not fit. Total tokens are kept; attention still crosses example boundaries in a block.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    blocks: list[Example] = []
    block: Example = {"input_ids": [], "labels": []}
    for example in examples:
        for start in range(0, len(example["input_ids"]), seq_len):
            ids = example["input_ids"][start : start + seq_len]
            if len(block["input_ids"]) + len(ids) > seq_len:
                blocks.append(block)
                block = {"input_ids": [], "labels": []}
            block["input_ids"] += ids
            block["labels"] += example["labels"][start : start + seq_len]
    if block["input_ids"]:
        blocks.append(block)
    return blocks


def collate(batch: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: ``input_ids`` with `pad_id`, ``labels`` with ``IGNORE_INDEX``, plus ``attention_mask``."""
    if not batch:
        raise ValueError("cannot collate an empty batch")
    width = max(len(example["input_ids"]) for example in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, example in enumerate(batch):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.tensor(example["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.tensor(example["labels"], dtype=torch.long)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}

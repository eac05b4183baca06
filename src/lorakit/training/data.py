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

Files are read by `jsonl` and checked by `record_format`; every error is a one-line ValueError naming the file and
the line (``data.jsonl:17: ...``). A `Record` keeps its ``file:line``, so errors found while tokenizing name it too.
A record longer than ``max_len`` is tokenized (and a conversation rendered) only as far as the cut needs.
"""

from __future__ import annotations

import difflib
import os
import reprlib
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass
from typing import Any, TypedDict

import torch
from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from .jsonl import display_path, json_type, read_jsonl, shorten

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
_MESSAGE_FIELDS = frozenset({"role", "content"})
_CHARS_PER_TOKEN = 8  # a long text's first prefix encoded for a token limit: this many characters per token
_HEAD_MARGIN = 256  # tokens encoded past a limit so that those kept do not depend on where the text was cut


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


class Record(dict[str, Any]):
    """A validated record that remembers where it was read (``file:line``), so later errors can name it."""

    def __init__(self, fields: dict[str, Any], where: str) -> None:
        super().__init__(fields)
        self.where = where


def load_jsonl(path: str | os.PathLike[str]) -> list[Record]:
    """Read and validate a JSONL file of records (see `jsonl` for what a line may be, `record_format` for a record).

    Every error is a ValueError naming the file, the 1-based line and what is wrong (``data.jsonl:17: ...``);
    FileNotFoundError/PermissionError for a file that is missing or unreadable.
    """
    records = []
    for where, value in read_jsonl(path):
        record_format(value, where)
        records.append(Record(value, where))  # type: ignore[arg-type]  # record_format checked it is a dict
    if not records:
        raise ValueError(f"{display_path(path)}: empty dataset (no records)")
    return records


def record_format(record: object, where: str) -> str:
    """Return the format name of `record` (a key of ``FORMATS``), or raise a ValueError prefixed with `where`.

    The rules: a JSON object whose fields are exactly those of one format; every value a string of valid Unicode
    (``text`` not empty); ``messages`` a non-empty array of ``{"role", "content"}`` objects, roles from ``ROLES``,
    not opening with an assistant turn (a reply needs a turn before it) and holding at least one assistant turn.
    """
    if json_type(record) != "object":
        raise ValueError(f"{where}: expected a JSON object, got {json_type(record)}")
    unknown = sorted(set(record) - _KNOWN_FIELDS, key=repr)  # keys of in-memory records need not be strings
    if unknown:
        raise ValueError(f"{where}: unknown field {_unknown(unknown[0], _KNOWN_FIELDS)} (formats: {_format_list()})")
    fields = frozenset(record)
    name = next((name for name, required in FORMATS.items() if fields == required), None)
    if name is None:
        raise ValueError(f"{where}: fields {sorted(fields)} match no format (formats: {_format_list()})")
    if name == "messages":
        _check_messages(record["messages"], where)
    else:
        for field in sorted(fields):
            _check_string(record[field], f"{where}: field {field!r}")
        if not record.get("text", True):
            raise ValueError(f"{where}: field 'text' is empty (nothing to learn)")
    return name


def _format_list() -> str:
    return " | ".join("+".join(sorted(fields)) for fields in FORMATS.values())


def _unknown(name: object, known: Collection[str]) -> str:
    """`name` quoted, with the close matches among `known` when there are some."""
    if not isinstance(name, str):
        return reprlib.repr(name)
    close = difflib.get_close_matches(name, sorted(known), n=3)
    return shorten(name) + (f" (did you mean {' or '.join(map(repr, close))}?)" if close else "")


def _check_string(value: object, what: str) -> None:
    if json_type(value) != "string":
        raise ValueError(f"{what} must be a string, got {json_type(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"{what} holds an unpaired surrogate {value[error.start]!r} at character {error.start + 1} "
                         "(not valid Unicode)") from None


def _check_messages(messages: object, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        got = "an empty array" if messages == [] else json_type(messages)
        raise ValueError(f"{where}: field 'messages' must be a non-empty array, got {got}")
    for i, message in enumerate(messages):
        what = f"{where}: messages[{i}]"
        if json_type(message) != "object":
            raise ValueError(f"{what} must be an object with 'role' and 'content', got {json_type(message)}")
        extra = sorted(set(message) - _MESSAGE_FIELDS, key=repr)
        if extra:
            raise ValueError(f"{what}: unknown field {_unknown(extra[0], _MESSAGE_FIELDS)}")
        missing = sorted(_MESSAGE_FIELDS - set(message))
        if missing:
            raise ValueError(f"{what}: missing field {missing[0]!r}")
        role = message["role"]
        if role not in ROLES:
            shown = _unknown(role, ROLES) if isinstance(role, str) else json_type(role)
            raise ValueError(f"{what}: field 'role' must be one of {', '.join(ROLES)}, got {shown}")
        _check_string(message["content"], f"{what}: field 'content'")
    if messages[0]["role"] == "assistant":
        raise ValueError(f"{where}: messages[0]: the conversation opens with an assistant turn; "
                         "a reply needs a system or user turn before it")
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
    Examples whose loss tokens were all cut away are dropped and counted in ``n_dropped``; those cut keep no
    ``prompt_ids``/``answer`` (their exact match cannot be scored within `max_len`). Errors name a
    `Record`'s ``file:line``, or ``record <index>`` (0-based) for plain dicts.
    """
    if max_len < 2:
        raise ValueError(f"max_len must be at least 2, got {max_len}")
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no EOS token; lorakit appends EOS to every example")
    examples: list[Example] = []
    stats = DataStats()
    for index, record in enumerate(records):
        where = record.where if isinstance(record, Record) else f"record {index}"
        example = tokenize_record(record, tokenizer, chat=chat, where=where, max_len=max_len)
        if len(example["input_ids"]) > max_len:
            example = {"input_ids": example["input_ids"][:max_len], "labels": example["labels"][:max_len]}
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
    record: dict[str, Any],
    tokenizer: PreTrainedTokenizerBase,
    *,
    chat: bool = False,
    where: str = "record",
    max_len: int | None = None,
) -> Example:
    """Tokenize one record; a ValueError prefixed with `where` if it is invalid or has no loss token.

    With `max_len`, a record longer than that is tokenized only up to ``max_len + 1`` tokens (enough to be cut to
    the same `max_len` tokens, and seen to be longer), so a huge record costs no more than a long one.
    """
    kind = record_format(record, where)
    eos = tokenizer.eos_token_id
    if kind == "text":
        example = _encode_segments([(record["text"], True)], tokenizer, _bos_prefix(tokenizer), where, max_len)
        example["input_ids"].append(eos)
        example["labels"].append(eos)
        return example
    if kind == "prompt/completion" and not chat:
        prefix = _bos_prefix(tokenizer)
        segments = [(record["prompt"], False), (record["completion"], True)]
        example = _encode_segments(segments, tokenizer, prefix, where, max_len)
        example["input_ids"].append(eos)
        example["labels"].append(eos)
        example["prompt_ids"] = _encode_segments(segments[:1], tokenizer, prefix, where, max_len)["input_ids"]
        example["answer"] = record["completion"]
        return example
    messages = record["messages"] if kind == "messages" else _as_messages(record)
    segments = chat_segments(messages, tokenizer, where, max_len)
    if not any(loss for _, loss in segments):
        raise ValueError(f"{where}: the chat template renders the assistant turns as nothing, so nothing is learnt")
    example = _encode_segments(segments, tokenizer, [], where, max_len)
    prompt_segments = segments[: _last_loss_segment(segments)]
    example["prompt_ids"] = _encode_segments(prompt_segments, tokenizer, [], where, max_len)["input_ids"]
    example["answer"] = next(m["content"] for m in reversed(messages) if m["role"] == "assistant")
    return example


def _as_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]


def _last_loss_segment(segments: Sequence[Segment]) -> int:
    return max(i for i, (_, loss) in enumerate(segments) if loss)


def _encode(text: str, tokenizer: PreTrainedTokenizerBase, where: str, limit: int | None = None) -> list[int]:
    """The token ids of `text`; with `limit`, its first `limit` tokens, encoding no more of a long text than needed.

    A long text is encoded by growing prefixes until one yields ``_HEAD_MARGIN`` tokens past the limit: tokenizers
    merge neighbouring symbols only, so the tokens that far before the cut are those of the whole text.
    """
    if not text or (limit is not None and limit <= 0):
        return []
    if limit is not None:
        size = _CHARS_PER_TOKEN * (limit + _HEAD_MARGIN)
        while size < len(text):
            ids = _encode(text[:size], tokenizer, where)
            if len(ids) >= limit + _HEAD_MARGIN:
                return ids[:limit]
            size *= 4
    try:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    except (TypeError, ValueError) as error:  # the tokenizer's own refusals, named for the record they concern
        raise ValueError(f"{where}: the tokenizer cannot encode this text ({_one_line(error)})") from None
    return ids if limit is None else ids[:limit]


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _bos_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The BOS token when the tokenizer itself prepends one to plain text (Llama-2 style), else nothing."""
    bos = tokenizer.bos_token_id
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if bos is not None and with_special[:1] == [bos] else []


def _encode_segments(
    segments: Sequence[Segment],
    tokenizer: PreTrainedTokenizerBase,
    prefix: list[int],
    where: str,
    max_len: int | None = None,
) -> Example:
    """Concatenated segments after `prefix`, loss where marked; with `max_len`, at most ``max_len + 1`` tokens."""
    input_ids = list(prefix)
    labels = [IGNORE_INDEX] * len(prefix)
    for text, loss in segments:
        ids = _encode(text, tokenizer, where, None if max_len is None else max_len + 1 - len(input_ids))
        input_ids += ids
        labels += ids if loss else [IGNORE_INDEX] * len(ids)
    return {"input_ids": input_ids, "labels": labels}


def chat_segments(
    messages: Sequence[dict[str, str]],
    tokenizer: PreTrainedTokenizerBase,
    where: str = "record",
    max_len: int | None = None,
) -> list[Segment]:
    """Split a templated conversation into text segments, marking assistant replies (through EOS) as loss-bearing.

    Each reply's span is what rendering ``messages[:i+1]`` adds to ``messages[:i]`` with the generation prompt.
    With `max_len`, rendering stops after the reply that takes the conversation ``_HEAD_MARGIN`` tokens past
    `max_len` (what follows would be cut away), so a long conversation costs what its kept tokens cost.
    """
    template = None if tokenizer.chat_template else FALLBACK_CHAT_TEMPLATE
    eos = tokenizer.eos_token or ""

    def render(upto: int, generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(
                list(messages[:upto]), tokenize=False, add_generation_prompt=generation_prompt, chat_template=template
            )
        except (TemplateError, TypeError, ValueError) as error:  # raise_exception() in a template, or its bugs
            raise ValueError(f"{where}: the chat template refuses this conversation ({_one_line(error)})") from None

    segments: list[Segment] = []
    done = ""
    count_at = 0 if max_len is None else max_len  # rendered characters at which to count the tokens next
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
        if max_len is not None and len(done) >= count_at:
            head = _merge_segments(segments)
            limit = max_len + _HEAD_MARGIN
            if len(_encode_segments(head, tokenizer, [], where, limit)["input_ids"]) > limit:
                return head
            count_at = 2 * len(done)
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

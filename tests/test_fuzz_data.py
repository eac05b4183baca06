"""Fuzz properties of the training data: JSONL files and in-memory records, valid or hostile, through the data API
and the command line.

The oracle is written here, apart from lorakit's code (`expected_line`, `valid_record`):
- a file is read line by line, lines split at "\\n"; a UTF-8 byte order mark may open the file; a line of spaces, tabs
  and "\\r" alone is skipped; every other line must be strict UTF-8 holding one JSON value with no duplicate key;
- a record is a JSON object with exactly the fields of one format: ``text`` (a non-empty string),
  ``prompt`` + ``completion`` (strings), or ``messages`` (a non-empty array of objects with exactly ``role``, one of
  system/user/assistant, and ``content``, a string; the first turn not the assistant's; some assistant turn);
- strings must be valid Unicode (no unpaired surrogate);
- a file with no record is refused.
Whatever is refused must be refused with a ValueError naming the file and the line of the first bad record
(``file:line: ...``, one line); whatever is valid must load, and tokenize into examples whose loss tokens decode to
exactly the text learnt from (completion or assistant reply, plus EOS).
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from fuzzing import assert_clean_error, assert_refused, bounded, count_case, run_cli
from hypothesis import given, settings
from hypothesis import strategies as st
from test_data import labelled_spans
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from lorakit.models import byte_tokenizer
from lorakit.models.builtin import cache_root
from lorakit.training.data import IGNORE_INDEX, Example, load_jsonl, tokenize_records

BOM = codecs.BOM_UTF8
ROLES = ("system", "user", "assistant")
FORMAT_FIELDS = ({"text"}, {"prompt", "completion"}, {"messages"})

# --- the oracle ---------------------------------------------------------------------------------------------------


class Refused(Exception):
    """The oracle's verdict on a line or record that must be refused."""


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    if len({key for key, _ in pairs}) != len(pairs):
        raise Refused("duplicate key")
    return dict(pairs)


def _is_unicode(text: str) -> bool:
    return not any(0xD800 <= ord(char) <= 0xDFFF for char in text)


def _is_string(value: object, *, non_empty: bool = False) -> bool:
    return type(value) is str and _is_unicode(value) and (bool(value) or not non_empty)


def valid_record(value: object) -> bool:
    """The record rule, written independently of lorakit."""
    if type(value) is not dict or set(value) not in FORMAT_FIELDS:
        return False
    if "text" in value:
        return _is_string(value["text"], non_empty=True)
    if "prompt" in value:
        return _is_string(value["prompt"]) and _is_string(value["completion"])
    turns = value["messages"]
    return (type(turns) is list and len(turns) > 0
            and all(type(turn) is dict and set(turn) == {"role", "content"} and type(turn["role"]) is str
                    and turn["role"] in ROLES and _is_string(turn["content"]) for turn in turns)
            and turns[0]["role"] != "assistant" and any(turn["role"] == "assistant" for turn in turns))


def expected_line(raw: bytes, number: int) -> dict[str, Any] | None:
    """The record a physical line holds, None for a blank line; raises Refused for a line that must be refused."""
    if number == 1 and raw.startswith(BOM):
        raw = raw[len(BOM):]
    if not raw.strip(b" \t\r"):
        return None
    try:
        text = raw.decode("utf-8", errors="strict")
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_int=Decimal, parse_float=Decimal,
                           parse_constant=Decimal)
    except (ValueError, RecursionError) as error:
        raise Refused(str(error)) from None
    if not valid_record(value):
        raise Refused("not a record")
    return value


def expected_file(data: bytes) -> tuple[list[dict[str, Any]], int | None]:
    """The records of a file and the 1-based line of the first one to refuse (None if none; 0: no record at all)."""
    records = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            record = expected_line(raw, number)
        except Refused:
            return records, number
        if record is not None:
            records.append(record)
    return records, (None if records else 0)


# --- what tokenization must give ----------------------------------------------------------------------------------


def loss_spans(example: Example, tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Each run of consecutive loss tokens, decoded as written (no clean-up of spaces)."""
    return labelled_spans(example, tokenizer, clean_up_tokenization_spaces=False)


def round_trip(text: str, tokenizer: PreTrainedTokenizerBase) -> str:
    """`text` as the tokenizer can represent it (SmolLM2's vocabulary lacks some bytes, e.g. 0xF1)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
    return tokenizer.decode(ids, clean_up_tokenization_spaces=False)


def learnt_texts(record: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """What the loss tokens of a record's example must decode to."""
    if "text" in record:
        learnt = [record["text"]]
    elif "completion" in record:
        learnt = [record["completion"]]
    else:
        learnt = [turn["content"] for turn in record["messages"] if turn["role"] == "assistant"]
    return [round_trip(text, tokenizer) + tokenizer.eos_token for text in learnt]


def check_examples(records: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase, chat: bool) -> None:
    examples, stats = tokenize_records(records, tokenizer, 1 << 30, chat=chat)
    assert (stats.n_examples, stats.n_truncated, stats.n_dropped) == (len(records), 0, 0)
    for record, example in zip(records, examples, strict=True):
        assert loss_spans(example, tokenizer) == learnt_texts(record, tokenizer)
        decoded = tokenizer.decode(example["input_ids"], clean_up_tokenization_spaces=False)
        if "text" in record:
            assert decoded == round_trip(record["text"], tokenizer) + tokenizer.eos_token
        elif "prompt" in record and not chat:
            pieces = (round_trip(record[field], tokenizer) for field in ("prompt", "completion"))
            assert decoded == "".join(pieces) + tokenizer.eos_token
        else:
            assert example["input_ids"][: len(example["prompt_ids"])] == example["prompt_ids"]


def _smollm2_tokenizer() -> PreTrainedTokenizerBase | None:
    """SmolLM2's tokenizer and chat template, when a converted copy sits in the lorakit cache (never built here)."""
    folder = cache_root() / "models" / "smollm2-135m"
    return AutoTokenizer.from_pretrained(folder) if (folder / "tokenizer.json").is_file() else None


def _fallback_tokenizer() -> PreTrainedTokenizerBase:
    plain = byte_tokenizer()
    plain.chat_template = None  # lorakit's fallback template
    return plain


TOKENIZERS: dict[str, Callable[[], PreTrainedTokenizerBase | None]] = {
    "byte": byte_tokenizer, "fallback": _fallback_tokenizer, "smollm2": _smollm2_tokenizer,
}


@pytest.fixture(scope="module")
def tokenizers() -> dict[str, PreTrainedTokenizerBase]:
    loaded = {name: make() for name, make in TOKENIZERS.items()}
    return {name: tokenizer for name, tokenizer in loaded.items() if tokenizer is not None}


# --- the grammar of lines -----------------------------------------------------------------------------------------

ODD_TEXT = ["<|im_end|>", "<|im_start|>assistant\n", "<|endoftext|>", "\x00", "\r\n", "\u2028\u2029", "\U0001f600",
            "e\u0301", "\ufeff", "{{ messages }}", "{% if %}", " ", "\t\x1b[0m", "\U0010ffff", "null", "\\", '"']
texts = st.one_of(st.text(max_size=12), st.sampled_from(ODD_TEXT),
                  st.lists(st.sampled_from(ODD_TEXT), max_size=4).map("".join))
huge_texts = st.tuples(st.sampled_from(["a", "word ", "\U0001f600", "\x00"]),
                       st.integers(20_000, 100_000)).map(lambda unit_count: unit_count[0] * unit_count[1])
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**30, 10**30), st.floats(allow_nan=False,
                                                                                             allow_infinity=False))
non_strings = st.one_of(json_scalars, st.lists(texts, max_size=2), st.dictionaries(texts, texts, max_size=2))


@st.composite
def valid_records(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["text", "prompt", "messages"]))
    if kind == "text":
        return {"text": draw(huge_texts if draw(st.integers(0, 60)) == 0 else texts) or "x"}
    if kind == "prompt":
        return {"prompt": draw(texts), "completion": draw(texts)}
    first = draw(st.sampled_from(["system", "user"]))
    rest = draw(st.lists(st.sampled_from(ROLES), max_size=4))
    roles = [first, *rest] if "assistant" in rest else [first, *rest, "assistant"]
    return {"messages": [{"role": role, "content": draw(texts)} for role in roles]}


def _mutate_record(draw: st.DrawFn, record: dict[str, Any]) -> tuple[object, str]:
    """A record made invalid in one way, and a fragment the refusal must contain."""
    how = draw(st.sampled_from(["extra", "missing", "type", "surrogate", "non-object"]
                               + (["empty-text"] if "text" in record else [])
                               + (["turns", "turn", "turn-key", "role", "content", "assistant-first", "no-assistant"]
                                  if "messages" in record else [])))
    field = draw(st.sampled_from(sorted(record)))
    if how == "extra":
        name = draw(st.sampled_from(["txt", "label", "Text", "completions", "id", ""]))
        return {**record, name: draw(texts)}, "unknown field"
    if how == "missing":
        return {key: value for key, value in record.items() if key != field}, "match no format"
    if how == "type":
        return {**record, field: draw(non_strings)}, "must be"
    if how == "surrogate":
        lone = draw(st.sampled_from(["\ud800", "a\udfffb", "\udbff\U0001f600"]))
        turns = [{"role": "user", "content": lone}, {"role": "assistant", "content": "a"}]
        return {**record, field: turns if field == "messages" else lone}, "unpaired surrogate"
    if how == "non-object":
        return draw(st.one_of(json_scalars, texts, st.lists(texts, max_size=3))), "expected a JSON object"
    if how == "empty-text":
        return {"text": ""}, "is empty"
    turns: list[Any] = [dict(turn) for turn in record["messages"]]
    i = draw(st.integers(0, len(turns) - 1))
    if how == "turns":
        return {"messages": draw(st.one_of(st.just([]), json_scalars, texts))}, "non-empty array"
    if how == "turn":
        turns[i] = draw(st.one_of(json_scalars, texts, st.lists(texts, max_size=2)))
        return {"messages": turns}, "must be an object"
    if how == "turn-key":
        turns[i]["name"] = "x"
        return {"messages": turns}, "unknown field 'name'"
    if how == "role":
        turns[i]["role"] = draw(st.one_of(st.sampled_from(["bot", "tool", "User", "assistent", ""]), non_strings))
        return {"messages": turns}, "field 'role'"
    if how == "content":
        turns[i]["content"] = draw(non_strings)
        return {"messages": turns}, "field 'content'"
    if how == "assistant-first":
        return {"messages": [{"role": "assistant", "content": "hi"}, *turns]}, "opens with an assistant turn"
    return {"messages": [turn for turn in turns if turn["role"] != "assistant"] or [{"role": "user", "content": ""}]}, (
        "no assistant turn")


def dump(value: object, draw: st.DrawFn) -> bytes:
    """`value` as one JSON line, in one of several legal spellings."""
    spacing = draw(st.sampled_from([(", ", ": "), (",", ":"), (" ,\t", " :  ")]))
    text = json.dumps(value, ensure_ascii=draw(st.booleans()), separators=spacing)
    if not _is_unicode(text):  # a lone surrogate can only be written as an escape
        text = json.dumps(value, separators=spacing)
    return text.encode("utf-8") + draw(st.sampled_from([b"", b" ", b"\r", b"\t \r"]))


@st.composite
def lines(draw: st.DrawFn, valid: bool) -> tuple[bytes, str | None]:
    """One line and, for a line to refuse, a fragment its error message must contain."""
    record = draw(valid_records())
    if valid:
        return dump(record, draw), None
    how = draw(st.sampled_from(["record"] * 6 + ["utf8", "json", "nested", "digits", "nan", "duplicate", "nul",
                                                 "bom", "deep-value"]))
    if how == "record":
        value, fragment = _mutate_record(draw, record)
        return dump(value, draw), fragment
    good = dump(record, draw)
    if how == "utf8":
        cut = draw(st.integers(0, len(good)))
        bad = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80"]))
        return good[:cut] + bad + good[cut:], "not valid UTF-8"
    if how == "json":  # a proper prefix of an object, cut between characters
        text = good.decode("utf-8").rstrip()
        return text[: draw(st.integers(1, len(text) - 1))].encode("utf-8"), "malformed JSON"
    if how == "nested":
        depth = draw(st.sampled_from([5_000, 100_000]))
        return b'{"text": ' + b"[" * depth + b"]" * depth + b"}", "nested too deeply"
    if how == "digits":
        return b'{"text": ' + b"7" * draw(st.integers(4_000, 20_000)) + b"}", "must be a string, got number"
    if how == "nan":
        return b'{"prompt": "p", "completion": ' + draw(st.sampled_from([b"NaN", b"-Infinity", b"1e999"])) + b"}", (
            "got number")
    if how == "duplicate":
        return b'{"text": "a", "text": "b"}', "duplicate key 'text'"
    if how == "nul":
        return b'{"text": "a\x00b"}', "malformed JSON"
    if how == "bom":  # two: the first is allowed when this is the file's first line
        return BOM + BOM + good, "malformed JSON"
    return b'{"text": ' + b"[" * 50 + b"]" * 50 + b"}", "must be a string, got array"


@st.composite
def files(draw: st.DrawFn, all_valid: bool = False) -> tuple[bytes, int | None, str | None]:
    """A JSONL file, the line of its first error (None if valid, 0 if it holds no record) and that error's fragment."""
    n = draw(st.integers(0, 6))
    bad = None if all_valid or not draw(st.booleans()) else draw(st.integers(0, max(0, n - 1)))
    chunks: list[bytes] = []
    error: tuple[int | None, str | None] = (None, None)
    for i in range(n):
        for _ in range(draw(st.integers(0, 1))):
            chunks.append(draw(st.sampled_from([b"", b" ", b"\t", b"\r", b"  \t\r"])))
        line, fragment = draw(lines(valid=i != bad))
        chunks.append(line)
        if i == bad:
            error = (len(chunks), fragment)
    newline = draw(st.sampled_from([b"\n", b"\r\n"]))
    data = newline.join(chunks) + (newline if draw(st.booleans()) else b"")
    if draw(st.booleans()):
        data = BOM + data
    if error == (None, None) and not any(chunk.strip(b" \t\r") for chunk in chunks):
        error = (0, "empty dataset")
    return data, *error


def write(tmp_path: Path, data: bytes, name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def check_load(path: Path, data: bytes, line: int | None, fragment: str | None) -> list[dict[str, Any]] | None:
    """Load `path` and compare with the oracle; the records when it must load."""
    records, refused_at = expected_file(data)
    if line is not None:
        assert refused_at == line, f"oracle and grammar disagree: line {refused_at} vs {line}"
    try:
        loaded = load_jsonl(path)
    except ValueError as error:
        message = assert_clean_error(error)
        assert refused_at is not None, f"valid file refused: {message}"
        shown = repr(str(path)) if "\n" in str(path) else str(path)  # a line break in a name is escaped
        prefix = f"{shown}: " if refused_at == 0 else f"{shown}:{refused_at}: "
        assert message.startswith(prefix), f"{message!r} does not start with {prefix!r}"
        assert fragment is None or fragment in message, f"{fragment!r} not in {message!r}"
        return None
    assert refused_at is None, f"line {refused_at} accepted, should be refused ({fragment})"
    assert loaded == records
    return records


# --- properties ---------------------------------------------------------------------------------------------------


FILE_NAMES = ["data.jsonl", "my data.jsonl", "d\u00e4t\u00e4 \U0001f600.jsonl", "line\nbreak.jsonl", "-.jsonl"]


@given(case=files(), name=st.sampled_from(FILE_NAMES), tokenizer_name=st.sampled_from(sorted(TOKENIZERS)),
       chat=st.booleans())
def test_files_from_the_grammar_load_or_are_refused_at_the_right_line(
    tmp_path: Path, tokenizers: dict[str, PreTrainedTokenizerBase], case: tuple[bytes, int | None, str | None],
    name: str, tokenizer_name: str, chat: bool,
) -> None:
    count_case("data")
    data, line, fragment = case
    path = write(tmp_path, data, name)
    with bounded(60, 512):
        records = check_load(path, data, line, fragment)
        tokenizer = tokenizers.get(tokenizer_name, tokenizers["byte"])
        if records is not None:
            check_examples(records, tokenizer, chat)


@st.composite
def mutated_files(draw: st.DrawFn) -> bytes:
    """A valid file with a few raw byte edits: flips, insertions, deletions, cuts, line breaks."""
    data = bytearray(draw(files(all_valid=True))[0])
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        how = draw(st.sampled_from(["flip", "insert", "delete", "cut", "break"]))
        if how == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif how == "insert":
            data[at:at] = draw(st.one_of(st.binary(min_size=1, max_size=4),
                                         st.sampled_from([b"\x00", b"\xff", b"\\ud800", b"\\u", b"[", b"{", b'"', b","])))
        elif how == "delete":
            del data[at: at + draw(st.integers(1, 8))]
        elif how == "cut":
            del data[at:]
        else:
            data[at:at] = draw(st.sampled_from([b"\n", b"\r", b"\r\n", b"\n\n"]))
    return bytes(data)


@given(data=mutated_files())
def test_byte_mutations_load_or_are_refused_at_the_right_line(
    tmp_path: Path, tokenizers: dict[str, PreTrainedTokenizerBase], data: bytes
) -> None:
    count_case("data")
    path = write(tmp_path, data)
    with bounded(60, 512):
        records = check_load(path, data, None, None)
        if records is not None:
            check_examples(records, tokenizers["byte"], chat=False)


python_values = st.recursive(
    st.one_of(json_scalars, st.floats(), texts, st.sampled_from(["\ud800", "a\udfffb"]), st.binary(max_size=3)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.tuples(inner),
                            st.dictionaries(st.one_of(texts, st.sampled_from(["role", "content"]), st.integers()),
                                            inner, max_size=3)),
    max_leaves=8,
)
in_memory_records = st.one_of(
    valid_records(),
    st.builds(lambda record, key, value: {**record, key: value}, valid_records(),
              st.sampled_from(["text", "prompt", "completion", "messages", "role", 0]), python_values),
    st.builds(lambda role, content: {"messages": [{"role": "user", "content": "q"}, {"role": role, "content": content}]},
              python_values, python_values),
    python_values,
)


@given(records=st.lists(in_memory_records, min_size=1, max_size=4), chat=st.booleans())
def test_in_memory_records_tokenize_or_are_refused_by_index(
    tokenizers: dict[str, PreTrainedTokenizerBase], records: list[Any], chat: bool
) -> None:
    count_case("data")
    first_bad = next((i for i, record in enumerate(records) if not valid_record(record)), None)
    with bounded(60, 512):
        try:
            check_examples(records, tokenizers["byte"], chat)
        except ValueError as error:
            message = assert_clean_error(error)
            assert first_bad is not None, f"valid records refused: {message}"
            assert message.startswith(f"record {first_bad}: "), message
        else:
            assert first_bad is None, f"record {first_bad} accepted: {records[first_bad]!r}"


plain_texts = st.text(st.characters(blacklist_characters="<", codec="utf-8"), max_size=40)


@given(records=st.lists(st.one_of(st.builds(lambda text: {"text": text or "x"}, plain_texts),
                                  st.builds(lambda p, c: {"prompt": p, "completion": c}, plain_texts, plain_texts)),
                        min_size=1, max_size=8),
       max_len=st.integers(2, 64))
def test_truncation_and_drops_follow_token_counts(
    tokenizers: dict[str, PreTrainedTokenizerBase], records: list[dict[str, str]], max_len: int
) -> None:
    """With the byte tokenizer a string is as many tokens as UTF-8 bytes: the counts are known in advance."""
    count_case("data")
    size = [(len(r.get("prompt", "").encode()), len(r.get("text", r.get("completion", "")).encode())) for r in records]
    kept = [(prompt, learnt) for prompt, learnt in size if prompt < max_len]  # some loss token survives the cut
    with bounded(30, 256):
        examples, stats = tokenize_records(records, tokenizers["byte"], max_len)
    assert stats.n_truncated == sum(prompt + learnt + 1 > max_len for prompt, learnt in size)
    assert stats.n_dropped == len(records) - len(kept)
    assert [len(e["input_ids"]) for e in examples] == [min(p + n + 1, max_len) for p, n in kept]
    assert stats.n_loss_tokens == sum(min(p + n + 1, max_len) - p for p, n in kept)


words = st.lists(st.one_of(st.text(max_size=6), st.sampled_from(ODD_TEXT)), min_size=1, max_size=20).map(" ".join)
long_texts = st.tuples(words, st.integers(1, 600)).map(lambda word_count: (word_count[0] + " ") * word_count[1])


long_conversations = st.lists(words, min_size=1, max_size=120).map(
    lambda contents: [{"role": ("user", "assistant")[i % 2], "content": c} for i, c in enumerate(contents + ["."])])


@given(text=long_texts, prompt=st.one_of(st.just(""), words), turns=long_conversations, max_len=st.integers(2, 96),
       tokenizer_name=st.sampled_from(["byte", "fallback", "smollm2"]), chat=st.booleans())
def test_long_records_are_cut_as_if_tokenized_whole(
    tokenizers: dict[str, PreTrainedTokenizerBase], text: str, prompt: str, turns: list[dict[str, str]],
    max_len: int, tokenizer_name: str, chat: bool,
) -> None:
    """Only the head of a long record is tokenized: the kept tokens and the counts must be those of the whole."""
    count_case("data")
    tokenizer = tokenizers.get(tokenizer_name, tokenizers["byte"])
    records = [{"text": text}, {"prompt": prompt, "completion": text}, {"prompt": text, "completion": prompt},
               {"messages": turns}]
    with bounded(60, 512):
        examples, stats = tokenize_records(records, tokenizer, max_len, chat=chat)
        whole, _ = tokenize_records(records, tokenizer, 1 << 30, chat=chat)
    cut = [{key: example[key][:max_len] for key in ("input_ids", "labels")} for example in whole]
    kept = [example for example in cut if any(label != IGNORE_INDEX for label in example["labels"])]
    assert [{key: e[key] for key in ("input_ids", "labels")} for e in examples] == kept
    assert stats.n_truncated == sum(len(example["input_ids"]) > max_len for example in whole)
    assert stats.n_dropped == len(records) - len(kept)


@pytest.fixture
def cli_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path_factory.getbasetemp() / "lorakit-cache"))


small_files = files().filter(lambda case: len(case[0]) <= 400)  # every example fits in --seq-len 512


@settings(max_examples=max(3, settings().max_examples // 15))
@given(case=small_files, command=st.sampled_from(["train", "eval"]), chat=st.booleans())
def test_command_line_trains_or_refuses_in_one_line(
    tmp_path: Path, cli_cache: None, case: tuple[bytes, int | None, str | None], command: str, chat: bool
) -> None:
    count_case("data")
    data = case[0]
    work = tmp_path / f"case{len(os.listdir(tmp_path))}"
    work.mkdir()
    path = write(work, data)
    out = work / "out"
    common = ["--model", "tiny-llama", "--data", str(path), "--seq-len", "512", "--batch-size", "1",
              *(["--chat"] if chat else [])]
    argv = ([command, *common, "--eval-samples", "0", "--max-steps", "1", "--output-dir", str(out)]
            if command == "train" else [command, *common, "--eval-samples", "1"])
    _, refused_at = expected_file(data)
    outcome = run_cli(argv, seconds=120, memory_mib=1024)
    assert path.read_bytes() == data
    if refused_at is None:
        assert outcome.code == 0, outcome.stderr
        return
    message = assert_refused(outcome)
    assert message.startswith(f"{path}:{refused_at}: " if refused_at else f"{path}: "), message
    assert not out.exists()

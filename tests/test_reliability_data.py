"""Training data under hostile input: every refusal a one-line ValueError naming ``file:line`` and what is wrong,
every odd but legal record trained on, through the data API and the command line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from fuzzing import assert_clean_error, assert_refused, bounded, run_cli
from transformers import PreTrainedTokenizerBase

from lorakit.models import byte_tokenizer
from lorakit.training import jsonl
from lorakit.training.data import IGNORE_INDEX, Record, load_jsonl, tokenize_records

GOOD = '{"prompt": "Say hi.", "completion": "hi"}'
FAST = ["--model", "tiny-llama", "--batch-size", "1", "--eval-samples", "0", "--max-steps", "1"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path_factory.getbasetemp() / "lorakit-cache"))


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return byte_tokenizer()


def write(tmp_path: Path, data: bytes | str) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def refusal(path: Path) -> str:
    """The one-line message `load_jsonl` refuses `path` with."""
    with pytest.raises(ValueError) as caught:
        load_jsonl(path)
    return assert_clean_error(caught.value)


# --- the refusals found by fuzzing ----------------------------------------------------------------------------


@pytest.mark.parametrize("line", [
    r'{"text": "a\ud800b"}',
    r'{"prompt": "\udfff", "completion": "c"}',
    r'{"messages": [{"role": "user", "content": "\udbff"}, {"role": "assistant", "content": "a"}]}',
])
def test_lone_surrogates_are_refused_before_the_tokenizer(tmp_path: Path, line: str) -> None:
    message = refusal(write(tmp_path, f"{GOOD}\n{line}\n"))
    assert message.startswith(f"{tmp_path / 'data.jsonl'}:2: ") and "unpaired surrogate" in message


def test_lone_surrogates_in_memory_are_refused_by_record(tokenizer: PreTrainedTokenizerBase) -> None:
    with pytest.raises(ValueError, match=r"^record 1: field 'text' holds an unpaired surrogate '\\ud800'"):
        tokenize_records([{"text": "ok"}, {"text": "\ud800"}], tokenizer, 16)


def test_deeply_nested_json_is_refused_not_a_recursion_error(tmp_path: Path) -> None:
    message = refusal(write(tmp_path, GOOD + "\n" + "[" * 100_000 + "]" * 100_000 + "\n"))
    assert message == f"{tmp_path / 'data.jsonl'}:2: malformed JSON (nested too deeply)"


def test_invalid_utf8_names_file_line_and_byte(tmp_path: Path) -> None:
    message = refusal(write(tmp_path, GOOD.encode() + b'\n\n{"text": "caf\xe9"}\n'))
    assert message == f"{tmp_path / 'data.jsonl'}:3: not valid UTF-8 (byte 0xe9 at byte 14)"


def test_a_5000_digit_number_names_file_and_line(tmp_path: Path) -> None:
    message = refusal(write(tmp_path, '{"text": ' + "9" * 5000 + "}\n"))
    assert message == f"{tmp_path / 'data.jsonl'}:1: field 'text' must be a string, got number"


def test_a_conversation_opening_with_the_assistant_is_refused_by_rule(tmp_path: Path) -> None:
    """A reply needs something to reply to; chat templates cannot render an assistant-first conversation's prompt."""
    line = json.dumps({"messages": [{"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Hi"}]})
    message = refusal(write(tmp_path, line + "\n"))
    assert message == (f"{tmp_path / 'data.jsonl'}:1: messages[0]: the conversation opens with an assistant turn; "
                       "a reply needs a system or user turn before it")


def test_a_system_turn_before_the_first_reply_is_enough(tmp_path: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    line = json.dumps({"messages": [{"role": "system", "content": "Greet."}, {"role": "assistant", "content": "Hi"}]})
    [example], _ = tokenize_records(load_jsonl(write(tmp_path, line + "\n")), tokenizer, 256)
    loss = [token for token, label in zip(example["input_ids"], example["labels"], strict=True) if label != -100]
    assert tokenizer.decode(loss) == "Hi<|im_end|>"


def test_errors_found_while_tokenizing_name_the_file_line(tmp_path: Path) -> None:
    """Records carry their file:line from loading to tokenizing (here a template that refuses system turns)."""
    strict = byte_tokenizer()
    strict.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                            "{{ raise_exception('System role not supported') }}{% endif %}"
                            "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}")
    line = json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                                    {"role": "assistant", "content": "a"}]})
    records = load_jsonl(write(tmp_path, f"{GOOD}\n\n{line}\n"))
    assert [record.where for record in records] == [f"{tmp_path / 'data.jsonl'}:{n}" for n in (1, 3)]
    with pytest.raises(ValueError) as caught:
        tokenize_records(records, strict, 256)
    assert assert_clean_error(caught.value) == (f"{tmp_path / 'data.jsonl'}:3: the chat template refuses this "
                                                "conversation (System role not supported)")


# --- what a file may hold: refused -----------------------------------------------------------------------------


@pytest.mark.parametrize(("data", "line", "reason"), [
    (b"", None, "empty dataset (no records)"),
    (b"\n \r\n\t\n", None, "empty dataset (no records)"),
    (b"[1, 2]\n", 1, "expected a JSON object, got array"),
    (b"null\n", 1, "expected a JSON object, got null"),
    (b"42\n", 1, "expected a JSON object, got number"),
    (b'{"txt": "a"}\n', 1, "unknown field 'txt' (did you mean 'text'?)"),
    (b'{"prompt": "p", "completion": "c", "label": 1}\n', 1, "unknown field 'label'"),
    (b'{"prompt": "p"}\n', 1, "fields ['prompt'] match no format"),
    (b'{"text": null}\n', 1, "field 'text' must be a string, got null"),
    (b'{"prompt": ["p"], "completion": "c"}\n', 1, "field 'prompt' must be a string, got array"),
    (b'{"text": NaN}\n', 1, "field 'text' must be a string, got number"),
    (b'{"text": ""}\n', 1, "field 'text' is empty (nothing to learn)"),
    (b'{"text": "a", "text": "b"}\n', 1, "duplicate key 'text'"),
    (b'{"text": "a\x00b"}\n', 1, "malformed JSON (Invalid control character at column 12)"),
    (b'{"text": "a"}\n\xef\xbb\xbf{"text": "b"}\n', 2, "malformed JSON"),
    (b'{"messages": []}\n', 1, "field 'messages' must be a non-empty array, got an empty array"),
    (b'{"messages": [{"role": "bot", "content": "x"}]}\n', 1,
     "messages[0]: field 'role' must be one of system, user, assistant, got 'bot'"),
    (b'{"messages": [{"role": "user", "content": "x"}, {"role": "asistant", "content": "y"}]}\n', 1,
     "did you mean 'assistant'?"),
    (b'{"messages": [{"role": "user", "content": 7}, {"role": "assistant", "content": "y"}]}\n', 1,
     "messages[0]: field 'content' must be a string, got number"),
    (b'{"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]}\n', 1,
     "messages[0]: missing field 'content'"),
    (b'{"messages": [{"role": "user", "content": "x"}]}\n', 1, "field 'messages' has no assistant turn"),
])
def test_refused_files_name_file_line_and_reason(tmp_path: Path, data: bytes, line: int | None, reason: str) -> None:
    path = write(tmp_path, data)
    message = refusal(path)
    assert message.startswith(f"{path}: " if line is None else f"{path}:{line}: ")
    assert reason in message


@pytest.mark.parametrize("name", ["line\nbreak.jsonl", "tab\t.jsonl", "bad\udcff.jsonl"])
def test_a_file_name_with_control_characters_is_shown_escaped_on_one_line(tmp_path: Path, name: str) -> None:
    with pytest.raises(FileNotFoundError) as caught:
        load_jsonl(tmp_path / name)
    assert assert_clean_error(caught.value) == f"{str(tmp_path / name)!r}: no such data file"


def test_a_directory_is_refused_by_name(tmp_path: Path) -> None:
    (tmp_path / "data.jsonl").mkdir()
    with pytest.raises(ValueError, match=r"data\.jsonl: is a directory, not a JSONL file"):
        load_jsonl(tmp_path / "data.jsonl")


def test_a_fifo_is_refused_not_read(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.jsonl")
    with pytest.raises(ValueError, match=r"pipe\.jsonl: not a regular file"):
        load_jsonl(tmp_path / "pipe.jsonl")


def test_an_unreadable_file_is_a_permission_error_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, GOOD)

    def denied(self: Path, *args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "open", denied)  # root reads any file whatever its mode
    with pytest.raises(PermissionError) as caught:
        load_jsonl(path)
    assert assert_clean_error(caught.value) == f"{path}: permission denied"


# --- what a file may hold: accepted ----------------------------------------------------------------------------


def test_bom_crlf_blank_lines_and_escapes_are_read(tmp_path: Path) -> None:
    data = (b'\xef\xbb\xbf{"text": "one"}\r\n\r\n  \t\n{"text":\r"two"}\n'
            b'{"prompt": "\\ud83d\\ude00 \\u0000\\u001b", "completion": ""}')
    records = load_jsonl(write(tmp_path, data))
    assert records == [{"text": "one"}, {"text": "two"}, {"prompt": "\U0001f600 \x00\x1b", "completion": ""}]
    assert [record.where.rsplit(":", 1)[1] for record in records] == ["1", "4", "5"]
    assert all(isinstance(record, Record) for record in records)


@pytest.mark.parametrize("text", ["\U0001f600 emoji", "\x00\x01\x7f\x1b[0m", "tab\tcr\rline\u2028sep",
                                  "e\u0301 \ufeff", "<|im_end|> inside", "{{ not a template }}", "\U0010ffff"])
def test_odd_but_legal_text_tokenizes_exactly(tmp_path: Path, tokenizer: PreTrainedTokenizerBase, text: str) -> None:
    records = load_jsonl(write(tmp_path, json.dumps({"prompt": "q", "completion": text}) + "\n"))
    [example], _ = tokenize_records(records, tokenizer, 4096)
    loss = [token for token, label in zip(example["input_ids"], example["labels"], strict=True)
            if label != IGNORE_INDEX]
    assert tokenizer.decode(loss) == text + "<|im_end|>"


def test_a_10_mb_record_costs_what_its_kept_tokens_cost(tmp_path: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    """Only the head of a record longer than max_len is tokenized (whole, it took 25 s and 2.3 GB)."""
    path = write(tmp_path, json.dumps({"prompt": "q", "completion": "word " * 2_000_000}) + "\n")
    with bounded(seconds=10, memory_mib=200):
        [example], stats = tokenize_records(load_jsonl(path), tokenizer, 64)
    assert tokenizer.decode(example["input_ids"]) == "q" + ("word " * 13)[:63]
    assert (stats.n_truncated, stats.n_loss_tokens) == (1, 63)


def test_a_2000_turn_conversation_renders_only_what_is_kept(tokenizer: PreTrainedTokenizerBase) -> None:
    """Masks come from rendering prefixes; past max_len (plus a margin) rendering stops (whole, it took 34 s)."""
    turns = [{"role": ("user", "assistant")[i % 2], "content": f"m{i}"} for i in range(2000)]
    with bounded(seconds=5, memory_mib=100):
        [example], stats = tokenize_records([{"messages": turns}], tokenizer, 512)
    assert (len(example["input_ids"]), stats.n_truncated) == (512, 1)
    assert "prompt_ids" not in example and "answer" not in example  # a cut conversation is not scored


def test_a_line_past_the_limit_is_refused_without_reading_it_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jsonl, "MAX_LINE_BYTES", 1 << 20)
    path = write(tmp_path, GOOD + "\n" + json.dumps({"text": "x" * (1 << 20)}) + "\n")
    with bounded(seconds=10, memory_mib=20):
        message = refusal(path)
    assert message == f"{path}:2: line longer than 1 MiB; split the record"


# --- through the command line --------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["train", "eval"])
def test_the_command_line_refuses_a_bad_line_in_one_line(tmp_path: Path, command: str) -> None:
    path = write(tmp_path, f'{GOOD}\n{{"text": "\\ud800"}}\n')
    out = tmp_path / "out"
    argv = {"train": ["train", *FAST, "--data", str(path), "--output-dir", str(out)],
            "eval": ["eval", "--model", "tiny-llama", "--data", str(path)]}[command]
    message = assert_refused(run_cli(argv))
    assert message.startswith(f"{path}:2: field 'text' holds an unpaired surrogate")
    assert not out.exists()


def test_training_data_cut_to_nothing_by_seq_len_names_file_and_flag(tmp_path: Path) -> None:
    path = write(tmp_path, "".join(json.dumps({"prompt": "x" * 80, "completion": "y"}) + "\n" for _ in range(3)))
    outcome = run_cli(["train", *FAST, "--data", str(path), "--seq-len", "32", "--output-dir", str(tmp_path / "o")])
    assert assert_refused(outcome) == (f"{path}: no usable example (the loss tokens of all 2 training records lie "
                                       "beyond --seq-len 32)")


def test_odd_records_train_end_to_end(tmp_path: Path) -> None:
    lines = [{"text": "\x00\U0001f600"}, {"prompt": "", "completion": ""},
             {"messages": [{"role": "system", "content": ""}, {"role": "assistant", "content": "<|im_end|>"}]}]
    path = write(tmp_path, "\ufeff" + "\r\n".join(json.dumps(line, ensure_ascii=False) for line in lines))
    outcome = run_cli(["train", *FAST, "--data", str(path), "--output-dir", str(tmp_path / "o")])
    assert outcome.code == 0, outcome.stderr

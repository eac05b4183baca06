"""Data pipeline: record validation, loss masks per format, truncation, packing, padding, batch streams, demo task."""

from __future__ import annotations

import itertools
import json
import random
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import PreTrainedTokenizerBase

from lorakit.models import byte_tokenizer
from lorakit.training.batches import BatchStream
from lorakit.training.data import IGNORE_INDEX, Example, collate, load_jsonl, pack_examples, tokenize_records
from lorakit.training.task import exact_match, ledger_format, make_builtin_task

EOS = "<|im_end|>"


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return byte_tokenizer()


def labelled_spans(example: Example, tokenizer: PreTrainedTokenizerBase, **decode: Any) -> list[str]:
    """Decode each run of consecutive loss-bearing tokens (`decode`: options of tokenizer.decode); checks labels copy
    the input where they carry loss."""
    spans: list[list[int]] = []
    previous = IGNORE_INDEX
    for token, label in zip(example["input_ids"], example["labels"], strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            if previous == IGNORE_INDEX:
                spans.append([])
            spans[-1].append(token)
        previous = label
    return [tokenizer.decode(span, **decode) for span in spans]


def flat(lists: list[list[int]]) -> list[int]:
    return list(itertools.chain.from_iterable(lists))


# --- formats and masks ------------------------------------------------------------------------------------------


def test_text_is_all_loss_plus_eos(tokenizer: PreTrainedTokenizerBase) -> None:
    [example], stats = tokenize_records([{"text": "hello world"}], tokenizer, 64)
    assert example["labels"] == example["input_ids"]
    assert labelled_spans(example, tokenizer) == ["hello world" + EOS]
    assert "answer" not in example
    assert (stats.n_examples, stats.n_tokens, stats.n_loss_tokens) == (1, 12, 12)


def test_prompt_completion_masks_the_prompt(tokenizer: PreTrainedTokenizerBase) -> None:
    record = {"prompt": "Q: two plus two?\nA:", "completion": " four"}
    [example], _ = tokenize_records([record], tokenizer, 64)
    assert labelled_spans(example, tokenizer) == [" four" + EOS]
    assert tokenizer.decode(example["prompt_ids"]) == record["prompt"]
    assert example["input_ids"][: len(example["prompt_ids"])] == example["prompt_ids"]
    assert example["answer"] == " four"


def test_prompt_completion_through_the_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    record = {"prompt": "Say hi.", "completion": "hi"}
    [example], _ = tokenize_records([record], tokenizer, 256, chat=True)
    assert labelled_spans(example, tokenizer) == ["hi" + EOS]
    expected_prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Say hi."}], tokenize=False, add_generation_prompt=True
    )
    assert tokenizer.decode(example["prompt_ids"]) == expected_prompt
    assert tokenizer.decode(example["input_ids"]) == expected_prompt + "hi" + EOS + "\n"


def test_messages_learn_only_assistant_turns(tokenizer: PreTrainedTokenizerBase) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
    ]
    [example], _ = tokenize_records([{"messages": messages}], tokenizer, 512)
    assert labelled_spans(example, tokenizer) == ["Hello!" + EOS, "Blue." + EOS]
    assert tokenizer.decode(example["input_ids"]) == tokenizer.apply_chat_template(messages, tokenize=False)
    assert example["answer"] == "Blue."
    assert tokenizer.decode(example["prompt_ids"]) == tokenizer.apply_chat_template(
        messages[:-1], tokenize=False, add_generation_prompt=True
    )


def test_messages_with_a_template_default_system_turn(tokenizer: PreTrainedTokenizerBase) -> None:
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    [example], _ = tokenize_records([{"messages": messages}], tokenizer, 512)
    assert labelled_spans(example, tokenizer) == ["Hello!" + EOS]
    assert tokenizer.decode(example["input_ids"]).startswith("<|im_start|>system\n")


def test_messages_without_a_chat_template_use_the_fallback() -> None:
    plain = byte_tokenizer()
    plain.chat_template = None
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    [example], _ = tokenize_records([{"messages": messages}], plain, 512)
    assert labelled_spans(example, plain) == ["Hello!" + EOS]
    assert plain.decode(example["input_ids"]) == "user:\nHi\nassistant:\nHello!" + EOS + "\n"
    assert plain.decode(example["prompt_ids"]) == "user:\nHi\nassistant:\n"


# --- truncation, packing, padding -------------------------------------------------------------------------------


def test_truncation_is_counted_and_empty_examples_dropped(tokenizer: PreTrainedTokenizerBase) -> None:
    records = [
        {"text": "short"},
        {"text": "a much longer text than the limit"},
        {"prompt": "a prompt longer than ten tokens", "completion": "x"},
    ]
    examples, stats = tokenize_records(records, tokenizer, 10)
    assert [len(e["input_ids"]) for e in examples] == [6, 10]
    assert (stats.n_examples, stats.n_truncated, stats.n_dropped) == (2, 2, 1)
    assert stats.n_tokens == 16 and stats.as_dict()["n_truncated"] == 2


def test_packing_keeps_every_token_and_label(tokenizer: PreTrainedTokenizerBase) -> None:
    records = [{"prompt": f"q{i} " * (i % 5), "completion": "a" * (1 + i % 7)} for i in range(40)]
    records.append({"text": "x" * 50})  # longer than a block: split
    examples, _ = tokenize_records(records, tokenizer, 128)
    blocks = pack_examples(examples, 24)
    assert all(len(b["input_ids"]) == len(b["labels"]) <= 24 for b in blocks)
    assert flat([b["input_ids"] for b in blocks]) == flat([e["input_ids"] for e in examples])
    assert flat([b["labels"] for b in blocks]) == flat([e["labels"] for e in examples])
    assert len(blocks) < len(examples)
    starts = {0}
    for example in examples[:-1]:
        starts.add(max(starts) + len(example["input_ids"]))
    offset = 0
    for block in blocks[:-3]:  # blocks made of whole examples start at an example boundary
        assert offset in starts
        offset += len(block["input_ids"])


def test_collate_pads_right(tokenizer: PreTrainedTokenizerBase) -> None:
    batch: list[Example] = [
        {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]},
        {"input_ids": [8], "labels": [8]},
    ]
    out = collate(batch, pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.long for t in out.values())


# --- batch stream -----------------------------------------------------------------------------------------------


def first_ids(batches: list[list[Example]]) -> list[list[int]]:
    return [[example["input_ids"][0] for example in batch] for batch in batches]


def indexed_examples(n: int) -> list[Example]:
    return [{"input_ids": [i], "labels": [i]} for i in range(n)]


def test_stream_covers_each_epoch_once_and_reshuffles() -> None:
    stream = BatchStream(indexed_examples(12), 4, seed=3)
    epochs = [sorted(flat(first_ids([next(stream) for _ in range(3)]))) for _ in range(2)]
    assert epochs == [list(range(12))] * 2
    assert stream.epoch == 1
    again = BatchStream(indexed_examples(12), 4, seed=3)
    other = BatchStream(indexed_examples(12), 4, seed=4)
    assert first_ids([next(again) for _ in range(3)]) != first_ids([next(other) for _ in range(3)])


def test_stream_resumes_exactly_across_epochs() -> None:
    examples = indexed_examples(10)  # 3 batches of 3 per epoch, one example dropped
    stream = BatchStream(examples, 3, seed=7)
    for _ in range(5):
        next(stream)
    state = json.loads(json.dumps(stream.state_dict()))
    expected = first_ids([next(stream) for _ in range(8)])
    resumed = BatchStream(examples, 3, seed=0)
    resumed.load_state_dict(state)
    assert first_ids([next(resumed) for _ in range(8)]) == expected


def test_stream_refuses_a_mismatched_resume() -> None:
    state = BatchStream(indexed_examples(10), 3).state_dict()
    with pytest.raises(ValueError, match="saved n_examples=10"):
        BatchStream(indexed_examples(11), 3).load_state_dict(state)
    with pytest.raises(ValueError, match="saved global_batch_size=3"):
        BatchStream(indexed_examples(10), 2).load_state_dict(state)


def test_sharded_streams_split_the_global_batch() -> None:
    examples = indexed_examples(50)
    single = BatchStream(examples, 6, seed=1)
    ranks = [BatchStream(examples, 2, seed=1, rank=r, world_size=3) for r in range(3)]
    for _ in range(20):  # crosses epochs
        shards = [first_ids([next(stream)])[0] for stream in ranks]
        assert flat(shards) == first_ids([next(single)])[0]
        assert len(set(flat(shards))) == 6


def varied_examples(n: int, seed: int = 0) -> list[Example]:
    """Example i has id i first and a random length in 1..40."""
    rng = random.Random(seed)
    return [{"input_ids": [i] * rng.randint(1, 40), "labels": [i]} for i in range(n)]


def padding(batches: list[list[Example]]) -> int:
    return sum(max(len(e["input_ids"]) for e in batch) * len(batch) - sum(len(e["input_ids"]) for e in batch)
               for batch in batches)


def test_length_grouped_stream_covers_each_epoch_once_with_little_padding() -> None:
    examples = varied_examples(1003)  # 125 batches of 8 per epoch, 3 examples dropped, 3 groups of 50 batches
    grouped = BatchStream(examples, 8, seed=5, group_by_length=True)
    plain = BatchStream(examples, 8, seed=5)
    for _ in range(2):  # two epochs, each a different order
        batches = [next(grouped) for _ in range(grouped.steps_per_epoch)]
        seen = flat(first_ids(batches))
        assert len(seen) == len(set(seen)) == 1000
        plain_batches = [next(plain) for _ in range(plain.steps_per_epoch)]
        assert padding(batches) * 5 < padding(plain_batches)
        lengths = [len(batch[0]["input_ids"]) for batch in batches]
        assert lengths != sorted(lengths, reverse=True)  # the batch order is shuffled, not one long sort


def test_length_grouped_stream_resumes_and_shards_exactly() -> None:
    examples = varied_examples(500, seed=1)
    stream = BatchStream(examples, 6, seed=2, group_by_length=True)
    for _ in range(90):  # into the second epoch (83 batches per epoch)
        next(stream)
    state = json.loads(json.dumps(stream.state_dict()))
    expected = first_ids([next(stream) for _ in range(10)])
    resumed = BatchStream(examples, 6, seed=0)  # grouping comes back from the state
    resumed.load_state_dict(state)
    assert first_ids([next(resumed) for _ in range(10)]) == expected
    single = BatchStream(examples, 6, seed=1, group_by_length=True)
    ranks = [BatchStream(examples, 2, seed=1, rank=r, world_size=3, group_by_length=True) for r in range(3)]
    for _ in range(100):
        assert flat([first_ids([next(s)])[0] for s in ranks]) == first_ids([next(single)])[0]


def test_stream_argument_errors() -> None:
    with pytest.raises(ValueError, match="cannot fill one global batch of 8"):
        BatchStream(indexed_examples(5), 4, world_size=2)
    with pytest.raises(ValueError, match="rank must be in"):
        BatchStream(indexed_examples(5), 1, rank=2, world_size=2)


# --- file errors ------------------------------------------------------------------------------------------------


def write(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_load_jsonl_reads_every_format(tmp_path: Path) -> None:
    rows = [
        {"text": "t"},
        {"prompt": "p", "completion": "c"},
        {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]},
    ]
    path = write(tmp_path, *(json.dumps(row) for row in rows), "")
    assert load_jsonl(path) == rows


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"text": "ok"}', '{"text": "broken"'], r"data\.jsonl:2: malformed JSON"),
        (['{"text": "ok"}', '{"text": "ok", "label": 1}'], r"data\.jsonl:2: unknown field 'label'"),
        (['{"prompt": "p"}'], r"data\.jsonl:1: fields \['prompt'\] match no format"),
        (['["text"]'], r"data\.jsonl:1: expected a JSON object, got array"),
        (['{"text": 3}'], r"data\.jsonl:1: field 'text' must be a string, got number"),
        (['{"messages": [{"role": "bot", "content": "x"}]}'], r"data\.jsonl:1: messages\[0\]: field 'role'"),
        (['{"messages": [{"role": "user", "content": "x"}]}'], r"data\.jsonl:1: .*no assistant turn"),
        (["", "  "], r"data\.jsonl: empty dataset"),
    ],
)
def test_load_jsonl_errors_name_file_line_and_field(tmp_path: Path, lines: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_jsonl(write(tmp_path, *lines))


def test_load_jsonl_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl: no such data file"):
        load_jsonl(tmp_path / "nope.jsonl")


def test_in_memory_records_are_validated(tokenizer: PreTrainedTokenizerBase) -> None:
    with pytest.raises(ValueError, match="record 1: unknown field 'txt'"):
        tokenize_records([{"text": "a"}, {"txt": "b"}], tokenizer, 16)


# --- demo task and scoring --------------------------------------------------------------------------------------


def test_builtin_task_is_deterministic_and_splits_are_disjoint() -> None:
    train, held_out = make_builtin_task(seed=5, n_train=300, n_eval=100)
    assert (len(train), len(held_out)) == (300, 100)
    assert make_builtin_task(seed=5, n_train=300, n_eval=100) == (train, held_out)
    assert make_builtin_task(seed=6, n_train=300, n_eval=100)[0] != train
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}
    pattern = re.compile(r"\d\d [A-Z]{3} \d{4} / Q[1-4]")
    assert all(pattern.fullmatch(r["completion"]) for r in train + held_out)


def test_ledger_format() -> None:
    import datetime as dt

    assert ledger_format(dt.date(2024, 3, 7)) == "07 MAR 2024 / Q1"
    assert ledger_format(dt.date(1999, 12, 31)) == "31 DEC 1999 / Q4"
    assert ledger_format(dt.date(2001, 7, 1)) == "01 JUL 2001 / Q3"


def test_exact_match_normalizes_whitespace() -> None:
    assert exact_match("  07 MAR  2024 /\nQ1 ", "07 MAR 2024 / Q1")
    assert not exact_match("07 MAR 2024 / Q2", "07 MAR 2024 / Q1")

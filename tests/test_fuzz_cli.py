"""Fuzz properties of the command line: random values for every option of every subcommand, random `--config`
files, random output paths and random argument soups, each judged by an oracle written here, apart from lorakit's
own rules: a value the oracle calls invalid is refused naming its flag (or the config file); a valid one passes the
rules (the command then stops at a model directory that does not exist, or runs). Every refusal is exit status 2 and
one `lorakit: error: ...` line. A few cases train or generate for real on the tiny built-in model."""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import tomllib
import torch
import yaml
from fuzzing import Outcome, assert_clean_error, assert_refused, count_case, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorakit.cli import build_parser
from lorakit.models import byte_tokenizer
from lorakit.training import TrainConfig

MISSING_MODEL = "/nonexistent/lorakit-fuzz-model"
MISSING_ADAPTER = "/nonexistent/lorakit-fuzz-adapter"
MISSING_MESSAGE = f"{MISSING_MODEL}: no such model directory"
INT64 = 2**63 - 1
TRACKERS = ("tensorboard", "mlflow", "trackio", "wandb")


# -- the oracle: each option's rule, stated here ------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """What one option accepts. kind: int, float, text, choice, bool; numbers finite and within low/high
    (exclusive when *_open); text non-empty without NUL; `also`: a further test of a value otherwise valid."""

    kind: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    optional: bool = False
    choices: tuple[str, ...] = ()
    also: Callable[[Any], bool] | None = None

    def number_from_text(self, text: str) -> int | float | None:
        """A flag's text as this number kind: ASCII decimal syntax (what Python's int()/float() read, without
        underscores or non-ASCII digits), surrounding whitespace allowed; None when it is no number."""
        stripped = text.strip()
        if not stripped.isascii() or "_" in stripped:
            return None
        try:
            return int(stripped) if self.kind == "int" else float(stripped)
        except ValueError:
            return None

    def valid_text(self, text: str) -> bool:
        """Is `text`, given on the command line, valid?"""
        if self.kind in ("int", "float"):
            number = self.number_from_text(text)
            return number is not None and self.valid_number(number)
        return self.valid_value(text)

    def valid_number(self, number: float) -> bool:
        if isinstance(number, float) and not math.isfinite(number):
            return False
        if self.kind == "int" and self.high is None and number > INT64:
            return False
        above = self.low is None or (number > self.low if self.low_open else number >= self.low)
        below = self.high is None or (number < self.high if self.high_open else number <= self.high)
        return above and below and (self.also is None or self.also(number))

    def valid_value(self, value: Any) -> bool:
        """Is `value`, read from a config file, valid?"""
        if value is None:
            return self.optional
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind in ("text", "choice"):
            if not isinstance(value, str) or not value or "\0" in value:
                return False
            if self.kind == "choice" and value not in self.choices:
                return False
            return self.also is None or self.also(value)
        if isinstance(value, str):
            return self.valid_text(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind == "int":
            return isinstance(value, int) and self.valid_number(value)
        try:
            return self.valid_number(float(value))
        except OverflowError:
            return False


def at_least(low: int, optional: bool = False, high: int | None = None) -> Spec:
    return Spec("int", low, high, optional=optional)


def positive(optional: bool = False) -> Spec:
    return Spec("float", 0.0, low_open=True, optional=optional)


def report_to_ok(text: str) -> bool:
    names = list(dict.fromkeys(n.strip().lower() for n in text.split(",") if n.strip()))
    return names in ([], ["none"]) or all(n in TRACKERS for n in names)


TEXT = Spec("text")
OPTIONAL_TEXT = Spec("text", optional=True)
TRAIN: dict[str, Spec] = {
    "model": TEXT, "data": OPTIONAL_TEXT, "eval_data": OPTIONAL_TEXT, "output_dir": TEXT,
    "eval_fraction": Spec("float", 0.0, 1.0, low_open=True, high_open=True),
    "method": Spec("choice", choices=("lora", "dora", "vera", "adalora")),
    "r": at_least(1), "alpha": positive(), "dropout": Spec("float", 0.0, 1.0, high_open=True),
    "targets": TEXT, "target_parameters": OPTIONAL_TEXT, "add_tokens": OPTIONAL_TEXT, "rslora": Spec("bool"),
    "target_r": at_least(1, optional=True), "adalora_tinit": at_least(0), "adalora_tfinal": at_least(0),
    "init": Spec("choice", choices=("default", "gaussian", "pissa", "olora", "loftq")),
    "pissa_niter": at_least(0, optional=True), "loftq_iter": at_least(1),
    "quantize": Spec("choice", optional=True, choices=("nf4",)),
    "dtype": Spec("choice", choices=("auto", "float32", "bfloat16", "float16")),
    "loraplus_ratio": positive(optional=True), "lr": positive(), "weight_decay": Spec("float", 0.0),
    "warmup_steps": at_least(0), "max_steps": at_least(1, optional=True), "epochs": positive(),
    "batch_size": at_least(1), "grad_accum": at_least(1), "max_grad_norm": Spec("float", 0.0),
    "seq_len": at_least(1, optional=True), "pack": Spec("bool"), "group_by_length": Spec("bool"),
    "chat": Spec("bool"), "gradient_checkpointing": Spec("bool"), "bf16": Spec("bool"), "seed": at_least(0),
    "eval_every": at_least(0), "eval_samples": at_least(0), "save_every": at_least(0), "log_every": at_least(1),
    "resume": Spec("bool"), "threads": at_least(1, optional=True, high=os.cpu_count() or 1), "fsdp": Spec("bool"),
    "report_to": Spec("text", also=report_to_ok), "builtin_train_size": at_least(1),
}
FLAGS = {name: "--rank" if name == "r" else "--" + name.replace("_", "-") for name in TRAIN}
# the train options whose values the flag property varies (model and output dir are set by every case; the booleans
# are switches without a value)
VALUED = sorted(name for name, spec in TRAIN.items() if spec.kind != "bool" and name not in ("model", "output_dir"))


def _temperature_ok(t: float) -> bool:
    return t == 0 or t >= 1e-4


COMMANDS: dict[str, tuple[list[str], dict[str, Spec]]] = {
    "eval": (["eval", "--model", MISSING_MODEL], {
        "--seq-len": at_least(1), "--batch-size": at_least(1), "--eval-samples": at_least(0), "--data": TEXT,
        "--adapter": TEXT}),
    "generate": (["generate", "--model", MISSING_MODEL, "--prompt", "hello"], {
        "--max-new-tokens": at_least(1), "--temperature": Spec("float", 0.0, 100.0, also=_temperature_ok),
        "--top-p": Spec("float", 0.0, 1.0, low_open=True), "--seed": at_least(0), "--prompt": TEXT,
        "--adapter": TEXT}),
    "merge": (["merge", "--model", MISSING_MODEL, "--output-dir", "merged"], {
        "--dtype": Spec("choice", choices=("float32", "bfloat16", "float16")), "--adapter": TEXT}),
    "quantize": (["quantize", "--model", MISSING_MODEL, "--output-dir", "quantized"], {
        "--dtype": Spec("choice", choices=("auto", "float32", "bfloat16", "float16"))}),
    "export": (["export", "--adapter", MISSING_ADAPTER, "--output", "out.gguf"], {
        "--outtype": Spec("choice", choices=("f32", "f16", "bf16", "q8_0")), "--model": TEXT}),
    "inspect plan": (["inspect", "plan", "--model", "llama-7b"], {
        "--rank": at_least(1), "--batch": at_least(1), "--seq": at_least(1),
        "--method": Spec("choice", choices=("lora", "dora", "vera")), "--quantize": Spec("choice", choices=("nf4",)),
        "--dtype": Spec("choice", choices=("auto", "float32", "bfloat16", "float16"))}),
    "inspect keys": (["inspect", "keys", MISSING_ADAPTER, "--model", MISSING_MODEL, "--text", "hi"], {
        "--top": at_least(1), "--layers": at_least(1), "--text": TEXT}),
}
COMMAND_OPTIONS = [(command, flag) for command, (_, specs) in COMMANDS.items() for flag in specs]


# -- value strategies ---------------------------------------------------------------------------------------------

EDGE_TEXTS = ["", " ", "0", "-0", "+1", "1", "2", "1.", ".5", "0.5", "1e3", "1E-3", "1e-300", "5e-324", "0x10",
              "1_000", "\u0661", "nan", "-nan", "inf", "-inf", "Infinity", "1e999", "9" * 30, " 3 ", "3\n", "true",
              "none", "null", "[1]", "1e-4", "0.0001", "100", "100.0000001", "0.99999", "1.0", "-1", "\0", "a\0b",
              "\u00e9t\u00e9", "lora", "dora", "nf4", "auto", "f16", "float32", "wandb", "none,", "tensorboard,mlflow"]
numbers = st.one_of(st.integers(-5, 20), st.integers(-(2**70), 2**70), st.sampled_from([INT64, INT64 + 1, 2**64]))
number_texts = st.one_of(numbers.map(str), st.floats().map(repr), st.floats(-2, 2).map(str))
value_texts = st.one_of(number_texts, st.sampled_from(EDGE_TEXTS), st.text(max_size=12))


def choice_texts(spec: Spec) -> st.SearchStrategy[str]:
    names = list(spec.choices) or ["x"]
    mutated = st.sampled_from(names).map(lambda n: n.upper()) | st.sampled_from(names).map(lambda n: n[:-1])
    return st.one_of(st.sampled_from(names), mutated, value_texts)


def texts_for(spec: Spec) -> st.SearchStrategy[str]:
    return choice_texts(spec) if spec.kind == "choice" else value_texts


@pytest.fixture(autouse=True)
def _isolated(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every case runs in a scratch directory, with a private model cache, and leaves torch's thread count as is."""
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path_factory.getbasetemp() / "lorakit-cache"))
    monkeypatch.chdir(tmp_path_factory.mktemp("cli-fuzz"))
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _judge(outcome: Outcome, valid: bool, refused_by_rule: Callable[[str], bool]) -> None:
    """Invalid: refused by the rule. Valid: ran (exit 0, nothing on stderr) or refused later, not by the rule."""
    if valid and outcome.code == 0:
        assert outcome.stderr == "", outcome.stderr
        return
    message = assert_refused(outcome)
    assert refused_by_rule(message) == (not valid), f"valid={valid}: {message}"


def _names_flag(message: str, flag: str) -> bool:
    """An argparse refusal of `flag`'s value ("argument --rank/--r: ..." names every spelling)."""
    return message.startswith((f"argument {flag}:", f"argument {flag}/"))


def _run(argv: list[str]) -> Outcome:
    count_case("cli")
    threads = torch.get_num_threads()
    try:
        return run_cli(argv, seconds=60)
    finally:
        torch.set_num_threads(threads)


# -- properties -----------------------------------------------------------------------------------------------------


@given(data=st.data())
def test_train_flag_values_are_refused_exactly_when_outside_the_options_rule(data: st.DataObject) -> None:
    names = data.draw(st.lists(st.sampled_from(VALUED), min_size=1, max_size=3, unique=True))
    values = {name: data.draw(texts_for(TRAIN[name]), label=name) for name in names}
    base = ["train", "--model", MISSING_MODEL, "--output-dir", "run", "--quantize", "nf4", "--init", "pissa"]
    outcome = _run(base + [f"{FLAGS[name]}={value}" for name, value in values.items()])
    invalid = [FLAGS[name] for name, value in values.items() if not TRAIN[name].valid_text(value)]
    if not invalid:
        _judge(outcome, True, lambda m: m.startswith("argument "))
        return
    message = assert_refused(outcome)
    assert any(_names_flag(message, flag) for flag in invalid), (invalid, message)


@given(data=st.data())
def test_subcommand_option_values_are_refused_exactly_when_outside_the_options_rule(data: st.DataObject) -> None:
    command, flag = data.draw(st.sampled_from(COMMAND_OPTIONS))
    base, specs = COMMANDS[command]
    value = data.draw(texts_for(specs[flag]), label=flag)
    outcome = _run([*base, f"{flag}={value}"])
    _judge(outcome, specs[flag].valid_text(value), lambda m: _names_flag(m, flag))


config_keys = st.one_of(st.sampled_from(sorted(TRAIN)), st.sampled_from(sorted(TRAIN)).map(lambda k: k.replace("_", "-")),
                        st.text(max_size=10))
scalar_values = st.one_of(numbers, st.floats(), st.booleans(), value_texts, st.sampled_from(["lora", "nf4", "auto"]))
config_values = st.one_of(scalar_values, st.none(), st.lists(scalar_values, max_size=3),
                          st.dictionaries(st.text(max_size=4), scalar_values, max_size=2))


def _toml_value(value: Any) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value) if math.isfinite(value) else "inf" if value > 0 else "-inf"
    if isinstance(value, str):
        return json.dumps(value).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        items = [_toml_value(v) for v in value]
        return None if None in items else "[" + ", ".join(items) + "]"  # type: ignore[arg-type]
    if isinstance(value, dict):
        items = [(json.dumps(k), _toml_value(v)) for k, v in value.items()]
        return None if any(v is None for _, v in items) else "{" + ", ".join(f"{k} = {v}" for k, v in items) + "}"
    return None  # TOML has no null


def _config_text(data: st.DataObject, suffix: str) -> str:
    if data.draw(st.integers(0, 4)) == 0:  # raw text: garbage, a truncated mapping, a list
        return data.draw(st.one_of(st.text(max_size=40), st.sampled_from(["r: [1\n", "- 1\n", "a = [\n", "!!x 1\n",
                                                                          "r: &a [*a]\n", "[[x]]\nr=1\n"])))
    mapping = data.draw(st.dictionaries(config_keys, config_values, max_size=4))
    if suffix != ".toml":
        if data.draw(st.booleans()):  # keys that are no text
            mapping[data.draw(st.one_of(st.integers(), st.booleans(), st.none()))] = 1
        return yaml.safe_dump(mapping, allow_unicode=data.draw(st.booleans()))
    lines = [f"{json.dumps(key)} = {text}" for key, value in mapping.items()
             if (text := _toml_value(value)) is not None]
    return "\n".join(lines) + "\n"


def _config_valid(content: Any) -> bool:
    """The oracle on what the file holds (as YAML/TOML read it): a mapping of known names, none twice (dashes and
    underscores alike), each value valid for its option."""
    if content is None:
        return True
    if not isinstance(content, dict) or not all(isinstance(key, str) for key in content):
        return False
    names = [key.replace("-", "_") for key in content]
    if len(set(names)) != len(names) or not all(name in TRAIN for name in names):
        return False
    return all(TRAIN[name].valid_value(value) for name, value in zip(names, content.values(), strict=True))


@given(data=st.data(), suffix=st.sampled_from([".yaml", ".yml", ".toml"]))
def test_config_files_are_refused_exactly_when_a_key_or_value_breaks_a_rule(data: st.DataObject, suffix: str) -> None:
    text = _config_text(data, suffix)
    path = Path(f"config{suffix}")
    path.write_text(text, encoding="utf-8")
    try:
        content = tomllib.loads(text) if suffix == ".toml" else yaml.safe_load(text)
        valid = _config_valid(content)
    except (ValueError, yaml.YAMLError, RecursionError):
        valid = False
    outcome = _run(["train", "--config", str(path), "--model", MISSING_MODEL, "--output-dir", "run", "--method",
                    "lora", "--init", "pissa", "--quantize", "nf4", "--report-to", "none"])
    _judge(outcome, valid, lambda m: m.startswith(f"config file {path}"))


@given(values=st.dictionaries(st.sampled_from(sorted(TRAIN)), config_values, min_size=1, max_size=3))
def test_trainconfig_in_python_refuses_exactly_the_values_its_flags_refuse(values: dict[str, Any]) -> None:
    count_case("cli")
    valid = all(TRAIN[name].valid_value(value) for name, value in values.items())
    try:
        config = TrainConfig(**values)
    except ValueError as error:
        message = assert_clean_error(error)
        assert not valid, message
        assert any(message.startswith(f"{name} (") for name, value in values.items()
                   if not TRAIN[name].valid_value(value)), message
    else:
        assert valid, values
        assert all(isinstance(getattr(config, name), (type(None), bool, int, float, str)) for name in values)


def _path_kind(path: str) -> str:
    """"dir", "file" (regular), "other", "missing", or "bad" (under a file, or a name too long)."""
    raw = os.fsencode(path)
    if len(raw) >= 4096 or any(len(part) > 255 for part in raw.split(b"/")):
        return "bad"
    path = os.path.abspath(path)  # ".." taken lexically, as the writers' mkdir(parents=True) takes it
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        return "missing" if error.errno == errno.ENOENT and _writable_place(path) else "bad"
    if stat.S_ISDIR(mode):
        return "dir" if os.access(path, os.W_OK | os.X_OK) else "bad"
    if stat.S_ISREG(mode):
        return "file" if os.access(path, os.W_OK) and _writable_place(path) else "bad"
    return "other"


def _writable_place(path: str) -> bool:
    """The nearest existing directory above `path` may get new entries (a file is written beside its target)."""
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    return os.access(parent, os.W_OK | os.X_OK)


path_parts = st.sampled_from(["file", "dir", "new", "inner", "..", ".", "x" * 256, "y" * 255, "", "dev", "null"])
output_paths = st.one_of(
    st.lists(path_parts | st.text(max_size=6), min_size=1, max_size=4).map("/".join),
    st.sampled_from(["/dev/null", "/dev", "/proc/self/status", "/", "dir/", "file/", "file/x", "dir/inner/x",
                     "a" * 5000]))
OUTPUT_COMMANDS = {
    "train": (["train", "--model", MISSING_MODEL], "--output-dir", "dir"),
    "merge": (["merge", "--model", MISSING_MODEL], "--output-dir", "dir"),
    "quantize": (["quantize", "--model", MISSING_MODEL], "--output-dir", "dir"),
    "export": (["export", "--adapter", MISSING_ADAPTER], "--output", "file"),
    "inspect adapter": (["inspect", "adapter", MISSING_ADAPTER], "--png", "file"),
}


@given(command=st.sampled_from(sorted(OUTPUT_COMMANDS)), path=output_paths)
def test_output_paths_are_refused_exactly_when_nothing_could_be_written_there(command: str, path: str) -> None:
    Path("dir").mkdir(exist_ok=True)
    Path("file").write_text("keep")
    Path("dir/inner").write_text("keep")
    base, flag, wanted = OUTPUT_COMMANDS[command]
    kind = _path_kind(path) if path and "\0" not in path else "bad"
    names_a_file = path.rsplit("/", 1)[-1] not in ("", ".", "..")
    valid = (kind == "missing" or kind == wanted) and (wanted == "dir" or names_a_file)
    outcome = _run([*base, f"{flag}={path}"])
    _judge(outcome, valid, lambda m: _names_flag(m, flag) or m.startswith(f"{flag} "))
    assert Path("file").read_text() == "keep" and Path("dir/inner").read_text() == "keep"
    assert sorted(p.name for p in Path("dir").iterdir()) == ["inner"]


SOUP_WORDS = ["train", "eval", "generate", "merge", "quantize", "export", "inspect", "plan", "adapter", "keys",
              "--", "-", "-h", "--help", "--config", "--config=", "--prompt", "--text", "--png", "--output",
              "--output-dir", "--merged", "--no-pack", "--pack", "--rank", "--r", "--lr", "--targets", "--shape",
              "--method", "--quantize", "--dtype", "--max-new-tokens", "--batch", "--seq", "--top", "-x", "--=",
              "--lr=", "llama-7b", MISSING_ADAPTER, "config.yaml", "config.toml", "dir", "file"]


def _every_flag() -> list[str]:
    """Every option string of every subcommand (and of inspect's modes)."""
    def flags(parser: argparse.ArgumentParser) -> Iterator[str]:
        for action in parser._actions:
            yield from action.option_strings
            for sub in (action.choices or {}).values() if isinstance(action, argparse._SubParsersAction) else ():
                yield from flags(sub)

    return sorted(set(flags(build_parser())))


SOUP_WORDS += _every_flag()


@given(words=st.lists(st.one_of(st.sampled_from(SOUP_WORDS), value_texts), max_size=8))
def test_argument_soups_end_in_output_or_one_error_line(words: list[str]) -> None:
    Path("dir").mkdir(exist_ok=True)
    Path("file").write_text("keep")
    Path("config.yaml").write_text("r: 4\n")
    Path("config.toml").write_text("r = [\n")
    outcome = _run([*words, "--model", MISSING_MODEL])
    if outcome.code == 0:
        assert outcome.stderr == "" and outcome.stdout, outcome
    else:
        assert_refused(outcome)
    assert Path("file").read_text() == "keep" and list(Path("dir").iterdir()) == []


# -- a few real runs with valid values ------------------------------------------------------------------------------

REAL_RUNS = settings(max_examples=min(max(2, settings.default.max_examples // 15), 40),
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
GENERATIONS = settings(REAL_RUNS, max_examples=min(max(4, settings.default.max_examples // 10), 150))


@REAL_RUNS
@given(rank=st.integers(1, 4), alpha=st.floats(0.5, 32), dropout=st.floats(0, 0.5), lr=st.floats(1e-5, 0.1),
       weight_decay=st.floats(0, 0.1), warmup=st.integers(0, 3), steps=st.integers(1, 2), batch=st.integers(1, 4),
       accum=st.integers(1, 2), seq_len=st.integers(96, 160), log_every=st.integers(1, 3),
       method=st.sampled_from(["lora", "dora", "vera"]), seed=st.integers(0, 2**32))
def test_valid_values_train_for_real(rank: int, alpha: float, dropout: float, lr: float, weight_decay: float,
                                     warmup: int, steps: int, batch: int, accum: int, seq_len: int, log_every: int,
                                     method: str, seed: int) -> None:
    out = Path("run")
    outcome = _run(["train", "--model", "tiny-llama", "--builtin-train-size", "8", "--eval-samples", "0",
                    "--output-dir", str(out), "--rank", str(rank), "--alpha", repr(alpha), "--dropout", repr(dropout),
                    "--lr", repr(lr), "--weight-decay", repr(weight_decay), "--warmup-steps", str(warmup),
                    "--max-steps", str(steps), "--batch-size", str(batch), "--grad-accum", str(accum),
                    "--seq-len", str(seq_len), "--log-every", str(log_every), "--method", method, "--seed", str(seed),
                    "--save-every", "0"])
    assert outcome.code == 0, outcome.stderr
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


SHORT_CONTEXT = 40


@pytest.fixture(scope="module")
def short_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Any]:
    """A one-layer Llama with a 40-token context and the byte-level tokenizer: cheap to run to its context's end."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    directory = tmp_path_factory.mktemp("short-context")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=300, max_position_embeddings=SHORT_CONTEXT)
    LlamaForCausalLM(config).save_pretrained(directory)
    byte_tokenizer().save_pretrained(directory)
    return str(directory), AutoTokenizer.from_pretrained(directory)


@GENERATIONS
@given(prompt=st.text(min_size=1, max_size=30).filter(lambda t: "\0" not in t),
       new_tokens=st.one_of(st.integers(1, 4), st.integers(SHORT_CONTEXT - 30, SHORT_CONTEXT + 2)),
       temperature=st.one_of(st.just(0.0), st.floats(1e-4, 100)), top_p=st.floats(0.01, 1.0))
def test_generate_runs_exactly_when_prompt_and_new_tokens_fit_the_context(short_model: tuple[str, Any], prompt: str,
                                                                          new_tokens: int, temperature: float,
                                                                          top_p: float) -> None:
    model, tokenizer = short_model
    prompt_tokens = len(tokenizer(prompt)["input_ids"])
    # --prompt=TEXT: a prompt that starts with "-" is an option to argparse when it is a separate argument
    outcome = _run(["generate", "--model", model, f"--prompt={prompt}", "--max-new-tokens", str(new_tokens),
                    "--temperature", repr(temperature), "--top-p", repr(top_p)])
    if prompt_tokens + new_tokens > SHORT_CONTEXT:
        assert f"exceeds the model's context of {SHORT_CONTEXT} tokens" in assert_refused(outcome)
    else:
        assert outcome.code == 0, outcome.stderr

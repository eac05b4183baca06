"""The command line under bad input: every refusal is exit status 2 and one `lorakit: error: ...` line naming the
flag, key or file and saying why; nothing runs, and nothing is written, on a value outside an option's rule."""

from __future__ import annotations

import argparse
import math
import shutil
import sys
from pathlib import Path

import pytest
from fuzzing import assert_clean_error, assert_refused, run_cli

from lorakit import LoraConfig, adapt, save_adapter
from lorakit.models.builtin import ensure_builtin
from lorakit.models.load import load_model
from lorakit.training import TrainConfig

MISSING_MODEL = "/nonexistent/lorakit-model"


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path_factory.getbasetemp() / "lorakit-cache"))


@pytest.mark.parametrize("argv", [
    ["train", "--bogus"], ["train", "--lr"], ["eval", "--method", "lora"], [], ["nonsense"], ["generate"],
    ["inspect"], ["inspect", "plan"], ["merge", "--dtype", "int8", "--output-dir", "x"], ["train", "--max-step", "3"],
    ["train", "--bogus\nsecond line"],
])
def test_argparse_errors_are_one_line_and_exit_2(argv: list[str]) -> None:
    message = assert_refused(run_cli(argv))
    assert "usage:" not in message


def test_help_still_prints_usage_and_exits_0() -> None:
    outcome = run_cli(["train", "--help"])
    assert outcome.code == 0 and outcome.stdout.startswith("usage: lorakit train") and outcome.stderr == ""


@pytest.mark.parametrize("argv, flag", [
    (["train", "--log-every", "0"], "--log-every"),
    (["train", "--eval-fraction", "inf"], "--eval-fraction"),
    (["train", "--max-steps", "-1"], "--max-steps"),
    (["train", "--lr", "inf"], "--lr"),
    (["train", "--lr=nan"], "--lr"),
    (["train", "--weight-decay", "-1"], "--weight-decay"),
    (["train", "--warmup-steps", "-5"], "--warmup-steps"),
    (["train", "--eval-samples", "-1"], "--eval-samples"),
    (["train", "--rank", "2.5"], "--rank"),
    (["train", "--dropout", "1"], "--dropout"),
    (["train", "--threads", "0"], "--threads"),
    (["train", "--report-to", "wandbb"], "--report-to"),
    (["eval", "--batch-size", "-1"], "--batch-size"),
    (["eval", "--eval-samples", "-1"], "--eval-samples"),
    (["generate", "--prompt", "hi", "--temperature", "nan"], "--temperature"),
    (["generate", "--prompt", "hi", "--temperature", "1e-300"], "--temperature"),
    (["generate", "--prompt", "hi", "--top-p", "0"], "--top-p"),
    (["generate", "--prompt", ""], "--prompt"),
    (["inspect", "plan", "--model", "llama-7b", "--batch", "0"], "--batch"),
    (["inspect", "keys", "x", "--model", "tiny-llama", "--text", "hi", "--top", "-2"], "--top"),
])
def test_values_outside_an_options_rule_are_refused_before_anything_runs(argv: list[str], flag: str) -> None:
    message = assert_refused(run_cli(argv))
    assert flag in message


def test_trainconfig_in_python_and_config_files_follow_the_flags_rules(tmp_path: Path) -> None:
    for field, value in (("lr", math.inf), ("max_steps", -1), ("r", [1, 2]), ("r", True), ("dropout", 1.0),
                         ("method", "lroa"), ("seq_len", 2.0)):
        with pytest.raises(ValueError, match=field) as caught:
            TrainConfig(**{field: value})
        assert_clean_error(caught.value)
    assert TrainConfig(lr="1e-3", max_steps="5").max_steps == 5  # text is read as a flag is: YAML's `lr: 1e-3`
    config = tmp_path / "c.yaml"
    config.write_text("lr: 1e-3\nmax-steps: 0\n")
    message = assert_refused(run_cli(["train", "--config", str(config)]))
    assert "c.yaml" in message and "max_steps" in message and ">= 1" in message


def test_generate_refuses_an_empty_prompt_and_a_generation_past_the_context() -> None:
    message = assert_refused(run_cli(["generate", "--model", "tiny-llama", "--prompt", "hi",
                                      "--max-new-tokens", "1000000000"]))
    assert "--max-new-tokens 1000000000" in message and "context of 512 tokens" in message
    assert "--prompt" in assert_refused(run_cli(["generate", "--model", "tiny-llama", "--prompt", ""]))
    outcome = run_cli(["generate", "--model", "tiny-llama", "--prompt", "hi", "--max-new-tokens", "4"])
    assert outcome.code == 0, outcome.stderr


@pytest.mark.parametrize("command", ["train", "quantize", "merge"])
def test_an_output_dir_that_is_a_file_or_device_is_refused_and_left_alone(command: str, tmp_path: Path) -> None:
    existing = tmp_path / "file.txt"
    existing.write_text("keep me")
    for target in (str(existing), "/dev/null", str(existing / "below")):
        outcome = run_cli([command, "--model", "tiny-llama", "--output-dir", target])
        message = assert_refused(outcome)
        assert "--output-dir" in message and "written" not in outcome.stdout
    assert existing.read_text() == "keep me"


def test_export_and_png_outputs_that_are_directories_or_devices_are_refused(tmp_path: Path) -> None:
    assert "--output" in assert_refused(run_cli(["export", "--merged", "--model", "tiny-llama", "--output",
                                                 str(tmp_path)]))
    assert "--output" in assert_refused(run_cli(["export", "--merged", "--model", "tiny-llama", "--output",
                                                 "/dev/null"]))


def _broken_copy(tmp_path: Path, name: str, content: str) -> Path:
    directory = tmp_path / "broken"
    shutil.copytree(ensure_builtin("tiny-llama"), directory)
    (directory / name).write_text(content)
    return directory


@pytest.mark.parametrize("name, content", [
    ("config.json", "{not json"), ("config.json", "[1, 2]"), ("config.json", '{"model_type": "no-such-model"}'),
    ("config.json", '{"model_type": "llama", "hidden_size": "abc"}'), ("tokenizer.json", "{broken"),
    ("generation_config.json", "{broken"),
])
def test_a_broken_model_directory_names_the_file(tmp_path: Path, name: str, content: str) -> None:
    directory = _broken_copy(tmp_path, name, content)
    for argv in (["train", "--model", str(directory), "--output-dir", str(tmp_path / "out")],
                 ["eval", "--model", str(directory)], ["generate", "--model", str(directory), "--prompt", "hi"]):
        message = assert_refused(run_cli(argv))
        assert str(directory) in message
        assert name in message or name == "tokenizer.json"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("file, content, expected", [
    ("c.yaml", "!!python/object/apply:os.system ['true']\n", "not valid YAML"),
    ("c.yaml", "lr: !!python/name:os.system\n", "not valid YAML"),
    ("c.yaml", "1: 2\n", "option names are text"),
    ("c.yaml", "r: [1, 2]\n", "r (--rank)"),
    ("c.yaml", "r: 8\nlr: .nan\n", "lr (--lr)"),
    ("c.yaml", "lrr: 0.1\n", "did you mean lr"),
    ("c.yaml", "- 1\n- 2\n", "expected a mapping"),
    ("c.yaml", "a: [\n", "not valid YAML"),
    ("c.toml", "a = \n", "line 1"),
    ("c.toml", "r = 1.5\n", "r (--rank)"),
    ("c.toml", "max_steps = 99999999999999999999999\n", "max_steps"),
    ("c.txt", "r = 1\n", ".yaml, .yml or .toml"),
])
def test_config_file_errors_are_one_line_naming_the_file_and_key(tmp_path: Path, file: str, content: str,
                                                                 expected: str) -> None:
    path = tmp_path / file
    path.write_text(content)
    message = assert_refused(run_cli(["train", "--config", str(path), "--model", MISSING_MODEL]))
    assert str(path) in message and expected in message


def test_inspect_png_without_matplotlib_names_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, _ = load_model("tiny-llama")
    save_adapter(adapt(model, LoraConfig(r=2, target_modules=["q_proj"])), tmp_path / "adapter")
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    png = tmp_path / "figure.png"
    for argv in (["inspect", "adapter", str(tmp_path / "adapter"), "--png", str(png)],
                 ["inspect", "keys", str(tmp_path / "adapter"), "--model", "tiny-llama", "--text", "hi", "--png",
                  str(png)]):
        message = assert_refused(run_cli(argv))
        assert "pip install matplotlib" in message
    assert not png.exists()


def test_every_option_of_every_subcommand_reads_its_value_through_a_rule() -> None:
    from lorakit.cli import build_parser
    from lorakit.training.options import Rule

    def valued_actions(parser: argparse.ArgumentParser, path: str) -> list[tuple[str, argparse.Action]]:
        found = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    found += valued_actions(sub, f"{path} {name}")
            elif action.nargs != 0:  # not a switch (store_true, --help, --no-x)
                found.append((path, action))
        return found

    actions = valued_actions(build_parser(), "lorakit")
    assert len(actions) > 60
    assert [f"{path} {action.dest}" for path, action in actions if not isinstance(action.type, Rule)] == []

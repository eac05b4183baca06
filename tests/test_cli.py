"""The command line as a new user meets it: flags that survive torchrun, no prefix abbreviations, defaults that fit
small models, and a plot that is either written or said to be missing."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.run import get_args_parser
from transformers import LlamaConfig, LlamaForCausalLM

from lorakit.cli import build_parser, main
from lorakit.models import byte_tokenizer

README = Path(__file__).resolve().parents[1] / "README.md"
FAST = ["--model", "tiny-llama", "--batch-size", "4", "--builtin-train-size", "16", "--eval-samples", "0",
        "--max-steps", "2"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path_factory.getbasetemp() / "lorakit-cache"))


def _torchrun(argv: list[str]) -> list[str]:
    """What torchrun's own parser leaves to the module it launches (SystemExit if it takes a flag for itself)."""
    with contextlib.redirect_stderr(io.StringIO()):
        return get_args_parser().parse_args(argv).training_script_args


def _subcommand_flags() -> dict[str, list[str]]:
    parser = build_parser()
    subcommands = parser._subparsers._group_actions[0].choices
    return {name: [flag for action in sub._actions for flag in action.option_strings if flag.startswith("--")]
            for name, sub in subcommands.items()}


def test_every_train_flag_has_a_spelling_that_survives_torchrun() -> None:
    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    for action in train._actions:
        if not action.option_strings or action.dest == "help":
            continue
        surviving = []
        for flag in action.option_strings:
            argv = ["--nproc_per_node=2", "-m", "lorakit", "train", flag, "1"]
            with contextlib.suppress(SystemExit):
                if _torchrun(argv) == ["train", flag, "1"]:
                    surviving.append(flag)
        assert surviving, f"every spelling of {action.dest} ({action.option_strings}) is taken by torchrun"
    with pytest.raises(SystemExit):  # why --rank exists: torchrun's parser calls --r ambiguous
        _torchrun(["--nproc_per_node=2", "-m", "lorakit", "train", "--r", "16"])


def _readme_torchrun_commands() -> list[list[str]]:
    text = README.read_text().replace("\\\n", " ")
    return [shlex.split(line.split("#")[0]) for line in text.splitlines() if line.strip().startswith("torchrun ")]


def test_the_readme_torchrun_lines_parse_in_torchrun_and_in_lorakit() -> None:
    commands = _readme_torchrun_commands()
    assert len(commands) >= 3 and any("--rank" in c for c in commands)
    for command in commands:
        script_args = _torchrun(command[1:])
        assert script_args[0] == "train", command
        args = build_parser().parse_args(script_args)
        assert args.command == "train"
        if "--rank" in script_args:
            assert args.r == int(script_args[script_args.index("--rank") + 1])


def test_rank_and_r_set_the_same_option(tmp_path: Path) -> None:
    for spelling in ("--rank", "--r"):
        out = tmp_path / spelling.strip("-")
        assert main(["train", *FAST, spelling, "4", "--output-dir", str(out)]) == 0
        assert json.loads((out / "train_config.json").read_text())["adapter"]["r"] == 4


def test_prefix_abbreviations_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["train", "--max-step", "3"], ["train", "--quant", "nf4"], ["eval", "--eval-sample", "3"],
                 ["inspect", "plan", "--model", "llama-7b", "--meth", "vera"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(argv)
        assert "unrecognized arguments" in capsys.readouterr().err, argv


def _short_context_model(directory: Path, context: int = 128) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=300, max_position_embeddings=context)
    LlamaForCausalLM(config).save_pretrained(directory)
    byte_tokenizer().save_pretrained(directory)
    return directory


def test_default_seq_len_fits_a_short_context(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = str(_short_context_model(tmp_path / "short"))
    out = tmp_path / "run"
    assert main(["train", *FAST, "--model", model, "--output-dir", str(out)]) == 0
    assert "--seq-len defaults to 256, more than the model's context of 128 tokens: using 128" in capsys.readouterr().out
    assert json.loads((out / "train_config.json").read_text())["seq_len"] == 128
    assert main(["train", *FAST, "--model", model, "--seq-len", "256", "--output-dir", str(tmp_path / "bad")]) == 2
    assert "--seq-len 256 exceeds the model's context of 128 tokens" in capsys.readouterr().err
    assert main(["eval", "--model", model, "--eval-samples", "2"]) == 0


def test_a_missing_plot_is_said_not_promised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", *FAST, "--output-dir", str(tmp_path / "with")]) == 0
    assert f"plot: {tmp_path / 'with' / 'loss.png'}" in capsys.readouterr().out
    assert (tmp_path / "with" / "loss.png").stat().st_size > 1000
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["train", *FAST, "--output-dir", str(tmp_path / "without")]) == 0
    printed = capsys.readouterr().out
    assert "no plot written: matplotlib is missing" in printed and "plot: " not in printed.replace("no plot", "")
    assert not (tmp_path / "without" / "loss.png").exists()


def test_inspect_plan_accepts_model_like_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "plan", "--model", "llama-7b"]) == 0
    by_model = capsys.readouterr().out
    assert main(["inspect", "plan", "--shape", "llama-7b"]) == 0
    assert capsys.readouterr().out == by_model and re.search(r"llama-7b: 32 layers", by_model)
    flags = _subcommand_flags()
    assert all("--model" in flags[name] for name in ("train", "eval", "generate", "merge", "quantize"))

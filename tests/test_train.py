"""`lorakit` end to end on a tiny built-in model: train -> eval -> merge -> generate, exact resume, bad input."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import lorakit
from lorakit.cli import main
from lorakit.models import load_model
from lorakit.training import TrainConfig, Trainer

FAST = ["--model", "tiny-llama", "--batch-size", "4", "--seq-len", "64", "--builtin-train-size", "64",
        "--eval-samples", "4", "--lr", "3e-3", "--log-every", "1", "--dtype", "float32"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path_factory.getbasetemp() / "lorakit-cache"))


def _train(out: Path, *extra: str) -> int:
    return main(["train", *FAST, "--output-dir", str(out), *extra])


def test_train_eval_merge_generate_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert _train(out, "--max-steps", "12", "--save-every", "5") == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 12 and losses[-1] < losses[0]
    assert {r["tag"] for r in records if "tag" in r} == {"base", "tuned"}
    assert (out / "loss.png").stat().st_size > 1000
    assert json.loads((out / "train_config.json").read_text())["total_steps"] == 12

    # PEFT loads the adapter and gives lorakit's outputs
    model_dir = lorakit.models.resolve_model("tiny-llama")
    ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    base, _ = load_model("tiny-llama", dtype="float32")
    ours = lorakit.load_adapter(base, out / "adapter").eval()
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out / "adapter").eval()
    with torch.no_grad():
        expected = ours(input_ids=ids).logits
        assert (theirs(input_ids=ids).logits - expected).abs().max() <= 1e-5

    assert main(["eval", "--model", "tiny-llama", "--adapter", str(out / "adapter"), "--eval-samples", "4"]) == 0
    assert "exact match" in capsys.readouterr().out

    merged = tmp_path / "merged"
    assert main(["merge", "--model", "tiny-llama", "--adapter", str(out / "adapter"), "--output-dir", str(merged)]) == 0
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)

    assert main(["generate", "--model", str(merged), "--prompt", "Convert 2024-01-02", "--max-new-tokens", "5"]) == 0


def test_quantized_model_directory_trains_and_merges(tmp_path: Path) -> None:
    nf4 = tmp_path / "nf4"
    assert main(["quantize", "--model", "tiny-llama", "--dtype", "float32", "--output-dir", str(nf4)]) == 0
    model, _ = load_model(str(nf4))
    assert any(isinstance(m, lorakit.NF4Linear) for m in model.modules())
    assert main(["train", *FAST, "--model", str(nf4), "--max-steps", "2", "--output-dir", str(tmp_path / "q")]) == 0
    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(nf4), "--adapter", str(tmp_path / "q" / "adapter"),
                 "--output-dir", str(merged)]) == 0
    ids = torch.randint(3, 200, (1, 7), generator=torch.Generator().manual_seed(1))
    adapted = lorakit.load_adapter(load_model(str(nf4))[0], tmp_path / "q" / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(merged)(input_ids=ids).logits,
                                   adapted(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def _adapter_tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def _config(out: Path, **overrides: object) -> TrainConfig:
    options = dict(model="tiny-llama", batch_size=4, seq_len=64, builtin_train_size=64, eval_samples=4, lr=3e-3,
                   max_steps=16, save_every=5, output_dir=str(out), dropout=0.1, seed=3, log_every=1)
    return TrainConfig(**{**options, **overrides})


def test_interrupted_and_killed_runs_resume_bit_identically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Trainer(_config(tmp_path / "straight")).run()
    reference = _adapter_tensors(tmp_path / "straight")

    # Ctrl-C during step 7: the step finishes, a checkpoint is written, --resume continues.
    trainer = Trainer(_config(tmp_path / "ctrl_c"))
    original = trainer._optimizer_step

    def interrupt_once() -> tuple[float, int]:
        if trainer.step == 6:
            os.kill(os.getpid(), signal.SIGINT)
        return original()

    monkeypatch.setattr(trainer, "_optimizer_step", interrupt_once)
    assert trainer.run() == {"interrupted": True, "step": 7}
    Trainer(_config(tmp_path / "ctrl_c", resume=True)).run()

    # Killed hard during step 13: the periodic checkpoint of step 10 is where the run continues.
    trainer = Trainer(_config(tmp_path / "killed"))
    original_killed = trainer._optimizer_step

    def die() -> tuple[float, int]:
        if trainer.step == 12:
            raise SystemExit("killed")
        return original_killed()

    monkeypatch.setattr(trainer, "_optimizer_step", die)
    with pytest.raises(SystemExit):
        trainer.run()
    assert json.loads((tmp_path / "killed" / "checkpoint" / "state.json").read_text())["step"] == 10
    Trainer(_config(tmp_path / "killed", resume=True)).run()

    for run in ("ctrl_c", "killed"):
        resumed = _adapter_tensors(tmp_path / run)
        assert resumed.keys() == reference.keys()
        for key in reference:
            assert torch.equal(resumed[key], reference[key]), (run, key)
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, 17))


@pytest.mark.parametrize(("content", "message"), [
    (None, "no such data file"),
    ('{"text": "fine"}\n{"text": broken\n', r"data.jsonl:2"),
    ("", "empty"),
    ('{"prompt": "a", "answer": "b"}\n', r"answer"),
])
def test_bad_data_gives_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None,
                                        message: str) -> None:
    data = tmp_path / "data.jsonl"
    if content is not None:
        data.write_text(content)
    assert _train(tmp_path / "out", "--data", str(data), "--max-steps", "1") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lorakit: error:") and "\n" not in err and "Traceback" not in err
    assert re.search(message, err), err


def test_unknown_target_and_too_long_sequences(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _train(tmp_path / "a", "--targets", "q_prj", "--max-steps", "1") == 2
    assert "q_proj" in capsys.readouterr().err
    assert main(["train", *FAST, "--seq-len", "100000", "--output-dir", str(tmp_path / "b")]) == 2
    assert "exceeds the model's context" in capsys.readouterr().err
    assert main(["eval", "--model", "no-such-model"]) == 2
    assert "tiny-llama" in capsys.readouterr().err


def test_prompt_completion_and_messages_data_with_dora_qlora_and_loraplus(tmp_path: Path) -> None:
    data = tmp_path / "data.jsonl"
    rows = [{"prompt": f"Q{i}: ", "completion": f"A{i}"} for i in range(12)]
    rows += [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"yo {i}"}]}
             for i in range(12)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for method in ("dora", "vera"):
        out = tmp_path / method
        assert _train(out, "--data", str(data), "--method", method, "--quantize", "nf4", "--loraplus-ratio", "4",
                      "--max-steps", "3", "--r", "4", "--gradient-checkpointing") == 0
        config = json.loads((out / "adapter" / "adapter_config.json").read_text())
        assert config["peft_type"] == ("VERA" if method == "vera" else "LORA")


def test_config_file_sets_options_and_flags_win(tmp_path: Path) -> None:
    config = tmp_path / "train.yaml"
    config.write_text("max-steps: 2\nr: 4\nmethod: dora\n")
    assert _train(tmp_path / "out", "--config", str(config), "--r", "2") == 0
    saved = json.loads((tmp_path / "out" / "train_config.json").read_text())
    assert (saved["max_steps"], saved["r"], saved["method"]) == (2, 2, "dora")
    toml = tmp_path / "bad.toml"
    toml.write_text("nonsense_option = 1\n")
    assert _train(tmp_path / "out2", "--config", str(toml)) == 2


def test_adapted_model_trains_under_transformers_trainer(tmp_path: Path) -> None:
    from transformers import Trainer as HFTrainer
    from transformers import TrainingArguments

    from lorakit.training.data import collate, tokenize_records
    from lorakit.training.task import make_builtin_task

    model, tokenizer = load_model("tiny-llama")
    lorakit.adapt(model, lorakit.LoraConfig(r=4, target_modules="all-linear"))
    examples, _ = tokenize_records(make_builtin_task(0, 32, 0)[0], tokenizer, 64)
    before = {k: v.clone() for k, v in lorakit.adapter_state_dict(model).items()}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to=[], save_strategy="no", use_cpu=True, remove_unused_columns=False)
    HFTrainer(model=model, args=args, train_dataset=examples,
              data_collator=lambda batch: collate(batch, tokenizer.pad_token_id)).train()
    after = lorakit.adapter_state_dict(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    lorakit.save_adapter(model, tmp_path / "adapter")


@pytest.mark.slow
def test_builtin_demo_end_to_end(tmp_path: Path) -> None:
    """The real main job: SmolLM2-135M on the built-in task (minutes)."""
    from lorakit.training import train

    result = train(TrainConfig(output_dir=str(tmp_path / "demo")))
    assert result["exact_match"] >= 0.8

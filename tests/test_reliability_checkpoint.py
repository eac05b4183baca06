"""Checkpoints and `--resume` under hostile conditions: nothing to resume, a save killed between its renames,
non-finite or corrupted checkpoint files, leftovers of killed runs, a diverging loss, SIGKILL at random moments."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fuzzing import assert_refused, run_cli
from safetensors.torch import load_file, save_file

import lorakit
import lorakit.training.trainer as trainer_module
from lorakit.models import load_model
from lorakit.training import Trainer, cosine_with_warmup
from lorakit.training.checkpoint import read_checkpoint, save_checkpoint, seal

STEPS, KILLED_AT = 4, 3
FLAGS = ["--model", "tiny-llama", "--batch-size", "4", "--builtin-train-size", "16", "--eval-samples", "0",
         "--seq-len", "64", "--save-every", "1", "--log-every", "1", "--dropout", "0.1", "--seed", "3",
         "--dtype", "float32"]


def _argv(out: Path, *extra: str, steps: int = STEPS) -> list[str]:
    return ["train", *FLAGS, "--max-steps", str(steps), "--output-dir", str(out), *extra]


def _snapshot(root: Path) -> dict[str, str]:
    return {path.relative_to(root).as_posix(): "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*"))}


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def _assert_same_adapter(out: Path, reference: dict[str, torch.Tensor]) -> None:
    adapter = _adapter(out)
    assert adapter.keys() == reference.keys()
    assert all(torch.equal(adapter[key], reference[key]) for key in reference)


def killed_at(step: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the next run die (as if killed) when `step` steps are done."""
    original = Trainer._optimizer_step

    def dying(self: Trainer) -> tuple[float, int]:
        if self.step == step:
            raise SystemExit("killed")
        return original(self)

    monkeypatch.setattr(Trainer, "_optimizer_step", dying)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORAKIT_CACHE", str(tmp_path_factory.getbasetemp() / "lorakit-cache"))
        yield


@pytest.fixture(scope="module")
def reference(cache: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """The adapter of the uninterrupted run."""
    out = tmp_path_factory.mktemp("straight")
    assert run_cli(_argv(out)).code == 0
    return _adapter(out)


@pytest.fixture(scope="module")
def template(cache: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run killed during step KILLED_AT + 1: its checkpoint is at step KILLED_AT."""
    out = tmp_path_factory.mktemp("killed") / "run"
    with pytest.MonkeyPatch.context() as patch:
        killed_at(KILLED_AT, patch)
        assert run_cli(_argv(out)).code == 1
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == KILLED_AT
    return out


@pytest.fixture
def killed(template: Path, tmp_path: Path) -> Path:
    """A fresh copy of the killed run."""
    return Path(shutil.copytree(template, tmp_path / "run"))


@pytest.mark.parametrize("layout", ["missing", "file", "tmp only", "empty"])
def test_resume_with_nothing_to_resume_is_refused_and_overwrites_nothing(killed: Path, layout: str) -> None:
    checkpoint = killed / "checkpoint"
    if layout == "tmp only":
        checkpoint.rename(killed / ".checkpoint.tmp-999999999")  # an unfinished save is never resumed from
    else:
        for path in sorted(checkpoint.rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
        checkpoint.rmdir()
        if layout == "file":
            checkpoint.write_text("not a checkpoint")
        elif layout == "empty":
            checkpoint.mkdir()
    before = _snapshot(killed)
    message = assert_refused(run_cli(_argv(killed, "--resume")))
    assert message.startswith("--resume: ") and str(checkpoint) in message
    assert _snapshot(killed) == before  # nothing restarted from step 0, nothing overwritten


@pytest.mark.parametrize("resume", [True, False])
def test_an_output_dir_that_is_a_file_is_a_one_line_error(cache: None, tmp_path: Path, resume: bool) -> None:
    file = tmp_path / "run"
    file.write_text("a file")
    message = assert_refused(run_cli(_argv(file, *(["--resume"] if resume else []))))
    assert message.startswith("--output-dir") and str(file) in message and "not a directory" in message
    assert file.read_text() == "a file"


def test_a_save_killed_between_its_renames_is_resumed_from_the_old_directory(
    cache: None, reference: dict[str, torch.Tensor], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "run"
    rename = Path.rename

    def killed_between_renames(self: Path, target: Any) -> Any:
        if self.name.startswith(".checkpoint.tmp-") and json.loads((self / "state.json").read_text())["step"] == 3:
            raise SystemExit("killed")  # the old checkpoint is already set aside, the new one not yet in place
        return rename(self, target)

    with monkeypatch.context() as patch:
        patch.setattr(Path, "rename", killed_between_renames)
        assert run_cli(_argv(out)).code == 1
    assert not (out / "checkpoint").exists()
    olds = sorted(out.glob(".checkpoint.old-*"))
    assert [read_checkpoint(old).step for old in olds] == [2]

    outcome = run_cli(_argv(out, "--resume"))
    assert outcome.code == 0, outcome.stderr
    assert f"resuming from {olds[0].name}" in outcome.stdout and "resumed from step 2" in outcome.stdout
    _assert_same_adapter(out, reference)
    assert not any(out.glob(".checkpoint.*")) and read_checkpoint(out / "checkpoint").step == STEPS


def _write_into(file: Path, value: float) -> str:
    """Write `value` into the first float tensor of a safetensors file; returns the tensor's name."""
    tensors = load_file(file)
    name = next(key for key, tensor in sorted(tensors.items()) if tensor.is_floating_point())
    tensors[name] = tensors[name].clone().reshape(-1).index_fill(0, torch.tensor([0]), value).reshape(
        tensors[name].shape)
    save_file(tensors, file, metadata={"format": "pt"})
    return name


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("file", ["adapter/adapter_model.safetensors", "optimizer.safetensors"])
def test_non_finite_values_in_a_checkpoint_are_refused_before_anything_changes(
    killed: Path, file: str, value: float,
) -> None:
    name = _write_into(killed / "checkpoint" / file, value)
    seal(killed / "checkpoint")  # a whole checkpoint that holds a non-finite value
    before = _snapshot(killed)
    message = assert_refused(run_cli(_argv(killed, "--resume")))
    assert file in message and name in message and "non-finite" in message
    assert _snapshot(killed) == before
    with pytest.raises(ValueError, match="non-finite"):
        read_checkpoint(killed / "checkpoint")


@pytest.mark.parametrize(("file", "damage", "reason"), [
    ("optimizer.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage", "corrupted or not a safetensors file"),
    ("optimizer.safetensors", None, "corrupted or not a safetensors file"),  # truncated
    ("state.json", b"{\"step\": 3,", "not valid JSON"),
    ("state.json", b"\xff\xfe not text", "not valid JSON"),
    ("state.json", "step=\"3\"", "key step must be an integer"),
    ("state.json", "optimizer=[]", "key optimizer must be an object"),
    ("state.json", "scheduler.last_epoch=null", "key scheduler.last_epoch must be an integer"),
    ("state.json", "python_rng=[3, [1, 2], null]", "key python_rng[1] must be a list of 625"),
    ("state.json", "stream.index=2", "key stream"),
    ("state.json", "world_size=1000000000000", "key world_size is 1000000000000, but"),
])
@pytest.mark.parametrize("sealed", [True, False])
def test_a_corrupted_optimizer_file_or_state_json_is_a_one_line_error(
    killed: Path, file: str, damage: bytes | str | None, reason: str, sealed: bool,
) -> None:
    path = killed / "checkpoint" / file
    if isinstance(damage, str):
        key, _, value = damage.partition("=")
        state = json.loads(path.read_text())
        *parents, last = key.split(".")
        target = state
        for parent in parents:
            target = target[parent]
        target[last] = json.loads(value)
        path.write_text(json.dumps(state))
    else:
        path.write_bytes(damage if damage is not None else path.read_bytes()[:1000])
    if sealed:
        seal(killed / "checkpoint")
    before = _snapshot(killed)
    message = assert_refused(run_cli(_argv(killed, "--resume")))
    assert str(path) in message
    assert (reason if sealed else "is damaged: its size or content differs from manifest.json") in message
    assert _snapshot(killed) == before


def test_temporaries_of_stopped_runs_are_removed_and_said_those_of_running_ones_kept(
    killed: Path, reference: dict[str, torch.Tensor],
) -> None:
    stale = [killed / ".checkpoint.tmp-999999999", killed / ".checkpoint.old-999999999",
             killed / f".checkpoint.tmp-{os.getpid()}"]
    running = [killed / f".checkpoint.tmp-{os.getppid()}", killed / f".checkpoint.old-{os.getppid()}"]
    for path in stale + running:
        path.mkdir()
        (path / "state.json").write_text("{")
    outcome = run_cli(_argv(killed, "--resume"))
    assert outcome.code == 0, outcome.stderr
    assert "removed" in outcome.stdout and all(path.name in outcome.stdout for path in stale)
    assert not any(path.exists() for path in stale) and all(path.is_dir() for path in running)
    _assert_same_adapter(killed, reference)


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(
    cache: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "run"
    original = trainer_module.summed_token_loss
    calls = []

    def diverging(model: Any, batch: Any) -> torch.Tensor:
        calls.append(1)
        loss = original(model, batch)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(trainer_module, "summed_token_loss", diverging)
    outcome = run_cli(_argv(out))
    assert outcome.code == 2
    last = outcome.stderr.splitlines()[-1]
    assert last.startswith("lorakit: error: training diverged: the loss of step 3 is nan") and "kept" in last
    assert "Traceback" not in outcome.stderr
    assert read_checkpoint(out / "checkpoint").step == 2  # the last good one, complete and finite
    assert not (out / "adapter").exists()


def test_a_checkpoint_is_never_written_with_non_finite_tensors(killed: Path) -> None:
    model, _ = load_model("tiny-llama", "float32")
    lorakit.adapt(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(0, 4))
    next(p for p in model.parameters() if p.requires_grad).data[0] = float("nan")
    before = _snapshot(killed)
    with pytest.raises(ValueError, match="non-finite values .the previous checkpoint is kept"):
        save_checkpoint(killed / "checkpoint", model, optimizer, scheduler, {"step": 0})
    assert _snapshot(killed) == before


def _saved_step(out: Path) -> int:
    """The step of the checkpoint in place (-1 for none, or while it is being replaced)."""
    try:
        return json.loads((out / "checkpoint" / "state.json").read_text())["step"]
    except (OSError, ValueError):
        return -1


def test_sigkill_at_random_moments_leaves_a_resumable_run(
    cache: None, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory,
) -> None:
    steps = 10
    straight = tmp_path / "straight"
    assert run_cli(_argv(straight, steps=steps)).code == 0
    out = tmp_path / "run"
    env = {**os.environ, "LORAKIT_CACHE": str(tmp_path_factory.getbasetemp() / "lorakit-cache")}
    command = [sys.executable, "-m", "lorakit", *_argv(out, steps=steps)]
    rng = random.Random(0)
    for attempt in range(2):
        saved = _saved_step(out)
        process = subprocess.Popen(command + (["--resume"] if attempt else []), env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while _saved_step(out) <= saved and process.poll() is None:  # training has begun: a new checkpoint
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.3))  # then mid-step or mid-save
        process.send_signal(signal.SIGKILL)
        process.wait()
    outcome = run_cli(_argv(out, "--resume", steps=steps))
    assert outcome.code == 0, outcome.stderr
    assert "resumed from step" in outcome.stdout and "resumed from step 0" not in outcome.stdout
    _assert_same_adapter(out, _adapter(straight))

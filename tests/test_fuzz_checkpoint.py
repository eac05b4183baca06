"""Fuzz properties of checkpoints: a run's training checkpoint damaged, forged, renamed or surrounded by leftovers and
resumed with `lorakit train --resume`; the temporaries of stopped writers; a model's safetensors checkpoint damaged.

The oracle is written here, apart from lorakit's code. A training checkpoint is a directory whose `manifest.json`
lists its files with sizes and SHA-256; the test may re-seal a directory (rewrite the manifest), which forges a
complete checkpoint out of whatever the files now hold. A checkpoint directory is *usable* when
  - its files are unchanged, or every change is re-sealed and harmless: an extra file, a key that resuming does not
    read (an option outside model/method/r/targets/quantize/batch_size/grad_accum/seed, a scheduler field derived
    from the step), a value rewritten as itself;
and *broken* when a listed file is changed or missing without a re-seal, or when the change breaks a rule resuming
must enforce: any key it reads missing or of another type or value (step, world size, data-stream position and
settings, optimizer settings, base learning rates, scheduler counters), a non-finite tensor, the adapter directory
replaced by a file. Other re-sealed changes (finite tensor values, random bytes, the RNG states) are *unknown*.
`--resume` must continue from `checkpoint/` when it is usable, else from a usable `.checkpoint.old-<pid>` (saying
so), else refuse with exit status 2 and one line, leaving every file as it was. Continuing, the run must end with
the adapter of the uninterrupted run, log steps 1..N once each, leave a complete checkpoint, and remove exactly the
`.checkpoint.tmp-<pid>` / `.checkpoint.old-<pid>` of writers that are not running (saying so). A `.tmp` directory is
never resumed from, even when complete. With unknown changes it must end either way, cleanly.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from fuzzing import assert_clean_error, assert_refused, bounded, count_case, run_cli
from hypothesis import event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from test_reliability_checkpoint import killed_at

from lorakit.formats.checkpoint import Checkpoint
from lorakit.training import Trainer
from lorakit.training.checkpoint import read_checkpoint, remove_stale_temporaries, seal

STEPS, KILLED_AT = 4, 3
FLAGS = ["--model", "tiny-llama", "--batch-size", "4", "--builtin-train-size", "16", "--eval-samples", "0",
         "--seq-len", "64", "--max-steps", str(STEPS), "--save-every", "1", "--log-every", "1", "--dropout", "0.1",
         "--seed", "3", "--dtype", "float32"]
FILES = ("state.json", "optimizer.safetensors", "manifest.json", "adapter/adapter_config.json",
         "adapter/adapter_model.safetensors")
CHECKED_OPTIONS = ("model", "method", "r", "targets", "quantize", "batch_size", "grad_accum", "seed")
DERIVED_SCHEDULER_KEYS = ("_is_initial", "_get_lr_called_within_step", "_last_lr")
PID_KINDS = ("dead", "own", "live", "zero", "huge")


def pid_text(kind: str) -> str:
    """A writer's PID in a temporary's name; only "live" names a running process other than this one."""
    return {"dead": "999999999", "own": str(os.getpid()), "live": str(os.getppid()), "zero": "0",
            "huge": "9" * 25}[kind]


def snapshot(root: Path) -> dict[str, str]:
    """Every path under `root` (hidden ones too) -> "dir" or its content's hash."""
    return {path.relative_to(root).as_posix(): "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*"))}


@dataclass
class Runs:
    reference: dict[str, torch.Tensor] = field(repr=False)  # the uninterrupted run's adapter
    template: Path  # a run killed during step KILLED_AT + 1: its checkpoint is at step KILLED_AT
    state: dict[str, Any] = field(repr=False)  # the template checkpoint's state.json

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # hypothesis prints this, not the tensors
        printer.text(f"Runs(template={self.template})")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runs]:
    root = tmp_path_factory.mktemp("checkpoint-fuzz")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORAKIT_CACHE", str(tmp_path_factory.getbasetemp() / "lorakit-cache"))
        assert run_cli(["train", *FLAGS, "--output-dir", str(root / "straight")]).code == 0
        original = Trainer._optimizer_step
        killed_at(KILLED_AT, patch)
        assert run_cli(["train", *FLAGS, "--output-dir", str(root / "killed")]).code == 1
        patch.setattr(Trainer, "_optimizer_step", original)
        state = json.loads((root / "killed" / "checkpoint" / "state.json").read_text())
        yield Runs(load_file(root / "straight" / "adapter" / "adapter_model.safetensors"), root / "killed", state)


# --- damage, with the oracle's verdict on each ----------------------------------------------------------------------

HARMLESS, BROKEN, UNKNOWN = "harmless", "broken", "unknown"


def _json_paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(value, dict):
        for key, member in value.items():
            yield from _json_paths(member, (*prefix, key))
    elif isinstance(value, list) and prefix[:1] != ("python_rng",):
        for index, member in enumerate(value):
            yield from _json_paths(member, (*prefix, index))


def _state_verdict(path: tuple[Any, ...], action: str, old: Any, new: Any, state: dict[str, Any]) -> str:
    """Whether resuming may use a state.json with `path` deleted, set to `new` or added (re-sealed)."""
    if action == "set" and json.dumps(old) == json.dumps(new):
        return HARMLESS
    head = path[0] if path else None
    if action == "add":
        return BROKEN if head == "optimizer" and len(path) >= 2 and path[1] in ("param_groups", "scalars") \
            else HARMLESS
    if head == "config":
        config = dict(state["config"])
        if len(path) == 1:
            return HARMLESS if isinstance(new, dict) and all(
                new.get(key) == config[key] for key in CHECKED_OPTIONS) else BROKEN
        if path[1] not in CHECKED_OPTIONS:
            return HARMLESS
        return HARMLESS if action == "set" and new == config[path[1]] and len(path) == 2 else (
            HARMLESS if action == "delete" and config[path[1]] is None and len(path) == 2 else BROKEN)
    if head == "scheduler" and len(path) >= 2 and path[1] in DERIVED_SCHEDULER_KEYS:
        return HARMLESS
    if path[:2] == ("optimizer", "param_groups") and len(path) >= 4 and path[3] == "lr":
        return HARMLESS  # the learning rate is this run's schedule's at the saved step
    if head == "python_rng":
        return UNKNOWN
    return BROKEN


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(min_value=-(2**80), max_value=2**80) | st.floats()
    | st.text(max_size=6),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=6)


@dataclass(frozen=True)
class Damage:
    kind: str
    file: str = "state.json"
    where: float = 0.0  # a position in the file, or which tensor/path/element (as a fraction)
    xor: int = 1
    value: Any = None

    def apply(self, directory: Path, state: dict[str, Any], resealed: bool) -> str:
        """Damage the checkpoint in `directory`; returns the oracle's verdict (given whether it will be re-sealed)."""
        path = directory / self.file
        changed = BROKEN if not resealed else UNKNOWN
        if self.kind == "junk":
            if path.parent.exists() and not path.parent.is_dir():
                return HARMLESS
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"\0junk")
            return HARMLESS
        if self.kind == "adapter-file":
            shutil.rmtree(directory / "adapter", ignore_errors=True)
            (directory / "adapter").write_text("not a directory")
            return BROKEN
        if not path.is_file():
            return HARMLESS  # already gone: an earlier damage decided
        manifest = self.file == "manifest.json"
        if self.kind in ("flip", "truncate"):
            data = bytearray(path.read_bytes())
            if not data:
                return HARMLESS
            if self.kind == "flip":
                data[min(int(self.where * len(data)), len(data) - 1)] ^= self.xor
            else:
                data = data[: min(int(self.where * len(data)), len(data) - 1)]
            path.write_bytes(bytes(data))
            return HARMLESS if manifest and resealed else changed if not manifest else BROKEN
        if self.kind == "delete":
            path.unlink()
            return HARMLESS if manifest and resealed else BROKEN
        if self.kind == "tensor":
            return self._tensor(path, resealed)
        return self._state(path, state, resealed)

    def _tensor(self, path: Path, resealed: bool) -> str:
        try:
            tensors = load_file(path)
        except Exception:  # noqa: BLE001 - already damaged: an earlier damage decided
            return HARMLESS
        names = sorted(name for name, value in tensors.items() if value.is_floating_point())
        name = names[min(int(self.where * len(names)), len(names) - 1)]
        flat = tensors[name].clone().reshape(-1)
        if flat.numel() == 0:
            return HARMLESS
        flat[self.xor % flat.numel()] = self.value
        tensors[name] = flat.reshape(tensors[name].shape)
        save_file(tensors, path, metadata={"format": "pt"} if "adapter" in path.parts[-2] else None)
        return BROKEN if not math.isfinite(self.value) or not resealed else UNKNOWN

    def _state(self, path: Path, state: dict[str, Any], resealed: bool) -> str:
        try:
            data = json.loads(path.read_bytes())
        except ValueError:  # already damaged: an earlier damage decided
            return HARMLESS
        if not isinstance(data, dict):
            return HARMLESS
        paths = [p for p in _json_paths(data) if p]
        paths = [p for p in paths if p[0] != "config"] * 3 + [p for p in paths if p[0] == "config"]  # options: 1 in 4
        target = paths[min(int(self.where * len(paths)), len(paths) - 1)]
        parent = data
        for key in target[:-1]:
            parent = parent[key]
        old = parent[target[-1]]
        if self.kind == "state-delete":
            del parent[target[-1]]
            verdict = _state_verdict(target, "delete", old, None, state)
        elif self.kind == "state-add" and isinstance(old, dict):
            old["new-key"] = self.value
            verdict = _state_verdict((*target, "new-key"), "add", None, self.value, state)
        else:
            parent[target[-1]] = self.value
            verdict = _state_verdict(target, "set", old, self.value, state)
        text = json.dumps(data, indent=1).encode()
        unchanged = text == path.read_bytes()
        path.write_bytes(text)
        return HARMLESS if unchanged else verdict if resealed else BROKEN


damages = st.one_of(
    st.builds(Damage, st.sampled_from(["flip", "truncate", "delete"]), st.sampled_from(FILES),
              st.floats(0, 1), st.integers(1, 255)),
    st.builds(Damage, st.just("tensor"), st.sampled_from(["optimizer.safetensors", "adapter/adapter_model.safetensors"]),
              st.floats(0, 1), st.integers(0, 10**6),
              st.sampled_from([math.nan, math.inf, -math.inf, 1e30, 0.5, -2.0])),
    st.builds(Damage, st.sampled_from(["state-set", "state-delete", "state-add"]), st.just("state.json"),
              st.floats(0, 1), st.just(1), json_values),
    st.builds(Damage, st.just("junk"), st.sampled_from(["notes.txt", "adapter/extra.bin", ".hidden"])),
    st.just(Damage("adapter-file")),
)

# checkpoint/ as: "main" kept; "old" renamed to .checkpoint.old-PID (killed between the renames of a save); "both"
# kept and copied there; "tmp" renamed to .checkpoint.tmp-PID; "none" deleted; "file" replaced by a file; "file+old"
# renamed to .old and replaced by a file; "empty" an empty directory. Damage goes to the first directory of the list.
LAYOUTS = ("main", "old", "both", "tmp", "none", "file", "file+old", "empty")


@dataclass(frozen=True)
class Leftover:
    mark: str  # "tmp" or "old"
    pid: str  # a PID_KINDS entry
    content: str  # "empty", "partial" (no manifest) or "copy" (complete; for tmp only)


leftovers = st.builds(Leftover, st.sampled_from(["tmp", "old"]), st.sampled_from(PID_KINDS),
                      st.sampled_from(["empty", "partial", "copy"]))


def _arrange(out: Path, layout: str, old_pid: str, extra: list[Leftover]) -> tuple[list[Path], set[Path]]:
    """Lay out `out` as `layout`; returns the candidate directories in resume order and the temporaries made."""
    main, old = out / "checkpoint", out / f".checkpoint.old-{pid_text(old_pid)}"
    made: set[Path] = set()
    if layout in ("old", "file+old"):
        main.rename(old)
    elif layout == "both":
        shutil.copytree(main, old)
    elif layout == "tmp":
        main.rename(out / f".checkpoint.tmp-{pid_text(old_pid)}")
        made.add(out / f".checkpoint.tmp-{pid_text(old_pid)}")
    elif layout in ("none", "file", "empty"):
        shutil.rmtree(main)
    if layout in ("file", "file+old"):
        main.write_text("not a checkpoint")
    if layout == "empty":
        main.mkdir()
    if old.is_dir():
        made.add(old)
    source = old if old.is_dir() else main if main.is_dir() else None
    for item in extra:
        path = out / f".checkpoint.{item.mark}-{pid_text(item.pid)}"
        if path.exists() or source is None or (item.content == "copy" and item.mark == "old"):
            continue
        if item.content == "empty":
            path.mkdir()
        else:
            shutil.copytree(source, path)
            if item.content == "partial":
                (path / "manifest.json").unlink(missing_ok=True)
                (path / "state.json").unlink(missing_ok=True)
        made.add(path)
    candidates = [main] if layout in ("main", "both") else []
    return candidates + ([old] if layout in ("old", "both", "file+old") else []), made


def _same_files(directory: Path, original: Path, resealed: bool) -> bool:
    """Whether `directory` holds every file of the checkpoint `original` unchanged (the manifest aside if re-sealed)."""
    for file in original.rglob("*"):
        relative = file.relative_to(original)
        if file.is_file() and not (resealed and relative.as_posix() == "manifest.json"):
            copy = directory / relative
            if not copy.is_file() or copy.read_bytes() != file.read_bytes():
                return False
    return True


def _assert_resumed(outcome: Any, out: Path, runs: Runs, note: bool | None, made: set[Path], exact: bool) -> None:
    assert outcome.code == 0, outcome.stderr[-2000:]
    assert f"resumed from step {KILLED_AT}" in outcome.stdout  # never from step 0
    assert note is None or ("resuming from .checkpoint.old-" in outcome.stdout) == note, outcome.stdout
    assert read_checkpoint(out / "checkpoint").step == STEPS
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == list(range(1, STEPS + 1)) or not exact
    if exact:
        adapter = load_file(out / "adapter" / "adapter_model.safetensors")
        assert adapter.keys() == runs.reference.keys()
        assert all(torch.equal(adapter[key], runs.reference[key]) for key in adapter)
    for path in made:
        running = path.name.endswith(f"-{os.getppid()}")
        assert path.exists() == running, path.name
        assert running or path.name in outcome.stdout


@settings(max_examples=max(5, settings.default.max_examples // 3))  # a resumed run trains: the costly cases
@given(layout=st.sampled_from(LAYOUTS), old_pid=st.sampled_from(PID_KINDS),
       damage=st.lists(damages, max_size=3), resealed=st.booleans(), extra=st.lists(leftovers, max_size=2))
def test_resume_continues_from_a_whole_checkpoint_or_refuses(
    runs: Runs, layout: str, old_pid: str, damage: list[Damage], resealed: bool, extra: list[Leftover],
) -> None:
    count_case("checkpoint")
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "run"
        shutil.copytree(runs.template, out)
        _resume_case(runs, out, layout, old_pid, damage, resealed, extra)


def _resume_case(runs: Runs, out: Path, layout: str, old_pid: str, damage: list[Damage], resealed: bool,
                 extra: list[Leftover]) -> None:
    candidates, made = _arrange(out, layout, old_pid, extra)
    verdicts = [HARMLESS]
    if candidates:
        verdicts = [item.apply(candidates[0], runs.state, resealed) for item in damage]
        if resealed:
            seal(candidates[0])
        if _same_files(candidates[0], runs.template / "checkpoint", resealed):
            verdicts = [HARMLESS]  # the damage undid itself (or touched only files outside the manifest)
        elif not resealed:
            verdicts = [BROKEN]
    usable = [c for i, c in enumerate(candidates) if i > 0 or BROKEN not in verdicts and UNKNOWN not in verdicts]
    before = snapshot(out)
    outcome = run_cli(["train", *FLAGS, "--output-dir", str(out), "--resume"], seconds=120, memory_mib=1024)
    expected = "either" if UNKNOWN in verdicts and BROKEN not in verdicts and candidates else (
        "resume from checkpoint/" if usable and usable[0].name == "checkpoint" else "resume from .old" if usable
        else "refuse")
    event(f"expected {expected}, exit {outcome.code}")
    if UNKNOWN in verdicts and BROKEN not in verdicts and candidates:  # forged values: either way, cleanly
        if outcome.code == 0:
            _assert_resumed(outcome, out, runs, None, made, exact=False)
        else:
            assert outcome.code == 2 and outcome.stderr.splitlines()[-1].startswith("lorakit: error: "), outcome
            assert "Traceback" not in outcome.stderr
        return
    if usable:
        _assert_resumed(outcome, out, runs, usable[0].name != "checkpoint", made, exact=True)
    else:
        message = assert_refused(outcome)
        assert "checkpoint" in message
        assert snapshot(out) == before


# --- temporaries of stopped writers ---------------------------------------------------------------------------------

NAME = re.compile(r"\.checkpoint\.(tmp|old)-([0-9]+)(-.*)?")


@given(entries=st.lists(st.tuples(
    st.sampled_from([".checkpoint.tmp-", ".checkpoint.old-", ".checkpoint.tmpx-", "checkpoint.tmp-", ".other.tmp-"]),
    st.sampled_from([*PID_KINDS, "abc", "-3", "\u0663"]), st.sampled_from(["", "-1", "-x"]),
    st.sampled_from(["dir", "file"])), max_size=6), olds=st.booleans())
def test_only_temporaries_of_writers_not_running_are_removed(entries: list[tuple[str, str, str, str]],
                                                             olds: bool) -> None:
    count_case("checkpoint")
    with bounded(10, 64), tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "checkpoint").mkdir()
        expected = set()
        for prefix, pid, suffix, kind in entries:
            name = prefix + (pid_text(pid) if pid in PID_KINDS else pid) + suffix
            path = root / name
            if path.exists():
                continue
            path.mkdir() if kind == "dir" else path.write_text("x")
            match = NAME.fullmatch(name)
            if match and (match[1] == "tmp" or olds) and pid != "live":
                expected.add(name)
        removed = remove_stale_temporaries(root / "checkpoint", olds=olds)
        assert {path.name for path in removed} == expected
        assert {path.name for path in root.iterdir()} & expected == set()
        assert (root / "checkpoint").is_dir()


# --- a model's safetensors checkpoint -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from conftest import tiny_llama

    root = tmp_path_factory.mktemp("model-checkpoints")
    model = tiny_llama()
    model.save_pretrained(root / "single", safe_serialization=True)
    model.save_pretrained(root / "sharded", safe_serialization=True, max_shard_size="60KB")
    assert (root / "sharded" / "model.safetensors.index.json").is_file()
    return {"single": root / "single", "sharded": root / "sharded"}


@given(which=st.sampled_from(["single", "sharded"]), kind=st.sampled_from(["flip", "truncate", "delete", "index"]),
       pick=st.floats(0, 1), where=st.floats(0, 1), xor=st.integers(1, 255), value=json_values)
def test_a_damaged_model_checkpoint_reads_whole_or_is_refused(
    model_dirs: dict[str, Path], which: str, kind: str, pick: float, where: float, xor: int, value: Any,
) -> None:
    """Rules: a truncated or deleted safetensors file is refused; so is an index naming a missing file or tensor;
    damage elsewhere must read every tensor at its recorded shape and dtype, or be refused."""
    count_case("checkpoint")
    with tempfile.TemporaryDirectory() as folder:
        directory = Path(folder) / which
        shutil.copytree(model_dirs[which], directory)
        _model_case(directory, kind, pick, where, xor, value)


def _model_case(directory: Path, kind: str, pick: float, where: float, xor: int, value: Any) -> None:
    files = sorted(p for p in directory.iterdir() if p.name.endswith(".safetensors"))
    file = files[min(int(pick * len(files)), len(files) - 1)]
    must_refuse = kind in ("truncate", "delete")
    if kind == "index":
        index = directory / "model.safetensors.index.json"
        if not index.is_file():
            return
        data = json.loads(index.read_text())
        names = sorted(data["weight_map"])
        data["weight_map"][names[min(int(where * len(names)), len(names) - 1)]] = value
        must_refuse = not (isinstance(value, str) and (directory / value).is_file() and value.endswith(".safetensors"))
        index.write_text(json.dumps(data))
    elif kind == "delete":
        file.unlink()
    else:
        data = bytearray(file.read_bytes())
        if kind == "flip":
            data[min(int(where * len(data)), len(data) - 1)] ^= xor
        else:
            data = data[: min(int(where * len(data)), len(data) - 1)]
        file.write_bytes(bytes(data))
    with bounded(20, 256):
        try:
            checkpoint = Checkpoint(directory)
            tensors = {entry.name: checkpoint.read(entry.name) for entry in checkpoint}
        except Exception as error:  # noqa: BLE001 - the property: every failure is a clean one
            message = assert_clean_error(error)
            assert directory.name in message or "model.safetensors" in message, message
            return
    assert not must_refuse, f"{kind} of {file.name} was accepted"
    for entry in checkpoint:
        assert tensors[entry.name].shape == entry.shape and tensors[entry.name].dtype == entry.dtype

"""`--report-to`: each tracker logs a run like a real metrics.jsonl into a temporary directory, offline, and the run is
read back with the tracker's own reader (W&B: its protobuf records, from the offline run's .wandb file)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar
from unittest import mock

import pytest

from lorakit.training.config import TrainConfig
from lorakit.training.trackers import TRACKER_CLASSES, TRACKERS, open_trackers, parse_report_to, scalars

RUN_NAME = "test-run"
RECORDS: list[dict[str, Any]] = [
    {"step": 0, "tag": "base", "eval_loss": 2.75, "eval_ppl": 15.64, "exact_match": 0.0, "n_scored": 4},
    {"step": 1, "loss": 2.5, "lr": 1e-4, "tokens_per_s": 1520.25},
    {"step": 2, "loss": 2.0, "lr": 2e-4, "tokens_per_s": 1610.5},
    {"step": 3, "loss": 1.5, "lr": 1.5e-4, "tokens_per_s": 1598.0},
    {"step": 3, "tag": "tuned", "eval_loss": 1.25, "eval_ppl": 3.49, "exact_match": 0.5, "n_scored": 4},
]
LIBRARY_MODULES = {"tensorboard": "torch.utils.tensorboard", "mlflow": "mlflow", "trackio": "trackio",
                   "wandb": "wandb"}


@pytest.fixture(autouse=True)
def offline_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Home, caches and the working directory in tmp_path, no network; os.environ comes back whole afterwards."""
    home = tmp_path / "home"
    settings = {"HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"), "XDG_CONFIG_HOME": str(home / ".config"),
                "HF_HOME": str(home / "hf"), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
                "WANDB_CONFIG_DIR": str(home / "wandb-config"), "WANDB_CACHE_DIR": str(home / "wandb-cache"),
                "WANDB_DATA_DIR": str(home / "wandb-data"), "WANDB_ARTIFACT_DIR": str(home / "wandb-artifacts")}
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    with mock.patch.dict(os.environ, settings):
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "TRACKIO_DIR", "WANDB_PROJECT", "WANDB_DIR"):
            os.environ.pop(name, None)
        yield
    assert not any(cwd.iterdir()), "a tracker wrote to the working directory"


def train_config() -> dict[str, Any]:
    """The resolved config as the trainer writes it to train_config.json, plus a value too long for MLflow."""
    config = TrainConfig()
    return dataclasses.asdict(config) | {"total_steps": 3, "adapter": config.adapter_config().to_peft_dict(),
                                         "notes": "x" * 7000}


def log_run(name: str, run_dir: Path) -> dict[str, Any]:
    """Start tracker `name`, log RECORDS, finish; returns the config it was given."""
    config = train_config()
    trackers = open_trackers((name,), run_dir, RUN_NAME, config)
    for record in RECORDS:
        trackers.log(record)
    trackers.finish()
    return config


def expected_history() -> dict[str, list[tuple[int, float]]]:
    history: dict[str, list[tuple[int, float]]] = {}
    for record in RECORDS:
        for name, value in scalars(record).items():
            history.setdefault(name, []).append((record["step"], value))
    return history


def assert_history(history: dict[str, list[tuple[int, float]]], rel: float = 1e-12) -> None:
    expected = expected_history()
    assert sorted(history) == sorted(expected)
    for name, points in expected.items():
        assert [step for step, _ in history[name]] == [step for step, _ in points], name
        assert [value for _, value in history[name]] == pytest.approx([value for _, value in points], rel=rel), name


# -- names -------------------------------------------------------------------------------------------------------------


def test_parse_report_to() -> None:
    assert parse_report_to("none") == ()
    assert parse_report_to("") == ()
    assert parse_report_to("wandb, TensorBoard,wandb") == ("wandb", "tensorboard")
    assert parse_report_to(",".join(TRACKERS)) == TRACKERS
    for text in ("comet", "none,wandb", "tensorboard,mlfow"):
        with pytest.raises(ValueError, match="choose from none, tensorboard, mlflow, trackio, wandb"):
            parse_report_to(text)


def test_metric_names() -> None:
    assert scalars(RECORDS[1]) == {"train/loss": 2.5, "train/lr": 1e-4, "train/tokens_per_s": 1520.25}
    assert scalars(RECORDS[0]) == {"eval/base/loss": 2.75, "eval/base/ppl": 15.64, "eval/base/exact_match": 0.0,
                                   "eval/base/n_scored": 4.0}
    assert scalars({"step": 5, "tag": "eval", "eval_loss": 1.0, "note": "text", "flag": True}) == {"eval/eval/loss": 1.0}


# -- each tracker, read back ---------------------------------------------------------------------------------------


def test_tensorboard(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = log_run("tensorboard", tmp_path / "run")
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert_history({name: [(e.step, e.value) for e in events.Scalars(name)] for name in events.Tags()["scalars"]},
                   rel=1e-6)  # float32
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert json.loads(text.removeprefix("```json\n").removesuffix("\n```")) == json.loads(json.dumps(config))


def test_mlflow(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    config = log_run("mlflow", tmp_path / "run")
    client = MlflowClient(tracking_uri=(tmp_path / "run" / "mlruns").as_uri())
    [run] = client.search_runs([client.get_experiment_by_name("lorakit").experiment_id])
    assert run.info.run_name == RUN_NAME and run.info.status == "FINISHED"
    assert_history({name: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, name)]
                    for name in run.data.metrics})
    params = run.data.params
    assert params["lr"] == str(config["lr"]) and params["data"] == "None"
    assert params["adapter.r"] == str(config["adapter"]["r"])
    assert params["notes"] == "x" * 6000 and params["adapter.rank_pattern"] == "{}"
    assert len(params) == len(config) - 1 + len(config["adapter"])


def test_trackio(tmp_path: Path) -> None:
    config = log_run("trackio", tmp_path / "run")
    from trackio.sqlite_storage import SQLiteStorage

    assert SQLiteStorage.get_project_db_path("lorakit") == tmp_path / "run" / "trackio" / "lorakit.db"
    assert SQLiteStorage.get_runs("lorakit") == [RUN_NAME]
    history: dict[str, list[tuple[int, float]]] = {}
    for row in SQLiteStorage.get_logs("lorakit", RUN_NAME):
        for name, value in row.items():
            if name not in ("step", "timestamp"):
                history.setdefault(name, []).append((row["step"], value))
    assert_history(history)
    stored = SQLiteStorage.get_run_config("lorakit", RUN_NAME)
    assert {key: stored[key] for key in config} == json.loads(json.dumps(config))


def wandb_records(path: Path) -> list[Any]:
    """The protobuf records of a .wandb file: W&B's variant of the leveldb log format (header ':W&B', magic 0xBEE1,
    32 KiB blocks of records framed by crc32 / length / type, FULL=1 FIRST=2 MIDDLE=3 LAST=4)."""
    from wandb.proto.wandb_internal_pb2 import Record

    data, block, header = path.read_bytes(), 32768, 7
    ident, magic, _version = struct.unpack("<4sHB", data[:header])
    assert (ident, magic) == (b":W&B", 0xBEE1)
    records, pending, position = [], b"", header
    while position + header <= len(data):
        if block - position % block < header:  # zero trailer at the end of a block
            position += block - position % block
            continue
        checksum, length, kind = struct.unpack("<IHB", data[position:position + header])
        chunk = data[position + header:position + header + length]
        assert zlib.crc32(bytes([kind]) + chunk) == checksum
        position += header + length
        pending += chunk
        if kind in (1, 4):
            record = Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_wandb(tmp_path: Path) -> None:
    import wandb

    config = log_run("wandb", tmp_path / "run")
    wandb.teardown()  # as at exit: run.finish() may return before wandb-core has written the .wandb file
    [run_file] = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(run_file)
    history: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            for name, value in items.items():
                if not name.startswith("_"):
                    history.setdefault(name, []).append((items["_step"], value))
    assert_history(history)
    [run] = [record.run for record in records if record.WhichOneof("record_type") == "run"]
    assert run.display_name == RUN_NAME and run.project == "lorakit"
    stored = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert {key: stored[key] for key in config} == json.loads(json.dumps(config))


# -- failures, ranks ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TRACKERS)
def test_missing_library(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, LIBRARY_MODULES[name], None)
    message = f"--report-to {name} needs the {name} package: pip install 'lorakit[{name}]'"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        open_trackers((name,), tmp_path / "run", RUN_NAME, {})


class Recorder:
    """A stand-in tracker that remembers its calls."""

    calls: ClassVar[list[str]] = []

    def start(self, run_dir: Path, run_name: str, config: dict[str, Any]) -> None:
        self.calls.append("start")

    def log(self, record: dict[str, Any]) -> None:
        self.calls.append(f"log {record['step']}")

    def finish(self) -> None:
        self.calls.append("finish")


class FailsToStart(Recorder):
    def start(self, run_dir: Path, run_name: str, config: dict[str, Any]) -> None:
        raise ValueError("no library")


def test_fan_out_and_cleanup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Recorder, "calls", [])
    monkeypatch.setitem(TRACKER_CLASSES, "tensorboard", Recorder)
    monkeypatch.setitem(TRACKER_CLASSES, "wandb", Recorder)
    monkeypatch.setitem(TRACKER_CLASSES, "mlflow", FailsToStart)
    trackers = open_trackers(("tensorboard", "wandb"), tmp_path / "run", RUN_NAME, {})
    trackers.log(RECORDS[1])
    trackers.finish()
    assert Recorder.calls == ["start", "start", "log 1", "log 1", "finish", "finish"]
    Recorder.calls.clear()
    with pytest.raises(ValueError, match="no library"):
        open_trackers(("tensorboard", "mlflow", "wandb"), tmp_path / "run", RUN_NAME, {})
    assert Recorder.calls == ["start", "finish"]


def test_other_ranks_do_not_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for module in LIBRARY_MODULES.values():
        monkeypatch.setitem(sys.modules, module, None)  # not even imported
    trackers = open_trackers(TRACKERS, tmp_path / "run", RUN_NAME, train_config(), enabled=False)
    for record in RECORDS:
        trackers.log(record)
    trackers.finish()
    assert trackers.trackers == [] and not (tmp_path / "run").exists()


# -- end to end: lorakit train --report-to ---------------------------------------------------------------------------


def test_train_reports_what_metrics_jsonl_holds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lorakit.cli import main

    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert main(["train", "--model", "tiny-llama", "--max-steps", "3", "--batch-size", "2", "--seq-len", "64",
                 "--builtin-train-size", "8", "--eval-samples", "2", "--log-every", "1",
                 "--report-to", "tensorboard,mlflow", "--output-dir", str(out)]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    expected: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        for name, value in scalars(record).items():
            expected.setdefault(name, []).append((record["step"], value))
    assert {"train/loss", "eval/base/loss", "eval/tuned/exact_match"} <= set(expected)
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    board = {name: [(e.step, e.value) for e in events.Scalars(name)] for name in events.Tags()["scalars"]}
    client = MlflowClient(tracking_uri=(out / "mlruns").as_uri())
    [run] = client.search_runs([client.get_experiment_by_name("lorakit").experiment_id])
    flow = {name: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, name)]
            for name in run.data.metrics}
    for history in (board, flow):
        assert sorted(history) == sorted(expected)
        for name, points in expected.items():
            assert [s for s, _ in history[name]] == [s for s, _ in points]
            assert [v for _, v in history[name]] == pytest.approx([v for _, v in points], rel=1e-6)
    assert run.data.params["seq_len"] == "64" and run.data.params["report_to"] == "tensorboard,mlflow"


def test_train_names_the_missing_extra_before_loading_anything(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from lorakit.cli import main

    monkeypatch.setitem(sys.modules, "wandb", None)
    assert main(["train", "--model", "no-such-model", "--report-to", "wandb", "--output-dir", str(tmp_path)]) == 2
    assert "--report-to wandb needs the wandb package: pip install 'lorakit[wandb]'" in capsys.readouterr().err

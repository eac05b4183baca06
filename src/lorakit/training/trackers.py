"""Experiment trackers for `lorakit train --report-to`: the records of `metrics.jsonl`, sent to TensorBoard, MLflow,
trackio and/or Weights & Biases through each one's own library, which is imported only when its tracker starts.

Metric names (numeric fields only, at the record's `step`):

- training records `{"step", "loss", "lr", "tokens_per_s"}` -> `train/loss`, `train/lr`, `train/tokens_per_s`;
- evaluation records `{"step", "tag", "eval_loss", "eval_ppl", "exact_match", "n_scored"}` -> `eval/<tag>/loss`,
  `eval/<tag>/ppl`, `eval/<tag>/exact_match`, `eval/<tag>/n_scored`, the tag being `base` (before training), `eval`
  (every --eval-every steps) or `tuned` (after training).

Where each goes (local and offline unless the tracker's own environment variables say otherwise):

- tensorboard: event files in `<run_dir>/tensorboard` (`tensorboard --logdir <run_dir>/tensorboard`); the resolved
  config as a JSON text summary named `config`.
- mlflow: experiment `lorakit` (or $MLFLOW_EXPERIMENT_NAME) in the file store `<run_dir>/mlruns`, or wherever
  $MLFLOW_TRACKING_URI points. MLflow 3 refuses its file store unless MLFLOW_ALLOW_FILE_STORE=true, which lorakit sets
  when it uses that store (view it with `MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri <run_dir>/mlruns`).
  The config becomes the run's params: nested keys joined with dots, values as strings cut to MLflow's limits.
- trackio: project `lorakit` in `<run_dir>/trackio` (`TRACKIO_DIR=<run_dir>/trackio trackio show --project lorakit`),
  unless $TRACKIO_DIR is set. trackio reads TRACKIO_DIR once, when first imported, so in a process that imported it
  already the run goes to that process's store.
- wandb: project `lorakit` (or $WANDB_PROJECT) in offline mode under `<run_dir>/wandb` (`wandb sync` uploads it later),
  unless $WANDB_MODE is set.

Only the main process reports: `open_trackers(..., enabled=False)` on the other ranks returns trackers that do nothing.
"""

from __future__ import annotations

import importlib
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

TRACKERS = ("tensorboard", "mlflow", "trackio", "wandb")
PROJECT = "lorakit"
MLFLOW_MAX_KEY, MLFLOW_MAX_VALUE = 250, 6000  # MLflow's limits on a param's name and value


LIBRARIES = {"tensorboard": "torch.utils.tensorboard", "mlflow": "mlflow", "trackio": "trackio", "wandb": "wandb"}


def parse_report_to(text: str) -> tuple[str, ...]:
    """`--report-to`: "none" or "" for none, else a comma-separated subset of TRACKERS (duplicates dropped)."""
    names = tuple(dict.fromkeys(name.strip().lower() for name in text.split(",") if name.strip()))
    if names in ((), ("none",)):
        return ()
    unknown = [name for name in names if name not in TRACKERS]
    if unknown:
        raise ValueError(f"--report-to: unknown tracker {', '.join(unknown)}; choose from none, {', '.join(TRACKERS)}")
    return names


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record's numeric fields under their tracker names (see the module docstring)."""
    tag = record.get("tag")
    prefix = f"eval/{tag}/" if tag is not None else "train/"
    return {prefix + (key.removeprefix("eval_") if tag is not None else key): float(value)
            for key, value in record.items()
            if key not in ("step", "tag") and isinstance(value, (int, float)) and not isinstance(value, bool)}


class Tracker(Protocol):
    """One experiment tracker: started once, given every metrics record, finished at the end of the run."""

    def start(self, run_dir: Path, run_name: str, config: dict[str, Any]) -> None:
        """Import the tracker's library and open a run named `run_name` with the resolved `config`."""

    def log(self, record: dict[str, Any]) -> None:
        """Send one metrics.jsonl record: its `scalars` at its step."""

    def finish(self) -> None:
        """Close the run; what was logged is written out."""


def _require(module: str, tracker: str) -> ModuleType:
    """Import `module` for `--report-to tracker`, or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ValueError(f"--report-to {tracker} needs the {tracker} package: "
                         f"pip install 'lorakit[{tracker}]'") from error


def check_libraries(names: Iterable[str]) -> None:
    """Fail now, with the extra to install, if a tracker's library is missing (not after hours of loading)."""
    for name in names:
        _require(LIBRARIES[name], name)


def _plain(config: dict[str, Any]) -> dict[str, Any]:
    """The config as JSON types (what train_config.json holds)."""
    return json.loads(json.dumps(config, default=str))


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level, their keys joined with dots (an empty dict stays a value)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class TensorBoardTracker:
    """Scalars in `<run_dir>/tensorboard` through torch's SummaryWriter; the config as a text summary."""

    def start(self, run_dir: Path, run_name: str, config: dict[str, Any]) -> None:
        writer_class = _require(LIBRARIES["tensorboard"], "tensorboard").SummaryWriter
        self.writer = writer_class(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("config", "```json\n" + json.dumps(_plain(config), indent=2) + "\n```")

    def log(self, record: dict[str, Any]) -> None:
        for name, value in scalars(record).items():
            self.writer.add_scalar(name, value, record["step"])

    def finish(self) -> None:
        self.writer.close()


class MLflowTracker:
    """A run in `<run_dir>/mlruns` (or $MLFLOW_TRACKING_URI), logged through MlflowClient; the config as params."""

    def start(self, run_dir: Path, run_name: str, config: dict[str, Any]) -> None:
        mlflow = _require("mlflow", "mlflow")
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if uri is None:
            uri = (run_dir / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.entities = mlflow.entities
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        experiment_name = os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT)
        experiment = self.client.get_experiment_by_name(experiment_name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(experiment_name)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        params = [self.entities.Param(key[:MLFLOW_MAX_KEY], str(value)[:MLFLOW_MAX_VALUE])
                  for key, value in _flatten(_plain(config)).items()]
        self.client.log_batch(self.run_id, params=params)

    def log(self, record: dict[str, Any]) -> None:
        now = int(time.time() * 1000)
        metrics = [self.entities.Metric(name, value, now, record["step"]) for name, value in scalars(record).items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self) -> None:
        self.client.set_terminated(self.run_id)


class TrackioTracker:
    """A run of trackio project `lorakit` in `<run_dir>/trackio` (or $TRACKIO_DIR); the config as the run's config."""

    def start(self, run_dir: Path, run_name: str, config: dict[str, Any]) -> None:
        os.environ.setdefault("TRACKIO_DIR", str((run_dir / "trackio").resolve()))
        trackio = _require("trackio", "trackio")
        self.run = trackio.init(project=PROJECT, name=run_name, config=_plain(config), embed=False)

    def log(self, record: dict[str, Any]) -> None:
        self.run.log(scalars(record), step=record["step"])

    def finish(self) -> None:
        self.run.finish()


class WandbTracker:
    """A W&B run under `<run_dir>/wandb`, offline unless $WANDB_MODE is set; the config as the run's config."""

    def start(self, run_dir: Path, run_name: str, config: dict[str, Any]) -> None:
        wandb = _require("wandb", "wandb")
        mode = None if "WANDB_MODE" in os.environ else "offline"
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT), name=run_name, dir=str(run_dir),
                              config=_plain(config), mode=mode)

    def log(self, record: dict[str, Any]) -> None:
        self.run.log(scalars(record), step=record["step"])

    def finish(self) -> None:
        self.run.finish()


TRACKER_CLASSES: dict[str, type[Tracker]] = {"tensorboard": TensorBoardTracker, "mlflow": MLflowTracker,
                                             "trackio": TrackioTracker, "wandb": WandbTracker}


class Trackers:
    """The run's started trackers; `log` and `finish` go to each of them."""

    def __init__(self, trackers: Iterable[Tracker] = ()) -> None:
        self.trackers = list(trackers)

    def log(self, record: dict[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.log(record)

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()


def open_trackers(names: Iterable[str], run_dir: Path, run_name: str, config: dict[str, Any],
                  enabled: bool = True) -> Trackers:
    """Start the named trackers for a run (none when not `enabled`, i.e. on ranks other than 0).

    A tracker that fails to start (e.g. its library is missing) finishes those already started and raises.
    """
    started = Trackers()
    if not enabled:
        return started
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        tracker = TRACKER_CLASSES[name]()
        try:
            tracker.start(run_dir, run_name, config)
        except BaseException:
            started.finish()
            raise
        started.trackers.append(tracker)
    return started

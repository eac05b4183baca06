"""Training: the options (`config`), data formats and the built-in task (`data`), the run's set-up (`setup`), the
loop (`trainer`), evaluation, metrics, checkpoints and torchrun support (`distributed`)."""

from .config import TrainConfig
from .setup import Datasets, build_optimizer, cosine_with_warmup, load_datasets, prepare_run
from .trainer import Trainer, train

__all__ = ["Datasets", "TrainConfig", "Trainer", "build_optimizer", "cosine_with_warmup", "load_datasets",
           "prepare_run", "train"]

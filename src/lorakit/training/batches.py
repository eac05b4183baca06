"""A resumable, shardable stream of training batches: seeded shuffles per epoch, one slice of every global batch per rank.

Length grouping (as transformers' ``group_by_length``): after the epoch's shuffle, each run of
``GROUP_BATCHES`` global batches is sorted by example length before it is cut into batches, and the order of the
batches is then shuffled again. A batch is padded to its longest example, so batches of similar lengths carry
little padding: the data seen per epoch is the same, its order stays random at the scale of the group.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

from .data import Example

GROUP_BATCHES = 50  # global batches sorted together by length when grouping


class BatchStream:
    """An endless, seeded stream of batches, epoch after epoch, that can save and restore its position.

    Each epoch shuffles the examples with a permutation drawn from ``(seed, epoch)`` and cuts it into global batches
    of ``batch_size * world_size`` (the last partial one is dropped). Rank ``r`` gets slice ``r`` of each global
    batch, so ``world_size`` ranks together see exactly the batches one process with ``batch_size * world_size``
    sees, in the same order. With ``group_by_length`` each global batch holds examples of similar length (see the
    module docstring). ``state_dict()`` records where the next batch comes from; a stream given that state yields
    the same batches from there on.
    """

    def __init__(
        self,
        examples: Sequence[Example],
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        group_by_length: bool = False,
    ) -> None:
        if batch_size < 1 or world_size < 1:
            raise ValueError(f"batch_size and world_size must be positive, got {batch_size} and {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.examples = examples
        self.batch_size = batch_size
        self.global_batch_size = batch_size * world_size
        if len(examples) < self.global_batch_size:
            raise ValueError(
                f"{len(examples)} examples cannot fill one global batch of {self.global_batch_size} "
                f"({batch_size} per rank x {world_size} ranks)"
            )
        self.seed = seed
        self.shuffle = shuffle
        self.group_by_length = group_by_length
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.index = 0  # next global batch within the epoch
        self._order: list[int] | None = None

    @property
    def steps_per_epoch(self) -> int:
        return len(self.examples) // self.global_batch_size

    def __iter__(self) -> Iterator[list[Example]]:
        return self

    def __next__(self) -> list[Example]:
        if self.index >= self.steps_per_epoch:
            self.epoch += 1
            self.index = 0
            self._order = None
        start = self.index * self.global_batch_size + self.rank * self.batch_size
        picked = self._epoch_order()[start : start + self.batch_size]
        self.index += 1
        return [self.examples[i] for i in picked]

    def _epoch_order(self) -> list[int]:
        if self._order is None:
            self._order = list(range(len(self.examples)))
            rng = random.Random(f"lorakit:{self.seed}:{self.epoch}")
            if self.shuffle:
                rng.shuffle(self._order)
            if self.group_by_length:
                self._order = self._grouped(self._order, rng)
        return self._order

    def _grouped(self, order: list[int], rng: random.Random) -> list[int]:
        """`order`'s full global batches regrouped by length: sorted (longest first) within runs of GROUP_BATCHES
        batches, then the batches themselves in a shuffled order (kept when not shuffling)."""
        size = self.global_batch_size
        order = order[: self.steps_per_epoch * size]  # the partial batch is dropped anyway
        group = GROUP_BATCHES * size
        by_length = []
        for start in range(0, len(order), group):
            by_length += sorted(order[start : start + group], key=lambda i: -len(self.examples[i]["input_ids"]))
        batches = [by_length[start : start + size] for start in range(0, len(by_length), size)]
        if self.shuffle:
            rng.shuffle(batches)
        return [i for batch in batches for i in batch]

    def state_dict(self) -> dict[str, int | bool]:
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "index": self.index,
            "shuffle": self.shuffle,
            "group_by_length": self.group_by_length,
            "n_examples": len(self.examples),
            "global_batch_size": self.global_batch_size,
        }

    def load_state_dict(self, state: dict[str, int | bool]) -> None:
        """Resume from `state`; the data and the global batch size must be those it was saved with."""
        for key, mine in (("n_examples", len(self.examples)), ("global_batch_size", self.global_batch_size)):
            if state[key] != mine:
                raise ValueError(f"cannot resume batch stream: saved {key}={state[key]}, this stream has {mine}")
        self.seed = int(state["seed"])
        self.shuffle = bool(state["shuffle"])
        self.group_by_length = bool(state.get("group_by_length", False))  # absent from states saved before grouping
        self.epoch = int(state["epoch"])
        self.index = int(state["index"])
        self._order = None

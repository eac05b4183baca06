"""A Hugging Face safetensors checkpoint, read one tensor at a time.

A checkpoint directory holds either one `model.safetensors` or shards named in `model.safetensors.index.json`
(`{"weight_map": {tensor name: shard file}}`). `Checkpoint(directory)` checks everything that can be checked before a
byte of weight is read: the index is a JSON object naming existing files, every shard's header parses (a truncated or
corrupted file fails here), every tensor the index names is in its shard, and every tensor is stored in a dtype the
loader reads. Each error names the file and the tensor.

`read(name)` opens the shard, takes the one tensor and closes it again. safetensors maps the file and hands out
tensors that share the mapping: the mapping lives exactly as long as the tensor, so once the caller has quantized
it or copied what it keeps, the shard's pages are unmapped and stop counting in the process's resident memory.
Reading a tensor that is only quantized thus copies nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from .files import read_json_object

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# safetensors dtype codes the loader reads: floats for weights, integers and bools for buffers and packed codes.
READABLE_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                   "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                   "BOOL": torch.bool}


@dataclass(frozen=True)
class TensorEntry:
    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * self.dtype.itemsize


class Checkpoint:
    """The tensors of a safetensors checkpoint directory, by name, in file order; nothing is loaded until `read`."""

    def __init__(self, directory: str | os.PathLike[str], weights_file: str | None = None) -> None:
        self.directory = Path(directory)
        self.entries: dict[str, TensorEntry] = {}
        for file, names in _files_and_names(self.directory, weights_file).items():
            self.entries.update(_read_header(file, names))

    def __iter__(self) -> Iterator[TensorEntry]:
        return iter(self.entries.values())

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    @property
    def nbytes(self) -> int:
        return sum(entry.nbytes for entry in self.entries.values())

    def read(self, name: str) -> Tensor:
        """Tensor `name`, a read-only view of the mapped file: copy (or convert) what you keep, drop the rest."""
        entry = self.entries[name]
        try:
            with safe_open(entry.file, framework="pt") as handle:
                return handle.get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as error:
            raise ValueError(f"{entry.file}: cannot read tensor {name} ({error})") from None


def is_checkpoint_dir(directory: str | os.PathLike[str]) -> bool:
    return (Path(directory) / INDEX_FILE).is_file() or (Path(directory) / SINGLE_FILE).is_file()


def _files_and_names(directory: Path, weights_file: str | None) -> dict[Path, list[str] | None]:
    """Shard file -> the tensor names the index gives it (None: every tensor of a single file)."""
    if weights_file is not None or not (directory / INDEX_FILE).is_file():
        file = directory / (weights_file or SINGLE_FILE)
        if not file.is_file():
            pickled = sorted(p.name for p in directory.glob("*.bin"))
            hint = (f" ({', '.join(pickled)} are pickle files, which lorakit never loads; convert them to safetensors)"
                    if pickled else "")
            raise FileNotFoundError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")
        return {file: None}
    index_file = directory / INDEX_FILE
    weight_map = read_json_object(index_file, "sharded checkpoint").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index_file}: expected a non-empty \"weight_map\" object")
    files: dict[Path, list[str] | None] = {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or Path(shard).name != shard:
            raise ValueError(f"{index_file}: tensor {name} names an invalid file {shard!r}")
        file = directory / shard
        if not file.is_file():
            raise FileNotFoundError(f"{index_file}: tensor {name} is in {shard}, which does not exist")
        files.setdefault(file, []).append(name)
    return files


def _read_header(file: Path, names: list[str] | None) -> dict[str, TensorEntry]:
    try:
        with safe_open(file, framework="pt") as handle:
            present = list(handle.keys())
            wanted = present if names is None else names
            missing = sorted(set(wanted) - set(present))
            if missing:
                raise ValueError(f"{file}: the index names tensor {missing[0]}, which this file does not hold")
            entries = {}
            for name in wanted:
                view = handle.get_slice(name)
                code = view.get_dtype()
                if code not in READABLE_DTYPES:
                    raise ValueError(f"{file}: tensor {name} is stored as {code}, which lorakit does not read "
                                     f"(it reads {', '.join(READABLE_DTYPES)})")
                entries[name] = TensorEntry(name, file, READABLE_DTYPES[code], tuple(view.get_shape()))
            return entries
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{file}: corrupted, truncated or not a safetensors file ({error})") from None

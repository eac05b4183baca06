"""Random-init Hugging Face Llama checkpoints of real shapes, written as sharded bf16 safetensors without holding them.

    python benchmarks/big_models.py tinyllama-1.1b /tmp/big/tinyllama-1.1b   # 2.2 GB, 2 shards
    python benchmarks/big_models.py llama2-7b /tmp/big/llama2-7b             # 13.5 GB, 7 shards
    python benchmarks/big_models.py --tiny /tmp/big/tiny                     # 0.4 MB, 4 shards, for tests

Memory benchmarks need checkpoints as big as the real ones (7B is 13.5 GB, more than half of a 24 GiB machine),
but downloading them is slow and often impossible offline, and `save_pretrained` needs the whole model in memory.
So this writes the directory `LlamaForCausalLM.from_pretrained` expects one tensor at a time: each shard's
safetensors header is known from the shapes alone, so it is written first, then each tensor is generated, its bytes
appended and the tensor dropped. Peak memory is one tensor (the 32000-row embedding: 131 MB for TinyLlama, 262 MB
for 7B) on top of the interpreter and transformers (about 480 MB in all for TinyLlama). Tensor order, sharding,
file names, safetensors headers, model.safetensors.index.json and config.json come out byte for byte as
transformers 5's `save_pretrained(max_shard_size=shard_bytes)` writes them (checked on small shapes).

Values: normal(0, 0.02) for matrices and ones for norms, in bfloat16, from a torch.Generator seeded per tensor from
(seed, tensor name), so `generate_tensor` can regenerate any single tensor to check it. A marker file written last
records shape, seed and files; a directory whose marker and file sizes match is left alone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import struct
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

DEFAULT_SHARD_BYTES = 2 * 10**9  # transformers' max_shard_size="2GB"
MARKER_NAME = "big_models_marker.json"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_FILE_NAME = "model.safetensors"
BYTES_PER_VALUE = 2  # bfloat16
INIT_STD = 0.02


@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    max_positions: int
    shard_bytes: int = DEFAULT_SHARD_BYTES  # used when write_model is not given one


SHAPES: dict[str, LlamaShape] = {
    "tinyllama-1.1b": LlamaShape(2048, 5632, 22, 32, 4, 32000, 2048),
    "llama2-7b": LlamaShape(4096, 11008, 32, 32, 32, 32000, 4096),
    "llama2-13b": LlamaShape(5120, 13824, 40, 40, 40, 32000, 4096),
    "tiny": LlamaShape(64, 172, 2, 4, 2, 1000, 128, shard_bytes=100_000),
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * BYTES_PER_VALUE

    @property
    def is_norm(self) -> bool:
        return self.name.endswith("norm.weight")


def llama_config(shape: LlamaShape) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        vocab_size=shape.vocab,
        max_position_embeddings=shape.max_positions,
        rms_norm_eps=1e-5,  # Llama 2 and TinyLlama
        tie_word_embeddings=False,
        dtype=torch.bfloat16,
        architectures=["LlamaForCausalLM"],
    )


def tensor_specs(shape: LlamaShape) -> list[TensorSpec]:
    """Every weight of LlamaForCausalLM, in its state_dict order."""
    hidden, head_dim = shape.hidden, shape.hidden // shape.heads
    kv_width = shape.kv_heads * head_dim
    specs = [TensorSpec("model.embed_tokens.weight", (shape.vocab, hidden))]
    for i in range(shape.layers):
        prefix = f"model.layers.{i}"
        specs += [
            TensorSpec(f"{prefix}.self_attn.q_proj.weight", (hidden, hidden)),
            TensorSpec(f"{prefix}.self_attn.k_proj.weight", (kv_width, hidden)),
            TensorSpec(f"{prefix}.self_attn.v_proj.weight", (kv_width, hidden)),
            TensorSpec(f"{prefix}.self_attn.o_proj.weight", (hidden, hidden)),
            TensorSpec(f"{prefix}.mlp.gate_proj.weight", (shape.intermediate, hidden)),
            TensorSpec(f"{prefix}.mlp.up_proj.weight", (shape.intermediate, hidden)),
            TensorSpec(f"{prefix}.mlp.down_proj.weight", (hidden, shape.intermediate)),
            TensorSpec(f"{prefix}.input_layernorm.weight", (hidden,)),
            TensorSpec(f"{prefix}.post_attention_layernorm.weight", (hidden,)),
        ]
    return specs + [TensorSpec("model.norm.weight", (hidden,)), TensorSpec("lm_head.weight", (shape.vocab, hidden))]


def save_order_key(spec: TensorSpec) -> tuple[tuple[int, int | str], ...]:
    """Order of save_pretrained (transformers 5 sorts names part by part, numbers numerically): lm_head first."""
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in spec.name.split("."))


def check_against_transformers(config: LlamaConfig, specs: list[TensorSpec]) -> None:
    """Raise unless `specs` names exactly LlamaForCausalLM's weights, with their shapes (built on meta: no memory)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    ours = {spec.name: spec.shape for spec in specs}
    if ours != expected:
        wrong = sorted(set(ours.items()) ^ set(expected.items()))
        raise ValueError(f"tensor specs differ from LlamaForCausalLM's state_dict: {wrong[:10]}")


def plan_shards(specs: list[TensorSpec], shard_bytes: int) -> list[list[TensorSpec]]:
    """Group tensors as huggingface_hub's split_torch_state_dict_into_shards does (transformers' save_pretrained)."""
    shards: list[list[TensorSpec]] = []
    current: list[TensorSpec] = []
    current_bytes = 0
    for spec in specs:
        if spec.nbytes > shard_bytes:
            shards.append([spec])
            continue
        if current_bytes + spec.nbytes > shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(spec)
        current_bytes += spec.nbytes
    return shards + [current] if current else shards


def planned_shards(shape_name: str, shard_bytes: int) -> list[list[TensorSpec]]:
    """The shards of `shape_name` as save_pretrained makes them, each in the by-name order safetensors writes."""
    shards = plan_shards(sorted(tensor_specs(SHAPES[shape_name]), key=save_order_key), shard_bytes)
    return [sorted(shard, key=lambda spec: spec.name) for shard in shards]


def shard_file_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILE_NAME]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def safetensors_header(specs: list[TensorSpec]) -> bytes:
    """The 8-byte little-endian length and the space-padded JSON header of a file holding `specs` in order."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        header[spec.name] = {"dtype": "BF16", "shape": list(spec.shape), "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def shard_file_size(specs: list[TensorSpec]) -> int:
    return len(safetensors_header(specs)) + sum(spec.nbytes for spec in specs)


def tensor_seed(seed: int, name: str) -> int:
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # fits torch's int64 seed


def generate_tensor(spec: TensorSpec, seed: int) -> torch.Tensor:
    """The tensor `write_model(..., seed=seed)` writes under spec.name."""
    if spec.is_norm:
        return torch.ones(spec.shape, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(tensor_seed(seed, spec.name))
    return torch.empty(spec.shape, dtype=torch.bfloat16).normal_(0.0, INIT_STD, generator=generator)


def write_shard(path: Path, specs: list[TensorSpec], seed: int) -> None:
    with path.open("wb") as file:
        file.write(safetensors_header(specs))
        for spec in specs:
            tensor = generate_tensor(spec, seed)
            file.write(tensor.reshape(-1).view(torch.uint8).numpy())
            del tensor  # before the next one is generated


def write_index(directory: Path, shards: list[list[TensorSpec]], names: list[str]) -> None:
    """model.safetensors.index.json, byte for byte as transformers' save_pretrained writes it."""
    weight_map = {spec.name: name for shard, name in zip(shards, names) for spec in shard}
    specs = [spec for shard in shards for spec in shard]
    metadata = {
        "total_parameters": sum(math.prod(spec.shape) for spec in specs),
        "total_size": sum(spec.nbytes for spec in specs),
    }
    index = {"metadata": metadata, "weight_map": weight_map}
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def expected_marker(shape_name: str, seed: int, shard_bytes: int) -> dict[str, object]:
    shards = planned_shards(shape_name, shard_bytes)
    files = {name: shard_file_size(shard) for shard, name in zip(shards, shard_file_names(len(shards)))}
    return {
        "shape_name": shape_name,
        **asdict(SHAPES[shape_name]),
        "seed": seed,
        "shard_bytes": shard_bytes,
        "files": files,
    }


def resolve_shard_bytes(shape_name: str, shard_bytes: int | None) -> int:
    return SHAPES[shape_name].shard_bytes if shard_bytes is None else shard_bytes


def model_is_complete(shape_name: str, directory: Path, seed: int = 0, shard_bytes: int | None = None) -> bool:
    """Whether `directory` holds what write_model would write: same marker and every shard at its full size."""
    marker = expected_marker(shape_name, seed, resolve_shard_bytes(shape_name, shard_bytes))
    marker_path = directory / MARKER_NAME
    if not marker_path.is_file() or json.loads(marker_path.read_text()) != marker:
        return False
    files: dict[str, int] = marker["files"]  # type: ignore[assignment]
    return all(
        (directory / name).is_file() and (directory / name).stat().st_size == size for name, size in files.items()
    )


def remove_previous_weights(directory: Path) -> None:
    """Drop the marker and any earlier weights, so a shard count that changed leaves no stale files behind."""
    for path in [directory / MARKER_NAME, directory / INDEX_NAME, directory / SINGLE_FILE_NAME]:
        path.unlink(missing_ok=True)
    for path in directory.glob("model-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9].safetensors"):
        path.unlink()


def write_model(shape_name: str, directory: Path, seed: int = 0, shard_bytes: int | None = None) -> Path:
    """Write the `shape_name` checkpoint into `directory` (skipped if already complete); return the directory.

    shard_bytes: the most bytes of tensor data per shard file; default the shape's own (2 GB, 100 kB for "tiny").
    """
    directory = Path(directory)
    shard_bytes = resolve_shard_bytes(shape_name, shard_bytes)
    if model_is_complete(shape_name, directory, seed, shard_bytes):
        save_tokenizer(directory)
        return directory
    config = llama_config(SHAPES[shape_name])
    check_against_transformers(config, tensor_specs(SHAPES[shape_name]))
    directory.mkdir(parents=True, exist_ok=True)
    remove_previous_weights(directory)
    config.save_pretrained(directory)
    shards = planned_shards(shape_name, shard_bytes)
    names = shard_file_names(len(shards))
    for shard, name in zip(shards, names):
        write_shard(directory / name, shard, seed)
    if len(shards) > 1:
        write_index(directory, shards, names)
    marker = expected_marker(shape_name, seed, shard_bytes)
    (directory / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    save_tokenizer(directory)
    return directory


def save_tokenizer(directory: Path) -> None:
    """lorakit's byte tokenizer (ids 0-258, within every shape's vocabulary), so the directory is a whole model."""
    if not (directory / "tokenizer.json").is_file():
        from lorakit.models import byte_tokenizer

        byte_tokenizer().save_pretrained(directory)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape", nargs="?", choices=sorted(SHAPES), help="model shape (or --tiny)")
    parser.add_argument("directory", type=Path)
    parser.add_argument("--tiny", action="store_true", help='the "tiny" shape, for tests')
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-bytes", type=int, default=None, help="default: the shape's own")
    args = parser.parse_args(argv)
    if args.tiny == (args.shape is not None):
        parser.error("give exactly one of a shape and --tiny")
    args.shape = args.shape or "tiny"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if model_is_complete(args.shape, args.directory, args.seed, args.shard_bytes):
        save_tokenizer(args.directory)
        print(f"{args.directory}: {args.shape} already complete")
        return
    start = time.perf_counter()
    write_model(args.shape, args.directory, args.seed, args.shard_bytes)
    print(f"{args.directory}: wrote {args.shape} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()

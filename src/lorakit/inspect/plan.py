"""`lorakit inspect plan`: arithmetic from a model's dimensions alone (a named Llama shape, a built-in model or a local
model directory, of which only config.json is read; nothing is built):
- trainable parameters per targeted layer W [out, in]: LoRA r·(in + out) (Hu et al. 2021), DoRA r·(in + out) + out
  (Liu et al. 2024), VeRA out + r (λ_b, λ_d; Kopiczko et al. 2024, §3.1); the VeRA file also holds the shared
  A_s [r, max_in] and B_s [max_out, r] (PEFT's default save_projection=True).
- base weights: 16 bits per weight; NF4 (Dettmers et al. 2023, §3) 4 bits plus one float32 absmax per block of 64,
  4 + 32/64 = 4.5 bits; with double quantization the absmax values are stored as 8-bit codes with one float32 scale per
  256 of them: 4 + 8/64 + 32/(64·256) ≈ 4.127 bits. Only the decoder blocks' linear layers are quantized (embeddings
  and lm_head stay dense, as lorakit's `quantize` does).
- the planned run (`quantize`, `dtype`): its linear layers in NF4 (+DQ) or `dtype`, every other tensor in `dtype`
  ("auto" resolved as `load_model` resolves it); at the peak the streaming loader's one tensor in flight is gone, but
  a dequantized copy of the largest NF4 weight (compute dtype) lives in each forward and backward.
- training: 16 bytes per trainable parameter (float32 adapter weights, which are the fp32 master copy, their float32
  gradients, AdamW's two float32 moments) and a rough activation term: 34·b·s·h bytes per decoder layer of 16-bit
  activations with SDPA attention (Korthikanti et al. 2022, eq. 1 without the attention-matrix term), or only
  each layer's input (2·b·s·h) plus one layer's worth with gradient checkpointing, twice that in a 32-bit compute
  dtype; plus float32 logits and their gradient (8·b·s·vocab). GB here are 10⁹ bytes. The prediction leaves out the
  Python/torch/transformers runtime itself (≈ 0.3-0.4 GB measured), which does not grow with the model.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

GB = 1e9
METHODS = ("lora", "dora", "vera")
LLAMA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NF4_BLOCK, DQ_BLOCK = 64, 256
ADAPTER_BYTES = 4  # float32 adapter weights
TRAIN_BYTES_PER_PARAM = 16  # fp32 weight (master) + fp32 gradient + two fp32 AdamW moments
ACTIVATION_BYTES_PER_HIDDEN = 34  # per token and hidden unit and layer, 16-bit (Korthikanti et al. 2022)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
@dataclass(frozen=True)
class ModelShape:
    """A Llama-style decoder described by its dimensions only."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int | None = None  # None: as many as heads (no grouped-query attention)
    vocab: int = 32000
    head_dim: int | None = None  # None: hidden // heads
    tied_embeddings: bool = False

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out, in) of each linear layer of one decoder block."""
        h, i = self.hidden, self.intermediate
        head_dim = self.head_dim or h // self.heads
        q, kv = self.heads * head_dim, (self.kv_heads or self.heads) * head_dim
        shapes = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
                  "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
        return {name: shapes[name] for name in LLAMA_MODULES}

    @property
    def linear_parameters(self) -> int:
        """Weights of the decoder blocks' linear layers (the ones NF4 quantizes)."""
        return self.layers * sum(o * i for o, i in self.linear_shapes().values())

    @property
    def parameters(self) -> int:
        """All parameters: blocks, two RMSNorms per block and a final one, embeddings, lm_head unless tied."""
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return self.linear_parameters + (2 * self.layers + 1) * self.hidden + embeddings


SHAPES: dict[str, ModelShape] = {
    "llama-7b": ModelShape("llama-7b", layers=32, hidden=4096, intermediate=11008, heads=32),
    "llama-13b": ModelShape("llama-13b", layers=40, hidden=5120, intermediate=13824, heads=40),
    "llama-70b": ModelShape("llama-70b", layers=80, hidden=8192, intermediate=28672, heads=64, kv_heads=8),
}


def shape_from_config(directory: str | os.PathLike[str]) -> ModelShape:
    """Read the dimensions of a Llama-style model from `directory`/config.json (nothing else is read)."""
    file = Path(directory) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: not a Hugging Face model directory")
    data = json.loads(file.read_text())
    keys = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")
    missing = [key for key in keys if key not in data]
    if missing:
        raise ValueError(f"{file}: not a Llama-style config (model_type {data.get('model_type')!r}, "
                         f"missing {missing}); plan reads Llama-style decoders (Llama, Mistral, Qwen2, SmolLM)")
    return ModelShape(
        name=Path(directory).name, layers=data["num_hidden_layers"], hidden=data["hidden_size"],
        intermediate=data["intermediate_size"], heads=data["num_attention_heads"],
        kv_heads=data.get("num_key_value_heads"), vocab=data["vocab_size"], head_dim=data.get("head_dim"),
        tied_embeddings=bool(data.get("tie_word_embeddings", False)),
    )


def resolve_shape(shape: str | os.PathLike[str] | ModelShape) -> ModelShape:
    """A ModelShape from itself, a named shape, a local model directory or a built-in model name."""
    if isinstance(shape, ModelShape):
        return shape
    text = os.fspath(shape)
    if text in SHAPES:
        return SHAPES[text]
    if Path(text).is_dir():
        return shape_from_config(text)
    from ..models.builtin import BUILTIN_MODELS, ensure_builtin

    if text in BUILTIN_MODELS:
        return dataclasses.replace(shape_from_config(ensure_builtin(text)), name=text)
    raise ValueError(f"unknown shape {text!r}: use one of {sorted(SHAPES)}, a built-in model "
                     f"({', '.join(sorted(BUILTIN_MODELS))}) or a local model directory")


def scale_overhead_bits(double_quant: bool) -> float:
    """Bits per weight spent on NF4's block scales: 32/64 = 0.5, or 8/64 + 32/(64·256) ≈ 0.127 double-quantized."""
    if double_quant:
        return 8 / NF4_BLOCK + 32 / (NF4_BLOCK * DQ_BLOCK)
    return 32 / NF4_BLOCK


def base_weight_bytes(shape: ModelShape) -> dict[str, float]:
    """Base model weights in bytes at 16 bits, NF4 and NF4 with double quantization."""
    dense = shape.parameters - shape.linear_parameters  # embeddings, norms, lm_head stay 16-bit
    return {
        "16-bit": 2.0 * shape.parameters,
        "NF4": shape.linear_parameters * (4 + scale_overhead_bits(False)) / 8 + 2.0 * dense,
        "NF4+DQ": shape.linear_parameters * (4 + scale_overhead_bits(True)) / 8 + 2.0 * dense,
    }


def trainable_count(method: str, r: int, shapes: Iterable[tuple[int, int]]) -> int:
    """Trainable parameters of `method` at rank r over layers of the given (out, in) shapes."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    per_layer: dict[str, Callable[[int, int], int]] = {
        "lora": lambda out, inp: r * (inp + out),
        "dora": lambda out, inp: r * (inp + out) + out,
        "vera": lambda out, inp: out + r,
    }
    return sum(per_layer[method](out, inp) for out, inp in shapes)


@dataclass(frozen=True)
class RunMemory:
    """The planned run's own base: its linear layers quantized or not, the rest in `dtype`."""

    quantize: str | None
    dtype: str
    weights: float  # bytes of the frozen base as this run holds it
    transient: float  # a dequantized copy of the largest NF4 weight in forward/backward (0 for a dense base)


@dataclass(frozen=True)
class Plan:
    shape: ModelShape
    method: str
    r: int
    targets: tuple[str, ...]
    trainable: int
    adapter_file_bytes: int  # float32 adapter tensors (VeRA: with the shared projections)
    base_bytes: dict[str, float]
    activation_bytes: float
    batch: int
    seq: int
    gradient_checkpointing: bool
    run: RunMemory

    @property
    def training_state_bytes(self) -> int:
        return TRAIN_BYTES_PER_PARAM * self.trainable

    def training_peak(self, base: str) -> float:
        return self.base_bytes[base] + self.training_state_bytes + self.activation_bytes

    @property
    def run_peak(self) -> float:
        """The planned run's peak: its base, the adapters' training state, activations and the transient copy."""
        return self.run.weights + self.training_state_bytes + self.activation_bytes + self.run.transient


def plan(
    shape: str | os.PathLike[str] | ModelShape,
    method: str = "lora",
    r: int = 8,
    targets: Sequence[str] | str = ("q_proj", "v_proj"),
    batch: int = 1,
    seq: int = 512,
    gradient_checkpointing: bool = True,
    quantize: str | None = None,
    dtype: str = "auto",
    double_quant: bool = True,
) -> Plan:
    """Parameter and memory arithmetic for adapting `shape` (see the module docstring for every formula)."""
    model = resolve_shape(shape)
    chosen = _targets(targets)
    if r <= 0:
        raise ValueError(f"r must be positive, got {r}")
    layer_shapes = [model.linear_shapes()[name] for name in chosen] * model.layers
    trainable = trainable_count(method, r, layer_shapes)
    file_params = trainable
    if method == "vera":
        file_params += r * max(i for _, i in layer_shapes) + r * max(o for o, _ in layer_shapes)
    run = _run_memory(model, quantize, dtype, double_quant)
    return Plan(
        shape=model, method=method, r=r, targets=chosen, trainable=trainable,
        adapter_file_bytes=ADAPTER_BYTES * file_params, base_bytes=base_weight_bytes(model),
        activation_bytes=_activation_bytes(model, batch, seq, gradient_checkpointing) * DTYPE_BYTES[run.dtype] / 2,
        batch=batch, seq=seq, gradient_checkpointing=gradient_checkpointing, run=run,
    )


def _run_memory(shape: ModelShape, quantize: str | None, dtype: str, double_quant: bool) -> RunMemory:
    if quantize not in (None, "nf4"):
        raise ValueError(f"quantize={quantize!r}: plan knows 'nf4' or a dense base")
    if dtype == "auto":
        from ..models.load import resolve_dtype

        dtype = str(resolve_dtype("auto")).removeprefix("torch.")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r}: choose one of auto, {', '.join(DTYPE_BYTES)}")
    size = DTYPE_BYTES[dtype]
    dense = shape.parameters - shape.linear_parameters
    if quantize is None:
        return RunMemory(None, dtype, size * shape.parameters, 0.0)
    nf4 = shape.linear_parameters * (4 + scale_overhead_bits(double_quant)) / 8
    largest = max(out * inp for out, inp in shape.linear_shapes().values())
    return RunMemory(quantize, dtype, nf4 + size * dense, 2.0 * size * largest)


def _targets(targets: Sequence[str] | str) -> tuple[str, ...]:
    if targets == "all-linear":
        return LLAMA_MODULES
    names = tuple(t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets) if t.strip())
    unknown = [t for t in names if t not in LLAMA_MODULES]
    if unknown or not names:
        raise ValueError(f"unknown target(s) {unknown or names}; choose from {LLAMA_MODULES} or 'all-linear'")
    return names


def _activation_bytes(shape: ModelShape, batch: int, seq: int, checkpointing: bool) -> float:
    tokens_hidden = batch * seq * shape.hidden
    one_layer = ACTIVATION_BYTES_PER_HIDDEN * tokens_hidden
    blocks = shape.layers * 2 * tokens_hidden + one_layer if checkpointing else shape.layers * one_layer
    return blocks + 8.0 * batch * seq * shape.vocab


def format_plan(result: Plan) -> str:
    s = result.shape
    model = (f"{s.name}: {s.layers} layers, hidden {s.hidden}, intermediate {s.intermediate}, "
             f"{s.parameters / 1e9:.2f}B parameters ({s.linear_parameters / 1e9:.2f}B in quantizable linear layers)")
    projections = " (with the shared projections)" if result.method == "vera" else ""
    adapter = (f"{result.method} r={result.r} on {','.join(result.targets)}: {result.trainable:,} trainable "
               f"parameters ({100 * result.trainable / s.parameters:.4f}%), "
               f"adapter file {_size(result.adapter_file_bytes)}{projections}")
    overhead = (f"NF4 scale overhead: {scale_overhead_bits(False):.3f} bits/weight, "
                f"double-quantized {scale_overhead_bits(True):.3f} bits/weight")
    checkpointing = "with" if result.gradient_checkpointing else "no"
    training = (f"training state (fp32 weights + gradients + AdamW moments, {TRAIN_BYTES_PER_PARAM} B/param): "
                f"{_size(result.training_state_bytes)}; activations (batch {result.batch} x {result.seq} tokens, "
                f"{checkpointing} gradient checkpointing, rough): {_size(result.activation_bytes)}")
    table = ["| base | weights | training peak (rough) |", "|---|---|---|"]
    table += [f"| {base} | {_size(size)} | {_size(result.training_peak(base))} |"
              for base, size in result.base_bytes.items()]
    run = result.run
    base = f"NF4 linear layers, the rest in {run.dtype}" if run.quantize else f"every weight in {run.dtype}"
    planned = (f"this run ({base}): weights {_size(run.weights)}, peak {_size(result.run_peak)} "
               f"(weights + training state + activations{' + one dequantized weight' if run.quantize else ''}; "
               "add the Python/torch runtime, ≈ 0.3-0.4 GB)")
    return "\n".join([model, adapter, overhead, training, planned, "", *table])


def _size(n: float) -> str:
    for unit, factor in (("GB", GB), ("MB", 1e6), ("KB", 1e3)):
        if n >= factor:
            return f"{n / factor:.2f} {unit}"
    return f"{n:.0f} B"

"""`lorakit inspect`: plan an adapter before training, and look inside one after.

**plan** — arithmetic from a model's dimensions alone (a named Llama shape or a local config.json; nothing is built):
- trainable parameters per targeted layer W [out, in]: LoRA r·(in + out) (Hu et al. 2021), DoRA r·(in + out) + out
  (Liu et al. 2024), VeRA out + r (λ_b, λ_d; Kopiczko et al. 2024, §3.1); the VeRA file also holds the shared
  A_s [r, max_in] and B_s [max_out, r] (PEFT's default save_projection=True).
- base weights: 16 bits per weight; NF4 (Dettmers et al. 2023, §3) 4 bits plus one float32 absmax per block of 64,
  4 + 32/64 = 4.5 bits; with double quantization the absmax values are stored as 8-bit codes with one float32 scale per
  256 of them: 4 + 8/64 + 32/(64·256) ≈ 4.127 bits. Only the decoder blocks' linear layers are quantized (embeddings
  and lm_head stay 16-bit, as lorakit's `quantize` does).
- training: 16 bytes per trainable parameter (float32 adapter weights, which are the fp32 master copy, their float32
  gradients, AdamW's two float32 moments) and a rough activation term: 34·b·s·h bytes per decoder layer of 16-bit
  activations with SDPA attention (Korthikanti et al. 2022, eq. 1 without the attention-matrix term), or only
  each layer's input (2·b·s·h) plus one layer's worth with gradient checkpointing; plus float32 logits and their
  gradient (8·b·s·vocab). GB here are 10⁹ bytes.

**adapter** — per adapted layer, from the saved files (and the base model when given):
‖s·ΔW‖_F; the singular values of s·ΔW (exact, from the factors, never a dense SVD); two effective ranks: the
entropy rank exp(H(p)), p_k = σ_k/Σσ (Roy & Vetterli 2007), and the count of σ_k above 1% of σ_max. With the base
weights W, the DoRA paper's view (Liu et al. 2024, §3): W' is the adapted weight (W + sΔW, or (m/‖W + sΔW‖)·(W + sΔW)
for DoRA); magnitude change = ‖ ‖W'_i‖ − ‖W_i‖ ‖₂ over output rows i (for DoRA ‖m − ‖W‖‖), direction change
= mean_i (1 − cos(W'_i, W_i)) (a negative DoRA m_i flips W'_i and counts as a direction change).

**keys** — LoRA read as a key–value memory: s·B·A·x = Σ_i s·b_i·(a_i·x), rank component i has key a_i (row i of A)
and value b_i (column i of B). For each token t and component i the table and heat map show the write
s·‖b_i‖·|a_i·x_t|; the signed terms s·b_i·(a_i·x_t) sum back exactly to the layer's update. For DoRA this is the
low-rank term before the m/n rescale; for VeRA a_i and b_i are the rows and columns of diag(λ_d)·A_s and diag(λ_b)·B_s.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .combine import factored_svd
from .config import AdapterConfig, VeraConfig
from .layer import AdaptedLinear
from .model import adapted_layers
from .peft_format import PREFIX, load_adapter, read_adapter_config, read_adapter_tensors

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from transformers import PreTrainedTokenizerBase

GB = 1e9
METHODS = ("lora", "dora", "vera")
LLAMA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NF4_BLOCK, DQ_BLOCK = 64, 256
ADAPTER_BYTES = 4  # float32 adapter weights
TRAIN_BYTES_PER_PARAM = 16  # fp32 weight (master) + fp32 gradient + two fp32 AdamW moments
ACTIVATION_BYTES_PER_HIDDEN = 34  # per token and hidden unit and layer, 16-bit (Korthikanti et al. 2022)
DEFAULT_PNG_LAYERS = 6
INSPECT_ADAPTER = "inspect"

# Plan ------------------------------------------------------------------------------------------------------------


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
    """A ModelShape from itself, a known name or a local model directory."""
    if isinstance(shape, ModelShape):
        return shape
    text = os.fspath(shape)
    if text in SHAPES:
        return SHAPES[text]
    if Path(text).is_dir():
        return shape_from_config(text)
    raise ValueError(f"unknown shape {text!r}: use one of {sorted(SHAPES)} or a local model directory")


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

    @property
    def training_state_bytes(self) -> int:
        return TRAIN_BYTES_PER_PARAM * self.trainable

    def training_peak(self, base: str) -> float:
        return self.base_bytes[base] + self.training_state_bytes + self.activation_bytes


def plan(
    shape: str | os.PathLike[str] | ModelShape,
    method: str = "lora",
    r: int = 8,
    targets: Sequence[str] | str = ("q_proj", "v_proj"),
    batch: int = 1,
    seq: int = 512,
    gradient_checkpointing: bool = True,
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
    return Plan(
        shape=model, method=method, r=r, targets=chosen, trainable=trainable,
        adapter_file_bytes=ADAPTER_BYTES * file_params, base_bytes=base_weight_bytes(model),
        activation_bytes=_activation_bytes(model, batch, seq, gradient_checkpointing),
        batch=batch, seq=seq, gradient_checkpointing=gradient_checkpointing,
    )


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
    return "\n".join([model, adapter, overhead, training, "", *table])


def _size(n: float) -> str:
    for unit, factor in (("GB", GB), ("MB", 1e6), ("KB", 1e3)):
        if n >= factor:
            return f"{n / factor:.2f} {unit}"
    return f"{n:.0f} B"


# Spectra ---------------------------------------------------------------------------------------------------------


def singular_values(down: Tensor, up: Tensor, scale: float = 1.0) -> Tensor:
    """σ of scale·up·down (down [r, in], up [out, r]) in float64, descending, r of them at most."""
    _, sigma, _ = factored_svd(down.detach().double(), up.detach().double())
    return sigma * abs(scale)


def effective_rank(sigma: Tensor) -> float:
    """Roy & Vetterli (2007): exp of the entropy of p_k = σ_k / Σσ; 0 for a zero update."""
    total = sigma.sum()
    if total <= 0:
        return 0.0
    p = sigma[sigma > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def rank_above(sigma: Tensor, fraction: float = 0.01) -> int:
    """How many singular values exceed `fraction` of the largest."""
    if sigma.numel() == 0 or sigma[0] <= 0:
        return 0
    return int((sigma > fraction * sigma[0]).sum())


# Adapter analysis ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerAnalysis:
    path: str
    r: int
    delta_norm: float  # ‖s·ΔW‖_F
    singular_values: Tensor  # of s·ΔW, descending
    magnitude_change: float | None = None  # ‖ ‖W'_i‖ − ‖W_i‖ ‖₂; needs the base weights
    direction_change: float | None = None  # mean_i 1 − cos(W'_i, W_i); needs the base weights

    @property
    def effective_rank(self) -> float:
        return effective_rank(self.singular_values)

    @property
    def rank_above_1pct(self) -> int:
        return rank_above(self.singular_values)


@dataclass(frozen=True)
class _BaseView:
    """A layer's base weight W, adapted weight W' (both [out, in], float64) and the magnitudes of W' per row."""

    weight: Tensor
    adapted: Tensor
    magnitude: Tensor  # [out]: ‖W'_i‖, or DoRA's (signed) m_i


def _layer_analysis(path: str, down: Tensor, up: Tensor, scale: float, base: _BaseView | None) -> LayerAnalysis:
    sigma = singular_values(down, up, scale)
    magnitude = direction = None
    if base is not None:
        magnitude = float((base.magnitude - base.weight.norm(dim=1)).norm())
        direction = float((1 - torch.cosine_similarity(base.adapted, base.weight, dim=1)).mean())
    return LayerAnalysis(path, down.shape[0], float(sigma.norm()), sigma, magnitude, direction)


def _base_view(layer: AdaptedLinear, name: str) -> _BaseView:
    """W and W' = W + s·ΔW, or (m/‖W + s·ΔW‖)·(W + s·ΔW) for DoRA, written out directly."""
    adapter = layer.adapters[name]
    weight = layer.weight.detach().double()  # [out, in]
    adapted = weight + adapter.delta_weight().detach().double()
    if not adapter.use_dora:
        return _BaseView(weight, adapted, adapted.norm(dim=1))
    magnitude = adapter.lora_magnitude_vector.detach().double()
    return _BaseView(weight, (magnitude / adapted.norm(dim=1))[:, None] * adapted, magnitude)


def analyze_model(model: nn.Module, adapter_name: str = "default") -> list[LayerAnalysis]:
    """Per-layer analysis of adapter `adapter_name` in `model`, with the base weights (magnitude/direction change)."""
    rows = []
    for path, layer in adapted_layers(model):
        if adapter_name in layer.adapters:
            adapter = layer.adapters[adapter_name]
            down, up = adapter.delta.factors()
            rows.append(_layer_analysis(path, down, up, adapter.scaling, _base_view(layer, adapter_name)))
    if not rows:
        raise ValueError(f"adapter {adapter_name!r} adapts no layer of {type(model).__name__}")
    return rows


def analyze_adapter(directory: str | os.PathLike[str], model: str | os.PathLike[str] | None = None
                    ) -> list[LayerAnalysis]:
    """Analyse the PEFT adapter in `directory`; with `model` (name or path), also against its base weights.

    Without a model, LoRA and DoRA are read from the files alone (no magnitude/direction change); VeRA needs the model
    because its files do not record each layer's input size.
    """
    config = read_adapter_config(directory)
    if model is not None:
        from .models import load_model

        base, _ = load_model(model)
        load_adapter(base, directory, INSPECT_ADAPTER)
        return analyze_model(base, INSPECT_ADAPTER)
    if isinstance(config, VeraConfig):
        raise ValueError(f"{directory}: analysing a VeRA adapter needs the base model (--model): "
                         "its files do not record each layer's input size")
    return _analyze_lora_files(config, read_adapter_tensors(directory))


def _analyze_lora_files(config: AdapterConfig, tensors: dict[str, Tensor]) -> list[LayerAnalysis]:
    suffix = ".lora_A.weight"
    paths = sorted(key[len(PREFIX): -len(suffix)] for key in tensors if key.endswith(suffix))
    if not paths:
        raise ValueError("the adapter file holds no lora_A/lora_B tensors")
    rows = []
    for path in paths:
        down = tensors[f"{PREFIX}{path}.lora_A.weight"]
        up = tensors.get(f"{PREFIX}{path}.lora_B.weight")
        if up is None:
            raise ValueError(f"the adapter file has {path}.lora_A but no {path}.lora_B")
        rows.append(_layer_analysis(path, down, up, config.scaling_for(path), None))
    return rows


def format_analysis(rows: Sequence[LayerAnalysis]) -> str:
    """A markdown table, one row per layer."""
    lines = ["| layer | r | ‖s·ΔW‖_F | σ_max | eff. rank (entropy) | rank > 1% σ_max | magnitude Δ | direction Δ |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        sigma_max = float(row.singular_values[0]) if row.singular_values.numel() else 0.0
        lines.append(
            f"| {row.path} | {row.r} | {row.delta_norm:.4g} | {sigma_max:.4g} | {row.effective_rank:.2f} | "
            f"{row.rank_above_1pct} | {_maybe(row.magnitude_change)} | {_maybe(row.direction_change)} |"
        )
    return "\n".join(lines)


def _maybe(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _figure(width: float, height: float) -> Figure:
    """A figure drawn by the Agg canvas: no pyplot, no display, no global backend change."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def plot_analysis(rows: Sequence[LayerAnalysis], png: str | os.PathLike[str]) -> Path:
    """Spectra of every layer (normalised by σ_max), ‖s·ΔW‖_F per layer and, with base weights, ΔD against ΔM."""
    with_base = rows[0].magnitude_change is not None
    figure = _figure(15 if with_base else 10, 4.5)
    axes = figure.subplots(1, 3 if with_base else 2)
    for row in rows:
        if row.singular_values.numel() and row.singular_values[0] > 0:
            axes[0].semilogy(range(1, row.singular_values.numel() + 1),
                             (row.singular_values / row.singular_values[0]).numpy(), alpha=0.5)
    axes[0].set(title="singular values of s·ΔW / σ_max", xlabel="index", ylabel="σ_k / σ_max")
    axes[1].bar(range(len(rows)), [row.delta_norm for row in rows])
    axes[1].set(title="‖s·ΔW‖_F per layer", xlabel="layer (table order)", ylabel="Frobenius norm")
    if with_base:
        axes[2].scatter([row.direction_change for row in rows], [row.magnitude_change for row in rows])
        axes[2].set(title="direction vs magnitude change", xlabel="mean 1 − cos(W', W)",
                    ylabel="‖ ‖W'‖ − ‖W‖ ‖")
    return _save(figure, png)


def _save(figure: Figure, png: str | os.PathLike[str]) -> Path:
    path = Path(png)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path


# Key-value view --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyValueMap:
    """One layer's rank components on one text: activations a_i·x_t, value norms ‖b_i‖ and the scaling."""

    path: str
    tokens: list[str]
    activations: Tensor  # [T, r] a_i·x_t (signed), float64
    values: Tensor  # [out, r] b_i as columns, float64
    scaling: float

    @property
    def contributions(self) -> Tensor:
        """[T, r] how much component i writes at token t: s·‖b_i‖·|a_i·x_t|."""
        return abs(self.scaling) * self.activations.abs() * self.values.norm(dim=0)

    def update(self) -> Tensor:
        """[T, out] Σ_i s·b_i·(a_i·x_t): the layer's low-rank update, recomposed from its components."""
        return self.scaling * self.activations @ self.values.T


def key_value_maps(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, text: str, adapter_name: str | None = None
) -> list[KeyValueMap]:
    """Run `text` through `model` and read every adapted layer's rank components (forward hooks on the inputs).

    `adapter_name` defaults to the first active adapter of the first adapted layer.
    """
    layers = dict(adapted_layers(model))
    if not layers:
        raise ValueError("the model has no adapters")
    name = adapter_name or next((layer.active[0] for layer in layers.values() if layer.active), None)
    if name is None or not any(name in layer.adapters for layer in layers.values()):
        raise ValueError(f"adapter {name!r} is not in the model")
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:1]  # [1, T]
    if ids.shape[1] == 0:
        raise ValueError("the text gives no tokens")
    inputs: dict[str, Tensor] = {}
    hooks = [layer.register_forward_hook(_capture(path, inputs)) for path, layer in layers.items()
             if name in layer.adapters]
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for hook in hooks:
            hook.remove()
    tokens = [tokenizer.decode([int(i)]) for i in ids[0]]
    return [_key_value_map(path, layers[path].adapters[name], x, tokens) for path, x in inputs.items()]


def _capture(path: str, store: dict[str, Tensor]) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        store[path] = args[0].detach()[0]  # [T, in]: the first (only) sample

    return hook


def _key_value_map(path: str, adapter: nn.Module, x: Tensor, tokens: list[str]) -> KeyValueMap:
    down, up = (t.detach().double() for t in adapter.delta.factors())  # [r, in], [out, r]
    return KeyValueMap(path, tokens, x.double() @ down.T, up, adapter.scaling)


def format_key_values(maps: Sequence[KeyValueMap], top: int = 3) -> str:
    """Per layer, the `top` components that write most in total, and the tokens where each writes most."""
    lines = ["| layer | component | total write | top tokens@position (write) |", "|---|---|---|---|"]
    for kv in maps:
        writes = kv.contributions  # [T, r]
        totals = writes.sum(0)  # [r]
        for i in totals.argsort(descending=True)[:top].tolist():
            best = writes[:, i].argsort(descending=True)[:top].tolist()
            shown = ", ".join(f"{kv.tokens[t]!r}@{t} ({writes[t, i]:.3g})" for t in best)
            lines.append(f"| {kv.path} | {i} | {totals[i]:.4g} | {shown} |")
    return "\n".join(lines)


def plot_key_values(maps: Sequence[KeyValueMap], png: str | os.PathLike[str], layers: int = DEFAULT_PNG_LAYERS
                    ) -> Path:
    """Heat maps (components × tokens) of the `layers` layers that write most in total."""
    chosen = sorted(maps, key=lambda kv: -float(kv.contributions.sum()))[:layers]
    tokens = chosen[0].tokens
    figure = _figure(max(6.0, 0.35 * len(tokens) + 2), 2.2 * len(chosen) + 0.5)
    axes = figure.subplots(len(chosen), 1, squeeze=False)[:, 0]
    for axis, kv in zip(axes, chosen):
        image = axis.imshow(kv.contributions.T.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
        axis.set(title=kv.path, ylabel="component")
        axis.set_xticks(range(len(tokens)), [repr(t)[1:-1] for t in tokens], rotation=90, fontsize=7)
        figure.colorbar(image, ax=axis, label="s·‖b_i‖·|a_i·x|")
    return _save(figure, png)


# Command line ----------------------------------------------------------------------------------------------------


def register_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `inspect` with modes plan / adapter / keys; each mode sets `func(args) -> int` on the namespace."""
    parser = subparsers.add_parser("inspect", help="plan an adapter's size and memory, or look inside a saved one")
    modes = parser.add_subparsers(dest="inspect_mode", required=True)

    p = modes.add_parser("plan", help="parameters, file size and memory from a model's dimensions")
    p.add_argument("--shape", required=True, help=f"one of {sorted(SHAPES)} or a local model directory")
    p.add_argument("--method", choices=METHODS, default="lora")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--targets", default="q_proj,v_proj", help="comma-separated module names or 'all-linear'")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--no-gradient-checkpointing", dest="checkpointing", action="store_false")
    p.set_defaults(func=_cmd_plan)

    a = modes.add_parser("adapter", help="per-layer norms, spectra and effective ranks of a saved adapter")
    a.add_argument("directory")
    a.add_argument("--model", help="base model (name or directory): adds magnitude/direction change, needed for VeRA")
    a.add_argument("--png", help="write a figure here")
    a.set_defaults(func=_cmd_adapter)

    k = modes.add_parser("keys", help="which rank components fire on which tokens of a text")
    k.add_argument("directory")
    k.add_argument("--model", required=True, help="base model (name or directory)")
    k.add_argument("--text", required=True)
    k.add_argument("--top", type=int, default=3, help="components and tokens shown per layer")
    k.add_argument("--png", help="write a heat map here")
    k.add_argument("--layers", type=int, default=DEFAULT_PNG_LAYERS, help="layers in the heat map")
    k.set_defaults(func=_cmd_keys)
    return parser


def _cmd_plan(args: argparse.Namespace) -> int:
    print(format_plan(plan(args.shape, args.method, args.r, args.targets, args.batch, args.seq, args.checkpointing)))
    return 0


def _cmd_adapter(args: argparse.Namespace) -> int:
    rows = analyze_adapter(args.directory, args.model)
    print(format_analysis(rows))
    if args.png:
        print(f"wrote {plot_analysis(rows, args.png)}")
    return 0


def _cmd_keys(args: argparse.Namespace) -> int:
    from .models import load_model

    read_adapter_config(args.directory)  # a missing adapter fails before the model loads
    model, tokenizer = load_model(args.model)
    load_adapter(model, args.directory, INSPECT_ADAPTER)
    maps = key_value_maps(model, tokenizer, args.text, INSPECT_ADAPTER)
    print(format_key_values(maps, args.top))
    if args.png:
        print(f"wrote {plot_key_values(maps, args.png, args.layers)}")
    return 0


__all__ = [
    "SHAPES",
    "KeyValueMap",
    "LayerAnalysis",
    "ModelShape",
    "Plan",
    "analyze_adapter",
    "analyze_model",
    "base_weight_bytes",
    "effective_rank",
    "format_analysis",
    "format_key_values",
    "format_plan",
    "key_value_maps",
    "plan",
    "plot_analysis",
    "plot_key_values",
    "rank_above",
    "register_cli",
    "resolve_shape",
    "scale_overhead_bits",
    "shape_from_config",
    "singular_values",
    "trainable_count",
]

"""Adapter configurations, with PEFT's field names so that files and habits carry over.

`LoraConfig` covers LoRA (Hu et al. 2021), rsLoRA (Kalajdzievski 2023: scaling α/√r), DoRA (Liu et al. 2024,
`use_dora=True`) and the initialisations of `init.py` (PiSSA, OLoRA, LoftQ with a `LoftQConfig`); `VeraConfig` covers
VeRA (Kopiczko et al. 2024). Both are frozen dataclasses and read/write the
`adapter_config.json` that PEFT writes (`to_peft_dict`, `config_from_peft_dict`).
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

TargetSpec = Union[str, tuple[str, ...], None]

BIAS_MODES = ("none", "all", "lora_only")

# Keys PEFT writes that change nothing while they hold these "off" values; any other value is a feature lorakit
# does not implement, so loading warns that it is ignored.
_PEFT_INERT_KEYS = {
    "alora_invocation_tokens", "arrow_config", "auto_mapping", "corda_config", "ensure_weight_tying", "eva_config",
    "inference_mode", "kasa_config", "layer_replication", "layers_pattern", "layers_to_transform",
    "lora_bias", "lora_ga_config", "megatron_config", "megatron_core", "monteclora_config", "peft_version",
    "qalora_group_size", "revision", "use_bdlora", "use_qalora",
    "velora_config", "init_weights", "runtime_config",
}


INIT_CHOICES = (True, False, "gaussian", "pissa", "olora", "loftq")  # and "pissa_niter_<N>"


def _as_targets(value: Any) -> TargetSpec:
    """Lists and sets become sorted tuples so the config stays hashable and deterministic; strings stay regexes."""
    if value is None or isinstance(value, str):
        return value
    return tuple(sorted(value))


@dataclass(frozen=True)
class _AdapterConfig:
    """Fields shared by every method."""

    peft_type: ClassVar[str] = ""
    target_modules: TargetSpec = None
    exclude_modules: TargetSpec = None
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: tuple[str, ...] | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", _as_targets(self.target_modules))
        object.__setattr__(self, "exclude_modules", _as_targets(self.exclude_modules))
        if self.modules_to_save is not None:
            object.__setattr__(self, "modules_to_save", tuple(self.modules_to_save))
        if self.bias not in BIAS_MODES:
            raise ValueError(f"bias must be one of {BIAS_MODES}, got {self.bias!r}")
        if self.target_modules is None and not (getattr(self, "target_parameters", None)
                                                or getattr(self, "trainable_token_indices", None)):
            raise ValueError("target_modules is required: a regex, a list of module names, or 'all-linear'")

    def replace(self, **changes: Any) -> "_AdapterConfig":
        return dataclasses.replace(self, **changes)

    def to_peft_dict(self) -> dict[str, Any]:
        """The JSON object PEFT writes as adapter_config.json."""
        out: dict[str, Any] = {"peft_type": self.peft_type}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


@dataclass(frozen=True)
class LoftQConfig:
    """LoftQ's options, PEFT's names: bits of the quantized base (4: NF4) and alternating quantize/SVD rounds."""

    loftq_bits: int = 4
    loftq_iter: int = 1

    def __post_init__(self) -> None:
        if self.loftq_bits != 4:
            raise ValueError(f"loftq_bits must be 4 (lorakit quantizes to NF4), got {self.loftq_bits}")
        if self.loftq_iter < 1:
            raise ValueError(f"loftq_iter must be at least 1, got {self.loftq_iter}")


@dataclass(frozen=True)
class LoraConfig(_AdapterConfig):
    """LoRA: y = W0·x + s·B·A·dropout(x), s = lora_alpha / r (or / √r with use_rslora).

    init_lora_weights: True (A kaiming-uniform, B = 0), "gaussian" (A ~ N(0, 1/r), B = 0), False (both random:
    the adapter is not an identity at init; for tests), or one of the initialisations that read the base weight and
    move part of it into the adapter (`init.py`): "pissa", "pissa_niter_<N>", "olora", "loftq" (with `loftq_config`).
    rank_pattern / alpha_pattern override r / lora_alpha for
    modules whose path matches `(.*\\.)?key$`. target_parameters: parameters (e.g. fused MoE experts) adapted in place,
    `parameters.py`. trainable_token_indices: token ids
    (of the input embedding) or {module: ids} whose embedding rows train, `tokens.py`.
    """

    peft_type: ClassVar[str] = "LORA"
    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: bool | str = True
    loftq_config: LoftQConfig | None = None
    target_parameters: tuple[str, ...] | None = None
    trainable_token_indices: tuple[int, ...] | dict[str, tuple[int, ...]] | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r <= 0:
            raise ValueError(f"r must be positive, got {self.r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.target_parameters is not None:
            object.__setattr__(self, "target_parameters", tuple(self.target_parameters))
            if self.lora_dropout or self.use_dora or self.changes_base:
                raise ValueError("target_parameters: LoRA on a parameter acts through the weight, so lora_dropout, "
                                 "use_dora and initialisations that rewrite the base do not apply")
        tokens = self.trainable_token_indices
        if tokens is not None:
            tokens = {k: tuple(v) for k, v in tokens.items()} if isinstance(tokens, dict) else tuple(tokens)
            object.__setattr__(self, "trainable_token_indices", tokens)
        if isinstance(self.loftq_config, dict):
            object.__setattr__(self, "loftq_config", LoftQConfig(**self.loftq_config) if self.loftq_config else None)
        init = self.init_lora_weights
        if init not in INIT_CHOICES and not (isinstance(init, str) and _PISSA_NITER.fullmatch(init)):
            raise ValueError(f"init_lora_weights must be one of {INIT_CHOICES} or 'pissa_niter_<N>', got {init!r}")
        if (init == "loftq") != (self.loftq_config is not None):
            raise ValueError("init_lora_weights='loftq' and loftq_config=LoftQConfig(...) go together")

    @property
    def changes_base(self) -> bool:
        """The initialisation moves part of the base weight into the adapter (PiSSA, OLoRA, LoftQ)."""
        return isinstance(self.init_lora_weights, str) and self.init_lora_weights != "gaussian"

    def to_peft_dict(self) -> dict[str, Any]:
        out = super().to_peft_dict()
        out["loftq_config"] = dataclasses.asdict(self.loftq_config) if self.loftq_config else {}
        return out

    def rank_for(self, module_path: str) -> int:
        return int(_pattern_value(module_path, self.rank_pattern, self.r))

    def scaling_for(self, module_path: str) -> float:
        r = self.rank_for(module_path)
        alpha = _pattern_value(module_path, self.alpha_pattern, self.lora_alpha)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


@dataclass(frozen=True)
class VeraConfig(_AdapterConfig):
    """VeRA: y = W0·x + λ_b ⊙ (B_s·(λ_d ⊙ (A_s·dropout(x)))), A_s and B_s frozen, shared, drawn from projection_prng_key."""

    peft_type: ClassVar[str] = "VERA"
    r: int = 256
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r <= 0:
            raise ValueError(f"r must be positive, got {self.r}")
        if not 0.0 <= self.vera_dropout < 1.0:
            raise ValueError(f"vera_dropout must be in [0, 1), got {self.vera_dropout}")

    def rank_for(self, module_path: str) -> int:
        return self.r


@dataclass(frozen=True)
class AdaLoraConfig(LoraConfig):
    """AdaLoRA (Zhang et al. 2023): the update in SVD form P·Λ·Q, ranks pruned by importance from `init_r` per layer
    to an average of `target_r` on a cubic schedule over `total_step` steps (`adalora.py`), PEFT's fields.

    rank_pattern here is PEFT's: `{"<module>.lora_E": [kept?, ...]}`, the allocator's final mask (None before any).
    """

    peft_type: ClassVar[str] = "ADALORA"
    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1  # PEFT's name
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict[str, list[bool]] | None = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.use_dora or self.changes_base or self.target_parameters or self.trainable_token_indices:
            raise ValueError("AdaLoRA adapts linear layers with its own initialisation: use_dora, init_lora_weights "
                             "from the base, target_parameters and trainable_token_indices do not apply")
        if not 0 < self.target_r <= self.init_r:
            raise ValueError(f"AdaLoRA needs 0 < target_r <= init_r, got target_r={self.target_r}, init_r={self.init_r}")
        if not (0 < self.beta1 < 1 and 0 < self.beta2 < 1) or self.orth_reg_weight < 0 or self.deltaT < 1:
            raise ValueError("AdaLoRA needs 0 < beta1, beta2 < 1, orth_reg_weight >= 0 and deltaT >= 1")
        if self.total_step is not None and self.tinit >= self.total_step - self.tfinal:
            raise ValueError(f"AdaLoRA: tinit={self.tinit} and tfinal={self.tfinal} leave no budgeting phase in "
                             f"total_step={self.total_step} steps")

    def rank_for(self, module_path: str) -> int:
        """Ranks kept by the saved pattern (all init_r before any pruning)."""
        mask = (self.rank_pattern or {}).get(f"{module_path}.lora_E")
        return self.init_r if mask is None else int(sum(mask))

    def scaling_for(self, module_path: str) -> float:
        return self.lora_alpha if self.lora_alpha > 0 else float(self.init_r)  # divided by init_r in the delta


AdapterConfig = Union[LoraConfig, VeraConfig]
CONFIG_CLASSES: dict[str, type[_AdapterConfig]] = {"LORA": LoraConfig, "VERA": VeraConfig, "ADALORA": AdaLoraConfig}


_PISSA_NITER = re.compile(r"pissa_niter_[0-9]+")


def _pattern_value(module_path: str, pattern: dict[str, Any], default: Any) -> Any:
    """PEFT's rule: a pattern key applies to a module whose path matches `(.*\\.)?key$`; the first match wins."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?{key}$", module_path):
            return value
    return default


def config_from_peft_dict(data: dict[str, Any], source: str = "adapter_config.json") -> AdapterConfig:
    """Build a config from PEFT's JSON; options lorakit does not implement are reported, never silently used."""
    peft_type = data.get("peft_type")
    if peft_type not in CONFIG_CLASSES:
        raise ValueError(f"{source}: peft_type {peft_type!r} is not supported (lorakit reads {sorted(CONFIG_CLASSES)})")
    cls = CONFIG_CLASSES[peft_type]
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key == "peft_type":
            continue
        if key in names:
            kwargs[key] = value
        elif key in _PEFT_INERT_KEYS and _is_off(key, value):
            continue
        else:
            warnings.warn(f"{source}: option {key}={value!r} is not supported by lorakit and is ignored", stacklevel=2)
    if peft_type == "VERA" and data.get("init_weights") is False:
        warnings.warn(f"{source}: init_weights=False only changes initialisation; loaded weights are used", stacklevel=2)
    return cls(**kwargs)


def _is_off(key: str, value: Any) -> bool:
    if key in ("qalora_group_size", "peft_version", "megatron_core", "auto_mapping", "revision", "runtime_config",
               "inference_mode"):
        return True  # bookkeeping that carries no behaviour
    if key == "init_weights":
        return value is True
    return value in (None, False, {}, [], "")

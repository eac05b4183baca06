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
import reprlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .patterns import regex_matches, safe_regex

TargetSpec = str | tuple[str, ...] | None

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


# -- the schema: one rule per field, checked on every construction (from Python or from a PEFT file) -------------

Check = Callable[[Any, str], Any]
"""(value, field name) -> the value as the config keeps it; raises a one-line ValueError naming the field."""

MAX_DIM = 2**31 - 1  # largest rank or index a tensor dimension can hold
FLOAT32_MAX = 3.4028234663852886e38
_SHOW = reprlib.Repr()
_SHOW.maxstring = _SHOW.maxother = 60


def _refuse(name: str, rule: str, value: Any) -> ValueError:
    return ValueError(f"{name} must be {rule}, got {_SHOW.repr(value)}")


def _integer(low: int, high: int = MAX_DIM) -> Check:
    def check(value: Any, name: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise _refuse(name, f"an integer in [{low}, {high}]", value)
        return value
    return check


def _number(low: float = -FLOAT32_MAX, high: float = FLOAT32_MAX, open_low: bool = False,
            open_high: bool = False) -> Check:
    """A finite number that float32 can hold, in [low, high] (ends excluded when open)."""
    shown = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"

    def check(value: Any, name: str) -> float:
        above = isinstance(value, (int, float)) and (low < value if open_low else low <= value)
        below = isinstance(value, (int, float)) and (value < high if open_high else value <= high)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not (above and below):
            raise _refuse(name, f"a finite number in {shown}", value)
        return value
    return check


def _boolean(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise _refuse(name, "true or false (a JSON boolean)", value)
    return value


def _optional(check: Check) -> Check:
    return lambda value, name: None if value is None else check(value, name)


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise _refuse(name, "a string", value)
    return value


def _choice(options: tuple[Any, ...]) -> Check:
    def check(value: Any, name: str) -> Any:
        if not any(type(value) is type(option) and value == option for option in options):
            raise _refuse(name, repr(options[0]) if len(options) == 1 else f"one of {options}", value)
        return value
    return check


def _names(value: Any, name: str) -> tuple[str, ...]:
    """A list of non-empty names, kept in its order as a tuple (hashable)."""
    if not isinstance(value, (list, tuple, set, frozenset)) \
            or not all(isinstance(item, str) and item for item in value):
        raise _refuse(name, "a list of non-empty names", value)
    return tuple(value)


def _targets(value: Any, name: str) -> TargetSpec:
    """A regex (fullmatching module paths), "all-linear", or a list of names (kept sorted: deterministic files)."""
    if isinstance(value, str):
        if value != "all-linear":
            safe_regex(value, name)
        return value
    return tuple(sorted(_names(value, name)))


def _mapping(key_check: Check, value_check: Check) -> Check:
    def check(value: Any, name: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise _refuse(name, "a JSON object", value)
        return {key_check(key, name): value_check(item, f"{name}[{_SHOW.repr(key)}]") for key, item in value.items()}
    return check


def _pattern_key(value: Any, name: str) -> str:
    """A rank_pattern / alpha_pattern key: a regex applied as `(.*\\.)?key$`."""
    if not isinstance(value, str) or not value:
        raise _refuse(f"{name} key", "a non-empty string", value)
    safe_regex(rf"(.*\.)?{value}$", f"{name} key")
    return value


def _list_of(check: Check) -> Check:
    def list_check(value: Any, name: str) -> tuple[Any, ...]:
        if not isinstance(value, (list, tuple)):
            raise _refuse(name, "a list", value)
        return tuple(check(item, name) for item in value)
    return list_check


def _token_indices(value: Any, name: str) -> tuple[int, ...] | dict[str, tuple[int, ...]]:
    ids = _list_of(_integer(0))
    if isinstance(value, dict):
        return _mapping(_names_key, ids)(value, name)
    return ids(value, name)


def _names_key(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise _refuse(f"{name} key", "a non-empty module name", value)
    return value


_PISSA_NITER = re.compile(r"pissa_niter_[0-9]{1,4}")


def _init_weights(value: Any, name: str) -> bool | str:
    if isinstance(value, str) and _PISSA_NITER.fullmatch(value):
        return value
    return _choice(INIT_CHOICES + ("pissa_niter_<N>, N < 10000",))(value, name)


def _loftq(value: Any, name: str) -> LoftQConfig | None:
    if value is None or isinstance(value, LoftQConfig):
        return value
    if not isinstance(value, dict):
        raise _refuse(name, "a JSON object", value)
    unknown = sorted(set(value) - {f.name for f in dataclasses.fields(LoftQConfig)})
    if unknown:
        raise ValueError(f"{name}: unknown option(s) {_SHOW.repr(unknown)}")
    return LoftQConfig(**value) if value else None


def _validate(config: Any, rules: dict[str, Check]) -> None:
    """Check and normalise every field of a frozen config by its rule."""
    for f in dataclasses.fields(config):
        object.__setattr__(config, f.name, rules[f.name](getattr(config, f.name), f.name))


@dataclass(frozen=True)
class LoftQConfig:
    """LoftQ's options, PEFT's names: bits of the quantized base (4: NF4) and alternating quantize/SVD rounds."""

    loftq_bits: int = 4
    loftq_iter: int = 1

    def __post_init__(self) -> None:
        _validate(self, {"loftq_bits": _choice((4,)), "loftq_iter": _integer(1, 1000)})


RULES: dict[str, Check] = {
    "target_modules": _optional(_targets), "exclude_modules": _optional(_targets), "fan_in_fan_out": _boolean,
    "bias": _choice(BIAS_MODES), "modules_to_save": _optional(_names), "task_type": _optional(_text),
    "base_model_name_or_path": _optional(_text),
    # LoRA
    "r": _integer(1), "lora_alpha": _number(), "lora_dropout": _number(0.0, 1.0, open_high=True),
    "use_rslora": _boolean, "use_dora": _boolean, "init_lora_weights": _init_weights, "loftq_config": _loftq,
    "target_parameters": _optional(_names), "trainable_token_indices": _optional(_token_indices),
    "rank_pattern": _mapping(_pattern_key, _integer(1)), "alpha_pattern": _mapping(_pattern_key, _number()),
    # VeRA
    "projection_prng_key": _integer(-(2**63), 2**64 - 1), "save_projection": _boolean,
    "vera_dropout": _number(0.0, 1.0, open_high=True), "d_initial": _number(),
    # AdaLoRA (its rank_pattern: {"<module>.lora_E": [kept?, ...]}, the allocator's mask)
    "target_r": _integer(1), "init_r": _integer(1), "tinit": _integer(0), "tfinal": _integer(0),
    "deltaT": _integer(1), "beta1": _number(0.0, 1.0, True, True), "beta2": _number(0.0, 1.0, True, True),
    "orth_reg_weight": _number(0.0), "total_step": _optional(_integer(1)),
}
ADALORA_RULES = {**RULES, "rank_pattern": _optional(_mapping(_names_key, lambda v, n: list(_list_of(_boolean)(v, n))))}


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

    rules: ClassVar[dict[str, Check]] = RULES

    def __post_init__(self) -> None:
        _validate(self, self.rules)
        if not self.target_modules and not (getattr(self, "target_parameters", None)
                                                or getattr(self, "trainable_token_indices", None)):
            raise ValueError("target_modules is required: a regex, a list of module names, or 'all-linear'")

    def replace(self, **changes: Any) -> _AdapterConfig:
        return dataclasses.replace(self, **changes)

    def to_peft_dict(self) -> dict[str, Any]:
        """The JSON object PEFT writes as adapter_config.json."""
        out: dict[str, Any] = {"peft_type": self.peft_type}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


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
        if self.target_parameters is not None and (self.lora_dropout or self.use_dora or self.changes_base):
            raise ValueError("target_parameters: LoRA on a parameter acts through the weight, so lora_dropout, "
                             "use_dora and initialisations that rewrite the base do not apply")
        if (self.init_lora_weights == "loftq") != (self.loftq_config is not None):
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
    rules: ClassVar[dict[str, Check]] = ADALORA_RULES

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.use_dora or self.changes_base or self.target_parameters or self.trainable_token_indices:
            raise ValueError("AdaLoRA adapts linear layers with its own initialisation: use_dora, init_lora_weights "
                             "from the base, target_parameters and trainable_token_indices do not apply")
        if not 0 < self.target_r <= self.init_r:
            raise ValueError(f"AdaLoRA needs 0 < target_r <= init_r, got target_r={self.target_r}, init_r={self.init_r}")
        if self.total_step is not None and self.tinit >= self.total_step - self.tfinal:
            raise ValueError(f"AdaLoRA: tinit={self.tinit} and tfinal={self.tfinal} leave no budgeting phase in "
                             f"total_step={self.total_step} steps")

    def rank_for(self, module_path: str) -> int:
        """Ranks kept by the saved pattern (all init_r before any pruning)."""
        mask = (self.rank_pattern or {}).get(f"{module_path}.lora_E")
        return self.init_r if mask is None else int(sum(mask))

    def scaling_for(self, module_path: str) -> float:
        return self.lora_alpha if self.lora_alpha > 0 else float(self.init_r)  # divided by init_r in the delta


AdapterConfig = LoraConfig | VeraConfig
CONFIG_CLASSES: dict[str, type[_AdapterConfig]] = {"LORA": LoraConfig, "VERA": VeraConfig, "ADALORA": AdaLoraConfig}


def _pattern_value(module_path: str, pattern: dict[str, Any], default: Any) -> Any:
    """PEFT's rule: a pattern key applies to a module whose path matches `(.*\\.)?key$`; the first match wins."""
    for key, value in pattern.items():
        if regex_matches(rf"(.*\.)?{key}$", module_path, "pattern key", whole=False):
            return value
    return default


def config_from_peft_dict(data: dict[str, Any], source: str = "adapter_config.json") -> AdapterConfig:
    """Build a config from PEFT's JSON; options lorakit does not implement are reported, never silently used, and an
    invalid value is a ValueError naming `source` and the key."""
    peft_type = data.get("peft_type")
    if not isinstance(peft_type, str) or peft_type not in CONFIG_CLASSES:
        raise ValueError(f"{source}: peft_type {_SHOW.repr(peft_type)} is not supported (lorakit reads "
                         f"{sorted(CONFIG_CLASSES)})")
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
            warnings.warn(f"{source}: option {key}={_SHOW.repr(value)} is not supported by lorakit and is ignored",
                          stacklevel=2)
    if peft_type == "VERA" and data.get("init_weights") is False:
        warnings.warn(f"{source}: init_weights=False only changes initialisation; loaded weights are used", stacklevel=2)
    try:
        return cls(**kwargs)
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from None


def _is_off(key: str, value: Any) -> bool:
    if key in ("qalora_group_size", "peft_version", "megatron_core", "auto_mapping", "revision", "runtime_config",
               "inference_mode"):
        return True  # bookkeeping that carries no behaviour
    if key == "init_weights":
        return value is True
    return value in (None, False, {}, [], "")

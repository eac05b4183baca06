"""Fuzz properties of the adapter loader and adapter configs (surface "adapter").

A tiny Llama carries an active adapter "first" (on k_proj and o_proj); each case loads a damaged copy of a valid
LoRA directory (r=4 on q_proj and v_proj) as "second", or adapts it with a random fresh config. The oracle, written
here apart from lorakit's own rules, says whether the case must load or must be refused:
- config values: r an integer in [1, 2^31 - 1], lora_alpha a finite number float32 can hold, dropout in [0, 1),
  flags JSON booleans, bias one of none/all/lora_only, init_lora_weights one of PEFT's choices, peft_type "LORA",
  names non-empty strings, regexes that compile; and, against the file: the modules the config selects are exactly
  those the file holds, each with the file's rank, with no DoRA magnitude or modules_to_save the file lacks;
- tensors: every name, shape and dtype as saved (any floating dtype), every value finite once cast to float32;
- a regex lorakit refuses as too long or as able to backtrack without end (its documented limits) may be refused.
A refusal must be one clean line and leave the model bit for bit as it was (weights, modules, requires_grad flags,
active adapters) and the files untouched, and a good load must work afterwards; a success must hold the file's
values. Every case runs under a time and memory bound.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import re
import struct
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import randomize_adapters, tiny_llama
from fuzzing import assert_clean_error, bounded, count_case
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes
from test_reliability_adapter import assert_same_state, model_state
from torch import nn

import lorakit
from lorakit.adapters.registry import adapted_layers
from lorakit.formats.peft import CONFIG_NAME, WEIGHTS_NAME, adapter_state_dict

F32_MAX = 3.4028234663852886e38
MAX_DIM = 2**31 - 1
RANK = 4
LAYERS = [f"model.layers.{i}.self_attn.{name}" for i in range(2) for name in ("q_proj", "v_proj")]
SAFETY = ("is refused:", "characters (at most")  # lorakit's documented regex limits (adapters/patterns.py)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
OTHER_DTYPES = (torch.int8, torch.uint8, torch.int32, torch.int64, torch.bool)


# -- the model and the valid adapter, built once ------------------------------------------------------------------

@functools.cache
def base() -> nn.Module:
    """A tiny Llama with adapter "first" active (on layers the fuzzed adapter does not touch)."""
    model = lorakit.adapt(tiny_llama(), lorakit.LoraConfig(target_modules=["k_proj", "o_proj"], r=2), "first")
    randomize_adapters(model, seed=1)
    return model


@functools.cache
def valid_files(directory: str) -> tuple[dict[str, Any], bytes]:
    """The config (as JSON data) and the weights file (bytes) of a valid LoRA adapter, saved under `directory`."""
    model = lorakit.adapt(tiny_llama(), lorakit.LoraConfig(target_modules=["q_proj", "v_proj"], r=RANK, lora_alpha=8))
    randomize_adapters(model, seed=2)
    saved = lorakit.save_adapter(model, directory)
    return json.loads((saved / CONFIG_NAME).read_text()), (saved / WEIGHTS_NAME).read_bytes()


@functools.cache
def candidates(embeddings: bool = True) -> tuple[str, ...]:
    """Module paths a target may select in the plain model: linear layers, and the embedding (LoRA, not VeRA)."""
    kinds = (nn.Linear, nn.Embedding) if embeddings else (nn.Linear,)
    return tuple(name for name, module in tiny_llama().named_modules() if isinstance(module, kinds))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-adapter")


def write_dir(directory: Path, config: bytes, weights: bytes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_NAME).write_bytes(config)
    (directory / WEIGHTS_NAME).write_bytes(weights)
    return directory


# -- the oracle ---------------------------------------------------------------------------------------------------

def is_number(value: Any) -> bool:
    return type(value) in (int, float)


def finite32(value: Any) -> bool:
    return is_number(value) and math.isfinite(value) and abs(value) <= F32_MAX


def is_int(value: Any, low: int, high: int = MAX_DIM) -> bool:
    return type(value) is int and low <= value <= high


def names(value: Any) -> bool:
    return type(value) is list and all(type(item) is str and item for item in value)


def compiles(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError, ValueError):
        return False
    return True


def selects(spec: Any, path: str) -> bool:
    """PEFT's matching rule, stated here: a string fullmatches as a regex, a list matches a path or a suffix."""
    if type(spec) is str:
        return re.fullmatch(spec, path) is not None
    return any(path == key or path.endswith("." + key) for key in spec)


def pattern_for(path: str, pattern: dict[str, Any], default: Any) -> Any:
    return next((value for key, value in pattern.items() if re.match(rf"(.*\.)?{key}$", path)), default)


def pattern_keys_ok(pattern: Any) -> bool:
    return type(pattern) is dict and all(type(key) is str and key and compiles(rf"(.*\.)?{key}$") for key in pattern)


def config_verdict(data: Any) -> bool | None:
    """Must this adapter_config.json load with the valid weights file (module doc)? Regexes must compile first.
    Initialisations from the base (PiSSA divides by the scaling s, OLoRA subtracts s·B·A from W): s <= 0 is refused
    for PiSSA; an extreme s (beyond 1e±20) may be refused for both, when the factors come out non-finite."""
    if type(data) is not dict or data.get("peft_type") != "LORA":
        return False
    get = data.get
    targets, exclude = get("target_modules"), get("exclude_modules")
    rank_pattern, alpha_pattern = get("rank_pattern", {}), get("alpha_pattern", {})
    init = get("init_lora_weights", True)
    values_ok = (
        is_int(get("r", 8), 1) and finite32(get("lora_alpha", 8)) and is_number(get("lora_dropout", 0.0))
        and math.isfinite(get("lora_dropout", 0.0)) and 0 <= get("lora_dropout", 0.0) < 1
        and all(type(get(flag, False)) is bool for flag in ("use_rslora", "use_dora", "fan_in_fan_out"))
        and get("bias", "none") in ("none", "all", "lora_only") and type(get("bias", "none")) is str
        and all(get(key) is None or type(get(key)) is str for key in ("task_type", "base_model_name_or_path"))
        and (type(init) is bool or type(init) is str and (init in ("gaussian", "pissa", "olora")
                                                            or re.fullmatch("pissa_niter_[0-9]{1,4}", init)))
        and get("loftq_config", {}) in ({}, None)
        and get("modules_to_save") in (None, [])
        and pattern_keys_ok(rank_pattern) and all(is_int(v, 1) for v in rank_pattern.values())
        and pattern_keys_ok(alpha_pattern) and all(finite32(v) for v in alpha_pattern.values())
        and (type(targets) is str and compiles(targets) or names(targets))
        and (exclude is None or type(exclude) is str and compiles(exclude) or names(exclude))
    )
    if not values_ok or get("use_dora", False):
        return False
    chosen = [p for p in candidates() if selects(targets, p) and not (exclude is not None and selects(exclude, p))] \
        if targets != "all-linear" else ["all linear layers"]
    if sorted(chosen) != sorted(LAYERS) or any(pattern_for(p, rank_pattern, get("r", 8)) != RANK for p in LAYERS):
        return False
    if type(init) is bool or init == "gaussian":
        return True
    root = math.sqrt(RANK) if get("use_rslora", False) else RANK
    scalings = [pattern_for(p, alpha_pattern, get("lora_alpha", 8)) / root for p in LAYERS]
    if init != "olora" and any(s <= 0 for s in scalings):
        return False
    return True if all(1e-20 <= abs(s) <= 1e20 for s in scalings) else None


# -- one case -----------------------------------------------------------------------------------------------------

def attempt(model: nn.Module, action: Callable[[], object]) -> BaseException | None:
    with bounded(seconds=20, memory_mib=256), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            action()
        except lorakit.cli.ERRORS as error:  # judged below; any other exception escapes: a crash
            return error
    return None


def judge(model: nn.Module, before: dict[str, Any], error: BaseException | None, verdict: Callable[[], bool | None],
          good: Path | None) -> None:
    """Refusals: clean, nothing lost, the oracle agrees (unless a documented regex limit), a good load still works.
    Successes: the oracle agrees."""
    if error is not None:
        message = assert_clean_error(error)
        assert_same_state(before, model_state(model))
        if not any(reason in message for reason in SAFETY):
            assert verdict() is not True, f"valid input refused: {message}"
        if good is not None:
            lorakit.load_adapter(model, good, "second")
            assert [layer.active for _, layer in adapted_layers(model)]
    else:
        assert verdict() is not False, "invalid input accepted"


# -- properties ---------------------------------------------------------------------------------------------------

JUNK = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
REGEXES = st.sampled_from([
    ".*q_proj", ".*(q|v)_proj", r"model\.layers\.\d+\.self_attn\.(q_proj|v_proj)", ".*_proj", "(", "(a+)+b",
    r".*\.(q|v)_proj$", "q_proj", ".*.*.*.*x", "[", "all-linear", ".*", "x" * 1001,
]) | st.text(alphabet="qvkolm_pr.*+?()[]|\\{},0123456789^$", max_size=24)
LISTS = st.lists(st.sampled_from(["q_proj", "v_proj", "k_proj", "qproj", "lm_head", "embed_tokens", "",
                                  "self_attn.q_proj", "layers.0.self_attn.v_proj", "nonexistent"]), max_size=4)
PATTERN_KEYS = st.sampled_from(["q_proj", "v_proj", "k_proj", "layers.0.self_attn.q_proj", "(", "q_proj|v_proj", "",
                                "(a+)+"]) | st.text(alphabet="qv_proj.*(", max_size=8)
NUMBERS = st.sampled_from([0, 1, 4, 8, -1, 2**31, 10**6, 10**12, 4.0, 0.5, -0.0, 1e39, float("inf"),
                           float("-inf"), float("nan"), True, False, "4", None]) | st.floats() | st.integers()
FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "r": NUMBERS, "lora_alpha": NUMBERS, "lora_dropout": NUMBERS | st.floats(-1, 2),
    "use_rslora": st.sampled_from([True, False, "false", "true", 0, 1, None]),
    "use_dora": st.sampled_from([True, False, "false", 0, None]),
    "fan_in_fan_out": st.sampled_from([True, False, "no", None]),
    "bias": st.sampled_from(["none", "all", "lora_only", "some", None, 0]),
    "target_modules": REGEXES | LISTS | st.none(),
    "exclude_modules": REGEXES | LISTS | st.none(),
    "init_lora_weights": st.sampled_from([True, False, "gaussian", "pissa", "olora", "pissa_niter_2", "loftq", "svd",
                                          1, 0, None, "pissa_niter_", "pissa_niter_12345"]),
    "modules_to_save": st.sampled_from([None, [], ["lm_head"], ["nonexistent"], "lm_head", [""]]),
    "rank_pattern": st.dictionaries(PATTERN_KEYS, NUMBERS, max_size=3) | JUNK,
    "alpha_pattern": st.dictionaries(PATTERN_KEYS, NUMBERS, max_size=3) | JUNK,
    "peft_type": st.sampled_from(["LORA", "VERA", "ADALORA", "lora", ["LORA"], None, 1]),
    "task_type": st.sampled_from(["CAUSAL_LM", None, 3, ["x"]]),
    "loftq_config": st.sampled_from([{}, None, {"loftq_bits": 8}, [], "x"]),
}
EDITS = st.lists(st.one_of(
    st.tuples(st.just("set"), st.sampled_from(sorted(FIELDS))).flatmap(lambda t: st.tuples(st.just(t[0]), st.just(t[1]),
                                                                                               FIELDS[t[1]])),
    st.tuples(st.just("junk"), st.sampled_from(sorted(FIELDS)), JUNK),
    st.tuples(st.just("delete"), st.sampled_from(sorted(FIELDS)), st.none()),
    st.tuples(st.just("unknown"), st.text(min_size=1, max_size=10).filter(lambda k: k not in FIELDS), JUNK),
), min_size=1, max_size=4)
RAW_CONFIGS = st.sampled_from([
    b"", b"[]", b'"LORA"', b"{", b"\xff\xfe{}", b'{"peft_type": "LORA", "r": 1' + b"0" * 5000 + b"}",
    b'{"a":' + b"[" * 50 + b"]" * 50 + b"}", b'{"a":' + b"[" * 5000 + b"]" * 5000 + b"}",
])


@given(edits=EDITS, raw=st.none() | RAW_CONFIGS)
def test_mutated_adapter_configs(workdir: Path, edits: list[tuple[str, str, Any]], raw: bytes | None) -> None:
    count_case("adapter")
    data, weights = valid_files(str(workdir / "valid"))
    good = workdir / "valid"
    config = dict(data)
    for kind, key, value in edits:
        if kind == "delete":
            config.pop(key, None)
        else:
            config[key] = value
    text = raw if raw is not None else json.dumps(config).encode()
    directory = write_dir(workdir / "config-case", text, weights)
    model = copy.deepcopy(base())
    before = model_state(model)
    error = attempt(model, lambda: lorakit.load_adapter(model, directory, "second"))
    assert (directory / CONFIG_NAME).read_bytes() == text and (directory / WEIGHTS_NAME).read_bytes() == weights
    judge(model, before, error, lambda: raw is None and config_verdict(config), good)
    if error is None:
        loaded = adapter_state_dict(model, "second")
        saved = load_bytes(weights)
        assert all(torch.equal(loaded[key], value.float()) for key, value in saved.items())


def _header(blob: bytes) -> tuple[int, dict[str, Any]]:
    size = struct.unpack("<Q", blob[:8])[0]
    return size, json.loads(blob[8:8 + size])


def tensors_verdict(blob: bytes, original: bytes) -> bool | None:
    """Must these weights load with the valid config? None: the case cannot say (a damaged length field)."""
    size, header = _header(original)
    if len(blob) != len(original):
        return False if len(blob) < len(original) or blob[:8] == original[:8] else None
    if blob[:8] != original[:8]:
        return None
    try:
        found = json.loads(blob[8:8 + size].decode("utf-8"))
    except ValueError:
        return False
    if type(found) is not dict:
        return False
    metadata = found.pop("__metadata__", None)
    header.pop("__metadata__", None)
    if found != header or not (metadata is None or type(metadata) is dict and all(
            type(k) is str and type(v) is str for k, v in metadata.items())):
        return False
    return all(torch.isfinite(value.float()).all() for value in load_bytes(blob).values())


def mutate_tensors(tensors: dict[str, torch.Tensor], kind: str, key: str, draw: Any) -> bool:
    """Change one tensor of the file; whether the result is still a valid adapter (oracle)."""
    value = tensors[key]
    if kind == "drop":
        del tensors[key]
        return False
    if kind == "rename":
        new = draw(st.text(min_size=1, max_size=40))
        tensors[new] = tensors.pop(key)
        return new == key
    if kind == "extra":
        new = draw(st.text(min_size=1, max_size=40))
        tensors[new] = torch.zeros(2)
        return False
    if kind == "shape":
        shape = tuple(draw(st.lists(st.integers(1, 70), min_size=1, max_size=3)))
        tensors[key] = torch.zeros(shape)
        return shape == tuple(value.shape)
    if kind == "dtype":
        dtype = draw(st.sampled_from(FLOAT_DTYPES + OTHER_DTYPES))
        tensors[key] = (value * 100).to(dtype) if dtype in OTHER_DTYPES else value.to(dtype)
        return dtype in FLOAT_DTYPES and bool(torch.isfinite(tensors[key].float()).all())
    poison = draw(st.sampled_from([float("nan"), float("inf"), float("-inf"), 1e39, 1e300]))
    changed = value.to(torch.float64).clone()
    changed.view(-1)[draw(st.integers(0, value.numel() - 1))] = poison
    tensors[key] = changed.to(draw(st.sampled_from([torch.float32, torch.float64])))
    return bool(torch.isfinite(tensors[key].float()).all())


@given(kind=st.sampled_from(["drop", "rename", "extra", "shape", "dtype", "poison", "truncate", "flip_header",
                             "flip_data"]), data=st.data())
def test_mutated_adapter_files(workdir: Path, kind: str, data: st.DataObject) -> None:
    count_case("adapter")
    config, weights = valid_files(str(workdir / "valid"))
    tensors = load_bytes(weights)
    size = _header(weights)[0]
    verdict: bool | None
    if kind == "truncate":
        blob = weights[:data.draw(st.integers(0, len(weights) - 1))]
        verdict = False
    elif kind in ("flip_header", "flip_data"):
        low, high = (0, 8 + size) if kind == "flip_header" else (8 + size, len(weights))
        blob_array = bytearray(weights)
        blob_array[data.draw(st.integers(low, high - 1))] ^= data.draw(st.integers(1, 255))
        blob = bytes(blob_array)
        verdict = tensors_verdict(blob, weights)
    else:
        key = data.draw(st.sampled_from(sorted(tensors)))
        verdict = mutate_tensors(tensors, kind, key, data.draw)
        blob = save_bytes(tensors, metadata={"format": "pt"})
    text = json.dumps(config).encode()
    directory = write_dir(workdir / "tensor-case", text, blob)
    model = copy.deepcopy(base())
    before = model_state(model)
    error = attempt(model, lambda: lorakit.load_adapter(model, directory, "second"))
    assert (directory / WEIGHTS_NAME).read_bytes() == blob
    judge(model, before, error, lambda: verdict, workdir / "valid")
    if error is None:
        loaded = adapter_state_dict(model, "second")
        assert all(torch.equal(loaded[key], value.float()) for key, value in load_bytes(blob).items())


FRESH = st.fixed_dictionaries({
    "target_modules": REGEXES | LISTS,
    "r": st.integers(1, 64) | st.sampled_from([0, -3, 2**28, 2**31 - 1, 2**31, 2.0, True, None]),
    "lora_alpha": st.floats(-64, 64) | NUMBERS,
    "lora_dropout": st.floats(-0.5, 1.5) | st.sampled_from([float("nan"), "0.1"]),
    "use_rslora": st.sampled_from([True, False, "false"]),
})


@given(options=FRESH)
def test_fresh_adapter_configs(options: dict[str, Any]) -> None:
    """adapt() with a config built from random values: refused exactly when a value breaks its rule, or when the
    rank's weights could not fit (r >= 2^28 on 4+ layers: at least 512 GiB), or a target list names a missing module."""
    count_case("adapter")
    model = copy.deepcopy(base())
    before = model_state(model)

    def verdict() -> bool:
        targets, r = options["target_modules"], options["r"]
        dropout = options["lora_dropout"]
        if not (is_int(r, 1) and finite32(options["lora_alpha"]) and is_number(dropout) and 0 <= dropout < 1
                and type(options["use_rslora"]) is bool and (type(targets) is str and compiles(targets)
                                                            or names(targets))):
            return False
        if targets == "all-linear":
            return r < 2**28
        chosen = [p for p in candidates() if selects(targets, p)]
        every = type(targets) is str or all(any(selects([key], p) for p in candidates()) for key in targets)
        return bool(chosen) and every and r < 2**28

    error = attempt(model, lambda: lorakit.adapt(model, lorakit.LoraConfig(**options), "second"))
    judge(model, before, error, verdict, None)
    if error is None:
        assert lorakit.adapter_configs(model)["second"].r == options["r"]
        assert all(layer.active == ["second"] for _, layer in adapted_layers(model) if "second" in layer.adapters)


@functools.cache
def valid_vera_files(directory: str) -> tuple[dict[str, Any], bytes]:
    """A valid VeRA adapter (r=4 on q_proj and v_proj, projections regenerated from the seed)."""
    config = lorakit.VeraConfig(target_modules=["q_proj", "v_proj"], r=RANK, save_projection=False)
    model = lorakit.adapt(tiny_llama(), config)
    randomize_adapters(model, seed=5)
    saved = lorakit.save_adapter(model, directory)
    return json.loads((saved / CONFIG_NAME).read_text()), (saved / WEIGHTS_NAME).read_bytes()


VERA_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "r": NUMBERS, "projection_prng_key": NUMBERS | st.integers(-(2**65), 2**65),
    "save_projection": st.sampled_from([True, False, "true", 1, None]),
    "vera_dropout": NUMBERS | st.floats(-1, 2), "d_initial": NUMBERS,
    "target_modules": REGEXES | LISTS | st.none(), "peft_type": st.sampled_from(["VERA", "LORA", "vera", None]),
}


def vera_verdict(data: dict[str, Any]) -> bool:
    """VeRA's rules: r an integer equal to the file's rank, the seed an integer torch accepts ([-2^63, 2^64 - 1]),
    flags JSON booleans, dropout in [0, 1), d_initial a finite float32 number, the file's modules selected (VeRA
    adapts linear layers only: a name of the embedding selects nothing)."""
    get = data.get
    dropout, targets = get("vera_dropout", 0.0), get("target_modules")
    if not (get("peft_type") == "VERA" and is_int(get("r", 256), 1) and is_int(get("projection_prng_key", 0), -(2**63),
                                                                             2**64 - 1)
            and type(get("save_projection", True)) is bool and is_number(dropout) and math.isfinite(dropout)
            and 0 <= dropout < 1 and finite32(get("d_initial", 0.1))
            and (type(targets) is str and compiles(targets) or names(targets))):
        return False
    chosen = [p for p in candidates(embeddings=False) if selects(targets, p)] if targets != "all-linear" else ["all"]
    return sorted(chosen) == sorted(LAYERS) and get("r", 256) == RANK


@given(edits=st.lists(st.sampled_from(sorted(VERA_FIELDS)).flatmap(
    lambda key: st.tuples(st.just(key), VERA_FIELDS[key], st.booleans())),
    min_size=1, max_size=3))
def test_mutated_vera_configs(workdir: Path, edits: list[tuple[str, Any, bool]]) -> None:
    count_case("adapter")
    data, weights = valid_vera_files(str(workdir / "vera"))
    config = dict(data)
    for key, value, delete in edits:
        if delete:
            config.pop(key, None)
        else:
            config[key] = value
    directory = write_dir(workdir / "vera-case", json.dumps(config).encode(), weights)
    model = copy.deepcopy(base())
    before = model_state(model)
    error = attempt(model, lambda: lorakit.load_adapter(model, directory, "second"))
    judge(model, before, error, lambda: vera_verdict(config), workdir / "vera")
    if error is None:
        loaded = adapter_state_dict(model, "second")
        assert all(torch.equal(loaded[key], value.float()) for key, value in load_bytes(weights).items())

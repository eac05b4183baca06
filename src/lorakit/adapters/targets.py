"""Which modules an adapter wraps, by PEFT's matching rules.

- a string is a regular expression that must `re.fullmatch` the module path;
- a list matches a module whose path equals an entry or ends with "." + entry;
- "all-linear" is every linear layer (nn.Linear, Hugging Face Conv1D, NF4Linear) except the model's output head;
  an nn.Embedding is a target only when named (LoRA).
A target that matches nothing is an error that names the closest module paths.
"""

from __future__ import annotations

import difflib
import reprlib
from collections.abc import Iterator

from torch import nn

from .base import is_conv1d, is_weight_provider
from .config import TargetSpec
from .layer import AdaptedLinear
from .patterns import regex_matches

ALL_LINEAR = "all-linear"
SHOWN_NAMES = 5  # unmatched names a message shows (and finds close matches for)
MAX_NAME_CHARS = 200
_SHOW = reprlib.Repr()
_SHOW.maxlist = _SHOW.maxtuple = SHOWN_NAMES
_SHOW.maxstring = MAX_NAME_CHARS


def is_linear_like(module: nn.Module) -> bool:
    """A layer lorakit can adapt: it maps [..., in] to [..., out] with a weight matrix."""
    if isinstance(module, AdaptedLinear):
        return is_linear_like(module.base_layer)
    return isinstance(module, nn.Linear) or is_conv1d(module) or is_weight_provider(module)


def candidate_modules(model: nn.Module, embeddings: bool = False) -> Iterator[tuple[str, nn.Module]]:
    """Named modules that could be targets: linear-like layers (and embeddings if asked), never the internals of an
    adapted layer."""
    inside: tuple[str, ...] = ()
    for name, module in model.named_modules():
        if inside and any(name.startswith(prefix) for prefix in inside):
            continue
        if isinstance(module, AdaptedLinear):
            inside += (name + ".",)
        base = module.base_layer if isinstance(module, AdaptedLinear) else module
        if name and (is_linear_like(module) or embeddings and isinstance(base, nn.Embedding)):
            yield name, module


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put `new` at module path `path` of `model` (the path keeps its name, so file keys stay the same)."""
    parent_path, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, child, new)


def matches(path: str, spec: TargetSpec) -> bool:
    """PEFT's rule for one module path against a target (or exclude) spec."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return regex_matches(spec, path, "target_modules")
    return any(path == key or path.endswith("." + key) for key in spec)


def output_head_paths(model: nn.Module) -> set[str]:
    """Paths of the module that produces the logits (excluded from "all-linear", as in PEFT)."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:
        return {"lm_head"} if isinstance(getattr(model, "lm_head", None), nn.Module) else set()
    return {name for name, module in model.named_modules() if module is head}


def find_targets(model: nn.Module, target_modules: TargetSpec, exclude_modules: TargetSpec = None,
                 embeddings: bool = False, every_name: bool = True) -> list[str]:
    """Paths of the modules to adapt (embeddings too, when named and `embeddings`); raises ValueError naming close
    matches when nothing matches, or, with `every_name`, when a name of a target list matches nothing (a typo would
    otherwise silently adapt fewer layers; PEFT only refuses a list of which no name matches)."""
    candidates = dict(candidate_modules(model, embeddings))
    if target_modules == ALL_LINEAR:
        heads = output_head_paths(model)
        chosen = [path for path, module in candidates.items() if path not in heads and is_linear_like(module)]
    else:
        chosen = [path for path in candidates if matches(path, target_modules)]
        unmatched = [key for key in target_modules if not any(matches(path, (key,)) for path in chosen)] \
            if every_name and isinstance(target_modules, tuple) else []
        if not chosen or unmatched:
            raise ValueError(_no_match_message(model, tuple(unmatched) or target_modules, list(candidates)))
    chosen = [path for path in chosen if not matches(path, exclude_modules)]
    if not chosen:
        raise ValueError(f"every module matching target_modules={target_modules!r} is excluded by {exclude_modules!r}")
    return chosen


def _no_match_message(model: nn.Module, spec: TargetSpec, candidates: list[str]) -> str:
    """Which names match nothing, with the close matches of the first few (long lists are abridged)."""
    keys = [spec] if isinstance(spec, str) else list(spec or ())
    all_paths = [name for name, _ in model.named_modules() if name]
    names = sorted({path.rsplit(".", 1)[-1] for path in candidates} | set(candidates))
    suggestions: list[str] = []
    for key in keys[:SHOWN_NAMES]:
        suggestions += difflib.get_close_matches(key[:MAX_NAME_CHARS], names, n=3, cutoff=0.5)
    non_linear = [k for k in keys[:SHOWN_NAMES] if any(p == k or p.endswith("." + k) for p in all_paths)]
    shown = _SHOW.repr(spec)
    message = f"target_modules={shown} matches no linear layer of {type(model).__name__}."
    if non_linear:
        message += f" {non_linear} exist but are not linear layers (nn.Linear, Conv1D, NF4Linear)."
    if suggestions:
        message += f" Close matches: {sorted(set(suggestions))}."
    else:
        message += f" Linear layer names: {sorted({p.rsplit('.', 1)[-1] for p in candidates})[:20]}."
    return message


def compact_target_list(model: nn.Module, targets: list[str]) -> list[str]:
    """The shortest list of names that selects exactly `targets` (last path components if they suffice)."""
    short = sorted({path.rsplit(".", 1)[-1] for path in targets})
    if sorted(path for path, _ in candidate_modules(model) if matches(path, tuple(short))) == sorted(targets):
        return short
    return sorted(targets)

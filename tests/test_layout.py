"""The package's layering: no import cycle, and no folder importing a folder above it (README, "How the code is laid
out"). Every import counts, also those inside functions, so a lazy import cannot hide an upward dependency."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import lorakit

ROOT = Path(lorakit.__file__).parent
LAYERS = ("adapters", "quant", "formats", "models", "training", "inspect")  # bottom to top; root modules sit above


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    relative = Path(*name.split(".")[1:]) if "." in name else Path()
    return (ROOT / relative).with_suffix(".py").is_file() or (ROOT / relative / "__init__.py").is_file()


def _imports(path: Path) -> set[str]:
    """lorakit modules imported anywhere in `path` (a `from package import submodule` counts as the submodule)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "lorakit"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != "lorakit":
                continue
            submodules = {f"{source}.{alias.name}" for alias in node.names if _is_module(f"{source}.{alias.name}")}
            found |= submodules or {source}
    return {module for module in found if module != name}


GRAPH = {_module_name(path): _imports(path) for path in ROOT.rglob("*.py")}


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else len(LAYERS)


def test_the_graph_sees_the_package() -> None:
    assert {"lorakit.adapters.layer", "lorakit.quant.nf4", "lorakit.training.trainer", "lorakit.cli"} <= set(GRAPH)
    assert "lorakit.adapters.layer" in GRAPH["lorakit.adapters.model"]
    assert "lorakit.training.distributed" in GRAPH["lorakit.training.trainer"]  # `from . import distributed`


def test_no_folder_imports_a_folder_above_it() -> None:
    upward = sorted(f"{module} -> {target}" for module, targets in GRAPH.items() for target in targets
                    if target in GRAPH and _layer(target) > _layer(module))
    assert upward == []


def test_the_adapter_core_never_imports_quantization() -> None:
    assert not [m for m in GRAPH if m.startswith("lorakit.adapters") and any(
        t.startswith("lorakit.quant") for t in GRAPH[m])]


def test_no_import_cycle() -> None:
    state: dict[str, str] = {}
    cycles: list[list[str]] = []

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for target in sorted(GRAPH.get(module, ())):
            if target not in GRAPH or target.startswith(module + "."):  # a package importing its own submodules
                continue
            if state.get(target) == "open":
                cycles.append(trail[trail.index(target):] + [target])
            elif target not in state:
                visit(target, trail + [target])
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_a_cycle_is_found_when_there_is_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(GRAPH, "lorakit.adapters.deltas", GRAPH["lorakit.adapters.deltas"] | {"lorakit.adapters.model"})
    with pytest.raises(AssertionError):
        test_no_import_cycle()
    monkeypatch.setitem(GRAPH, "lorakit.adapters.deltas", {"lorakit.quant.nf4"})
    with pytest.raises(AssertionError):
        test_no_folder_imports_a_folder_above_it()


@pytest.mark.parametrize("old, names", [
    ("nf4", ["quantize_nf4", "NF4Linear", "nf4_codebook"]),
    ("quantize", ["quantize", "memory_footprint", "save_quantized", "load_quantized", "dense_module"]),
    ("data", ["make_builtin_task", "exact_match", "collate", "BatchStream", "tokenize_records"]),
    ("train", ["TrainConfig", "Trainer", "train", "load_datasets", "cosine_with_warmup"]),
    ("peft_format", ["save_adapter", "load_adapter", "read_json_object", "PREFIX"]),
    ("layer", ["AdaptedLinear", "Adapter", "dense_weight", "is_conv1d"]),
    ("model", ["adapt", "merge_and_unload", "mixed_batch"]),
    ("targets", ["find_targets", "conv1d_class"]),
    ("combine", ["combine_adapters"]), ("config", ["LoraConfig", "VeraConfig"]), ("deltas", ["LoRADelta"]),
    ("optim", ["loraplus_param_groups"]), ("evaluate", ["evaluate_loss"]), ("distributed", ["context"]),
    ("checkpoint", ["save_checkpoint"]), ("metrics", ["MetricsLog"]), ("saved_modules", ["ModulesToSave"]),
])
def test_the_flat_layouts_module_paths_keep_importing(old: str, names: list[str]) -> None:
    module = importlib.import_module(f"lorakit.{old}")
    for name in names:
        assert getattr(module, name) is not None
    assert callable(lorakit.quantize)  # the function, not the old module of the same name


def test_documented_paths_import() -> None:
    from lorakit.inspect import analyze_adapter, format_plan, plan  # noqa: F401
    from lorakit.models import load_model, resolve_model  # noqa: F401
    from lorakit.nf4 import quantize_nf4
    from lorakit.quant.nf4 import quantize_nf4 as moved

    assert quantize_nf4 is moved
    assert importlib.import_module("lorakit.nf4") is importlib.import_module("lorakit.quant.nf4")
    from lorakit.data import make_builtin_task
    from lorakit.training.task import make_builtin_task as moved_task

    assert make_builtin_task is moved_task

"""Stream a checkpoint into a model one tensor at a time, quantizing as it goes: QLoRA's promise kept at load time.

The model is first built as a skeleton whose parameters sit on the meta device (they cost nothing; buffers such as
rotary frequencies are computed as usual). Then each checkpoint tensor is read, turned into what the model keeps,
and put in place:
- the weight of a layer that `quantize()` would quantize (an nn.Linear or HF Conv1D whose path `skip` does not match)
  becomes an `NF4Linear` at once: cast to the dtype, quantized on the target device, the dense copy dropped;
- any other floating tensor is cast to the dtype (float32 for a model's `_keep_in_fp32_modules`) and placed;
- tied parameters (lm_head = embed_tokens) are read once and shared, as `from_pretrained` ties them;
- a directory written by `lorakit quantize` already holds NF4 layers: their packed codes and scales are gathered and
  the layer is built, nothing is quantized again.
So the process holds the finished part of the model plus one tensor in flight, never the dense model. The result is
bit for bit what `from_pretrained(dtype)` followed by `quantize()` gives (tested).
"""

from __future__ import annotations

import contextlib
import ctypes
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..adapters.base import is_conv1d
from ..adapters.targets import candidate_modules, matches, replace_module
from ..formats.checkpoint import Checkpoint
from ..formats.quantized import BUFFER_PREFIX, nf4_layer_from_tensors
from ..quant.nf4 import NF4Linear


@dataclass(frozen=True)
class NF4Options:
    """The options of `quantize()`: layers whose path matches `skip` (names or path suffixes) stay dense."""

    skip: tuple[str, ...] = ("lm_head",)
    blocksize: int = 64
    double_quant: bool = True


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Inside the block every parameter a module registers goes to the meta device; buffers stay real."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def stream_checkpoint(
    model: nn.Module,
    checkpoint: Checkpoint,
    dtype: torch.dtype | None,
    device: str | torch.device = "cpu",
    nf4: NF4Options | None = None,
    quantized_layers: dict[str, dict[str, Any]] | None = None,
    progress: bool | None = None,
) -> nn.Module:
    """Fill `model` (a skeleton with parameters on meta) from `checkpoint`, tensor by tensor; returns it in eval mode.

    dtype: floating tensors are cast to it (None: kept as stored). nf4: quantize eligible layers while loading.
    quantized_layers: path -> NF4 metadata of the layers a `lorakit quantize` directory stores already quantized.
    Raises ValueError naming the file and tensor for an unexpected, misshapen, unreadable or missing tensor; a
    model that failed to load is never returned.
    """
    loader = _Loader(model, dtype, torch.device(device), nf4, quantized_layers or {}, checkpoint)
    what = "quantize" if nf4 else "load"
    with tqdm(total=len(checkpoint), desc=what, unit="tensor", disable=None if progress is None else not progress,
              dynamic_ncols=True) as bar:
        for entry in checkpoint:
            loader.place(entry.name)
            bar.update(1)
    loader.finish()
    return model.eval()


class _Loader:
    """The state of one streamed load: which names alias one tensor, which layers quantize, what is still pending."""

    def __init__(self, model: nn.Module, dtype: torch.dtype | None, device: torch.device, nf4: NF4Options | None,
                 quantized_layers: dict[str, dict[str, Any]], checkpoint: Checkpoint) -> None:
        self.model, self.dtype, self.device, self.nf4 = model, dtype, device, nf4
        self.checkpoint = checkpoint
        self.aliases = _alias_groups(model)
        self.to_quantize = {path for path, module in candidate_modules(model) if nf4 is not None
                            and not matches(path, nf4.skip) and path not in quantized_layers
                            and not isinstance(module, NF4Linear)}
        self.quantized_layers = quantized_layers
        self.pending: dict[str, dict[str, Tensor]] = {}  # a prebuilt NF4 layer's tensors read so far
        self.fields = {path: {e.name[len(path) + 1:] for e in checkpoint if e.name.startswith(path + ".")}
                       for path in quantized_layers}
        self.placed: set[str] = set()
        self.keep_fp32 = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
        self.prefix = getattr(model, "base_model_prefix", "")
        self.ignored = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()]

    # -- one tensor -------------------------------------------------------------------------------------------

    def place(self, name: str) -> None:
        owner, _, field = name.rpartition(".")
        if owner in self.quantized_layers:
            self._gather_nf4(owner, field, self.checkpoint.read(name))
        elif name.startswith(BUFFER_PREFIX):
            self._set(name[len(BUFFER_PREFIX):], self.checkpoint.read(name).to(self.device, copy=True))
        else:
            key = self._model_key(name)
            if key is None or key in self.placed:  # ignored, or a tied alias already read under another name
                return
            targets = self.aliases[key]
            self.placed.update(targets)
            self._place_tensor(name, targets, self.checkpoint.read(name))

    def _place_tensor(self, name: str, targets: tuple[str, ...], tensor: Tensor) -> None:
        expected = self._current(targets[0])
        if tuple(tensor.shape) != tuple(expected.shape):
            raise ValueError(f"{self.checkpoint.entries[name].file}: tensor {name} has shape {tuple(tensor.shape)}, "
                             f"the model expects {tuple(expected.shape)}")
        dense: Tensor | None = None
        for target in targets:
            path, _, attr = target.rpartition(".")
            if path in self.to_quantize and attr == "weight":
                self._quantize_layer(path, tensor)
                continue
            if dense is None:
                value = self._cast(target, tensor)
                dense = nn.Parameter(value, requires_grad=expected.requires_grad) \
                    if isinstance(expected, nn.Parameter) else value
            self._set(target, dense)

    def _quantize_layer(self, path: str, weight: Tensor) -> None:
        module = self.model.get_submodule(path)
        conv = is_conv1d(module)
        weight = weight.to(device=self.device, dtype=self.dtype or weight.dtype)
        bias = module.bias
        layer = NF4Linear.from_weight(weight.T if conv else weight, None if bias is None or bias.is_meta else bias,
                                      self.nf4.blocksize, self.nf4.double_quant)
        if bias is not None and bias.is_meta:  # read later: keep a placeholder until it arrives
            layer.bias = nn.Parameter(torch.empty_like(bias, dtype=layer.compute_dtype), requires_grad=False)
        layer.from_conv1d = conv
        replace_module(self.model, path, layer)

    def _gather_nf4(self, path: str, field: str, tensor: Tensor) -> None:
        tensors = self.pending.setdefault(path, {})
        tensors[field] = tensor.to(self.device, copy=True)
        if set(tensors) == self.fields[path]:
            layer = nf4_layer_from_tensors(path, self.pending.pop(path), self.quantized_layers[path], self.dtype,
                                           self.checkpoint.entries[f"{path}.{field}"].file)
            replace_module(self.model, path, layer)

    # -- names, values ----------------------------------------------------------------------------------------

    def _model_key(self, name: str) -> str | None:
        """The model's name for checkpoint tensor `name` (with or without the base model's prefix); None: ignore."""
        candidates = [name]
        if self.prefix:
            candidates += [f"{self.prefix}.{name}", name.removeprefix(f"{self.prefix}.")]
        for candidate in candidates:
            if candidate in self.aliases:
                return candidate
        if any(pattern.search(name) for pattern in self.ignored):
            return None
        raise ValueError(f"{self.checkpoint.entries[name].file}: unexpected tensor {name}: "
                         f"{type(self.model).__name__} has no such parameter or buffer")

    def _current(self, name: str) -> Tensor:
        path, _, attr = name.rpartition(".")
        return getattr(self.model.get_submodule(path) if path else self.model, attr)

    def _cast(self, name: str, tensor: Tensor) -> Tensor:
        """A copy of its own (never a view of the mapped file), floating tensors in the load's dtype."""
        if not tensor.is_floating_point():
            dtype = tensor.dtype
        elif any(part in name.split(".") for part in self.keep_fp32):
            dtype = torch.float32
        else:
            dtype = self.dtype or tensor.dtype
        return tensor.to(device=self.device, dtype=dtype, copy=True)

    def _set(self, name: str, value: Tensor) -> None:
        path, _, attr = name.rpartition(".")
        module = self.model.get_submodule(path) if path else self.model
        if isinstance(module, NF4Linear) and attr == "bias":
            value = nn.Parameter(value.to(module.compute_dtype), requires_grad=False)
        if attr in module._parameters:
            module._parameters[attr] = value if isinstance(value, nn.Parameter) else nn.Parameter(value)
        else:
            module._buffers[attr] = value

    # -- the end ----------------------------------------------------------------------------------------------

    def finish(self) -> None:
        """Fail on anything not loaded; move the buffers the skeleton computed to the device."""
        where = self.checkpoint.directory
        if self.pending:
            path = next(iter(self.pending))
            missing = sorted(self.fields[path] - set(self.pending[path]))
            raise ValueError(f"{where}: NF4 layer {path} lacks {missing}")
        unbuilt = [path for path in self.quantized_layers if not isinstance(self.model.get_submodule(path), NF4Linear)]
        absent = [f"{path}.packed" for path in unbuilt]
        absent += [name for name, tensor in [*self.model.named_parameters(), *self.model.named_buffers()]
                   if tensor.is_meta]
        if absent:
            raise ValueError(f"{where}: missing tensor {absent[0]}: no file of the checkpoint holds it")
        self.model.to(self.device)
        release_freed_memory()


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's malloc_trim). Quantizing leaves freed blocks of the
    16 MiB working chunks in malloc's arenas, which stay in the process's resident memory: measured on a 1.1B model,
    1,203 MiB resident after the load, 1,003 MiB after trimming, for 726 MiB of weights. A no-op off glibc."""
    _glibc("malloc_trim", 0)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
HEAP_MMAP_THRESHOLD = 2 << 20


def limit_heap_retention() -> None:
    """Serve every allocation above 2 MiB from its own mapping, returned to the system when freed (glibc's mallopt).
    By default glibc raises that threshold up to 32 MiB as large blocks are freed, and the per-layer float32 copies a
    training step makes on an NF4 or half-precision base then stay in the heap, fragmented: measured on a 1.1B NF4
    base, one forward grew the resident memory by 758 MiB with the default, by 208 MiB with this. For a process
    that trains (`lorakit train`); a no-op off glibc."""
    _glibc("mallopt", M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD)


def _glibc(function: str, *args: int) -> None:
    """Call one of glibc's malloc tuning functions; nothing where the C library is another one."""
    try:
        getattr(ctypes.CDLL("libc.so.6"), function)(*args)
    except (OSError, AttributeError):
        pass


def _alias_groups(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Every parameter and persistent buffer name -> all names of the same tensor (tied weights share one group)."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    for path, module in model.named_modules(remove_duplicate=False):
        for name, buffer in module._buffers.items():
            if buffer is not None and name not in module._non_persistent_buffers_set:
                groups.setdefault(id(buffer), []).append(f"{path}.{name}" if path else name)
    return {name: tuple(names) for names in groups.values() for name in names}

"""4-bit NormalFloat (NF4) weights with double quantization, and a frozen NF4 linear layer.

QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs") stores the frozen base weights in
4 bits and trains adapters on top. This module implements its storage format, byte for byte as bitsandbytes lays it out
on CPU, in plain PyTorch (any device).

**4-bit NormalFloat** (QLoRA §3, "4-bit NormalFloat Quantization"). Pretrained weights are roughly N(0, σ²), so the 16
levels are quantiles of the standard normal, rescaled to [-1, 1]. With offset δ = 0.9677083 (the probability at which
the outermost level sits) and Φ⁻¹ the normal quantile function, the paper takes 2³ = 8 quantiles for the negative half
and 2³ + 1 = 9 for the positive half, at probabilities evenly spaced from δ down to 1/2, and drops one of the two
zeros (Φ⁻¹(1/2) = 0). That gives:

    negative:  -Φ⁻¹(p_i),  p_i = δ + i (1/2 - δ) / 7,  i = 0..6    (7 levels)
    positive:   Φ⁻¹(q_i),  q_i = δ + i (1/2 - δ) / 8,  i = 0..7    (8 levels)
    levels   = sort(negative ∪ {0} ∪ positive) / Φ⁻¹(δ)             (16 levels, -1 and 1 included)

The type is asymmetric so that 0 is represented exactly. ``nf4_codebook()`` derives the levels.

**Block-wise absmax quantization.** The weight is flattened in row-major order and cut into blocks of 64 elements
(a block may span rows; the last block may be shorter). Each block b has the float32 scale absmax_b = max |w| and
every element gets the code of the level nearest to w · (1 / absmax_b), clamped to [-1, 1]; ties go to the lower code
(thresholds are the float32 midpoints between levels). An all-zero block gets code 7 (the level 0.0) and absmax 0.
Two codes share a byte, the first element in the high nibble: ``byte[i] = code[2i] << 4 | code[2i + 1]``.
Dequantization is ``w ≈ level[code] · absmax_b``, computed in float32. Storage: 4 + 32/64 = 4.5 bits per weight.

**Double quantization** (QLoRA §3, "Double Quantization"). The float32 block scales themselves are quantized: their
mean c is subtracted (kept as ``absmax_offset``) and the centred values are quantized in blocks of 256 with an 8-bit
map, each block with its own float32 absmax (``absmax_scale``). Dequantized scale = map[q] · absmax_scale[b // 256] + c.
The map is bitsandbytes' signed "dynamic tree" map (``dynamic_tree_map()``; Dettmers 2016, "8-Bit Approximations
for Parallelism in Deep Learning"): a sign bit, a unary-coded decimal exponent, and a linear fraction, giving 2^k
levels in the decade [10^(k-6) · 0.1, 10^(k-6)] for k = 0..6, both signs, plus 0 and 1. The 4-bit codes come from the
raw scales, so they are the same with or without double quantization; storage drops to
4 + 8/64 + 32/(64·256) ≈ 4.127 bits per weight.

Bit-compatibility: ``quantize_nf4`` reproduces ``bitsandbytes.functional.quantize_4bit(w, quant_type="nf4")`` on CPU
(packed bytes, float32 absmax, and with ``compress_statistics=True`` the absmax codes, absmax2 and offset), including
its CPU kernel's way of picking 8-bit codes: the normalized scale is first rounded to a 65,536-point grid on [-1, 1],
then the grid point goes to its nearest level (ties down). One deliberate difference: bitsandbytes stores absmax 1e-38
for an all-zero *ragged last* block; here it is 0 like every other all-zero block (the codes are the same).

``NF4Linear`` is a frozen base layer over an ``NF4Weight``: the forward pass dequantizes, multiplies, and keeps only
the packed tensors for the backward pass, which dequantizes again (QLoRA keeps no dense copy of the base weight).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..adapters.base import matmul_dtype

__all__ = [
    "NF4_OFFSET",
    "NF4Linear",
    "NF4Weight",
    "dequantize_reference",
    "dynamic_tree_map",
    "nf4_codebook",
    "quantize_nf4",
]

NF4_OFFSET = 0.9677083  # probability at which the outermost NF4 level sits (QLoRA §3)
ZERO_CODE = 7  # index of the level 0.0
_DQ_GRID_POINTS = 65536  # 8-bit codes are picked on this grid over [-1, 1], as bitsandbytes' CPU kernel does
_MIN_ABSMAX = 1e-38  # bitsandbytes' guard against 1/0; an all-zero block then scales to exact zeros
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TENSOR_FIELDS = ("packed", "absmax", "absmax_q", "absmax_scale", "absmax_offset")
# Work on CPU goes in chunks of this many elements: float32 temporaries of 16 MiB stay below glibc's mmap threshold
# (32 MiB), so they are reused rather than page-faulted in anew, while few chunks keep thread-pool handoffs rare.
_CPU_CHUNK_ELEMENTS = 1 << 22


# ----------------------------------------------------------------------------------------------------------------
# Codebooks
# ----------------------------------------------------------------------------------------------------------------


def nf4_codebook() -> Tensor:
    """The 16 NF4 levels, ascending, float32 [16], derived from normal quantiles (see the module docstring).

    The quantile points are spaced in float32 and the quantiles evaluated in float64, then rounded to float32 and
    divided in float32 by the largest one; this reproduces bitsandbytes' constants exactly.
    """
    points_pos = torch.linspace(NF4_OFFSET, 0.5, 9, dtype=torch.float32)[:-1].double()  # [8]
    points_neg = torch.linspace(NF4_OFFSET, 0.5, 8, dtype=torch.float32)[:-1].double()  # [7]
    positive = torch.special.ndtri(points_pos).float()
    negative = (-torch.special.ndtri(points_neg)).float()
    levels = torch.cat([negative, torch.zeros(1), positive]).sort().values  # [16]
    return levels / levels.max()


def dynamic_tree_map() -> Tensor:
    """bitsandbytes' signed 8-bit dynamic tree map (``create_dynamic_map(signed=True)``), ascending float32 [256].

    For k = 0..6 the interval [0.1, 1] is cut into 2^k equal parts (edges spaced in float32); the part midpoints,
    times 10^(k-6), are the levels of that decade, taken with both signs. Adding 0 and 1 gives 2·127 + 2 = 256 levels.
    """
    levels = [torch.tensor([0.0, 1.0])]
    for k in range(7):
        edges = torch.linspace(0.1, 1.0, 2**k + 1, dtype=torch.float32)
        decade = (edges[:-1] + edges[1:]) / 2 * (10.0 ** (k - 6))  # [2^k]
        levels += [decade, -decade]
    return torch.cat(levels).sort().values


# Lookup tables, built once on CPU (so every device gets the same bits) and cached per device.


@functools.cache
def _codebook_on(device: torch.device) -> Tensor:
    return nf4_codebook().to(device)


def _thresholds() -> Tensor:
    """Float32 midpoints between adjacent NF4 levels [15]; the code of x is the number of them below x (ties down)."""
    levels = nf4_codebook()
    return (levels[:-1] + levels[1:]) / 2


_CODE_BINS = 256  # uniform bins over [-1, 1] for the code lookup; NF4 thresholds are ≥ 0.08 apart, bins 0.0078 wide


@functools.cache
def _code_tables_on(device: torch.device) -> tuple[Tensor, Tensor]:
    """Tables that turn a scaled value x ∈ [-1, 1] into its NF4 code with two gathers and one comparison.

    Bin k covers [-1 + 2k/K, -1 + 2(k+1)/K); widened by a quarter bin on each side it holds at most one threshold.
    With ``below[k]`` the number of thresholds under the widened bin's start and ``inside[k]`` the threshold in it
    (+inf if none), code(x) = below[k] + (x > inside[k]) counts the thresholds strictly below x exactly, for any x
    whose computed bin index is off by less than a quarter bin (float32 rounding of x·K/2 + K/2 is off by < 2⁻¹⁵).
    Returns (below [K] uint8, inside [K] float32).
    """
    thresholds = _thresholds().double()  # [15]
    width = 2.0 / _CODE_BINS
    start = -1.0 + width * torch.arange(_CODE_BINS, dtype=torch.float64) - width / 4  # [K], exact binary fractions
    stop = start + 1.5 * width
    below = (thresholds[None, :] < start[:, None]).sum(1)  # [K]
    within = (thresholds[None, :] >= start[:, None]) & (thresholds[None, :] < stop[:, None])  # [K, 15]
    if within.sum(1).max() > 1:
        raise AssertionError("NF4 code bins must hold at most one threshold each")
    inside = torch.where(within, thresholds[None, :], torch.inf).amin(1)  # [K]
    return below.to(torch.uint8).to(device), inside.float().to(device)


@functools.cache
def _dynamic_map_on(device: torch.device) -> Tensor:
    return dynamic_tree_map().to(device)


@functools.cache
def _grid_codes_on(device: torch.device) -> Tensor:
    """The 8-bit code of each point i of the grid -1 + 2i/65535 over [-1, 1] (nearest level, ties down) [65536]."""
    levels = dynamic_tree_map()
    midpoints = (levels[:-1] + levels[1:]) * 0.5
    grid = -1.0 + (2.0 * torch.arange(_DQ_GRID_POINTS, dtype=torch.float32)) / (_DQ_GRID_POINTS - 1)
    return torch.bucketize(grid, midpoints).to(torch.uint8).to(device)


@functools.cache
def _byte_pair_table_on(device: torch.device) -> Tensor:
    """For each byte value, its two levels (high nibble first) as one int64 holding two float32s [256]."""
    levels = nf4_codebook()
    byte = torch.arange(256)
    pairs = torch.stack([levels[byte >> 4], levels[byte & 15]], dim=1)  # [256, 2] float32
    return pairs.contiguous().view(torch.int64).view(256).to(device)


# ----------------------------------------------------------------------------------------------------------------
# The quantized tensor
# ----------------------------------------------------------------------------------------------------------------


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(eq=False)
class NF4Weight:
    """An NF4-quantized tensor: packed 4-bit codes plus per-block scales (plain float32 or double-quantized).

    Exactly one of ``absmax`` or the three double-quantization fields (``absmax_q``, ``absmax_scale``,
    ``absmax_offset``) is set. ``blocksize`` and ``double_quant_blocksize`` count elements.
    """

    packed: Tensor  # [ceil(numel / 2)] uint8, byte i = code[2i] << 4 | code[2i + 1]
    shape: torch.Size  # original shape
    dtype: torch.dtype  # original dtype
    blocksize: int = 64
    absmax: Tensor | None = None  # [num_blocks] float32
    absmax_q: Tensor | None = None  # [num_blocks] uint8 codes into dynamic_tree_map()
    absmax_scale: Tensor | None = None  # [ceil(num_blocks / double_quant_blocksize)] float32
    absmax_offset: Tensor | None = None  # [] float32, mean of the raw absmax
    double_quant_blocksize: int = 256

    def __post_init__(self) -> None:
        self.shape = torch.Size(self.shape)
        self._check()

    def _check(self) -> None:
        numel = math.prod(self.shape)
        if numel == 0:
            raise ValueError("NF4Weight: the tensor has no elements")
        if self.blocksize <= 0 or self.blocksize % 2 or self.double_quant_blocksize <= 0:
            raise ValueError(
                f"NF4Weight: blocksize must be positive and even and double_quant_blocksize positive, got "
                f"{self.blocksize} and {self.double_quant_blocksize}"
            )
        if self.dtype not in _SUPPORTED_DTYPES:
            raise ValueError(f"NF4Weight: dtype must be float32, float16 or bfloat16, got {self.dtype}")
        expected = {"packed": ((numel + 1) // 2, torch.uint8)}
        if self.double_quant:
            num_scale_blocks = -(-self.num_blocks // self.double_quant_blocksize)
            expected |= {
                "absmax_q": (self.num_blocks, torch.uint8),
                "absmax_scale": (num_scale_blocks, torch.float32),
                "absmax_offset": (1, torch.float32),
            }
        else:
            expected["absmax"] = (self.num_blocks, torch.float32)
        present = {name for name in ("absmax", "absmax_q", "absmax_scale", "absmax_offset")
                   if getattr(self, name) is not None}
        if present != set(expected) - {"packed"}:
            raise ValueError(
                "NF4Weight: set either absmax, or all of absmax_q, absmax_scale and absmax_offset; "
                f"got {sorted(present)}"
            )
        for name, (count, dtype) in expected.items():
            tensor = getattr(self, name)
            if tensor.numel() != count or tensor.dtype != dtype:
                raise ValueError(
                    f"NF4Weight: {name} must hold {count} {dtype} values for shape {tuple(self.shape)} and "
                    f"blocksize {self.blocksize}, got {tensor.numel()} {tensor.dtype}"
                )

    # --- sizes ----------------------------------------------------------------------------------------------------

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def num_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def double_quant(self) -> bool:
        return self.absmax is None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nbytes(self) -> int:
        """Bytes of storage: packed codes plus scales (the shared codebooks are constants and not counted)."""
        return sum(t.nbytes for t in self.state_dict().values())

    # --- dequantization -------------------------------------------------------------------------------------------

    def absmax_float(self) -> Tensor:
        """The float32 block scales [num_blocks]: dequantized with double quantization, else ``absmax`` itself."""
        if self.absmax is not None:
            return self.absmax
        levels = _dynamic_map_on(self.device)[self.absmax_q.int()]  # [num_blocks]
        if self.num_blocks % self.double_quant_blocksize == 0:  # the usual case: a broadcast, no expanded copy
            scaled = levels.view(-1, self.double_quant_blocksize).mul_(self.absmax_scale[:, None]).view(-1)
        else:
            scaled = levels.mul_(self.absmax_scale.repeat_interleave(self.double_quant_blocksize)[: self.num_blocks])
        return scaled.add_(self.absmax_offset)  # two roundings (multiply, then add), as bitsandbytes does

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The dense tensor in its original shape: float32 level · scale, rounded once to ``dtype``."""
        out = torch.empty(self.numel, dtype=dtype, device=self.device)
        scales = self.absmax_float()
        full = self.numel // self.blocksize  # complete blocks, done by the fast path
        if full:
            body = out[: full * self.blocksize].view(full, self.blocksize)
            _dequantize_blocks_into(body, self.packed[: full * self.blocksize // 2].view(full, -1), scales[:full])
        if full < self.num_blocks:  # a ragged last block
            start = full * self.blocksize
            tail = _unpack_codes(self.packed[start // 2 :], self.numel - start)
            out[start:] = _codebook_on(self.device)[tail] * scales[full]
        return out.view(self.shape)

    # --- movement and serialization -------------------------------------------------------------------------------

    def to(self, device: torch.device | str) -> NF4Weight:
        """A copy with every tensor on ``device``."""
        return NF4Weight.from_state_dict({k: v.to(device) for k, v in self.state_dict().items()}, self.metadata())

    def state_dict(self) -> dict[str, Tensor]:
        """The tensors, by field name: ``packed`` and ``absmax``, or ``packed`` and the three double-quant ones."""
        names = ("packed", "absmax_q", "absmax_scale", "absmax_offset") if self.double_quant else ("packed", "absmax")
        return {name: getattr(self, name) for name in names}

    def metadata(self) -> dict[str, Any]:
        """JSON-able description that, with ``state_dict()``, rebuilds the weight."""
        return {
            "quant_type": "nf4",
            "shape": list(self.shape),
            "dtype": _dtype_name(self.dtype),
            "blocksize": self.blocksize,
            "double_quant_blocksize": self.double_quant_blocksize,
        }

    @classmethod
    def from_state_dict(cls, tensors: dict[str, Tensor], metadata: dict[str, Any]) -> NF4Weight:
        """Inverse of ``state_dict()`` / ``metadata()``; raises ValueError when they do not fit together."""
        if metadata.get("quant_type", "nf4") != "nf4":
            raise ValueError(f"NF4Weight: unsupported quant_type {metadata['quant_type']!r}")
        dtype = {_dtype_name(d): d for d in _SUPPORTED_DTYPES}.get(str(metadata["dtype"]))
        if dtype is None:
            raise ValueError(f"NF4Weight: dtype must be float32, float16 or bfloat16, got {metadata['dtype']!r}")
        unknown = set(tensors) - set(_TENSOR_FIELDS)
        if unknown or "packed" not in tensors:
            raise ValueError(f"NF4Weight: expected packed and scale tensors, got {sorted(tensors)}")
        offset = tensors.get("absmax_offset")
        return cls(
            packed=tensors["packed"].reshape(-1),
            shape=torch.Size(metadata["shape"]),
            dtype=dtype,
            blocksize=int(metadata["blocksize"]),
            absmax=tensors.get("absmax"),
            absmax_q=tensors.get("absmax_q"),
            absmax_scale=tensors.get("absmax_scale"),
            absmax_offset=None if offset is None else offset.reshape(()),
            double_quant_blocksize=int(metadata.get("double_quant_blocksize", 256)),
        )


def _unpack_codes(packed: Tensor, count: int) -> Tensor:
    """The first ``count`` 4-bit codes of ``packed`` in element order, int64 [count]."""
    return torch.stack([packed >> 4, packed & 15], dim=-1).reshape(-1)[:count].long()


def _dequantize_blocks_into(out: Tensor, packed: Tensor, scales: Tensor) -> None:
    """out[b, j] = level[code(b, j)] · scales[b], computed in float32 and rounded to out.dtype.

    out [blocks, blocksize], packed [blocks, blocksize / 2] uint8, scales [blocks] float32. Each byte indexes a
    table of level pairs stored as int64, so one int32-indexed gather writes two float32 values; the scale multiply
    follows. On CPU the work goes in chunks: the gather fills a float32 scratch chunk that stays small (and reused),
    and the multiply writes the output, so the fresh output memory is first touched by a multi-threaded kernel.
    Elsewhere there is one chunk, and a float32 output is filled in place.
    """
    table = _byte_pair_table_on(out.device)
    blocks = out.shape[0]
    on_cpu = out.device.type == "cpu"
    chunk = max(1, _CPU_CHUNK_ELEMENTS // out.shape[1]) if on_cpu else blocks
    direct = out.dtype == torch.float32 and not on_cpu
    scratch = None if direct else torch.empty(min(chunk, blocks), out.shape[1], device=out.device)
    for start in range(0, blocks, chunk):
        stop = min(start + chunk, blocks)
        values = out[start:stop] if direct else scratch[: stop - start]  # [n, blocksize] float32
        torch.index_select(table, 0, packed[start:stop].reshape(-1).int(), out=values.view(torch.int64).view(-1))
        if direct:
            values.mul_(scales[start:stop, None])
        elif out.dtype == torch.float32:
            torch.mul(values, scales[start:stop, None], out=out[start:stop])
        else:
            out[start:stop].copy_(values.mul_(scales[start:stop, None]))


def dequantize_reference(weight: NF4Weight, dtype: torch.dtype = torch.float32) -> Tensor:
    """Straightforward dequantization (unpack every code, look it up, scale): the oracle for the fast path."""
    codes = _unpack_codes(weight.packed, weight.numel)  # [numel]
    scales = weight.absmax_float().repeat_interleave(weight.blocksize)[: weight.numel]  # [numel]
    return (_codebook_on(weight.device)[codes] * scales).to(dtype).view(weight.shape)


# ----------------------------------------------------------------------------------------------------------------
# Quantization
# ----------------------------------------------------------------------------------------------------------------


def _quantize_rows_into(rows: Tensor, absmax: Tensor, packed: Tensor, divide: bool) -> None:
    """Quantize each row of ``rows`` [m, n] as one block, writing absmax [m] and the packed codes [ceil(m n / 2)].

    bitsandbytes' arithmetic: complete blocks are multiplied by the float32 reciprocal of their absmax
    (``divide=False``), its ragged last block is divided by it (``divide=True``); both guard absmax with 1e-38.
    The products are float32 (a half-precision row times a float32 scale promotes exactly), so a bfloat16 or
    float16 weight is never copied to float32 first; each step is one pass over the chunk.
    """
    absmax.copy_(torch.amax(rows.abs(), dim=1))  # [m], exact in any dtype
    guarded = absmax.clamp(min=_MIN_ABSMAX).unsqueeze(1)  # [m, 1]
    scaled = rows / guarded if divide else rows * guarded.reciprocal()  # [m, n] float32
    _pack_codes_into(_nf4_codes(scaled.view(-1)), packed)


def _nf4_codes(scaled: Tensor) -> Tensor:
    """The NF4 code of each value (nearest level, ties to the lower code), uint8 of the same shape [n].

    Equal to ``torch.bucketize(scaled, thresholds)`` (values beyond ±1 take the end codes, as if clamped), through
    the bin tables of ``_code_tables_on``: a binary search per element is ~8× slower on CPU than two gathers.
    """
    below, inside = _code_tables_on(scaled.device)
    half = _CODE_BINS / 2
    bins = torch.add(torch.full((), half, device=scaled.device), scaled, alpha=half)  # x·K/2 + K/2
    bins = bins.to(torch.int32).clamp_(0, _CODE_BINS - 1)  # [n]; truncation is floor here; NaN lands in range
    codes = torch.index_select(below, 0, bins)  # [n] uint8
    return codes.add_(torch.gt(scaled, torch.index_select(inside, 0, bins)).view(torch.uint8))


def _pack_codes_into(codes: Tensor, packed: Tensor) -> None:
    """Two 4-bit codes (uint8 [n]) per byte of ``packed``, first in the high nibble (byte = 16·first + second); an
    odd count is padded with the zero code."""
    if codes.numel() % 2:
        codes = F.pad(codes, (0, 1), value=ZERO_CODE)
    pairs = codes.view(-1, 2)
    torch.add(pairs[:, 1], pairs[:, 0], alpha=16, out=packed)


def _quantize_dynamic_8bit(values: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """Block-wise 8-bit quantization with the dynamic tree map, as bitsandbytes' CPU kernel does it.

    values [n] float32 -> (codes [n] uint8, absmax [ceil(n / blocksize)] float32). Each value is scaled by the
    float32 reciprocal of its block absmax, clamped to [-1, 1], rounded to the grid -1 + 2i/65535 (i = trunc of
    (v + 1) / 2 · 65535 + 1/2), and the grid point takes its nearest level, ties down. An all-zero block gets code 0.
    """
    blocks = -(-values.numel() // blocksize)
    padded = F.pad(values, (0, blocks * blocksize - values.numel())).view(blocks, blocksize)  # zeros keep each max
    absmax = padded.abs().amax(dim=1)
    inverse = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    normed = (padded * inverse.unsqueeze(1)).clamp_(-1.0, 1.0)
    grid_index = ((normed + 1.0) * 0.5 * (_DQ_GRID_POINTS - 1) + 0.5).int()  # truncation, values are >= 0
    codes = _grid_codes_on(values.device)[grid_index]
    codes[absmax == 0] = 0
    return codes.reshape(-1)[: values.numel()], absmax


def quantize_nf4(
    weight: Tensor, blocksize: int = 64, double_quant: bool = True, double_quant_blocksize: int = 256
) -> NF4Weight:
    """Quantize ``weight`` (float32, float16 or bfloat16, any shape) to NF4, optionally with double quantization.

    Matches ``bitsandbytes.functional.quantize_4bit(weight, blocksize, compress_statistics=double_quant,
    quant_type="nf4")`` on CPU bit for bit. The element count need not be a multiple of ``blocksize`` (the last
    block is then shorter) nor even. Raises ValueError for other dtypes, empty or non-finite tensors, and a
    blocksize that is not positive and even.
    """
    if weight.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"quantize_nf4: weight must be float32, float16 or bfloat16, got {weight.dtype}")
    if weight.numel() == 0:
        raise ValueError("quantize_nf4: the weight has no elements")
    if blocksize <= 0 or blocksize % 2 or double_quant_blocksize <= 0:
        raise ValueError(
            f"quantize_nf4: blocksize must be positive and even and double_quant_blocksize positive, got "
            f"{blocksize} and {double_quant_blocksize}"
        )
    with torch.no_grad():
        flat = weight.detach().reshape(-1)  # [numel]
        numel, full = flat.numel(), flat.numel() // blocksize  # full: complete blocks
        absmax = torch.empty(-(-numel // blocksize), dtype=torch.float32, device=flat.device)  # [num_blocks]
        packed = torch.empty((numel + 1) // 2, dtype=torch.uint8, device=flat.device)
        chunk = max(1, _CPU_CHUNK_ELEMENTS // blocksize)  # blocks per chunk; bounds the temporaries
        half = blocksize // 2  # bytes per block
        for start in range(0, full, chunk):
            stop = min(start + chunk, full)
            rows = flat[start * blocksize : stop * blocksize].view(-1, blocksize)
            _quantize_rows_into(rows, absmax[start:stop], packed[start * half : stop * half], divide=False)
        if full * blocksize < numel:  # a ragged last block
            tail = flat[full * blocksize :].view(1, -1)
            _quantize_rows_into(tail, absmax[full:], packed[full * half :], divide=True)
        if not torch.isfinite(absmax).all():
            raise ValueError("quantize_nf4: the weight holds inf or nan")
        common = {"packed": packed, "shape": weight.shape, "dtype": weight.dtype, "blocksize": blocksize,
                  "double_quant_blocksize": double_quant_blocksize}
        if not double_quant:
            return NF4Weight(absmax=absmax, **common)
        offset = absmax.mean()
        absmax_q, absmax_scale = _quantize_dynamic_8bit(absmax - offset, double_quant_blocksize)
        return NF4Weight(absmax_q=absmax_q, absmax_scale=absmax_scale, absmax_offset=offset, **common)


# ----------------------------------------------------------------------------------------------------------------
# Frozen NF4 linear layer
# ----------------------------------------------------------------------------------------------------------------


class _NF4LinearFunction(torch.autograd.Function):
    """y = x Wᵀ + b with W dequantized on the fly; saves only the quantized tensors for backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, bias: Tensor | None, weight: NF4Weight) -> Tensor:
        tensors = weight.state_dict()
        ctx.tensor_names = tuple(tensors)
        ctx.weight_metadata = weight.metadata()
        ctx.save_for_backward(*tensors.values())
        compute = matmul_dtype(x.dtype, x.device)
        b = None if bias is None else bias.to(compute)
        return F.linear(x.to(compute), weight.dequantize(compute), b).to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            tensors = dict(zip(ctx.tensor_names, ctx.saved_tensors, strict=True))
            weight = NF4Weight.from_state_dict(tensors, ctx.weight_metadata)
            compute = matmul_dtype(grad_out.dtype, grad_out.device)
            grad_x = (grad_out.to(compute) @ weight.dequantize(compute)).to(grad_out.dtype)  # [..., out] @ [out, in]
        if ctx.needs_input_grad[1]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_bias, None


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight [out, in] is stored in NF4 (QLoRA's base layer).

    The packed codes and scales are buffers (named as in ``NF4Weight.state_dict()``), so ``.to(device)`` and
    ``state_dict()`` carry them; ``Module.to(dtype)`` / ``.half()`` move but never cast the float32 scales. The bias
    stays an ``nn.Parameter`` with ``requires_grad=False`` (a caller may unfreeze it). ``forward`` casts the input to
    ``compute_dtype``, dequantizes the weight to that dtype and returns ``compute_dtype``; the weight never gets a
    gradient, the input and bias do, and the backward pass dequantizes again instead of keeping a dense copy.
    """

    def __init__(self, weight: NF4Weight, bias: Tensor | None = None, compute_dtype: torch.dtype | None = None):
        super().__init__()
        if len(weight.shape) != 2:
            raise ValueError(f"NF4Linear: the weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.compute_dtype = weight.dtype if compute_dtype is None else compute_dtype
        self._metadata = weight.metadata()
        for name, tensor in weight.state_dict().items():
            self.register_buffer(name, tensor)
        if bias is not None and bias.shape != (self.out_features,):
            raise ValueError(f"NF4Linear: bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_weight(
        cls,
        weight: Tensor,
        bias: Tensor | None = None,
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
    ) -> NF4Linear:
        """Quantize a dense weight [out, in] (e.g. an HF ``Conv1D`` weight passed transposed)."""
        if weight.dim() != 2:
            raise ValueError(f"NF4Linear: the weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
        quantized = quantize_nf4(weight, blocksize=blocksize, double_quant=double_quant)
        return cls(quantized, bias, weight.dtype if compute_dtype is None else compute_dtype)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype | None = None,
    ) -> NF4Linear:
        """Quantize an ``nn.Linear``; the compute dtype defaults to the linear layer's weight dtype."""
        return cls.from_weight(linear.weight, linear.bias, blocksize, double_quant, compute_dtype)

    def quantized_weight(self) -> NF4Weight:
        """The ``NF4Weight`` view of this layer's buffers (shares their storage)."""
        tensors = {name: self._buffers[name] for name in _TENSOR_FIELDS if self._buffers.get(name) is not None}
        return NF4Weight.from_state_dict(tensors, self._metadata)

    def dense_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """The dequantized weight [out, in] in ``dtype`` (default: the compute dtype)."""
        return self.quantized_weight().dequantize(self.compute_dtype if dtype is None else dtype)

    def forward(self, x: Tensor) -> Tensor:
        x = x.to(self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return _NF4LinearFunction.apply(x, bias, self.quantized_weight())

    def _apply(self, fn: Any, recurse: bool = True) -> NF4Linear:
        # Module.to(dtype) casts every floating buffer; the float32 scales must only move. An int32 view is not
        # floating, so fn moves it without casting, and viewing back restores the float32 bits.
        scales = {name: self._buffers[name] for name in _TENSOR_FIELDS
                  if self._buffers.get(name) is not None and self._buffers[name].is_floating_point()}
        for name in scales:
            self._buffers[name] = None
        super()._apply(fn, recurse)
        for name, buf in scales.items():
            self._buffers[name] = fn(buf.view(torch.int32)).view(torch.float32)
        return self

    def extra_repr(self) -> str:
        meta = self._metadata
        quant = f"nf4, blocksize={meta['blocksize']}"
        if self.quantized_weight().double_quant:
            quant += f", double_quant_blocksize={meta['double_quant_blocksize']}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"compute_dtype={_dtype_name(self.compute_dtype)}, {quant}"
        )

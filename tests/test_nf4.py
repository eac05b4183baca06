"""NF4 quantization and NF4Linear: codebooks, error bounds, bitsandbytes bit identity, autograd, storage."""

import json
import math
from statistics import NormalDist

import pytest
import torch
import torch.nn.functional as F

from lorakit.quant.nf4 import NF4Linear, NF4Weight, dequantize_reference, dynamic_tree_map, nf4_codebook, quantize_nf4

# bitsandbytes 0.50.2's NF4 table (bitsandbytes.functional.get_4bit_type("nf4")), code 0..15.
PUBLISHED_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]
LEVELS = torch.tensor(PUBLISHED_NF4, dtype=torch.float32)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def oracle_dequantize(packed: torch.Tensor, scales: torch.Tensor, numel: int, blocksize: int = 64) -> torch.Tensor:
    """Flat-block float32 reference: element i is LEVELS[code i] * scales[i // blocksize], high nibble first."""
    codes = torch.empty(packed.numel() * 2, dtype=torch.long)
    codes[0::2] = (packed.long() // 16)
    codes[1::2] = (packed.long() % 16)
    block = torch.arange(numel) // blocksize
    return LEVELS[codes[:numel]] * scales.float()[block]


def bnb_quantize(weight: torch.Tensor, double_quant: bool):
    """bitsandbytes' CPU NF4 quantization: (packed bytes, raw state, dequantized float32 block scales)."""
    bnbf = pytest.importorskip("bitsandbytes.functional")
    packed, state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    if double_quant:
        scales = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    else:
        scales = state.absmax
    return packed.reshape(-1), state, scales


# ---------------------------------------------------------------------------------------------------------------
# Codebooks
# ---------------------------------------------------------------------------------------------------------------


def test_codebook_equals_published_constants():
    levels = nf4_codebook()
    assert levels.dtype == torch.float32 and levels.shape == (16,)
    assert torch.equal(levels, LEVELS)


def test_codebook_levels_are_normal_quantiles():
    # Independent float64 derivation with the standard library's normal quantile function (QLoRA §3).
    offset = 0.9677083
    normal = NormalDist()
    positive = [normal.inv_cdf(offset + i * (0.5 - offset) / 8) for i in range(8)]
    negative = [-normal.inv_cdf(offset + i * (0.5 - offset) / 7) for i in range(7)]
    expected = torch.tensor(sorted(negative + [0.0] + positive), dtype=torch.float64) / max(positive)
    assert torch.allclose(nf4_codebook().double(), expected, rtol=1e-6, atol=1e-7)


def test_dynamic_tree_map_structure():
    levels = dynamic_tree_map()
    assert levels.shape == (256,) and levels.dtype == torch.float32
    assert torch.all(levels[1:] > levels[:-1])  # 256 distinct ascending levels
    positive = levels[levels > 0]
    assert positive.numel() == 128 and positive[-1] == 1.0  # 127 fraction levels and 1.0
    assert torch.equal(-levels[levels < 0].flip(0), positive[:-1])  # symmetric apart from 1.0
    assert 0.0 in levels.tolist()
    # 2^k levels in the decade [0.1, 1] * 10^(k-6), k = 0..6
    for k in range(7):
        in_decade = (positive >= 0.1 * 10.0 ** (k - 6)) & (positive < 10.0 ** (k - 6))
        assert int(in_decade.sum()) == 2**k


def test_dynamic_tree_map_equals_bitsandbytes():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(dynamic_tree_map(), bnbf.create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8))


# ---------------------------------------------------------------------------------------------------------------
# Quantization error
# ---------------------------------------------------------------------------------------------------------------


def test_round_trip_error_bound_per_block():
    torch.manual_seed(0)
    weight = torch.randn(96, 160) * torch.rand(96, 1) * 3  # rows of different scales; blocks cross rows
    weight[5, 7] = 40.0  # an outlier
    quantized = quantize_nf4(weight, double_quant=False)
    error = (weight - quantized.dequantize()).reshape(-1, 64).abs()
    absmax = weight.reshape(-1, 64).abs().amax(dim=1, keepdim=True)
    half_gap = (LEVELS[1:] - LEVELS[:-1]).max() / 2
    assert torch.all(error <= absmax * half_gap * (1 + 1e-6))
    assert torch.equal(quantized.absmax, absmax.squeeze(1))


def test_double_quant_scale_error_bound():
    torch.manual_seed(1)
    weight = torch.randn(256, 512) * (torch.rand(256, 1) + 0.1)
    quantized = quantize_nf4(weight, double_quant=True)
    absmax = weight.reshape(-1, 64).abs().amax(dim=1)
    centred = absmax - absmax.mean()
    dq_absmax = F.pad(centred, (0, (-centred.numel()) % 256)).reshape(-1, 256).abs().amax(dim=1)  # per 256 block
    # The 8-bit map's widest gap is 0.9/64 (the top decade); picking codes on a 65,536-point grid adds <= 2/65535.
    bound = dq_absmax.repeat_interleave(256)[: absmax.numel()] * (0.9 / 64 / 2 + 2 / 65535) + 1e-6
    assert torch.all((quantized.absmax_float() - absmax).abs() <= bound)
    # The 4-bit codes are taken from the raw scales, so they do not depend on double quantization.
    assert torch.equal(quantized.packed, quantize_nf4(weight, double_quant=False).packed)


def test_relative_error_on_standard_normal():
    torch.manual_seed(2)
    weight = torch.randn(1024, 1024)
    relative = (weight - quantize_nf4(weight).dequantize()).norm() / weight.norm()
    assert 0.085 < relative.item() < 0.1  # about 0.092 for NF4 with blocks of 64


def test_all_zero_blocks_get_zero_code_and_zero_absmax():
    weight = torch.randn(4, 64)
    weight[1] = 0.0
    quantized = quantize_nf4(weight, double_quant=False)
    assert quantized.absmax[1] == 0.0
    assert torch.all(quantized.packed[32:64] == 0x77)
    assert torch.equal(quantized.dequantize()[1], torch.zeros(64))


def test_codes_at_thresholds_neighbours_and_bin_edges():
    """Each value's code is the number of float32 level midpoints strictly below it (nearest level, ties down),
    also right at a midpoint, one ulp either side, on the edges of the lookup bins and just beyond ±1."""
    midpoints = (LEVELS[:-1] + LEVELS[1:]) / 2  # [15] float32, as bitsandbytes rounds them
    up, down = torch.tensor(2.0), torch.tensor(-2.0)
    edges = -1.0 + torch.arange(257) / 128  # every multiple of 1/128 in [-1, 1]
    probes = torch.cat([midpoints, torch.nextafter(midpoints, up), torch.nextafter(midpoints, down), edges,
                        torch.nextafter(edges, up), torch.nextafter(edges, down), LEVELS, torch.rand(4000) * 2 - 1])
    probes = probes.clamp(-1.0, 1.0)
    expected = (midpoints[None, :] < probes[:, None]).sum(1)  # [n]
    padded = torch.cat([probes, torch.zeros(-probes.numel() % 63)]).view(-1, 63)
    weight = torch.cat([padded, torch.ones(padded.shape[0], 1)], dim=1)  # [blocks, 64]: each block's absmax is 1
    packed = quantize_nf4(weight, double_quant=False).packed
    codes = torch.stack([packed // 16, packed % 16], dim=1).view(-1, 64)[:, :63].reshape(-1)
    assert torch.equal(codes[: probes.numel()].long(), expected)


# ---------------------------------------------------------------------------------------------------------------
# Bit identity with bitsandbytes (CPU)
# ---------------------------------------------------------------------------------------------------------------

SHAPES = [(64, 64), (128, 256), (96, 160), (1000, 64), (7, 9), (3, 43), (600, 1000)]


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bit_identical_to_bitsandbytes(shape, dtype, double_quant):
    torch.manual_seed(shape[0] * 7919 + shape[1])
    weight = (torch.randn(shape) * 0.02).to(dtype)
    if weight.numel() >= 256:
        weight.view(-1)[64:128] = 0  # one all-zero block
    packed, state, scales = bnb_quantize(weight, double_quant)
    ours = quantize_nf4(weight, double_quant=double_quant)
    assert torch.equal(ours.packed, packed)
    if double_quant:
        assert torch.equal(ours.absmax_q, state.absmax)
        assert torch.equal(ours.absmax_scale, state.state2.absmax)
        assert torch.equal(ours.absmax_offset, state.offset)
        assert state.state2.blocksize == ours.double_quant_blocksize == 256
    else:
        assert torch.equal(ours.absmax, state.absmax)
    assert torch.equal(ours.absmax_float(), scales)
    assert ours.shape == weight.shape and ours.dtype == dtype


def test_bit_identical_to_bitsandbytes_large():
    torch.manual_seed(3)
    weight = torch.randn(512, 4096, dtype=torch.bfloat16)  # 32,768 blocks: 128 double-quant blocks
    packed, state, scales = bnb_quantize(weight, double_quant=True)
    ours = quantize_nf4(weight)
    assert torch.equal(ours.packed, packed)
    assert torch.equal(ours.absmax_q, state.absmax)
    assert torch.equal(ours.absmax_scale, state.state2.absmax)
    assert torch.equal(ours.absmax_offset, state.offset)
    assert torch.equal(ours.dequantize(torch.bfloat16), oracle_dequantize(packed, scales, weight.numel())
                       .to(torch.bfloat16).view(weight.shape))


def test_all_zero_ragged_block_same_codes_as_bitsandbytes_with_zero_absmax():
    weight = torch.randn(100)
    weight[64:] = 0  # the ragged last block (36 elements) is all zero
    packed, _, _ = bnb_quantize(weight, double_quant=False)
    ours = quantize_nf4(weight, double_quant=False)
    assert torch.equal(ours.packed, packed)
    assert ours.absmax[1] == 0  # bitsandbytes stores its 1e-38 division guard here; the codes are all 7 either way
    assert torch.all(ours.packed[32:] == 0x77)


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("shape", [(96, 160), (7, 9), (3, 43)], ids=str)
def test_dequantize_equals_flat_block_reference_from_bitsandbytes_bytes(shape, double_quant):
    # The reference is built from bitsandbytes' bytes and scales, not from its dequantize_4bit: its CPU kernel is
    # not a trustworthy oracle for every shape (see benchmarks/nf4_notes.md).
    torch.manual_seed(4)
    weight = torch.randn(shape)
    packed, _, scales = bnb_quantize(weight, double_quant)
    reference = oracle_dequantize(packed, scales, weight.numel()).view(shape)
    ours = quantize_nf4(weight, double_quant=double_quant)
    assert torch.equal(ours.dequantize(torch.float32), reference)
    assert torch.equal(ours.dequantize(torch.bfloat16), reference.to(torch.bfloat16))
    assert torch.equal(ours.dequantize(torch.float16), reference.to(torch.float16))


# ---------------------------------------------------------------------------------------------------------------
# Dequantization without bitsandbytes
# ---------------------------------------------------------------------------------------------------------------


def test_dequantize_equals_handwritten_loop():
    torch.manual_seed(5)
    weight = torch.randn(5, 27)  # 135 elements: two full blocks, a ragged block of 7, an odd count
    quantized = quantize_nf4(weight, double_quant=False)
    data, scales = quantized.packed.tolist(), quantized.absmax.tolist()
    expected = []
    for i in range(weight.numel()):
        code = data[i // 2] >> 4 if i % 2 == 0 else data[i // 2] & 0x0F
        expected.append(PUBLISHED_NF4[code] * scales[i // 64])  # float64 product of float32 factors
    assert quantized.packed.numel() == 68 and quantized.packed[-1] & 0x0F == 7  # padded with the zero code
    assert torch.equal(quantized.dequantize(), torch.tensor(expected).float().view(5, 27))
    # every code is the nearest level, ties to the lower one
    scaled = (weight.reshape(-1) / quantized.absmax.repeat_interleave(64)[:135]).double()
    codes = torch.tensor([data[i // 2] >> 4 if i % 2 == 0 else data[i // 2] & 0x0F for i in range(135)])
    distance = (scaled[:, None] - LEVELS.double()[None, :]).abs()
    assert torch.all(distance[torch.arange(135), codes] <= distance.min(dim=1).values + 1e-6)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(384, 1024), (33, 65), (1, 64)], ids=str)
def test_fast_path_equals_reference_path(shape, out_dtype):
    torch.manual_seed(6)
    quantized = quantize_nf4(torch.randn(shape))  # (384, 1024) spans several dequantization chunks
    fast = quantized.dequantize(out_dtype)
    assert fast.shape == shape and fast.dtype == out_dtype
    assert torch.equal(fast, dequantize_reference(quantized, out_dtype))


# ---------------------------------------------------------------------------------------------------------------
# Storage
# ---------------------------------------------------------------------------------------------------------------


def test_nbytes_double_quant_4096():
    quantized = quantize_nf4(torch.randn(4096, 4096, dtype=torch.bfloat16))
    blocks = 4096 * 4096 // 64
    assert quantized.nbytes == 4096 * 4096 // 2 + blocks + 4 * math.ceil(blocks / 256) + 4 <= 8_656_000
    assert quantized.nbytes * 8 / (4096 * 4096) == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-5)


def test_nbytes_without_double_quant_is_4_5_bits():
    quantized = quantize_nf4(torch.randn(256, 1024), double_quant=False)
    assert quantized.nbytes * 8 / quantized.numel == 4.5


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_state_dict_round_trip_through_safetensors(tmp_path, double_quant):
    safetensors = pytest.importorskip("safetensors.torch")
    quantized = quantize_nf4(torch.randn(100, 96, dtype=torch.bfloat16), double_quant=double_quant)
    path = tmp_path / "w.safetensors"
    safetensors.save_file(quantized.state_dict(), path, metadata={"nf4": json.dumps(quantized.metadata())})
    with safetensors.safe_open(path, "pt") as handle:
        metadata = json.loads(handle.metadata()["nf4"])
    loaded = NF4Weight.from_state_dict(safetensors.load_file(path), metadata)
    assert loaded.shape == (100, 96) and loaded.dtype == torch.bfloat16 and loaded.double_quant == double_quant
    assert torch.equal(loaded.dequantize(), quantized.dequantize())


def test_to_device_copies_every_tensor():
    quantized = quantize_nf4(torch.randn(64, 64))
    moved = quantized.to("cpu")
    assert torch.equal(moved.dequantize(), quantized.dequantize())
    assert moved.state_dict().keys() == quantized.state_dict().keys()


# ---------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------


def test_quantize_rejects_bad_input():
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        quantize_nf4(torch.ones(64, 64, dtype=torch.int32))
    with pytest.raises(ValueError, match="no elements"):
        quantize_nf4(torch.ones(0, 64))
    with pytest.raises(ValueError, match="inf or nan"):
        quantize_nf4(torch.tensor([1.0, float("nan")] * 32))
    with pytest.raises(ValueError, match="blocksize"):
        quantize_nf4(torch.ones(64), blocksize=33)


def test_from_state_dict_rejects_inconsistent_shapes():
    quantized = quantize_nf4(torch.randn(64, 64))
    tensors, metadata = quantized.state_dict(), quantized.metadata()
    with pytest.raises(ValueError, match="packed"):
        NF4Weight.from_state_dict(tensors, metadata | {"shape": [64, 128]})
    with pytest.raises(ValueError, match="absmax_q"):
        NF4Weight.from_state_dict(tensors | {"absmax_q": tensors["absmax_q"][:-1]}, metadata)
    with pytest.raises(ValueError, match="either absmax"):
        NF4Weight.from_state_dict(tensors | {"absmax": torch.ones(64)}, metadata)


def test_linear_rejects_non_matrix_weight():
    with pytest.raises(ValueError, match="2-D"):
        NF4Linear.from_weight(torch.randn(4, 8, 8))
    with pytest.raises(ValueError, match="bias"):
        NF4Linear.from_weight(torch.randn(8, 64), bias=torch.zeros(9))


# ---------------------------------------------------------------------------------------------------------------
# NF4Linear
# ---------------------------------------------------------------------------------------------------------------


def make_linear(in_features=160, out_features=96, bias=True, **kwargs) -> tuple[torch.nn.Linear, NF4Linear]:
    torch.manual_seed(7)
    dense = torch.nn.Linear(in_features, out_features, bias=bias)
    return dense, NF4Linear.from_linear(dense, **kwargs)


def oracle_weight(layer: NF4Linear) -> torch.Tensor:
    """The dequantized weight in float64, rebuilt from the layer's buffers by the test's own decoder."""
    quantized = layer.quantized_weight()
    numel = layer.out_features * layer.in_features
    return oracle_dequantize(quantized.packed, quantized.absmax_float(), numel).double().view(quantized.shape)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_linear_forward_and_input_gradient_float64(bias, double_quant):
    dense, layer = make_linear(bias=bias, double_quant=double_quant, compute_dtype=torch.float64)
    x = torch.randn(3, 5, 160, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    weight = oracle_weight(layer)
    expected = F.linear(x.detach(), weight, None if not bias else dense.bias.detach().double())
    assert y.dtype == torch.float64 and y.shape == (3, 5, 96)
    assert torch.allclose(y, expected, rtol=1e-12, atol=1e-12)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    assert torch.allclose(x.grad, grad_out @ weight, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_linear_compute_dtype(compute_dtype):
    dense, layer = make_linear(compute_dtype=compute_dtype)
    x = torch.randn(4, 160)  # float32 input, cast to the compute dtype
    y = layer(x)
    assert y.dtype == compute_dtype
    expected = F.linear(x.double(), oracle_weight(layer), dense.bias.detach().double())
    tolerance = 1e-5 if compute_dtype == torch.float32 else 3e-2
    assert torch.allclose(y.double(), expected, rtol=tolerance, atol=tolerance)
    assert torch.equal(layer.dense_weight(), layer.quantized_weight().dequantize(compute_dtype))


def test_linear_weight_gets_no_gradient_and_bias_is_frozen_but_trainable():
    _, layer = make_linear()
    assert all(not p.requires_grad for p in layer.parameters())
    assert [name for name, _ in layer.named_parameters()] == ["bias"]
    x = torch.randn(2, 160, requires_grad=True)
    layer(x).sum().backward()
    assert layer.bias.grad is None and all(b.grad is None for b in layer.buffers())
    layer.bias.requires_grad_(True)  # a caller may train the bias
    grad_out = torch.randn(2, 96)
    layer(x).backward(grad_out)
    assert torch.allclose(layer.bias.grad, grad_out.sum(0))


def test_linear_saves_no_dense_weight_for_backward():
    _, layer = make_linear(in_features=256, out_features=128)
    saved: list[tuple[torch.dtype, int]] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append((tensor.dtype, tensor.numel()))
        return tensor

    x = torch.randn(4, 256, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        y = layer(x)
    y.sum().backward()
    assert (torch.uint8, 128 * 256 // 2) in saved  # the packed codes are what is kept
    assert not any(dtype.is_floating_point and numel >= 128 * 256 for dtype, numel in saved)


def test_linear_state_dict_and_module_dtype_cast():
    _, layer = make_linear()
    other = NF4Linear.from_weight(torch.randn(96, 160), bias=torch.randn(96))
    other.load_state_dict(layer.state_dict())
    x = torch.randn(3, 160)
    assert torch.equal(other(x), layer(x))
    assert set(layer.state_dict()) == {"packed", "absmax_q", "absmax_scale", "absmax_offset", "bias"}
    before = layer.dense_weight(torch.float32)
    layer.to(torch.bfloat16)  # moves the module; the float32 scales must not be cast
    assert layer.absmax_scale.dtype == torch.float32 and layer.absmax_offset.dtype == torch.float32
    assert layer.bias.dtype == torch.bfloat16
    assert torch.equal(layer.dense_weight(torch.float32), before)


def test_linear_from_transposed_weight_and_repr():
    torch.manual_seed(8)
    conv1d_weight = torch.randn(64, 192)  # HF Conv1D stores [in, out]
    layer = NF4Linear.from_weight(conv1d_weight.T, blocksize=64, double_quant=False)
    assert (layer.in_features, layer.out_features) == (64, 192)
    expected = quantize_nf4(conv1d_weight.T.contiguous(), double_quant=False).dequantize()
    assert torch.equal(layer.dense_weight(), expected)
    text = repr(layer)
    assert "in_features=64" in text and "out_features=192" in text and "nf4" in text

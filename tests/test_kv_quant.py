"""FP8 compression of KV blocks for the cold tiers: the Triton kernels (in the interpreter on CPU, compiled on CUDA)
give the reference's bytes, and a round trip stays within e4m3's rounding of each value."""

import pytest
import torch
import triton
import triton.language as tl

from tierkv.kernels.kv_quant import (
    FP8_MAX,
    _from_e4m3,
    _to_e4m3,
    dequantize_blocks_reference,
    dequantize_blocks_triton,
    packed_layer_nbytes,
    quantize_blocks,
    quantize_blocks_reference,
    quantize_blocks_triton,
)


@triton.jit
def convert(x_ptr, code_ptr, back_ptr, n, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    code = _to_e4m3(tl.load(x_ptr + o, mask=m, other=0.0))
    tl.store(code_ptr + o, code, mask=m)
    tl.store(back_ptr + o, _from_e4m3(code), mask=m)


SHAPES = [(2, 2, 4, 2, 8), (3, 2, 3, 1, 6), (1, 2, 16, 2, 16)]  # (L, 2, block_size, heads, head_dim)


def make_pool(shape, dtype, slots=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    pool = torch.randn((slots, *shape), generator=g) * torch.rand((slots, 1, 1, 1, shape[3], 1), generator=g) * 5
    pool[1, 0, 1] = 0.0  # a layer's values all zero: scale 1, codes 0
    pool[2, -1, 0, 0, 0, 0] = 1e-30  # a tile whose scale is tiny
    return pool.to(dtype)


def on_device(t):
    return t.cuda() if torch.cuda.is_available() else t


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_kernels_give_the_reference_bytes(shape, dtype):
    pool = make_pool(shape, dtype)
    slots = torch.tensor([5, 1, 2, 0], dtype=torch.int64)
    want = quantize_blocks_reference(pool, slots)
    got = quantize_blocks_triton(on_device(pool), on_device(slots)).cpu()
    assert got.shape == (4, shape[0], packed_layer_nbytes(*shape[2:]))
    assert torch.equal(got, want)
    back_want = torch.zeros_like(pool)
    dequantize_blocks_reference(want, back_want, torch.tensor([0, 3, 6, 4]))
    back = on_device(torch.zeros_like(pool))
    dequantize_blocks_triton(on_device(want), back, on_device(torch.tensor([0, 3, 6, 4])))
    assert torch.equal(back.cpu(), back_want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_is_within_e4m3_rounding(dtype):
    """Each value comes back within half a step of e4m3 (3 mantissa bits: 1/16 of the value) of what was stored,
    or, below e4m3's normal range (2^-6 of the scale), within half its smallest step (2^-10 of the scale); whole
    zero tiles come back zero."""
    shape = (2, 2, 16, 2, 32)
    pool = make_pool(shape, dtype, slots=5, seed=3)
    slots = torch.arange(5)
    packed = quantize_blocks(pool, slots)
    back = torch.empty_like(pool)
    dequantize_blocks_reference(packed, back, slots)
    x, y = pool.float(), back.float()
    scale = x.abs().amax(dim=(3, 5), keepdim=True) / FP8_MAX
    bound = torch.maximum(x.abs() / 16, scale * 2.0**-10) + y.abs() * 2.0**-8  # (+ the pool dtype's own rounding)
    assert ((x - y).abs() <= bound).all()
    assert torch.equal(back[1, 0, 1], torch.zeros_like(back[1, 0, 1]))
    # the largest value of every tile is kept to e4m3's precision: the scale follows each tile
    assert ((x.abs().amax(dim=(3, 5)) - y.abs().amax(dim=(3, 5))).abs() <= x.abs().amax(dim=(3, 5)) / 16).all()


def test_packed_bytes_are_half_the_bf16_block_and_record_layout_is_checked():
    bs, heads, dim = 16, 8, 128
    bf16_layer = 2 * bs * heads * dim * 2
    assert packed_layer_nbytes(bs, heads, dim) == bf16_layer // 2 + 2 * heads * 4  # 8B shape: 32 KiB + 64 B a layer
    with pytest.raises(ValueError, match="even"):
        packed_layer_nbytes(1, 1, 3)
    pool = make_pool((1, 2, 2, 1, 4), torch.float32)
    with pytest.raises(ValueError, match="do not match"):
        dequantize_blocks_triton(torch.zeros((2, 1, 3), dtype=torch.uint8), pool, torch.tensor([0, 1]))


def test_e4m3_codes_equal_torchs_at_every_value_and_tie():
    """The kernels' e4m3 conversion (bit arithmetic) against torch's cast: every finite code, and every midpoint
    between neighbours (ties go to the even code), both signs (zero's too); decoding gives every code's value exactly."""
    finite = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # 0 .. 448
    mids = (finite[:-1] + finite[1:]) / 2
    x = torch.cat([finite, mids, -finite, -mids])
    want = x.to(torch.float8_e4m3fn)
    x, code, back = on_device(x), on_device(torch.empty(len(x), dtype=torch.uint8)), on_device(torch.empty(len(x)))
    convert[(triton.cdiv(len(x), 128),)](x, code, back, len(x), BLOCK=128)
    assert torch.equal(code.cpu(), want.view(torch.uint8))  # byte for byte: -0.0's code is 0x80, as torch's
    assert torch.equal(back.cpu(), want.float())

"""The GPU tier's KV in fp8 (`kv_cache_dtype="fp8"`): one layer's view of the blocks, a step's keys and values
written into them, and their decoding where attention reads them.

Blocks are stored as the cold tiers' fp8 records (`kv_quant`): per block and layer, the keys' and values' e4m3 codes
(2, block_size, Hkv, D), then float32 scales (2, Hkv); so blocks move between the tiers as plain bytes. Here every
scale is a power of two, the smallest with amax <= 448 x scale, and a block's scales grow as it fills: writing rows
[first, first + n) of a block sets each head's scale to max(its scale, that of the new rows), where a write from
row 0 starts afresh (a recycled slot holds stale codes and scales). Where a scale grows, the block's earlier rows
are requantized to it; where it does not, their codes are left as they are.

Why powers of two: e4m3 is a floating-point code, so dividing by a power of two only shifts exponents. An earlier
code requantized to a grown scale is then exact (the same code, its exponent lowered) unless it falls into e4m3's
subnormal range (magnitudes below 2^-6 x scale), where it rounds once more to the nearest of the steps of 2^-9 x
scale; and a value's code x scale is round(value to 3 mantissa bits) whichever scale it was quantized with, except
there. So what a block holds hardly depends on how its rows were split between steps (how a prompt was chunked),
and decoding to bf16 is exact. Against amax / 448 (the cold tiers' scales), amax itself is no longer exactly a code
and the subnormal range starts up to twice as high: the same 3 mantissa bits for every value above it.

An all-zero tile's scale is 1 (as in `kv_quant`); a write of zeros never grows a scale.

`write_kv_fp8` takes one launch per layer, one program per (token, head) of which only those at a block's first new
row go on: each handles all of the step's rows of that block (a prefill chunk writes many, a decode step one), for
keys and values. It also overwrites the step's k and v with the values as stored (codes x scale), which whole
prompts then attend over (tierkv/attention.py): their attention reads their keys as later steps will.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from tierkv.kernels.kv_quant import FP8

try:
    import triton
    import triton.language as tl

    from tierkv.kernels.kv_quant import _from_e4m3, _to_e4m3
except ImportError:  # pragma: no cover - triton is a dependency; kept importable for docs tools
    triton = None


class Fp8Cache(NamedTuple):
    """One layer's keys or values in an fp8 pool: strided views of its records."""

    codes: torch.Tensor  # (slots, block_size, Hkv, D) uint8: e4m3 codes
    scales: torch.Tensor  # (slots, Hkv) float32: a block's scale per head


def layer_caches(pool: torch.Tensor, layer: int, block_size: int, num_kv_heads: int, head_dim: int):
    """(keys, values) of one layer of a pool of fp8 records (slots, L, record bytes), as two Fp8Caches."""
    rec = pool[:, layer]
    row = num_kv_heads * head_dim
    codes = block_size * row
    scales = rec[:, 2 * codes :].view(torch.float32)  # (slots, 2 Hkv): records and their scales align to 4 bytes
    return tuple(
        Fp8Cache(
            rec[:, kv * codes : (kv + 1) * codes].view(-1, block_size, num_kv_heads, head_dim),
            scales[:, kv * num_kv_heads : (kv + 1) * num_kv_heads],
        )
        for kv in (0, 1)
    )


def caches_per_alignment(pool: torch.Tensor, block_size: int, num_kv_heads: int, head_dim: int) -> list[tuple]:
    """layer_caches of one layer per way the pool's layers' records sit on 16 bytes (from the pool's start: aligned,
    or not where a record is no multiple of 16 bytes). Triton compiles a variant per pointer alignment class, so
    compiling over these covers every layer of every pool of this shape."""
    record = pool.shape[2]
    firsts = {layer * record % 16 == 0: layer for layer in reversed(range(pool.shape[1]))}
    return [layer_caches(pool, layer, block_size, num_kv_heads, head_dim) for layer in sorted(firsts.values())]


def pow2_scales(amax: torch.Tensor) -> torch.Tensor:
    """The smallest power of two s (a normal float32) with amax <= 448 s, per element of amax (float32, >= 0); 0
    where amax is 0. From the bits: amax = m 2^e (1 <= m < 2) needs s = 2^(e - 8), or 2^(e - 7) where m > 1.75."""
    bits = amax.view(torch.int32)
    e = ((bits >> 23) & 0xFF) - 8 + ((bits & 0x7FFFFF) > 0x600000).to(torch.int32)
    s = (e.clamp(min=1) << 23).view(torch.float32)
    return torch.where(amax > 0, s, torch.zeros_like(s))


def dequantize(cache: Fp8Cache, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The blocks `slots` of one layer's keys or values, decoded: (n, block_size, Hkv, D) in `dtype`."""
    # index_select, not indexing: on these strided byte views, indexing takes ~1000x longer on the CPU.
    codes = cache.codes.index_select(0, slots).view(FP8).float()
    return (codes * cache.scales.index_select(0, slots)[:, None, :, None]).to(dtype)


def _write_reference(x: torch.Tensor, cache: Fp8Cache, blocks: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows x (n, Hkv, D) into (blocks[i], rows[i]); returns their values as stored (float32)."""
    bs, heads = cache.codes.shape[1], x.shape[1]
    x = x.float()
    written, at = torch.unique(blocks, return_inverse=True)
    amax = x.new_zeros((len(written), heads)).scatter_reduce(0, at[:, None].expand(-1, heads), x.abs().amax(-1), "amax")
    first = torch.full_like(written, bs).scatter_reduce(0, at, rows, "amin")
    old = torch.where((first > 0)[:, None], cache.scales.index_select(0, written), torch.zeros_like(amax))
    scale = torch.maximum(old, pow2_scales(amax))
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    # Earlier rows of blocks whose scale grew: requantized (an exact exponent shift, except subnormal results).
    codes = cache.codes.index_select(0, written)
    earlier = (torch.arange(bs, device=x.device)[None, :] < first[:, None])[:, :, None, None]
    requant = (codes.view(FP8).float() * (old / scale)[:, None, :, None]).to(FP8).view(torch.uint8)
    codes = torch.where(earlier & (scale > old)[:, None, :, None], requant, codes)
    q = (x / scale[at][:, :, None]).to(FP8)
    codes[at, rows] = q.view(torch.uint8)
    cache.codes.index_copy_(0, written, codes)
    cache.scales.index_copy_(0, written, scale)
    return q.float() * scale[at][:, :, None]


def write_kv_fp8_reference(
    k: torch.Tensor, v: torch.Tensor, k_cache: Fp8Cache, v_cache: Fp8Cache, slot_mapping: torch.Tensor
) -> None:
    """Plain PyTorch, the same bytes as the kernel. k, v: (T, Hkv, D), overwritten with the values as stored;
    slot_mapping: (T,) flat slots (block slot x block_size + row), negative ones skipped. A block's new rows must
    be consecutive tokens (as a sequence's are)."""
    keep = (slot_mapping >= 0).nonzero()[:, 0]
    slots = slot_mapping.index_select(0, keep).long()
    bs = k_cache.codes.shape[1]
    for x, cache in ((k, k_cache), (v, v_cache)):
        x.index_copy_(0, keep, _write_reference(x.index_select(0, keep), cache, slots // bs, slots % bs).to(x.dtype))


if triton is not None:

    @triton.jit
    def _pow2_scale(amax):
        """pow2_scales in Triton (amax a float32 scalar)."""
        bits = amax.to(tl.int32, bitcast=True)
        e = ((bits >> 23) & 0xFF) - 8 + ((bits & 0x7FFFFF) > 0x600000).to(tl.int32)
        return tl.where(amax > 0, (tl.maximum(e, 1) << 23).to(tl.float32, bitcast=True), 0.0)

    @triton.jit
    def decode_tile(codes, scales, NATIVE: tl.constexpr):
        """float32 values of a (rows, D) tile of e4m3 codes (uint8), each row times its scale (rows,). NATIVE:
        through the hardware's fp8 type (CUDA, sm_89 on); else bit arithmetic (the interpreter)."""
        if NATIVE:
            x = codes.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        else:
            x = _from_e4m3(codes)
        return x * scales[:, None]

    @triton.jit
    def kv_tile(tile, scale_ptrs, like, KV_FP8: tl.constexpr, NATIVE: tl.constexpr):
        """A loaded (rows, D) tile of keys or values as attention reads it: where KV_FP8, e4m3 codes decoded with the
        scales at `scale_ptrs` (rows,) into `like`'s dtype (the queries'); else the tile as loaded."""
        if KV_FP8:
            tile = decode_tile(tile, tl.load(scale_ptrs), NATIVE).to(like.dtype)
        return tile

    @triton.jit
    def _write_block(
        X, t0, stride_xt, stride_xh, h, C, S, blk, first, n, stride_cs, stride_ct, stride_ch, stride_ss,
        D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """Rows [first, first + n) of block `blk`, head h, from tokens t0.. of X; X's rows overwritten as stored."""
        r = tl.arange(0, BLOCK_T)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        d_mask = d < D
        new = (r >= first) & (r < first + n) & d_mask
        x_ptr = X + (t0 + r - first).to(tl.int64) * stride_xt + h * stride_xh + d
        x = tl.load(x_ptr, mask=new, other=0.0).to(tl.float32)
        s_ptr = S + blk * stride_ss + h
        old = tl.where(first > 0, tl.load(s_ptr), 0.0)
        scale = tl.maximum(old, _pow2_scale(tl.max(tl.max(tl.abs(x), axis=1), axis=0)))
        scale = tl.where(scale > 0, scale, 1.0)
        c_ptr = C + blk * stride_cs + r * stride_ct + h * stride_ch + d
        if (scale > old) & (first > 0):
            earlier = (r < first) & d_mask
            codes = tl.load(c_ptr, mask=earlier, other=0)
            tl.store(c_ptr, _to_e4m3(_from_e4m3(codes) * tl.math.div_rn(old, scale)), mask=earlier)
        q = _to_e4m3(tl.math.div_rn(x, scale))
        tl.store(c_ptr, q, mask=new)
        tl.store(s_ptr, scale)
        tl.store(x_ptr, (_from_e4m3(q) * scale).to(X.dtype.element_ty), mask=new)

    @triton.jit(do_not_specialize=["T"])  # the step's token count: no variant per size class mid-run
    def _write_kernel(
        K, V, KC, VC, KS, VS, SLOTS, T, stride_kt, stride_kh, stride_vt, stride_vh,
        stride_cs, stride_ct, stride_ch, stride_ss,
        BS: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        # One program per (token, head); the token that opens a block's run of new rows (the step's first in that
        # block) writes them all, keys then values. (Flat slots are never negative where divided: -1 // BS is 0.)
        t = tl.program_id(0)
        h = tl.program_id(1)
        slot = tl.load(SLOTS + t).to(tl.int64)
        prev = tl.load(SLOTS + t - 1, mask=t > 0, other=-1).to(tl.int64)
        blk = slot // BS
        if (slot >= 0) & ((prev < 0) | (prev // BS != blk)):
            ahead = t + tl.arange(0, BLOCK_T)
            nxt = tl.load(SLOTS + ahead, mask=ahead < T, other=-1).to(tl.int64)
            n = tl.sum(((nxt >= 0) & (nxt // BS == blk)).to(tl.int32), axis=0)
            first = slot % BS
            _write_block(
                K, t, stride_kt, stride_kh, h, KC, KS, blk, first, n, stride_cs, stride_ct, stride_ch, stride_ss,
                D, BLOCK_T, BLOCK_D,
            )  # fmt: skip
            _write_block(
                V, t, stride_vt, stride_vh, h, VC, VS, blk, first, n, stride_cs, stride_ct, stride_ch, stride_ss,
                D, BLOCK_T, BLOCK_D,
            )  # fmt: skip


def write_kv_fp8_triton(
    k: torch.Tensor, v: torch.Tensor, k_cache: Fp8Cache, v_cache: Fp8Cache, slot_mapping: torch.Tensor
) -> None:
    """`write_kv_fp8_reference` in one launch (on CUDA, or under TRITON_INTERPRET=1)."""
    T, heads, dim = k.shape
    if T == 0:
        return
    kc, vc = k_cache.codes, v_cache.codes
    assert k.stride(2) == 1 and v.stride(2) == 1 and kc.stride(3) == 1, "head_dim must be contiguous"
    assert kc.stride() == vc.stride() and k_cache.scales.stride() == v_cache.scales.stride()
    bs = kc.shape[1]
    _write_kernel[(T, heads)](
        k, v, kc, vc, k_cache.scales, v_cache.scales, slot_mapping, T, k.stride(0), k.stride(1), v.stride(0),
        v.stride(1), kc.stride(0), kc.stride(1), kc.stride(2), k_cache.scales.stride(0),
        BS=bs, D=dim, BLOCK_T=1 << (bs - 1).bit_length(), BLOCK_D=max(16, 1 << (dim - 1).bit_length()),
    )  # fmt: skip


def write_kv_fp8(k, v, k_cache: Fp8Cache, v_cache: Fp8Cache, slot_mapping) -> None:
    """The Triton kernel on CUDA, the reference elsewhere."""
    if k.is_cuda and triton is not None:
        write_kv_fp8_triton(k, v, k_cache, v_cache, slot_mapping)
    else:
        write_kv_fp8_reference(k, v, k_cache, v_cache, slot_mapping)


def native_fp8() -> bool:
    """Whether the kernels may decode e4m3 through Triton's fp8 type: compiled, not in the interpreter."""
    knobs = getattr(triton, "knobs", None)  # (Triton 3.4 on; before it, the environment variable alone)
    interpreted = knobs.runtime.interpret if knobs is not None else os.environ.get("TRITON_INTERPRET") == "1"
    return triton is not None and not interpreted

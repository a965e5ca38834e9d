"""FP8 (e4m3) compression of KV blocks for the cold tiers: a batch of blocks quantized in one launch, and back.

A block (num_layers, 2, block_size, num_kv_heads, head_dim) packs into `num_layers` records, one per layer, each
its keys' and values' fp8 codes (2, block_size, num_kv_heads, head_dim) followed by their float32 scales (2,
num_kv_heads): one scale per (layer, keys or values, head), the largest magnitude of those block_size x head_dim
values over 448 (e4m3's largest finite value). A layer's record is contiguous, so that a streamed layer slice of a
compressed block carries its scales with it. An all-zero tile gets scale 1 (its codes are zeros).

Both directions divide and multiply in float32 with correct rounding in the kernel and the reference alike, so the
Triton kernels and the references give the same bytes.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a dependency; kept importable for docs tools
    triton = None

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def packed_layer_nbytes(block_size: int, num_kv_heads: int, head_dim: int) -> int:
    """Bytes of one layer's record: 2 x block_size x heads x head_dim codes, then 2 x heads float32 scales."""
    codes = 2 * block_size * num_kv_heads * head_dim
    if codes % 4:
        raise ValueError(f"kv_quant: block_size x heads x head_dim must be even (got {codes // 2}): scales align to 4")
    return codes + 2 * num_kv_heads * 4


def _split(packed: torch.Tensor, block_shape: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of packed records (n, L, record bytes): the codes (n, L, 2, bs, H, D) as fp8 and the scales (n, L, 2,
    H) as float32."""
    n, layers = packed.shape[:2]
    _, two, bs, heads, dim = block_shape
    codes = two * bs * heads * dim
    q = packed[:, :, :codes].view(FP8).view(n, layers, two, bs, heads, dim)
    scales = packed[:, :, codes:].view(torch.float32).view(n, layers, two, heads)
    return q, scales


def quantize_blocks_reference(pool: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """The blocks `pool[slots]` (pool: (slots, L, 2, bs, H, D), any float dtype) packed: (n, L, record) uint8."""
    blocks = pool.index_select(0, slots).float()
    n, layers, two, bs, heads, dim = blocks.shape
    amax = blocks.abs().amax(dim=(3, 5))  # (n, L, 2, H)
    scales = torch.where(amax > 0, amax * (1.0 / FP8_MAX), torch.ones_like(amax))
    q = (blocks / scales[:, :, :, None, :, None]).to(FP8)
    out = torch.empty((n, layers, packed_layer_nbytes(bs, heads, dim)), dtype=torch.uint8, device=pool.device)
    codes, scale_view = _split(out, blocks.shape[1:])
    codes.copy_(q)
    scale_view.copy_(scales)
    return out


def dequantize_blocks_reference(packed: torch.Tensor, pool: torch.Tensor, slots: torch.Tensor) -> None:
    """`pool[slots[i]]` = the block packed in `packed[i]`, in the pool's dtype."""
    codes, scales = _split(packed, pool.shape[1:])
    blocks = codes.float() * scales[:, :, :, None, :, None]
    pool.index_copy_(0, slots, blocks.to(pool.dtype))


if triton is not None:
    # e4m3 codes by arithmetic on float32 bits, not Triton's fp8 casts: the interpreter's cast rounds a mantissa
    # that carries into the exponent down a binade (124 -> 64 instead of 128), and these give torch's bytes on both.

    @triton.jit
    def _pow2(k):
        """2.0 ** k for integer k in float32's normal range, exactly (from its bits)."""
        return ((k + 127) << 23).to(tl.float32, bitcast=True)

    @triton.jit
    def _round_even(y):
        """y rounded to the nearest integer, ties to even (y >= 0, below 2^22: every step exact)."""
        r = tl.floor(y + 0.5)
        odd_tie = (r - y == 0.5) & (r - 2.0 * tl.floor(r * 0.5) == 1.0)
        return tl.where(odd_tie, r - 1.0, r)

    @triton.jit
    def _to_e4m3(x):
        """The e4m3 (fn) code of float32 x, |x| <= 448, rounded to nearest even: (exponent + 7) << 3 | mantissa,
        x's sign bit in bit 7; below 2^-6 the subnormal steps of 2^-9 (code 8 = 2^-6 continues them)."""
        a = tl.abs(x)
        e = ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127  # floor(log2(a)) for normal a
        normal = _round_even(a * _pow2(3 - tl.maximum(e, -6))) + (8 * tl.maximum(e, -6) + 48).to(tl.float32)
        code = tl.where(a < 0.015625, _round_even(a * 512.0), normal).to(tl.int32)
        return (code | tl.where(x.to(tl.int32, bitcast=True) < 0, 0x80, 0)).to(tl.uint8)  # (-0.0 too, as torch)

    @triton.jit
    def _from_e4m3(code):
        """float32 value of e4m3 (fn) codes (uint8), exactly."""
        c = code.to(tl.int32)
        field, m = (c >> 3) & 0xF, c & 7
        normal = ((field + 120) << 23 | m << 20).to(tl.float32, bitcast=True)
        a = tl.where(field == 0, m.to(tl.float32) * 0.001953125, normal)
        return tl.where((c & 0x80) != 0, -a, a)

    @triton.jit
    def _tile_offsets(
        slots_ptr, s_slot, s_layer, s_kv, s_tok, s_head, rec_block, layer_rec, heads,
        BS: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """This program's tile, one block's (layer, keys or values, head) block_size x head_dim values: their
        element offsets in the pool, their codes' byte offsets in the packed records (codes in (2, BS, H, D) order,
        then the scales in (2, H) order), their scale's byte offset, and the mask of the tile's padding."""
        i = tl.program_id(0)
        tile = tl.program_id(1)
        h = tile % heads
        kv = (tile // heads) % 2
        layer = tile // (2 * heads)
        slot = tl.load(slots_ptr + i).to(tl.int64)
        t = tl.arange(0, BLOCK_T)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        mask = (t < BS) & (d < D)
        pool = slot * s_slot + layer * s_layer + kv * s_kv + h * s_head + t * s_tok + d
        rec = i.to(tl.int64) * rec_block + layer * layer_rec
        codes = rec + ((kv * BS + t) * heads + h) * D + d
        scale = rec + 2 * BS * heads * D + 4 * (kv * heads + h)
        return pool, codes, scale, mask

    @triton.jit
    def _quantize_kernel(
        pool_ptr, slots_ptr, out_ptr, s_slot, s_layer, s_kv, s_tok, s_head, out_block, out_layer, layers, heads,
        BS: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        pool, codes, scale_at, mask = _tile_offsets(
            slots_ptr, s_slot, s_layer, s_kv, s_tok, s_head, out_block, out_layer, heads, BS, D, BLOCK_T, BLOCK_D
        )
        x = tl.load(pool_ptr + pool, mask=mask, other=0.0).to(tl.float32)
        amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
        scale = tl.where(amax > 0, amax * (1.0 / 448.0), 1.0)
        tl.store(out_ptr + codes, _to_e4m3(tl.math.div_rn(x, scale)), mask=mask)
        tl.store((out_ptr + scale_at).to(tl.pointer_type(tl.float32)), scale)

    @triton.jit
    def _dequantize_kernel(
        packed_ptr, slots_ptr, pool_ptr, s_slot, s_layer, s_kv, s_tok, s_head, in_block, in_layer, layers, heads,
        BS: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        pool, codes, scale_at, mask = _tile_offsets(
            slots_ptr, s_slot, s_layer, s_kv, s_tok, s_head, in_block, in_layer, heads, BS, D, BLOCK_T, BLOCK_D
        )
        scale = tl.load((packed_ptr + scale_at).to(tl.pointer_type(tl.float32)))
        x = _from_e4m3(tl.load(packed_ptr + codes, mask=mask, other=0)) * scale
        tl.store(pool_ptr + pool, x.to(pool_ptr.dtype.element_ty), mask=mask)


def _tile(n: int) -> int:
    return 1 << (max(1, n) - 1).bit_length()


def _check(pool: torch.Tensor) -> None:
    if pool.dim() != 6 or pool.shape[2] != 2 or pool.stride(5) != 1:
        raise ValueError(
            f"kv_quant: expected a pool (slots, L, 2, bs, H, D) with contiguous head_dim, got {pool.shape}"
        )


def quantize_blocks_triton(pool: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """`quantize_blocks_reference` in one launch (on the pool's device, or under TRITON_INTERPRET=1)."""
    _check(pool)
    _, layers, _, bs, heads, dim = pool.shape
    record = packed_layer_nbytes(bs, heads, dim)
    out = torch.empty((len(slots), layers, record), dtype=torch.uint8, device=pool.device)
    if len(slots):
        st = pool.stride()
        _quantize_kernel[(len(slots), layers * 2 * heads)](
            pool, slots, out, st[0], st[1], st[2], st[3], st[4], layers * record, record, layers, heads,
            BS=bs, D=dim, BLOCK_T=_tile(bs), BLOCK_D=_tile(dim),
        )  # fmt: skip
    return out


def dequantize_blocks_triton(packed: torch.Tensor, pool: torch.Tensor, slots: torch.Tensor) -> None:
    """`dequantize_blocks_reference` in one launch."""
    _check(pool)
    _, layers, _, bs, heads, dim = pool.shape
    record = packed_layer_nbytes(bs, heads, dim)
    if tuple(packed.shape) != (len(slots), layers, record) or not packed.is_contiguous():
        raise ValueError(
            f"kv_quant: packed records {tuple(packed.shape)} do not match {len(slots)} blocks of {pool.shape}"
        )
    if len(slots):
        st = pool.stride()
        _dequantize_kernel[(len(slots), layers * 2 * heads)](
            packed, slots, pool, st[0], st[1], st[2], st[3], st[4], layers * record, record, layers, heads,
            BS=bs, D=dim, BLOCK_T=_tile(bs), BLOCK_D=_tile(dim),
        )  # fmt: skip


def quantize_blocks(pool: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """The blocks `pool[slots]` packed as fp8 records (n, L, record bytes): the kernel on CUDA, else the reference."""
    if pool.is_cuda and triton is not None:
        return quantize_blocks_triton(pool, slots)
    return quantize_blocks_reference(pool, slots)


def dequantize_blocks(packed: torch.Tensor, pool: torch.Tensor, slots: torch.Tensor) -> None:
    """`pool[slots[i]]` = the block packed in `packed[i]`: the kernel on CUDA, else the reference."""
    if pool.is_cuda and triton is not None:
        dequantize_blocks_triton(packed, pool, slots)
    else:
        dequantize_blocks_reference(packed, pool, slots)

"""Attention over a paged KV cache, for prefill (chunked, causal) and decode, with GQA and sliding windows: the
entry points (`paged_attention` and the two implementations it chooses between).

One layer's cache is two views `k_cache`, `v_cache` of shape (num_slots, block_size, num_kv_heads, head_dim), or
two `kv_fp8.Fp8Cache`s (e4m3 codes of that shape and each block's scale per head: the kernels decode them in
registers, the reference decodes the blocks it gathers); a batch is described by a `PagedBatch` (`paged_batch`).
Every function returns the attention output and, when asked, the log-sum-exp of the scores per (row, head), which
is what partial results over disjoint key sets need to be merged exactly (`partial_merge`).

`paged_attention_reference` is plain PyTorch (it is what runs on CPU); `paged_attention_triton` is the Triton
implementation: it launches the split-K kernel (`paged_decode`) for decode and short chunks, and the
flash-attention prefill kernel (`paged_prefill`) for longer chunks. `compile_variants` compiles them all up front.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tierkv.kernels.kv_fp8 import Fp8Cache, dequantize, native_fp8
from tierkv.kernels.paged_batch import PagedBatch, _pow2
from tierkv.kernels.paged_decode import DECODE_CONFIG, SPLIT_MAX_Q, _leading_short
from tierkv.kernels.paged_prefill import PREFILL_CONFIG, PREFILL_CONFIG_SMALL, _prefill_tiles
from tierkv.kernels.partial_merge import merge_partials_triton

try:
    import triton
except ImportError:  # pragma: no cover
    triton = None

if triton is not None:
    from tierkv.kernels.paged_decode import _reduce_kernel, _split_kernel
    from tierkv.kernels.paged_prefill import _prefill_kernel


# -- reference --------------------------------------------------------------------------------------------------


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    scale: float,
    sliding_window: int = 0,
    need_lse: bool = False,
):
    """Dense attention of q (n, Hq, D) over k, v (m, Hkv, D) at absolute positions, causal (k_pos <= q_pos) and
    windowed (k_pos > q_pos - window when window > 0). Returns out (n, Hq, D) [, lse (n, Hq) float32]."""
    n, num_heads, _ = q.shape
    group = num_heads // k.shape[1]
    allowed = k_pos[None, :] <= q_pos[:, None]
    if sliding_window:
        allowed &= k_pos[None, :] > q_pos[:, None] - sliding_window
    kh = k.transpose(0, 1).repeat_interleave(group, dim=0)  # (Hq, m, D)
    vh = v.transpose(0, 1).repeat_interleave(group, dim=0)
    qh = q.transpose(0, 1)  # (Hq, n, D)
    if not need_lse:
        if bool(allowed.all()):
            out = F.scaled_dot_product_attention(qh[None], kh[None], vh[None], scale=scale)[0]
        elif n == k.shape[0] and not sliding_window and bool((q_pos == k_pos).all()):
            out = F.scaled_dot_product_attention(qh[None], kh[None], vh[None], is_causal=True, scale=scale)[0]
        else:
            out = F.scaled_dot_product_attention(qh[None], kh[None], vh[None], attn_mask=allowed, scale=scale)[0]
        return out.transpose(0, 1)
    scores = torch.matmul(qh.float(), kh.float().transpose(1, 2)) * scale  # (Hq, n, m)
    scores = scores.masked_fill(~allowed[None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (Hq, n)
    weights = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    out = torch.matmul(weights, vh.float())
    return out.transpose(0, 1).to(q.dtype), lse.transpose(0, 1)


def gather_keys(cache: torch.Tensor | Fp8Cache, table: torch.Tensor, num_tokens: int, dtype=None) -> torch.Tensor:
    """The first `num_tokens` tokens of the blocks `table` of one layer's cache, as (num_tokens, Hkv, D); an fp8
    cache's decoded to `dtype`."""
    if isinstance(cache, Fp8Cache):
        blocks = dequantize(cache, table.long(), dtype)
    else:
        blocks = cache[table.long()]  # (nb, bs, Hkv, D)
    return blocks.reshape(-1, *blocks.shape[2:])[:num_tokens]


def paged_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: PagedBatch,
    scale: float,
    sliding_window: int = 0,
    need_lse: bool = False,
    out: torch.Tensor | None = None,
):
    """Plain PyTorch, one entry at a time. Returns out (T, Hq, D) [, lse (T, Hq) float32]; `out`: where the output
    goes (a (T, Hq, D) tensor, such as a graph's static buffer), else a new tensor."""
    bs = _codes(k_cache).shape[1]
    out = torch.empty_like(q) if out is None else out
    lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device) if need_lse else None
    starts = batch.q_starts.tolist()
    for i in range(batch.num_entries):
        r0, r1 = starts[i], starts[i + 1]
        if r0 == r1:
            continue
        p0 = int(batch.q_pos0[i])
        ctx = int(batch.context_lens[i])
        first = int(batch.first_block[i])
        kv0 = first * bs
        nblocks = -(-(ctx - kv0) // bs)
        table = batch.block_tables[i, :nblocks]
        k = gather_keys(k_cache, table, ctx - kv0, q.dtype)
        v = gather_keys(v_cache, table, ctx - kv0, q.dtype)
        q_pos = torch.arange(p0, p0 + r1 - r0, device=q.device)
        k_pos = torch.arange(kv0, ctx, device=q.device)
        res = attention_reference(q[r0:r1], k, v, q_pos, k_pos, scale, sliding_window, need_lse)
        if need_lse:
            out[r0:r1], lse[r0:r1] = res
        else:
            out[r0:r1] = res
    return (out, lse) if need_lse else out


def _codes(cache: torch.Tensor | Fp8Cache) -> torch.Tensor:
    return cache.codes if isinstance(cache, Fp8Cache) else cache


# -- Triton -----------------------------------------------------------------------------------------------------

_LOG2_E = 1.4426950408889634  # the prefill kernel works in base 2 (exp2): scores scaled by scale * log2(e)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def paged_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: PagedBatch,
    scale: float,
    sliding_window: int = 0,
    need_lse: bool = False,
    decode_config: dict | None = None,
    prefill_config: dict | None = None,
    out: torch.Tensor | None = None,
):
    """Triton implementation of `paged_attention_reference` (same arguments and results).

    `decode_config` overrides DECODE_CONFIG (tokens per split-K partition, keys per iteration, warps, stages);
    `prefill_config` overrides PREFILL_CONFIG (PREFILL_CONFIG_SMALL for float32 inputs or head_dim over 128)."""
    T, num_heads, head_dim = q.shape
    fp8 = isinstance(k_cache, Fp8Cache)
    # fp8: the codes in place of the KV, the scales beside them; else the scale arguments are unread placeholders.
    k_scales, v_scales = (k_cache.scales, v_cache.scales) if fp8 else (q, q)
    k_cache, v_cache = _codes(k_cache), _codes(v_cache)
    scale_args = (k_scales, v_scales, k_scales.stride(0) if fp8 else 0, v_scales.stride(0) if fp8 else 0)
    fp8_args = {"KV_FP8": fp8, "FP8_NATIVE": fp8 and native_fp8()}
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    bs = k_cache.shape[1]
    assert q.stride(2) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1, "head_dim must be contiguous"
    block_d = _pow2(head_dim)
    precision = _precision(q.dtype)
    bt = batch.block_tables
    out = torch.empty_like(q) if out is None else out
    lse = torch.empty((T, num_heads), dtype=torch.float32, device=q.device)
    # Decode entries and short chunks go to the split-K kernel, longer chunks to the prefill kernel. In a mixed step
    # the short entries come first (the scheduler puts decodes first): that leading run takes the split-K kernel too,
    # instead of prefill tiles of which one row in BLOCK_M would be used.
    if batch.max_q <= SPLIT_MAX_Q:
        short, rows, short_q = batch.num_entries, T, batch.max_q
    else:
        short, rows, short_q = _leading_short(batch)
    if short and rows:
        # Split the keys into partitions; each program reads one KV head's keys once for all the entry's query tokens
        # and heads of that KV head, and one more launch merges the partitions.
        cfg = {**DECODE_CONFIG, **(decode_config or {})}
        partition = cfg["partition"]
        parts = max(1, -(-batch.max_context // partition))
        o_part = torch.empty((rows, parts, num_heads, head_dim), dtype=torch.float32, device=q.device)
        l_part = torch.empty((rows, parts, num_heads), dtype=torch.float32, device=q.device)
        _split_kernel[(short, num_kv_heads, parts)](
            q,
            k_cache,
            v_cache,
            o_part,
            l_part,
            bt,
            batch.q_starts,
            batch.q_pos0,
            batch.context_lens,
            batch.first_block,
            q.stride(0),
            q.stride(1),
            o_part.stride(0),
            o_part.stride(1),
            o_part.stride(2),
            l_part.stride(0),
            l_part.stride(1),
            k_cache.stride(0),
            k_cache.stride(1),
            k_cache.stride(2),
            v_cache.stride(0),
            v_cache.stride(1),
            v_cache.stride(2),
            bt.stride(0),
            scale,
            sliding_window,
            partition,
            *scale_args,
            GROUP=group,
            ROWS=_pow2(short_q * group),
            BS=bs,
            HEAD_DIM=head_dim,
            BLOCK_N=cfg["block_n"],
            BLOCK_D=block_d,
            PRECISION=precision,
            CAUSAL=short_q > 1,
            **fp8_args,
            num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"],
        )
        # Merge the partitions; those past a sequence's end hold lse -inf and weigh nothing.
        _reduce_kernel[(rows, num_heads)](
            o_part,
            l_part,
            out,
            lse,
            parts,
            o_part.stride(0),
            o_part.stride(1),
            o_part.stride(2),
            l_part.stride(0),
            l_part.stride(1),
            out.stride(0),
            out.stride(1),
            lse.stride(0),
            HEAD_DIM=head_dim,
            BLOCK_P=16,
            BLOCK_D=block_d,
        )
    if short == batch.num_entries:
        return (out, lse) if need_lse else out
    base = PREFILL_CONFIG if q.element_size() <= 2 and block_d <= 128 else PREFILL_CONFIG_SMALL
    cfg = {**base, **(prefill_config or {})}
    block_m, block_n = cfg["block_m"], cfg["block_n"]
    heads = group if cfg["pack_gqa"] else 1
    for name in ("block_m", "block_n"):
        if cfg[name] < 16 or cfg[name] & (cfg[name] - 1):
            raise ValueError(
                f"prefill_config {name}={cfg[name]}: must be a power of two of at least 16 (tl.dot's minimum)"
            )
    if heads > block_m:
        raise ValueError(
            f"prefill_config block_m={block_m} holds no token of a packed group of {heads} heads: raise block_m or set pack_gqa=False"
        )
    tile_tokens = block_m // heads
    num_tiles, te, tm = _prefill_tiles(batch, tile_tokens, q.device, short)
    if num_tiles:
        head_programs = num_heads // heads
        _prefill_kernel[(num_tiles * head_programs,)](
            q,
            k_cache,
            v_cache,
            out,
            lse,
            bt,
            te,
            tm,
            batch.q_starts,
            batch.q_pos0,
            batch.context_lens,
            batch.first_block,
            q.stride(0),
            q.stride(1),
            out.stride(0),
            out.stride(1),
            lse.stride(0),
            k_cache.stride(0),
            k_cache.stride(1),
            k_cache.stride(2),
            v_cache.stride(0),
            v_cache.stride(1),
            v_cache.stride(2),
            bt.stride(0),
            scale * _LOG2_E,
            sliding_window,
            head_programs,
            *scale_args,
            GROUP=group,
            HEADS=heads,
            TOKENS=tile_tokens,
            BS=bs,
            HEAD_DIM=head_dim,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_D=block_d,
            PRECISION=precision,
            **fp8_args,
            num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"],
        )
    return (out, lse) if need_lse else out


def compile_variants(
    num_heads: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype, device, caches=None
) -> int:
    """Compile every variant of the split-K kernel a run can need (one per row bucket and causality: a short chunk
    of 2-16 query tokens, such as the tail of a prompt beside decodes, needs its own), the prefill kernel and the
    merge kernels, on tiny inputs, so that no compilation (0.8-1.2 s each on an H100) lands in the middle of a run.
    `caches`: one layer's (keys, values) to compile for (an fp8 pool's views: their strides pick the variants; at
    least 4 slots, read, never written), else 4 zero slots in `dtype`. Returns the number of calls made; compiled
    kernels stay in Triton's cache (memory and disk)."""
    device = torch.device(device)
    group = num_heads // num_kv_heads
    if caches is None:
        kc = torch.zeros((4, block_size, num_kv_heads, head_dim), dtype=dtype, device=device)
        caches = (kc, torch.zeros_like(kc))
    kc, vc = caches
    seen, calls = set(), 0

    def call(q_lens: list[int]) -> None:
        context = [n + block_size for n in q_lens]  # a block of earlier keys each
        starts = [0]
        for n in q_lens:
            starts.append(starts[-1] + n)
        width = -(-max(context) // block_size)
        b = len(q_lens)

        def ints(values: list[int]) -> torch.Tensor:  # each its own allocation: aligned as the engine's are
            return torch.tensor(values, dtype=torch.int32, device=device)

        batch = PagedBatch(
            ints(starts),
            ints([c - n for c, n in zip(context, q_lens)]),
            ints(context),
            ints([0] * b),
            (torch.arange(b * width, dtype=torch.int32, device=device) % 4).view(b, width),
            max(q_lens),
            max(context),
            starts,
        )
        q = torch.zeros((starts[-1], num_heads, head_dim), dtype=dtype, device=device)
        paged_attention_triton(q, kc, vc, batch, default_scale(head_dim), need_lse=True)

    for n in range(1, SPLIT_MAX_Q + 1):
        key = (
            _pow2(n * group),
            n > 1,
        )  # the split-K kernel's ROWS and CAUSAL for a batch whose longest entry has n rows
        if key not in seen:
            seen.add(key)
            call([n])
            call([1, n, SPLIT_MAX_Q + 1])  # the same leading run before a prefill entry (a mixed step)
            calls += 2
    out = torch.zeros((1, num_heads, head_dim), dtype=dtype, device=device)
    lse = torch.zeros((1, num_heads), dtype=torch.float32, device=device)
    merge_partials_triton(out, lse, out.clone(), lse.clone())
    return calls + 1


def paged_attention(
    q, k_cache, v_cache, batch: PagedBatch, scale: float, sliding_window: int = 0, need_lse: bool = False, out=None
):
    """The Triton kernels on CUDA, the reference elsewhere."""
    if q.is_cuda:
        return paged_attention_triton(q, k_cache, v_cache, batch, scale, sliding_window, need_lse, out=out)
    return paged_attention_reference(q, k_cache, v_cache, batch, scale, sliding_window, need_lse, out)


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)

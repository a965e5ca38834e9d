"""The flash-attention prefill kernel, for longer chunks, with its tuned configurations and its grid of tiles.

`_prefill_kernel`: each program a tile of query rows of one entry, for one query head or a KV head's packed group
of them; keys every row of the tile sees in full are read without masks, only the diagonal and window edges are
masked. `PREFILL_CONFIG` and `PREFILL_CONFIG_SMALL` are its tuned launch configurations; `_prefill_tiles` builds
its grid. `paged_attention.paged_attention_triton` launches it; its PyTorch reference is
`paged_attention.paged_attention_reference`.
"""

from __future__ import annotations

import torch

from tierkv.kernels.paged_batch import PagedBatch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


if triton is not None:
    from tierkv.kernels.kv_fp8 import kv_tile

    @triton.jit
    def _prefill_keys(
        q,
        q_pos,
        K,
        V,
        BT_ROW,
        kv0,
        lo,
        hi,
        kvh,
        qk_scale,
        window,
        m_i,
        l_i,
        acc,
        stride_ks,
        stride_kt,
        stride_kh,
        stride_vs,
        stride_vt,
        stride_vh,
        KS,
        VS,
        stride_kss,
        stride_vss,
        MASKED: tl.constexpr,
        BS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr,
        KV_FP8: tl.constexpr,
        FP8_NATIVE: tl.constexpr,
    ):
        """Online softmax in base 2 (scores times qk_scale = scale * log2(e)) of the rows `q` at positions `q_pos`
        over keys [lo, hi) of one sequence (block table row BT_ROW, whose block 0 starts at position kv0).

        MASKED=True masks per key and row: keys at or past hi, after the row (causal), outside its window.
        MASKED=False masks nothing, so it is only for ranges that every row sees in full (keys that exist, precede
        the first row and lie in the last row's window) and that are whole BLOCK_N steps long.

        KV_FP8: K and V hold e4m3 codes and KS, VS the blocks' scales, decoded in registers (as in paged_decode)."""
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < HEAD_DIM
        for start in range(lo, hi, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            rel = offs_n - kv0
            n_mask = offs_n < hi
            if MASKED:
                slot = tl.load(BT_ROW + rel // BS, mask=n_mask, other=0).to(tl.int64)
            else:
                slot = tl.load(BT_ROW + rel // BS).to(tl.int64)
            k_rows = slot * stride_ks + (rel % BS) * stride_kt + kvh * stride_kh
            v_rows = slot * stride_vs + (rel % BS) * stride_vt + kvh * stride_vh
            k = _load_keys(K + k_rows[:, None] + offs_d[None, :], n_mask, d_mask, MASKED, HEAD_DIM != BLOCK_D)
            k = kv_tile(k, KS + slot * stride_kss + kvh, q, KV_FP8, FP8_NATIVE)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
            if MASKED:
                valid = n_mask[None, :] & (offs_n[None, :] <= q_pos[:, None])
                if window > 0:
                    valid = valid & (offs_n[None, :] > q_pos[:, None] - window)
                s = tl.where(valid, s * qk_scale, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                # A row that has seen no key yet keeps m = -inf; subtracting 0 instead keeps its p and alpha at 0.
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                p = tl.exp2(s - m_safe[:, None])
                alpha = tl.exp2(m_i - m_safe)
            else:
                # Every score is finite here, so m_new is too; the scaling fuses into the subtraction.
                m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
                p = tl.exp2(s * qk_scale - m_new[:, None])
                alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = _load_keys(V + v_rows[:, None] + offs_d[None, :], n_mask, d_mask, MASKED, HEAD_DIM != BLOCK_D)
            v = kv_tile(v, VS + slot * stride_vss + kvh, q, KV_FP8, FP8_NATIVE)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
            m_i = m_new
        return m_i, l_i, acc

    @triton.jit
    def _load_keys(ptrs, n_mask, d_mask, MASK_N: tl.constexpr, MASK_D: tl.constexpr):
        """A (BLOCK_N, BLOCK_D) tile of K or V, masked only where a mask is needed (unmasked loads pipeline and
        vectorise best)."""
        if MASK_N:
            tile = tl.load(ptrs, mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        elif MASK_D:
            tile = tl.load(ptrs, mask=d_mask[None, :], other=0.0)
        else:
            tile = tl.load(ptrs)
        return tile

    # Arguments that change from step to step are not specialised on (divisibility by 16, equality to 1): each new
    # combination would compile another variant, seconds in the middle of a run.
    @triton.jit(do_not_specialize=["stride_bt"])
    def _prefill_kernel(
        Q,
        K,
        V,
        O,
        LSE,
        BT,
        TILE_ENTRY,
        TILE_M0,
        Q_STARTS,
        Q_POS0,
        CTX,
        FIRST,
        stride_qt,
        stride_qh,
        stride_ot,
        stride_oh,
        stride_lt,
        stride_ks,
        stride_kt,
        stride_kh,
        stride_vs,
        stride_vt,
        stride_vh,
        stride_bt,
        qk_scale,
        window,
        head_programs,
        KS,
        VS,
        stride_kss,
        stride_vss,
        GROUP: tl.constexpr,
        HEADS: tl.constexpr,
        TOKENS: tl.constexpr,
        BS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr,
        KV_FP8: tl.constexpr,
        FP8_NATIVE: tl.constexpr,
    ):
        # One program: TOKENS query tokens of one entry (a tile) times HEADS query heads of one KV head, as BLOCK_M
        # rows, token-major. HEADS = 1 is one head per program; HEADS = GROUP packs the KV head's whole group, which
        # then reads each key once. Consecutive programs share a tile, so the heads of one KV head meet in L2.
        pid = tl.program_id(0)
        tile = pid // head_programs
        h0 = (pid % head_programs) * HEADS
        e = tl.load(TILE_ENTRY + tile)
        m0 = tl.load(TILE_M0 + tile)
        qs = tl.load(Q_STARTS + e)
        n_q = tl.load(Q_STARTS + e + 1) - qs
        p0 = tl.load(Q_POS0 + e)
        kv0 = tl.load(FIRST + e) * BS
        offs_r = tl.arange(0, BLOCK_M)
        tok = offs_r // HEADS
        heads = h0 + offs_r % HEADS
        r_mask = (tok < TOKENS) & (m0 + tok < n_q)
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < HEAD_DIM
        rows = (qs + m0 + tok).to(tl.int64)
        q = tl.load(
            Q + rows[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
            mask=r_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        # Keys in three ranges: [lo, band_lo) and [band_hi, hi) masked per row; [band_lo, band_hi), whole BLOCK_N
        # steps of keys before the tile's first query and inside its last query's window, unmasked (most keys of a
        # long prompt).
        first_q = p0 + m0
        last_q = first_q + TOKENS - 1  # rows past the entry's end only widen the masked ranges
        hi = tl.minimum(tl.load(CTX + e), last_q + 1)
        lo = kv0
        band_lo = kv0
        if window > 0:
            lo = tl.maximum(kv0, first_q - window + 1)
            band_lo = tl.minimum(tl.maximum(lo, last_q - window + 1), hi)
        band_hi = band_lo + tl.maximum(tl.minimum(first_q, hi) - band_lo, 0) // BLOCK_N * BLOCK_N
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        q_pos = first_q + tok
        kvh = h0 // GROUP
        bt_row = BT + e * stride_bt
        m_i, l_i, acc = _prefill_keys(
            q,
            q_pos,
            K,
            V,
            bt_row,
            kv0,
            lo,
            band_lo,
            kvh,
            qk_scale,
            window,
            m_i,
            l_i,
            acc,
            stride_ks,
            stride_kt,
            stride_kh,
            stride_vs,
            stride_vt,
            stride_vh,
            KS,
            VS,
            stride_kss,
            stride_vss,
            MASKED=True,
            BS=BS,
            HEAD_DIM=HEAD_DIM,
            BLOCK_N=BLOCK_N,
            BLOCK_D=BLOCK_D,
            PRECISION=PRECISION,
            KV_FP8=KV_FP8,
            FP8_NATIVE=FP8_NATIVE,
        )
        m_i, l_i, acc = _prefill_keys(
            q,
            q_pos,
            K,
            V,
            bt_row,
            kv0,
            band_lo,
            band_hi,
            kvh,
            qk_scale,
            window,
            m_i,
            l_i,
            acc,
            stride_ks,
            stride_kt,
            stride_kh,
            stride_vs,
            stride_vt,
            stride_vh,
            KS,
            VS,
            stride_kss,
            stride_vss,
            MASKED=False,
            BS=BS,
            HEAD_DIM=HEAD_DIM,
            BLOCK_N=BLOCK_N,
            BLOCK_D=BLOCK_D,
            PRECISION=PRECISION,
            KV_FP8=KV_FP8,
            FP8_NATIVE=FP8_NATIVE,
        )
        m_i, l_i, acc = _prefill_keys(
            q,
            q_pos,
            K,
            V,
            bt_row,
            kv0,
            band_hi,
            hi,
            kvh,
            qk_scale,
            window,
            m_i,
            l_i,
            acc,
            stride_ks,
            stride_kt,
            stride_kh,
            stride_vs,
            stride_vt,
            stride_vh,
            KS,
            VS,
            stride_kss,
            stride_vss,
            MASKED=True,
            BS=BS,
            HEAD_DIM=HEAD_DIM,
            BLOCK_N=BLOCK_N,
            BLOCK_D=BLOCK_D,
            PRECISION=PRECISION,
            KV_FP8=KV_FP8,
            FP8_NATIVE=FP8_NATIVE,
        )
        # Rows that saw no key (a window past every key of a streamed chunk) get output 0 and lse -inf.
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)  # base 2 -> e: * ln 2
        io_mask = r_mask[:, None] & d_mask[None, :]
        tl.store(
            O + rows[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
            (acc / l_safe[:, None]).to(O.dtype.element_ty),
            mask=io_mask,
        )
        tl.store(LSE + rows * stride_lt + heads, lse, mask=r_mask)


# Prefill kernel, 16-bit inputs up to head_dim 128: block_m query rows per program (tokens times packed heads), block_n keys per
# iteration, pack_gqa = one program per KV head for its whole group of query heads. num_stages 5 because the key
# loads hang off a block-table load and Triton's pipeliner splits the stages between the two: 3 and 4 leave the
# keys one buffer (no load in flight during a step's math), 5 gives them two. Chosen by
# `benchmarks/attention_prefill.py --sweep` on an H100 (2026-11-24): the best mean over 8x1024, 1x8192, 2x4096 and
# 1x2048+8192 (within 4% of each case's best); packing the GQA group was 3-9% faster than one head per program.
PREFILL_CONFIG = {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 5, "pack_gqa": True}
# Prefill kernel, float32 inputs or head_dim over 128: rows of K and V twice as wide or more, so PREFILL_CONFIG's
# buffers would not fit an H100's 227 KiB of shared memory (257 KiB at bf16, head_dim 256), and float32's "ieee"
# dot uses no tensor cores anyway. The tiles the prefill kernel has always used (96 KiB at bf16, head_dim 256).
PREFILL_CONFIG_SMALL = {"block_m": 64, "block_n": 32, "num_warps": 4, "num_stages": 3, "pack_gqa": False}


def _prefill_tiles(
    batch: PagedBatch, tile_tokens: int, device, first_entry: int = 0
) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(number of tiles, entry of each tile, first query row of each tile within its entry) for tiles of
    `tile_tokens` query tokens over entries `first_entry` on, built on the host once per batch, tile height and
    first entry (every layer reuses them).

    Tiles are ordered by descending first row: later rows see more keys, so the longest programs start first and
    the short ones fill the tail of the grid."""
    tiles = batch._tiles.get((tile_tokens, first_entry))
    if tiles is None:
        starts = batch.q_starts_host if batch.q_starts_host is not None else batch.q_starts.tolist()
        order = sorted(
            (
                (m0, i)
                for i in range(first_entry, batch.num_entries)
                for m0 in range(0, starts[i + 1] - starts[i], tile_tokens)
            ),
            key=lambda t: -t[0],
        )
        # Rows padded to 16 entries: both start 64-byte aligned (Triton specialises on pointer alignment).
        width = -(-len(order) // 16) * 16
        host = torch.zeros((2, width), dtype=torch.int32)
        host[0, : len(order)] = torch.tensor([i for _, i in order], dtype=torch.int32)
        host[1, : len(order)] = torch.tensor([m0 for m0, _ in order], dtype=torch.int32)
        if torch.device(device).type == "cuda":
            # Pinned and non-blocking: a blocking copy would make the host wait for all the work queued before it.
            host = host.pin_memory().to(device, non_blocking=True)
        tiles = batch._tiles[tile_tokens, first_entry] = (len(order), host[0], host[1])
    return tiles

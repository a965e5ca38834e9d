"""Attention over a paged KV cache, for prefill (chunked, causal) and decode, with GQA and sliding windows.

One layer's cache is two views `k_cache`, `v_cache` of shape (num_slots, block_size, num_kv_heads, head_dim)
(strided: tierkv keeps every layer of a block together). A batch is described by `PagedBatch`: per entry, the
query rows it owns in the flattened `q` (shape (T, num_heads, head_dim)), the absolute position of its first
query token, its context length after this step, and its block table: the slots of its logical blocks
`first_block, first_block + 1, ...` (blocks before `first_block` are not in the table: the caller streams them
and merges their partial results with `merge_partials`).

Every function returns the attention output and, when asked, the log-sum-exp of the scores per (row, head),
which is what partial results over disjoint key sets need to be merged exactly.

`paged_attention_reference` is plain PyTorch (it is what runs on CPU); `paged_attention_triton` is the Triton
implementation: a split-K kernel for decode and short chunks (each program reads a partition of one KV head's
keys once for all the entry's query tokens and heads of that KV head), and a flash-attention prefill kernel for
longer chunks (each program a tile of query rows of one entry; keys every row of the tile sees in full are read
without masks, only the diagonal and window edges are masked).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


@dataclass
class PagedBatch:
    """Per-entry description of one attention call (all int tensors on the device of `q`, except where noted).

    q_starts: (B + 1,) int32, entry i owns rows q_starts[i]:q_starts[i+1] of q.
    q_pos0: (B,) int32, absolute position of each entry's first query row.
    context_lens: (B,) int32, keys [0, context_len) exist once this step's keys are written.
    first_block: (B,) int32, logical index of block_tables[i, 0].
    block_tables: (B, max_blocks) int32 slots, padded with 0.
    max_q: the largest number of query rows of an entry (host int).
    max_context: the largest context length (host int; sizes the decode kernel's grid without a device sync).
    q_starts_host: optional, q_starts as a host list (the prefill kernel's tiles are then built without a sync;
    they are built once per batch and reused by every layer).
    """

    q_starts: torch.Tensor
    q_pos0: torch.Tensor
    context_lens: torch.Tensor
    first_block: torch.Tensor
    block_tables: torch.Tensor
    max_q: int
    max_context: int
    q_starts_host: list[int] | None = None  # q_starts as a host list, where the caller has it (saves a device sync)
    _tiles: dict = field(
        default_factory=dict, repr=False, compare=False
    )  # prefill tiles per (tile height, first entry), on device
    _short: tuple[int, int, int] | None = field(default=None, repr=False, compare=False)  # see _leading_short

    @property
    def num_entries(self) -> int:
        return self.q_pos0.shape[0]


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


def gather_keys(cache: torch.Tensor, table: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """The first `num_tokens` tokens of the blocks `table` of one layer's cache, as (num_tokens, Hkv, D)."""
    blocks = cache[table.long()]  # (nb, bs, Hkv, D)
    return blocks.reshape(-1, *cache.shape[2:])[:num_tokens]


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
    bs = k_cache.shape[1]
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
        k = gather_keys(k_cache, table, ctx - kv0)
        v = gather_keys(v_cache, table, ctx - kv0)
        q_pos = torch.arange(p0, p0 + r1 - r0, device=q.device)
        k_pos = torch.arange(kv0, ctx, device=q.device)
        res = attention_reference(q[r0:r1], k, v, q_pos, k_pos, scale, sliding_window, need_lse)
        if need_lse:
            out[r0:r1], lse[r0:r1] = res
        else:
            out[r0:r1] = res
    return (out, lse) if need_lse else out


def merge_partials(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor):
    """Exact merge of two attention results over disjoint key sets: (out, lse). Rows with no keys have lse -inf."""
    m = torch.maximum(lse_a, lse_b)
    m_safe = torch.where(torch.isinf(m), 0.0, m)
    wa = torch.exp(lse_a - m_safe)
    wb = torch.exp(lse_b - m_safe)
    total = wa + wb
    denom = torch.where(total == 0, 1.0, total)
    out = (out_a.float() * (wa / denom)[..., None] + out_b.float() * (wb / denom)[..., None]).to(out_a.dtype)
    return out, torch.where(total == 0, float("-inf"), m_safe + torch.log(denom))


def merge_partials_into(out: torch.Tensor, lse: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> None:
    """`out, lse = merge_partials(out, lse, out_b, lse_b)` in place: one Triton launch on CUDA (the streaming path
    merges one chunk per layer this way), the reference elsewhere. out: (T, H, D), lse: (T, H) float32."""
    if out.is_cuda and triton is not None:
        merge_partials_triton(out, lse, out_b, lse_b)
        return
    merged, merged_lse = merge_partials(out, lse, out_b, lse_b)
    out.copy_(merged)
    lse.copy_(merged_lse)


# -- Triton -----------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _attend_keys(
        q,
        q_pos,
        K,
        V,
        BT_ROW,
        kv0,
        lo,
        hi,
        kvh,
        scale,
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
        CAUSAL: tl.constexpr,
        BS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """Online softmax of the query rows `q` over keys [lo, hi) of one sequence, whose block table row is
        BT_ROW (logical block 0 of the table is at position kv0). Returns the updated (m_i, l_i, acc)."""
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < HEAD_DIM
        for start in range(lo, hi, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            n_mask = offs_n < hi
            rel = offs_n - kv0
            slot = tl.load(BT_ROW + rel // BS, mask=n_mask, other=0).to(tl.int64)
            tok = rel % BS
            kv_mask = n_mask[:, None] & d_mask[None, :]
            k = tl.load(
                K + slot[:, None] * stride_ks + tok[:, None] * stride_kt + kvh * stride_kh + offs_d[None, :],
                mask=kv_mask,
                other=0.0,
            )
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            valid = n_mask[None, :]
            if CAUSAL:
                valid = valid & (offs_n[None, :] <= q_pos[:, None])
                if window > 0:
                    valid = valid & (offs_n[None, :] > q_pos[:, None] - window)
            s = tl.where(valid, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(
                V + slot[:, None] * stride_vs + tok[:, None] * stride_vt + kvh * stride_vh + offs_d[None, :],
                mask=kv_mask,
                other=0.0,
            )
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        return m_i, l_i, acc

    @triton.jit
    def _normalise(acc, m_i, l_i):
        """(output, log-sum-exp) from the running softmax state; rows that saw no key get 0 and -inf."""
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        return acc / l_safe[:, None], tl.where(l_i == 0.0, float("-inf"), m_i + tl.log(l_safe))

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
        MASKED: tl.constexpr,
        BS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """Online softmax in base 2 (scores times qk_scale = scale * log2(e)) of the rows `q` at positions `q_pos`
        over keys [lo, hi) of one sequence (block table row BT_ROW, whose block 0 starts at position kv0).

        MASKED=True masks per key and row: keys at or past hi, after the row (causal), outside its window.
        MASKED=False masks nothing, so it is only for ranges that every row sees in full (keys that exist, precede
        the first row and lie in the last row's window) and that are whole BLOCK_N steps long."""
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
        GROUP: tl.constexpr,
        HEADS: tl.constexpr,
        TOKENS: tl.constexpr,
        BS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr,
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
            MASKED=True,
            BS=BS,
            HEAD_DIM=HEAD_DIM,
            BLOCK_N=BLOCK_N,
            BLOCK_D=BLOCK_D,
            PRECISION=PRECISION,
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
            MASKED=False,
            BS=BS,
            HEAD_DIM=HEAD_DIM,
            BLOCK_N=BLOCK_N,
            BLOCK_D=BLOCK_D,
            PRECISION=PRECISION,
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
            MASKED=True,
            BS=BS,
            HEAD_DIM=HEAD_DIM,
            BLOCK_N=BLOCK_N,
            BLOCK_D=BLOCK_D,
            PRECISION=PRECISION,
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

    @triton.jit(do_not_specialize=["stride_bt", "stride_oe", "stride_le"])
    def _split_kernel(
        Q,
        K,
        V,
        O_PART,
        L_PART,
        BT,
        Q_STARTS,
        Q_POS0,
        CTX,
        FIRST,
        stride_qt,
        stride_qh,
        stride_oe,
        stride_op,
        stride_oh,
        stride_le,
        stride_lp,
        stride_ks,
        stride_kt,
        stride_kh,
        stride_vs,
        stride_vt,
        stride_vh,
        stride_bt,
        scale,
        window,
        partition,
        GROUP: tl.constexpr,
        ROWS: tl.constexpr,
        BS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr,
        CAUSAL: tl.constexpr,
    ):
        # One program: one entry, one KV head, one partition of the keys; its rows are every (query token, query
        # head of this KV head) pair of the entry, so the keys are read once for all of them.
        e = tl.program_id(0)
        kvh = tl.program_id(1)
        part = tl.program_id(2)
        qs = tl.load(Q_STARTS + e)
        n_q = tl.load(Q_STARTS + e + 1) - qs
        p0 = tl.load(Q_POS0 + e)
        ctx = tl.load(CTX + e)
        kv0 = tl.load(FIRST + e) * BS
        offs_r = tl.arange(0, ROWS)
        tok = offs_r // GROUP
        heads = kvh * GROUP + offs_r % GROUP
        r_mask = tok < n_q
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < HEAD_DIM
        rows = (qs + tok).to(tl.int64)
        q = tl.load(
            Q + rows[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
            mask=r_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        lo = kv0 + part * partition
        hi = tl.minimum(ctx, lo + partition)
        if window > 0:
            lo = tl.maximum(lo, p0 - window + 1)  # the first query's window; later rows are masked per row
        m_i = tl.full([ROWS], float("-inf"), tl.float32)
        l_i = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, BLOCK_D], tl.float32)
        # With one query token (decode) the keys [lo, hi) all precede it and lie in its window: no mask needed.
        m_i, l_i, acc = _attend_keys(
            q,
            p0 + tok,
            K,
            V,
            BT + e * stride_bt,
            kv0,
            lo,
            hi,
            kvh,
            scale,
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
            CAUSAL=CAUSAL,
            BS=BS,
            HEAD_DIM=HEAD_DIM,
            BLOCK_N=BLOCK_N,
            BLOCK_D=BLOCK_D,
            PRECISION=PRECISION,
        )
        out, lse = _normalise(acc, m_i, l_i)
        o_ptr = O_PART + rows[:, None] * stride_oe + part * stride_op + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptr, out, mask=r_mask[:, None] & d_mask[None, :])
        tl.store(L_PART + rows * stride_le + part * stride_lp + heads, lse, mask=r_mask)

    @triton.jit(do_not_specialize=["parts", "stride_oe", "stride_op", "stride_le", "stride_lp"])
    def _reduce_kernel(
        O_PART,
        L_PART,
        OUT,
        LSE,
        parts,
        stride_oe,
        stride_op,
        stride_oh,
        stride_le,
        stride_lp,
        stride_ot,
        stride_oh2,
        stride_lt,
        HEAD_DIM: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        e = tl.program_id(0)
        h = tl.program_id(1)
        offs_p = tl.arange(0, BLOCK_P)
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < HEAD_DIM
        m = tl.max(tl.full([BLOCK_P], float("-inf"), tl.float32), 0)
        for p0 in range(0, parts, BLOCK_P):
            lp = tl.load(
                L_PART + e * stride_le + (p0 + offs_p) * stride_lp + h, mask=p0 + offs_p < parts, other=float("-inf")
            )
            m = tl.maximum(m, tl.max(lp, 0))
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        acc = tl.zeros([BLOCK_D], tl.float32)
        total = tl.sum(tl.zeros([BLOCK_P], tl.float32), 0)
        for p0 in range(0, parts, BLOCK_P):
            p_mask = p0 + offs_p < parts
            lp = tl.load(L_PART + e * stride_le + (p0 + offs_p) * stride_lp + h, mask=p_mask, other=float("-inf"))
            w = tl.exp(lp - m_safe)
            o = tl.load(
                O_PART + e * stride_oe + (p0 + offs_p)[:, None] * stride_op + h * stride_oh + offs_d[None, :],
                mask=p_mask[:, None] & d_mask[None, :],
                other=0.0,
            )
            acc += tl.sum(o * w[:, None], 0)
            total += tl.sum(w, 0)
        denom = tl.where(total == 0.0, 1.0, total)
        tl.store(OUT + e * stride_ot + h * stride_oh2 + offs_d, (acc / denom).to(OUT.dtype.element_ty), mask=d_mask)
        tl.store(LSE + e * stride_lt + h, tl.where(total == 0.0, float("-inf"), m_safe + tl.log(denom)))


# Tuned on an H100 (benchmarks/attention_decode.py --sweep): see BENCHMARKS.md.
DECODE_CONFIG = {"partition": 1024, "block_n": 64, "num_warps": 4, "num_stages": 2}
# Entries of at most this many query tokens go through the split-K kernel (the prefill kernel's grid is too small
# for a short chunk over a long context: one program per tile of query rows and head).
SPLIT_MAX_Q = 16
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


if triton is not None:

    @triton.jit
    def _merge_kernel(
        out_ptr,
        lse_ptr,
        ob_ptr,
        lb_ptr,
        so_t,
        so_h,
        sl_t,
        sb_t,
        sb_h,
        slb_t,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # One (row, head): the same arithmetic as merge_partials, in float32.
        t = tl.program_id(0)
        h = tl.program_id(1)
        la = tl.load(lse_ptr + t * sl_t + h)
        lb = tl.load(lb_ptr + t * slb_t + h)
        m = tl.maximum(la, lb)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        wa = tl.exp(la - m_safe)
        wb = tl.exp(lb - m_safe)
        total = wa + wb
        denom = tl.where(total == 0, 1.0, total)
        d = tl.arange(0, BLOCK_D)
        mask = d < HEAD_DIM
        a = tl.load(out_ptr + t * so_t + h * so_h + d, mask=mask).to(tl.float32)
        b = tl.load(ob_ptr + t * sb_t + h * sb_h + d, mask=mask).to(tl.float32)
        merged = a * (wa / denom) + b * (wb / denom)
        tl.store(out_ptr + t * so_t + h * so_h + d, merged.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(lse_ptr + t * sl_t + h, tl.where(total == 0, float("-inf"), m_safe + tl.log(denom)))


def merge_partials_triton(out: torch.Tensor, lse: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> None:
    """Triton implementation of `merge_partials_into` (in place on `out`, `lse`)."""
    T, H, D = out.shape
    if T == 0:
        return
    assert out.stride(2) == 1 and out_b.stride(2) == 1 and lse.stride(1) == 1 and lse_b.stride(1) == 1
    _merge_kernel[(T, H)](
        out,
        lse,
        out_b,
        lse_b,
        out.stride(0),
        out.stride(1),
        lse.stride(0),
        out_b.stride(0),
        out_b.stride(1),
        lse_b.stride(0),
        HEAD_DIM=D,
        BLOCK_D=_pow2(D),
    )


_LOG2_E = 1.4426950408889634  # the prefill kernel works in base 2 (exp2): scores scaled by scale * log2(e)


def _pow2(n: int, floor: int = 16) -> int:
    return max(floor, 1 << (max(1, n) - 1).bit_length())


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
            GROUP=group,
            ROWS=_pow2(short_q * group),
            BS=bs,
            HEAD_DIM=head_dim,
            BLOCK_N=cfg["block_n"],
            BLOCK_D=block_d,
            PRECISION=precision,
            CAUSAL=short_q > 1,
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
            GROUP=group,
            HEADS=heads,
            TOKENS=tile_tokens,
            BS=bs,
            HEAD_DIM=head_dim,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_D=block_d,
            PRECISION=precision,
            num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"],
        )
    return (out, lse) if need_lse else out


def compile_variants(
    num_heads: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype, device
) -> int:
    """Compile every variant of the split-K kernel a run can need (one per row bucket and causality: a short chunk
    of 2-16 query tokens, such as the tail of a prompt beside decodes, needs its own), the prefill kernel and the
    merge kernels, on tiny inputs, so that no compilation (0.8-1.2 s each on an H100) lands in the middle of a run.
    Returns the number of calls made; compiled kernels stay in Triton's cache (memory and disk)."""
    device = torch.device(device)
    group = num_heads // num_kv_heads
    kc = torch.zeros((4, block_size, num_kv_heads, head_dim), dtype=dtype, device=device)
    vc = torch.zeros_like(kc)
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


def _leading_short(batch: PagedBatch) -> tuple[int, int, int]:
    """(entries, query rows, most query rows of one entry) of the batch's leading run of entries of at most
    SPLIT_MAX_Q query rows, from host q_starts (none without them); found once per batch, every layer reuses it."""
    found = batch._short
    if found is None:
        starts, short = batch.q_starts_host, 0
        if starts is not None:
            while short < batch.num_entries and starts[short + 1] - starts[short] <= SPLIT_MAX_Q:
                short += 1
        found = batch._short = (
            short,
            starts[short] if short else 0,
            max((starts[i + 1] - starts[i] for i in range(short)), default=0),
        )
    return found


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


def paged_attention(
    q, k_cache, v_cache, batch: PagedBatch, scale: float, sliding_window: int = 0, need_lse: bool = False, out=None
):
    """The Triton kernels on CUDA, the reference elsewhere."""
    if q.is_cuda:
        return paged_attention_triton(q, k_cache, v_cache, batch, scale, sliding_window, need_lse, out=out)
    return paged_attention_reference(q, k_cache, v_cache, batch, scale, sliding_window, need_lse, out)


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)

"""The split-K attention kernel, for decode entries and short chunks, with the rule for which entries take it.

`_split_kernel`: each program reads a partition of one KV head's keys once for all the entry's query tokens and
the query heads of that KV head (online softmax, partial output and log-sum-exp per partition); `_reduce_kernel`
merges the partitions. `DECODE_CONFIG` is their tuned launch configuration; `SPLIT_MAX_Q` and `_leading_short`
decide which entries of a batch they serve. `paged_attention.paged_attention_triton` launches them; their PyTorch
reference is `paged_attention.paged_attention_reference`.
"""

from __future__ import annotations

from tierkv.kernels.paged_batch import PagedBatch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


if triton is not None:
    from tierkv.kernels.kv_fp8 import kv_tile

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
        KS,
        VS,
        stride_kss,
        stride_vss,
        CAUSAL: tl.constexpr,
        BS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr,
        KV_FP8: tl.constexpr,
        FP8_NATIVE: tl.constexpr,
    ):
        """Online softmax of the query rows `q` over keys [lo, hi) of one sequence, whose block table row is
        BT_ROW (logical block 0 of the table is at position kv0). Returns the updated (m_i, l_i, acc).

        KV_FP8: K and V hold e4m3 codes (uint8) and KS, VS each block's scale per head (kernels/kv_fp8.py): the
        tiles are decoded in registers, in q's dtype; FP8_NATIVE as in kv_fp8.decode_tile."""
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < HEAD_DIM
        for start in range(lo, hi, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            n_mask = offs_n < hi
            rel = offs_n - kv0
            slot = tl.load(BT_ROW + rel // BS, mask=n_mask, other=0).to(tl.int64)
            tok = rel % BS
            kv_mask = n_mask[:, None] & d_mask[None, :]
            k_ptrs = K + slot[:, None] * stride_ks + tok[:, None] * stride_kt + kvh * stride_kh + offs_d[None, :]
            k = kv_tile(tl.load(k_ptrs, mask=kv_mask, other=0), KS + slot * stride_kss + kvh, q, KV_FP8, FP8_NATIVE)
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
            v_ptrs = V + slot[:, None] * stride_vs + tok[:, None] * stride_vt + kvh * stride_vh + offs_d[None, :]
            v = kv_tile(tl.load(v_ptrs, mask=kv_mask, other=0), VS + slot * stride_vss + kvh, q, KV_FP8, FP8_NATIVE)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        return m_i, l_i, acc

    @triton.jit
    def _normalise(acc, m_i, l_i):
        """(output, log-sum-exp) from the running softmax state; rows that saw no key get 0 and -inf."""
        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        return acc / l_safe[:, None], tl.where(l_i == 0.0, float("-inf"), m_i + tl.log(l_safe))

    # Arguments that change from step to step are not specialised on (divisibility by 16, equality to 1): each new
    # combination would compile another variant, seconds in the middle of a run.
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
        KS,
        VS,
        stride_kss,
        stride_vss,
        GROUP: tl.constexpr,
        ROWS: tl.constexpr,
        BS: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr,
        CAUSAL: tl.constexpr,
        KV_FP8: tl.constexpr,
        FP8_NATIVE: tl.constexpr,
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
            KS,
            VS,
            stride_kss,
            stride_vss,
            CAUSAL=CAUSAL,
            BS=BS,
            HEAD_DIM=HEAD_DIM,
            BLOCK_N=BLOCK_N,
            BLOCK_D=BLOCK_D,
            PRECISION=PRECISION,
            KV_FP8=KV_FP8,
            FP8_NATIVE=FP8_NATIVE,
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

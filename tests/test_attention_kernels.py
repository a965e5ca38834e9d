"""Paged attention and KV-write kernels: reference against dense attention, Triton (interpreter on CPU,
compiled on CUDA) against the reference, exact merging of partial results."""

import contextlib

import pytest
import torch

from tierkv.kernels.kv_write import write_kv_reference, write_kv_triton
from tierkv.kernels.paged_attention import attention_reference, paged_attention_reference, paged_attention_triton
from tierkv.kernels.paged_batch import PagedBatch
from tierkv.kernels.paged_prefill import PREFILL_CONFIG
from tierkv.kernels.partial_merge import merge_partials, merge_partials_into, merge_partials_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_case(seed, entries, num_heads=4, num_kv_heads=2, head_dim=8, bs=4, dtype=torch.float32, num_slots=64):
    """entries: list of (q_pos0, n_q, first_block[, context_len]); the context defaults to the entry's last query
    (a shorter one is a streamed chunk of earlier keys). Returns q, caches, batch."""
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.randn((num_slots, bs, num_kv_heads, head_dim), generator=g).to(dtype)
    v_cache = torch.randn((num_slots, bs, num_kv_heads, head_dim), generator=g).to(dtype)
    total_q = sum(e[1] for e in entries)
    q = torch.randn((total_q, num_heads, head_dim), generator=g).to(dtype)
    perm = torch.randperm(num_slots, generator=g).tolist()
    tables, starts, ctxs = [], [0], []
    for p0, n, first, *context in entries:
        ctx = context[0] if context else p0 + n
        nblocks = -(-ctx // bs) - first
        tables.append([perm.pop() for _ in range(nblocks)])
        starts.append(starts[-1] + n)
        ctxs.append(ctx)
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    batch = PagedBatch(
        q_starts=torch.tensor(starts, dtype=torch.int32),
        q_pos0=torch.tensor([e[0] for e in entries], dtype=torch.int32),
        context_lens=torch.tensor(ctxs, dtype=torch.int32),
        first_block=torch.tensor([e[2] for e in entries], dtype=torch.int32),
        block_tables=bt,
        max_q=max(e[1] for e in entries),
        max_context=max(ctxs),
    )
    return q, k_cache, v_cache, batch


def to(batch: PagedBatch, device) -> PagedBatch:
    fields = ("q_starts", "q_pos0", "context_lens", "first_block", "block_tables")
    return PagedBatch(
        *(getattr(batch, f).to(device) for f in fields), batch.max_q, batch.max_context, batch.q_starts.tolist()
    )


MIXED = [(0, 9, 0), (5, 1, 0), (12, 3, 1), (0, 1, 0), (20, 1, 2), (7, 6, 0)]  # short chunks: split-K kernel
DECODE = [(16, 1, 0), (3, 1, 0), (40, 1, 3), (0, 1, 0), (25, 1, 1)]
LONG = [(0, 40, 0), (5, 1, 0), (30, 20, 1), (12, 17, 2)]  # chunks over 16 tokens: the prefill kernel
# A mixed step as the scheduler lays it out: decodes and short chunks first (the split-K kernel), then long chunks
# (the prefill kernel), one call.
DECODES_FIRST = [(30, 1, 0), (12, 1, 1), (7, 3, 0), (44, 1, 2), (0, 40, 0), (5, 20, 1), (9, 1, 0)]


@pytest.mark.parametrize("window", [0, 5])
def test_reference_equals_dense_attention(window):
    q, kc, vc, batch = make_case(0, MIXED)
    out, lse = paged_attention_reference(q, kc, vc, batch, 0.3, window, need_lse=True)
    plain = paged_attention_reference(q, kc, vc, batch, 0.3, window)
    torch.testing.assert_close(plain, out, rtol=1e-5, atol=1e-5)
    bs = kc.shape[1]
    for i, (p0, n, first) in enumerate(MIXED):
        r0 = int(batch.q_starts[i])
        table = batch.block_tables[i].long()
        k = kc[table].reshape(-1, *kc.shape[2:])[: p0 + n - first * bs]
        v = vc[table].reshape(-1, *vc.shape[2:])[: p0 + n - first * bs]
        # Dense attention written out by hand: softmax(q k^T * scale + mask) v, GQA by repeating KV heads.
        qh = q[r0 : r0 + n].transpose(0, 1)
        kh = k.transpose(0, 1).repeat_interleave(2, 0)
        vh = v.transpose(0, 1).repeat_interleave(2, 0)
        s = qh @ kh.transpose(1, 2) * 0.3
        qp = torch.arange(p0, p0 + n)[:, None]
        kp = torch.arange(first * bs, p0 + n)[None, :]
        allowed = (kp <= qp) & ((kp > qp - window) if window else True)
        want = (s.masked_fill(~allowed, float("-inf")).softmax(-1) @ vh).transpose(0, 1)
        torch.testing.assert_close(out[r0 : r0 + n], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "entries", [MIXED, DECODE, LONG, DECODES_FIRST], ids=["mixed", "decode", "long", "decodes-first"]
)
@pytest.mark.parametrize("window", [0, 6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_matches_reference(entries, window, dtype):
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        pytest.skip("the Triton interpreter mishandles bf16 (numpy has no bf16); bf16 runs on the device machine")
    q, kc, vc, batch = make_case(1, entries, dtype=dtype)
    want, want_lse = paged_attention_reference(q.float(), kc.float(), vc.float(), batch, 0.35, window, need_lse=True)
    got, got_lse = paged_attention_triton(
        q.to(DEVICE), kc.to(DEVICE), vc.to(DEVICE), to(batch, DEVICE), 0.35, window, need_lse=True
    )
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got.float().cpu(), want, **tol)
    torch.testing.assert_close(got_lse.cpu(), want_lse, **tol)


def test_triton_decode_splits_long_contexts_into_partitions():
    entries = [(300, 1, 0), (77, 1, 2), (5, 1, 0)]
    q, kc, vc, batch = make_case(2, entries, bs=8, num_slots=64)
    want, want_lse = paged_attention_reference(q, kc, vc, batch, 0.2, need_lse=True)
    got, got_lse = paged_attention_triton(
        q.to(DEVICE),
        kc.to(DEVICE),
        vc.to(DEVICE),
        to(batch, DEVICE),
        0.2,
        need_lse=True,
        decode_config={"partition": 64, "block_n": 32},
    )
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_lse.cpu(), want_lse, rtol=1e-5, atol=1e-5)


# The prefill kernel's key ranges (block_size 4): a fresh prompt longer than several tiles; a chunk starting
# mid-block (21 % 4) after cached keys, its table from block 2 on; fewer rows than a tile; a chunk with 130 cached
# keys from block 5 on (whole unmasked steps before its first query even at block_n 64); a streamed chunk (keys
# [12, 36) all before its queries at 60..79: with a window some rows see no key, lse -inf).
PREFILL = [(0, 70, 0), (21, 37, 2), (9, 5, 0), (130, 20, 5), (60, 20, 3, 36)]
PREFILL_CONFIGS = [
    {"block_m": 16, "block_n": 16, "num_warps": 4, "num_stages": 2, "pack_gqa": False},
    {"block_m": 32, "block_n": 16, "num_warps": 4, "num_stages": 3, "pack_gqa": True},
    {"block_m": 16, "block_n": 32, "num_warps": 8, "num_stages": 2, "pack_gqa": False},
    PREFILL_CONFIG,
]


@pytest.mark.parametrize(
    "config", PREFILL_CONFIGS, ids=lambda c: f"m{c['block_m']}n{c['block_n']}{'-packed' if c['pack_gqa'] else ''}"
)
@pytest.mark.parametrize(
    "window", [0, 5, 37]
)  # 37: wider than a tile plus a step, so windowed tiles have unmasked keys
def test_triton_prefill_matches_reference(config, window):
    """Every prefill configuration, out and lse, with windows narrower and wider than a tile; fresh data per case."""
    q, kc, vc, batch = make_case(10 + window, PREFILL, num_slots=96)
    want, want_lse = paged_attention_reference(q, kc, vc, batch, 0.3, window, need_lse=True)
    dev = to(batch, DEVICE)
    dev.q_starts_host = batch.q_starts.tolist()
    got, got_lse = paged_attention_triton(
        q.to(DEVICE), kc.to(DEVICE), vc.to(DEVICE), dev, 0.3, window, need_lse=True, prefill_config=config
    )
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_lse.cpu(), want_lse, rtol=1e-5, atol=1e-5)
    if window:
        assert torch.isinf(want_lse).any()  # the streamed chunk's late rows see no key


@pytest.mark.parametrize("head_dim", [12, 16])  # 12: head_dim masked up to 16; 16: the unmasked loads
def test_triton_prefill_packs_uneven_gqa_groups(head_dim):
    """Groups of 3 query heads (a packed tile of 16 rows holds 5 tokens, one row unused), packed and not, on one
    batch object (its tiles cached per tile height)."""
    q, kc, vc, batch = make_case(20 + head_dim, PREFILL, num_heads=6, num_kv_heads=2, head_dim=head_dim, num_slots=96)
    want, want_lse = paged_attention_reference(q, kc, vc, batch, 0.25, 9, need_lse=True)
    dev = to(batch, DEVICE)
    for packed in (True, False):
        config = {"block_m": 16, "block_n": 16, "pack_gqa": packed}
        got, got_lse = paged_attention_triton(
            q.to(DEVICE), kc.to(DEVICE), vc.to(DEVICE), dev, 0.25, 9, need_lse=True, prefill_config=config
        )
        torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_lse.cpu(), want_lse, rtol=1e-5, atol=1e-5)
    assert sorted(dev._tiles) == [(5, 0), (16, 0)]


def test_triton_prefill_float16():
    """16-bit inputs: the native dot and probabilities cast to the value dtype before the second product."""
    q, kc, vc, batch = make_case(30, PREFILL, dtype=torch.float16, num_slots=96)
    want, want_lse = paged_attention_reference(q.float(), kc.float(), vc.float(), batch, 0.3, 0, need_lse=True)
    got, got_lse = paged_attention_triton(
        q.to(DEVICE),
        kc.to(DEVICE),
        vc.to(DEVICE),
        to(batch, DEVICE),
        0.3,
        0,
        need_lse=True,
        prefill_config={"block_m": 16, "block_n": 16},
    )
    torch.testing.assert_close(got.float().cpu(), want, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(got_lse.cpu(), want_lse, rtol=2e-3, atol=2e-3)


def test_merging_partials_over_split_keys_is_exact():
    g = torch.Generator().manual_seed(3)
    q = torch.randn((5, 4, 8), generator=g)
    k = torch.randn((30, 2, 8), generator=g)
    v = torch.randn((30, 2, 8), generator=g)
    q_pos = torch.arange(25, 30)
    k_pos = torch.arange(30)
    full, full_lse = attention_reference(q, k, v, q_pos, k_pos, 0.4, need_lse=True)
    out, lse = attention_reference(q, k[:11], v[:11], q_pos, k_pos[:11], 0.4, need_lse=True)
    for lo, hi in ((11, 20), (20, 30)):
        part = attention_reference(q, k[lo:hi], v[lo:hi], q_pos, k_pos[lo:hi], 0.4, need_lse=True)
        out, lse = merge_partials(out, lse, *part)
    torch.testing.assert_close(out, full, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse, full_lse, rtol=1e-6, atol=1e-6)
    # A part with no visible keys weighs nothing.
    empty = attention_reference(q, k[:3], v[:3], q_pos, k_pos[:3] + 100, 0.4, need_lse=True)
    out2, lse2 = merge_partials(full, full_lse, *empty)
    torch.testing.assert_close(out2, full)
    torch.testing.assert_close(lse2, full_lse)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kv_write_triton_matches_reference(dtype):
    g = torch.Generator().manual_seed(4)
    pool = torch.randn((10, 3, 2, 4, 2, 8), generator=g).to(dtype)  # (slots, layers, K/V, bs, Hkv, D)
    k = torch.randn((7, 2, 8), generator=g).to(dtype)
    v = torch.randn((7, 2, 8), generator=g).to(dtype)
    slots = torch.tensor([5, 6, 7, 33, -1, 0, 39], dtype=torch.int32)
    want = pool.clone()
    write_kv_reference(k, v, want[:, 1, 0], want[:, 1, 1], slots)
    got = pool.to(DEVICE)
    write_kv_triton(k.to(DEVICE), v.to(DEVICE), got[:, 1, 0], got[:, 1, 1], slots.to(DEVICE))
    assert torch.equal(got.cpu(), want)
    assert torch.equal(want[1, 1, 0, 1], k[0]) and torch.equal(want[9, 1, 1, 3], v[6])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_merge_in_place_triton_matches_reference(dtype):
    """The one-launch in-place merge (streaming path) against merge_partials, including rows where one side or
    both sides saw no keys (lse -inf) and a slice of a larger output (strided rows)."""
    g = torch.Generator().manual_seed(6)
    T, H, D = 6, 3, 20
    out = torch.randn((T + 2, H, D), generator=g).to(dtype)
    lse = torch.randn((T + 2, H), generator=g)
    out_b = torch.randn((T, H, D), generator=g).to(dtype)
    lse_b = torch.randn((T, H), generator=g)
    lse[2, 1] = float("-inf")
    lse_b[3, 0] = float("-inf")
    lse[4, 2] = lse_b[4, 2] = float("-inf")
    want, want_lse = merge_partials(out[1 : T + 1], lse[1 : T + 1], out_b, lse_b)
    got, got_lse = out.clone().to(DEVICE), lse.clone().to(DEVICE)
    merge_partials_triton(got[1 : T + 1], got_lse[1 : T + 1], out_b.to(DEVICE), lse_b.to(DEVICE))
    tol = 1e-6 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(got[1 : T + 1].cpu(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(got_lse[1 : T + 1].cpu(), want_lse, rtol=1e-6, atol=1e-6)
    assert torch.equal(got[0].cpu(), out[0]) and torch.equal(got[T + 1].cpu(), out[T + 1])  # rows outside untouched
    ref, ref_lse = out.clone(), lse.clone()
    merge_partials_into(ref[1 : T + 1], ref_lse[1 : T + 1], out_b, lse_b)
    assert torch.equal(ref[1 : T + 1], want) and torch.equal(ref_lse[1 : T + 1], want_lse)


@contextlib.contextmanager
def kernel_compiles():
    """The names of the Triton kernels compiled inside the `with` block (a list, filled as they compile)."""
    from triton.runtime.jit import JITFunction

    compiled = []
    real = JITFunction._do_compile

    def counting(self, *a, **k):
        compiled.append(getattr(self.fn, "__name__", str(self)))
        return real(self, *a, **k)

    JITFunction._do_compile = counting
    try:
        yield compiled
    finally:
        JITFunction._do_compile = real


@pytest.mark.gpu
def test_compile_variants_leaves_nothing_to_compile_mid_run():
    """A prompt's tail of a few tokens beside decodes needs split-K kernel variants that decode-only steps never
    compile; in the middle of a run each cost ~1 s on the H100. After compile_variants(), calls with every short
    chunk length from 1 to SPLIT_MAX_Q, alone and before a prefill entry, compile nothing."""
    if DEVICE != "cuda":
        pytest.skip("needs CUDA (compiled kernels)")
    from tierkv.kernels.paged_attention import compile_variants
    from tierkv.kernels.paged_decode import SPLIT_MAX_Q

    compile_variants(8, 2, 64, 4, torch.bfloat16, DEVICE)
    with kernel_compiles() as compiled:
        for n in range(1, SPLIT_MAX_Q + 1):
            for entries in ([(30, 1, 0), (7, n, 1)], [(12, 1, 0), (9, n, 1), (0, 40, 0)]):
                q, kc, vc, batch = make_case(n, entries, num_heads=8, num_kv_heads=2, head_dim=64, dtype=torch.bfloat16)
                paged_attention_triton(
                    q.to(DEVICE), kc.to(DEVICE), vc.to(DEVICE), to(batch, DEVICE), 0.125, need_lse=True
                )
        torch.cuda.synchronize()
    assert compiled == [], f"compiled mid-run: {compiled}"

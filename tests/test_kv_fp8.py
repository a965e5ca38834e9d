"""The fp8 GPU tier's kernels (`kernels/kv_fp8.py`): the KV write gives the reference's bytes (decode rows, prefill
chunks crossing blocks, growing scales, recycled slots), what it stores is e4m3's rounding of each value whichever
way a block's rows were split between steps, and the attention kernels read fp8 blocks as the reference does over
the decoded KV. Triton in the interpreter on CPU, compiled on CUDA."""

import pytest
import torch
import triton
import triton.language as tl
from test_attention_kernels import (
    DECODE,
    DECODES_FIRST,
    LONG,
    MIXED,
    PREFILL,
    PREFILL_CONFIGS,
    kernel_compiles,
    make_case,
    to,
)

from tierkv.kernels.kv_fp8 import (
    _pow2_scale,
    caches_per_alignment,
    dequantize,
    layer_caches,
    pow2_scales,
    write_kv_fp8_reference,
    write_kv_fp8_triton,
)
from tierkv.kernels.kv_quant import FP8
from tierkv.kernels.paged_attention import paged_attention_reference, paged_attention_triton
from tierkv.kernels.paged_prefill import PREFILL_CONFIG
from tierkv.layout import KVLayout

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BS, HEADS, DIM = 4, 2, 8


def stale_pool(slots=12, layers=2, seed=0, bs=BS, heads=HEADS, dim=DIM):
    """A pool of fp8 records full of stale bytes (NaN codes and scales among them), as recycled slots are."""
    layout = KVLayout(layers, heads, dim, torch.float32, bs, codec="fp8")
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (slots, *layout.block_shape), dtype=torch.uint8, generator=g)


def views(pool, layer=1, bs=BS, heads=HEADS, dim=DIM):
    return layer_caches(pool, layer, bs, heads, dim)


def kv_rows(n, seed, magnitude=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    per_head = torch.tensor([1.0, 30.0])[None, :, None]  # heads of very different ranges
    k = torch.randn((n, HEADS, DIM), generator=g) * per_head * magnitude
    v = torch.randn((n, HEADS, DIM), generator=g) * magnitude
    return k.to(dtype), v.to(dtype)


def on(t):
    return t.to(DEVICE)


@triton.jit
def _scales_of(amax_ptr, out_ptr, n, BLOCK: tl.constexpr):
    for i in range(0, n):
        tl.store(out_ptr + i, _pow2_scale(tl.load(amax_ptr + i)))


def test_scales_are_the_smallest_powers_of_two_that_hold_amax():
    amax = torch.cat(
        [
            torch.rand(200) * 10.0 ** torch.randint(-30, 30, (200,)),
            torch.tensor([448.0, 448.0 * 2**-20, 1.75, 1.75 * 2**3, 1.7500001, 1.0, 2.0**-130, 3e38, 1e-45, 0.0]),
        ]
    )
    s = pow2_scales(amax)
    nonzero = amax > 0
    assert torch.equal(s[~nonzero], torch.zeros_like(s[~nonzero]))
    s, a = s[nonzero], amax[nonzero]
    assert torch.equal(s.view(torch.int32) & 0x7FFFFF, torch.zeros_like(s, dtype=torch.int32))  # powers of two
    assert bool((a <= 448 * s.double()).all())
    assert bool(((a > 224 * s.double()) | (s == 2.0**-126)).all())  # the smallest (or float32's least normal)
    assert pow2_scales(torch.tensor([448.0, 449.0]))[0] == 1.0 and pow2_scales(torch.tensor([449.0]))[0] == 2.0
    got = on(torch.zeros_like(amax))
    _scales_of[(1,)](on(amax), got, len(amax), BLOCK=16)
    assert torch.equal(got.cpu(), pow2_scales(amax))


# Steps over block_size 4 (flat slot = block * 4 + row): prompts' chunks crossing blocks, a padding row, decodes.
# Blocks 2, 5 and 9 grow their scales in step 1 (values 8x larger), block 2 again in step 2 (64x) while block 9's
# keys, small there, leave its key scales as they are; step 3 writes zeros.
STEPS = [
    ([4, 5, 6, 7, 8, 9, -1, 20, 21, 22, 36], 1.0),  # fresh blocks 1, 2, 5, 9 (recycled: stale bytes)
    ([10, 23, 37], 8.0),  # decodes: block 2 row 2, block 5 row 3, block 9 row 1
    ([11, 12, 13, 38, 39], 64.0),  # a chunk finishing block 2 and opening block 3; block 9 rows 2-3
    ([14], 0.0),  # zeros: no scale grows
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_write_kernel_gives_the_reference_bytes(dtype):
    pool = stale_pool()
    want = pool.clone()
    got = on(pool.clone())
    key_scales = []
    for i, (slots, magnitude) in enumerate(STEPS):
        k, v = kv_rows(len(slots), seed=i, magnitude=magnitude, dtype=dtype)
        if i == 2:
            k[3:] /= 64.0**2  # block 9's rows: small, its scale stays
        slots = torch.tensor(slots)
        k_want, v_want = k.clone(), v.clone()
        write_kv_fp8_reference(k_want, v_want, *views(want), slots)
        k_got, v_got = on(k), on(v)
        write_kv_fp8_triton(k_got, v_got, *views(got), on(slots))
        assert torch.equal(got.cpu(), want), f"step {i}: the kernel's bytes differ from the reference's"
        assert torch.equal(k_got.cpu(), k_want) and torch.equal(v_got.cpu(), v_want)  # the values as stored
        assert torch.equal(want[:, 0], pool[:, 0])  # layer 0 untouched
        key_scales.append(views(want)[0].scales[[1, 2, 3, 5, 9]].clone())
    assert bool((key_scales[1][1:, :] > key_scales[0][1:, :])[[0, 2, 3]].all())  # blocks 2, 5, 9 grew
    assert bool((key_scales[2][1] > key_scales[1][1]).all()) and torch.equal(key_scales[2][4], key_scales[1][4])
    assert torch.equal(key_scales[3], key_scales[2]) and torch.isfinite(key_scales[3]).all()


def test_scales_grow_and_earlier_codes_are_requantized_exactly():
    pool = stale_pool(slots=4, layers=1)
    kc, vc = views(pool, layer=0)
    k, v = kv_rows(3, seed=1)
    write_kv_fp8_reference(k.clone(), v.clone(), kc, vc, torch.tensor([4, 5, 6]))  # block 1, rows 0-2
    before_codes, before_scale = kc.codes[1].clone(), kc.scales[1].clone()
    before = dequantize(kc, torch.tensor([1]), torch.float32)[0]

    # A decode row within the scale: no scale changes, earlier codes are left byte for byte. (They are a fixed
    # point of quantizing with the same scale anyway: code x scale / scale gives back the code exactly.)
    k_small, v_small = kv_rows(1, seed=2, magnitude=0.01)
    write_kv_fp8_reference(k_small, v_small, kc, vc, torch.tensor([7]))
    assert torch.equal(kc.scales[1], before_scale) and torch.equal(kc.codes[1, :3], before_codes[:3])
    again = (before_codes[:3].view(FP8).float() * before_scale[:, None]) / before_scale[:, None]
    assert torch.equal(again.to(FP8).view(torch.uint8), before_codes[:3])

    # A chunk of larger rows from row 0 of a new block, then a row 100x larger into block 1: its scale grows.
    pool2 = stale_pool(slots=4, layers=1)
    kc2, vc2 = views(pool2, layer=0)
    write_kv_fp8_reference(k.clone(), v.clone(), kc2, vc2, torch.tensor([4, 5, 6]))
    k_big, v_big = kv_rows(1, seed=3, magnitude=100.0)
    write_kv_fp8_reference(k_big, v_big, kc2, vc2, torch.tensor([7]))
    grown = kc2.scales[1]
    assert bool((grown > before_scale).all())
    assert torch.equal(grown, pow2_scales(torch.maximum(k.abs().amax((0, 2)), k_big.abs().amax((0, 2)))))
    after = dequantize(kc2, torch.tensor([1]), torch.float32)[0, :3]
    # Requantized to the grown scale: the same values wherever they stay above e4m3's subnormal range (an exponent
    # shift), within one subnormal step (2^-9 x scale) below it.
    normal = before[:3].abs() >= 2.0**-6 * grown[None, :, None]
    assert torch.equal(after[normal], before[:3][normal])
    assert bool(((after - before[:3]).abs() <= 2.0**-9 * grown[None, :, None]).all())


def test_a_fresh_block_ignores_the_stale_bytes_of_its_slot():
    clean = torch.zeros_like(stale_pool())
    clean_views = views(clean)
    clean_views[0].scales.fill_(1.0)
    clean_views[1].scales.fill_(1.0)
    stale = stale_pool(seed=5)
    for pool in (clean, stale):
        k, v = kv_rows(3, seed=4)
        write_kv_fp8_reference(k, v, *views(pool), torch.tensor([8, 9, 10]))  # block 2, rows 0-2: starts afresh
    for a, b in zip(views(clean), views(stale)):
        assert torch.equal(a.codes[2, :3], b.codes[2, :3]) and torch.equal(a.scales[2], b.scales[2])


def test_stored_values_are_e4m3_rounding_of_each_value_however_the_rows_were_split():
    """A block of 16 rows written in one step, or in chunks whose values grow (each growing the scale): the same
    scale, and the same value for every element above the subnormal range (within one subnormal step below it).
    What each chunk's tokens were read as when written equals what the block holds at the end, likewise."""
    bs = 16
    g = torch.Generator().manual_seed(7)
    k = torch.randn((bs, HEADS, DIM), generator=g) * torch.logspace(-3, 2, bs)[:, None, None]
    v = torch.randn((bs, HEADS, DIM), generator=g) * torch.logspace(2, -3, bs)[:, None, None]
    whole = stale_pool(slots=2, layers=1, bs=bs)
    split = stale_pool(slots=2, layers=1, bs=bs, seed=1)
    whole_views, split_views = views(whole, 0, bs=bs), views(split, 0, bs=bs)
    k_whole, v_whole = k.clone(), v.clone()
    write_kv_fp8_reference(k_whole, v_whole, *whole_views, torch.arange(bs, 2 * bs))
    read_as = []
    for lo, hi in ((0, 3), (3, 4), (4, 10), (10, 16)):
        kk, vv = k[lo:hi].clone(), v[lo:hi].clone()
        write_kv_fp8_reference(kk, vv, *split_views, torch.arange(bs + lo, bs + hi))
        read_as.append(kk)
    read_as = torch.cat(read_as)
    for w, s, x in ((whole_views[0], split_views[0], k), (whole_views[1], split_views[1], v)):
        assert torch.equal(w.scales[1], s.scales[1])
        a, b = dequantize(w, torch.tensor([1]), torch.float32)[0], dequantize(s, torch.tensor([1]), torch.float32)[0]
        step = 2.0**-9 * w.scales[1][None, :, None]  # e4m3's subnormal step, x scale; normal from 2^-6 x scale
        normal = x.abs() >= 8 * step
        assert torch.equal(a[normal], b[normal]) and bool(((a - b).abs() <= step).all())
        assert normal.float().mean() > 0.5  # (most values: the comparison is not vacuous)
        # e4m3's rounding: 3 mantissa bits (half an ulp is 1/16 of the value) above, half a step below.
        assert bool(((a - x).abs() <= torch.where(normal, x.abs() / 16, step / 2)).all())
    normal = k.abs() >= 2.0**-6 * whole_views[0].scales[1][None, :, None]
    assert torch.equal(read_as[normal], k_whole[normal])


def test_a_block_of_zeros_gets_scale_one_and_zeros_never_grow_a_scale():
    pool = stale_pool(slots=4, layers=1)
    kc, vc = views(pool, layer=0)
    zeros = torch.zeros((2, HEADS, DIM))
    write_kv_fp8_reference(zeros.clone(), zeros.clone(), kc, vc, torch.tensor([4, 5]))
    assert torch.equal(kc.scales[1], torch.ones(HEADS)) and not kc.codes[1, :2].any()
    k, v = kv_rows(2, seed=8, magnitude=1e-3)
    write_kv_fp8_reference(k, v, kc, vc, torch.tensor([8, 9]))
    scale = kc.scales[2].clone()
    write_kv_fp8_reference(zeros.clone(), zeros.clone(), kc, vc, torch.tensor([10]))
    assert torch.equal(kc.scales[2], scale)


def fp8_case(seed, entries, num_slots=64, dtype=torch.float32):
    """make_case with its caches stored in fp8: q, (keys, values) Fp8Caches, the same decoded, batch."""
    q, kc, vc, batch = make_case(seed, entries, num_slots=num_slots, num_kv_heads=HEADS, head_dim=DIM, bs=BS)
    g = torch.Generator().manual_seed(seed)
    kc = kc * torch.rand((num_slots, 1, HEADS, 1), generator=g) * 20  # a range per block and head
    pool = stale_pool(slots=num_slots, layers=1, seed=seed)
    k8, v8 = views(pool, 0)
    flat = torch.arange(num_slots * BS)
    write_kv_fp8_reference(kc.reshape(-1, HEADS, DIM).clone(), vc.reshape(-1, HEADS, DIM).clone(), k8, v8, flat)
    slots = torch.arange(num_slots)
    decoded = (dequantize(k8, slots, torch.float32), dequantize(v8, slots, torch.float32))
    return q.to(dtype), (k8, v8), decoded, batch


def on_device_caches(caches):
    return tuple(type(c)(on(c.codes), on(c.scales)) for c in caches)


@pytest.mark.parametrize(
    "entries", [MIXED, DECODE, LONG, DECODES_FIRST], ids=["mixed", "decode", "long", "decodes-first"]
)
@pytest.mark.parametrize("window", [0, 6])
def test_attention_kernels_read_fp8_blocks_as_the_reference_reads_them_decoded(entries, window):
    q, fp8, decoded, batch = fp8_case(1, entries)
    want, want_lse = paged_attention_reference(q, *decoded, batch, 0.35, window, need_lse=True)
    ref, ref_lse = paged_attention_reference(q, *fp8, batch, 0.35, window, need_lse=True)
    assert torch.equal(ref, want) and torch.equal(ref_lse, want_lse)
    got, got_lse = paged_attention_triton(
        on(q), *on_device_caches(fp8), to(batch, DEVICE), 0.35, window, need_lse=True, prefill_config=PREFILL_CONFIGS[0]
    )
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_lse.cpu(), want_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", PREFILL_CONFIGS[:2], ids=["m16n16", "m32n16-packed"])
@pytest.mark.parametrize("window", [0, 37])
def test_prefill_kernel_reads_fp8_blocks_as_the_reference_reads_them_decoded(config, window):
    q, fp8, decoded, batch = fp8_case(2, PREFILL, num_slots=128)
    want, want_lse = paged_attention_reference(q, *decoded, batch, 0.3, window, need_lse=True)
    got, got_lse = paged_attention_triton(
        on(q), *on_device_caches(fp8), to(batch, DEVICE), 0.3, window, need_lse=True, prefill_config=config
    )
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_lse.cpu(), want_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_fp8_kernels_on_cuda_in_bfloat16():
    """On the device: the write kernel from bf16 keys and values gives the reference's bytes, and the decode and
    prefill kernels (their tuned configurations, e4m3 decoded through the hardware's fp8 type) over bf16 queries
    stay within bf16's rounding of the reference over the decoded KV in float32."""
    if DEVICE != "cuda":
        pytest.skip("needs CUDA (compiled kernels)")
    pool = stale_pool()
    want, got = pool.clone(), pool.cuda()
    for i, (slots, magnitude) in enumerate(STEPS):
        k, v = kv_rows(len(slots), seed=i, magnitude=magnitude, dtype=torch.bfloat16)
        k_want, v_want = k.float(), v.float()
        write_kv_fp8_reference(k_want, v_want, *views(want), torch.tensor(slots))
        k_got, v_got = k.cuda(), v.cuda()
        write_kv_fp8_triton(k_got, v_got, *views(got), torch.tensor(slots).cuda())
        assert torch.equal(got.cpu(), want) and torch.equal(k_got.float().cpu(), k_want)
        assert torch.equal(v_got.float().cpu(), v_want)
    for entries, slots in ((DECODE, 64), (DECODES_FIRST, 64), (PREFILL, 128)):
        q, fp8, decoded, batch = fp8_case(3, entries, num_slots=slots, dtype=torch.bfloat16)
        want, want_lse = paged_attention_reference(q.float(), *decoded, batch, 0.3, 0, need_lse=True)
        for config in (PREFILL_CONFIG, PREFILL_CONFIGS[0]):
            got, got_lse = paged_attention_triton(
                q.cuda(), *on_device_caches(fp8), to(batch, "cuda"), 0.3, 0, need_lse=True, prefill_config=config
            )
            torch.testing.assert_close(got.float().cpu(), want, rtol=2e-2, atol=2e-2)
            torch.testing.assert_close(got_lse.cpu(), want_lse, rtol=2e-2, atol=2e-2)


def test_one_layer_per_alignment_of_the_records_compiles_every_layers_variants():
    # 6,168-byte records (3 KV heads of 64 at block_size 16): layers start 8 bytes off 16 every other layer.
    pool = torch.zeros((4, 5, 2 * 16 * 3 * 64 + 2 * 3 * 4), dtype=torch.uint8)
    picked = caches_per_alignment(pool, 16, 3, 64)
    assert [c[0].codes.data_ptr() - pool.data_ptr() for c in picked] == [0, 6168]
    even = torch.zeros((4, 5, 2 * 16 * 2 * 64 + 2 * 2 * 4), dtype=torch.uint8)  # 4,112 bytes: every layer aligned
    assert len(caches_per_alignment(even, 16, 2, 64)) == 1


@pytest.mark.gpu
def test_compile_variants_leaves_nothing_to_compile_mid_run_over_an_fp8_pool():
    """As test_attention_kernels' test of the same name, over an fp8 pool: compiling over a 4-slot pool of the GPU
    tier's shape (one layer per alignment class, as the model runner does) covers calls over every layer of a
    larger pool, decode, short chunks and prefill."""
    if DEVICE != "cuda":
        pytest.skip("needs CUDA (compiled kernels)")
    from tierkv.kernels.paged_attention import compile_variants
    from tierkv.kernels.paged_decode import SPLIT_MAX_Q

    shape = (5, 2 * 16 * 3 * 64 + 2 * 3 * 4)  # 3 KV heads of 64, block_size 16: odd layers 8 bytes off 16
    for caches in caches_per_alignment(torch.zeros((4, *shape), dtype=torch.uint8, device="cuda"), 16, 3, 64):
        compile_variants(6, 3, 64, 16, torch.bfloat16, "cuda", caches=caches)
    pool = torch.zeros((64, *shape), dtype=torch.uint8, device="cuda")
    with kernel_compiles() as compiled:
        for layer in range(5):
            caches = layer_caches(pool, layer, 16, 3, 64)
            for n in (1, 2, 7, SPLIT_MAX_Q):
                for entries in ([(30, 1, 0), (7, n, 1)], [(12, 1, 0), (9, n, 1), (0, 40, 0)]):
                    q, _, _, batch = make_case(n, entries, num_heads=6, num_kv_heads=3, head_dim=64, bs=16)
                    paged_attention_triton(q.to("cuda", torch.bfloat16), *caches, to(batch, "cuda"), 0.125)
        torch.cuda.synchronize()
    assert compiled == [], f"compiled mid-run: {compiled}"

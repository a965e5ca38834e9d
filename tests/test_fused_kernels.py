"""The fused RMSNorm (alone and after the residual add), rotary (q with k, in place) and SiLU-gated kernels
against their PyTorch references (which are transformers' own formulas): in the Triton interpreter on CPU in
float32, and on the GPU in bf16 and float32."""

import os

import pytest
import torch

from tierkv.kernels.fused import (
    add_rms_norm,
    add_rms_norm_reference,
    add_rms_norm_triton,
    rms_norm_reference,
    rms_norm_triton,
    rotary_qk,
    rotary_qk_reference,
    rotary_qk_triton,
    silu_mul_reference,
    silu_mul_triton,
)

# The Triton kernels run on CPU tensors only in the interpreter (set by conftest where there is no CUDA).
DEVICES = (["cpu"] if os.environ.get("TRITON_INTERPRET") == "1" else []) + (
    ["cuda"] if torch.cuda.is_available() else []
)


def rope_tables(T, D, device, dtype):
    pos = torch.arange(T, device=device, dtype=torch.float32)[:, None]
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, device=device, dtype=torch.float32) / D))
    emb = torch.cat([pos * inv, pos * inv], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def check(got, want, dtype):
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)
    else:  # rounded where PyTorch rounds, so bit for bit bar a rare ulp: an exp or rsqrt, or a sum of squares added
        # in another order, one ulp apart before the weight scales it (H100: 5 of 33.5M add+norm outputs 2 ulps off)
        torch.testing.assert_close(got.float(), want.float(), rtol=1.6e-2, atol=1e-3)
        assert got.numel() == 0 or (got == want).float().mean() >= 0.9999


def dtypes_on(device):
    return [torch.float32] + ([torch.bfloat16] if device == "cuda" else [])  # the interpreter mishandles bf16


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(5, 48), (3, 4, 16)])  # hidden states; per-head q/k norm (Qwen3)
def test_rms_norm(device, shape):
    for dtype in dtypes_on(device):
        g = torch.Generator().manual_seed(0)
        x = (torch.randn(shape, generator=g) * 3).to(device, dtype)
        w = (torch.rand(shape[-1], generator=g) + 0.5).to(device, dtype)
        check(rms_norm_triton(x, w, 1e-6), rms_norm_reference(x, w, 1e-6), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "T, hq, hk, d, block_t",
    [
        (7, 4, 2, 16, None),  # the default block: one token per program at small T
        (7, 4, 2, 16, 4),  # a partial last block of tokens
        (37, 20, 4, 16, 16),  # q's heads in two iterations, the second partial
        (5, 6, 1, 24, 2),  # head_dim 24: half a head (12) is not a power of 2; 6 heads in a block of 8
        (1, 4, 2, 16, None),
        (0, 4, 2, 16, None),
    ],
)
def test_rotary_qk(device, T, hq, hk, d, block_t):
    for dtype in dtypes_on(device):
        g = torch.Generator().manual_seed(4)
        q = torch.randn(T, hq, d, generator=g).to(device, dtype)
        k = torch.randn(T, hk, d, generator=g).to(device, dtype)
        cos, sin = rope_tables(T, d, device, dtype)
        want_q, want_k = rotary_qk_reference(q, k, cos, sin)
        got_q, got_k = rotary_qk_triton(q, k, cos, sin, block_t=block_t)
        assert got_q is q and got_k is k  # in place
        check(got_q, want_q, dtype)
        check(got_k, want_k, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_rotary_qk_strided_views(device):
    """q and k as views of wider tensors (a fused projection's layout): rotated in place, the rest untouched."""
    for dtype in dtypes_on(device):
        g = torch.Generator().manual_seed(5)
        wide_q = torch.randn(9, 3, 32, generator=g).to(device, dtype)
        qkv = torch.randn(9, 5, 16, generator=g).to(device, dtype)  # heads 0-2 are q, 3-4 are k
        cos, sin = rope_tables(9, 16, device, dtype)
        before_q, before_qkv = wide_q.clone(), qkv.clone()
        q, k = wide_q[..., :16], qkv[:, 3:]
        want_q, want_k = rotary_qk_reference(q, k, cos, sin)
        rotary_qk_triton(q, k, cos, sin, block_t=2)
        check(wide_q[..., :16], want_q, dtype)
        check(qkv[:, 3:], want_k, dtype)
        assert torch.equal(wide_q[..., 16:], before_q[..., 16:]) and torch.equal(qkv[:, :3], before_qkv[:, :3])
        # The head dim itself strided (a transposed layout): the kernel rotates a dense copy and writes it back.
        qt = torch.randn(9, 16, 3, generator=g).to(device, dtype).transpose(1, 2)
        kt = torch.randn(9, 16, 2, generator=g).to(device, dtype).transpose(1, 2)
        want_q, want_k = rotary_qk_reference(qt, kt, cos, sin)
        got_q, got_k = rotary_qk_triton(qt, kt, cos, sin)
        assert got_q is qt and got_k is kt
        check(qt, want_q, dtype)
        check(kt, want_k, dtype)


def test_rotary_qk_dispatch_writes_in_place_on_cpu():
    """Without CUDA the reference runs, under the same contract: the results are written into q and k."""
    g = torch.Generator().manual_seed(6)
    q, k = torch.randn(5, 4, 16, generator=g), torch.randn(5, 2, 16, generator=g)
    cos, sin = rope_tables(5, 16, "cpu", torch.float32)
    want_q, want_k = rotary_qk_reference(q, k, cos, sin)
    got_q, got_k = rotary_qk(q, k, cos, sin)
    assert got_q is q and got_k is k
    assert torch.equal(q, want_q) and torch.equal(k, want_k)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(5, 48), (1, 48), (0, 48), (3, 4, 16)])
def test_add_rms_norm(device, shape):
    for dtype in dtypes_on(device):
        g = torch.Generator().manual_seed(7)
        x = (torch.randn(shape, generator=g) * 3).to(device, dtype)
        residual = (torch.randn(shape, generator=g) * 3).to(device, dtype)
        w = (torch.rand(shape[-1], generator=g) + 0.5).to(device, dtype)
        normed, s = add_rms_norm_triton(x, residual, w, 1e-6)
        want_normed, want_s = add_rms_norm_reference(x, residual, w, 1e-6)
        assert torch.equal(s, want_s)  # one rounding of an add: exact in every dtype
        check(normed, want_normed, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_add_rms_norm_strided_rows(device):
    for dtype in dtypes_on(device):
        g = torch.Generator().manual_seed(8)
        x = torch.randn(6, 96, generator=g).to(device, dtype)[:, 8:56]  # rows 96 apart
        residual = torch.randn(48, 6, generator=g).to(device, dtype).t()  # columns strided: copied first
        w = (torch.rand(48, generator=g) + 0.5).to(device, dtype)
        normed, s = add_rms_norm_triton(x, residual, w, 1e-5)
        want_normed, want_s = add_rms_norm_reference(x, residual, w, 1e-5)
        assert torch.equal(s, want_s)
        check(normed, want_normed, dtype)


def test_add_rms_norm_reference_is_the_unfused_ops():
    """The CPU path must equal `h = h + x; norm(h)` bit for bit: the engine tests compare tokens with transformers."""
    g = torch.Generator().manual_seed(9)
    x, residual = torch.randn(4, 32, generator=g), torch.randn(4, 32, generator=g)
    w = torch.rand(32, generator=g) + 0.5
    normed, s = add_rms_norm(x, residual, w, 1e-6)
    h = residual + x
    assert torch.equal(s, h) and torch.equal(normed, rms_norm_reference(h, w, 1e-6))


@pytest.mark.parametrize("device", DEVICES)
def test_silu_mul(device):
    for dtype in dtypes_on(device):
        g = torch.Generator().manual_seed(2)
        gate = (torch.randn(9, 70, generator=g) * 4).to(device, dtype)
        up = torch.randn(9, 70, generator=g).to(device, dtype)
        check(silu_mul_triton(gate, up), silu_mul_reference(gate, up), dtype)
        # the two halves of one fused gate/up projection, read in place (row stride 2N), several blocks per row
        gate_up = (torch.randn(9, 2 * 70, generator=g) * 4).to(device, dtype)
        gate, up = gate_up.split(70, dim=-1)
        assert not gate.is_contiguous()
        got = silu_mul_triton(gate, up, block=32)
        assert got.is_contiguous() and got.shape == (9, 70)
        check(got, silu_mul_reference(gate, up), dtype)


@pytest.mark.gpu
def test_large_shapes_on_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    g = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(4096, 4096, device="cuda", generator=g).bfloat16()
    w = torch.rand(4096, device="cuda", generator=g).bfloat16() + 0.5
    check(rms_norm_triton(x, w, 1e-5), rms_norm_reference(x, w, 1e-5), torch.bfloat16)
    a, b = (torch.randn(4096, 14336, device="cuda", generator=g).bfloat16() for _ in range(2))
    check(silu_mul_triton(a, b), silu_mul_reference(a, b), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [8192, 256])
def test_large_fused_shapes_on_gpu(T):
    """Llama-3.1-8B shapes, a prefill and a decode step: 32 q / 8 kv heads of 128, hidden 4096."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    g = torch.Generator(device="cuda").manual_seed(10)
    for dtype in (torch.bfloat16, torch.float32):
        q = torch.randn(T, 32, 128, device="cuda", generator=g).to(dtype)
        k = torch.randn(T, 8, 128, device="cuda", generator=g).to(dtype)
        cos, sin = rope_tables(T, 128, "cuda", dtype)
        want_q, want_k = rotary_qk_reference(q, k, cos, sin)
        rotary_qk_triton(q, k, cos, sin)
        check(q, want_q, dtype)
        check(k, want_k, dtype)
        x = torch.randn(T, 4096, device="cuda", generator=g).to(dtype)
        residual = torch.randn(T, 4096, device="cuda", generator=g).to(dtype)
        w = torch.rand(4096, device="cuda", generator=g).to(dtype) + 0.5
        normed, s = add_rms_norm_triton(x, residual, w, 1e-5)
        want_normed, want_s = add_rms_norm_reference(x, residual, w, 1e-5)
        assert torch.equal(s, want_s)
        check(normed, want_normed, dtype)

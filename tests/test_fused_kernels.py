"""The fused RMSNorm, rotary and SiLU-gated kernels against their PyTorch references (which are transformers'
own formulas): in the Triton interpreter on CPU in float32, and on the GPU in bf16 and float32."""

import os

import pytest
import torch

from tierkv.kernels import (
    rms_norm_reference,
    rms_norm_triton,
    rotary_reference,
    rotary_triton,
    silu_mul_reference,
    silu_mul_triton,
)

# The Triton kernels run on CPU tensors only in the interpreter (set by conftest where there is no CUDA).
DEVICES = (["cpu"] if os.environ.get("TRITON_INTERPRET") == "1" else []) + (["cuda"] if torch.cuda.is_available() else [])


def rope_tables(T, D, device, dtype):
    pos = torch.arange(T, device=device, dtype=torch.float32)[:, None]
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, device=device, dtype=torch.float32) / D))
    emb = torch.cat([pos * inv, pos * inv], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def check(got, want, dtype):
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)
    else:  # rounded where PyTorch rounds, so bit for bit (on the H100: all of 58M elements), bar a rare exp/rsqrt ulp
        torch.testing.assert_close(got.float(), want.float(), rtol=8e-3, atol=1e-3)
        assert (got == want).float().mean() >= 0.9999


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(5, 48), (3, 4, 16)])  # hidden states; per-head q/k norm (Qwen3)
def test_rms_norm(device, shape):
    dtypes = [torch.float32] + ([torch.bfloat16] if device == "cuda" else [])  # the interpreter mishandles bf16
    for dtype in dtypes:
        g = torch.Generator().manual_seed(0)
        x = (torch.randn(shape, generator=g) * 3).to(device, dtype)
        w = (torch.rand(shape[-1], generator=g) + 0.5).to(device, dtype)
        check(rms_norm_triton(x, w, 1e-6), rms_norm_reference(x, w, 1e-6), dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_rotary(device):
    dtypes = [torch.float32] + ([torch.bfloat16] if device == "cuda" else [])
    for dtype in dtypes:
        g = torch.Generator().manual_seed(1)
        x = torch.randn(7, 3, 16, generator=g).to(device, dtype)
        cos, sin = rope_tables(7, 16, device, dtype)
        check(rotary_triton(x, cos, sin), rotary_reference(x, cos, sin), dtype)
        # A strided view, as q comes out of the projection in a fused layout.
        wide = torch.randn(7, 3, 32, generator=g).to(device, dtype)[..., :16]
        check(rotary_triton(wide, cos, sin), rotary_reference(wide, cos, sin), dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_silu_mul(device):
    dtypes = [torch.float32] + ([torch.bfloat16] if device == "cuda" else [])
    for dtype in dtypes:
        g = torch.Generator().manual_seed(2)
        gate = (torch.randn(9, 70, generator=g) * 4).to(device, dtype)
        up = torch.randn(9, 70, generator=g).to(device, dtype)
        check(silu_mul_triton(gate, up), silu_mul_reference(gate, up), dtype)


@pytest.mark.gpu
def test_large_shapes_on_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    g = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(4096, 4096, device="cuda", generator=g).bfloat16()
    w = torch.rand(4096, device="cuda", generator=g).bfloat16() + 0.5
    check(rms_norm_triton(x, w, 1e-5), rms_norm_reference(x, w, 1e-5), torch.bfloat16)
    q = torch.randn(4096, 32, 128, device="cuda", generator=g).bfloat16()
    cos, sin = rope_tables(4096, 128, "cuda", torch.bfloat16)
    check(rotary_triton(q, cos, sin), rotary_reference(q, cos, sin), torch.bfloat16)
    a, b = (torch.randn(4096, 14336, device="cuda", generator=g).bfloat16() for _ in range(2))
    check(silu_mul_triton(a, b), silu_mul_reference(a, b), torch.bfloat16)

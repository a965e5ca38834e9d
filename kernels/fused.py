"""Fused elementwise kernels of the decoder layer: RMSNorm, rotary embedding, SiLU-gated product.

Each replaces a chain of PyTorch ops (RMSNorm is seven, rotary eight per tensor) that read and write the whole
activation every time; fused, each reads its inputs once and writes once. They round exactly where
transformers' code rounds (every op's result in the model's dtype), so in float32 they agree with it to the last
bits and in bf16 to bf16 rounding. Without CUDA the references (the unfused ops, as transformers writes them) run.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


# -- references ----------------------------------------------------------------------------------------------------


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (T, H, D); cos, sin (T, D)."""
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(gate) * up


# -- Triton --------------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _round(x, dt: tl.constexpr):
        """x (float32) rounded to `dt` and back, as PyTorch rounds each op's result. For bf16 the rounding is done
        on the bits (round to nearest even), so that the compiler cannot drop the round trip as a no-op."""
        if dt == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            return bits.to(tl.float32, bitcast=True)
        elif dt == tl.float32:
            return x
        else:
            return x.to(dt).to(tl.float32)

    @triton.jit
    def _rms_norm_kernel(X, W, Y, stride_x, stride_y, N, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < N
        x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / N + eps)
        normed = _round(x * rstd, Y.dtype.element_ty)
        w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + row * stride_y + offs, (w * normed).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _rotary_kernel(X, COS, SIN, Y, stride_xt, stride_xh, stride_ct, stride_st, stride_yt, stride_yh, HALF: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1).to(tl.int64)
        i = tl.arange(0, HALF)
        xb = X + t * stride_xt + h * stride_xh
        x1 = tl.load(xb + i).to(tl.float32)
        x2 = tl.load(xb + HALF + i).to(tl.float32)
        c1 = tl.load(COS + t * stride_ct + i).to(tl.float32)
        c2 = tl.load(COS + t * stride_ct + HALF + i).to(tl.float32)
        s1 = tl.load(SIN + t * stride_st + i).to(tl.float32)
        s2 = tl.load(SIN + t * stride_st + HALF + i).to(tl.float32)
        dt = Y.dtype.element_ty
        # x * cos + rotate_half(x) * sin, each product rounded to the dtype before the sum, as in PyTorch.
        y1 = (_round(x1 * c1, dt) + _round(-x2 * s1, dt)).to(dt)
        y2 = (_round(x2 * c2, dt) + _round(x1 * s2, dt)).to(dt)
        yb = Y + t * stride_yt + h * stride_yh
        tl.store(yb + i, y1)
        tl.store(yb + HALF + i, y2)

    @triton.jit(do_not_specialize=["n"])  # n changes with the step's token count: no variant per size class
    def _silu_mul_kernel(G, U, Y, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
        dt = Y.dtype.element_ty
        act = _round(g / (1.0 + tl.exp(-g)), dt)
        tl.store(Y + offs, (act * u).to(dt), mask=mask)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, dtype=torch.result_type(weight, x), device=x.device)
    if x2.shape[0]:
        n = shape[-1]
        _rms_norm_kernel[(x2.shape[0],)](x2, weight, out, x2.stride(0), out.stride(0), n, eps, BLOCK=triton.next_power_of_2(n))
    return out.view(shape)


def rotary_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    T, H, D = x.shape
    if x.stride(2) != 1:
        x = x.contiguous()
    out = torch.empty((T, H, D), dtype=torch.result_type(x, cos), device=x.device)
    if T:
        _rotary_kernel[(T, H)](x, cos, sin, out, x.stride(0), x.stride(1), cos.stride(0), sin.stride(0), out.stride(0), out.stride(1), HALF=D // 2)
    return out


def silu_mul_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    n = gate.numel()
    if n:
        block = 1024
        _silu_mul_kernel[(triton.cdiv(n, block),)](gate, up, out, n, BLOCK=block)
    return out


# -- dispatch --------------------------------------------------------------------------------------------------------


def _use_triton(t: torch.Tensor) -> bool:
    return triton is not None and t.is_cuda


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if _use_triton(x) and weight.dtype == x.dtype:
        return rms_norm_triton(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    if _use_triton(x) and x.shape[-1] % 2 == 0 and half & (half - 1) == 0 and cos.dtype == x.dtype:
        return rotary_triton(x, cos, sin)
    return rotary_reference(x, cos, sin)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if _use_triton(gate) and gate.dtype == up.dtype:
        return silu_mul_triton(gate, up)
    return silu_mul_reference(gate, up)

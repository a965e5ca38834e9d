"""Fused elementwise kernels of the decoder layer: RMSNorm (alone, or after the residual add), rotary embedding (of
q and k together, in place), SiLU-gated product.

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


def add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(residual + x), residual + x): the residual add of the decoder layer, then the norm after it."""
    s = residual + x
    return rms_norm_reference(s, weight, eps), s


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (T, H, D); cos, sin (T, D)."""
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


def rotary_qk_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (T, Hq, D), k (T, Hk, D); cos, sin (T, D). New tensors."""
    return rotary_reference(q, cos, sin), rotary_reference(k, cos, sin)


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
    def _add_rms_norm_kernel(X, R, W, Y, S, stride_x, stride_r, stride_out, N, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < N
        dt = S.dtype.element_ty
        x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        r = tl.load(R + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
        s = _round(r + x, dt)  # the residual stream is kept in the model dtype, as PyTorch's add leaves it
        tl.store(S + row * stride_out + offs, s.to(dt), mask=mask)
        rstd = tl.rsqrt(tl.sum(s * s, axis=0) / N + eps)
        normed = _round(s * rstd, dt)
        w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + row * stride_out + offs, (w * normed).to(dt), mask=mask)

    @triton.jit
    def _rotate_heads(
        X,
        t,
        tmask,
        i,
        imask,
        c1,
        c2,
        s1,
        s2,
        stride_t,
        stride_h,
        H: tl.constexpr,
        HALF: tl.constexpr,
        BLOCK_H: tl.constexpr,
    ):
        """Rotates, in place, heads [0, H) of tokens t of X, BLOCK_H heads at a time; c1.. are (BLOCK_T, 1, HALF)."""
        dt = X.dtype.element_ty
        for h0 in range(0, H, BLOCK_H):
            h = h0 + tl.arange(0, BLOCK_H)
            mask = tmask[:, None, None] & (h < H)[None, :, None] & imask[None, None, :]
            xb = X + t[:, None, None] * stride_t + h[None, :, None] * stride_h + i[None, None, :]
            x1 = tl.load(xb, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(xb + HALF, mask=mask, other=0.0).to(tl.float32)
            # as in _rotary_kernel: each product rounded to the dtype before the sum
            tl.store(xb, (_round(x1 * c1, dt) + _round(-x2 * s1, dt)).to(dt), mask=mask)
            tl.store(xb + HALF, (_round(x2 * c2, dt) + _round(x1 * s2, dt)).to(dt), mask=mask)

    @triton.jit(do_not_specialize=["T"])  # T changes with the step's token count: no variant per size class
    def _rotary_qk_kernel(
        Q,
        K,
        COS,
        SIN,
        T,
        stride_qt,
        stride_qh,
        stride_kt,
        stride_kh,
        stride_ct,
        stride_st,
        HQ: tl.constexpr,
        HK: tl.constexpr,
        HALF: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_HQ: tl.constexpr,
        BLOCK_HK: tl.constexpr,
        BLOCK_HALF: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        tmask = t < T
        i = tl.arange(0, BLOCK_HALF)
        imask = i < HALF
        cmask = tmask[:, None] & imask[None, :]
        cb = COS + t[:, None] * stride_ct + i[None, :]
        sb = SIN + t[:, None] * stride_st + i[None, :]
        # The block's cos/sin are read once and serve every head of q and of k.
        c1 = tl.load(cb, mask=cmask, other=0.0).to(tl.float32)[:, None, :]
        c2 = tl.load(cb + HALF, mask=cmask, other=0.0).to(tl.float32)[:, None, :]
        s1 = tl.load(sb, mask=cmask, other=0.0).to(tl.float32)[:, None, :]
        s2 = tl.load(sb + HALF, mask=cmask, other=0.0).to(tl.float32)[:, None, :]
        _rotate_heads(Q, t, tmask, i, imask, c1, c2, s1, s2, stride_qt, stride_qh, HQ, HALF, BLOCK_HQ)
        _rotate_heads(K, t, tmask, i, imask, c1, c2, s1, s2, stride_kt, stride_kh, HK, HALF, BLOCK_HK)

    @triton.jit
    def _silu_mul_kernel(G, U, Y, stride_g, stride_u, stride_y, N, BLOCK: tl.constexpr):
        """Row tl.program_id(0), columns [BLOCK * tl.program_id(1), + BLOCK): gate and up may be two halves of one
        (T, 2N) projection (row strides 2N), the output is dense."""
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        g = tl.load(G + row * stride_g + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + row * stride_u + offs, mask=mask, other=0.0).to(tl.float32)
        dt = Y.dtype.element_ty
        act = _round(g / (1.0 + tl.exp(-g)), dt)
        tl.store(Y + row * stride_y + offs, (act * u).to(dt), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t (..., N) as (rows, N) with a dense last dim (a view where it can be: rows may keep their own stride)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    shape = x.shape
    x2 = _rows(x)
    out = torch.empty(x2.shape, dtype=torch.result_type(weight, x), device=x.device)
    if x2.shape[0]:
        n = shape[-1]
        _rms_norm_kernel[(x2.shape[0],)](
            x2, weight, out, x2.stride(0), out.stride(0), n, eps, BLOCK=triton.next_power_of_2(n)
        )
    return out.view(shape)


def add_rms_norm_triton(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual (..., N) and weight (N,) of one dtype: (rms_norm(residual + x), residual + x), new tensors, in one
    pass that reads x and residual once."""
    shape, n = x.shape, x.shape[-1]
    x2, r2 = _rows(x), _rows(residual)
    normed = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    s = torch.empty_like(normed)
    if x2.shape[0]:
        block = triton.next_power_of_2(n)
        warps = 4 if block < 2048 else 8 if block < 8192 else 16  # 8 warps: 16 elements per thread at hidden 4096
        _add_rms_norm_kernel[(x2.shape[0],)](
            x2,
            r2,
            weight,
            normed,
            s,
            x2.stride(0),
            r2.stride(0),
            normed.stride(0),
            n,
            eps,
            BLOCK=block,
            num_warps=warps,
        )
    return normed.view(shape), s.view(shape)


def rotary_qk_triton(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, block_t: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (T, Hq, D), k (T, Hk, D), cos, sin (T, D), all one dtype: rotary written into q and k (any strides), which
    are returned. One launch; each program takes `block_t` tokens (a power of 2; default 1) and every head."""
    T, hq, d = q.shape
    if q.stride(2) != 1 or k.stride(2) != 1:  # the kernel walks the head dim densely
        qc, kc = rotary_qk_triton(q.contiguous(), k.contiguous(), cos, sin, block_t)
        return q.copy_(qc), k.copy_(kc)
    if cos.stride(1) != 1:
        cos = cos.contiguous()
    if sin.stride(1) != 1:
        sin = sin.contiguous()
    if T:
        # One token per program (40 heads of 128 in Llama-3.1-8B: 20 KB of q and k): on the H100 the fastest at
        # 8192 and at 256 tokens (benchmarks/fused_kernels.py --sweep, 2026-11-24: 64 us and 2.7 us; 2-16 tokens
        # per program 72-73 us and 4-16 us).
        block_t = block_t or 1
        block_half = triton.next_power_of_2(d // 2)
        heads = max(1, 2048 // (block_t * block_half))  # per iteration: 2 x 2048 elements of q or k
        hk = k.shape[1]
        _rotary_qk_kernel[(triton.cdiv(T, block_t),)](
            q,
            k,
            cos,
            sin,
            T,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            cos.stride(0),
            sin.stride(0),
            HQ=hq,
            HK=hk,
            HALF=d // 2,
            BLOCK_T=block_t,
            BLOCK_HQ=min(triton.next_power_of_2(hq), heads),
            BLOCK_HK=min(triton.next_power_of_2(hk), heads),
            BLOCK_HALF=block_half,
        )
    return q, k


# Elements per program and warps of the SiLU-gated product, from benchmarks/fused_kernels.py --sweep on the H100
# (2026-11-24, 8192 x 14336 bf16): 2048 / 4 warps 398 us (1.77 TB/s); 1024 / 4 (the first version) 426 us; 4096 / 8
# 465 us; larger blocks slower still. At 256 tokens 1024 and 2048 tie (13.3-13.4 us).
SILU_BLOCK, SILU_WARPS = 2048, 4


def silu_mul_triton(
    gate: torch.Tensor, up: torch.Tensor, block: int | None = None, num_warps: int | None = None
) -> torch.Tensor:
    """silu(gate) * up for gate, up (..., N) whose last dim is dense and whose rows may be strided (the two halves
    of a fused gate/up projection are read in place). The result is a new dense tensor."""
    shape, n = gate.shape, gate.shape[-1]
    g2, u2 = _rows(gate), _rows(up)
    out = torch.empty(g2.shape, dtype=gate.dtype, device=gate.device)
    if out.numel():
        block = block or SILU_BLOCK
        _silu_mul_kernel[(g2.shape[0], triton.cdiv(n, block))](
            g2, u2, out, g2.stride(0), u2.stride(0), out.stride(0), n, BLOCK=block, num_warps=num_warps or SILU_WARPS
        )
    return out.view(shape)


# -- dispatch --------------------------------------------------------------------------------------------------------


def _use_triton(t: torch.Tensor) -> bool:
    return triton is not None and t.is_cuda


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if _use_triton(x) and weight.dtype == x.dtype:
        return rms_norm_triton(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(residual + x), residual + x) as new tensors; the sum is rounded to the dtype, as PyTorch's add."""
    if _use_triton(x) and x.dtype == residual.dtype == weight.dtype and x.shape == residual.shape:
        return add_rms_norm_triton(x, residual, weight, eps)
    return add_rms_norm_reference(x, residual, weight, eps)


def rotary_qk(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary of q (T, Hq, D) and k (T, Hk, D) by cos, sin (T, D), written into q and k, which are returned."""
    if _use_triton(q) and q.dtype == k.dtype == cos.dtype == sin.dtype:
        return rotary_qk_triton(q, k, cos, sin)
    q_rot, k_rot = rotary_qk_reference(q, k, cos, sin)
    return q.copy_(q_rot), k.copy_(k_rot)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if _use_triton(gate) and gate.dtype == up.dtype:
        return silu_mul_triton(gate, up)
    return silu_mul_reference(gate, up)

"""The weight GEMM of a decode step, y = x @ w.T (+ bias), for few rows of x.

At a decode step a projection is a read of its whole weight matrix: 2*M*N*K flops on N*K*2 bytes, far below the
H100's flop roof, so it should take weight bytes / HBM bandwidth. cuBLAS reaches 70-80% of that on the 8B model's
narrow projections at M = 8 (o and qkv: benchmarks/decode_gemms.py), through a split-K pass and its reduce kernel.
This kernel streams the weight once, in (BLOCK_N, BLOCK_K) tiles, each program owning BLOCK_N output columns over
the whole of K: one launch, no reduce. (Splitting K, the last program of a tile summing the partials, was tried:
the H100 sweep picked no split for any shape, or one within 1% of no split, so it is not kept.)

The reference is torch.nn.functional.linear.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

MAX_ROWS = 64  # rows gemv_triton takes (one tile of up to 64)
# Rows up to which `linear` takes gemv_triton. At 32 and 64 rows it is no better than cuBLAS (H100, gemv_sweep.py
# --rows 32 64, best tiles: qkv 77%/75% of the roofline vs 76%/79%, o 72/70 vs 73/72, gate_up 90/92 vs 92/89, down
# 88/84 vs 85/84; only the LM head gains, 97/95 vs 91/89).
LINEAR_MAX_ROWS = 16


def gemv_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.nn.functional.linear(x, weight, bias)


if triton is not None:

    @triton.jit(do_not_specialize=["M"])  # M = 1 (one sequence) would otherwise compile variants of its own mid-run
    def _gemv_kernel(
        X,
        W,
        B,
        Y,
        M,
        N,
        K,
        stride_xm,
        stride_wn,
        stride_ym,
        HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = tl.arange(0, BLOCK_M)
        rk = tl.arange(0, BLOCK_K)
        n_mask = rn < N
        m_mask = rm < M
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        x_ptrs = X + rm[:, None] * stride_xm + rk[None, :]
        w_ptrs = W + rn.to(tl.int64)[:, None] * stride_wn + rk[None, :]
        for k in range(0, K, BLOCK_K):
            k_mask = (k + rk) < K
            x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            acc += tl.dot(x, tl.trans(w))
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        if HAS_BIAS:
            acc += tl.load(B + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        y = Y + rm[:, None] * stride_ym + rn[None, :]
        tl.store(y, acc.to(Y.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def gemv_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    block_n: int = 32,
    block_k: int = 256,
    num_warps: int = 4,
    num_stages: int = 4,
) -> torch.Tensor:
    """x (M, K) with M <= MAX_ROWS, weight (N, K) row-major, bias (N,) or None: (M, N) in x's dtype. The rows go
    in one tile of the next power of two from 16 (tl.dot's least)."""
    M, K = x.shape
    N = weight.shape[0]
    if M > MAX_ROWS:
        raise ValueError(f"gemv_triton takes at most {MAX_ROWS} rows, got {M}")
    if x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("gemv_triton needs x and weight contiguous along K")
    out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    _gemv_kernel[(triton.cdiv(N, block_n),)](
        x,
        weight,
        bias if bias is not None else x,
        out,
        M,
        N,
        K,
        x.stride(0),
        weight.stride(0),
        out.stride(0),
        HAS_BIAS=bias is not None,
        BLOCK_M=max(16, triton.next_power_of_2(M)),
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out


def gemv_config(n: int, k: int) -> dict:
    """Tiles for a weight of (n, k), from benchmarks/gemv_sweep.py on the H100 (8B shapes, M = 1..16): 32 output
    columns a program; short K tiles and 3 stages where there are many column tiles (gate/up), long ones where there
    are very many (the LM head), 256 x 5 stages otherwise (qkv, o, down)."""
    tiles = -(-n // 32)
    if tiles >= 2048:
        return dict(block_n=32, block_k=512, num_warps=4, num_stages=5)
    if tiles >= 512:
        return dict(block_n=32, block_k=128, num_warps=4, num_stages=3)
    return dict(block_n=32, block_k=256, num_warps=4, num_stages=5)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """torch.nn.functional.linear, through gemv_triton where it is faster: on CUDA, in bf16 or fp16 (float32 keeps
    cuBLAS's full-precision products), for a 2-D x of at most LINEAR_MAX_ROWS rows, as at a small decode step."""
    if (
        triton is not None
        and x.is_cuda
        and x.dim() == 2
        and 0 < x.shape[0] <= LINEAR_MAX_ROWS
        and x.dtype in (torch.bfloat16, torch.float16)
        and weight.dtype == x.dtype
        and x.stride(1) == 1
        and weight.stride(1) == 1
    ):
        return gemv_triton(x, weight, bias, **gemv_config(weight.shape[0], weight.shape[1]))
    return torch.nn.functional.linear(x, weight, bias)

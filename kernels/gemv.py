"""The weight GEMM of a decode step, y = x @ w.T (+ bias), for few rows of x (M <= 16).

At a decode step a projection is a read of its whole weight matrix: 2*M*N*K flops on N*K*2 bytes, far below the
H100's flop roof, so it should take weight bytes / HBM bandwidth. cuBLAS reaches 70-80% of that on the 8B model's
narrow projections at M = 8 (o and qkv: benchmarks/decode_gemms.py), partly through a split-K pass and its reduce
kernel. This kernel streams the weight once, in (BLOCK_N, BLOCK_K) tiles, each program owning BLOCK_N output
columns; with SPLIT_K > 1 the programs of one column tile each take a slice of K, leave float32 partials in a
workspace, and the last of them to finish (an atomic ticket per tile) sums them and writes the output: one launch,
no separate reduce kernel, and the tickets reset themselves (safe inside a CUDA graph).

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
        X, W, B, Y, P, T, M, N, K, stride_xm, stride_wn, stride_ym,
        HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = tl.arange(0, BLOCK_M)
        rk = tl.arange(0, BLOCK_K)
        n_mask = rn < N
        m_mask = rm < M
        k_per = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
        k_lo = pid_k * k_per
        k_hi = tl.minimum(K, k_lo + k_per)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        x_ptrs = X + rm[:, None] * stride_xm + (k_lo + rk)[None, :]
        w_ptrs = W + rn.to(tl.int64)[:, None] * stride_wn + (k_lo + rk)[None, :]
        for k in range(k_lo, k_hi, BLOCK_K):
            k_mask = (k + rk) < k_hi
            x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            acc += tl.dot(x, tl.trans(w))
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        if SPLIT_K > 1:
            tile = P + (pid_k * BLOCK_M + rm)[:, None] * N + rn[None, :]
            tl.store(tile, acc, mask=m_mask[:, None] & n_mask[None, :])
            # acq_rel: this program's partials are visible to whoever takes the last ticket, and that one sees all.
            ticket = tl.atomic_add(T + pid_n, 1)
            if ticket == SPLIT_K - 1:
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for s in range(0, SPLIT_K):
                    part = P + (s * BLOCK_M + rm)[:, None] * N + rn[None, :]
                    acc += tl.load(part, mask=m_mask[:, None] & n_mask[None, :], other=0.0, cache_modifier=".cg")
                tl.store(T + pid_n, 0)
                if HAS_BIAS:
                    acc += tl.load(B + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
                y = Y + rm[:, None] * stride_ym + rn[None, :]
                tl.store(y, acc.to(Y.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])
        else:
            if HAS_BIAS:
                acc += tl.load(B + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            y = Y + rm[:, None] * stride_ym + rn[None, :]
            tl.store(y, acc.to(Y.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


class _Workspace:
    """Per device: float32 partials and the per-tile tickets (zero between calls) of the split-K path."""

    def __init__(self) -> None:
        self.parts: dict[torch.device, torch.Tensor] = {}
        self.tickets: dict[torch.device, torch.Tensor] = {}

    def get(self, device: torch.device, part_elems: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
        p, t = self.parts.get(device), self.tickets.get(device)
        if p is None or p.numel() < part_elems:
            p = self.parts[device] = torch.empty(max(part_elems, 1 << 20), device=device, dtype=torch.float32)
        if t is None or t.numel() < tiles:
            t = self.tickets[device] = torch.zeros(max(tiles, 1 << 14), device=device, dtype=torch.int32)
        return p, t


_workspace = _Workspace()


def gemv_triton(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, block_n: int = 32, block_k: int = 256,
    split_k: int = 1, num_warps: int = 4, num_stages: int = 4,
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
    tiles = triton.cdiv(N, block_n)
    # Split K shares one workspace per device: allocate it (a first call) before any CUDA graph capture, and do not
    # run two split-K calls at once on different streams.
    block_m = max(16, triton.next_power_of_2(M))
    parts, tickets = _workspace.get(x.device, split_k * block_m * N, tiles) if split_k > 1 else (out, out)
    _gemv_kernel[(tiles, split_k)](
        x, weight, bias if bias is not None else x, out, parts, tickets, M, N, K, x.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, SPLIT_K=split_k, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def gemv_config(n: int, k: int) -> dict:
    """Tiles for a weight of (n, k), from benchmarks/gemv_sweep.py on the H100 (8B shapes, M = 1..16): 32 output
    columns a program, no split of K; short K tiles and 3 stages where there are many column tiles (gate/up), long
    ones where there are very many (the LM head), 256 x 5 stages otherwise (qkv, o, down)."""
    tiles = -(-n // 32)
    if tiles >= 2048:
        return dict(block_n=32, block_k=512, split_k=1, num_warps=4, num_stages=5)
    if tiles >= 512:
        return dict(block_n=32, block_k=128, split_k=1, num_warps=4, num_stages=3)
    return dict(block_n=32, block_k=256, split_k=1, num_warps=4, num_stages=5)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """torch.nn.functional.linear, through gemv_triton where it is faster: on CUDA, in bf16 or fp16 (float32 keeps
    cuBLAS's full-precision products), for a 2-D x of at most 16 rows, as at a small decode step."""
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

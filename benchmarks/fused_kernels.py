"""The fused kernels of the decoder layer against the launches they replace, at Llama-3.1-8B shapes (bf16, hidden
4096, 32 q / 8 KV heads of 128) for a prefill step (8192 tokens) and a decode step (256 tokens):

    rotary    the unfused PyTorch ops on q and k (transformers' formula)  vs  rotary_qk_triton (one launch, in place;
              the kernel it replaced, one program per token and head, took 198.9 us at 8192 tokens on 2026-11-24)
    add+norm  torch add, then rms_norm_triton                    vs  add_rms_norm_triton (one launch)
    silu_mul  silu_mul_triton at the first version's 1024 elements / 4 warps per program  vs  the defaults
              (--sweep: more sizes), on the MLP's (T, 14336) gate and up

Each variant's time is set beside the bytes it moves (GB/s = bytes / time) and beside the time those bytes take at
the device's copy bandwidth, measured here (a 1 GiB device-to-device copy_). GPU time: `--reps` calls captured in
one CUDA graph, replayed between two CUDA events, divided by reps (no launch gaps, as in the engine's decode graphs);
eager time: the same calls launched from Python. No cache flush between calls: at the decode shape the operands
(a few MB) stay in L2, as they do between a layer's kernels, so GB/s there can pass HBM's.

    python benchmarks/fused_kernels.py --out fused_kernels.json
"""

from __future__ import annotations

import argparse
import sys

import torch
from common import require_cuda, run_meta, write_json

from tierkv.kernels.fused import (
    SILU_BLOCK,
    SILU_WARPS,
    add_rms_norm_triton,
    rms_norm_triton,
    rotary_qk_reference,
    rotary_qk_triton,
    silu_mul_triton,
)


def copy_gbps() -> float:
    src = torch.empty(1 << 29, dtype=torch.int16, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    end.synchronize()
    return 2 * src.numel() * src.element_size() * 10 / (start.elapsed_time(end) * 1e-3) / 1e9


def time_us(fn, reps: int) -> tuple[float, float]:
    """(GPU µs per call, from a replayed CUDA graph of `reps` calls; eager µs per call)."""
    for _ in range(3):  # compiles the kernels, warms the allocator
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    eager = start.elapsed_time(end) * 1e3 / reps
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / reps, eager


def rope_tables(T: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    pos = torch.arange(T, device="cuda", dtype=torch.float32)[:, None]
    inv = 1.0 / (500000.0 ** (torch.arange(0, d, 2, device="cuda", dtype=torch.float32) / d))
    emb = torch.cat([pos * inv, pos * inv], dim=-1)
    return emb.cos().bfloat16(), emb.sin().bfloat16()


def differing(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a != b).float().mean().item()


def rows_for(T: int, args, gbps: float) -> list[dict]:
    hq, hk, d, n = args.heads, args.kv_heads, args.head_dim, args.hidden
    esize = 2  # bf16
    q = torch.randn(T, hq, d, device="cuda").bfloat16()
    k = torch.randn(T, hk, d, device="cuda").bfloat16()
    cos, sin = rope_tables(T, d)
    x = torch.randn(T, n, device="cuda").bfloat16()
    residual = torch.randn(T, n, device="cuda").bfloat16()
    w = (torch.rand(n, device="cuda") + 0.5).bfloat16()
    eps = 1e-5

    old_q, old_k = rotary_qk_reference(q, k, cos, sin)
    new_q, new_k = rotary_qk_triton(q.clone(), k.clone(), cos, sin)
    old_normed = rms_norm_triton(residual + x, w, eps)
    new_normed, _ = add_rms_norm_triton(x, residual, w, eps)

    qk = q.numel() + k.numel()
    cases = [
        # (op, variant, fn, bytes moved, fraction of its outputs that differ from the unfused variant's)
        (
            "rotary",
            "PyTorch ops (reference)",
            lambda: rotary_qk_reference(q, k, cos, sin),
            (2 * qk + 2 * 2 * T * d) * esize,
            None,
        ),
        (
            "rotary",
            "rotary_qk_triton",
            lambda: rotary_qk_triton(q, k, cos, sin),
            (2 * qk + 2 * T * d) * esize,
            differing(torch.cat([new_q.flatten(), new_k.flatten()]), torch.cat([old_q.flatten(), old_k.flatten()])),
        ),
        (
            "add+norm",
            "add + rms_norm_triton",
            lambda: rms_norm_triton(residual + x, w, eps),
            (3 * T * n + 2 * T * n + n) * esize,
            None,
        ),
        (
            "add+norm",
            "add_rms_norm_triton",
            lambda: add_rms_norm_triton(x, residual, w, eps),
            (4 * T * n + n) * esize,
            differing(new_normed, old_normed),
        ),
    ]
    gate = torch.randn(T, args.intermediate, device="cuda").bfloat16()
    up = torch.randn(T, args.intermediate, device="cuda").bfloat16()
    silu_bytes = 3 * gate.numel() * esize
    silu_old = silu_mul_triton(gate, up, 1024, 4)
    cases += [
        ("silu_mul", "block 1024, 4 warps", lambda: silu_mul_triton(gate, up, 1024, 4), silu_bytes, None),
        (
            "silu_mul",
            f"block {SILU_BLOCK}, {SILU_WARPS} warps (default)",
            lambda: silu_mul_triton(gate, up),
            silu_bytes,
            differing(silu_mul_triton(gate, up), silu_old),
        ),
    ]
    if args.sweep:
        for block, warps in ((2048, 4), (2048, 8), (4096, 4), (8192, 8), (8192, 16), (16384, 16)):
            cases.append(
                (
                    "silu_mul",
                    f"block {block}, {warps} warps",
                    lambda b=block, w=warps: silu_mul_triton(gate, up, b, w),
                    silu_bytes,
                    None,
                )
            )
        for block_t in (1, 2, 4, 8, 16):
            cases.append(
                (
                    "rotary",
                    f"rotary_qk_triton block_t={block_t}",
                    lambda b=block_t: rotary_qk_triton(q, k, cos, sin, block_t=b),
                    (2 * qk + 2 * T * d) * esize,
                    None,
                )
            )
    rows = []
    for op, variant, fn, nbytes, diff in cases:
        gpu_us, eager_us = time_us(fn, args.reps)
        bound_us = nbytes / (gbps * 1e9) * 1e6
        rows.append(
            {
                "tokens": T,
                "op": op,
                "variant": variant,
                "nbytes": nbytes,
                "gpu_us": gpu_us,
                "eager_us": eager_us,
                "gbps": nbytes / (gpu_us * 1e-6) / 1e9,
                "copy_bound_us": bound_us,
                "x_bound": gpu_us / bound_us,
                "differing_fraction": diff,
            }
        )
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[8192, 256], help="tokens per step (prefill, decode)")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--sweep", action="store_true", help="also time rotary_qk_triton at each tokens-per-program block")
    ap.add_argument("--out", help="JSON file for the results")
    args = ap.parse_args()
    if not require_cuda("fused_kernels"):
        return 2
    torch.manual_seed(0)
    gbps = copy_gbps()
    print(f"device copy bandwidth: {gbps:.0f} GB/s (read + write of a 1 GiB copy_)")
    print(
        f"{'T':>5}  {'op':<8}  {'variant':<34} {'MB':>8} {'GPU µs':>9} {'eager µs':>9} {'GB/s':>7} {'copy-bound µs':>14} "
        f"{'x bound':>8} {'differ':>8}"
    )
    rows = []
    for T in args.tokens:
        for r in rows_for(T, args, gbps):
            rows.append(r)
            differ = "-" if r["differing_fraction"] is None else f"{r['differing_fraction']:.1e}"
            print(
                f"{T:>5}  {r['op']:<8}  {r['variant']:<34} {r['nbytes'] / 1e6:>8.1f} {r['gpu_us']:>9.1f} {r['eager_us']:>9.1f} "
                f"{r['gbps']:>7.0f} {r['copy_bound_us']:>14.1f} {r['x_bound']:>8.2f} {differ:>8}"
            )
    write_json(args.out, run_meta(), copy_gbps=gbps, rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

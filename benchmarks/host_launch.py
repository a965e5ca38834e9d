"""Host time to launch the ops of an eager (not graphed) step: what a step whose GPU work is shorter than its
launches pays. Each op is called `--calls` times in a row without syncs (as a step's 32 layers call it) on a
warm GPU, and the host time per call is reported, with the GPU time per call beside it (is the host or the GPU the
slower?).

    python benchmarks/host_launch.py --tokens 48 112 784

Ops: the 8B shape's four GEMMs (qkv, o, gate+up, down) through torch's linear, with each BLAS backend torch offers,
and the step's Triton kernels (fused add + RMSNorm, SiLU-mul) at the same token counts.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from common import require_cuda, run_meta, write_json

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}


def timed(fn, calls: int) -> tuple[float, float]:
    """(host µs per call, GPU µs per call) over `calls` back-to-back calls, after 3 warm-up calls."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - t0
    end.record()
    end.synchronize()
    return host / calls * 1e6, start.elapsed_time(end) / calls * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[48, 112, 784])
    ap.add_argument("--calls", type=int, default=32)
    ap.add_argument("--out")
    args = ap.parse_args()
    if not require_cuda("host_launch"):
        return 2
    from tierkv.kernels.fused import add_rms_norm, silu_mul

    dev, dt = torch.device("cuda"), torch.bfloat16
    weights = {name: torch.randn(n, k, device=dev, dtype=dt) * 0.01 for name, (k, n) in SHAPES.items()}
    rows = []
    backends = ["default"]
    if hasattr(torch.backends.cuda, "preferred_blas_library"):
        backends += ["cublas", "cublaslt"]
    default_blas = torch.backends.cuda.preferred_blas_library() if len(backends) > 1 else None
    print(f"torch {torch.__version__}, default BLAS backend {default_blas}")
    for T in args.tokens:
        for backend in backends:
            if backend != "default":
                torch.backends.cuda.preferred_blas_library(backend)
            for name, w in weights.items():
                x = torch.randn(T, w.shape[1], device=dev, dtype=dt)
                host, gpu = timed(lambda: torch.nn.functional.linear(x, w), args.calls)
                rows.append(dict(op=f"linear {name}", backend=backend, tokens=T, host_us=host, gpu_us=gpu))
            if default_blas is not None:
                torch.backends.cuda.preferred_blas_library(default_blas)
        h = torch.randn(T, 4096, device=dev, dtype=dt)
        r = torch.randn_like(h)
        nw = torch.ones(4096, device=dev, dtype=dt)
        host, gpu = timed(lambda: add_rms_norm(h, r, nw, 1e-5), args.calls)
        rows.append(dict(op="triton add_rms_norm", backend="-", tokens=T, host_us=host, gpu_us=gpu))
        # The same kernel launched directly: through Triton's JIT (binding and specialising every argument), and
        # through the compiled kernel it returns (no specialisation: what a cached launcher could do).
        from tierkv.kernels.fused import _add_rms_norm_kernel

        normed, s = torch.empty_like(h), torch.empty_like(h)
        kargs = (h, r, nw, normed, s, h.stride(0), r.stride(0), normed.stride(0), 4096, 1e-5)
        compiled = _add_rms_norm_kernel[(T,)](*kargs, BLOCK=4096, num_warps=8)
        host, gpu = timed(lambda: _add_rms_norm_kernel[(T,)](*kargs, BLOCK=4096, num_warps=8), args.calls)
        rows.append(dict(op="triton jit launch", backend="-", tokens=T, host_us=host, gpu_us=gpu))
        runner = compiled[(T, 1, 1)]
        host, gpu = timed(lambda: runner(*kargs, 4096), args.calls)
        rows.append(dict(op="triton compiled runner", backend="-", tokens=T, host_us=host, gpu_us=gpu))
        from triton.runtime import driver

        stream = driver.active.get_current_stream(driver.active.get_current_device())
        run = compiled.run
        host, gpu = timed(
            lambda: run(T, 1, 1, stream, compiled.function, compiled.packed_metadata, None, None, None, *kargs, 4096),
            args.calls,
        )
        rows.append(dict(op="triton compiled run", backend="-", tokens=T, host_us=host, gpu_us=gpu))
        host, gpu = timed(
            lambda: (h.data_ptr(), r.data_ptr(), nw.data_ptr(), normed.data_ptr(), s.data_ptr()), args.calls
        )
        rows.append(dict(op="5 data_ptr() calls", backend="-", tokens=T, host_us=host, gpu_us=gpu))
        gu = torch.randn(T, 28672, device=dev, dtype=dt)
        host, gpu = timed(lambda: silu_mul(*gu.chunk(2, dim=-1)), args.calls)
        rows.append(dict(op="triton silu_mul", backend="-", tokens=T, host_us=host, gpu_us=gpu))
        host, gpu = timed(lambda: torch.empty((T, 4096), device=dev, dtype=dt), args.calls)
        rows.append(dict(op="torch.empty", backend="-", tokens=T, host_us=host, gpu_us=gpu))
    print(f"{'op':22s} {'backend':9s} {'tokens':>6s} {'host us':>8s} {'GPU us':>8s}")
    for r in rows:
        print(f"{r['op']:22s} {r['backend']:9s} {r['tokens']:6d} {r['host_us']:8.1f} {r['gpu_us']:8.1f}")
    write_json(args.out, run_meta(), rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The decoder layer's weight GEMMs at decode batch sizes, against the time their weights take to read at the
device's copy bandwidth (measured here): how close the projections of a small decode step come to the memory
roofline, and whether concatenating q/k/v and gate/up into one GEMM each gets closer.

At a decode step of M rows a projection reads its whole weight matrix (out x in bf16) and does 2*M*out*in flops:
at M <= 64 on an H100 that is far below the flop roof, so the GEMM should take weight bytes / HBM bandwidth.

    separate  q, k, v, o, gate, up, down: seven GEMMs per layer (what tierkv's model runs)
    fused     qkv, o, gate_up, down: four GEMMs per layer (q/k/v and gate/up weights concatenated)

Layers are cycled over --layers distinct weight sets (each ~218 MB at the 8B shape, far beyond L2), captured in one
CUDA graph and replayed between two CUDA events.

    python benchmarks/decode_gemms.py --rows 1 8 16 32 64 256 --out decode_gemms.json
"""

from __future__ import annotations

import argparse
import sys

import torch
from common import require_cuda, run_meta, write_json
from fused_kernels import copy_gbps

# Llama-3.1-8B
HIDDEN, INTER, Q, KV = 4096, 14336, 4096, 1024
# Its fused decode GEMMs, (out, in): what a decode step reads per layer, and the LM head.
SHAPES = {
    "qkv": (Q + 2 * KV, HIDDEN),
    "o": (HIDDEN, Q),
    "gate_up": (2 * INTER, HIDDEN),
    "down": (HIDDEN, INTER),
    "lm_head": (128256, HIDDEN),
}


def layer_weights(fused: bool) -> list[torch.Tensor]:
    mk = lambda o, i: torch.randn(o, i, device="cuda", dtype=torch.bfloat16) * 0.01  # noqa: E731
    if fused:
        return [mk(Q + 2 * KV, HIDDEN), mk(HIDDEN, Q), mk(2 * INTER, HIDDEN), mk(HIDDEN, INTER)]
    return [
        mk(Q, HIDDEN),
        mk(KV, HIDDEN),
        mk(KV, HIDDEN),
        mk(HIDDEN, Q),
        mk(INTER, HIDDEN),
        mk(INTER, HIDDEN),
        mk(HIDDEN, INTER),
    ]


def run_layer(ws: list[torch.Tensor], x: torch.Tensor, big: torch.Tensor) -> None:
    lin = torch.nn.functional.linear
    if len(ws) == 4:
        lin(x, ws[0])
        lin(x, ws[1])
        lin(x, ws[2])
        lin(big, ws[3])
    else:
        for w in ws[:6]:
            lin(x, w)
        lin(big, ws[6])


def graph_ms(fn, calls: int) -> float:
    """ms per call of `fn` (which makes `calls` calls), captured in one CUDA graph and replayed between two events."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


def time_ms(layers: list[list[torch.Tensor]], m: int, reps: int) -> float:
    """A decode step's GEMMs of one layer at m rows, per layer."""
    x = torch.randn(m, HIDDEN, device="cuda", dtype=torch.bfloat16)
    big = torch.randn(m, INTER, device="cuda", dtype=torch.bfloat16)

    def run() -> None:
        for _ in range(reps):
            for ws in layers:
                run_layer(ws, x, big)

    return graph_ms(run, reps * len(layers))


def shape_ms(weights: list[torch.Tensor], m: int, reps: int) -> float:
    """One GEMM shape alone: x (m, in) times each of `weights` (distinct copies, cycled), per GEMM."""
    x = torch.randn(m, weights[0].shape[1], device="cuda", dtype=torch.bfloat16)

    def run() -> None:
        for _ in range(reps):
            for w in weights:
                torch.nn.functional.linear(x, w)

    return graph_ms(run, reps * len(weights))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16, 32, 64, 256])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--per-shape", action="store_true", help="also time each fused GEMM shape alone (and the LM head)")
    ap.add_argument("--blas", choices=["cublas", "cublaslt"], help="torch.backends.cuda.preferred_blas_library")
    ap.add_argument("--out")
    args = ap.parse_args()
    if not require_cuda("decode_gemms"):
        return 2
    if args.blas:
        torch.backends.cuda.preferred_blas_library(args.blas)
    bw = copy_gbps()
    print(f"{torch.cuda.get_device_name()}: device copy {bw:.0f} GB/s")
    rows = []
    for fused in (False, True):
        layers = [layer_weights(fused) for _ in range(args.layers)]
        nbytes = sum(w.numel() * w.element_size() for w in layers[0])
        bound = nbytes / (bw * 1e9) * 1e3
        for m in args.rows:
            ms = time_ms(layers, m, args.reps)
            rows.append(
                {
                    "gemms": "fused" if fused else "separate",
                    "rows": m,
                    "ms_per_layer": ms,
                    "bound_ms": bound,
                    "gbps": nbytes / (ms * 1e-3) / 1e9,
                }
            )
            print(
                f"{rows[-1]['gemms']:>8} M={m:4d}: {ms * 1e3:7.1f} us per layer, {rows[-1]['gbps']:6.0f} GB/s, "
                f"{bound / ms:4.0%} of the copy roofline ({bound * 1e3:.1f} us)"
            )
        del layers
        torch.cuda.empty_cache()
    shapes = []
    if args.per_shape:
        for name, (o, i) in SHAPES.items():
            ws = [
                torch.randn(o, i, device="cuda", dtype=torch.bfloat16)
                for _ in range(2 if name == "lm_head" else args.layers)
            ]
            bound = o * i * 2 / (bw * 1e9) * 1e3
            for m in args.rows:
                ms = shape_ms(ws, m, args.reps)
                shapes.append({"gemm": name, "rows": m, "ms": ms, "bound_ms": bound})
                print(
                    f"  {name:>8} ({o} x {i}) M={m:4d}: {ms * 1e3:7.1f} us, {bound / ms:4.0%} of the copy roofline ({bound * 1e3:.1f} us)"
                )
            del ws
            torch.cuda.empty_cache()
    write_json(args.out, run_meta(), copy_gbps=bw, blas=args.blas or "default", rows=rows, shapes=shapes)
    return 0


if __name__ == "__main__":
    sys.exit(main())

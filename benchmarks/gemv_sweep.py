"""Sweep gemv_triton's tile configs on the 8B model's decode GEMM shapes against cuBLAS (torch linear), each timed
in a CUDA graph over distinct weight copies (beyond L2): per shape and row count, the best config and both GB/s,
and the config that kernels.gemv.gemv_config picks (what the engine runs).

    python benchmarks/gemv_sweep.py --rows 1 8 16 --out gemv_sweep.json
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch
from common import require_cuda, run_meta, write_json
from decode_gemms import SHAPES, graph_ms, shape_ms
from fused_kernels import copy_gbps

from tierkv.kernels.gemv import gemv_config, gemv_triton


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16, 32, 64])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--copies", type=int, default=4)
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--out")
    args = ap.parse_args()
    if not require_cuda("gemv_sweep"):
        return 2
    roof = copy_gbps()
    print(f"copy roofline {roof:.0f} GB/s")
    configs = [
        dict(block_n=bn, block_k=bk, num_warps=w, num_stages=st)
        for bn, bk, w, st in itertools.product((16, 32, 64), (128, 256, 512), (4, 8), (3, 5))
    ]
    rows = []
    for name in args.shapes:
        n, k = SHAPES[name]
        copies = 2 if name == "lm_head" else args.copies
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        nbytes = n * k * 2
        for m in args.rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = torch.nn.functional.linear(x, ws[0])
            blas = shape_ms(ws, m, args.reps)
            best = None
            t0 = time.time()
            for cfg in configs:
                try:
                    y = gemv_triton(x, ws[0], **cfg)
                    err = (y.float() - ref.float()).abs().max().item()
                    if err > 0.05 * ref.float().abs().max().item():
                        print(f"  {name} m={m} {cfg}: wrong (max err {err})")
                        continue
                    ms = graph_ms(
                        lambda: [gemv_triton(x, w, **cfg) for _ in range(args.reps) for w in ws], args.reps * copies
                    )
                except Exception as e:  # noqa: BLE001  (a config that does not compile: out of resources)
                    print(f"  {name} m={m} {cfg}: {type(e).__name__}")
                    continue
                if best is None or ms < best[0]:
                    best = (ms, cfg)
            ms, cfg = best
            picked = gemv_config(n, k)
            picked_ms = graph_ms(
                lambda: [gemv_triton(x, w, **picked) for _ in range(args.reps) for w in ws], args.reps * copies
            )
            row = dict(
                shape=name,
                n=n,
                k=k,
                rows=m,
                cublas_us=blas * 1e3,
                triton_us=ms * 1e3,
                config=cfg,
                cublas_gbps=nbytes / blas / 1e6,
                triton_gbps=nbytes / ms / 1e6,
                roofline_gbps=roof,
                picked_config=picked,
                picked_us=picked_ms * 1e3,
                picked_gbps=nbytes / picked_ms / 1e6,
            )
            rows.append(row)
            print(
                f"{name:8s} m={m:3d}: cuBLAS {blas * 1e3:7.1f} us ({row['cublas_gbps'] / roof:4.0%})  triton best {ms * 1e3:7.1f} us "
                f"({row['triton_gbps'] / roof:4.0%}) {cfg}; gemv_config's {picked_ms * 1e3:7.1f} us ({row['picked_gbps'] / roof:4.0%})  "
                f"[{time.time() - t0:.0f} s]",
                flush=True,
            )
        ws = x = ref = None
        torch.cuda.empty_cache()
    write_json(args.out, run_meta(), copy_gbps=roof, rows=rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

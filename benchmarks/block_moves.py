"""Batched block moves between pinned host memory and the GPU, against a contiguous copy in the same run.

For each block size: N blocks at random (scattered) slots of a pinned host pool and a GPU pool are moved in
one batch by tierkv's mover (one Triton launch reading/writing host memory through UVA), host->device,
device->host, and both at once (two streams); the ceiling is one contiguous pinned copy of the same bytes
(`copy_`, non_blocking), measured the same way. A per-block `copy_` loop is timed too, as the naive
baseline. The median of --reps runs is reported.

    python benchmarks/block_moves.py --out results.json --record BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from common import append_rows, require_cuda, run_meta, write_json

from tierkv.kernels.block_copy import copy_blocks_triton, default_max_programs
from tierkv.kv.block import CPU, GPU
from tierkv.kv.mover import Mover
from tierkv.kv.tiers import MemoryTier
from tierkv.layout import KVLayout


def timed(fn, reps: int, sync) -> float:
    """Median wall seconds of fn() followed by sync(), after one warm-up."""
    fn()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_block_size(
    block_kib: int, total_mib: int, reps: int, device: torch.device, programs: list[int], tiles
) -> dict:
    # A layout whose block is block_kib KiB: 8 KV heads of 128 bf16 values, block_size 16, L layers.
    layers = max(1, block_kib * 1024 // (2 * 16 * 8 * 128 * 2))
    layout = KVLayout(num_layers=layers, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16, block_size=16)
    nbytes = layout.block_nbytes
    n = max(1, total_mib * 2**20 // nbytes)
    gpu = MemoryTier(GPU, layout, 2 * n, 2 * n, device, pin=False)
    cpu = MemoryTier(CPU, layout, 2 * n, 2 * n, torch.device("cpu"), pin=True)
    gpu.pool.view(torch.uint8).random_()
    cpu.pool.view(torch.uint8).random_()
    mover = Mover([gpu, cpu], device)
    g = torch.Generator().manual_seed(0)
    # h2d reads host slots [0, n) and writes device slots [0, n); d2h reads device [n, 2n) and writes host
    # [n, 2n): scattered within each half, disjoint between directions so "both at once" races nothing.
    host_slots = torch.randperm(n, generator=g).tolist()
    dev_slots = torch.randperm(n, generator=g).tolist()
    host_slots2 = (torch.randperm(n, generator=g) + n).tolist()
    dev_slots2 = (torch.randperm(n, generator=g) + n).tolist()
    moved = n * nbytes

    def sync():
        torch.cuda.synchronize(device)

    res: dict = {"block_bytes": nbytes, "blocks": n, "bytes": moved}
    # Ceiling: one contiguous pinned copy of the same bytes, each direction, and both at once.
    host_flat = cpu.pool[:n].view(-1)
    dev_flat = gpu.pool[:n].view(-1)
    host_flat2 = cpu.pool[n:].view(-1)
    dev_flat2 = gpu.pool[n:].view(-1)  # same halves as the batched moves
    s1, s2 = torch.cuda.Stream(device), torch.cuda.Stream(device)

    def three_ways(h2d, d2h) -> dict:
        """GB/s of h2d alone, d2h alone, and both at once (bytes of both counted); and the host's time queueing
        each direction (where it nears the transfer's own time, the second direction starts late)."""

        def both():
            h2d()
            d2h()

        def issue_ms(fn) -> float:
            t0 = time.perf_counter()
            fn()
            t = time.perf_counter() - t0
            sync()
            return t * 1e3

        return {
            "h2d": moved / timed(h2d, reps, sync) / 1e9,
            "d2h": moved / timed(d2h, reps, sync) / 1e9,
            "both": 2 * moved / timed(both, reps, sync) / 1e9,
            "h2d_issue_ms": issue_ms(h2d),
            "d2h_issue_ms": issue_ms(d2h),
        }

    def on(stream, fn):
        def run():
            with torch.cuda.stream(stream):
                fn()

        return run

    contig = three_ways(
        on(s1, lambda: dev_flat.copy_(host_flat, non_blocking=True)),
        on(s2, lambda: host_flat2.copy_(dev_flat2, non_blocking=True)),
    )

    def batched_h2d():
        mover.move(cpu, host_slots, gpu, dev_slots)

    def check_bytes(name: str) -> None:
        """Each direction once more from changed bytes, compared: a fast wrong copy must not count (bytes, not
        values: random bits include NaN patterns, which torch.equal never calls equal)."""
        cpu.pool[:n].view(torch.uint8).add_(1)
        gpu.pool[n:].view(torch.uint8).add_(1)
        batched_h2d()
        batched_d2h()
        sync()
        assert torch.equal(gpu.pool[dev_slots].cpu().view(torch.uint8), cpu.pool[host_slots].view(torch.uint8)), (
            f"{name}: h2d moved wrong bytes"
        )
        assert torch.equal(gpu.pool[dev_slots2].cpu().view(torch.uint8), cpu.pool[host_slots2].view(torch.uint8)), (
            f"{name}: d2h moved wrong bytes"
        )

    def batched_d2h():
        mover.move(gpu, dev_slots2, cpu, host_slots2)

    batched = three_ways(batched_h2d, batched_d2h)
    # Which engine moves each direction, as built against the alternatives (both directions at once is what a swap
    # does): the copy engines or the kernel each way, and the kernel going up on its default grid (2 programs per SM).
    built = {
        name: getattr(mover, name)
        for name in ("h2d_engine_block_bytes", "d2h_engine_block_bytes", "h2d_programs", "dma_batches")
    }
    variants = {
        "kernel up, kernel down": dict(d2h_engine_block_bytes=None),
        "engines up, engines down": dict(h2d_engine_block_bytes=0, d2h_engine_block_bytes=0),
        "engines both ways, one driver call per batch": dict(
            h2d_engine_block_bytes=0, d2h_engine_block_bytes=0, dma_batches=True
        ),
        "engines both ways, one 2D copy per block (CuPy)": dict(
            h2d_engine_block_bytes=0, d2h_engine_block_bytes=0, dma_batches=False
        ),
        "engines up, kernel down": dict(h2d_engine_block_bytes=0, d2h_engine_block_bytes=None),
        "kernel up (full grid), as built down": dict(h2d_programs=None),
        "kernel up (full grid), kernel down": dict(h2d_programs=None, d2h_engine_block_bytes=None),
    }
    res["by_mover"] = {}
    for name, settings in variants.items():
        for attr, value in {**built, **settings}.items():
            setattr(mover, attr, value)
        try:
            res["by_mover"][name] = three_ways(batched_h2d, batched_d2h)
        except RuntimeError as e:  # (a variant this machine cannot run: no CuPy, or a driver without batches)
            print(f"  mover variant {name!r} skipped: {e}", file=sys.stderr)
            continue
        check_bytes(name)
    for attr, value in built.items():
        setattr(mover, attr, value)
    for d in ("h2d", "d2h", "both"):
        res[f"contig_{d}_gbps"] = contig[d]
        res[f"batched_{d}_gbps"] = batched[d]
    check_bytes("as built")

    # How many programs the kernel needs: bandwidth at bounded grids (fewer programs = more SMs for compute).
    src_i, dst_i = torch.tensor(host_slots, device=device), torch.tensor(dev_slots, device=device)
    src_i2, dst_i2 = torch.tensor(dev_slots2, device=device), torch.tensor(host_slots2, device=device)
    res["by_tile"] = {
        f"{words}w/{warps}warps": three_ways(
            on(
                s1,
                lambda w=words, nw=warps: copy_blocks_triton(
                    cpu.pool, gpu.pool, src_i, dst_i, words_per_program=w, num_warps=nw
                ),
            ),
            on(
                s2,
                lambda w=words, nw=warps: copy_blocks_triton(
                    gpu.pool, cpu.pool, src_i2, dst_i2, words_per_program=w, num_warps=nw
                ),
            ),
        )
        for words, warps in tiles
    }
    res["by_programs"] = {
        progs: {
            f"{d}_gbps": v
            for d, v in three_ways(
                on(s1, lambda p=progs: copy_blocks_triton(cpu.pool, gpu.pool, src_i, dst_i, max_programs=p)),
                on(s2, lambda p=progs: copy_blocks_triton(gpu.pool, cpu.pool, src_i2, dst_i2, max_programs=p)),
            ).items()
        }
        for progs in programs
    }

    def per_block_h2d():
        with torch.cuda.stream(s1):
            for h, d in zip(host_slots, dev_slots):
                gpu.pool[d].copy_(cpu.pool[h], non_blocking=True)

    res["per_block_h2d_gbps"] = moved / timed(per_block_h2d, max(1, reps // 2), sync) / 1e9
    for d in ("h2d", "d2h", "both"):
        res[f"ratio_{d}"] = res[f"batched_{d}_gbps"] / res[f"contig_{d}_gbps"]
    mover.close()
    cpu.close()
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--block-kib", type=int, nargs="+", default=[64, 512, 2048], help="block sizes in KiB")
    ap.add_argument("--total-mib", type=int, default=1024, help="bytes per batch, MiB")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument(
        "--programs", type=int, nargs="*", default=[8, 16, 32, 66, 132, 264, 1056], help="grid sizes to sweep"
    )
    ap.add_argument("--tiles", nargs="*", default=[], help="WORDSxWARPS tile shapes to sweep, e.g. 2048x4 8192x8")
    ap.add_argument("--out", help="write the JSON results here")
    ap.add_argument("--record", help="append one line per block size to this markdown file (BENCHMARKS.md)")
    args = ap.parse_args()
    if not require_cuda("block_moves"):
        return 2
    device = torch.device("cuda")
    tiles = [tuple(int(x) for x in t.split("x")) for t in args.tiles]
    rows = [bench_block_size(k, args.total_mib, args.reps, device, args.programs, tiles) for k in args.block_kib]
    meta = run_meta()
    hdr = f"{'block':>8} {'blocks':>7} | {'contig GB/s h2d/d2h/both':>26} | {'batched GB/s h2d/d2h/both':>26} | {'ratio':>17} | per-block h2d"
    print(hdr)
    for r in rows:
        print(
            f"{r['block_bytes'] // 1024:>6}KiB {r['blocks']:>7} | "
            f"{r['contig_h2d_gbps']:>8.1f} {r['contig_d2h_gbps']:>8.1f} {r['contig_both_gbps']:>8.1f} | "
            f"{r['batched_h2d_gbps']:>8.1f} {r['batched_d2h_gbps']:>8.1f} {r['batched_both_gbps']:>8.1f} | "
            f"{r['ratio_h2d']:>5.0%} {r['ratio_d2h']:>5.0%} {r['ratio_both']:>5.0%} | {r['per_block_h2d_gbps']:.1f}"
        )
    if args.programs:
        print(f"grid sweep (default grid here: {default_max_programs(device)} programs), GB/s h2d / d2h / both:")
    for r in rows if args.programs else []:
        cells = "  ".join(
            f"{p}: {v['h2d_gbps']:.1f}/{v['d2h_gbps']:.1f}/{v['both_gbps']:.1f}" for p, v in r["by_programs"].items()
        )
        print(f"  {r['block_bytes'] // 1024:>5}KiB  {cells}")
    for r in rows:
        for name, v in r["by_mover"].items():
            print(
                f"  mover {r['block_bytes'] // 1024}KiB {name}: {v['h2d']:.1f} / {v['d2h']:.1f} / {v['both']:.1f} GB/s "
                f"({v['both'] / r['contig_both_gbps']:.0%} of both contiguous); host queueing "
                f"{v['h2d_issue_ms']:.1f} / {v['d2h_issue_ms']:.1f} ms"
            )
    for r in rows:
        for name, v in r["by_tile"].items():
            print(
                f"  tile {r['block_bytes'] // 1024}KiB {name}: {v['h2d']:.1f} / {v['d2h']:.1f} / {v['both']:.1f} GB/s"
            )
    write_json(args.out, meta, rows=rows)
    append_rows(
        args.record,
        [
            f"| {meta['date']} | {meta['device']} | block moves {r['block_bytes'] // 1024} KiB x {r['blocks']} | "
            f"batched {r['batched_h2d_gbps']:.1f} / {r['batched_d2h_gbps']:.1f} / {r['batched_both_gbps']:.1f} GB/s "
            f"(h2d / d2h / both) | contiguous {r['contig_h2d_gbps']:.1f} / {r['contig_d2h_gbps']:.1f} / "
            f"{r['contig_both_gbps']:.1f} GB/s | {r['ratio_h2d']:.0%} / {r['ratio_d2h']:.0%} / {r['ratio_both']:.0%} | "
            f"per-block copy_ {r['per_block_h2d_gbps']:.1f} GB/s | `{meta['command']}` |"
            for r in rows
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

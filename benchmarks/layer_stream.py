"""How fast one layer's slice of many blocks crosses from pinned host memory to the GPU: what item 3's streamed
decode moves every layer of every step.

A block holds all layers (2 MiB at the 8B shape, 16 tokens): one layer of it is a 64 KiB piece at a 2 MiB pitch.
Streaming a long sequence's older KV layer by layer moves such pieces. This measures, in one run, host->device:

    contiguous   the same bytes from one contiguous pinned buffer (the ceiling the PCIe bound uses)
    dma          copy-engine 2D copies (tierkv.kernels.copy_block_runs: one per run of consecutive blocks)
    dma batch    the same pieces, one per row, queued in one driver call (cuMemcpyBatchAsync, kernels/dma_batch.py)
    kernel       the Triton block-copy kernel (SMs reading host memory over UVA)

for pieces of 1, 2, 4 and 8 consecutive layers (64 KiB to 512 KiB rows at the 8B shape), with the source blocks in
runs of --run-blocks consecutive slots at random places (a sequence's blocks, as the page manager lays them out).

    python benchmarks/layer_stream.py --blocks 2048 --out layer_stream.json
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
from common import require_cuda, run_meta, write_json

from tierkv.kernels import dma_batch
from tierkv.kernels.block_copy import copy_2d_available, copy_block_runs, copy_blocks_triton


def gpu_ms(fn, stream: torch.cuda.Stream, reps: int) -> float:
    """Median GPU milliseconds of fn() queued on `stream`, after one warm-up."""
    times = []
    for i in range(reps + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            start.record(stream)
            fn()
            end.record(stream)
        end.synchronize()
        if i:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def runs_of(blocks: int, run_blocks: int, seed: int) -> list[tuple[int, int, int]]:
    """(src, dst, n): the destination in order, the source in runs of `run_blocks` placed at random."""
    g = torch.Generator().manual_seed(seed)
    starts = (torch.randperm(blocks // run_blocks, generator=g) * run_blocks).tolist()
    return [(s, i * run_blocks, run_blocks) for i, s in enumerate(starts)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=2048, help="blocks in the host pool (each --block-kib)")
    ap.add_argument("--block-kib", type=int, default=2048, help="bytes of one block, all layers (8B shape: 2048)")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument(
        "--layer-bytes",
        type=int,
        help="bytes of one layer of one block instead of --block-kib / --layers (even; e.g. 262208, an fp8 record "
        "of a 128-token block at the 8B shape: codes and scales, no power of two)",
    )
    ap.add_argument("--group", type=int, nargs="+", default=[1, 2, 4, 8], help="consecutive layers per piece")
    ap.add_argument("--run-blocks", type=int, default=64, help="consecutive source blocks per run")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out")
    args = ap.parse_args()
    if not require_cuda("layer_stream"):
        return 2
    if args.blocks % args.run_blocks or (args.block_kib * 1024) % (args.layers * 2) or (args.layer_bytes or 0) % 2:
        print(
            "layer_stream: --blocks must be a multiple of --run-blocks, and a block must split into --layers",
            file=sys.stderr,
        )
        return 2
    # int16 words of one layer of one block
    layer_words = args.layer_bytes // 2 if args.layer_bytes else args.block_kib * 1024 // args.layers // 2
    host = torch.empty((args.blocks, args.layers, layer_words), dtype=torch.int16, pin_memory=True)
    flat = host.view(-1)
    for lo in range(0, flat.numel(), 1 << 26):  # every word distinct mod 32749, so a misplaced piece shows
        hi = min(flat.numel(), lo + (1 << 26))
        flat[lo:hi] = (torch.arange(lo, hi) % 32749).to(torch.int16)
    stream = torch.cuda.Stream()
    runs = runs_of(args.blocks, args.run_blocks, 0)
    src_idx = torch.tensor([s + j for s, _, n in runs for j in range(n)], dtype=torch.int64, device="cuda")
    dst_idx = torch.arange(args.blocks, dtype=torch.int64, device="cuda")
    rows = []
    print(
        f"{args.blocks} blocks of {args.block_kib} KiB ({args.layers} layers), source in runs of {args.run_blocks}; host->device GB/s"
    )
    for group in args.group:
        src = host[:, :group]  # each row: `group` consecutive layers of one block, contiguous; rows at the block pitch
        dst = torch.empty((args.blocks, group, layer_words), dtype=torch.int16, device="cuda")
        nbytes = dst.numel() * dst.element_size()
        flat_src = torch.empty(dst.numel(), dtype=torch.int16, pin_memory=True)
        flat_dst = torch.empty_like(flat_src, device="cuda")
        want = src[src_idx.cpu()].cuda()
        result = {"group_layers": group, "piece_bytes": group * layer_words * 2, "bytes": nbytes}
        ms = gpu_ms(lambda: flat_dst.copy_(flat_src, non_blocking=True), stream, args.reps)
        result["contiguous_gbps"] = nbytes / ms / 1e6
        ms = gpu_ms(lambda: copy_blocks_triton(src, dst, src_idx, dst_idx), stream, args.reps)
        result["kernel_gbps"] = nbytes / ms / 1e6
        if not torch.equal(dst, want):
            raise SystemExit(f"layer_stream: the kernel copy of {group}-layer pieces is wrong")
        if copy_2d_available():
            dst.zero_()
            ms = gpu_ms(lambda: copy_block_runs(src, dst, runs, stream, batch=False), stream, args.reps)
            result["dma_gbps"] = nbytes / ms / 1e6
            if not torch.equal(dst, want):
                raise SystemExit(f"layer_stream: the copy-engine copy of {group}-layer pieces is wrong")
        if dma_batch.available():
            dst.zero_()
            ms = gpu_ms(lambda: copy_block_runs(src, dst, runs, stream, batch=True), stream, args.reps)
            result["dma_batch_gbps"] = nbytes / ms / 1e6
            if not torch.equal(dst, want):
                raise SystemExit(f"layer_stream: the batched copy-engine copy of {group}-layer pieces is wrong")
        rows.append(result)
        c = result["contiguous_gbps"]
        dma = (
            f"dma {result['dma_gbps']:5.1f} ({result['dma_gbps'] / c:4.0%})"
            if "dma_gbps" in result
            else "dma (no CuPy)"
        )
        batch = (
            f"dma batch {result['dma_batch_gbps']:5.1f} ({result['dma_batch_gbps'] / c:4.0%})"
            if "dma_batch_gbps" in result
            else ""
        )
        print(
            f"  {group} layer(s), {result['piece_bytes']:8d} B pieces: contiguous {c:5.1f}  {dma}  {batch}  "
            f"kernel {result['kernel_gbps']:5.1f} ({result['kernel_gbps'] / c:4.0%})",
            flush=True,
        )
        dst = flat_src = flat_dst = want = None  # freed before the next size
    write_json(
        args.out,
        run_meta(),
        blocks=args.blocks,
        block_kib=args.block_kib,
        layers=args.layers,
        run_blocks=args.run_blocks,
        rows=rows,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

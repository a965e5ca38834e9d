"""NVMe tier I/O: block batches written and read through kvikio and through the POSIX backend (O_DIRECT) on the
same disk, same run, with a raw O_DIRECT sequential copy of the same bytes as the disk's ceiling.

    python benchmarks/nvme_io.py --dir /tmp/nvme-bench --layout llama-3.1-8b --blocks 1024 --batch 64

Both backends go through tierkv's NvmeStore (checksums included, as the page manager uses it); the page cache is
dropped before every read pass so that reads come from the disk.
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import sys
import time

import torch
from common import run_meta, write_json

from tierkv.kv.nvme_store import NvmeStore
from tierkv.layout import KVLayout

LAYOUTS = {"llama-3.1-8b": (32, 8, 128), "qwen2.5-7b": (28, 4, 128)}


def raw_direct(
    path: str, nbytes: int, chunk: int = 16 << 20, slices: list[tuple[int, int, int]] = ()
) -> tuple[float, float] | tuple[float, float, dict]:
    """Sequential O_DIRECT write then read of `nbytes` in `chunk` pieces: (write GB/s, read GB/s). With `slices`
    ((piece bytes, stride bytes, threads) each), also the read GB/s of every piece-sized read at that stride, spread
    over that many threads (a streamed step's pattern: one layer's slice of every block), as a third item."""
    buf = mmap.mmap(-1, chunk)
    buf.write(os.urandom(1024) * (chunk // 1024))
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_DIRECT", 0), 0o644)
    try:
        t = time.perf_counter()
        for off in range(0, nbytes, chunk):
            os.pwritev(fd, [buf], off)
        os.fsync(fd)
        w = nbytes / (time.perf_counter() - t) / 1e9
        t = time.perf_counter()
        for off in range(0, nbytes, chunk):
            os.preadv(fd, [buf], off)
        r = nbytes / (time.perf_counter() - t) / 1e9
        strided = {f"{p >> 10}KiB/{s >> 10}KiB/{n}": strided_read(fd, nbytes, p, s, n) for p, s, n in slices}
    finally:
        os.close(fd)
        os.unlink(path)
    return (w, r, strided) if slices else (w, r)


def strided_read(fd: int, nbytes: int, piece: int, stride: int, threads: int) -> float:
    """GB/s of O_DIRECT reads of `piece` bytes at every `stride` over the first `nbytes` of the file, in `threads`
    interleaved shares at once (as the POSIX backend spreads a batch)."""
    from concurrent.futures import ThreadPoolExecutor

    offsets = list(range(0, nbytes - piece + 1, stride))
    bufs = [mmap.mmap(-1, piece) for _ in range(threads)]

    def share(i: int) -> None:
        for off in offsets[i::threads]:
            os.preadv(fd, [bufs[i]], off)

    t = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(share, range(threads)))
    return len(offsets) * piece / (time.perf_counter() - t) / 1e9


def run_backend(name: str, args, layout: KVLayout, pool: torch.Tensor) -> dict:
    folder = os.path.join(args.dir, name)
    shutil.rmtree(folder, ignore_errors=True)
    store = NvmeStore(folder, layout, args.blocks, name)
    try:
        slots = torch.randperm(args.blocks, generator=torch.Generator().manual_seed(1)).tolist()  # scattered slots
        rows = list(range(pool.shape[0]))
        t = time.perf_counter()
        for i in range(0, args.blocks, args.batch):
            part = slots[i : i + args.batch]
            store.write(part, pool, [rows[j % len(rows)] for j in range(len(part))])
        os.fdatasync(store._sync_fd)
        write_s = time.perf_counter() - t
        store.drop_page_cache()
        t = time.perf_counter()
        for i in range(0, args.blocks, args.batch):
            part = slots[i : i + args.batch]
            store.read(part, pool, [rows[j % len(rows)] for j in range(len(part))])
        read_s = time.perf_counter() - t
        nbytes = args.blocks * layout.block_nbytes
        out = {"backend": store.backend_name, "write_gbps": nbytes / write_s / 1e9, "read_gbps": nbytes / read_s / 1e9}
    finally:
        store.close()
        shutil.rmtree(folder, ignore_errors=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/tierkv-nvme-bench")
    ap.add_argument("--layout", choices=sorted(LAYOUTS), default="llama-3.1-8b")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--blocks", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=64, help="blocks per write/read call (one page-manager batch)")
    ap.add_argument("--backends", nargs="+", default=["kvikio", "posix"])
    ap.add_argument(
        "--slices",
        nargs="*",
        default=[],
        metavar="KIB:STRIDE_KIB:THREADS",
        help="also time reads of KIB at every STRIDE_KIB over THREADS threads (a streamed layer slice of each block)",
    )
    ap.add_argument("--out")
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    layers, heads, dim = LAYOUTS[args.layout]
    layout = KVLayout(layers, heads, dim, torch.bfloat16, args.block_size)
    pool = torch.randn((args.batch, *layout.block_shape)).to(torch.bfloat16)
    if torch.cuda.is_available():
        pool = pool.pin_memory()
    nbytes = args.blocks * layout.block_nbytes
    slices = [tuple(int(x) << (10 if i < 2 else 0) for i, x in enumerate(s.split(":"))) for s in args.slices]
    ceiling_w, ceiling_r, *strided = raw_direct(os.path.join(args.dir, "raw.bin"), nbytes, slices=slices)
    strided = strided[0] if strided else {}
    print(
        f"{args.blocks} blocks of {layout.block_nbytes / 2**20:.1f} MiB ({nbytes / 2**30:.2f} GiB), batches of {args.batch}"
    )
    print(f"  raw O_DIRECT sequential 16 MiB: write {ceiling_w:.2f} GB/s, read {ceiling_r:.2f} GB/s")
    for name, gbps in strided.items():
        print(
            f"  raw O_DIRECT reads (piece/stride/threads) {name}: {gbps:.2f} GB/s ({gbps / ceiling_r:.0%} of sequential)"
        )
    rows = {}
    for name in args.backends:
        try:
            rows[name] = r = run_backend(name, args, layout, pool)
        except Exception as exc:  # noqa: BLE001 - a backend that cannot run here is reported, not hidden
            print(f"  {name}: cannot run here: {exc}")
            continue
        print(
            f"  {name:<7} ({r['backend']}): write {r['write_gbps']:.2f} GB/s ({r['write_gbps'] / ceiling_w:.0%} of raw), "
            f"read {r['read_gbps']:.2f} GB/s ({r['read_gbps'] / ceiling_r:.0%} of raw)"
        )
    if "kvikio" in rows and "posix" in rows:
        k, p = rows["kvikio"], rows["posix"]
        print(
            f"  kvikio / posix: write {k['write_gbps'] / p['write_gbps']:.0%}, read {k['read_gbps'] / p['read_gbps']:.0%}"
        )
    raw = {"write_gbps": ceiling_w, "read_gbps": ceiling_r, "strided_read_gbps": strided}
    write_json(args.out, run_meta(), raw=raw, backends=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

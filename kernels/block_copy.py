"""Batched block copy between two block pools: one launch for a whole batch of blocks.

A pool is a tensor whose first axis indexes block slots and whose other axes are one contiguous block.
`copy_blocks(src, dst, src_idx, dst_idx)` does `dst[dst_idx[i]] = src[src_idx[i]]` for every i.

Where either pool is on a CUDA device, one Triton kernel does the whole batch, reading or writing pinned
host memory in place through unified virtual addressing (zero-copy), so scattered blocks move at close to
the speed of one contiguous copy instead of paying one DMA setup per block (BENCHMARKS.md: block moves vs a contiguous copy).

`copy_block_runs` moves runs of blocks on the copy engines instead, holding no SM: a 2D copy per long run, and the
rest of a batch's pieces queued in one driver call (`dma_batch`). The mover and the streamed attention pick which
(tierkv/kv/mover.py, tierkv/attention.py): large blocks and runs go to the engines, small scattered ones to the kernel.
"""

from __future__ import annotations

import numpy as np
import torch

from tierkv.kernels import dma_batch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a dependency; kept importable for docs tools
    triton = None

# Words per program: 16 KiB of int32 per program keeps thousands of loads in flight over PCIe.
_WORDS_PER_PROGRAM = 4096


def copy_blocks_reference(src: torch.Tensor, dst: torch.Tensor, src_idx: torch.Tensor, dst_idx: torch.Tensor) -> None:
    """Plain PyTorch: `dst[dst_idx] = src[src_idx]`. Pools must share a device. Indices are int64, distinct in dst_idx."""
    dst.index_copy_(0, dst_idx, src.index_select(0, src_idx))


def _row_layout(pool: torch.Tensor) -> tuple[int, int]:
    """(bytes per row, row stride in bytes). Rows may be strided (e.g. one layer of every block: `pool[:, layer]`),
    but each row must be contiguous."""
    row = pool[0] if pool.shape[0] else pool
    if not row.is_contiguous():
        raise ValueError("copy_blocks: each block (row) of a pool must be contiguous")
    return row.numel() * pool.element_size(), pool.stride(0) * pool.element_size()


def _as_units(pool: torch.Tensor, unit: int) -> torch.Tensor:
    """The pool's rows reinterpreted as int32 words (unit 4) or bytes (unit 1), keeping the row stride."""
    flat = pool.flatten(1).view(torch.uint8)
    return flat.view(torch.int32) if unit == 4 else flat


if triton is not None:

    @triton.jit(do_not_specialize=["num_tiles"])  # changes with every batch: no variant per size class
    def _copy_blocks_kernel(
        src_ptr,
        dst_ptr,
        src_idx_ptr,
        dst_idx_ptr,
        words_per_block,
        src_stride,
        dst_stride,
        chunks_per_block,
        num_tiles,
        WORDS: tl.constexpr,
    ):
        # Grid-stride over (block pair, chunk) tiles: a bounded grid leaves SMs free for compute and for a
        # transfer in the other direction running at the same time.
        for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
            pair = tile // chunks_per_block
            chunk = tile - pair * chunks_per_block
            s = tl.load(src_idx_ptr + pair).to(tl.int64)
            d = tl.load(dst_idx_ptr + pair).to(tl.int64)
            offs = chunk.to(tl.int64) * WORDS + tl.arange(0, WORDS)
            mask = offs < words_per_block
            x = tl.load(src_ptr + s * src_stride + offs, mask=mask)
            tl.store(dst_ptr + d * dst_stride + offs, x, mask=mask)


_sm_count: dict[int, int] = {}


def default_max_programs(device: torch.device) -> int:
    """Programs per copy launch: 2 per SM, enough to keep PCIe busy while leaving room beside it."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _sm_count:
        _sm_count[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return 2 * _sm_count[index]


def copy_blocks_triton(
    src: torch.Tensor,
    dst: torch.Tensor,
    src_idx: torch.Tensor,
    dst_idx: torch.Tensor,
    max_programs: int | None = None,
    words_per_program: int = _WORDS_PER_PROGRAM,
    num_warps: int = 4,
) -> None:
    """The Triton kernel. Pools may be device memory or pinned host memory (read/written through UVA).

    `src_idx`, `dst_idx`: int64 tensors on the launching device (or on the CPU under TRITON_INTERPRET=1).
    `max_programs` bounds the grid (default: 2 per SM; 4 under the interpreter). Runs on the current CUDA
    stream; the caller orders it against other streams.
    """
    if src.shape[1:] != dst.shape[1:] or src.dtype != dst.dtype:
        raise ValueError(f"copy_blocks: pools differ: {tuple(src.shape)} {src.dtype} vs {tuple(dst.shape)} {dst.dtype}")
    n = src_idx.numel()
    if n == 0:
        return
    row_bytes, src_stride = _row_layout(src)
    _, dst_stride = _row_layout(dst)
    aligned = all(x % 4 == 0 for x in (row_bytes, src_stride, dst_stride, src.data_ptr(), dst.data_ptr()))
    unit = 4 if aligned else 1
    src_w, dst_w = _as_units(src, unit), _as_units(dst, unit)
    words_per_block, src_stride, dst_stride = row_bytes // unit, src_stride // unit, dst_stride // unit
    chunks = triton.cdiv(words_per_block, words_per_program)
    if max_programs is None:
        max_programs = default_max_programs(src_idx.device) if src_idx.is_cuda else 4
    grid = (min(n * chunks, max_programs),)
    _copy_blocks_kernel[grid](
        src_w,
        dst_w,
        src_idx,
        dst_idx,
        words_per_block,
        src_stride,
        dst_stride,
        chunks,
        n * chunks,
        WORDS=words_per_program,
        num_warps=num_warps,
    )


def copy_blocks(src: torch.Tensor, dst: torch.Tensor, src_idx: torch.Tensor, dst_idx: torch.Tensor) -> None:
    """`dst[dst_idx] = src[src_idx]` in one launch: the Triton kernel where CUDA is involved, else the reference."""
    if src.is_cuda or dst.is_cuda:
        copy_blocks_triton(src, dst, src_idx, dst_idx)
    else:
        copy_blocks_reference(src, dst, src_idx, dst_idx)


# -- the copy engine, for runs of consecutive slots --------------------------------------------------------------


def _run_starts(src_slots, dst_slots) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(source slots, destination slots, index where each maximal run of consecutive slots in both begins)."""
    s = np.asarray(src_slots, dtype=np.int64)
    d = np.asarray(dst_slots, dtype=np.int64)
    return s, d, np.concatenate(([0], np.flatnonzero((np.diff(s) != 1) | (np.diff(d) != 1)) + 1))


def _runs(s: np.ndarray, d: np.ndarray, starts: np.ndarray) -> np.ndarray:
    lengths = np.diff(np.append(starts, len(s)))
    return np.stack([s[starts], d[starts], lengths], axis=1) if len(s) else np.zeros((0, 3), dtype=np.int64)


def block_runs(src_slots: list[int], dst_slots: list[int]) -> np.ndarray:
    """Maximal runs where both slot lists count up by one, as a (runs, 3) int64 array of (first source slot, first
    destination slot, length): what `copy_block_runs` takes, with no per-run Python objects."""
    if len(src_slots) == 0:
        return np.zeros((0, 3), dtype=np.int64)
    return _runs(*_run_starts(src_slots, dst_slots))


# A batch goes to the copy engines where its runs of consecutive slots average at least this many blocks (a prefix
# stored in order, a long sequence demoted in order); scattered blocks go through the kernel, which moves them
# faster than one DMA per short run.
COPY_ENGINE_MIN_RUN = 8


def copy_engine_runs(src_slots: list[int], dst_slots: list[int]) -> np.ndarray | None:
    """The batch as runs for `copy_block_runs` where the copy engines should move it, else None (use the kernel).
    The runs are counted before they are listed: listing 16,384 scattered blocks' runs took 3 ms of the host."""
    n = len(src_slots)
    if n < COPY_ENGINE_MIN_RUN or not copy_engine_available():
        return None
    s, d, starts = _run_starts(src_slots, dst_slots)
    return _runs(s, d, starts) if len(starts) * COPY_ENGINE_MIN_RUN <= n else None


_cupy_runtime = None


def copy_2d_available() -> bool:
    """True where 2D copies can be queued on the copy engines (CuPy's CUDA runtime bindings import)."""
    global _cupy_runtime
    if _cupy_runtime is None:
        try:
            from cupy.cuda import runtime

            _cupy_runtime = runtime
        except Exception:  # noqa: BLE001 - no cupy, or no usable CUDA for it
            _cupy_runtime = False
    return _cupy_runtime is not False


def copy_engine_available() -> bool:
    """True where copies can be queued on the GPU's copy engines: batches through the driver (`dma_batch`), or 2D
    copies through CuPy's runtime bindings."""
    return dma_batch.available() or copy_2d_available()


def run_pieces(runs: np.ndarray, row_bytes: int, src_pitch: int, dst_pitch: int) -> tuple[np.ndarray, ...]:
    """Runs ((k, 3) int64: source row, destination row, rows) as 1D pieces (destination offset, source offset,
    bytes): one per run where the rows are contiguous on both sides, else one per row."""
    s, d, n = runs[:, 0], runs[:, 1], runs[:, 2]
    if src_pitch == row_bytes and dst_pitch == row_bytes:
        return d * dst_pitch, s * src_pitch, n * row_bytes
    run_of = np.repeat(np.arange(len(runs)), n)
    within = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
    sizes = np.full(len(run_of), row_bytes, dtype=np.int64)
    return (d[run_of] + within) * dst_pitch, (s[run_of] + within) * src_pitch, sizes


def copy_block_runs(
    src: torch.Tensor,
    dst: torch.Tensor,
    runs: list[tuple[int, int, int]] | np.ndarray,
    stream: torch.cuda.Stream,
    batch: bool | None = None,
) -> None:
    """`dst[d:d+n] = src[s:s+n]` for every run (s, d, n) on the copy engines, queued on `stream`.

    Same pools as `copy_blocks_triton` (device or pinned host memory; rows may be strided, e.g. one layer of
    every block, each row contiguous). The DMA engines move them at the link's speed without holding any SM.
    `batch`: True queues every piece (a run, or each row of a strided run) in one driver call (`dma_batch`); False
    one 2D copy per run (row bytes wide, rows high, each side with its own pitch) through CuPy; None (default) puts
    single rows and contiguous runs in one batch and long strided runs in 2D copies, where both are available.
    Needs `copy_engine_available()`; the reference is `copy_blocks_reference` with the runs expanded.

    The host's time here is on the critical path of a swap (both directions at once): the second direction's
    copies start only when the first's are queued. So the runs are handled as arrays, never row by row in Python."""
    if src.shape[1:] != dst.shape[1:] or src.dtype != dst.dtype:
        raise ValueError(
            f"copy_block_runs: pools differ: {tuple(src.shape)} {src.dtype} vs {tuple(dst.shape)} {dst.dtype}"
        )
    if not copy_engine_available():
        raise RuntimeError(
            "copy_block_runs needs a CUDA driver of 12.8 or later, or CuPy (pip install 'tierkv[gpu]'); "
            "use copy_blocks_triton instead"
        )
    row_bytes, src_pitch = _row_layout(src)
    _, dst_pitch = _row_layout(dst)
    r = np.asarray(runs, dtype=np.int64).reshape(-1, 3)
    bad = (r[:, 0] < 0) | (r[:, 1] < 0) | (r[:, 0] + r[:, 2] > src.shape[0]) | (r[:, 1] + r[:, 2] > dst.shape[0])
    if bad.any():
        raise IndexError(
            f"copy_block_runs: run {tuple(r[bad][0].tolist())} outside the pools ({src.shape[0]} / {dst.shape[0]} rows)"
        )
    # (never on the legacy default stream, which the driver rejects for batches)
    can_batch, can_2d = dma_batch.available() and stream.cuda_stream != 0, copy_2d_available()
    if batch is None:
        contiguous = src_pitch == row_bytes and dst_pitch == row_bytes
        in_batch = np.full(len(r), can_batch) & (contiguous | (r[:, 2] == 1) | (not can_2d))
    elif batch:
        if not can_batch:
            raise RuntimeError(
                "copy_block_runs(batch=True) needs a CUDA driver of 12.8 or later (cuMemcpyBatchAsync) and a stream "
                "other than the legacy default one"
            )
        in_batch = np.ones(len(r), dtype=bool)
    else:
        in_batch = np.zeros(len(r), dtype=bool)
    as_2d = r[~in_batch]
    if len(as_2d) and not can_2d:
        raise RuntimeError(
            "copy_block_runs: these runs need CuPy for 2D copies (pip install 'tierkv[gpu]'), or a stream other than "
            "the legacy default one for the driver's batches"
        )
    if in_batch.any():
        dst_off, src_off, sizes = run_pieces(r[in_batch], row_bytes, src_pitch, dst_pitch)
        dma_batch.copy_pieces(dst.data_ptr() + dst_off, src.data_ptr() + src_off, sizes, stream)
    rt, handle = _cupy_runtime, stream.cuda_stream
    src_ptr, dst_ptr = src.data_ptr(), dst.data_ptr()
    for s, d, n in as_2d.tolist():
        rt.memcpy2DAsync(
            dst_ptr + d * dst_pitch,
            dst_pitch,
            src_ptr + s * src_pitch,
            src_pitch,
            row_bytes,
            n,
            rt.memcpyDefault,
            handle,
        )

"""Executes block transfers between tiers: one batched launch (or one batched I/O submission) per call.

The mover owns the side streams, the NVMe worker thread and the staging buffer; it holds no bookkeeping of
which block lives where. Every transfer waits for its dependencies (the writes that produced its source,
the reads that last used its destination slots) and returns a handle that completes when the bytes have
landed.

Where the work runs:
- CPU only (no CUDA): synchronously, on the calling thread; every handle is DONE.
- host memory <-> GPU: one Triton kernel on the h2d or d2h stream, reading or writing pinned host memory in
  place (zero-copy through UVA). GPU -> GPU copies (copy-on-write) run on the h2d stream.
- anything touching NVMe on a CUDA machine: on one FIFO worker thread (kvikio's own pool parallelises the
  I/O); GPU-side bytes go through a bounded pinned staging buffer in chunks.
A transfer whose dependencies include unfinished host work is also sent to the worker thread, so the caller
never blocks on I/O it did not ask to wait for.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from tierkv.handles import DONE, EventHandle, FutureHandle, Handle, LayeredHandle, Settled, all_of
from tierkv.kernels import dma_batch
from tierkv.kernels.block_copy import (
    block_runs,
    copy_block_runs,
    copy_blocks_triton,
    copy_engine_available,
    copy_engine_runs,
)
from tierkv.kv.codec import move_blocks
from tierkv.kv.tiers import MemoryTier, NvmeTier, Tier
from tierkv.kv.transfer import Transfer


@dataclass
class LinkStats:
    """Traffic over one (source tier -> destination tier) link."""

    blocks: int = 0
    nbytes: int = 0
    seconds: float = 0.0
    batches: int = 0
    engine_batches: int = 0  # of `batches`, moved by the copy engines (runs of consecutive slots), not the kernel
    # Bytes per second of the last few batches of at least RATE_MIN_BYTES (see `rate`).
    recent_rates: deque = field(default_factory=lambda: deque(maxlen=8))

    RATE_MIN_BYTES = 16 << 20

    def note_batch(self, nbytes: int, seconds: float, host_seconds: float = 0.0) -> None:
        """A finished batch: its bytes, its time, and how long the host took to issue it (inside that time where the
        device timed it). Where issuing took about as long as the batch, the device waited for the host (a first
        launch from a new thread took 0.35 s on the H200): the batch says nothing about the link's speed."""
        self.seconds += seconds
        if nbytes >= self.RATE_MIN_BYTES and seconds > 0 and host_seconds < 0.9 * seconds:
            self.recent_rates.append(nbytes / seconds)

    @property
    def rate(self) -> float | None:
        """The link's speed as recent large batches found it: the fastest of the last few. A batch's time runs from
        its first copy's start to its last copy's end on the device, so a host thread that stalls between the launches
        (a server's other threads holding the interpreter) makes it read slower, never faster; bytes over seconds of
        all batches would mostly measure small batches' fixed latency."""
        return max(self.recent_rates) if self.recent_rates else None


class Mover:
    """Runs batched transfers between `tiers`; `device` is the compute device ("cpu" or a CUDA device).

    A host-to-GPU batch of at least `layered_min_blocks` blocks is copied in layer groups of about
    `layer_group_bytes` per block, in layer order, one event per group (a LayeredHandle): the step that needs the
    blocks can start its first layers while the later ones are still crossing the link.
    """

    layered_min_blocks = 32
    layer_group_bytes = 512 * 1024
    # Programs of a host-to-GPU copy kernel: reads over PCIe reach the link's speed from ~16 programs on (see
    # BENCHMARKS.md); more would only hold SMs that the step's compute needs while the copy runs beside it.
    h2d_programs = 32
    # Batches of blocks at least this large go to the copy engines whatever their slot order, one DMA per run:
    # from 512 KiB each way. Host-to-device only where the driver queues a batch in one call (dma_batch): queued one
    # DMA per block, a swap's copies up took so long to queue that its copies down started late, and the kernel
    # going up was faster. H200, 2026-12-04, both ways at once against two contiguous copies: 2 MiB blocks 91% on
    # the engines (58% queued one by one, 56% kernel both ways), 512 KiB 89% (50%, 54%); at 64 KiB the engines
    # move one way slower than the kernel (38 against 44 GB/s), so smaller blocks stay on it (BENCHMARKS.md).
    d2h_engine_block_bytes = 1 << 19
    h2d_engine_block_bytes: int | None = 1 << 19
    # Copy-engine pieces queued in one driver call per batch where the driver has one (True), or one 2D copy per run
    # through CuPy (False); None: the batch for single blocks, 2D copies for long runs (copy_block_runs).
    dma_batches: bool | None = None
    prioritize_h2d = True

    def __init__(
        self, tiers: Sequence[Tier], device: torch.device, staging_blocks: int = 64, debug_delays: bool = False
    ) -> None:
        self.tiers = list(tiers)
        self._by_kind = {t.kind: t for t in self.tiers}
        # A benchmark baseline, not a mode to run in: every GPU<->host transfer starts only after all the compute
        # queued before it, and compute waits for it whole, so that nothing overlaps. A run with it set, against the
        # same run without, measures how much of the transfer time the overlap hides (benchmarks/fast_path.sh item 4).
        self.serialize = False
        self.device = device
        self.cuda = device.type == "cuda"
        self.links: dict[tuple[str, str], LinkStats] = {}
        # Link times reported by whichever thread ran a transfer, folded into `links` by collect() on the caller's
        # thread. Deques, not a lock: a lock held when Ctrl-C lands between a `with` body and its exit is never
        # released, and every later transfer would wait for it.
        # (link, host-timed seconds, copy-engine batches, bytes), and (link, start, end, bytes) timed on the device
        self._times: deque[tuple[LinkStats, float, int, int]] = deque()
        self._timed: deque[tuple[LinkStats, torch.cuda.Event, torch.cuda.Event, int, float]] = deque()  # (+ host s)
        self._debug_rng = random.Random(0) if debug_delays else None
        self._io: ThreadPoolExecutor | None = None
        self._staging: MemoryTier | None = None
        self._staging_reader: torch.cuda.Event | None = None  # last device copy out of the staging buffer
        if self.cuda:
            # Copies up run at the highest priority: their kernel's programs get SMs ahead of the compute queued
            # beside them (at the default one, a prefix load waited behind whole prefill kernels), and a step that
            # needs the blocks waits for them.
            self.h2d_stream = torch.cuda.Stream(device, priority=-1 if self.prioritize_h2d else 0)
            self.d2h_stream = torch.cuda.Stream(device)
            # Which copy-engine paths this machine has, found now: the driver batches' self-test waits for the
            # device, which the first transfer (inside a step) must not.
            copy_engine_available()
            self._io = ThreadPoolExecutor(1, thread_name_prefix="tierkv-io")
            nvme = [t for t in self.tiers if isinstance(t, NvmeTier)]
            if nvme:
                layout = nvme[0].layout  # staging holds blocks as the disk stores them
                self._staging = MemoryTier(1, layout, staging_blocks, staging_blocks, torch.device("cpu"), pin=True)

    # -- public ------------------------------------------------------------------------------------------
    def compute_marker(self) -> Handle:
        """A handle for all work queued so far on the current (compute) stream; DONE off CUDA."""
        if not self.cuda:
            return DONE
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        return EventHandle(ev)

    def order_compute_after(self, handle: Handle) -> None:
        """Make the compute stream wait for `handle` (a no-op off CUDA, where every transfer is synchronous)."""
        if self.cuda:
            handle.wait_on(torch.cuda.current_stream(self.device))

    def run(self, transfer: Transfer) -> Handle:
        """Start `transfer` (tiers named by kind); the handle completes when its bytes have landed."""
        return self.move(
            self._by_kind[transfer.src],
            transfer.src_slots,
            self._by_kind[transfer.dst],
            transfer.dst_slots,
            transfer.after,
            transfer.keys,
            transfer.token_ids,
        )

    def move(
        self,
        src: Tier,
        src_slots: Sequence[int],
        dst: Tier,
        dst_slots: Sequence[int],
        deps: Sequence[Handle] = (),
        keys: Sequence[bytes | None] | None = None,
        token_ids: Sequence | None = None,
    ) -> Handle:
        """Copy blocks `src_slots` of `src` into `dst_slots` of `dst` after `deps`; one batch, one direction.

        `keys`/`token_ids` (per block, for an NVMe destination): content keys recorded in the store's index."""
        if len(src_slots) != len(dst_slots):
            raise ValueError(f"move: {len(src_slots)} source slots but {len(dst_slots)} destination slots")
        if not src_slots:
            return DONE
        link = self._link(src, dst)
        link.blocks += len(src_slots)
        link.nbytes += _batch_nbytes(src, dst, len(src_slots))
        link.batches += 1
        dep = all_of(deps)
        if isinstance(src, NvmeTier) and isinstance(dst, NvmeTier):
            raise ValueError("move: NVMe to NVMe is not a transfer the page manager plans")
        meta = (list(keys) if keys else None, list(token_ids) if token_ids else None)
        if not self.cuda:
            dep.wait()
            t0 = time.perf_counter()
            self._run_sync(src, list(src_slots), dst, list(dst_slots), meta)
            self._add_time(link, time.perf_counter() - t0, _batch_nbytes(src, dst, len(src_slots)))
            return DONE
        touches_nvme = isinstance(src, NvmeTier) or isinstance(dst, NvmeTier)
        if touches_nvme or not _device_waitable(dep):
            fut = self._io.submit(self._run_on_worker, src, list(src_slots), dst, list(dst_slots), dep, link, meta)
            return FutureHandle(fut)
        return self._launch(src, list(src_slots), dst, list(dst_slots), dep, link)

    def collect(self) -> None:
        """Fold the times of finished transfers into the link stats (cheap; call at step boundaries)."""
        for _ in range(len(self._times)):
            link, seconds, engine_batches, nbytes = self._times.popleft()
            link.note_batch(nbytes, seconds)
            link.engine_batches += engine_batches
        for _ in range(len(self._timed)):  # others may be appended meanwhile: they wait for the next call
            link, start, end, nbytes, host_seconds = self._timed.popleft()
            if end.query():
                link.note_batch(nbytes, start.elapsed_time(end) / 1e3, host_seconds)
            else:
                self._timed.append((link, start, end, nbytes, host_seconds))

    def synchronize(self) -> None:
        """Wait for every transfer submitted so far."""
        if self.cuda:
            if self._io is not None:
                self._io.submit(lambda: None).result()
            self.h2d_stream.synchronize()
            self.d2h_stream.synchronize()
            torch.cuda.current_stream(self.device).synchronize()
        self.collect()

    def close(self) -> None:
        if self.cuda:
            self.synchronize()
        if self._io is not None:
            self._io.shutdown(wait=True)
            self._io = None
        if self._staging is not None:
            self._staging.close()
            self._staging = None

    def link_stats(self, src: Tier, dst: Tier) -> LinkStats:
        """The traffic record of one link, for transfers made outside `move` (attention reading NVMe blocks)."""
        return self._link(src, dst)

    # -- internals ---------------------------------------------------------------------------------------
    def _link(self, src: Tier, dst: Tier) -> LinkStats:
        key = (src.name, dst.name)
        link = self.links.get(key)
        if link is None:
            link = self.links[key] = LinkStats()
        return link

    def _add_time(self, link: LinkStats, seconds: float, nbytes: int) -> None:
        self._times.append((link, seconds, 0, nbytes))

    def _run_sync(self, src: Tier, src_slots: list[int], dst: Tier, dst_slots: list[int], meta) -> None:
        """Everything in host memory or files: plain copies and file I/O on this thread."""
        if isinstance(dst, NvmeTier):
            pool, rows = self._as_stored(src, src_slots, dst.layout)
            dst.store.write(dst_slots, pool, rows, *meta)
        elif isinstance(src, NvmeTier):
            if src.layout.codec == dst.layout.codec:
                src.store.read(src_slots, dst.pool, dst_slots)
            else:
                rows = list(range(len(src_slots)))
                packed = torch.empty((len(rows), *src.layout.block_shape), dtype=torch.uint8)
                src.store.read(src_slots, packed, rows)
                move_blocks(
                    packed,
                    src.layout,
                    _index(rows, packed.device),
                    dst.pool,
                    dst.layout,
                    _index(dst_slots, dst.pool.device),
                )
        else:
            move_blocks(
                src.pool,
                src.layout,
                _index(src_slots, src.pool.device),
                dst.pool,
                dst.layout,
                _index(dst_slots, dst.pool.device),
            )

    @staticmethod
    def _as_stored(src: Tier, slots: list[int], layout) -> tuple[torch.Tensor, list[int]]:
        """The blocks `slots` of a host pool as `layout` stores them: the pool itself, or compressed copies."""
        if src.layout.codec == layout.codec:
            return src.pool, slots
        rows = list(range(len(slots)))
        packed = torch.empty((len(rows), *layout.block_shape), dtype=torch.uint8)
        move_blocks(src.pool, src.layout, _index(slots, src.pool.device), packed, layout, _index(rows, packed.device))
        return packed, rows

    def _stream_for(self, src: Tier, dst: Tier):
        # GPU -> GPU (copy-on-write) shares the h2d stream: consumers wait on the returned handle either way.
        return self.h2d_stream if dst.is_cuda else self.d2h_stream

    def debug_delay(self, stream) -> None:
        """Debug hook: hold the stream for a random while, so that missing orderings show as wrong data."""
        if self._debug_rng is not None:
            torch.cuda._sleep(self._debug_rng.randrange(0, 2_000_000))

    def _launch(self, src: MemoryTier, src_slots, dst: MemoryTier, dst_slots, dep: Handle, link: LinkStats) -> Handle:
        """Memory to memory with CUDA involved: one kernel (or one copy-engine transfer per run of consecutive
        slots) on the right stream, ordered after `dep`."""
        stream = self._stream_for(src, dst)
        # Host<->GPU batches in long runs of consecutive slots go to the copy engines: one 2D copy per run (and
        # layer group), at the full speed of the link, holding no SM.
        convert = src.layout.codec != dst.layout.codec  # (compressed on the way down, back on the way up)
        runs = copy_engine_runs(src_slots, dst_slots) if src.is_cuda != dst.is_cuda and not convert else None
        threshold = (
            self.d2h_engine_block_bytes
            if src.is_cuda and dst.is_host_memory
            else self.h2d_engine_block_bytes
            if src.is_host_memory and dst.is_cuda and (dma_batch.available() or self.dma_batches is False)
            else None
        )
        if (
            not convert
            and runs is None
            and threshold is not None
            and src.layout.block_nbytes >= threshold
            and copy_engine_available()
        ):
            # Large blocks: one DMA per run even where runs are single blocks (a 512 KiB piece keeps the engine at
            # the link's speed), a direction's pieces queued in one driver call (see the thresholds above).
            runs = block_runs(src_slots, dst_slots)
        compute = torch.cuda.current_stream(self.device) if self.serialize else None
        if compute is not None:
            stream.wait_stream(compute)
        with torch.cuda.stream(stream):
            dep.wait_on(stream)
            self.debug_delay(stream)
            if runs is None:  # (before the start mark: the host's work is not the link's time)
                src_idx, dst_idx = _index(src_slots, self.device), _index(dst_slots, self.device)
            start = torch.cuda.Event(enable_timing=True)
            start.record(stream)
            issue_t0 = time.perf_counter()  # (the host's time issuing the batch, inside the device's timing of it)
            groups = [(0, src.layout.num_layers)] if convert else self._layer_groups(src, dst, len(src_slots))
            programs = self.h2d_programs if src.is_host_memory and dst.is_cuda else None
            marks = []
            for lo, hi in groups:
                if convert:
                    move_blocks(src.pool, src.layout, src_idx, dst.pool, dst.layout, dst_idx)
                elif runs is None:
                    copy_blocks_triton(src.pool[:, lo:hi], dst.pool[:, lo:hi], src_idx, dst_idx, max_programs=programs)
                else:
                    copy_block_runs(src.pool[:, lo:hi], dst.pool[:, lo:hi], runs, stream, batch=self.dma_batches)
                event = torch.cuda.Event(enable_timing=(hi == groups[-1][1]))  # the last one times the transfer
                event.record(stream)
                marks.append((lo, hi, event))
            end = marks[-1][2]
            handle = LayeredHandle(marks) if len(marks) > 1 and not self.serialize else EventHandle(end)
        if compute is not None:
            compute.wait_event(end)
        issue_s = time.perf_counter() - issue_t0
        self._timed.append((link, start, end, _batch_nbytes(src, dst, len(src_slots)), issue_s))
        if runs is not None:
            self._times.append((link, 0.0, 1, 0))
        return handle

    def _layer_groups(self, src: MemoryTier, dst: MemoryTier, n: int) -> list[tuple[int, int]]:
        """Layer ranges to copy one after the other: all layers at once unless a large batch goes to the GPU."""
        layers = dst.pool.shape[1]
        if not (src.is_host_memory and dst.is_cuda) or n < self.layered_min_blocks or layers < 2:
            return [(0, layers)]
        per_layer = dst.layout.block_nbytes // layers
        size = max(1, min(layers, round(self.layer_group_bytes / per_layer)))
        return [(lo, min(layers, lo + size)) for lo in range(0, layers, size)]

    def _run_on_worker(self, src: Tier, src_slots, dst: Tier, dst_slots, dep: Handle, link: LinkStats, meta) -> Handle:
        """Body of a transfer on the worker thread; returns a handle for any device work it left queued."""
        dep.wait()
        if self._debug_rng is not None:
            time.sleep(self._debug_rng.random() * 0.002)
        t0 = time.perf_counter()
        try:
            if isinstance(dst, NvmeTier):
                if src.is_host_memory:
                    dst.store.write(dst_slots, src.pool, src_slots, *meta)
                else:
                    self._gpu_to_nvme(src, src_slots, dst, dst_slots, meta)
                return DONE
            if isinstance(src, NvmeTier):
                if dst.is_host_memory:
                    src.store.read(src_slots, dst.pool, dst_slots)
                    return DONE
                return self._nvme_to_gpu(src, src_slots, dst, dst_slots)
            handle = self._launch(src, src_slots, dst, dst_slots, DONE, link)
            return handle
        finally:
            if isinstance(src, NvmeTier) or isinstance(dst, NvmeTier):
                self._add_time(link, time.perf_counter() - t0, _batch_nbytes(src, dst, len(src_slots)))

    def _chunks(self, n: int):
        step = self._staging.num_slots
        for i in range(0, n, step):
            yield i, min(n, i + step)

    def _staging_free(self) -> None:
        """Wait until no device copy still reads the staging buffer (worker thread only)."""
        if self._staging_reader is not None:
            self._staging_reader.synchronize()
            self._staging_reader = None

    def _gpu_to_nvme(self, src: MemoryTier, src_slots, dst: NvmeTier, dst_slots, meta) -> None:
        staging = self._staging
        self._staging_free()
        for i, j in self._chunks(len(src_slots)):
            rows = list(range(j - i))
            with torch.cuda.stream(self.d2h_stream):
                src_idx, dst_idx = _index(src_slots[i:j], self.device), _index(rows, self.device)
                move_blocks(src.pool, src.layout, src_idx, staging.pool, staging.layout, dst_idx)
                done = torch.cuda.Event()
                done.record(self.d2h_stream)
            done.synchronize()
            keys, toks = meta
            dst.store.write(
                dst_slots[i:j], staging.pool, rows, keys[i:j] if keys else None, toks[i:j] if toks else None
            )

    def _nvme_to_gpu(self, src: NvmeTier, src_slots, dst: MemoryTier, dst_slots) -> Handle:
        staging = self._staging
        for i, j in self._chunks(len(src_slots)):
            rows = list(range(j - i))
            self._staging_free()  # the staging buffer is about to be overwritten
            src.store.read(src_slots[i:j], staging.pool, rows)
            with torch.cuda.stream(self.h2d_stream):
                self.debug_delay(self.h2d_stream)
                src_idx, dst_idx = _index(rows, self.device), _index(dst_slots[i:j], self.device)
                move_blocks(staging.pool, staging.layout, src_idx, dst.pool, dst.layout, dst_idx)
                self._staging_reader = torch.cuda.Event()
                self._staging_reader.record(self.h2d_stream)
        return EventHandle(self._staging_reader)


def _device_waitable(handle: Handle) -> bool:
    """True if a stream can wait for `handle` without the host blocking (device events, finished host work)."""
    if isinstance(handle, FutureHandle):
        return handle.future.done()
    if isinstance(handle, Settled):
        return _device_waitable(handle.inner)
    parts = getattr(handle, "parts", None)
    if parts is not None:
        return all(_device_waitable(p) for p in parts)
    return True


def _index(slots: Sequence[int], device: torch.device) -> torch.Tensor:
    """Slot numbers as an int64 tensor on `device` (pinned staging and a non-blocking copy for CUDA)."""
    t = torch.tensor(slots, dtype=torch.int64)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


def _batch_nbytes(src: Tier, dst: Tier, n: int) -> int:
    """Bytes that cross the link for `n` blocks (compressed where either side stores them so)."""
    return n * min(src.layout.block_nbytes, dst.layout.block_nbytes)

"""Reading a streaming sequence's NVMe blocks one layer at a time, ahead of the attention that needs them.

A step that streams blocks left on NVMe needs, for every layer, that layer's slice of each of them (the blocks
stay on disk: they do not fit in memory together). The order in which the attention will ask for them is known
when the step starts, so a worker thread reads the slices in that order into a ring of host buffers (pinned on
CUDA), up to `ring` reads ahead of the attention, while the GPU computes the layers before. A buffer is read into
again only after the copy of its previous contents to the device has completed (an event, waited for on the
worker). Each block's checksum is checked as its last layer is read (`LayerChecks`, fed in order by the one
worker), and a read's error or a damaged block is raised where the attention takes that read.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from tierkv.kv.nvme_store import LayerChecks
from tierkv.kv.tiers import NvmeTier

# One read: the tier, its slots, the layer.
Read = tuple[NvmeTier, list[int], int]


class DiskStream:
    """The ring of host buffers and the reader thread of one model runner; `start` gives it a step's reads."""

    def __init__(self, blocks: int, layer_shape: tuple, dtype: torch.dtype, pin: bool, ring: int = 4) -> None:
        self.buffers = [torch.empty((blocks, *layer_shape), dtype=dtype, pin_memory=pin) for _ in range(ring)]
        self._copied: list[torch.cuda.Event | None] = [None] * ring  # the last device copy out of each buffer
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="tierkv-disk")
        self._reads: list[Read] = []
        self._futures: dict[int, Future] = {}
        self._next = 0  # the read the attention takes next
        self._checks = LayerChecks()

    def start(self, reads: list[Read]) -> None:
        """A new step's reads, in the order the attention takes them: the first `ring` are submitted now."""
        self.drain()
        self._reads, self._next, self._checks = reads, 0, LayerChecks()
        for i in range(min(len(reads), len(self.buffers))):
            self._submit(i)

    def take(self) -> tuple[Read, torch.Tensor, float]:
        """The next read, its buffer (n, *layer_shape) once read, and the seconds the read took; raises what the
        read raised."""
        i = self._next
        self._next += 1
        seconds = self._futures.pop(i).result()
        read = self._reads[i]
        return read, self.buffers[i % len(self.buffers)][: len(read[1])], seconds

    def taken(self, stream) -> None:
        """The buffer last taken is copied to the device on `stream` (None: already copied, on the host): its
        buffer may be read into again after that copy, by the read `ring` places later."""
        i = self._next - 1
        b = i % len(self.buffers)
        if stream is not None:
            ev = torch.cuda.Event()
            ev.record(stream)
            self._copied[b] = ev
        if i + len(self.buffers) < len(self._reads):
            self._submit(i + len(self.buffers))

    def drain(self) -> None:
        """Wait for the reads still in flight (a step that stopped early leaves some): their buffers are free after."""
        for f in self._futures.values():
            try:
                f.result()
            except Exception:  # noqa: BLE001 - the step that submitted it has already failed or moved on
                pass
        self._futures.clear()

    def close(self) -> None:
        self.drain()
        self._pool.shutdown(wait=True)

    def _submit(self, i: int) -> None:
        self._futures[i] = self._pool.submit(self._read, i)

    def _read(self, i: int) -> float:
        tier, slots, layer = self._reads[i]
        b = i % len(self.buffers)
        if self._copied[b] is not None:
            self._copied[b].synchronize()  # its last contents have reached the device
            self._copied[b] = None
        t0 = time.perf_counter()
        tier.store.read_layer(slots, layer, self.buffers[b][: len(slots)], self._checks)
        return time.perf_counter() - t0

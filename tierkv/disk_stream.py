"""Reading a streaming sequence's NVMe blocks one layer at a time, ahead of the attention that needs them.

A step that streams blocks left on NVMe needs, for every layer, that layer's slice of each of them (the blocks
stay on disk: they do not fit in memory together). The order in which the attention will ask for them is known
when the step starts, so the reads go into a ring of host buffers (pinned on CUDA), up to `ring` reads ahead of
the attention, while the GPU computes the layers before.

Two threads keep the disk busy. The issuer starts each read as soon as its buffer is free (the copy of its previous
contents to the device has completed: an event, waited for there); a started read queues behind the ones before it
on the NVMe backend's threads, so the disk never waits between reads. The checker waits for each read in order and
checks its blocks' checksums (`LayerChecks`: a block's layers must come in order) while the next reads run. Before,
one thread read a layer, waited for it, then checksummed it: the disk idled at every layer's end and during every
checksum (item 3n at 1.52x the disk's bound on the H200, 2026-12-04). A read's error or a damaged block is raised
where the attention takes that read.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from tierkv.errors import CorruptBlockError
from tierkv.kv.nvme_store import NvmeStore, host_bytes
from tierkv.kv.tiers import NvmeTier

# One read: the tier, its slots, the layer.
Read = tuple[NvmeTier, list[int], int]


class LayerChecks:
    """Checksums of blocks read layer by layer: each block's state is fed its layers in order and compared with the
    store's record after the last one, so that a block damaged on disk fails the step that reads it instead of
    feeding its bytes to attention unnoticed in later steps."""

    def __init__(self) -> None:
        self._states: dict[int, object] = {}

    def update(self, store: NvmeStore, slots: Sequence[int], layer: int, out: torch.Tensor) -> None:
        last = layer == store.layout.num_layers - 1
        bad = []
        for i, s in enumerate(slots):
            if layer == 0:
                self._states[s] = store.checksum_state(s)
            h = self._states[s]
            h.update(host_bytes(out[i]))
            if last:
                del self._states[s]
                if h.intdigest() != store.record(s).checksum:
                    bad.append(s)
        if bad:
            raise CorruptBlockError(
                f"NVMe tier: {len(bad)} block(s) in {store.data_path} (slots {bad[:8]}) do not match their "
                "checksums: the file was changed or damaged on disk",
                slots=bad,
            )


class DiskStream:
    """The ring of host buffers and the reader threads of one model runner; `start` gives it a step's reads."""

    def __init__(self, blocks: int, layer_shape: tuple, dtype: torch.dtype, pin: bool, ring: int = 4) -> None:
        self.buffers = [torch.empty((blocks, *layer_shape), dtype=dtype, pin_memory=pin) for _ in range(ring)]
        self._copied: list[torch.cuda.Event | None] = [None] * ring  # the last device copy out of each buffer
        self._issuer = ThreadPoolExecutor(1, thread_name_prefix="tierkv-disk-issue")
        self._checker = ThreadPoolExecutor(1, thread_name_prefix="tierkv-disk-check")
        self._reads: list[Read] = []
        self._checked: dict[int, Future] = {}  # read i -> the seconds the disk spent on it, once checked
        self._next = 0  # the read the attention takes next
        self._last_done = 0.0  # when the read before the one being checked ended
        self._checks = LayerChecks()

    def start(self, reads: list[Read]) -> None:
        """A new step's reads, in the order the attention takes them: the first `ring` are started now."""
        self.drain()
        self._reads, self._next, self._checks, self._last_done = reads, 0, LayerChecks(), 0.0
        for i in range(min(len(reads), len(self.buffers))):
            self._submit(i)

    def take(self) -> tuple[Read, torch.Tensor, float]:
        """The next read, its buffer (n, *layer_shape) once read and checked, and the seconds the disk spent on it
        (from its start, or from the end of the read before it if that was later); raises what the read raised."""
        i = self._next
        self._next += 1
        seconds = self._checked.pop(i).result()
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
        for f in list(self._checked.values()):
            try:
                f.result()
            except Exception:  # noqa: BLE001 - the step that started it has already failed or moved on
                pass
        self._checked.clear()

    def close(self) -> None:
        self.drain()
        self._issuer.shutdown(wait=True)
        self._checker.shutdown(wait=True)

    def _submit(self, i: int) -> None:
        started = self._issuer.submit(self._begin, i)  # -> (the read's wait, when it started)
        self._checked[i] = self._checker.submit(self._finish, i, started)

    def _begin(self, i: int) -> tuple[Callable[[], None], float]:
        """(On the issuer.) Start read i once its buffer's last contents have reached the device."""
        tier, slots, layer = self._reads[i]
        b = i % len(self.buffers)
        if self._copied[b] is not None:
            self._copied[b].synchronize()
            self._copied[b] = None
        return tier.store.start_layer_read(slots, layer, self.buffers[b][: len(slots)]), time.perf_counter()

    def _finish(self, i: int, started: Future) -> float:
        """(On the checker, in read order.) Wait for read i, check its blocks' checksums; the disk's seconds on it."""
        wait, t0 = started.result()
        wait()
        done = time.perf_counter()
        seconds = done - max(t0, self._last_done)
        self._last_done = done
        tier, slots, layer = self._reads[i]
        self._checks.update(tier.store, slots, layer, self.buffers[i % len(self.buffers)][: len(slots)])
        return seconds

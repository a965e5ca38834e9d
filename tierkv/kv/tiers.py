"""The three tiers as block pools with slot allocators: GPU memory, pinned host memory, NVMe files.

A tier only stores: it hands out slots and exposes its bytes. Which block lives where is the page
manager's business; moving bytes between tiers is the mover's.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import weakref
from concurrent.futures import ThreadPoolExecutor

import torch

from tierkv.errors import CapacityError
from tierkv.kernels.kv_fp8 import layer_caches
from tierkv.kv.block import NVME, TIER_NAMES
from tierkv.kv.nvme_store import NvmeStore
from tierkv.kv.slots import SlotAllocator
from tierkv.layout import KVLayout
from tierkv.sizes import format_nbytes


class Tier:
    """A pool of `num_slots` block slots, of which `num_blocks` may hold resident blocks at rest
    (the rest is the swap reserve, used only in the middle of a promotion)."""

    kind: int
    name: str

    def __init__(self, kind: int, layout: KVLayout, num_blocks: int, num_slots: int) -> None:
        self.kind = kind
        self.name = TIER_NAMES[kind]
        self.layout = layout
        self.num_blocks = num_blocks
        self.num_slots = num_slots
        self.slots = SlotAllocator(num_slots)

    @property
    def is_cuda(self) -> bool:
        return False

    @property
    def is_host_memory(self) -> bool:
        """True where the pool is CPU-addressable memory (pinned or plain)."""
        return False

    def describe(self) -> dict:
        return {"name": self.name, "num_blocks": self.num_blocks, "nbytes": self.num_blocks * self.layout.block_nbytes}

    def close(self) -> None:
        pass


HUGE_PAGE = 2 * 2**20


def _host_empty(shape: tuple[int, ...], dtype: torch.dtype, populate: bool = False) -> torch.Tensor:
    """An uninitialised CPU tensor in an anonymous mapping of its own, starting on a 2 MiB boundary (O_DIRECT needs
    4 KiB) and advised to use transparent huge pages.

    populate: touch every page now, from several threads (`_touch`). cudaHostRegister faults untouched pages in
    one thread: 16 GiB took 11.4 s registered as allocated, 1.1 s with huge pages touched first (H100 host,
    2026-11-24, a 40 GiB CPU tier took 25-53 s of the engine's start). Memory stays lazily allocated otherwise."""
    nbytes = dtype.itemsize
    for d in shape:
        nbytes *= d
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        mapping.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError):  # no transparent huge pages here: 4 KiB pages, still correct
        pass
    raw = torch.frombuffer(mapping, dtype=torch.uint8)  # holds a reference: unmapped when the last view dies
    skip = (-raw.data_ptr()) % HUGE_PAGE
    out = raw[skip : skip + nbytes]
    if populate:
        _touch(out.data_ptr(), nbytes)
    return out.view(dtype).view(shape)


def _touch(ptr: int, nbytes: int, piece: int = 256 * HUGE_PAGE) -> None:
    """Write zeros over [ptr, ptr + nbytes) in 512 MiB pieces from a few threads (ctypes releases the GIL), so
    that the kernel faults the pages in in parallel. Not torch's zero_(): that would start torch's intra-op
    thread pool (idle threads the engine never asked for, spinning beside its host work)."""
    starts = range(0, nbytes, piece)
    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1, len(starts)))) as pool:
        list(pool.map(lambda a: ctypes.memset(ptr + a, 0, min(piece, nbytes - a)), starts))


def _available_ram() -> int | None:
    """Bytes of RAM the kernel says can be given out now without swapping (MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_host_memory(wanted: dict[str, int]) -> None:
    """Refuse host-memory tiers that together ask for more RAM than is available now: `wanted[tier name] = bytes`.
    (Each alone may fit; together they would end in the OOM killer, not in an error.)"""
    total = sum(wanted.values())
    avail = _available_ram()
    if (
        avail is not None and len(wanted) > 1 and total > avail and max(wanted.values()) <= avail
    ):  # (one alone: its own message)
        parts = " + ".join(f"{name} tier {format_nbytes(n)}" for name, n in wanted.items())
        names = " / ".join(f"{name}_blocks or {name}_memory" for name in wanted)
        raise CapacityError(
            f"the tiers in host memory need {parts} = {format_nbytes(total)} together, but only "
            f"{format_nbytes(avail)} of RAM is available now; lower {names}"
        )


def _register_pinned(owner, t: torch.Tensor) -> weakref.finalize:
    """Page-lock `t`'s memory in place and map it into the device's address space (cudaHostRegister).

    Used instead of torch's pinned allocator, which rounds every allocation up to a power of two (a 96 GiB CPU
    tier would ask for 128 GiB). Returns a finalizer, run by close() or when `owner` is collected, that
    unregisters the memory before letting go of `t`: memory freed while still registered would make every later
    registration of that address range fail."""
    cudart = torch.cuda.cudart()
    err = int(cudart.cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0))
    if err != 0:
        cudart.cudaGetLastError()  # clear it, or torch reports it at its next kernel launch
        raise RuntimeError(f"cudaHostRegister failed with CUDA error {err}")
    return weakref.finalize(owner, _unregister, t.data_ptr(), t)


def _unregister(ptr: int, _keepalive: torch.Tensor) -> None:
    torch.cuda.cudart().cudaHostUnregister(ptr)


class MemoryTier(Tier):
    """Blocks in one tensor `pool` of shape (num_slots, *block_shape): device memory, pinned or plain host memory."""

    def __init__(
        self, kind: int, layout: KVLayout, num_blocks: int, num_slots: int, device: torch.device, pin: bool
    ) -> None:
        nbytes, name = num_slots * layout.block_nbytes, TIER_NAMES[kind]

        def refused(what: str, why: str) -> CapacityError:
            return CapacityError(
                f"cannot allocate the {name} tier: {num_slots} blocks = {format_nbytes(nbytes)} of {what} "
                f"{why}; lower {name}_blocks / {name}_memory"
            )

        if device.type == "cpu":
            # Checked before mapping anything: a pinned pool is touched whole at once, and a plain one fills as the
            # run goes on; either way, more than the RAM free now ends in the OOM killer, not in an error.
            avail = _available_ram()
            if avail is not None and nbytes > avail:
                raise refused(
                    f"{'pinned ' if pin else ''}host memory,",
                    f"but only {format_nbytes(avail)} of RAM is available now",
                )
        self.device = device
        self.pinned = pin
        shape = (num_slots, *layout.block_shape)
        self._unpin: weakref.finalize | None = None
        try:  # the pool before the slot list: a size no memory can hold fails here, not in building the list
            if device.type == "cuda":
                self.pool = torch.empty(shape, dtype=layout.storage_dtype, device=device)
            else:
                self.pool = _host_empty(shape, layout.storage_dtype, populate=pin)
                if pin:
                    self._unpin = _register_pinned(self, self.pool)
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            raise refused(f"{device}{' pinned' if pin else ''} memory", f"({str(exc).splitlines()[0]})") from None
        super().__init__(kind, layout, num_blocks, num_slots)
        self._layer_views: list | None = None

    def layer_views(self, layer: int) -> tuple:
        """(keys, values) of one layer, each (slots, block_size, Hkv, D), strided views of the pool, made once (a
        step's attention asks for them in every layer); in an fp8 pool, two `Fp8Cache`s (codes and scales)."""
        if self._layer_views is None:
            layout = self.layout
            if layout.codec == "fp8":
                dims = (layout.block_size, layout.num_kv_heads, layout.head_dim)
                self._layer_views = [layer_caches(self.pool, i, *dims) for i in range(layout.num_layers)]
            else:
                self._layer_views = [(self.pool[:, i, 0], self.pool[:, i, 1]) for i in range(layout.num_layers)]
        return self._layer_views[layer]

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def is_host_memory(self) -> bool:
        return self.device.type == "cpu"

    def describe(self) -> dict:
        where = "cuda" if self.is_cuda else ("pinned host" if self.pinned else "host")
        return {**super().describe(), "memory": where, "device": str(self.device)}

    def close(self) -> None:
        """Unregister pinned memory now (it is also unregistered when the tier is garbage-collected)."""
        if self._unpin is not None:
            self._unpin()


class NvmeTier(Tier):
    """Blocks in preallocated files through an `NvmeStore` (kvikio or plain file I/O)."""

    def __init__(self, layout: KVLayout, num_blocks: int, directory: str, backend: str = "auto", tag: str = "") -> None:
        self.store = NvmeStore(directory, layout, num_blocks, backend, tag)  # refuses a size the disk cannot hold
        super().__init__(NVME, layout, num_blocks, num_blocks)

    def describe(self) -> dict:
        return {
            **super().describe(),
            "directory": self.store.directory,
            "backend": self.store.backend_name,
            "backend_reason": self.store.backend_reason,
        }

    def close(self) -> None:
        self.store.close()

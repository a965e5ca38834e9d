"""Spare copies: slots of a slower tier still holding the bytes of blocks that live in a faster one.

Two kinds. A host copy: a block promoted from the CPU tier keeps its CPU slot until the block is written, so
that demoting it again unwritten moves no byte (a swapped-in sequence's full blocks, a prefix). A write-through
copy: a keyed block copied to NVMe as soon as it is complete (`write_through`), or the NVMe slot a keyed block
left when it was promoted. Spares count as free room in their tier and are the first to give it up, oldest first.
"""

from __future__ import annotations

from collections.abc import Callable

from tierkv.handles import Handle, all_of
from tierkv.kv.block import CPU, NVME, Block, SpareCopy
from tierkv.kv.slots import SlotAllocator


class SpareCopies:
    """The spare copies of every block, oldest first per tier, and the keyed blocks waiting for a write-through
    copy. `slots[kind]` are the tiers' slot allocators: a dropped copy's slot goes back there."""

    def __init__(self, slots: dict[int, SlotAllocator]) -> None:
        self.slots = slots
        self.host: dict[int, Block] = {}  # blocks with a host copy (CPU slot), by id, oldest first
        self.disk: dict[int, Block] = {}  # blocks with a write-through copy (NVMe slot), by id, oldest first
        self.write_queue: list[Block] = []  # keyed blocks registered since the last flush (write-through)

    def in_tier(self, kind: int) -> dict[int, Block]:
        """The blocks whose spares hold slots of tier `kind`: host copies in the CPU tier, write-through copies on
        NVMe, none on the GPU."""
        return self.host if kind == CPU else self.disk if kind == NVME else {}

    def count(self, kind: int) -> int:
        return len(self.in_tier(kind))

    def keep_host(self, block: Block, slot: int, ready: Handle, busy: Handle) -> None:
        block.host_copy = SpareCopy(slot, ready, busy)
        self.host[block.block_id] = block

    def keep_disk(self, block: Block, slot: int, ready: Handle) -> None:
        block.disk_copy = SpareCopy(slot, ready)
        self.disk[block.block_id] = block

    def take_host(self, block: Block) -> SpareCopy:
        """The block's host copy, no longer a spare: the block is moving back onto it."""
        copy, block.host_copy = block.host_copy, None
        del self.host[block.block_id]
        return copy

    def drop_host(self, block: Block) -> None:
        if block.host_copy is not None:
            copy = self.take_host(block)
            self.slots[CPU].give(copy.slot, all_of([copy.ready, copy.busy]))

    def drop_disk(self, block: Block) -> None:
        if block.disk_copy is not None:
            copy, block.disk_copy = block.disk_copy, None
            self.slots[NVME].give(copy.slot, all_of([copy.ready, copy.busy]))
            del self.disk[block.block_id]

    def drop(self, block: Block) -> None:
        self.drop_disk(block)
        self.drop_host(block)

    def drop_oldest(self, kind: int, n: int, open_slots: Callable[[], int]) -> None:
        """Give up tier `kind`'s spares, oldest first, until `open_slots()` reaches `n`. A spare's block lives in
        a faster tier: demoted, it is written down whole again (or, onto a host copy it still has, not at all)."""
        spares = self.in_tier(kind)
        drop = self.drop_host if kind == CPU else self.drop_disk
        while spares and open_slots() < n:
            drop(next(iter(spares.values())))

    def queue_write_through(self, block: Block) -> None:
        self.write_queue.append(block)

    def take_write_queue(self) -> list[Block]:
        queue, self.write_queue = self.write_queue, []
        return queue

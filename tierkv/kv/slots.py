"""Free slots of one tier, each with the handle of the work that may still be reading it."""

from __future__ import annotations

from collections import deque

from tierkv.handles import DONE, Handle, settled


def _slot_number(entry: tuple[int, Handle]) -> int:
    return entry[0]


class SlotAllocator:
    """Free slots of one tier, oldest-freed first. A freed slot may still be read by work in flight:
    it comes back with the handle of that work, which its next writer must wait on."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self._free: deque[tuple[int, Handle]] = deque((s, DONE) for s in range(num_slots))

    def take(self) -> tuple[int, Handle]:
        return self._free.popleft()

    def take_many(self, n: int) -> list[tuple[int, Handle]]:
        """`n` slots, oldest-freed first, handed out in ascending slot order: a batch of blocks in logical order then
        lands in runs of consecutive slots wherever the free slots allow, which the copy engines move in one piece."""
        free = self._free
        return sorted((free.popleft() for _ in range(n)), key=_slot_number)

    def give(self, slot: int, busy: Handle = DONE) -> None:
        # The work still touching the slot need only have ended for its next writer: succeeded or failed.
        self._free.append((slot, settled(busy)))

    def __len__(self) -> int:
        return len(self._free)

    def free_slots(self) -> set[int]:
        return {s for s, _ in self._free}

    def reset(self, used: set[int]) -> None:
        """Every slot not in `used` free and idle: after a failed step, once every transfer has finished."""
        self._free = deque((s, DONE) for s in range(self.num_slots) if s not in used)

    def claim(self, slots: set[int]) -> None:
        """Take specific slots out of the free list (blocks found in a store at start-up)."""
        self._free = deque((s, h) for s, h in self._free if s not in slots)

"""The block ledger: every block, every sequence's block table, reference counts, pins, and each tier's residents
in eviction order (the tiers' policies). Which slots are free, and the bytes, are someone else's."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable

from tierkv.handles import DONE, Handle
from tierkv.kv.block import Block, SequenceTable
from tierkv.policies.base import EvictionPolicy
from tierkv.policies.registry import make_eviction_policy


class BlockLedger:
    """Blocks by id and block tables by sequence id, over the tier kinds `kinds` (fastest first).

    A block no sequence holds (ref count 0) survives only as a cached prefix block: `cached[kind]` counts those per
    tier. `policies[kind]` holds the ids of the blocks living in tier `kind`, in its eviction order; a block on
    its way between tiers is in neither policy until it lands."""

    def __init__(self, kinds: list[int], eviction: str) -> None:
        self.kinds = kinds
        self.eviction = eviction
        self.policies: dict[int, EvictionPolicy] = {k: make_eviction_policy(eviction) for k in kinds}
        self.blocks: dict[int, Block] = {}
        self.sequences: dict[Hashable, SequenceTable] = {}
        self.cached: dict[int, int] = dict.fromkeys(kinds, 0)
        self.step = 0  # prefetch reservations (Block.reserved_step) lapse when it passes them
        self.pinned_blocks = 0  # blocks with pins > 0
        self.peak_live_blocks = 0
        self.forks = 0
        self._next_block_id = 0

    # -- blocks --------------------------------------------------------------------------------------------
    def new_block(self, kind: int, slot: int, ready: Handle = DONE, **fields) -> Block:
        """A block living in (kind, slot), held once unless `ref_count=0` with a `key` (a cached block) is given."""
        block = Block(self._next_block_id, kind, slot, ready=ready, **fields)
        self._next_block_id += 1
        self.blocks[block.block_id] = block
        self.policies[kind].insert(block.block_id)
        if block.ref_count == 0 and block.key is not None:
            self.cached[kind] += 1
        return block

    def note_peak(self) -> None:
        self.peak_live_blocks = max(self.peak_live_blocks, len(self.blocks))

    def forget(self, block: Block) -> None:
        """Take the block out of the ledger (its policy and the cached count too)."""
        self.policies[block.tier].remove(block.block_id)
        if block.key is not None and block.ref_count == 0:
            self.cached[block.tier] -= 1
        del self.blocks[block.block_id]

    def hold(self, block: Block) -> None:
        """One more sequence holds the block (a cached block stops being one)."""
        if block.ref_count == 0:
            self.cached[block.tier] -= 1
        block.ref_count += 1

    def let_go(self, block: Block) -> bool:
        """One sequence fewer holds the block. A keyed block no sequence holds stays as a cached block; True if the
        block is left with no holder and no key (the caller drops it)."""
        block.ref_count -= 1
        if block.ref_count:
            return False
        if block.key is not None:
            self.cached[block.tier] += 1  # stays where it is, for the next request with this prefix
            return False
        return True

    def land(self, block: Block, kind: int, slot: int) -> None:
        """The block (out of its policy) now lives at (kind, slot)."""
        if block.ref_count == 0:
            self.cached[block.tier] -= 1
            self.cached[kind] += 1
        block.tier, block.slot = kind, slot
        self.policies[kind].insert(block.block_id)

    def resident(self, kind: int) -> int:
        """Blocks living in tier `kind` now."""
        return len(self.policies[kind])

    def evictable(self, protect: set[int], allow_reserved: bool) -> Callable[[Hashable], bool]:
        """Which blocks a decision may move away: unpinned, not protected, and (unless `allow_reserved`) not held
        for a later step by a prefetch."""
        step = self.step
        blocks = self.blocks

        def evictable(bid: Hashable) -> bool:
            b = blocks[bid]
            # A prefetch reservation holds a block for its sequence until its step begins (then the step's pins
            # hold what it uses); a cached block has no sequence to hold it for.
            return (
                b.pins == 0 and bid not in protect and (allow_reserved or b.reserved_step <= step or b.ref_count == 0)
            )

        return evictable

    # -- sequences -----------------------------------------------------------------------------------------
    def add_sequence(self, seq_id: Hashable, table: SequenceTable | None = None) -> None:
        if seq_id in self.sequences:
            raise KeyError(f"sequence {seq_id!r} already exists")
        self.sequences[seq_id] = table or SequenceTable()

    def seq(self, seq_id: Hashable) -> SequenceTable:
        try:
            return self.sequences[seq_id]
        except KeyError:
            raise KeyError(f"unknown sequence {seq_id!r}") from None

    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        parent = self.seq(parent_id)
        if child_id in self.sequences:
            raise KeyError(f"sequence {child_id!r} already exists")
        for block in parent.blocks:
            block.ref_count += 1
        self.sequences[child_id] = SequenceTable(list(parent.blocks), parent.num_tokens)
        self.forks += 1

    # -- pins ----------------------------------------------------------------------------------------------
    def pin(self, blocks: Iterable[Block]) -> None:
        pinned = 0
        for block in blocks:
            if not block.pins:
                pinned += 1
            block.pins += 1
        self.pinned_blocks += pinned

    def unpin(self, blocks: Iterable[Block]) -> None:
        unpinned = 0
        for block in blocks:
            block.pins -= 1
            if not block.pins:
                unpinned += 1
        self.pinned_blocks -= unpinned

"""A KV block, a spare copy of one, and a sequence's block table: the records the page manager keeps."""

from __future__ import annotations

from dataclasses import dataclass, field

from tierkv.handles import DONE, Handle

GPU, CPU, NVME = 0, 1, 2  # tier kinds, fastest first
TIER_NAMES = ("gpu", "cpu", "nvme")


def lower_tier(name: str, kinds: list[int], what: str) -> int:
    """The kind of tier `name` ("cpu" or "nvme"), which must be among `kinds` and below the GPU."""
    target = TIER_NAMES.index(name) if name in TIER_NAMES else -1
    if target <= GPU or target not in kinds:
        raise ValueError(
            f"{what}: {name!r} is not a lower tier of this page manager (have {[TIER_NAMES[k] for k in kinds]})"
        )
    return target


@dataclass(eq=False)
class SpareCopy:
    """A slot of a slower tier still holding the bytes of a block that lives in a faster one."""

    slot: int
    ready: Handle = DONE  # completes when the bytes in `slot` are valid
    busy: Handle = DONE  # transfers still reading `slot`


@dataclass(eq=False)
class Block:
    """One KV block. `tier`/`slot` is its residence (its destination while a move is in flight)."""

    block_id: int
    tier: int
    slot: int
    ready: Handle = DONE  # completes when the bytes at (tier, slot) are valid, or the slot may be written
    readers: Handle = DONE  # transfers still reading (tier, slot) as a source (copy-on-write, write-through)
    ref_count: int = 1
    pins: int = 0
    has_data: bool = False  # False until first written: an empty block moves without copying bytes
    reserved_step: int = -1  # prefetched for this step: other prefetches leave it alone until then
    key: bytes | None = None  # content key (prefix cache); None = private to its sequences
    token_ids: tuple[int, ...] | None = None  # the tokens whose KV a keyed block holds, checked on every hit
    host_copy: SpareCopy | None = None  # a CPU slot still holding this GPU block's bytes (kept from its promotion)
    disk_copy: SpareCopy | None = None  # write-through: an NVMe slot holding a copy of this keyed block


@dataclass
class SequenceTable:
    """A sequence's blocks in logical order, its length, and the blocks each outstanding acquire pinned."""

    blocks: list[Block] = field(default_factory=list)
    num_tokens: int = 0
    pinned: list[list[Block]] = field(default_factory=list)

"""A transfer as data: which slots of which tier go to which slots of which other tier, after what."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from tierkv.handles import Handle


@dataclass
class Transfer:
    """One batch in one direction: the bytes of `src_slots` of tier `src` into `dst_slots` of tier `dst`, once
    every handle in `after` has completed (the writes that produced the source, the reads that last used the
    destination slots). `keys`/`token_ids` (per block, for an NVMe destination) go into the store's index.

    Placement decides transfers and hands them to the mover, which runs each as one launch (or one I/O
    submission) and returns the handle that completes when the bytes have landed."""

    src: int
    src_slots: list[int]
    dst: int
    dst_slots: list[int]
    after: list[Handle] = field(default_factory=list)
    keys: Sequence[bytes | None] | None = None
    token_ids: Sequence | None = None

    def __post_init__(self) -> None:
        if len(self.src_slots) != len(self.dst_slots):
            raise ValueError(
                f"transfer: {len(self.src_slots)} source slots but {len(self.dst_slots)} destination slots"
            )

"""What one `acquire` asks for, checked and worked out before anything changes: the blocks of each sequence it
brings to the GPU, the blocks it writes, the copy-on-write copies those writes need, and its GPU footprint."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from tierkv.errors import CapacityError
from tierkv.kv.block import GPU, Block, SequenceTable


@dataclass
class AcquirePlan:
    spans: list[tuple[int, int]]  # per sequence: the logical blocks [first, stop) acquired
    write_spans: dict[Hashable, tuple[int, int]]  # per writing sequence: the logical blocks [lo, hi) written
    cow: list[tuple[int, int, Block]]  # (sequence index, block index, shared block) per private copy needed
    needed: dict[int, Block]  # the acquired blocks by id, before copy-on-write
    on_gpu_after: int  # distinct blocks the sequences hold on the GPU once the copies are made
    still_used: set[int]  # ids of the acquired blocks some sequence of the step still uses after copy-on-write

    def check_gpu_room(self, pinned_blocks: int, gpu_blocks: int) -> list[Block]:
        """CapacityError, changing nothing, if the step's blocks and those other steps keep pinned (of
        `pinned_blocks` pinned now) exceed the GPU tier's `gpu_blocks`; else the acquired blocks not on the GPU."""
        pinned_here = 0
        lower = []
        for block in self.needed.values():
            if block.pins:
                pinned_here += 1
            if block.tier != GPU:
                lower.append(block)
        pinned_elsewhere = pinned_blocks - pinned_here
        need = self.on_gpu_after + pinned_elsewhere
        if need > gpu_blocks:
            raise CapacityError(
                f"this step needs {need} KV blocks on the GPU at once ({self.on_gpu_after} for its sequences, "
                f"{pinned_elsewhere} pinned by other steps) but the GPU tier holds {gpu_blocks}; "
                "run fewer or shorter sequences per step or raise gpu_blocks"
            )
        return lower


def plan_acquire(
    seq_ids: Sequence[Hashable],
    seqs: Sequence[SequenceTable],
    writes: dict[Hashable, tuple[int, int]],
    block_ranges: dict[Hashable, tuple[int, int]],
    block_size: int,
) -> AcquirePlan:
    """Check an acquire's arguments (ValueError naming the bad one) and work out its plan."""
    if len(set(seq_ids)) != len(seq_ids):
        raise ValueError("acquire: a sequence is listed twice")
    for s in list(writes) + list(block_ranges):
        if s not in seq_ids:
            raise ValueError(f"acquire: sequence {s!r} is named in writes/block_ranges but not acquired")
    bs = block_size
    spans = []
    write_spans: dict[Hashable, tuple[int, int]] = {}
    for seq_id, seq in zip(seq_ids, seqs):
        first, stop = block_ranges.get(seq_id, (0, len(seq.blocks)))
        if not 0 <= first <= stop <= len(seq.blocks):
            raise ValueError(
                f"acquire: block range [{first}, {stop}) outside sequence {seq_id!r}'s {len(seq.blocks)} blocks"
            )
        spans.append((first, stop))
        if seq_id in writes:
            lo, hi = writes[seq_id]
            if not 0 <= lo <= hi <= seq.num_tokens:
                raise ValueError(f"acquire: write [{lo}, {hi}) outside sequence {seq_id!r}'s {seq.num_tokens} tokens")
            wlo, whi = lo // bs, -(-hi // bs)
            if hi > lo and not (first <= wlo and whi <= stop):
                raise ValueError(
                    f"acquire: write [{lo}, {hi}) of {seq_id!r} falls outside its acquired blocks [{first}, {stop})"
                )
            if hi > lo:
                write_spans[seq_id] = (wlo, whi)
    cow = _cow_plan(seq_ids, seqs, write_spans)
    # One pass over the step's blocks where possible: this runs every step over every running block.
    needed: dict[int, Block] = {}
    for seq, (first, stop) in zip(seqs, spans):
        for b in seq.blocks[first:stop]:
            needed[b.block_id] = b
    if cow:
        after_refs: dict[int, int] = {}
        for seq, (first, stop) in zip(seqs, spans):
            for b in seq.blocks[first:stop]:
                after_refs[b.block_id] = after_refs.get(b.block_id, 0) + 1
        for _, _, old in cow:
            after_refs[old.block_id] -= 1
        still_used = {bid for bid, n in after_refs.items() if n > 0}
        on_gpu_after = len(still_used) + len(cow)
    else:
        still_used = set(needed)
        on_gpu_after = len(needed)
    return AcquirePlan(spans, write_spans, cow, needed, on_gpu_after, still_used)


def _cow_plan(seq_ids, seqs, write_spans) -> list[tuple[int, int, Block]]:
    """(sequence index, block index, shared block) for each private copy this step's writes need.

    Writers take copies in order; the last holder of a shared block keeps the original."""
    plan = []
    remaining: dict[int, int] = {}
    for i, (seq_id, seq) in enumerate(zip(seq_ids, seqs)):
        if seq_id not in write_spans:
            continue
        wlo, whi = write_spans[seq_id]
        for j in range(wlo, whi):
            block = seq.blocks[j]
            left = remaining.get(block.block_id, block.ref_count)
            if left > 1:
                plan.append((i, j, block))
            remaining[block.block_id] = left - 1
    return plan

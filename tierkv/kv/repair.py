"""Putting the page manager's bookkeeping right after a step failed half-way (an exception, or Ctrl-C at any line).

The page manager's authoritative state is each block's residence (tier, slot, whether it holds data, its key) and
each sequence's block table. Everything else is derived from it: reference counts, pins, the tiers' eviction
policies, the cached-block counts, the prefix index, the spare-copy lists and the free slot lists. A step that
fails half-way can leave the derived state half-updated (a slot taken and not yet given to a block, a block taken
out of its policy on its way between two tiers, pins without their release). `repair` waits for every transfer,
then rebuilds the derived state from the authoritative one.

A block whose transfer failed (an I/O error: the bytes never landed) is dropped; the sequences that held it, and
those whose tables no longer make sense, are returned so that the engine aborts their requests.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable

from tierkv.handles import DONE, Handle
from tierkv.kv.block import CPU, GPU, NVME
from tierkv.policies.registry import make_eviction_policy


def _failed(handle: Handle) -> bool:
    """True if the work behind `handle` raised (every transfer has finished by now: this does not block)."""
    if handle is DONE:
        return False
    try:
        handle.wait()
    except Exception:  # noqa: BLE001 - any failure of the transfer means its destination bytes are not there
        return True
    return False


def repair(pm, drop: Iterable[Hashable]) -> set[Hashable]:
    """Free the sequences `drop` and rebuild `pm`'s derived state; returns the other sequences that lost KV
    (a block of theirs failed to land, or their table is inconsistent), already freed too."""
    pm.mover.synchronize()  # nothing is in flight from here on: every handle is settled
    ledger, spares = pm.ledger, pm.spares
    for seq_id in drop:
        ledger.sequences.pop(seq_id, None)
    blocks = ledger.blocks

    # Transfers that failed: the destination holds no valid bytes. Spare copies whose write failed are dropped.
    lost_blocks = set()
    for bid, block in blocks.items():
        if _failed(block.ready):
            lost_blocks.add(bid)
        host, disk = block.host_copy, block.disk_copy
        if host is not None and (_failed(host.ready) or block.tier != GPU or not block.has_data):
            block.host_copy = None
        if disk is not None and (_failed(disk.ready) or block.key is None or block.tier == NVME):
            block.disk_copy = None
        for copy in (block.host_copy, block.disk_copy):
            if copy is not None:
                copy.ready = copy.busy = DONE
        block.ready = block.readers = DONE
    # Two blocks claiming one slot cannot both be right: neither is trusted.
    owners: dict[tuple[int, int], int] = {}
    for bid, block in blocks.items():
        for where in (
            [(block.tier, block.slot)]
            + ([(CPU, block.host_copy.slot)] if block.host_copy is not None else [])
            + ([(NVME, block.disk_copy.slot)] if block.disk_copy is not None else [])
        ):
            other = owners.setdefault(where, bid)
            if other != bid:
                lost_blocks.update((bid, other))

    # Sequences: every block in its table must exist and be intact, and the table must fit its length.
    lost = set()
    for seq_id, seq in ledger.sequences.items():
        seq.pinned = []
        intact = all(blocks.get(b.block_id) is b and b.block_id not in lost_blocks for b in seq.blocks)
        if not intact or len(seq.blocks) != pm.layout.num_blocks_for(seq.num_tokens):
            lost.add(seq_id)
    for seq_id in lost:
        del ledger.sequences[seq_id]
    for bid in lost_blocks:
        blocks.pop(bid, None)

    # Reference counts from the tables; pins are all released (no step is in progress).
    refs: dict[int, int] = {}
    for seq in ledger.sequences.values():
        for b in seq.blocks:
            refs[b.block_id] = refs.get(b.block_id, 0) + 1
    for bid, block in blocks.items():
        block.ref_count = refs.get(bid, 0)
        block.pins = 0
    ledger.pinned_blocks = 0
    pm.reset_step_state()

    # The prefix index: one block per key, the one it named where that block is still right. A key without its
    # tokens (cut off inside register) or on a block never written vouches for nothing.
    for block in blocks.values():
        if block.key is not None and (block.token_ids is None or not block.has_data):
            block.key = block.token_ids = None
    index = {key: b for key, b in pm.index.items() if blocks.get(b.block_id) is b and b.key == key}
    for block in blocks.values():
        if block.key is not None and index.setdefault(block.key, block) is not block:
            block.key = block.token_ids = None
    pm.index.replace(index)
    for bid in [bid for bid, b in blocks.items() if b.ref_count == 0 and b.key is None]:
        del blocks[bid]  # held by no sequence and not a cached prefix block: it was on its way to being freed
    for block in blocks.values():
        if block.key is None:
            block.disk_copy = None
    spares.write_queue = [b for b in spares.write_queue if blocks.get(b.block_id) is b and b.key is not None]

    # Spare copies, cached counts, policies (rebuilt whole: one may have been cut off inside an update), slots.
    spares.host = {bid: b for bid, b in spares.host.items() if blocks.get(bid) is b and b.host_copy is not None}
    spares.host.update((bid, b) for bid, b in blocks.items() if b.host_copy is not None)
    spares.disk = {bid: b for bid, b in spares.disk.items() if blocks.get(bid) is b and b.disk_copy is not None}
    spares.disk.update((bid, b) for bid, b in blocks.items() if b.disk_copy is not None)
    for kind in ledger.kinds:
        here = [bid for bid, b in blocks.items() if b.tier == kind]
        ledger.cached[kind] = sum(1 for bid in here if blocks[bid].ref_count == 0)
        policy = make_eviction_policy(ledger.eviction)
        wanted = set(here)
        try:
            order = [bid for bid in ledger.policies[kind] if bid in wanted]
        except Exception:  # noqa: BLE001 - a policy cut off mid-update may not even iterate: any order will do
            order = []
        for bid in dict.fromkeys(order + here):
            policy.insert(bid)
        ledger.policies[kind] = policy
        used = {blocks[bid].slot for bid in here}
        used |= {b.host_copy.slot for b in spares.host.values()} if kind == CPU else set()
        used |= {b.disk_copy.slot for b in spares.disk.values()} if kind == NVME else set()
        pm.tiers[kind].slots.reset(used)

    # A promotion into the GPU's reserve slots is followed by as many victims going down: cut off in between, the
    # GPU tier holds more than its size. The victims go down now, into the room the promoted blocks left below.
    over = ledger.resident(GPU) - pm.tiers[GPU].num_blocks
    if over > 0:
        victims = [blocks[v] for v in ledger.policies[GPU].pop_victims(over, lambda bid: True)]
        victims.sort(key=lambda b: b.ref_count == 0)  # blocks in use first: cached ones may be dropped instead
        stayed = pm.placement.place_below(victims, ledger.kinds[1], set(), allow_reserved=True)
        pm.mover.synchronize()
        if stayed:
            raise AssertionError(
                "tierkv bug: the GPU tier is over its size after a failed step and nothing below has room"
            )
    return lost

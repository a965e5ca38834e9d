"""Test and benchmark helpers for the page manager: its invariant checker and host-side byte access.

The engine writes KV from its kernels into the slots `acquire` returns; these write and read it from the host, so
that tests can check what every tier holds without a model."""

from __future__ import annotations

from collections.abc import Hashable

import torch

from tierkv.kv.block import CPU, GPU, NVME, TIER_NAMES, Block
from tierkv.kv.manager import PageManager
from tierkv.kv.tiers import NvmeTier


def write_tokens(pm: PageManager, seq_id: Hashable, start: int, kv: torch.Tensor) -> None:
    """Write KV for token positions [start, start + n) of the sequence; `kv` has shape (L, 2, n, H, D). Positions
    must already exist (`append_tokens`). Goes through acquire/release, as a step would."""
    seq = pm.ledger.seq(seq_id)
    layout = pm.layout
    n = kv.shape[2]
    expect = (layout.num_layers, 2, n, layout.num_kv_heads, layout.head_dim)
    if tuple(kv.shape) != expect:
        raise ValueError(f"write_tokens: kv has shape {tuple(kv.shape)}, expected {expect}")
    if start < 0 or start + n > seq.num_tokens:
        raise ValueError(
            f"write_tokens: positions [{start}, {start + n}) outside the sequence's {seq.num_tokens} tokens"
        )
    if n == 0:
        return
    bs = layout.block_size
    # Check the copy-on-write room for the whole range first, so a failure leaves nothing half-written.
    shared = sum(1 for b in seq.blocks[start // bs : -(-(start + n) // bs)] if b.ref_count > 1)
    pm.placement.check_room(shared, f"copy-on-write for writing sequence {seq_id!r}")
    chunk_blocks = max(1, pm.tiers[GPU].num_blocks - pm.ledger.pinned_blocks)  # longer ranges go in pieces
    pos = start
    while pos < start + n:
        first = pos // bs
        end = min(start + n, (first + chunk_blocks) * bs)
        stop = -(-end // bs)
        table = pm.acquire([seq_id], writes={seq_id: (pos, end)}, block_ranges={seq_id: (first, stop)})[0]
        try:
            tokens = torch.arange(pos, end)
            slots = torch.tensor(table, dtype=torch.int64)[tokens // bs - first]
            pool = pm.tiers[GPU].pool
            values = kv[:, :, pos - start : end - start].to(device=pool.device, dtype=pool.dtype, non_blocking=True)
            pool[slots.to(pool.device), :, :, (tokens % bs).to(pool.device)] = values.permute(2, 0, 1, 3, 4)
        finally:
            pm.release([seq_id])
        pos = end


def read_block(pm: PageManager, block: Block) -> torch.Tensor:
    """A CPU copy of the block's bytes, from whichever tier holds it (waits for moves in flight)."""
    block.ready.wait()
    tier = pm.tiers[block.tier]
    if isinstance(tier, NvmeTier):
        out = torch.empty((1, *tier.layout.block_shape), dtype=tier.layout.storage_dtype)
        tier.store.read([block.slot], out, [0])
        return out[0]
    if tier.is_cuda:
        torch.cuda.current_stream(pm.device).synchronize()
    return tier.pool[block.slot].to("cpu", copy=True)


def read_tokens(pm: PageManager, seq_id: Hashable, start: int = 0, end: int | None = None) -> torch.Tensor:
    """A CPU copy of the KV of token positions [start, end), shape (L, 2, n, H, D), without moving blocks."""
    seq = pm.ledger.seq(seq_id)
    layout = pm.layout
    end = seq.num_tokens if end is None else end
    if not 0 <= start <= end <= seq.num_tokens:
        raise ValueError(f"read_tokens: [{start}, {end}) is outside the sequence's {seq.num_tokens} tokens")
    bs = layout.block_size
    parts = []
    for i in range(start // bs, -(-end // bs)):
        data = read_block(pm, seq.blocks[i])
        lo = max(start, i * bs) - i * bs
        hi = min(end, (i + 1) * bs) - i * bs
        parts.append(data[:, :, lo:hi])
    if not parts:
        return torch.empty((layout.num_layers, 2, 0, layout.num_kv_heads, layout.head_dim), dtype=layout.dtype)
    return torch.cat(parts, dim=2)


def check_invariants(pm: PageManager) -> None:
    """Raise AssertionError if the page manager's bookkeeping is inconsistent (O(blocks))."""
    ledger, spares = pm.ledger, pm.spares
    blocks = ledger.blocks
    refs: dict[int, int] = {}
    for seq in ledger.sequences.values():
        assert len(seq.blocks) == pm.layout.num_blocks_for(seq.num_tokens), "table length != tokens"
        for b in seq.blocks:
            refs[b.block_id] = refs.get(b.block_id, 0) + 1
    live = {bid for bid, b in blocks.items() if b.ref_count > 0}
    assert set(refs) == live, "blocks in use != blocks referenced by tables"
    for bid, block in blocks.items():
        assert block.ref_count == refs.get(bid, 0), (
            f"block {bid}: ref_count {block.ref_count} != {refs.get(bid, 0)} references"
        )
        assert bid in ledger.policies[block.tier], f"block {bid} not tracked by its tier's policy"
        if block.ref_count == 0:
            assert block.key is not None and pm.index.get(block.key) is block, f"unheld block {bid} is not cached"
        if block.key is not None:
            assert pm.index.get(block.key) is block, f"block {bid}'s key is not indexed to it"
            assert block.token_ids is not None and block.has_data, f"keyed block {bid} has no tokens or no data"
    for key, block in pm.index.items():
        assert block.key == key and blocks.get(block.block_id) is block, "the index names a block that is gone"
    for kind in pm.kinds:
        held = sum(1 for b in blocks.values() if b.tier == kind and b.ref_count == 0)
        assert ledger.cached[kind] == held, f"{TIER_NAMES[kind]}: cached count {ledger.cached[kind]} != {held}"
    pins: dict[int, int] = {}
    for seq in ledger.sequences.values():
        for pinned in seq.pinned:
            for b in pinned:
                pins[b.block_id] = pins.get(b.block_id, 0) + 1
    for bid, block in blocks.items():
        assert block.pins == pins.get(bid, 0), f"block {bid}: pins {block.pins} != {pins.get(bid, 0)}"
    assert ledger.pinned_blocks == len(pins), f"pinned-block count {ledger.pinned_blocks} != {len(pins)}"
    disk = [b.disk_copy.slot for b in blocks.values() if b.disk_copy is not None]
    assert len(disk) == len(spares.disk) and all(b.disk_copy is not None for b in spares.disk.values()), (
        "write-through copies are off"
    )
    for b in blocks.values():
        if b.disk_copy is not None:
            assert b.key is not None and b.tier != NVME, f"block {b.block_id} has a disk copy but is unkeyed or on NVMe"
    host = [b.host_copy.slot for b in blocks.values() if b.host_copy is not None]
    assert len(host) == len(spares.host) and all(b.host_copy is not None for b in spares.host.values()), (
        "host copies are off"
    )
    for b in blocks.values():
        if b.host_copy is not None:
            assert b.tier == GPU and b.has_data, f"block {b.block_id} has a host copy but is not a GPU block with data"
    for kind, tier in pm.tiers.items():
        spare = disk if kind == NVME else host if kind == CPU else []
        used = [b.slot for b in blocks.values() if b.tier == kind] + spare
        assert len(used) == len(set(used)), f"{tier.name}: two blocks (or copies) share a slot"
        resident = len(used) - len(spare)
        assert resident == ledger.resident(kind), f"{tier.name}: policy tracks {ledger.resident(kind)}, {resident} live"
        assert len(used) <= tier.num_blocks, f"{tier.name}: {len(used)} blocks and copies > capacity {tier.num_blocks}"
        free = tier.slots.free_slots()
        assert len(free) == len(tier.slots), f"{tier.name}: a slot is free twice"
        assert not (free & set(used)), f"{tier.name}: a used slot is also free"
        assert len(free) + len(used) == tier.num_slots, f"{tier.name}: slots leaked"
        live_here = sum(1 for b in blocks.values() if b.tier == kind and b.ref_count > 0)
        assert pm.free_blocks(kind) == tier.num_blocks - live_here, (
            f"{tier.name}: free_blocks {pm.free_blocks(kind)} != {tier.num_blocks} - {live_here} in use"
        )

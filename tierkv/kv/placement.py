"""Placement: where blocks go when a tier is full. Make room, demote (GPU -> CPU -> NVMe), promote, copy-on-write,
drop, write-through; every byte move it decides is a `Transfer`, handed to `run` (the mover) in the order
decided, and the handle it returns is recorded on the blocks and slots involved.

Room in a tier is its open slots (no block and no spare copy in them) plus its cached blocks and spares, which
give way when room is needed: spares first (dropped), then victims in the tier's eviction order, demoted one tier
down (pushing that tier's victims further down first). Cached blocks that find no room anywhere are dropped;
blocks in use never are.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Collection, Sequence

from tierkv.errors import CapacityError, CorruptBlockError
from tierkv.handles import DONE, Handle, all_of, settled
from tierkv.kv.block import CPU, GPU, NVME, TIER_NAMES, Block, SequenceTable
from tierkv.kv.ledger import BlockLedger
from tierkv.kv.prefix_index import PrefixIndex
from tierkv.kv.spares import SpareCopies
from tierkv.kv.transfer import Transfer


def _block_id(block: Block) -> int:
    return block.block_id


class Placement:
    """The moves between tiers of the blocks in `ledger`. `tiers[kind]` gives each tier's `num_blocks` and `slots`;
    `run(transfer)` starts a transfer and returns its handle; `compute_marker()` is a handle for the compute work
    queued so far (which may still read GPU slots); `counters[kind]` count what happened per tier."""

    # A promotion into a full GPU tier (a swap: victims out, then the blocks in, into the slots they vacate) can go
    # in up to `swap_chunks` chunks of at least `swap_chunk_blocks` blocks: each chunk's blocks come in as soon as
    # its own victims are out, while the next chunk's victims go out, so the two directions overlap on the link.
    # One chunk by default: the copy in goes layer group by layer group, and a step waits for each layer's group
    # just before the layer; chunks would queue every chunk's groups behind the whole of the chunks before it, so
    # that the step's first layer waited for most of the swap (H100, item 4 of benchmarks/fast_path.sh, staggered
    # turns: median decode step 8.1 ms in one chunk against 9.0-9.1 ms in four; BENCHMARKS.md).
    swap_chunks = 1
    swap_chunk_blocks = 32
    # A block promoted from the CPU tier keeps its CPU slot as a host copy until it is written or the room is
    # wanted (see tierkv.kv.spares).
    keep_host_copies = True

    def __init__(
        self,
        ledger: BlockLedger,
        index: PrefixIndex,
        spares: SpareCopies,
        tiers: dict,
        run: Callable[[Transfer], Handle],
        compute_marker: Callable[[], Handle],
        counters: dict,
        block_size: int,
        write_through: bool,
    ) -> None:
        self.ledger, self.index, self.spares, self.tiers = ledger, index, spares, tiers
        # The ids of cached blocks that requests waiting to start will reuse (the engine's; see `pop_victims`).
        self.wanted_soon: Callable[[], Collection[int]] = lambda: ()
        self.run, self.compute_marker, self.counters = run, compute_marker, counters
        self.block_size = block_size
        self.write_through = write_through
        self.kinds = ledger.kinds
        self.cow_copies = 0
        self.dropped_cached = 0
        self.superseded = 0  # cached blocks dropped because their key moved to a new copy in a faster tier
        # Attention that streams host-tier blocks reads them on the device: host writes into those CPU slots (reads
        # from NVMe) must wait for it. The step's reads are noted as they are planned; at its release one marker
        # for all of them is taken (cheaper than one per block).
        self.host_reads_pending = False
        self.host_read_marker: Handle = DONE

    def note_host_reads(self) -> None:
        """The step in progress reads host-tier blocks on the device (streamed attention)."""
        self.host_reads_pending = True

    def end_host_reads(self) -> None:
        """The step's work is queued: host writes into CPU slots from now on wait for its device reads."""
        if self.host_reads_pending:
            self.host_reads_pending = False
            self.host_read_marker = self.compute_marker()

    # -- room ----------------------------------------------------------------------------------------------
    def open_slots(self, kind: int) -> int:
        """Slots of tier `kind` that no block (or spare copy) occupies (beyond the GPU's reserve)."""
        return max(0, self.tiers[kind].num_blocks - self.ledger.resident(kind) - self.spares.count(kind))

    def free_blocks(self, kind: int | None = None) -> int:
        """Blocks that can still be created in tier `kind` (or in all tiers): open slots plus cached blocks and
        spare copies, which give way when room is needed."""
        if kind is None:
            return sum(self.free_blocks(k) for k in self.kinds)
        return self.open_slots(kind) + self.ledger.cached[kind] + self.spares.count(kind)

    def check_room(self, new_blocks: int, what: str) -> None:
        """CapacityError naming `what` if `new_blocks` more blocks do not fit the tiers together."""
        free = self.free_blocks()
        if new_blocks > free:
            detail = ", ".join(
                f"{TIER_NAMES[k]} {self.free_blocks(k)} of {self.tiers[k].num_blocks}" for k in self.kinds
            )
            raise CapacityError(
                f"{what} needs {new_blocks} new KV blocks ({self.block_size} tokens each) but only {free} are "
                f"free across all tiers (free: {detail}); free finished sequences or give the tiers more capacity"
            )

    def new_block(self, seq: SequenceTable) -> Block:
        """An empty block at the end of `seq`, in the fastest tier with room (room checked by the caller)."""
        kind = next((k for k in self.kinds if self.open_slots(k) > 0), None)
        if kind is None:  # a spare copy is the cheapest room to give up: host copies first, then write-through
            kind = next((k for k in (CPU, NVME) if self.spares.count(k)), None)
            if kind is not None:
                self.spares.drop_oldest(kind, 1, lambda: self.open_slots(kind))
        if kind is None:
            kind = self.drop_cached(1)
        slot, busy = self.tiers[kind].slots.take()
        block = self.ledger.new_block(kind, slot, ready=busy)
        seq.blocks.append(block)
        return block

    # -- dropping ------------------------------------------------------------------------------------------
    def drop(self, block: Block, marker: Handle | None = None) -> None:
        """Forget a block no sequence holds; its slot is free once the work touching it is done."""
        if marker is None:
            marker = self.compute_marker() if block.tier == GPU else DONE
        self.spares.drop(block)
        self.index.remove(block)
        busy = [block.ready, block.readers] + ([marker] if block.tier == GPU else [])
        self.ledger.forget(block)
        self.tiers[block.tier].slots.give(block.slot, all_of(busy))

    def drop_cached(self, n: int, protect: frozenset = frozenset()) -> int | None:
        """Drop up to `n` cached blocks, deepest tier first, in each tier's eviction order; returns the last
        tier that gained a slot (None if none did)."""
        where = None
        blocks = self.ledger.blocks
        for kind in reversed(self.kinds):
            if n <= 0:
                break
            if not self.ledger.cached[kind]:
                continue
            victims = self.pop_victims(
                kind, n, lambda bid: blocks[bid].ref_count == 0 and blocks[bid].pins == 0 and bid not in protect
            )
            for bid in victims:
                self._discard(blocks[bid])
            n -= len(victims)
            if victims:
                where = kind
        return where

    def pop_victims(self, kind: int, n: int, evictable: Callable[[int], bool]) -> list[int]:
        """Up to `n` evictable blocks of tier `kind`, taken out of its policy in its eviction order. Where requests
        waiting to start will reuse some cached blocks (`wanted_soon`), the cached blocks they will not reuse go
        first, then the eviction order as usual. Prompts re-read in a cycle are why: LRU alone evicts each prefix
        just before its request comes back for it, while the blocks of requests just finished, which nothing queued
        needs, stay. (Blocks in use are not put before the wanted ones: evicting them means a swap back.)"""
        policy = self.ledger.policies[kind]
        wanted = self.wanted_soon() if self.ledger.cached[kind] else ()
        if not wanted:
            return policy.pop_victims(n, evictable)
        blocks = self.ledger.blocks
        victims = policy.pop_victims(n, lambda bid: bid not in wanted and blocks[bid].ref_count == 0 and evictable(bid))
        if len(victims) < n:
            victims += policy.pop_victims(n - len(victims), evictable)
        return victims

    def _discard(self, block: Block) -> None:
        """Drop a cached block already taken out of its policy."""
        self.ledger.policies[block.tier].insert(block.block_id)  # drop() takes it out again
        self.drop(block)
        self.dropped_cached += 1

    # -- demoting ------------------------------------------------------------------------------------------
    def make_room(self, kind: int, n: int, protect: set[int], allow_reserved: bool) -> int:
        """Try to have `n` open slots in tier `kind` by demoting its victims (cached blocks that find no room
        below are dropped); returns how many are open (<= n)."""
        self.spares.drop_oldest(kind, n, lambda: self.open_slots(kind))
        free = self.open_slots(kind)
        if free >= n:
            return n
        below = [k for k in self.kinds if k > kind]
        room_below = sum(self.free_blocks(k) for k in below)
        policy = self.ledger.policies[kind]
        blocks = self.ledger.blocks
        evictable = self.ledger.evictable(protect, allow_reserved)
        victims = [blocks[v] for v in self.pop_victims(kind, n - free, evictable)]
        live = [b for b in victims if b.ref_count > 0]
        cached = [b for b in victims if b.ref_count == 0]
        if len(live) > room_below:  # only cached blocks may leave without a place to go: take more of those
            excess = live[room_below:]
            policy.restore([b.block_id for b in excess])
            live = live[:room_below]
            more = self.pop_victims(kind, len(excess), lambda bid: blocks[bid].ref_count == 0 and evictable(bid))
            cached += [blocks[v] for v in more]
        stayed = []
        if below:
            stayed = self.place_below(live + cached, below[0], protect, allow_reserved)
        else:
            for block in cached:
                self._discard(block)
        return free + len(live) + len(cached) - len(stayed)

    def place_below(self, blocks: list[Block], start: int, protect: set[int], allow_reserved: bool) -> list[Block]:
        """Demote `blocks` (already out of their policies; those in use first) into tier `start`, or the tiers
        below it where it is full. Cached blocks that find no room anywhere are dropped; blocks in use that find
        none stay where they are, back in their policies, and are returned."""
        remaining = blocks
        if start <= CPU and self.spares.host:  # those with a host copy go back onto it, taking no room
            onto = [b for b in blocks if b.host_copy is not None]
            if onto:
                remaining = [b for b in blocks if b.host_copy is None]
                self._demote_onto_copies(onto)
        for kind in (k for k in self.kinds if k >= start):
            if not remaining:
                break
            if kind == NVME:
                for block in remaining:
                    self.spares.drop_disk(block)  # written down whole now: its older copy goes
            got = self.make_room(kind, len(remaining), protect, allow_reserved)
            batch, remaining = remaining[:got], remaining[got:]
            for block in batch:
                self.counters[block.tier].evictions_out += 1
            self.counters[kind].evictions_in += len(batch)
            self.move(batch, kind)
        stayed = []
        for block in remaining:
            if block.ref_count > 0:
                self.ledger.policies[block.tier].restore([block.block_id])
                stayed.append(block)
            else:
                self._discard(block)
        return stayed

    def _demote_onto_copies(self, blocks: list[Block]) -> None:
        """GPU blocks (out of their policy) whose bytes are still in their host-copy slot: they live there again,
        no byte copied; each GPU slot is free once the work already queued on the device has stopped reading it."""
        marker = self.compute_marker()
        gpu = self.tiers[GPU]
        for block in blocks:
            gpu.slots.give(block.slot, all_of([marker, block.ready, block.readers]))
            copy = self.spares.take_host(block)
            block.ready, block.readers = copy.ready, copy.busy
            self.ledger.land(block, CPU, copy.slot)
        self.counters[GPU].evictions_out += len(blocks)
        self.counters[CPU].evictions_in += len(blocks)
        self.counters[CPU].onto_copies += len(blocks)

    def demote_all(self, blocks: list[Block], target: int) -> None:
        """Demote `blocks` (unpinned; still in their policies) to tier `target` or below, as room allows."""
        for block in blocks:
            self.ledger.policies[block.tier].remove(block.block_id)
        self.place_below(blocks, target, protect=set(), allow_reserved=True)

    # -- promoting -----------------------------------------------------------------------------------------
    def promote(self, blocks: list[Block], protect: set[int], allow_reserved: bool, best_effort: bool = False) -> int:
        """Bring `blocks` to the GPU in as few batches as room allows; returns how many were started.

        With free GPU slots, blocks land there. With none, victims are demoted first where the tier below the
        GPU has room (chunk by chunk, see `swap_chunks`); where it is full, a batch first lands in the GPU's
        reserve slots and as many victims then follow into the slots the batch vacated (so the demotion cascade
        stays LRU-ordered and no transfer waits on one queued after it).
        """
        todo = [b for b in blocks if b.tier != GPU]
        gpu = self.tiers[GPU]
        policies = self.ledger.policies
        started = 0
        chunk = max(self.swap_chunk_blocks, -(-len(todo) // self.swap_chunks))
        while todo:
            free = self.open_slots(GPU)
            if free == 0 and self.free_blocks(self.kinds[1]) > 0:
                free = self.make_room(GPU, min(len(todo), chunk), protect, allow_reserved)
            if free:
                batch = todo[:free]
            else:
                reserve = len(gpu.slots)  # no usable slot is free, so every free slot is a reserve slot
                evictable = self.ledger.evictable(protect, allow_reserved)
                candidates = sum(1 for bid in policies[GPU] if evictable(bid))
                size = min(len(todo), reserve, candidates)
                if size == 0:
                    if best_effort:
                        break
                    raise AssertionError("tierkv bug: no GPU room for a promotion that passed the capacity check")
                batch = todo[:size]
            for block in batch:
                policies[block.tier].remove(block.block_id)
            self.move(batch, GPU)
            started += len(batch)
            todo = todo[len(batch) :]
            over = self.ledger.resident(GPU) - gpu.num_blocks
            if over > 0:
                blocks_by_id = self.ledger.blocks
                evictable = self.ledger.evictable(protect, allow_reserved)
                victims = [blocks_by_id[v] for v in self.pop_victims(GPU, over, evictable)]
                stayed = self.place_below(
                    [b for b in victims if b.ref_count] + [b for b in victims if not b.ref_count],
                    self.kinds[1],
                    protect,
                    allow_reserved,
                )
                if stayed or len(victims) < over:  # the batch vacated at least as many slots below: cannot happen
                    raise AssertionError("tierkv bug: victims of a reserve-slot promotion found no room below")
        return started

    def copy_on_write(self, seqs: list[SequenceTable], plan: list[tuple[int, int, Block]], protect: set[int]) -> None:
        """Give the planned sequences private GPU copies of shared blocks: one transfer per source tier."""
        room = self.make_room(GPU, len(plan), protect, allow_reserved=True)
        if room < len(plan):
            raise AssertionError("tierkv bug: copy-on-write found no GPU room after the capacity check")
        by_tier: dict[int, list[tuple[Block, Block]]] = {}
        for i, j, old in plan:
            slot, busy = self.tiers[GPU].slots.take()
            new = self.ledger.new_block(GPU, slot, ready=busy, has_data=old.has_data)
            seqs[i].blocks[j] = new
            self.ledger.note_peak()
            self.ledger.let_go(old)  # (still held by the sequences that keep it: copy-on-write copies shared ones)
            if old.has_data:
                by_tier.setdefault(old.tier, []).append((old, new))
        for kind, pairs in by_tier.items():
            after = [b.ready for pair in pairs for b in pair]
            if kind == GPU:
                after.append(self.compute_marker())
            handle = self.run(Transfer(kind, [o.slot for o, _ in pairs], GPU, [n.slot for _, n in pairs], after))
            for old, new in pairs:
                new.ready = handle
                old.readers = all_of([old.readers, settled(handle)])
        self.cow_copies += len(plan)

    # -- moving --------------------------------------------------------------------------------------------
    def move(self, blocks: list[Block], dst_kind: int) -> None:
        """Move `blocks` (already out of their source policies) into tier `dst_kind`: one transfer per source tier."""
        if not blocks:
            return
        dst = self.tiers[dst_kind]
        by_src: dict[int, list[Block]] = {}
        # Oldest block first (ids count up as sequences grow, so a sequence's blocks in logical order), onto slots
        # handed out in ascending order: a sequence demoted tail first (the GPU's eviction order) still lands in runs
        # of consecutive slots, which a streamed decode moves up on the copy engines in one piece per run.
        for block in sorted(blocks, key=_block_id):
            by_src.setdefault(block.tier, []).append(block)
            self.spares.drop_host(block)  # leaving the GPU other than onto it (to NVMe), the copy is no use
        for src_kind, group in by_src.items():
            src = self.tiers[src_kind]
            taken = dst.slots.take_many(len(group))
            moving = [(b, t) for b, t in zip(group, taken) if b.has_data]
            after = [b.ready for b, _ in moving] + [busy for _, (_, busy) in moving]
            if src_kind == GPU and moving:
                after.append(self.compute_marker())
            elif src_kind == NVME and dst_kind == CPU:
                after.append(self.host_read_marker)  # host writes into slots that streamed attention may still read
            keyed = dst_kind == NVME and any(b.key for b, _ in moving)
            transfer = Transfer(
                src_kind,
                [b.slot for b, _ in moving],
                dst_kind,
                [s for _, (s, _) in moving],
                after,
                keys=[b.key for b, _ in moving] if keyed else None,
                token_ids=[b.token_ids for b, _ in moving] if keyed else None,
            )
            try:
                handle = self.run(transfer)
            except BaseException:
                for slot, busy in taken:
                    dst.slots.give(slot, busy)
                for block in group:
                    self.ledger.policies[block.tier].insert(block.block_id)
                raise
            self.counters[src_kind].blocks_out += len(moving)
            self.counters[dst_kind].blocks_in += len(moving)
            keep_disk = src_kind == NVME and self.write_through
            keep_host = src_kind == CPU and dst_kind == GPU and self.keep_host_copies
            for block, (slot, busy) in zip(group, taken):
                if keep_host and block.has_data:
                    # The bytes stay in the CPU slot too: the block's host copy until it is written.
                    self.spares.keep_host(block, block.slot, block.ready, all_of([settled(handle), block.readers]))
                elif keep_disk and block.key is not None and block.has_data:
                    # Write-through: the bytes it leaves on disk stay there as its copy (a spare, dropped first).
                    self.spares.keep_disk(block, block.slot, all_of([handle, block.ready]))
                else:
                    # The old slot is free once the transfer has read it (an empty block was never written).
                    src.slots.give(
                        block.slot, all_of([handle, block.ready, block.readers]) if block.has_data else block.ready
                    )
                block.readers = DONE
                block.ready = handle if block.has_data else busy
                self.ledger.land(block, dst_kind, slot)

    def flush_copies(self) -> int:
        """Write-through: write the keyed blocks registered since the last flush to NVMe, one batch per source
        tier, keeping them where they are; returns how many copies were started."""
        blocks = self.ledger.blocks
        queue = list(
            {
                b.block_id: b
                for b in self.spares.take_write_queue()
                if blocks.get(b.block_id) is b
                and b.key is not None
                and b.tier != NVME
                and b.disk_copy is None
                and b.has_data
            }.values()
        )
        if not queue or NVME not in self.tiers:
            return 0
        room = self.make_room(NVME, len(queue), {b.block_id for b in queue}, allow_reserved=True)
        queue = [b for b in queue if blocks.get(b.block_id) is b and b.tier != NVME][:room]
        nvme = self.tiers[NVME]
        by_src: dict[int, list[Block]] = {}
        for block in queue:
            by_src.setdefault(block.tier, []).append(block)
        for kind, group in by_src.items():
            taken = [nvme.slots.take() for _ in group]
            after = [b.ready for b in group] + [busy for _, busy in taken]
            if kind == GPU:
                after.append(self.compute_marker())
            handle = self.run(
                Transfer(
                    kind,
                    [b.slot for b in group],
                    NVME,
                    [s for s, _ in taken],
                    after,
                    keys=[b.key for b in group],
                    token_ids=[b.token_ids for b in group],
                )
            )
            for block, (slot, _) in zip(group, taken):
                self.spares.keep_disk(block, slot, handle)
                block.readers = all_of([block.readers, settled(handle)])
        return len(queue)

    def load_from_disk(self, blocks: Sequence[Block], protect: set[int]) -> int:
        """Bring the NVMe-resident ones of `blocks` up a tier now and check their checksums; a block that fails is
        dropped with a warning. Returns how many of `blocks`, from the first, are good to use."""
        target = CPU if CPU in self.tiers else GPU
        usable = len(blocks)
        protect = protect | {b.block_id for b in blocks}
        pending = [b for b in blocks if b.tier == NVME]
        while pending:
            room = self.make_room(target, len(pending), protect, allow_reserved=True)
            if room <= 0:
                break  # no room above the disk: they are read from it when their sequence runs
            batch, pending = pending[:room], pending[room:]
            old = {b.block_id: b.slot for b in batch}
            for block in batch:
                self.ledger.policies[NVME].remove(block.block_id)
            try:
                self.move(batch, target)  # without CUDA a bad checksum raises here, and nothing moved
                all_of(b.ready for b in batch).wait()  # with CUDA it raises here, after the batch moved
            except CorruptBlockError as exc:
                bad = [b for b in batch if old[b.block_id] in set(exc.slots)]
                warnings.warn(
                    f"prefix cache: {len(bad)} block(s) in the NVMe tier failed their checksum; dropped, to be "
                    "recomputed",
                    RuntimeWarning,
                    stacklevel=3,
                )
                usable = min([usable] + [blocks.index(b) for b in bad])
                for block in batch:
                    if block.tier != NVME:
                        block.ready = DONE  # the batch moved: the good blocks' bytes are there
                for block in bad:
                    if block.ref_count == 0:
                        self.drop(block)
                    else:
                        self.unkey(block)  # a running sequence holds it: it fails loudly when it reads it
                if batch[0].tier == NVME:  # nothing moved: try the good ones again
                    pending = [b for b in batch if b not in bad] + pending
        return usable

    def unkey(self, block: Block) -> None:
        """The block is about to be written: its bytes will no longer be what its key says."""
        if block.key is not None:
            self.spares.drop_disk(block)
            self.index.forget_key(block)

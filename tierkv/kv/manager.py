"""The page manager: which KV block lives in which tier, block tables per sequence, and the step protocol.

Life of a block: it is created by `append_tokens` in the fastest tier with free room (empty: it holds no bytes
yet, so moving it costs nothing); `acquire` brings every block of the sequences of a step to the GPU (copying a
block shared with another sequence before it is written: copy-on-write), pins them, and makes the compute stream
wait until they have landed; `release` unpins; when a tier is full its eviction policy picks unpinned victims,
which are demoted one tier down (GPU -> CPU -> NVMe). A block has one residence at a time; while a transfer into
it is in flight its `ready` handle says when the bytes are there, and the slot it left stays busy until the
transfer has read it. Spare copies (tierkv.kv.spares) count as free room and give it up first.

Block identity is the `Block` object (`block_id`), not its slot. A full block can be given a content key (a hash
chained over the tokens of the prefix, see `tierkv.kv.prefix_cache`): it is then indexed, and when no sequence holds
it any more it stays in its tier as a cached block (ref count 0) that any later sequence with the same prefix can
adopt. Cached blocks are evicted like the others (demoted tier by tier: write-back) and dropped only at the
bottom; capacity counts them as free. Keyed blocks written to the NVMe tier carry their key and tokens in its
index, so a new process on the same directory starts with them.

The state lives in its parts: the ledger (blocks, tables, pins, policies), the prefix index, the spare copies,
placement (the decisions that move blocks), the tiers and the mover (bytes). This class joins them.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from tierkv.config import PageManagerConfig
from tierkv.handles import DONE, LayeredHandle, all_of
from tierkv.kv.block import CPU, GPU, NVME, TIER_NAMES, Block, SequenceTable, lower_tier
from tierkv.kv.ledger import BlockLedger
from tierkv.kv.placement import Placement
from tierkv.kv.prefix_index import PrefixIndex
from tierkv.kv.spares import SpareCopies
from tierkv.kv.stats import TierCounters, build_stats, count_lookups, format_stats
from tierkv.kv.step_plan import plan_acquire
from tierkv.kv.storage import open_tiers
from tierkv.policies.prefetch import NextScheduledPrefetch, PrefetchPolicy


class PageManager:
    """KV blocks of fixed size across GPU, pinned CPU and NVMe tiers, with block tables per sequence."""

    def __init__(self, config: PageManagerConfig, prefetch_policy: PrefetchPolicy | None = None) -> None:
        self.config = config
        self.layout = config.layout
        self.device = config.device
        self.tiers, self.mover = open_tiers(config)
        self.kinds: list[int] = sorted(self.tiers)  # fastest first
        self.ledger = BlockLedger(self.kinds, config.eviction)
        self.index = PrefixIndex()
        self.spares = SpareCopies({k: t.slots for k, t in self.tiers.items()})
        self.counters: dict[int, TierCounters] = {k: TierCounters() for k in self.kinds}
        self.placement = Placement(
            self.ledger,
            self.index,
            self.spares,
            self.tiers,
            self.mover.run,
            self.mover.compute_marker,
            self.counters,
            self.layout.block_size,
            config.write_through,
        )
        self.prefetch_policy = prefetch_policy or NextScheduledPrefetch()
        self._layer_waits: list = []  # see acquire(layered=True)
        self._closed = False
        if NVME in self.tiers and config.adopt_stored:
            self._adopt_stored()

    def _adopt_stored(self) -> None:
        """Index the keyed blocks a previous process left in the NVMe store, as cached blocks."""
        tier = self.tiers[NVME]
        entries = tier.store.keyed_entries()[: tier.num_blocks]
        tier.slots.claim({slot for slot, _, _ in entries})
        for slot, key, tokens in entries:
            self.index.adopt(self.ledger.new_block(NVME, slot, ref_count=0, has_data=True, key=key, token_ids=tokens))

    # -- views of the parts' state -------------------------------------------------------------------------
    @property
    def blocks(self) -> dict[int, Block]:
        return self.ledger.blocks

    @property
    def sequences(self) -> dict[Hashable, SequenceTable]:
        return self.ledger.sequences

    @property
    def policies(self):
        return self.ledger.policies

    @property
    def cached(self) -> dict[int, int]:
        """Keyed blocks no sequence holds, per tier."""
        return self.ledger.cached

    @property
    def step(self) -> int:
        return self.ledger.step

    @property
    def copies(self) -> int:
        """Write-through copies on NVMe of blocks living in faster tiers."""
        return len(self.spares.disk)

    @property
    def host_copies(self) -> int:
        """CPU-tier copies of GPU blocks (see tierkv.kv.spares)."""
        return len(self.spares.host)

    def resident(self, kind: int) -> int:
        """Blocks living in tier `kind` now."""
        return self.ledger.resident(kind)

    def free_blocks(self, kind: int | None = None) -> int:
        """Blocks that can still be created in tier `kind` (or in all tiers), cached blocks and spares included."""
        return self.placement.free_blocks(kind)

    def residence(self, block: Block) -> tuple[str, bool]:
        """(tier name, whether a transfer into it is still in flight)."""
        return TIER_NAMES[block.tier], not block.ready.done()

    # -- sequences -----------------------------------------------------------------------------------------
    def add_sequence(self, seq_id: Hashable) -> None:
        """Start an empty sequence."""
        self.ledger.add_sequence(seq_id)

    def num_tokens(self, seq_id: Hashable) -> int:
        return self.ledger.seq(seq_id).num_tokens

    def block_table(self, seq_id: Hashable) -> list[Block]:
        """The sequence's blocks in logical order (do not mutate)."""
        return self.ledger.seq(seq_id).blocks

    def append_tokens(self, seq_id: Hashable, num_tokens: int) -> None:
        """Grow the sequence by `num_tokens` token positions, creating blocks as needed.

        New blocks are empty and go to the fastest tier with free room; `acquire` brings them to the GPU.
        Raises CapacityError, changing nothing, if the tiers together cannot hold them.
        """
        seq = self.ledger.seq(seq_id)
        if num_tokens < 0:
            raise ValueError(f"append_tokens: num_tokens must be >= 0, got {num_tokens}")
        need = self.layout.num_blocks_for(seq.num_tokens + num_tokens) - len(seq.blocks)
        if need > 0:
            self.placement.check_room(need, f"appending {num_tokens} tokens to sequence {seq_id!r}")
        for _ in range(need):
            self.placement.new_block(seq)
        seq.num_tokens += num_tokens
        self.ledger.note_peak()

    def grow_to(self, seq_id: Hashable, num_tokens: int) -> None:
        """Make the sequence hold at least `num_tokens` token positions (see append_tokens)."""
        grow = num_tokens - self.ledger.seq(seq_id).num_tokens
        if grow > 0:
            self.append_tokens(seq_id, grow)

    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        """New sequence `child_id` sharing every block of `parent_id` (copy-on-write)."""
        self.ledger.fork(parent_id, child_id)

    def unshare(self, seq_id: Hashable) -> None:
        """Give `seq_id` private GPU copies of every block it shares (as if it never shared them): the baseline
        that memory sharing is measured against."""
        seq = self.ledger.seq(seq_id)
        plan = [(0, j, b) for j, b in enumerate(seq.blocks) if b.ref_count > 1]
        self.placement.check_room(len(plan), "private copies of shared blocks")
        if plan:
            self.placement.copy_on_write([seq], plan, {b.block_id for b in seq.blocks})

    def free(self, seq_id: Hashable) -> None:
        """Drop the sequence; blocks no other sequence holds return to their tier's free slots."""
        seq = self.ledger.sequences.pop(seq_id, None)
        if seq is None:
            raise KeyError(f"unknown sequence {seq_id!r}")
        for pinned in seq.pinned:
            self.ledger.unpin(pinned)
        marker = self.mover.compute_marker()  # the last step may still read these blocks on the device
        for block in seq.blocks:
            if self.ledger.let_go(block):
                self.placement.drop(block, marker)

    # -- the prefix cache ----------------------------------------------------------------------------------
    def lookup(self, keys: Sequence[bytes], token_blocks: Sequence[Sequence[int]]) -> list[Block]:
        """The longest run of indexed blocks matching `keys` in order, whose stored tokens match too."""
        return self.index.lookup(keys, token_blocks)

    def promote_cached(self, blocks: Sequence[Block]) -> int:
        """Start bringing found blocks (from `lookup`, no sequence holding them yet) from the CPU tier to the GPU now,
        best effort, in one batch: a long prompt's first blocks start crossing the link while the rest of it is
        still being hashed and looked up. Found blocks on the GPU and the promoted ones are kept there through the
        next step (as prefetched blocks are). Returns how many transfers were started."""
        step = self.step + 1
        todo = [b for b in blocks if b.tier == CPU]
        protect = {b.block_id for b in blocks}
        started = self.placement.promote(todo, protect, allow_reserved=False, best_effort=True) if todo else 0
        for block in blocks:
            if block.tier == GPU:
                block.reserved_step = max(block.reserved_step, step)
        self.counters[GPU].prefetched += started
        return started

    def attach(self, seq_id: Hashable, blocks: Sequence[Block]) -> None:
        """Start an empty sequence with `blocks` (from `lookup`) as its first blocks, shared by reference."""
        seq = self.ledger.seq(seq_id)
        if seq.blocks:
            raise ValueError(f"attach: sequence {seq_id!r} already has blocks")
        for block in blocks:
            self.ledger.hold(block)
        seq.blocks = list(blocks)
        seq.num_tokens = len(blocks) * self.layout.block_size

    def register(self, seq_id: Hashable, index: int, key: bytes, token_ids: Sequence[int]) -> bool:
        """Give the sequence's full block `index` its content key; False if another block already has the key
        (then this one stays private) or if the block already has one."""
        block = self.ledger.seq(seq_id).blocks[index]
        old = self.index.get(key)
        if old is not None and block.key is None and old.tier > block.tier and old.ref_count == old.pins == 0:
            # The same tokens' KV, cached in a slower tier (recomputed because that was faster, or computed beside
            # it): the key moves to this copy. Left on the slower one, every later hit would be found there again,
            # and this faster copy would be dropped when its sequence ends.
            self.placement.drop(old)
            self.placement.superseded += 1
        if not self.index.add(block, key, token_ids):
            return False
        if self.placement.write_through and NVME in self.tiers and block.tier != NVME:
            self.spares.queue_write_through(block)
        return True

    def flush_copies(self) -> int:
        """Write-through: start the NVMe copies of the blocks registered since the last flush."""
        return self.placement.flush_copies()

    def persist_keyed(self) -> int:
        """Write the cached blocks that live only in faster tiers down to NVMe, most recently used first (where
        the NVMe tier is too small, the least recent are dropped); returns how many were written."""
        if NVME not in self.tiers:
            return 0
        blocks = self.blocks
        chosen = [
            blocks[bid]
            for kind in self.kinds
            if kind != NVME
            for bid in reversed(list(self.policies[kind]))
            if blocks[bid].ref_count == 0 and blocks[bid].pins == 0 and blocks[bid].disk_copy is None
        ]
        before = self.counters[NVME].evictions_in
        self.placement.demote_all(chosen, NVME)
        self.synchronize()
        return self.counters[NVME].evictions_in - before

    def demote_cached(self, to: str) -> int:
        """Move every cached block above tier `to` ("cpu" or "nvme") down to it (or below, where it is full);
        returns how many moved. For tests and benchmarks of hits from a given tier."""
        target = lower_tier(to, self.kinds, "demote_cached")
        chosen = [b for b in self.blocks.values() if b.ref_count == 0 and b.tier < target and b.pins == 0]
        self.placement.demote_all(chosen, target)
        self.synchronize()
        return len(chosen)

    def reset_prefix_cache(self) -> int:
        """Drop every cached block and forget every key (in the NVMe index too); returns the blocks dropped."""
        dropped = 0
        for block in list(self.blocks.values()):
            if block.key is not None and block.ref_count == 0:
                self.placement.drop(block)
                dropped += 1
        for block in self.blocks.values():
            self.placement.unkey(block)
        self.index.clear()
        if NVME in self.tiers:
            self.tiers[NVME].store.forget_keys()
        return dropped

    def load_from_disk(self, blocks: Sequence[Block], protect: set[int]) -> int:
        """Bring the NVMe-resident ones of `blocks` up a tier now and check their checksums; a block that fails is
        dropped with a warning. Returns how many of `blocks`, from the first, are good to use."""
        return self.placement.load_from_disk(blocks, protect)

    # -- the step --------------------------------------------------------------------------------------------
    def begin_step(self) -> int:
        """Advance the step counter (prefetch reservations for earlier steps lapse); returns the new step."""
        self.ledger.step += 1
        self.mover.collect()
        self.placement.flush_copies()
        return self.ledger.step

    def acquire(
        self,
        seq_ids: Sequence[Hashable],
        writes: dict[Hashable, tuple[int, int]] | None = None,
        block_ranges: dict[Hashable, tuple[int, int]] | None = None,
        layered: bool = False,
    ) -> list[list[int]]:
        """Bring the blocks of `seq_ids` to the GPU, pin them, and order the compute stream after their arrival.

        With `layered`, blocks still arriving in layer groups (LayeredHandle) are not waited for as a whole: the
        caller takes them with `take_layer_waits()` and waits layer by layer before it reads or writes each layer
        (a sequence swapped back in has its last block, the one its next token goes to, in the same batch as the
        rest: the step's first layers compute while the later ones arrive).

        `writes[seq] = (start, end)`: the step writes token positions [start, end) of that sequence; the blocks
        they fall in are made private first (copy-on-write) and count as holding data afterwards.
        `block_ranges[seq] = (first, stop)`: only logical blocks [first, stop) are acquired (default: all);
        the others stay where they are (e.g. for attention that streams them). They must cover the writes.
        Returns, per sequence, the GPU slot numbers of its acquired blocks in logical order. Raises
        CapacityError, changing nothing, if those blocks cannot all be on the GPU at once.
        """
        seqs = [self.ledger.seq(s) for s in seq_ids]
        plan = plan_acquire(seq_ids, seqs, writes or {}, block_ranges or {}, self.layout.block_size)
        spans, write_spans = plan.spans, plan.write_spans
        self.placement.check_room(len(plan.cow), "copy-on-write of shared blocks")
        needed = plan.needed
        lower = plan.check_gpu_room(self.ledger.pinned_blocks, self.tiers[GPU].num_blocks)
        found = dict.fromkeys(self.kinds, 0)
        found[GPU] = len(needed) - len(lower)
        for block in lower:
            found[block.tier] += 1
        count_lookups(self.counters, self.kinds, found)
        if plan.cow:
            # Originals this step stops using may be demoted to make room; their copies read them wherever they are.
            self.placement.copy_on_write(seqs, plan.cow, plan.still_used)
            needed = {b.block_id: b for seq, (first, stop) in zip(seqs, spans) for b in seq.blocks[first:stop]}
            lower = [b for b in needed.values() if b.tier != GPU]
        if lower:
            self.placement.promote(lower, set(needed), allow_reserved=True)
        for seq_id, seq, (first, stop) in zip(seq_ids, seqs, spans):
            span = seq.blocks[first:stop]
            self.ledger.pin(span)
            seq.pinned.append(span)
            if seq_id in write_spans:
                wlo, whi = write_spans[seq_id]
                for block in seq.blocks[wlo:whi]:
                    block.has_data = True
                    self.placement.unkey(block)
                    self.spares.drop_host(block)  # its bytes on the GPU are about to change
        # Each sequence's last block touched first, its first last: a cached prefix that must give up room then loses
        # its tail first, and its head still serves the next request with that prefix (without its first block, a
        # prefix serves nothing, however many of its later blocks stay).
        self.policies[GPU].touch_many(reversed(needed))
        waits = []
        for block in needed.values():
            if block.ready is not DONE:
                if block.ready.done():
                    block.ready = DONE
                else:
                    waits.append(block.ready)
        if self.mover.cuda:
            # Blocks about to be written must also wait for transfers still reading them (copies to disk).
            written = [
                b.readers
                for seq_id, seq in zip(seq_ids, seqs)
                if seq_id in write_spans
                for b in seq.blocks[write_spans[seq_id][0] : write_spans[seq_id][1]]
                if b.readers is not DONE
            ]
            if layered and waits:
                later = {id(h): h for h in waits if isinstance(h, LayeredHandle)}
                self._layer_waits.extend(later.values())
                waits = [h for h in waits if id(h) not in later]
            if waits or written:
                self.mover.order_compute_after(all_of([*waits, *written]))
        return [[b.slot for b in seq.blocks[first:stop]] for seq, (first, stop) in zip(seqs, spans)]

    def reset_step_state(self) -> None:
        """Forget what the outstanding acquires left (after a failed step, once every transfer has finished)."""
        self._layer_waits = []
        self.placement.host_reads_pending = False
        self.placement.host_read_marker = DONE

    def take_layer_waits(self) -> list:
        """The layer-group transfers the last `acquire(layered=True)` left for the caller to wait on, per layer."""
        waits, self._layer_waits = self._layer_waits, []
        return waits

    def pin_in_place(self, seq_id: Hashable, stop_block: int) -> list[tuple[int, int]]:
        """Pin the sequence's blocks [0, stop_block) where they are, for attention that streams them; returns each
        block's (tier, slot). Blocks on NVMe stay there: the attention reads them one layer at a time (their
        pending writes are waited for here). Needs an outstanding `acquire` of the sequence; its `release` unpins
        these too."""
        seq = self.ledger.seq(seq_id)
        if not seq.pinned:
            raise RuntimeError(f"pin_in_place({seq_id!r}) needs an outstanding acquire of the sequence")
        blocks = seq.blocks[:stop_block]
        tiers = [b.tier for b in blocks]
        count_lookups(self.counters, self.kinds, {k: tiers.count(k) for k in self.kinds})
        for b in blocks:
            if b.tier == NVME:
                b.ready.wait()  # written through the worker thread: on disk before it is read from there
        self.ledger.pin(blocks)
        seq.pinned[-1].extend(blocks)
        placed = [(b.tier, b.slot) for b in blocks]
        if self.mover.cuda:
            self.mover.order_compute_after(all_of(b.ready for b in blocks if b.tier != NVME))
            if any(t == CPU for t in tiers):
                self.placement.note_host_reads()
        return placed

    def release(self, seq_ids: Sequence[Hashable]) -> None:
        """Unpin the blocks pinned by the matching `acquire`."""
        for seq_id in seq_ids:
            seq = self.ledger.seq(seq_id)
            if not seq.pinned:
                raise RuntimeError(f"release({seq_id!r}) without a matching acquire")
            self.ledger.unpin(seq.pinned.pop())
        self.placement.end_host_reads()

    def prefetch(
        self,
        seq_ids: Sequence[Hashable],
        before_step: int | None = None,
        budget_blocks: int | None = None,
        keep: Sequence[Hashable] = (),
    ) -> int:
        """Start bringing the blocks of `seq_ids` (in that order of urgency) to the GPU; returns at once.

        Best effort: it never evicts pinned blocks or blocks prefetched for an earlier deadline, and stops
        when the GPU has no such room. The blocks are kept for `before_step` (default: the next step).
        Returns the number of blocks whose transfer was started.
        """
        step = self.step + 1 if before_step is None else before_step
        budget = self.tiers[GPU].num_blocks if budget_blocks is None else budget_blocks
        seq = self.ledger.seq
        for s in keep:  # sequences that run before `step` too: their GPU blocks are not room for this prefetch
            for block in seq(s).blocks:
                if block.tier == GPU:
                    block.reserved_step = max(block.reserved_step, step)
        upcoming = [[b.block_id for b in seq(s).blocks] for s in seq_ids]
        blocks = self.blocks
        wanted = self.prefetch_policy.plan(upcoming, lambda bid: blocks[bid].tier == GPU, budget)
        for s in seq_ids:
            for block in seq(s).blocks:
                if block.tier == GPU:
                    block.reserved_step = max(block.reserved_step, step)
        todo = [blocks[bid] for bid in wanted]
        started = self.placement.promote(todo, set(wanted), allow_reserved=False, best_effort=True)
        for block in todo[:started]:
            block.reserved_step = max(block.reserved_step, step)
        self.counters[GPU].prefetched += started
        return started

    def evict(self, seq_ids: Sequence[Hashable], to: str = "cpu") -> int:
        """Swap the unpinned blocks of `seq_ids` down to tier `to` ("cpu" or "nvme") or below, where there is room.

        Used for preemption by swapping. Returns the number of blocks moved; blocks that are pinned, already
        there or below, or that find no room stay where they are.
        """
        target = lower_tier(to, self.kinds, "evict")
        seq = self.ledger.seq
        blocks = {b.block_id: b for s in seq_ids for b in seq(s).blocks if b.tier < target and b.pins == 0}
        room = sum(self.free_blocks(k) for k in self.kinds if k >= target)
        chosen = sorted(blocks.values(), key=lambda b: b.tier)[:room]
        for block in chosen:
            self.policies[block.tier].remove(block.block_id)
        stayed = self.placement.place_below(chosen, target, protect=set(blocks), allow_reserved=True)
        return len(chosen) - len(stayed)

    # -- stats, shutdown -------------------------------------------------------------------------------------
    def stats(self) -> dict:
        """Per-tier capacity, use and traffic (what happened, not what was configured), as a dict."""
        self.mover.collect()
        return build_stats(self)

    def format_stats(self) -> str:
        """The stats as a printable table."""
        return format_stats(self.stats())

    def synchronize(self) -> None:
        """Wait for every transfer in flight."""
        self.mover.synchronize()

    def reset_counters(self) -> None:
        """Zero the traffic counters and link stats."""
        self.mover.collect()
        for kind in self.kinds:
            self.counters[kind] = TierCounters()
        self.mover.links.clear()

    def close(self) -> None:
        """Wait for transfers, close the NVMe files and release the directory. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self.mover.close()
        for tier in self.tiers.values():
            tier.close()

    def __enter__(self) -> PageManager:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        tiers = ", ".join(f"{TIER_NAMES[k]}={self.resident(k)}/{self.tiers[k].num_blocks}" for k in self.kinds)
        return f"PageManager({self.layout.block_nbytes} B/block, {tiers}, eviction={self.config.eviction})"

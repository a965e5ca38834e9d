"""The page manager: which KV block lives in which tier, and the decisions that move blocks between tiers.

Bookkeeping only: blocks, block tables, reference counts, residence, pins, policies. Bytes are moved by the
`Mover`, which it drives with batched transfers (one per source tier and direction per decision).

Life of a block: it is created by `append_tokens` in the fastest tier with free room (empty: it holds no
bytes yet, so moving it costs nothing); `acquire` brings every block of the sequences of a step to the GPU
(copying a block shared with another sequence before it is written: copy-on-write), pins them, and makes
the compute stream wait until they have landed; `release` unpins; when a tier is full its eviction policy
picks unpinned victims, which are demoted one tier down (GPU -> CPU -> NVMe), pushing that tier's victims
further down first. A block has one residence at a time; while a transfer into it is in flight its `ready`
handle says when the bytes are there, and the slot it left stays busy until the transfer has read it. Spare copies
aside: a block promoted from the CPU tier keeps its CPU slot as a copy until it is written, so that going back down
unwritten moves no byte (`keep_host_copies`); keyed blocks may have a write-through copy on NVMe. Spares count as
free room and give it up first.

Block identity is the `Block` object (`block_id`), not its slot. A full block can be given a content key (a
hash chained over the tokens of the prefix, see `tierkv.prefix_cache`): it is then indexed, and when no sequence
holds it any more it stays in its tier as a cached block (ref count 0) that any later sequence with the same
prefix can adopt. Cached blocks are evicted like the others (demoted tier by tier: write-back) and dropped only
at the bottom; capacity counts them as free. Keyed blocks written to the NVMe tier carry their key and tokens in
its index, so a new process on the same directory starts with them.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch

from tierkv.config import PageManagerConfig
from tierkv.errors import CapacityError, CorruptBlockError
from tierkv.handles import DONE, Handle, LayeredHandle, all_of, settled
from tierkv.layout import KVLayout
from tierkv.mover import Mover
from tierkv.policies.base import EvictionPolicy
from tierkv.policies.prefetch import NextScheduledPrefetch, PrefetchPolicy
from tierkv.policies.registry import make_eviction_policy
from tierkv.stats import TierCounters, build_stats, format_stats
from tierkv.tiers import CPU, GPU, NVME, TIER_NAMES, MemoryTier, NvmeTier, Tier, check_host_memory


@dataclass(eq=False)
class Block:
    """One KV block. `tier`/`slot` is its residence (its destination while a move is in flight)."""

    block_id: int
    tier: int
    slot: int
    ready: Handle = DONE  # completes when the bytes at (tier, slot) are valid, or the slot may be written
    readers: Handle = DONE  # transfers still reading (tier, slot) as a copy-on-write source
    ref_count: int = 1
    pins: int = 0
    has_data: bool = False  # False until first written: an empty block moves without copying bytes
    reserved_step: int = -1  # prefetched for this step: other prefetches leave it alone until then
    key: bytes | None = None  # content key (prefix cache); None = private to its sequences
    token_ids: tuple[int, ...] | None = None  # the tokens whose KV a keyed block holds, checked on every hit
    copy_slot: int | None = None  # write-through: an NVMe slot holding a copy of this keyed block
    copy_ready: Handle = DONE  # completes when that copy is on disk
    host_slot: int | None = None  # a CPU-tier slot still holding this GPU block's bytes (kept from its promotion)
    host_ready: Handle = DONE  # when the bytes in host_slot are valid
    host_busy: Handle = DONE  # transfers still reading host_slot


@dataclass
class _Sequence:
    blocks: list[Block] = field(default_factory=list)
    num_tokens: int = 0
    pinned: list[list[Block]] = field(default_factory=list)  # one entry per outstanding acquire


class PageManager:
    """KV blocks of fixed size across GPU, pinned CPU and NVMe tiers, with block tables per sequence."""

    # A promotion into a full GPU tier (a swap: victims out, then the blocks in, into the slots they vacate) can go
    # in up to `swap_chunks` chunks of at least `swap_chunk_blocks` blocks: each chunk's blocks come in as soon as
    # its own victims are out, while the next chunk's victims go out, so the two directions overlap on the link.
    # One chunk by default: the copy in goes layer group by layer group, and a step waits for each layer's group
    # just before the layer; chunks would queue every chunk's groups behind the whole of the chunks before it, so
    # that the step's first layer waited for most of the swap. (H100, 2026-11-24, item 4's oversubscribed run with
    # staggered turns: median decode step 8.1 ms in one chunk against 9.0-9.1 ms in four; BENCHMARKS.md.)
    swap_chunks = 1
    swap_chunk_blocks = 32
    # A block promoted from the CPU tier keeps its CPU slot as a copy until it is written (an acquire that writes it)
    # or the room is wanted: demoted again unwritten (a swapped-in sequence's full blocks, a prefix), it moves
    # without copying a byte. The copies are spares: they count as free room and are the first to give it up.
    keep_host_copies = True

    def __init__(self, config: PageManagerConfig, prefetch_policy: PrefetchPolicy | None = None) -> None:
        self.config = config
        self.layout: KVLayout = config.layout
        self.device: torch.device = config.device
        cuda = self.device.type == "cuda"
        self.tiers: dict[int, Tier] = {}
        host = {"cpu": config.cpu_blocks * self.layout.block_nbytes} if config.cpu_blocks else {}
        if not cuda:  # the "GPU" tier is ordinary memory too
            host["gpu"] = (config.gpu_blocks + config.gpu_reserve_blocks) * self.layout.block_nbytes
        check_host_memory(host)
        try:
            self.tiers[GPU] = MemoryTier(
                GPU,
                self.layout,
                config.gpu_blocks,
                config.gpu_blocks + config.gpu_reserve_blocks,
                self.device,
                pin=False,
            )
            if config.cpu_blocks:
                self.tiers[CPU] = MemoryTier(
                    CPU, self.layout, config.cpu_blocks, config.cpu_blocks, torch.device("cpu"), pin=cuda
                )
            if config.nvme_blocks:
                self.tiers[NVME] = NvmeTier(
                    self.layout, config.nvme_blocks, config.nvme_dir, config.nvme_backend, config.store_tag
                )
            self.mover = Mover(list(self.tiers.values()), self.device, config.staging_blocks, config.debug_delays)
        except BaseException:
            for tier in self.tiers.values():
                tier.close()
            raise
        self.kinds: list[int] = sorted(self.tiers)  # fastest first
        self.policies: dict[int, EvictionPolicy] = {k: make_eviction_policy(config.eviction) for k in self.kinds}
        self.prefetch_policy = prefetch_policy or NextScheduledPrefetch()
        self.counters: dict[int, TierCounters] = {k: TierCounters() for k in self.kinds}
        self.blocks: dict[int, Block] = {}
        self.sequences: dict[Hashable, _Sequence] = {}
        self.step = 0
        self.cow_copies = 0
        self.forks = 0
        self.peak_live_blocks = 0
        self.index: dict[bytes, Block] = {}  # content key -> block, in any tier
        self.cached: dict[int, int] = {k: 0 for k in self.kinds}  # keyed blocks no sequence holds, per tier
        self.dropped_cached = 0
        self._copy_order: dict[int, Block] = {}  # write-through copies on NVMe of blocks in faster tiers, oldest first
        self._copy_queue: list[Block] = []  # keyed blocks waiting for their write-through copy
        self._host_order: dict[int, Block] = {}  # CPU-tier copies of GPU blocks (keep_host_copies), oldest first
        self._next_block_id = 0
        self._pinned_blocks = 0  # blocks with pins > 0
        self._layer_waits: list = []  # see acquire(layered=True)
        self._streams_host = False  # some pinned-in-place block of the outstanding acquires is in a host tier
        self._host_read_marker: Handle = DONE  # after the device's last reads of host-tier blocks (streaming)
        self._closed = False
        if NVME in self.tiers and config.adopt_stored:
            self._adopt_stored()

    def _adopt_stored(self) -> None:
        """Index the keyed blocks a previous process left in the NVMe store, as cached blocks."""
        tier = self.tiers[NVME]
        entries = tier.store.keyed_entries()[: tier.num_blocks]
        tier.slots.claim({slot for slot, _, _ in entries})
        for slot, key, tokens in entries:
            block = Block(self._next_block_id, NVME, slot, ref_count=0, has_data=True, key=key, token_ids=tokens)
            self._next_block_id += 1
            self.blocks[block.block_id] = block
            self.policies[NVME].insert(block.block_id)
            self.index[key] = block
            self.cached[NVME] += 1

    # -- capacity ------------------------------------------------------------------------------------------
    @property
    def copies(self) -> int:
        """Write-through copies on NVMe of blocks living in faster tiers."""
        return len(self._copy_order)

    @property
    def host_copies(self) -> int:
        """CPU-tier copies of GPU blocks (see keep_host_copies)."""
        return len(self._host_order)

    def resident(self, kind: int) -> int:
        """Blocks living in tier `kind` now."""
        return len(self.policies[kind])

    def _spares(self, kind: int) -> dict[int, Block]:
        """The spare copies holding slots of tier `kind`, oldest first: host copies in the CPU tier, write-through
        copies on NVMe, none on the GPU. Their blocks live in a faster tier."""
        return self._host_order if kind == CPU else self._copy_order if kind == NVME else {}

    def open_slots(self, kind: int) -> int:
        """Slots of tier `kind` that no block (or spare copy) occupies (beyond the GPU's reserve)."""
        return max(0, self.tiers[kind].num_blocks - self.resident(kind) - len(self._spares(kind)))

    def free_blocks(self, kind: int | None = None) -> int:
        """Blocks that can still be created in tier `kind` (or in all tiers): open slots plus cached blocks and
        spare copies (host copies in the CPU tier, write-through copies on NVMe), which give way when room is needed."""
        if kind is None:
            return sum(self.free_blocks(k) for k in self.kinds)
        return self.open_slots(kind) + self.cached[kind] + len(self._spares(kind))

    def _check_room(self, new_blocks: int, what: str) -> None:
        free = self.free_blocks()
        if new_blocks > free:
            detail = ", ".join(
                f"{TIER_NAMES[k]} {self.free_blocks(k)} of {self.tiers[k].num_blocks}" for k in self.kinds
            )
            raise CapacityError(
                f"{what} needs {new_blocks} new KV blocks ({self.layout.block_size} tokens each) but only {free} are "
                f"free across all tiers (free: {detail}); free finished sequences or give the tiers more capacity"
            )

    # -- sequences -----------------------------------------------------------------------------------------
    def add_sequence(self, seq_id: Hashable) -> None:
        """Start an empty sequence."""
        if seq_id in self.sequences:
            raise KeyError(f"sequence {seq_id!r} already exists")
        self.sequences[seq_id] = _Sequence()

    def _seq(self, seq_id: Hashable) -> _Sequence:
        try:
            return self.sequences[seq_id]
        except KeyError:
            raise KeyError(f"unknown sequence {seq_id!r}") from None

    def num_tokens(self, seq_id: Hashable) -> int:
        return self._seq(seq_id).num_tokens

    def block_table(self, seq_id: Hashable) -> list[Block]:
        """The sequence's blocks in logical order (do not mutate)."""
        return self._seq(seq_id).blocks

    def append_tokens(self, seq_id: Hashable, num_tokens: int) -> None:
        """Grow the sequence by `num_tokens` token positions, creating blocks as needed.

        New blocks are empty and go to the fastest tier with free room; `acquire` brings them to the GPU.
        Raises CapacityError, changing nothing, if the tiers together cannot hold them.
        """
        seq = self._seq(seq_id)
        if num_tokens < 0:
            raise ValueError(f"append_tokens: num_tokens must be >= 0, got {num_tokens}")
        need = self.layout.num_blocks_for(seq.num_tokens + num_tokens) - len(seq.blocks)
        if need > 0:
            self._check_room(need, f"appending {num_tokens} tokens to sequence {seq_id!r}")
        for _ in range(need):
            kind = next((k for k in self.kinds if self.open_slots(k) > 0), None)
            if kind is None:  # a spare copy is the cheapest room to give up: host copies first, then write-through
                kind = next((k for k in (CPU, NVME) if self._spares(k)), None)
                if kind is not None:
                    self._drop_spares(kind, 1)
            if kind is None:
                kind = self._drop_cached(1)
            slot, busy = self.tiers[kind].slots.take()
            block = Block(self._next_block_id, kind, slot, ready=busy)
            self._next_block_id += 1
            self.blocks[block.block_id] = block
            self.policies[kind].insert(block.block_id)
            seq.blocks.append(block)
        seq.num_tokens += num_tokens
        self.peak_live_blocks = max(self.peak_live_blocks, len(self.blocks))

    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        """New sequence `child_id` sharing every block of `parent_id` (copy-on-write)."""
        parent = self._seq(parent_id)
        if child_id in self.sequences:
            raise KeyError(f"sequence {child_id!r} already exists")
        for block in parent.blocks:
            block.ref_count += 1
        self.sequences[child_id] = _Sequence(list(parent.blocks), parent.num_tokens)
        self.forks += 1

    def free(self, seq_id: Hashable) -> None:
        """Drop the sequence; blocks no other sequence holds return to their tier's free slots."""
        seq = self.sequences.pop(seq_id, None)
        if seq is None:
            raise KeyError(f"unknown sequence {seq_id!r}")
        for pinned in seq.pinned:
            self._unpin(pinned)
        marker = self.mover.compute_marker()  # the last step may still read these blocks on the device
        for block in seq.blocks:
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.key is not None:
                    self.cached[block.tier] += 1  # stays where it is, for the next request with this prefix
                else:
                    self._drop(block, marker)

    def _pin(self, blocks: list[Block]) -> None:
        pinned = 0
        for block in blocks:
            if not block.pins:
                pinned += 1
            block.pins += 1
        self._pinned_blocks += pinned

    def _unpin(self, blocks: list[Block]) -> None:
        unpinned = 0
        for block in blocks:
            block.pins -= 1
            if not block.pins:
                unpinned += 1
        self._pinned_blocks -= unpinned

    def _drop(self, block: Block, marker: Handle | None = None) -> None:
        """Forget a block no sequence holds; its slot is free once the work touching it is done."""
        if marker is None:
            marker = self.mover.compute_marker() if block.tier == GPU else DONE
        self._drop_copy(block)
        self._drop_host_copy(block)
        self.policies[block.tier].remove(block.block_id)
        if block.key is not None:
            self.index.pop(block.key, None)
            if block.ref_count == 0:
                self.cached[block.tier] -= 1
        busy = [block.ready, block.readers] + ([marker] if block.tier == GPU else [])
        self.tiers[block.tier].slots.give(block.slot, all_of(busy))
        del self.blocks[block.block_id]

    def _drop_cached(self, n: int, protect: frozenset = frozenset()) -> int | None:
        """Drop up to `n` cached blocks, deepest tier first, in each tier's eviction order; returns the last
        tier that gained a slot (None if none did)."""
        where = None
        for kind in reversed(self.kinds):
            if n <= 0:
                break
            if not self.cached[kind]:
                continue
            blocks = self.blocks
            victims = self.policies[kind].pop_victims(
                n, lambda bid: blocks[bid].ref_count == 0 and blocks[bid].pins == 0 and bid not in protect
            )
            for bid in victims:
                self._discard(self.blocks[bid])
            n -= len(victims)
            if victims:
                where = kind
        return where

    def _drop_copy(self, block: Block) -> None:
        if block.copy_slot is not None:
            self.tiers[NVME].slots.give(block.copy_slot, block.copy_ready)
            block.copy_slot, block.copy_ready = None, DONE
            del self._copy_order[block.block_id]

    def _drop_host_copy(self, block: Block) -> None:
        if block.host_slot is not None:
            self.tiers[CPU].slots.give(block.host_slot, all_of([block.host_ready, block.host_busy]))
            block.host_slot, block.host_ready, block.host_busy = None, DONE, DONE
            del self._host_order[block.block_id]

    def _drop_spares(self, kind: int, n: int) -> None:
        """Give up tier `kind`'s spare copies, oldest first, until `n` of its slots are open. A spare's block lives
        in a faster tier: demoted, it is written down whole again (or, onto a host copy it still has, not at all)."""
        spares = self._spares(kind)
        drop = self._drop_host_copy if kind == CPU else self._drop_copy
        while spares and self.open_slots(kind) < n:
            drop(next(iter(spares.values())))

    def flush_copies(self) -> int:
        """Write-through: write the keyed blocks registered since the last flush to NVMe, one batch per source
        tier, keeping them where they are; returns how many copies were started."""
        queue = list(
            {
                b.block_id: b
                for b in self._copy_queue
                if self.blocks.get(b.block_id) is b
                and b.key is not None
                and b.tier != NVME
                and b.copy_slot is None
                and b.has_data
            }.values()
        )
        self._copy_queue = []
        if not queue or NVME not in self.tiers:
            return 0
        room = self._make_room(NVME, len(queue), {b.block_id for b in queue}, allow_reserved=True)
        queue = [b for b in queue if self.blocks.get(b.block_id) is b and b.tier != NVME][:room]
        nvme = self.tiers[NVME]
        by_src: dict[int, list[Block]] = {}
        for block in queue:
            by_src.setdefault(block.tier, []).append(block)
        for kind, group in by_src.items():
            taken = [nvme.slots.take() for _ in group]
            deps = [b.ready for b in group] + [busy for _, busy in taken]
            if kind == GPU:
                deps.append(self.mover.compute_marker())
            handle = self.mover.move(
                self.tiers[kind],
                [b.slot for b in group],
                nvme,
                [s for s, _ in taken],
                deps,
                keys=[b.key for b in group],
                token_ids=[b.token_ids for b in group],
            )
            for block, (slot, _) in zip(group, taken):
                block.copy_slot, block.copy_ready = slot, handle
                block.readers = all_of([block.readers, settled(handle)])
                self._copy_order[block.block_id] = block
        return len(queue)

    # -- the prefix cache ----------------------------------------------------------------------------------
    def lookup(self, keys: Sequence[bytes], token_blocks: Sequence[Sequence[int]]) -> list[Block]:
        """The longest run of indexed blocks matching `keys` in order, whose stored tokens match too."""
        hits = []
        for key, tokens in zip(keys, token_blocks):
            block = self.index.get(key)
            if block is None or block.token_ids != tuple(tokens):
                break
            hits.append(block)
        return hits

    def promote_cached(self, blocks: Sequence[Block]) -> int:
        """Start bringing found blocks (from `lookup`, no sequence holding them yet) from the CPU tier to the GPU now,
        best effort, in one batch: a long prompt's first blocks start crossing the link while the rest of it is
        still being hashed and looked up. Found blocks on the GPU and the promoted ones are kept there through the
        next step (as prefetched blocks are). Returns how many transfers were started."""
        step = self.step + 1
        todo = [b for b in blocks if b.tier == CPU]
        started = (
            self._promote(todo, {b.block_id for b in blocks}, allow_reserved=False, best_effort=True) if todo else 0
        )
        for block in blocks:
            if block.tier == GPU:
                block.reserved_step = max(block.reserved_step, step)
        self.counters[GPU].prefetched += started
        return started

    def attach(self, seq_id: Hashable, blocks: Sequence[Block]) -> None:
        """Start an empty sequence with `blocks` (from `lookup`) as its first blocks, shared by reference."""
        seq = self._seq(seq_id)
        if seq.blocks:
            raise ValueError(f"attach: sequence {seq_id!r} already has blocks")
        for block in blocks:
            if block.ref_count == 0:
                self.cached[block.tier] -= 1
            block.ref_count += 1
        seq.blocks = list(blocks)
        seq.num_tokens = len(blocks) * self.layout.block_size

    def register(self, seq_id: Hashable, index: int, key: bytes, token_ids: Sequence[int]) -> bool:
        """Give the sequence's full block `index` its content key; False if another block already has the key
        (then this one stays private) or if the block already has one."""
        block = self._seq(seq_id).blocks[index]
        if block.key is not None or key in self.index:
            return False
        block.key = key
        block.token_ids = tuple(token_ids)
        self.index[key] = block
        if self.config.write_through and NVME in self.tiers and block.tier != NVME:
            self._copy_queue.append(block)
        return True

    def _unkey(self, block: Block) -> None:
        """The block is about to be written: its bytes will no longer be what its key says."""
        if block.key is not None:
            self._drop_copy(block)
            self.index.pop(block.key, None)
            block.key = block.token_ids = None

    def persist_keyed(self) -> int:
        """Write the cached blocks that live only in faster tiers down to NVMe, most recently used first (where
        the NVMe tier is too small, the least recent are dropped); returns how many were written."""
        if NVME not in self.tiers:
            return 0
        blocks = [
            self.blocks[bid]
            for kind in self.kinds
            if kind != NVME
            for bid in reversed(list(self.policies[kind]))
            if self.blocks[bid].ref_count == 0 and self.blocks[bid].pins == 0 and self.blocks[bid].copy_slot is None
        ]
        for block in blocks:
            self.policies[block.tier].remove(block.block_id)
        before = self.counters[NVME].evictions_in
        self._place_below(blocks, NVME, protect=set(), allow_reserved=True)
        self.synchronize()
        return self.counters[NVME].evictions_in - before

    def demote_cached(self, to: str) -> int:
        """Move every cached block above tier `to` ("cpu" or "nvme") down to it (or below, where it is full);
        returns how many moved. For tests and benchmarks of hits from a given tier."""
        target = TIER_NAMES.index(to)
        if target == GPU or target not in self.tiers:
            raise ValueError(
                f"demote_cached: {to!r} is not a lower tier here (have {[TIER_NAMES[k] for k in self.kinds]})"
            )
        blocks = [b for b in self.blocks.values() if b.ref_count == 0 and b.tier < target and b.pins == 0]
        for block in blocks:
            self.policies[block.tier].remove(block.block_id)
        self._place_below(blocks, target, protect=set(), allow_reserved=True)
        self.synchronize()
        return len(blocks)

    def reset_prefix_cache(self) -> int:
        """Drop every cached block and forget every key (in the NVMe index too); returns the blocks dropped."""
        dropped = 0
        for block in list(self.blocks.values()):
            if block.key is not None and block.ref_count == 0:
                self._drop(block)
                dropped += 1
        for block in self.blocks.values():
            self._unkey(block)
        self.index.clear()
        if NVME in self.tiers:
            self.tiers[NVME].store.forget_keys()
        return dropped

    def load_from_disk(self, blocks: Sequence[Block], protect: set[int]) -> int:
        """Bring the NVMe-resident ones of `blocks` up a tier now and check their checksums; a block that fails is
        dropped with a warning. Returns how many of `blocks`, from the first, are good to use."""
        target = CPU if CPU in self.tiers else GPU
        usable = len(blocks)
        protect = protect | {b.block_id for b in blocks}
        pending = [b for b in blocks if b.tier == NVME]
        while pending:
            room = self._make_room(target, len(pending), protect, allow_reserved=True)
            if room <= 0:
                break  # no room above the disk: they are read from it when their sequence runs
            batch, pending = pending[:room], pending[room:]
            old = {b.block_id: b.slot for b in batch}
            for block in batch:
                self.policies[NVME].remove(block.block_id)
            try:
                self._move(batch, target)  # without CUDA a bad checksum raises here, and nothing moved
                all_of(b.ready for b in batch).wait()  # with CUDA it raises here, after the batch moved
            except CorruptBlockError as exc:
                bad = [b for b in batch if old[b.block_id] in set(exc.slots)]
                warnings.warn(
                    f"prefix cache: {len(bad)} block(s) in the NVMe tier failed their checksum; dropped, to be "
                    "recomputed",
                    RuntimeWarning,
                    stacklevel=2,
                )
                usable = min([usable] + [blocks.index(b) for b in bad])
                for block in batch:
                    if block.tier != NVME:
                        block.ready = DONE  # the batch moved: the good blocks' bytes are there
                for block in bad:
                    if block.ref_count == 0:
                        self._drop(block)
                    else:
                        self._unkey(block)  # a running sequence holds it: it fails loudly when it reads it
                if batch[0].tier == NVME:  # nothing moved: try the good ones again
                    pending = [b for b in batch if b not in bad] + pending
        return usable

    # -- the step --------------------------------------------------------------------------------------------
    def begin_step(self) -> int:
        """Advance the step counter (prefetch reservations for earlier steps lapse); returns the new step."""
        self.step += 1
        self.mover.collect()
        self.flush_copies()
        return self.step

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
        writes = writes or {}
        block_ranges = block_ranges or {}
        seqs = [self._seq(s) for s in seq_ids]
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError("acquire: a sequence is listed twice")
        for s in list(writes) + list(block_ranges):
            if s not in seq_ids:
                raise ValueError(f"acquire: sequence {s!r} is named in writes/block_ranges but not acquired")
        bs = self.layout.block_size
        spans = []  # acquired logical block range per sequence
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
                    raise ValueError(
                        f"acquire: write [{lo}, {hi}) outside sequence {seq_id!r}'s {seq.num_tokens} tokens"
                    )
                wlo, whi = lo // bs, -(-hi // bs)
                if hi > lo and not (first <= wlo and whi <= stop):
                    raise ValueError(
                        f"acquire: write [{lo}, {hi}) of {seq_id!r} falls outside its acquired blocks [{first}, {stop})"
                    )
                if hi > lo:
                    write_spans[seq_id] = (wlo, whi)
        cow = self._cow_plan(seq_ids, seqs, write_spans)
        self._check_room(len(cow), "copy-on-write of shared blocks")
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
            on_gpu_after = sum(1 for n in after_refs.values() if n > 0) + len(cow)
        else:
            on_gpu_after = len(needed)
        pinned_here = gpu_hits = 0
        lower = []
        for block in needed.values():
            if block.pins:
                pinned_here += 1
            if block.tier == GPU:
                gpu_hits += 1
            else:
                lower.append(block)
        pinned_elsewhere = self._pinned_blocks - pinned_here
        gpu_need = on_gpu_after + pinned_elsewhere
        if gpu_need > self.tiers[GPU].num_blocks:
            raise CapacityError(
                f"this step needs {gpu_need} KV blocks on the GPU at once ({on_gpu_after} for its sequences, "
                f"{pinned_elsewhere} pinned by other steps) but the GPU tier holds {self.tiers[GPU].num_blocks}; "
                "run fewer or shorter sequences per step or raise gpu_blocks"
            )
        found = dict.fromkeys(self.kinds, 0)
        found[GPU] = gpu_hits
        for block in lower:
            found[block.tier] += 1
        self._count_lookups(found)
        if cow:
            # Originals this step stops using may be demoted to make room; their copies read them wherever they are.
            self._copy_on_write(seqs, cow, {bid for bid, n in after_refs.items() if n > 0})
            needed = {b.block_id: b for seq, (first, stop) in zip(seqs, spans) for b in seq.blocks[first:stop]}
            lower = [b for b in needed.values() if b.tier != GPU]
        if lower:
            self._promote(lower, set(needed), allow_reserved=True)
        for seq_id, seq, (first, stop) in zip(seq_ids, seqs, spans):
            span = seq.blocks[first:stop]
            self._pin(span)
            seq.pinned.append(span)
            if seq_id in write_spans:
                wlo, whi = write_spans[seq_id]
                for block in seq.blocks[wlo:whi]:
                    block.has_data = True
                    self._unkey(block)
                    self._drop_host_copy(block)  # its bytes on the GPU are about to change
        self.policies[GPU].touch_many(needed)
        waits = []
        for block in needed.values():
            if block.ready is not DONE:
                if block.ready.done():
                    block.ready = DONE
                else:
                    waits.append(block.ready)
        if self.mover.cuda:
            # Blocks about to be written must also wait for transfers still reading them (copies to disk).
            written_blocks = [
                b
                for seq_id, seq in zip(seq_ids, seqs)
                if seq_id in write_spans
                for b in seq.blocks[write_spans[seq_id][0] : write_spans[seq_id][1]]
            ]
            written = [b.readers for b in written_blocks if b.readers is not DONE]
            if layered and waits:
                later = {id(h): h for h in waits if isinstance(h, LayeredHandle)}
                self._layer_waits.extend(later.values())
                waits = [h for h in waits if id(h) not in later]
            if waits or written:
                all_of([*waits, *written]).wait_on(torch.cuda.current_stream(self.device))
        return [[b.slot for b in seq.blocks[first:stop]] for seq, (first, stop) in zip(seqs, spans)]

    def _cow_plan(self, seq_ids, seqs, write_spans) -> list[tuple[int, int, Block]]:
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

    def take_layer_waits(self) -> list:
        """The layer-group transfers the last `acquire(layered=True)` left for the caller to wait on, per layer."""
        waits, self._layer_waits = self._layer_waits, []
        return waits

    def pin_in_place(self, seq_id: Hashable, stop_block: int) -> list[tuple[int, int]]:
        """Pin the sequence's blocks [0, stop_block) where they are, for attention that streams them; returns each
        block's (tier, slot). Blocks on NVMe are first promoted to the CPU tier (streaming reads memory, not disk).
        Needs an outstanding `acquire` of the sequence; its `release` unpins these too."""
        seq = self._seq(seq_id)
        if not seq.pinned:
            raise RuntimeError(f"pin_in_place({seq_id!r}) needs an outstanding acquire of the sequence")
        blocks = seq.blocks[:stop_block]
        tiers = [b.tier for b in blocks]
        self._count_lookups({k: tiers.count(k) for k in self.kinds})
        on_disk = [b for b in blocks if b.tier == NVME] if NVME in self.tiers else []
        if on_disk:
            if CPU not in self.tiers:
                raise CapacityError(
                    f"sequence {seq_id!r} is longer than the GPU tier and {len(on_disk)} of its blocks are on NVMe: "
                    "streaming them needs a CPU tier; set cpu_blocks or cpu_memory"
                )
            protect = {b.block_id for b in blocks}
            room = self._make_room(CPU, len(on_disk), protect, allow_reserved=True)
            if room < len(on_disk):
                raise CapacityError(
                    f"sequence {seq_id!r}: streaming needs {len(on_disk)} of its blocks moved from NVMe to the CPU tier, "
                    f"but only {room} CPU slots can be freed (the tiers below are full); raise cpu_blocks or nvme_blocks"
                )
            for block in on_disk:
                self.policies[NVME].remove(block.block_id)
            self._move(on_disk, CPU)
        self._pin(blocks)
        seq.pinned[-1].extend(blocks)
        placed = [(b.tier, b.slot) for b in blocks]
        if self.mover.cuda:
            all_of(b.ready for b in blocks).wait_on(torch.cuda.current_stream(self.device))
            self._streams_host |= len(blocks) > tiers.count(GPU)
        return placed

    def release(self, seq_ids: Sequence[Hashable]) -> None:
        """Unpin the blocks pinned by the matching `acquire`."""
        for seq_id in seq_ids:
            seq = self._seq(seq_id)
            if not seq.pinned:
                raise RuntimeError(f"release({seq_id!r}) without a matching acquire")
            self._unpin(seq.pinned.pop())
        if self._streams_host:
            # The step's attention read host-tier blocks on the device: nothing may write their slots from the
            # host (NVMe reads into the CPU tier) before those reads are done. One marker covers every such read.
            self._streams_host = False
            self._host_read_marker = self.mover.compute_marker()

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
        for s in keep:  # sequences that run before `step` too: their GPU blocks are not room for this prefetch
            for block in self._seq(s).blocks:
                if block.tier == GPU:
                    block.reserved_step = max(block.reserved_step, step)
        upcoming = [[b.block_id for b in self._seq(s).blocks] for s in seq_ids]
        wanted = self.prefetch_policy.plan(upcoming, lambda bid: self.blocks[bid].tier == GPU, budget)
        for s in seq_ids:
            for block in self._seq(s).blocks:
                if block.tier == GPU:
                    block.reserved_step = max(block.reserved_step, step)
        todo = [self.blocks[bid] for bid in wanted]
        started = self._promote(todo, set(wanted), allow_reserved=False, best_effort=True)
        for block in todo[:started]:
            block.reserved_step = max(block.reserved_step, step)
        self.counters[GPU].prefetched += started
        return started

    def evict(self, seq_ids: Sequence[Hashable], to: str = "cpu") -> int:
        """Swap the unpinned blocks of `seq_ids` down to tier `to` ("cpu" or "nvme") or below, where there is room.

        Used for preemption by swapping. Returns the number of blocks moved; blocks that are pinned, already
        there or below, or that find no room stay where they are.
        """
        target = TIER_NAMES.index(to)
        if target == GPU or target not in self.tiers:
            raise ValueError(
                f"evict: tier {to!r} is not a lower tier of this page manager (have {[TIER_NAMES[k] for k in self.kinds]})"
            )
        blocks = {b.block_id: b for s in seq_ids for b in self._seq(s).blocks if b.tier < target and b.pins == 0}
        room = sum(self.free_blocks(k) for k in self.kinds if k >= target)
        chosen = sorted(blocks.values(), key=lambda b: b.tier)[:room]
        for block in chosen:
            self.policies[block.tier].remove(block.block_id)
        stayed = self._place_below(chosen, target, protect=set(blocks), allow_reserved=True)
        return len(chosen) - len(stayed)

    # -- moving ----------------------------------------------------------------------------------------------
    def _count_lookups(self, found: dict[int, int]) -> None:
        """Hits and misses of lookups that found `found[tier]` blocks in each tier: a hit where the block was, a
        miss in every faster tier."""
        total = sum(found.values())
        deeper = total - found.get(GPU, 0)
        self.counters[GPU].hits += found.get(GPU, 0)
        self.counters[GPU].misses += deeper
        for k in self.kinds[1:]:
            deeper -= found.get(k, 0)
            self.counters[k].hits += found.get(k, 0)
            self.counters[k].misses += deeper

    def _evictable(self, protect: set[int], allow_reserved: bool):
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

    def _make_room(self, kind: int, n: int, protect: set[int], allow_reserved: bool) -> int:
        """Try to have `n` open slots in tier `kind` by demoting its victims (cached blocks that find no room
        below are dropped); returns how many are open (<= n)."""
        self._drop_spares(kind, n)
        free = self.open_slots(kind)
        if free >= n:
            return n
        below = [k for k in self.kinds if k > kind]
        room_below = sum(self.free_blocks(k) for k in below)
        policy = self.policies[kind]
        evictable = self._evictable(protect, allow_reserved)
        victims = [self.blocks[v] for v in policy.pop_victims(n - free, evictable)]
        live = [b for b in victims if b.ref_count > 0]
        cached = [b for b in victims if b.ref_count == 0]
        if len(live) > room_below:  # only cached blocks may leave without a place to go: take more of those
            excess = live[room_below:]
            policy.restore([b.block_id for b in excess])
            live = live[:room_below]
            blocks = self.blocks
            more = policy.pop_victims(len(excess), lambda bid: blocks[bid].ref_count == 0 and evictable(bid))
            cached += [self.blocks[v] for v in more]
        stayed = []
        if below:
            stayed = self._place_below(live + cached, below[0], protect, allow_reserved)
        else:
            for block in cached:
                self._discard(block)
        return free + len(live) + len(cached) - len(stayed)

    def _discard(self, block: Block) -> None:
        """Drop a cached block already taken out of its policy."""
        self.policies[block.tier].insert(block.block_id)  # _drop takes it out again
        self._drop(block)
        self.dropped_cached += 1

    def _place_below(self, blocks: list[Block], start: int, protect: set[int], allow_reserved: bool) -> list[Block]:
        """Demote `blocks` (already out of their policies; those in use first) into tier `start`, or the tiers
        below it where it is full. Cached blocks that find no room anywhere are dropped; blocks in use that find
        none stay where they are, back in their policies, and are returned."""
        remaining = blocks
        if start <= CPU and self._host_order:  # those with a host copy go back onto it, taking no room
            onto = [b for b in blocks if b.host_slot is not None]
            if onto:
                remaining = [b for b in blocks if b.host_slot is None]
                self._demote_onto_copies(onto)
        for kind in (k for k in self.kinds if k >= start):
            if not remaining:
                break
            if kind == NVME:
                for block in remaining:
                    self._drop_copy(block)  # written down whole now: its older copy goes
            got = self._make_room(kind, len(remaining), protect, allow_reserved)
            batch, remaining = remaining[:got], remaining[got:]
            for block in batch:
                self.counters[block.tier].evictions_out += 1
            self.counters[kind].evictions_in += len(batch)
            self._move(batch, kind)
        stayed = []
        for block in remaining:
            if block.ref_count > 0:
                self.policies[block.tier].restore([block.block_id])
                stayed.append(block)
            else:
                self._discard(block)
        return stayed

    def _demote_onto_copies(self, blocks: list[Block]) -> None:
        """GPU blocks (out of their policy) whose bytes are still in their host-copy slot: they live there again,
        no byte copied; each GPU slot is free once the work already queued on the device has stopped reading it."""
        marker = self.mover.compute_marker()
        gpu, counters = self.tiers[GPU], self.counters
        for block in blocks:
            gpu.slots.give(block.slot, all_of([marker, block.ready, block.readers]))
            block.tier, block.slot, block.ready, block.readers = CPU, block.host_slot, block.host_ready, block.host_busy
            block.host_slot, block.host_ready, block.host_busy = None, DONE, DONE
            del self._host_order[block.block_id]
            if block.ref_count == 0:
                self.cached[GPU] -= 1
                self.cached[CPU] += 1
            self.policies[CPU].insert(block.block_id)
        counters[GPU].evictions_out += len(blocks)
        counters[CPU].evictions_in += len(blocks)
        counters[CPU].onto_copies += len(blocks)

    def _promote(self, blocks: list[Block], protect: set[int], allow_reserved: bool, best_effort: bool = False) -> int:
        """Bring `blocks` to the GPU in as few batches as room allows; returns how many were started.

        With free GPU slots, blocks land there. With none, victims are demoted first where the tier below the
        GPU has room (chunk by chunk, see `swap_chunks`); where it is full, a batch first lands in the GPU's reserve slots and as many victims
        then follow into the slots the batch vacated (so the demotion cascade stays LRU-ordered and no
        transfer waits on one queued after it).
        """
        todo = [b for b in blocks if b.tier != GPU]
        gpu = self.tiers[GPU]
        started = 0
        chunk = max(self.swap_chunk_blocks, -(-len(todo) // self.swap_chunks))
        while todo:
            free = self.open_slots(GPU)
            if free == 0 and self.free_blocks(self.kinds[1]) > 0:
                free = self._make_room(GPU, min(len(todo), chunk), protect, allow_reserved)
            if free:
                batch = todo[:free]
            else:
                reserve = len(gpu.slots)  # no usable slot is free, so every free slot is a reserve slot
                evictable = self._evictable(protect, allow_reserved)
                candidates = sum(1 for bid in self.policies[GPU] if evictable(bid))
                size = min(len(todo), reserve, candidates)
                if size == 0:
                    if best_effort:
                        break
                    raise AssertionError("tierkv bug: no GPU room for a promotion that passed the capacity check")
                batch = todo[:size]
            for block in batch:
                self.policies[block.tier].remove(block.block_id)
            self._move(batch, GPU)
            started += len(batch)
            todo = todo[len(batch) :]
            over = self.resident(GPU) - gpu.num_blocks
            if over > 0:
                victims = [
                    self.blocks[v]
                    for v in self.policies[GPU].pop_victims(over, self._evictable(protect, allow_reserved))
                ]
                stayed = self._place_below(
                    [b for b in victims if b.ref_count] + [b for b in victims if not b.ref_count],
                    self.kinds[1],
                    protect,
                    allow_reserved,
                )
                if stayed or len(victims) < over:  # the batch vacated at least as many slots below: cannot happen
                    raise AssertionError("tierkv bug: victims of a reserve-slot promotion found no room below")
        return started

    def _copy_on_write(self, seqs: list[_Sequence], plan: list[tuple[int, int, Block]], protect: set[int]) -> None:
        """Give the planned sequences private GPU copies of shared blocks: one transfer per source tier."""
        room = self._make_room(GPU, len(plan), protect, allow_reserved=True)
        if room < len(plan):
            raise AssertionError("tierkv bug: copy-on-write found no GPU room after the capacity check")
        by_tier: dict[int, list[tuple[Block, Block]]] = {}
        for i, j, old in plan:
            slot, busy = self.tiers[GPU].slots.take()
            new = Block(self._next_block_id, GPU, slot, ready=busy, has_data=old.has_data)
            self._next_block_id += 1
            self.blocks[new.block_id] = new
            self.policies[GPU].insert(new.block_id)
            seqs[i].blocks[j] = new
            self.peak_live_blocks = max(self.peak_live_blocks, len(self.blocks))
            old.ref_count -= 1
            if old.has_data:
                by_tier.setdefault(old.tier, []).append((old, new))
        for kind, pairs in by_tier.items():
            deps = [b.ready for pair in pairs for b in pair]
            if kind == GPU:
                deps.append(self.mover.compute_marker())
            handle = self.mover.move(
                self.tiers[kind], [o.slot for o, _ in pairs], self.tiers[GPU], [n.slot for _, n in pairs], deps
            )
            for old, new in pairs:
                new.ready = handle
                old.readers = all_of([old.readers, settled(handle)])
        self.cow_copies += len(plan)

    def _move(self, blocks: list[Block], dst_kind: int) -> None:
        """Move `blocks` (already out of their source policies) into tier `dst_kind`: one transfer per source tier."""
        if not blocks:
            return
        dst = self.tiers[dst_kind]
        by_src: dict[int, list[Block]] = {}
        for block in blocks:
            by_src.setdefault(block.tier, []).append(block)
            self._drop_host_copy(block)  # leaving the GPU other than onto it (to NVMe), the copy is no use
        for src_kind, group in by_src.items():
            src = self.tiers[src_kind]
            taken = dst.slots.take_many(len(group))
            moving = [(b, t) for b, t in zip(group, taken) if b.has_data]
            deps = [b.ready for b, _ in moving] + [busy for _, (_, busy) in moving]
            if src_kind == GPU and moving:
                deps.append(self.mover.compute_marker())
            elif src_kind == NVME and dst_kind == CPU:
                deps.append(self._host_read_marker)  # host writes into slots that streamed attention may still read
            keyed = dst_kind == NVME and any(b.key for b, _ in moving)
            try:
                handle = self.mover.move(
                    src,
                    [b.slot for b, _ in moving],
                    dst,
                    [s for _, (s, _) in moving],
                    deps,
                    keys=[b.key for b, _ in moving] if keyed else None,
                    token_ids=[b.token_ids for b, _ in moving] if keyed else None,
                )
            except BaseException:
                for slot, busy in taken:
                    dst.slots.give(slot, busy)
                for block in group:
                    self.policies[block.tier].insert(block.block_id)
                raise
            c_src, c_dst = self.counters[src_kind], self.counters[dst_kind]
            c_src.blocks_out += len(moving)
            c_dst.blocks_in += len(moving)
            keep_copy = src_kind == NVME and self.config.write_through
            keep_host = src_kind == CPU and dst_kind == GPU and self.keep_host_copies
            for block, (slot, busy) in zip(group, taken):
                if keep_host and block.has_data:
                    # The bytes stay in the CPU slot too: the block's copy there until it is written (see
                    # keep_host_copies).
                    block.host_slot, block.host_ready, block.host_busy = (
                        block.slot,
                        block.ready,
                        all_of([settled(handle), block.readers]),
                    )
                    self._host_order[block.block_id] = block
                elif keep_copy and block.key is not None and block.has_data:
                    # Write-through: the bytes it leaves on disk stay there as its copy (a spare, dropped first).
                    block.copy_slot, block.copy_ready = block.slot, all_of([handle, block.ready])
                    self._copy_order[block.block_id] = block
                else:
                    # The old slot is free once the transfer has read it (an empty block was never written).
                    src.slots.give(
                        block.slot, all_of([handle, block.ready, block.readers]) if block.has_data else block.ready
                    )
                block.readers = DONE
                if block.ref_count == 0:
                    self.cached[src_kind] -= 1
                    self.cached[dst_kind] += 1
                block.tier, block.slot = dst_kind, slot
                block.ready = handle if block.has_data else busy
                self.policies[dst_kind].insert(block.block_id)

    # -- data access -------------------------------------------------------------------------------------------
    def write_tokens(self, seq_id: Hashable, start: int, kv: torch.Tensor) -> None:
        """Write KV for token positions [start, start + n) of the sequence; `kv` has shape (L, 2, n, H, D).

        The host-side writer (tests, tools); the engine writes from its own kernels into the slots `acquire`
        returns. Positions must already exist (`append_tokens`).
        """
        seq = self._seq(seq_id)
        n = kv.shape[2]
        expect = (self.layout.num_layers, 2, n, self.layout.num_kv_heads, self.layout.head_dim)
        if tuple(kv.shape) != expect:
            raise ValueError(f"write_tokens: kv has shape {tuple(kv.shape)}, expected {expect}")
        if start < 0 or start + n > seq.num_tokens:
            raise ValueError(
                f"write_tokens: positions [{start}, {start + n}) outside the sequence's {seq.num_tokens} tokens"
            )
        if n == 0:
            return
        bs = self.layout.block_size
        # Check the copy-on-write room for the whole range first, so a failure leaves nothing half-written.
        shared = sum(1 for b in seq.blocks[start // bs : -(-(start + n) // bs)] if b.ref_count > 1)
        self._check_room(shared, f"copy-on-write for writing sequence {seq_id!r}")
        pinned_elsewhere = self._pinned_blocks
        chunk_blocks = max(1, self.tiers[GPU].num_blocks - pinned_elsewhere)  # longer ranges are written in pieces
        pos = start
        while pos < start + n:
            first = pos // bs
            end = min(start + n, (first + chunk_blocks) * bs)
            stop = -(-end // bs)
            table = self.acquire([seq_id], writes={seq_id: (pos, end)}, block_ranges={seq_id: (first, stop)})[0]
            try:
                tokens = torch.arange(pos, end)
                slots = torch.tensor(table, dtype=torch.int64)[tokens // bs - first]
                pool = self.tiers[GPU].pool
                values = kv[:, :, pos - start : end - start].to(device=pool.device, dtype=pool.dtype, non_blocking=True)
                pool[slots.to(pool.device), :, :, (tokens % bs).to(pool.device)] = values.permute(2, 0, 1, 3, 4)
            finally:
                self.release([seq_id])
            pos = end

    def read_block(self, block: Block) -> torch.Tensor:
        """A CPU copy of the block's bytes, from whichever tier holds it (waits for moves in flight)."""
        block.ready.wait()
        tier = self.tiers[block.tier]
        if isinstance(tier, NvmeTier):
            out = torch.empty((1, *self.layout.block_shape), dtype=self.layout.dtype)
            tier.store.read([block.slot], out, [0])
            return out[0]
        if tier.is_cuda:
            torch.cuda.current_stream(self.device).synchronize()
        return tier.pool[block.slot].to("cpu", copy=True)

    def read_tokens(self, seq_id: Hashable, start: int = 0, end: int | None = None) -> torch.Tensor:
        """A CPU copy of the KV of token positions [start, end), shape (L, 2, n, H, D), without moving blocks."""
        seq = self._seq(seq_id)
        end = seq.num_tokens if end is None else end
        if not 0 <= start <= end <= seq.num_tokens:
            raise ValueError(f"read_tokens: [{start}, {end}) is outside the sequence's {seq.num_tokens} tokens")
        bs = self.layout.block_size
        parts = []
        for i in range(start // bs, -(-end // bs)):
            data = self.read_block(seq.blocks[i])
            lo = max(start, i * bs) - i * bs
            hi = min(end, (i + 1) * bs) - i * bs
            parts.append(data[:, :, lo:hi])
        if not parts:
            return torch.empty(
                (self.layout.num_layers, 2, 0, self.layout.num_kv_heads, self.layout.head_dim), dtype=self.layout.dtype
            )
        return torch.cat(parts, dim=2)

    def residence(self, block: Block) -> tuple[str, bool]:
        """(tier name, whether a transfer into it is still in flight)."""
        return TIER_NAMES[block.tier], not block.ready.done()

    # -- stats, checks, shutdown -----------------------------------------------------------------------------
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
        self.counters = {k: TierCounters() for k in self.kinds}
        self.mover.links.clear()

    def check_invariants(self) -> None:
        """Raise AssertionError if the bookkeeping is inconsistent (used by tests; O(blocks))."""
        refs: dict[int, int] = {}
        for seq in self.sequences.values():
            assert len(seq.blocks) == self.layout.num_blocks_for(seq.num_tokens), "table length != tokens"
            for b in seq.blocks:
                refs[b.block_id] = refs.get(b.block_id, 0) + 1
        live = {bid for bid, b in self.blocks.items() if b.ref_count > 0}
        assert set(refs) == live, "blocks in use != blocks referenced by tables"
        for bid, block in self.blocks.items():
            assert block.ref_count == refs.get(bid, 0), (
                f"block {bid}: ref_count {block.ref_count} != {refs.get(bid, 0)} references"
            )
            assert bid in self.policies[block.tier], f"block {bid} not tracked by its tier's policy"
            if block.ref_count == 0:
                assert block.key is not None and self.index.get(block.key) is block, (
                    f"unheld block {bid} is not a cached block"
                )
            if block.key is not None:
                assert self.index.get(block.key) is block, f"block {bid}'s key is not indexed to it"
                assert block.token_ids is not None and block.has_data, f"keyed block {bid} has no tokens or no data"
        for key, block in self.index.items():
            assert block.key == key and self.blocks.get(block.block_id) is block, "the index names a block that is gone"
        for kind in self.kinds:
            held = sum(1 for b in self.blocks.values() if b.tier == kind and b.ref_count == 0)
            assert self.cached[kind] == held, f"{TIER_NAMES[kind]}: cached count {self.cached[kind]} != {held}"
        pins: dict[int, int] = {}
        for seq in self.sequences.values():
            for pinned in seq.pinned:
                for b in pinned:
                    pins[b.block_id] = pins.get(b.block_id, 0) + 1
        for bid, block in self.blocks.items():
            assert block.pins == pins.get(bid, 0), f"block {bid}: pins {block.pins} != {pins.get(bid, 0)}"
        assert self._pinned_blocks == len(pins), f"pinned-block count {self._pinned_blocks} != {len(pins)}"
        copies = [b.copy_slot for b in self.blocks.values() if b.copy_slot is not None]
        assert len(copies) == self.copies and all(b.copy_slot is not None for b in self._copy_order.values()), (
            "write-through copies are off"
        )
        for b in self.blocks.values():
            if b.copy_slot is not None:
                assert b.key is not None and b.tier != NVME, f"block {b.block_id} has a copy but is unkeyed or on NVMe"
        hosts = [b.host_slot for b in self.blocks.values() if b.host_slot is not None]
        assert len(hosts) == self.host_copies and all(b.host_slot is not None for b in self._host_order.values()), (
            "host copies are off"
        )
        for b in self.blocks.values():
            if b.host_slot is not None:
                assert b.tier == GPU and b.has_data, (
                    f"block {b.block_id} has a host copy but is not a GPU block with data"
                )
        for kind, tier in self.tiers.items():
            spare = copies if kind == NVME else hosts if kind == CPU else []
            used = [b.slot for b in self.blocks.values() if b.tier == kind] + spare
            assert len(used) == len(set(used)), f"{tier.name}: two blocks (or copies) share a slot"
            resident = len(used) - len(spare)
            assert resident == self.resident(kind), f"{tier.name}: policy tracks {self.resident(kind)}, {resident} live"
            assert len(used) <= tier.num_blocks, (
                f"{tier.name}: {len(used)} blocks and copies > capacity {tier.num_blocks}"
            )
            free = tier.slots.free_slots()
            assert len(free) == len(tier.slots), f"{tier.name}: a slot is free twice"
            assert not (free & set(used)), f"{tier.name}: a used slot is also free"
            assert len(free) + len(used) == tier.num_slots, f"{tier.name}: slots leaked"
            live = sum(1 for b in self.blocks.values() if b.tier == kind and b.ref_count > 0)
            assert self.free_blocks(kind) == tier.num_blocks - live, (
                f"{tier.name}: free_blocks {self.free_blocks(kind)} != {tier.num_blocks} - {live} in use"
            )

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

"""The engine: one step = schedule, place KV blocks, run the model over the paged cache, sample, update."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from tierkv.attention import StepAttention, StreamedEntry, padded_tables
from tierkv.graphs import DecodeGraphs
from tierkv.handles import all_of
from tierkv.kernels import PagedBatch
from tierkv.loader import LoadedModel
from tierkv.page_manager import PageManager
from tierkv.prefix_cache import LoadOrRecompute, PrefixHasher, PrefixStats
from tierkv.sampling import SamplingParams, make_generator, sample_row, top_logprobs
from tierkv.scheduler import ScheduledEntry, Scheduler
from tierkv.sequence import Request, Sequence
from tierkv.tiers import GPU, NVME, TIER_NAMES


@dataclass(frozen=True)
class EntryPlan:
    """What a step runs for one sequence: tokens [start, end), its KV window from block `first_block` on."""

    seq_id: int
    start: int
    end: int
    first_block: int
    samples: bool  # its last row is sampled

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


@dataclass
class EngineCounters:
    steps: int = 0
    prompt_tokens: int = 0  # prompt tokens whose KV was computed
    generated_tokens: int = 0
    streamed_steps: int = 0  # steps in which some KV was streamed from below the GPU window
    busy_s: float = 0.0  # wall time inside step()


class Engine:
    staging_buffers = 2  # on CUDA: streamed chunks in flight (one being read, the others filling)
    staging_copy_streams = 2  # buffer b fills on stream b % this: two copy engines share the link

    def __init__(
        self,
        loaded: LoadedModel,
        pm: PageManager,
        scheduler: Scheduler,
        staging_blocks: int,
        seed: int,
        prefetch: bool,
        hasher: PrefixHasher | None = None,
        prefix_load: str = "auto",
        cuda_graphs: bool = False,
    ) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.spec = loaded.spec
        self.pm = pm
        self.scheduler = scheduler
        self.device = pm.device
        self.block_size = pm.layout.block_size
        self.prefetch_enabled = prefetch
        self.counters = EngineCounters()
        self.requests: list[Request] = []
        self._next_seq = 0
        self._arrivals = 0
        self._generator = torch.Generator(device=self.device).manual_seed(seed)
        layout = pm.layout
        # Streaming through staging: two buffers on CUDA (one fills on the copy stream while the other is read).
        cuda = self.device.type == "cuda"
        self.staging = torch.empty(
            (self.staging_buffers if cuda else 1, staging_blocks, 2, layout.block_size, layout.num_kv_heads, layout.head_dim),
            dtype=layout.dtype, device=self.device,
        )
        self.copy_streams = [torch.cuda.Stream(self.device) for _ in range(self.staging_copy_streams)] if cuda else None
        self.scale = self.spec.head_dim**-0.5
        self.hasher = hasher  # None: no prefix caching
        self.prefix_load = prefix_load
        self.chooser = LoadOrRecompute(layout.block_nbytes, layout.block_size)
        self.prefix_stats = PrefixStats()
        self.register_blocks = True
        self.tp_driver = None  # tensor parallelism: sends each step's plan to the other ranks (tierkv.parallel)
        self.graphs = DecodeGraphs(self) if cuda_graphs and cuda else None  # decode steps replayed as CUDA graphs

    # -- requests ----------------------------------------------------------------------------------------------
    def add_request(self, request_id: str, index: int, prompt: str | None, prompt_ids: list[int], params: SamplingParams) -> Request:
        req = Request(request_id, index, prompt, list(prompt_ids), params, self._arrivals)
        self._arrivals += 1
        self.scheduler.add(req)
        self.requests.append(req)
        return req

    def _new_sequence(self, req: Request, sample_index: int, token_ids: list[int], num_computed: int) -> Sequence:
        seq = Sequence(
            self._next_seq, req, sample_index, list(token_ids), len(req.prompt_ids),
            make_generator(req.params, sample_index, self.device, self._generator), num_computed,
        )
        self._next_seq += 1
        req.sequences.append(seq)
        return seq

    def _admit(self, req: Request) -> Sequence:
        seq = self._new_sequence(req, 0, req.prompt_ids, 0)
        self.pm.add_sequence(seq.seq_id)
        if self.hasher is not None:
            self._reuse_prefix(req, seq)
        return seq

    # A long prompt is looked up in two parts: the first `early_blocks` blocks, whose promotion starts at once where
    # it is sure to be used, then the rest (hashing 2,048 blocks takes milliseconds the link can already use).
    early_blocks = 128

    def _reuse_prefix(self, req: Request, seq: Sequence) -> None:
        """Start the sequence with the longest prefix of its prompt whose KV is stored in any tier (at least the
        last prompt token is always computed, for its logits)."""
        bs, pm, stats = self.block_size, self.pm, self.prefix_stats
        prompt = req.prompt_ids
        seq.root = self.hasher.root(req.params.cache_salt)
        full = (len(prompt) - 1) // bs
        head = min(full, self.early_blocks)
        if self.prefix_load == "auto":
            self.chooser.observe_links(pm.mover.links)  # the rates the early promotion and the choice go by
        keys = self.hasher.keys(seq.root, prompt, head)
        hits = pm.lookup(keys, (prompt[j * bs : (j + 1) * bs] for j in range(head)))  # sliced only up to a miss
        tiers = [TIER_NAMES[b.tier] for b in hits]  # where each was found (before any promotion)
        if self.prefetch_enabled:
            self._promote_early(hits, tiers)
        if len(hits) == head < full:
            more = self.hasher.keys(keys[-1], prompt[head * bs :], full - head)
            keys += more
            found = pm.lookup(more, (prompt[j * bs : (j + 1) * bs] for j in range(head, full)))
            hits += found
            tiers += [TIER_NAMES[b.tier] for b in found]
        stats.queried_tokens += full * bs
        if self.prefix_load == "auto":
            use = self.chooser.choose(tiers, len(prompt))
        else:
            use = len(hits)
        stats.recomputed_by_choice += (len(hits) - use) * bs
        hits = hits[:use]
        if any(b.tier == NVME for b in hits):
            good = pm.load_from_disk(hits, protect=set())
            stats.dropped_corrupt += (len(hits) - good) * bs
            hits = hits[:good]
        for tier in tiers[: len(hits)]:
            stats.by_tier[tier] += bs
        pm.attach(seq.seq_id, hits)
        seq.num_computed = len(hits) * bs
        seq.keys = keys[: len(hits)]
        req.num_cached_tokens = len(hits) * bs
        stats.hit_tokens += len(hits) * bs
        if any(b.tier != GPU for b in hits) and self.prefetch_enabled:
            pm.prefetch([seq.seq_id])  # one batched promotion, started now, while other work runs

    def _promote_early(self, hits: list, tiers: list[str]) -> None:
        """Start promoting the leading found blocks that are in the GPU or CPU tier, where loading them is sure to
        be chosen: with "always", or where each costs less to load than to recompute (then the choice over the whole
        prefix, made later, keeps at least these)."""
        lead = 0
        while lead < len(tiers) and tiers[lead] in ("gpu", "cpu"):
            lead += 1
        if not lead or "cpu" not in tiers[:lead]:
            return
        if self.prefix_load == "auto" and self.chooser.prefill_tokens_per_s is not None:
            if self.chooser.load_seconds("cpu") >= self.block_size / self.chooser.prefill_tokens_per_s:
                return
        self.pm.promote_cached(hits[:lead])

    def _register_full_blocks(self, seq: Sequence) -> None:
        """Give the sequence's newly completed blocks their content keys (chained from its root)."""
        bs = self.block_size
        while len(seq.keys) < seq.num_computed // bs:
            j = len(seq.keys)
            tokens = seq.token_ids[j * bs : (j + 1) * bs]
            key = self.hasher.key(seq.keys[-1] if seq.keys else seq.root, tokens)
            self.pm.register(seq.seq_id, j, key, tokens)
            seq.keys.append(key)

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    # -- one step ------------------------------------------------------------------------------------------------
    def step(self) -> list[Request]:
        """Run one step; returns the requests that got new tokens (or finished) in it."""
        t0 = time.perf_counter()
        self.scheduler.admit(self._admit)
        entries = self.scheduler.schedule()
        if not entries:
            if self.scheduler.running:
                raise RuntimeError("tierkv bug: running sequences but nothing could be scheduled")
            return []
        pm = self.pm
        pm.begin_step()
        for e in entries:
            grow = e.end - pm.num_tokens(e.seq.seq_id)
            if grow > 0:
                pm.append_tokens(e.seq.seq_id, grow)
        ids = [e.seq.seq_id for e in entries]
        tables = pm.acquire(
            ids,
            writes={e.seq.seq_id: (e.start, e.end) for e in entries},
            block_ranges={e.seq.seq_id: (e.first_block, self.scheduler.blocks_for(e.end)) for e in entries},
            layered=self.device.type == "cuda",
        )
        try:
            plans = [EntryPlan(e.seq.seq_id, e.start, e.end, e.first_block, e.samples) for e in entries]
            placed = {p.seq_id: pm.pin_in_place(p.seq_id, p.first_block) for p in plans if p.first_block}
            input_ids = torch.tensor([t for e in entries for t in e.seq.token_ids[e.start : e.end]], dtype=torch.long)
            if self.tp_driver is not None:
                self.tp_driver.send_step(plans, input_ids, tables)
            logits, streamed = self.run_forward(plans, tables, placed, input_ids)
        except Exception as exc:
            if self.tp_driver is not None:
                self.tp_driver.raise_if_worker_failed(exc)
            raise
        finally:
            pm.release(ids)
        sampled = [e for e in entries if e.samples]
        touched = self._update(entries, sampled, logits)
        prefill_tokens = sum(min(e.end, e.seq.num_prompt) - e.start for e in entries if e.start < e.seq.num_prompt)
        if prefill_tokens:
            self.chooser.observe_prefill(prefill_tokens, time.perf_counter() - t0)
        if self.prefetch_enabled:
            upcoming = [s.seq_id for s in self.scheduler.upcoming()]
            if upcoming:
                pm.prefetch(upcoming, keep=[s.seq_id for s in self.scheduler.staying()])
        if self.tp_driver is not None:
            self.tp_driver.flush()  # the step's bookkeeping (release, forks, frees, prefetch) to the other ranks now
        self.counters.steps += 1
        self.counters.streamed_steps += bool(streamed)
        self.counters.busy_s += time.perf_counter() - t0
        return touched

    def run_forward(
        self, plans: list[EntryPlan], tables: list[list[int]], placed: dict[int, list[tuple[int, int]]], input_ids: torch.Tensor
    ) -> tuple[torch.Tensor | None, bool]:
        """The model over one step's tokens, with KV where `tables` (GPU window) and `placed` (older blocks,
        streamed) say; returns the logits of the sampled rows (or None) and whether anything was streamed. Every
        tensor-parallel rank runs this with the same arguments."""
        if self.graphs is not None and self.graphs.eligible(plans, tables):
            waits = self.pm.take_layer_waits()
            if waits:  # a replay cannot wait layer by layer: blocks still arriving are waited for as a whole
                all_of(waits).wait_on(torch.cuda.current_stream(self.device))
            return self.graphs.run(plans, tables, input_ids), False
        streamed = self._stream_plan(plans, placed)
        attend = self._attention(plans, tables, streamed)
        attend.layer_waits = self.pm.take_layer_waits()  # blocks still arriving, layer group by layer group
        positions = torch.cat([torch.arange(p.start, p.end) for p in plans])
        hidden = self.model(input_ids.to(self.device), positions.to(self.device), attend)
        rows, row = [], 0
        for p in plans:
            row += p.num_tokens
            if p.samples:
                rows.append(row - 1)
        logits = self.model.logits(hidden[torch.tensor(rows, device=self.device)]) if rows else None
        return logits, bool(streamed)

    def _stream_plan(self, plans: list[EntryPlan], placed: dict[int, list[tuple[int, int]]]) -> list[StreamedEntry]:
        out = []
        row = 0
        for i, p in enumerate(plans):
            if p.first_block:
                tiers = [self.pm.tiers[kind] for kind, _ in placed[p.seq_id]]
                out.append(StreamedEntry(i, (row, row + p.num_tokens), p.start, tiers, [slot for _, slot in placed[p.seq_id]]))
            row += p.num_tokens
        return out

    def _attention(self, entries: list[EntryPlan], tables: list[list[int]], streamed: list[StreamedEntry]) -> StepAttention:
        bs = self.block_size
        starts, slot_mapping = [0], []
        for e, table in zip(entries, tables):
            starts.append(starts[-1] + e.num_tokens)
            for p in range(e.start, e.end):
                slot_mapping.append(table[p // bs - e.first_block] * bs + p % bs)
        width = max(len(t) for t in tables)
        dev = self.device
        batch = PagedBatch(
            q_starts=torch.tensor(starts, dtype=torch.int32, device=dev),
            q_pos0=torch.tensor([e.start for e in entries], dtype=torch.int32, device=dev),
            context_lens=torch.tensor([e.end for e in entries], dtype=torch.int32, device=dev),
            first_block=torch.tensor([e.first_block for e in entries], dtype=torch.int32, device=dev),
            block_tables=torch.from_numpy(padded_tables(tables, width)).to(dev),
            max_q=max(e.num_tokens for e in entries),
            max_context=max(e.end for e in entries),
            q_starts_host=starts,
        )
        return StepAttention(
            self.pm.tiers[GPU], batch, torch.tensor(slot_mapping, dtype=torch.int64, device=dev), streamed,
            self.staging, self.scale, self.spec.sliding_windows, self.copy_streams, self.pm.mover.debug_delay,
        )

    def _update(self, entries: list[ScheduledEntry], sampled: list[ScheduledEntry], logits: torch.Tensor | None) -> list[Request]:
        touched: dict[int, Request] = {}
        for e in entries:
            seq = e.seq
            if seq.prefilling:
                self.counters.prompt_tokens += min(e.end, seq.num_prompt) - e.start
            seq.num_computed = e.end
            if self.hasher is not None and self.register_blocks:
                self._register_full_blocks(seq)
        greedy = None
        if logits is not None:
            logits = logits.float()
            if any(e.seq.request.params.greedy for e in sampled):
                greedy = logits.argmax(-1).tolist()  # every greedy row in one device-to-host copy
        for i, e in enumerate(sampled):
            seq = e.seq
            req = seq.request
            row = logits[i]
            targets = [seq]
            if req.params.n > 1 and len(req.sequences) == 1:
                # The prompt is done: the other samples fork from it, sharing its blocks (copy-on-write).
                for k in range(1, req.params.n):
                    child = self._new_sequence(req, k, seq.token_ids, seq.num_computed)
                    child.root, child.keys = seq.root, list(seq.keys)
                    self.pm.fork(seq.seq_id, child.seq_id)
                    self.scheduler.add_running(child, after=targets[-1])
                    targets.append(child)
            for s in targets:
                token = greedy[i] if req.params.greedy else sample_row(row, req.params, s.generator)
                lp = top_logprobs(row, token, req.params.logprobs) if req.params.logprobs is not None else None
                s.append(token, lp, self.loaded.eos_token_ids, self.loaded.tokenizer)
                self.counters.generated_tokens += 1
                if s.finished:
                    self.scheduler.finish(s)
                    self.pm.free(s.seq_id)
            touched[req.arrival] = req
        return list(touched.values())

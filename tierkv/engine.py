"""The engine: one step = schedule, place KV blocks, run the model over the paged cache (tierkv.runner), sample,
update. Requests in, finished requests out; a failed step aborts what it touched and leaves the engine usable."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from tierkv import beam_steps
from tierkv.beam import BeamSearch, BeamSearchParams
from tierkv.kv.manager import PageManager
from tierkv.kv.prefix_cache import PrefixHasher
from tierkv.kv.prefix_reuse import PrefixReuse
from tierkv.kv.repair import repair
from tierkv.loader import LoadedModel
from tierkv.runner import EntryPlan, ModelRunner
from tierkv.sampling import SamplingParams, adjust_logits, make_generator, sample_row, top_logprobs
from tierkv.scheduler import ScheduledEntry, Scheduler
from tierkv.sequence import Request, Sequence


@dataclass
class EngineCounters:
    steps: int = 0
    prompt_tokens: int = 0  # prompt tokens whose KV was computed
    generated_tokens: int = 0
    streamed_steps: int = 0  # steps in which some KV was streamed from below the GPU window
    busy_s: float = 0.0  # wall time inside step()
    deferred_steps: int = 0  # steps whose tokens were read back while the next step ran (asynchronous scheduling)


@dataclass
class LaunchedStep:
    """A step queued on the device whose sampled tokens the host has not read yet."""

    entries: list[ScheduledEntry]
    sampled: list[ScheduledEntry]
    logits: torch.Tensor | None  # the sampled rows' logits (None when deferred: only the greedy tokens are kept)
    greedy: torch.Tensor | None  # argmax of each sampled row, on the device
    t0: float
    prefill_tokens: int
    deferred: bool  # completed during the next step
    streamed: bool
    greedy_host: torch.Tensor | None = None  # deferred on CUDA: the greedy tokens' pinned host copy, queued at launch
    landed: torch.cuda.Event | None = None  # recorded after that copy
    prompt_logits: torch.Tensor | None = None  # rows of prompts whose log-probabilities were asked, in entry order
    prompt_rows: list[tuple[ScheduledEntry, int]] = ()  # (entry, its rows in prompt_logits)


def _prompt_logit_rows(e: ScheduledEntry) -> int:
    """How many of the entry's first rows give prompt log-probabilities: those before the prompt's last token."""
    if e.seq.params.prompt_logprobs is None or e.seq.sample_index:
        return 0
    return max(0, min(e.end, e.seq.num_prompt - 1) - e.start)


def _plain_greedy(p: SamplingParams) -> bool:
    """The next token is the argmax of the raw logits (computed for the whole step at once, on the device)."""
    return p.greedy and not p.adjusts_logits


class Engine:
    """The step loop: admit requests, schedule, place their KV blocks, run the model (the runner), sample, update;
    with prefix reuse where a hasher is given."""

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
        async_scheduling: bool = True,
    ) -> None:
        self.loaded = loaded
        self.pm = pm
        self.scheduler = scheduler
        self.device = pm.device
        self.prefetch_enabled = prefetch
        self.counters = EngineCounters()
        self.live: dict[int, Request] = {}  # unfinished requests by arrival number
        self.finished_log: list[Request] = []  # requests that finished or were aborted, until the caller takes them
        self._touching: dict[int, Request] = {}  # requests the step in progress has admitted or scheduled
        self._next_seq = 0
        self._arrivals = 0
        self._generator = torch.Generator(device=self.device).manual_seed(seed)
        self.runner = ModelRunner(loaded, pm, staging_blocks, scheduler.max_num_seqs, cuda_graphs)
        # None: no prefix caching
        self.prefix = PrefixReuse(pm, hasher, prefix_load, prefetch) if hasher is not None else None
        if self.prefix is not None:  # eviction passes over the cached prefixes that waiting requests will reuse
            pm.placement.wanted_soon = self._wanted_soon
        self.tp_driver = None  # tensor parallelism: sends each step's plan to the other ranks (tierkv.tp.driver)
        self.async_scheduling = async_scheduling
        self._inflight: LaunchedStep | None = None  # a deferred step: its tokens are read during the next step
        self._completing: LaunchedStep | None = None  # the step whose tokens the step in progress is reading
        self._synced_at = 0.0  # when the host last read a step's tokens back
        # Deferred steps' greedy tokens come back through these (one row per sequence of a step, at most).
        rows = scheduler.max_num_seqs
        cuda = self.device.type == "cuda"
        self._tokens_host = (
            [torch.empty(rows, dtype=torch.long, pin_memory=True) for _ in range(3)] if cuda and rows else []
        )
        self._token_buffer = 0

    # -- requests ----------------------------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        index: int,
        prompt: str | None,
        prompt_ids: list[int],
        params: SamplingParams,
        priority: int = 0,
        beam: BeamSearchParams | None = None,
    ) -> Request:
        req = Request(request_id, index, prompt, list(prompt_ids), params, self._arrivals, priority=priority)
        if beam is not None:  # `params` holds what the scheduler reserves for: beam_width samples of max_tokens
            req.beam = BeamSearch(beam, len(prompt_ids), self.loaded.eos_token_ids, self.loaded.tokenizer)
        self._arrivals += 1
        self.live[req.arrival] = req
        self.scheduler.add(req)
        return req

    def take_finished(self) -> list[Request]:
        """The requests that finished or were aborted since the last call, in that order."""
        done, self.finished_log = self.finished_log, []
        return done

    def retire(self, req: Request) -> None:
        """The request is over: it leaves the live set for the caller to take."""
        if self.live.pop(req.arrival, None) is not None:
            self.finished_log.append(req)

    def abort(self, requests) -> None:
        """Stop `requests` now, wherever they are: waiting, running, or in a step still on the device (whose
        results for them are then dropped). Their blocks are freed in every tier; they finish with reason "abort"."""
        self._forget(requests)
        for req in requests:
            for seq in req.sequences:
                if seq.seq_id in self.pm.sequences:
                    self.pm.free(seq.seq_id)

    def _forget(self, requests) -> None:
        """Take `requests` out of the scheduler and mark them aborted; their page-manager sequences stay."""
        now = time.perf_counter()
        running = self.scheduler.running
        for req in requests:
            if self.live.get(req.arrival) is not req:
                continue  # finished already
            req.aborted = True
            if req in self.scheduler.waiting:
                self.scheduler.waiting.remove(req)
                if self.prefix is not None:
                    self.prefix.forget(req)
            for seq in req.sequences:
                seq.pending.clear()
                if not seq.finished:
                    seq.finish_reason, seq.finish_time = "abort", now
                if seq in running:
                    running.remove(seq)
            self.scheduler.reserved.pop(req.arrival, None)
            self.retire(req)

    def _new_sequence(self, req: Request, sample_index: int, token_ids: list[int], num_computed: int) -> Sequence:
        seq = Sequence(
            self._next_seq,
            req,
            sample_index,
            list(token_ids),
            len(req.prompt_ids),
            make_generator(req.params, sample_index, self.device, self._generator),
            num_computed,
        )
        self._next_seq += 1
        req.sequences.append(seq)
        return seq

    def fork(self, parent: Sequence, after: Sequence | None = None) -> Sequence:
        """A new sample of the parent's request continuing from its tokens and sharing its blocks (copy-on-write),
        running next after `after` (default: the parent)."""
        req = parent.request
        child = self._new_sequence(req, len(req.sequences), parent.token_ids, parent.num_computed)
        child.root, child.keys, child.started = parent.root, list(parent.keys), True
        self.pm.fork(parent.seq_id, child.seq_id)
        if not self.scheduler.share_blocks:  # (the A/B baseline of benchmarks/beam_sharing.py)
            self.pm.unshare(child.seq_id)
        self.scheduler.add_running(child, after=after or parent)
        return child

    def _admit(self, req: Request) -> Sequence:
        self._touching[req.arrival] = req
        seq = self._new_sequence(req, 0, req.prompt_ids, 0)
        if req.beam is not None:
            req.beam_seqs = [seq] * req.beam.k  # the search's first step starts from k copies of the prompt
        self.pm.add_sequence(seq.seq_id)
        if self.prefix is not None:
            self.prefix.start(req, seq)
        return seq

    def _wanted_soon(self) -> set[int]:
        waiting = self.scheduler.waiting
        return self.prefix.wanted_by(waiting, self.pm.ledger.step) if waiting else set()

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    # -- one step ------------------------------------------------------------------------------------------------
    def step(self) -> list[Request]:
        """Run one step; returns the requests that got new tokens (or finished) in it.

        With asynchronous scheduling a step whose sampled rows are all greedy is left running on the device: the
        next call plans and launches the following step (its input tokens taken on the device from this one's),
        then reads this one's tokens, so the host's bookkeeping overlaps the GPU. A sequence that this step ends
        (EOS, a stop) has one more step computed for it, whose result is dropped.

        A step that fails (an error, an I/O failure, KeyboardInterrupt at any point) aborts the requests it was
        running, frees their blocks in every tier, puts the page manager's bookkeeping right and re-raises the
        error, which carries `aborted_request_ids`; the engine takes new work at once."""
        try:
            return self._step()
        except BaseException as exc:
            if self.tp_driver is not None:
                raise  # the other ranks hold their own state: tierkv.LLM retires the engine instead
            aborted = self._recover()
            exc.aborted_request_ids = [r.request_id for r in aborted]
            if hasattr(exc, "add_note"):
                exc.add_note(
                    f"tierkv: the step failed; {len(aborted)} request(s) it was running were aborted and their KV "
                    f"blocks freed ({', '.join(exc.aborted_request_ids[:8])}{', ...' if len(aborted) > 8 else ''}); "
                    "the engine is ready for new requests"
                )
            raise
        finally:
            self._touching = {}
            self._completing = None

    def _recover(self) -> list[Request]:
        """After a failed step: abort the requests it touched (and any left between the scheduler's queues), free
        every page-manager sequence no running sequence owns, and rebuild the page manager's derived state."""
        involved = dict(self._touching)
        for launched in (self._inflight, self._completing):
            if launched is not None:
                involved.update((e.seq.request.arrival, e.seq.request) for e in launched.entries)
        self._inflight = self._completing = None
        queued = {id(r) for r in self.scheduler.waiting} | {id(s.request) for s in self.scheduler.running}
        involved.update((a, r) for a, r in self.live.items() if id(r) not in queued)
        aborted = [r for r in involved.values() if self.live.get(r.arrival) is r]
        self._forget(aborted)
        keep = {s.seq_id for s in self.scheduler.running}
        lost = repair(self.pm, set(self.pm.sequences) - keep)
        if lost:  # their KV did not survive (a transfer failed): their requests end too
            broken = list({s.request.arrival: s.request for s in self.scheduler.running if s.seq_id in lost}.values())
            self.abort(broken)
            aborted += broken
        reserved = self.scheduler.reserved
        for arrival in [a for a in reserved if a not in self.live]:
            del reserved[arrival]
        for seq in self.scheduler.running:
            reserved.setdefault(seq.request.arrival, self.scheduler.reservation(seq.request))
        return aborted

    def _step(self) -> list[Request]:
        t0 = time.perf_counter()
        self.scheduler.admit(self._admit)
        entries = self.scheduler.schedule()
        self._touching.update((e.seq.request.arrival, e.seq.request) for e in entries)
        self._completing = self._inflight
        prev, self._inflight = self._inflight, None
        if not entries and prev is None:
            if self.scheduler.running:
                raise RuntimeError("tierkv bug: running sequences but nothing could be scheduled")
            return []
        launched = self._launch(entries, t0) if entries else None
        touched = self._complete(prev) if prev is not None else []
        if launched is not None:
            if launched.deferred:
                self._inflight = launched
            else:
                touched = list({r.arrival: r for r in touched + self._complete(launched)}.values())
            if self.prefetch_enabled:
                upcoming, staying = self.scheduler.prefetch_targets()
                if upcoming:
                    self.pm.prefetch([s.seq_id for s in upcoming], keep=[s.seq_id for s in staying])
            if self.tp_driver is not None:
                self.tp_driver.flush()  # the step's bookkeeping (release, forks, frees, prefetch) to the other ranks now
            self.counters.steps += 1
            self.counters.streamed_steps += bool(launched.streamed)
            self.counters.deferred_steps += launched.deferred
        self.counters.busy_s += time.perf_counter() - t0
        return touched

    def drop_inflight(self) -> None:
        """Forget a step still in flight (closing): its tokens are never read."""
        if self._inflight is not None:
            for e in self._inflight.sampled:
                e.seq.pending.clear()
            self._inflight = None

    def _deferrable(self, e: ScheduledEntry) -> bool:
        """Its next token can stay on the device until the next step: greedy, no log-probs, no samples to fork."""
        p = e.seq.request.params
        return (
            e.seq.request.beam is None
            and p.greedy
            and not p.adjusts_logits
            and p.logprobs is None
            and (p.n == 1 or len(e.seq.request.sequences) == p.n)
        )

    def _launch(self, entries: list[ScheduledEntry], t0: float) -> LaunchedStep:
        """Place the step's blocks and queue its forward pass (and greedy sampling) on the device."""
        pm = self.pm
        pm.begin_step()
        for e in entries:
            if e.end > pm.num_tokens(e.seq.seq_id):  # (under tensor parallelism each call is sent to every rank)
                pm.grow_to(e.seq.seq_id, e.end)
        ids = [e.seq.seq_id for e in entries]
        tables = pm.acquire(
            ids,
            writes={e.seq.seq_id: (e.start, e.end) for e in entries},
            block_ranges={e.seq.seq_id: (e.first_block, self.scheduler.blocks_for(e.end)) for e in entries},
            layered=self.device.type == "cuda",
        )
        try:
            # A prompt's log-probabilities: the logits of its rows before its last token (row p predicts token p + 1).
            prompt_rows = [(e, _prompt_logit_rows(e)) for e in entries]
            plans = [EntryPlan(e.seq.seq_id, e.start, e.end, e.first_block, e.samples, rows) for e, rows in prompt_rows]
            prompt_rows = [(e, rows) for e, rows in prompt_rows if rows]
            placed = {p.seq_id: pm.pin_in_place(p.seq_id, p.first_block) for p in plans if p.first_block}
            input_ids, pending = self._input_ids(entries)
            if self.tp_driver is not None:
                self.tp_driver.send_step(plans, input_ids, tables)  # no pending tokens under TP: nothing is deferred
            logits, prompt_logits, streamed = self.runner.run_forward(plans, tables, placed, input_ids, pending)
        except Exception as exc:
            if self.tp_driver is not None:
                self.tp_driver.raise_if_worker_failed(exc)
            raise
        finally:
            pm.release(ids)
        sampled = [e for e in entries if e.samples]
        prefill_tokens = 0
        for e in entries:
            if e.seq.prefilling:
                prefill_tokens += min(e.end, e.seq.num_prompt) - e.start
            e.seq.num_computed = e.end
            e.seq.started = True
        self.counters.prompt_tokens += prefill_tokens
        greedy = None
        if logits is not None and any(_plain_greedy(e.seq.request.params) for e in sampled):
            greedy = logits.argmax(-1)
        deferred = (
            bool(sampled) and self.async_scheduling and self.tp_driver is None and all(map(self._deferrable, sampled))
        )
        greedy_host = landed = None
        if deferred:
            for i, e in enumerate(sampled):
                e.seq.pending.append((greedy, i))
            logits = None  # a graph's logits buffer is overwritten by the next replay: only the tokens are kept
            if greedy.is_cuda:
                # Queued now, behind this step only: read later, it must not wait for the next step too. The pinned
                # buffers take turns; a buffer comes round again only after its step has been read back.
                self._token_buffer = (self._token_buffer + 1) % len(self._tokens_host)
                greedy_host = self._tokens_host[self._token_buffer][: greedy.shape[0]]
                greedy_host.copy_(greedy, non_blocking=True)
                landed = torch.cuda.Event()
                landed.record()
        return LaunchedStep(
            entries,
            sampled,
            logits,
            greedy,
            t0,
            prefill_tokens,
            deferred,
            streamed,
            greedy_host,
            landed,
            prompt_logits,
            prompt_rows,
        )

    def _add_prompt_logprobs(self, step: LaunchedStep, touched: dict[int, Request]) -> None:
        rows = step.prompt_logits.float()
        at = 0
        for e, count in step.prompt_rows:
            req = e.seq.request
            if not req.finished:
                tokens = req.prompt_ids[e.start + 1 : e.start + 1 + count]
                k = req.params.prompt_logprobs
                req.add_prompt_logprobs(
                    [top_logprobs(rows[at + j], t, k) for j, t in enumerate(tokens)], self.loaded.tokenizer
                )
                touched[req.arrival] = req
            at += count

    @staticmethod
    def _input_ids(entries: list[ScheduledEntry]) -> tuple[torch.Tensor, list[tuple[int, torch.Tensor, int]]]:
        """The step's input tokens on the host, and for those still on the device (sampled by the step in flight)
        where they go: (row, that step's token tensor, its row there)."""
        ids: list[int] = []
        pending = []
        for e in entries:
            known = e.seq.token_ids[e.start : e.end]
            ids += known
            if len(known) < e.num_tokens:
                tokens, row = e.seq.pending[-1]
                pending.append((len(ids), tokens, row))
                ids.append(0)
        return torch.tensor(ids, dtype=torch.long), pending

    def _complete(self, step: LaunchedStep) -> list[Request]:
        """Read the step's sampled tokens (waiting for the device where they are still on it) and update its
        sequences: new tokens, stops, forks, finished sequences freed, full blocks registered for prefix reuse."""
        if step.landed is not None:
            step.landed.synchronize()  # this step's tokens are in pinned memory (the next step may still be running)
            greedy = step.greedy_host.tolist()
        else:
            greedy = step.greedy.tolist() if step.greedy is not None else None  # one device-to-host copy for all rows
        now = time.perf_counter()
        prefix = self.prefix
        if prefix is not None and step.prefill_tokens:
            # The device ran this step from when it was launched or, if later, when the previous step was read back.
            prefix.chooser.observe_prefill(step.prefill_tokens, now - max(step.t0, self._synced_at))
        self._synced_at = now
        if prefix is not None and prefix.register_blocks:
            for e in step.entries:
                if not e.seq.finished:
                    prefix.register_full_blocks(e.seq)
        logits = step.logits.float() if step.logits is not None else None
        beams = [i for i, e in enumerate(step.sampled) if e.seq.request.beam is not None and not e.seq.finished]
        if beams:  # their candidates, cut down on the device for the whole step at once
            width = max(step.sampled[i].seq.request.beam.keep for i in beams)
            beam_values, beam_ids = beam_steps.beam_candidates(logits, beams, width)
            beam_at = {i: r for r, i in enumerate(beams)}
        touched: dict[int, Request] = {}
        if step.prompt_rows:
            self._add_prompt_logprobs(step, touched)
        for i, e in enumerate(step.sampled):
            seq = e.seq
            if seq.finished:
                continue  # ended by the step before this one: what this step computed for it is dropped
            if step.deferred:
                seq.pending.pop(0)
            req = seq.request
            touched[req.arrival] = req
            if req.beam is not None:  # the search decides once every running beam's candidates are in
                r = beam_at[i]
                req.beam_rows[seq.seq_id] = (beam_values[r], beam_ids[r])
                seq.beam_waiting = True
                if all(s.seq_id in req.beam_rows for s in req.beam_seqs):
                    beam_steps.advance(self, req)
                continue
            targets = [seq]
            if req.params.n > 1 and len(req.sequences) == 1:
                # The prompt is done: the other samples fork from it, sharing its blocks (copy-on-write).
                for _ in range(1, req.params.n):
                    targets.append(self.fork(seq, after=targets[-1]))
            for s in targets:
                p = req.params
                if _plain_greedy(p):
                    token = greedy[i]
                else:
                    row = logits[i]
                    if p.adjusts_logits:
                        row = adjust_logits(row, p, req.prompt_ids, s.output_ids, self.loaded.eos_token_ids)
                    token = sample_row(row, p, s.generator)
                lp = top_logprobs(logits[i], token, req.params.logprobs) if req.params.logprobs is not None else None
                s.append(token, lp, self.loaded.eos_token_ids, self.loaded.tokenizer)
                self.counters.generated_tokens += 1
                if s.finished:
                    s.pending.clear()
                    self.scheduler.finish(s)
                    self.pm.free(s.seq_id)
            if req.finished:
                self.retire(req)
        return list(touched.values())

"""Continuous batching: which sequences run in each step, and how many of their tokens.

- Admission: a request joins when the tiers together can hold everything it may ever need (its prompt and
  max_tokens for each of its n samples, prompt blocks shared), so a running request never runs out of KV.
- Each step: decodes first (one token each), then prefill chunks, under a token budget (chunked prefill, so a
  long prompt never stalls running decodes) and under the GPU tier's block budget: a step's sequences must have
  their blocks on the GPU together. A sequence too long for the GPU tier runs alone, with only its newest blocks
  on the GPU and the older ones streamed by the attention.
- A sequence that has not begun starts only where the GPU tier has room for its prompt and its next
  `slice_steps` tokens beside what the sequences already begun will need over those steps: starting it must not
  push begun work off the GPU (that would swap KV out and back for no gain in throughput). With `oversubscribe`,
  new sequences start whenever the tiers together hold them, and everyone takes turns (better time to first
  token for later requests, at the cost of swapping).
- When the begun sequences outgrow the GPU tier under the default scheduling, those earliest in the running order
  run on and the newest wait, their KV swapped down, until others finish (each waiting sequence crosses the link
  once each way, however long it waits).
- Under the `priority` policy the order is by request priority first (lower runs first, as in vLLM): a new
  sequence needs room only beside the begun ones ahead of it, and begun ones of lower priority that no longer fit
  are left out, their KV swapped down (never recomputed), until room frees.
- With `oversubscribe` (or beside a sequence that streams), when the begun sequences do not all fit, they take
  turns: each keeps the GPU for about `slice_steps` steps, then gives way to the next in line (preemption by
  swapping: the page manager demotes its blocks; the next one's are prefetched a step ahead). The turns are
  staggered: a group of G sequences lets about G / slice_steps of them go each step (those that have run
  longest), not all G at once every slice_steps steps. The bytes swapped are the same, but spread evenly over the steps, each step's
  share crosses the link while steps compute (layer by layer) instead of the whole GPU tier at once between
  two steps, with nothing to compute meanwhile. (On the H100, 2026-11-24: see BENCHMARKS.md, item 4.)
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from tierkv.layout import blocks_for, request_blocks
from tierkv.sequence import Request, Sequence


@dataclass
class ScheduledEntry:
    seq: Sequence
    start: int  # first position computed in this step (= seq.num_computed)
    num_tokens: int
    first_block: int  # the step's GPU window starts at this logical block; earlier blocks are streamed

    @property
    def end(self) -> int:
        return self.start + self.num_tokens

    @property
    def samples(self) -> bool:
        """True if this step computes the sequence's last known token, so a next token is sampled."""
        return self.end == self.seq.num_tokens


class Scheduler:
    # Samples and beams of a request share their common blocks. Off only as the baseline that sharing is measured
    # against (benchmarks/beam_sharing.py): each forked sequence then owns copies of all of its blocks.
    share_blocks = True

    def __init__(
        self,
        block_size: int,
        gpu_blocks: int,
        total_blocks: int,
        max_num_batched_tokens: int,
        max_num_seqs: int,
        slice_steps: int,
        oversubscribe: bool = False,
        priority: bool = False,
    ) -> None:
        self.block_size = block_size
        self.oversubscribe = oversubscribe
        self.priority = priority  # order by request priority (lower first), then arrival / running order
        self.gpu_blocks = gpu_blocks
        self.total_blocks = total_blocks
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.slice_steps = slice_steps
        self.waiting: deque[Request] = deque()
        self.running: deque[Sequence] = deque()
        self.reserved: dict[int, int] = {}  # request arrival -> blocks reserved
        self.preemptions = 0
        self._credit = 0  # turns owed, in 1/slice_steps of a sequence: a group of G earns G per step sliced
        self._last_group: set[int] = set()
        self._rotated = False  # after the last scheduled step, some of its sequences give way

    def blocks_for(self, num_tokens: int) -> int:
        return blocks_for(num_tokens, self.block_size)

    def soon(self, seq: Sequence) -> int:
        """GPU blocks a sequence needs over the next `slice_steps` steps: its prompt and that many more tokens (at
        most max_tokens), for each of its samples (they share the prompt's full blocks)."""
        p = seq.params
        ahead = min(p.max_tokens - (seq.num_tokens - seq.num_prompt), self.slice_steps)  # num_tokens counts the prompt
        need = self.blocks_for(seq.num_tokens + max(0, ahead))
        if not seq.started and p.n > 1:
            need += (p.n - 1) * (self.blocks_for(ahead) + 1 if self.share_blocks else need)
        return need

    def reservation(self, request: Request) -> int:
        """Blocks a request may need at most: its n samples share the prompt's full blocks."""
        p = request.params
        return request_blocks(len(request.prompt_ids), p.max_tokens, p.n, self.block_size, self.share_blocks)

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def admit(self, make_sequence) -> list[Request]:
        """Move waiting requests (first come, first served) into running while their reservations fit."""
        admitted = []
        while self.waiting:
            req = min(self.waiting, key=lambda r: (r.priority, r.arrival)) if self.priority else self.waiting[0]
            need = self.reservation(req)
            seqs_after = len(self.running) + req.params.n
            if sum(self.reserved.values()) + need > self.total_blocks or (
                self.running and seqs_after > self.max_num_seqs
            ):
                break
            self.waiting.remove(req)
            self.reserved[req.arrival] = need
            self.running.append(make_sequence(req))
            admitted.append(req)
        return admitted

    def add_running(self, seq: Sequence, after: Sequence) -> None:
        """A forked sample joins right after its parent."""
        self.running.insert(self.running.index(after) + 1, seq)

    def finish(self, seq: Sequence) -> None:
        self.running.remove(seq)
        if seq.request.finished:
            self.reserved.pop(seq.request.arrival, None)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledEntry]:
        """The entries of the next step (empty only when nothing is running).

        Membership follows the running order (which time slicing rotates): a sequence joins if the GPU tier
        still has room for its blocks after one more token; the first sequence alone may be too long for the
        GPU tier, and then streams. Within the step, decodes take one token each first, then prefills share
        what is left of the token budget, each chunk as long as the GPU room allows; whole prompts (from token 0)
        come last.
        """
        group, streaming, skipped, blocks_left = self._members(self._order())
        tokens = self.max_num_batched_tokens
        entries: list[ScheduledEntry] = []
        starved = prefilled = False
        for seq in group:
            if not seq.prefilling:
                first = max(0, self.blocks_for(seq.num_computed + 1) - self.gpu_blocks) if seq is streaming else 0
                entries.append(ScheduledEntry(seq, seq.num_computed, 1, first))
                tokens -= 1
        for seq in group:
            if not seq.prefilling:
                continue
            start = seq.num_computed
            if tokens <= 0:
                starved = True  # no token budget left this step: it prefills in a later one
                continue
            n = min(seq.num_tokens - start, tokens)
            if seq is streaming:
                n = min(n, self.gpu_blocks * self.block_size - start % self.block_size)  # the window holds the chunk
                first = max(0, self.blocks_for(start + n) - self.gpu_blocks)
            else:
                room = self.blocks_for(start + 1) + blocks_left  # its reserved blocks plus what is still free
                n = min(n, room * self.block_size - start)
                blocks_left -= self.blocks_for(start + n) - self.blocks_for(start + 1)
                first = 0
            entries.append(ScheduledEntry(seq, start, n, first))
            tokens -= n
            prefilled = True
        # Whole prompts last (stable): the runner attends the step's trailing run of them in one call of their own.
        entries.sort(key=lambda e: e.start == 0 and e.first_block == 0)
        # Sequences left out for want of GPU room take turns only where turns are the point: with `oversubscribe`,
        # or beside a sequence that streams (it runs alone). Otherwise the begun sequences that grew past the tier
        # run to completion in running order while the newest wait, swapped down, for room to free: turns of
        # `slice_steps` steps would swap each one out and in again every few tokens (64 x (1024 + 1024) on an 8 GiB
        # tier moved 1.5 TB over the link with turns, for 65,536 tokens; BENCHMARKS.md, "Against vLLM").
        # Waiting for token budget is a reason to rotate only when the decodes took all of it (no prefill moved):
        # while some prefill moves each step, the others' turn comes without swapping anyone out.
        turns = skipped and (self.oversubscribe or streaming is not None)
        self._time_slice(entries, turns or (starved and not prefilled), waiting_for_room=skipped)
        return entries

    def _order(self) -> list[Sequence]:
        """The running order, by priority first under the priority policy (stable: turns still rotate within one
        priority)."""
        if not self.priority:
            return self.running
        return sorted(self.running, key=lambda s: s.request.priority)

    def _members(self, order) -> tuple[list[Sequence], Sequence | None, bool, int]:
        """Which sequences run in a step, taken in `order` (the running order): (the group, the one among them
        that streams or None, whether any runnable sequence was left out, GPU blocks left free). No side effects,
        so that the next step's group can be predicted for prefetch."""
        blocks_left = self.gpu_blocks
        group: list[Sequence] = []
        streaming: Sequence | None = None
        skipped = holding = False
        # A request's samples and beams share its prompt's full blocks: counted with the first of them only.
        in_group, in_committed = self._shared_counter(), self._shared_counter()
        # What the begun sequences will want of the GPU tier soon; a new one starts only in room beyond it. Under the
        # priority policy only the begun ones ahead of it in the order count: the lower ones give their room up.
        committed = 0
        if not (self.oversubscribe or self.priority):
            committed = sum(self.soon(s) - in_committed(s) for s in order if s.started and not s.finished)
        for seq in order:
            if seq.awaiting_last:
                continue  # done once the step in flight lands: neither scheduled nor a reason to rotate
            if self.priority and seq.started and not seq.finished and not self.oversubscribe:
                committed += self.soon(seq) - in_committed(seq)
            if not seq.started and not self.oversubscribe:
                want = self.soon(seq)
                if holding or (committed + want > self.gpu_blocks and (committed or group)):
                    holding = True  # it and the later new ones wait (first come, first started); not a lost turn
                    continue
                committed += want
            need = self.blocks_for(seq.num_computed + 1)
            if len(group) >= self.max_num_seqs or streaming is not None:
                skipped = True
            elif need - (shared := in_group(seq, count=False)) <= blocks_left:
                in_group(seq)
                group.append(seq)
                blocks_left -= need - shared
            elif not group:
                group.append(seq)  # longer than the whole GPU tier: runs alone, streaming its older blocks
                streaming = seq
                blocks_left = 0
            else:
                skipped = True
        return group, streaming, skipped, blocks_left

    def _shared_counter(self):
        """A function giving, for each sequence offered in turn, the blocks it shares with one offered before it:
        its prompt's full blocks where another sample or beam of its request came first (0 without sharing). With
        count=False it only looks (the sequence is not counted as offered)."""
        seen: set[int] = set()

        def shared(seq: Sequence, count: bool = True) -> int:
            request = seq.request.arrival
            if not self.share_blocks or request not in seen:
                if count:
                    seen.add(request)
                return 0
            return seq.num_prompt // self.block_size

        return shared

    def _time_slice(self, entries: list[ScheduledEntry], rotate: bool, waiting_for_room: bool) -> None:
        """While not everything fits on the GPU and `rotate`, let the sequences that have held it longest give way,
        about len(group) / slice_steps of them a step (each keeps it for about slice_steps steps): to the back of the
        running order. Without `rotate`, the sequences that ran in the last step and are left out of this one give
        their GPU room up (preempted, swapped down) until room frees."""
        group = {e.seq.seq_id for e in entries}
        if not rotate:
            self.preemptions += sum(
                1
                for s in self.running
                if s.seq_id in self._last_group and s.seq_id not in group and not (s.finished or s.awaiting_last)
            )
            self._last_group = group
            self._credit = 0
            self._rotated = waiting_for_room  # the next group may differ as room frees: prefetch looks ahead
            return
        self._last_group = group
        self._credit += len(group)
        turns = self._credit // self.slice_steps
        self._credit -= turns * self.slice_steps
        self._rotated = turns > 0
        if turns:
            ran = [s for s in self.running if s.seq_id in group][:turns]  # in running order: the longest on the GPU
            for s in ran:
                self.running.remove(s)
                self.running.append(s)
            self.preemptions += sum(1 for s in ran if not s.finished)

    def prefetch_targets(self) -> tuple[list[Sequence], list[Sequence]]:
        """(upcoming, staying) for prefetch, after this step was scheduled. Upcoming: where this step let some
        sequences go, those of the next step's group that are not running now (they take their places); only those
        that will run, not sequences still waiting to start or left out again. Staying: sequences that ran this step
        and run in the next one too (a prefetch must not evict them). (Looking a step further ahead, at the group
        after a step that will let some go, brought blocks in that the next step's growth then pushed out again.)"""
        last = self._last_group
        if not self._rotated:
            return [], [s for s in self.running if s.seq_id in last and not s.finished]
        nxt = self._members(self._order())[0]  # the next step's group, as far as the running order now tells
        return (
            [s for s in nxt if s.seq_id not in last and not s.finished],
            [s for s in nxt if s.seq_id in last and not s.finished],
        )

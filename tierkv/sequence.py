"""Requests and the sequences (samples) they run as, with their stop checks and incremental text."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch

from tierkv.beam import BeamSearch
from tierkv.outputs import CompletionOutput, Logprob, RequestOutput
from tierkv.sampling import SamplingParams


@dataclass(eq=False)
class Request:
    request_id: str
    index: int  # position in the caller's list
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    arrival: int
    sequences: list[Sequence] = field(default_factory=list)
    arrival_time: float = field(default_factory=time.perf_counter)
    num_cached_tokens: int = 0  # prompt tokens whose stored KV was reused
    aborted: bool = False  # stopped before it finished (by the caller, or by a step that failed): its KV is freed
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None  # filled as its prompt is computed, if asked
    priority: int = 0  # under the "priority" scheduling policy: lower runs first
    beam: BeamSearch | None = None  # a beam search request: its search; its running beams; their logits this step
    beam_seqs: list[Sequence] = field(default_factory=list)
    beam_rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # (top log-probs, ids)

    def __post_init__(self) -> None:
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]  # the first token has nothing before it

    @property
    def finished(self) -> bool:
        if self.beam is not None:
            return self.aborted or self.beam.done
        return self.aborted or (len(self.sequences) == self.params.n and all(s.finished for s in self.sequences))

    def add_prompt_logprobs(self, rows: list[dict[int, Logprob]], tokenizer) -> None:
        """The log-probabilities of the next prompt tokens (each given the ones before it), in order."""
        if tokenizer is not None:
            rows = [{t: replace(lp, decoded_token=tokenizer.decode([t])) for t, lp in r.items()} for r in rows]
        self.prompt_logprobs.extend(rows)

    def output(self) -> RequestOutput:
        seqs = sorted(self.sequences, key=lambda s: s.sample_index)
        firsts = [s.first_token_time for s in seqs if s.first_token_time is not None]
        metrics = {
            "arrival_time": self.arrival_time,
            "first_token_time": min(firsts) if firsts else None,
            "finished_time": max(s.finish_time for s in seqs) if self.finished else None,
        }
        if self.beam is not None:  # its beams, best first, once the search is over
            results = self.beam.results() if self.beam.done else []
            completions = [
                CompletionOutput(r, text, tokens, reason, cumulative_logprob=cum)
                for r, (tokens, cum, _, reason, text) in enumerate(results)
            ]
        else:
            completions = [s.completion() for s in seqs]
        return RequestOutput(
            self.request_id,
            self.prompt,
            list(self.prompt_ids),
            completions,
            self.finished,
            num_cached_tokens=self.num_cached_tokens,
            prompt_logprobs=list(self.prompt_logprobs) if self.prompt_logprobs is not None else None,
            metrics=metrics,
        )


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request: Request
    sample_index: int
    token_ids: list[int]  # prompt + generated
    num_prompt: int
    generator: torch.Generator
    num_computed: int = 0  # tokens whose KV is in the cache
    started: bool = False  # it has been in a step (a prefix hit alone does not start it)
    beam_waiting: bool = False  # a beam whose logits are in: it waits for the search's step
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    text_cut: str | None = None  # the text up to (or through) the stop string that ended it
    tokenizer: object = None  # set by the first append that has one; the text is decoded when asked for
    _decoded: tuple[int, str] | None = field(default=None, repr=False)  # (output tokens decoded, their text)
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    first_token_time: float | None = None
    finish_time: float | None = None
    root: bytes | None = None  # prefix cache: the key its block keys chain from (model, salt)
    keys: list[bytes] = field(default_factory=list)  # content keys of its full blocks so far
    # Asynchronous scheduling: tokens sampled by steps still in flight, as (that step's device tensor of greedy
    # tokens, row); the host learns them when the step completes, one step later.
    pending: list[tuple[torch.Tensor, int]] = field(default_factory=list, repr=False)

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        """The generated text, decoded when asked for (once per new token at most), not at every step: decoding
        every sequence's whole output each step was a large part of a decode step's host time at 256 sequences."""
        if self.text_cut is not None:
            return self.text_cut
        if self.tokenizer is None:
            return ""
        n = len(self.token_ids) - self.num_prompt
        if self._decoded is None or self._decoded[0] != n:
            self._decoded = (
                n,
                self.tokenizer.decode(self.output_ids, skip_special_tokens=self.params.skip_special_tokens),
            )
        return self._decoded[1]

    @property
    def num_tokens(self) -> int:
        """Tokens so far, those still on the device (sampled by a step in flight) included."""
        return len(self.token_ids) + len(self.pending)

    @property
    def awaiting_last(self) -> bool:
        """Nothing to run now: its last token (max_tokens reached) is sampled but not yet known on the host, or (a
        beam) its logits wait for its sibling beams' before the search picks the next tokens."""
        return self.beam_waiting or (bool(self.pending) and self.num_tokens - self.num_prompt >= self.params.max_tokens)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt :]

    @property
    def prefilling(self) -> bool:
        return self.num_computed < self.num_prompt

    def append(self, token: int, logprobs: dict[int, Logprob] | None, eos_ids: tuple[int, ...], tokenizer) -> None:
        """Add a sampled token, then decide whether the sequence is done."""
        now = time.perf_counter()
        if self.first_token_time is None:
            self.first_token_time = now
        self.token_ids.append(token)
        p = self.params
        if logprobs is not None:
            if tokenizer is not None:
                logprobs = {t: replace(lp, decoded_token=tokenizer.decode([t])) for t, lp in logprobs.items()}
            self.logprobs.append(logprobs)
            self.cumulative_logprob += logprobs[token].logprob
        if p.stop_token_ids and token in p.stop_token_ids:
            self.finish_reason, self.stop_reason = "stop", token
        elif not p.ignore_eos and token in eos_ids:
            self.finish_reason, self.stop_reason = "stop", token
        if tokenizer is not None:
            self.tokenizer = tokenizer
            if p.stop_list and not self.finished:
                self._check_stop_strings()  # needs the text now
        if not self.finished and len(self.output_ids) >= p.max_tokens:
            self.finish_reason = "length"
        if self.finished:
            self.finish_time = now

    def _check_stop_strings(self) -> None:
        for stop in self.params.stop_list:
            text = self.text
            at = text.find(stop)
            if at >= 0:
                end = at + len(stop) if self.params.include_stop_str_in_output else at
                self.text_cut = text[:end]
                self.finish_reason, self.stop_reason = "stop", stop
                return

    def completion(self) -> CompletionOutput:
        return CompletionOutput(
            index=self.sample_index,
            text=self.text,
            token_ids=list(self.output_ids),
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
            logprobs=list(self.logprobs) if self.params.logprobs is not None else None,
            cumulative_logprob=self.cumulative_logprob if self.params.logprobs is not None else None,
        )

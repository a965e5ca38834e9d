"""Beam search: the parameters, the outputs, and one request's search state, decided step by step as transformers'
`generate(num_beams=k)` decides it (its vectorised beam search of 2025-2026, for one request): the same tensor
operations in float32, so that the same logits give the same beams, token for token and in order.

The engine runs the beams as sequences that share KV blocks: a beam chosen by several candidates forks them
(sharing every block, copying the partial last one only when a child writes into it), a beam no candidate chose is
freed at once. `BeamSearch.step` only decides; the engine (tierkv/engine.py) carries the decision out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from tierkv.errors import ConfigError
from tierkv.sampling import SamplingParams

_MASKED = -1.0e9  # transformers' "impossible" score, added in float32 (it absorbs the log-probability it is added to)


@dataclass(frozen=True)
class BeamSearchParams:
    """vLLM's beam search parameters: `beam_width` beams, at most `max_tokens` new tokens each; a finished beam's
    score is its log-probability over (its new tokens) ** length_penalty; `early_stopping` as transformers'
    (True: stop once beam_width beams have finished; False: when no running beam can beat the finished ones by a
    heuristic; "never": the same with the best possible length); `ignore_eos`: EOS does not end a beam."""

    beam_width: int
    max_tokens: int = 16
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        def bad(name: str, want: str) -> ConfigError:
            return ConfigError(f"BeamSearchParams.{name}={getattr(self, name)!r}: {want}")

        for name in ("beam_width", "max_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise bad(name, "must be an integer >= 1")
        lp = self.length_penalty
        if isinstance(lp, bool) or not isinstance(lp, (int, float)) or not math.isfinite(lp):
            raise bad("length_penalty", "must be a finite number")
        if self.early_stopping not in (True, False, "never"):
            raise bad("early_stopping", 'must be true, false or "never"')
        if not isinstance(self.ignore_eos, bool):
            raise bad("ignore_eos", "must be true or false")

    def reservation(self) -> SamplingParams:
        """What the scheduler plans a beam request by: beam_width samples of max_tokens each, sharing the prompt."""
        return SamplingParams(n=self.beam_width, max_tokens=self.max_tokens, temperature=0, ignore_eos=True)


@dataclass
class BeamSearchSequence:
    """One returned beam: `tokens` (prompt and generated), the generated `text`, `cum_logprob` (the sum of its tokens'
    log-probabilities), `score` (that over its length ** length_penalty: what ranks the beams)."""

    tokens: list[int]
    text: str
    cum_logprob: float
    score: float
    finish_reason: str  # "stop" (EOS) or "length"


@dataclass
class BeamSearchOutput:
    """A prompt's beams, best first (beam_width of them)."""

    sequences: list[BeamSearchSequence] = field(default_factory=list)


class BeamSearch:
    """One request's search. `running` holds its beams' generated tokens in transformers' order (the first step's
    k beams are the prompt k times, all but the first at the masked score); `step(log_probs)` takes the running
    beams' next-token log-probabilities (k rows, in that order) and returns, for the next running beams in order,
    (index of the running beam it continues, its new token)."""

    def __init__(self, params: BeamSearchParams, prompt_len: int, eos_ids: tuple[int, ...], tokenizer=None) -> None:
        k = params.beam_width
        self.tokenizer = tokenizer  # (for the results' text)
        self.params, self.k, self.prompt_len = params, k, prompt_len
        self.eos = () if params.ignore_eos else tuple(eos_ids)
        self.max_len = prompt_len + params.max_tokens
        self.cur_len = prompt_len
        self.keep = max(2, 1 + len(self.eos)) * k  # candidates kept per step, enough for k to run on
        self.top_k_mask = torch.arange(self.keep) < k
        self.running: list[list[int]] = [[] for _ in range(k)]
        self.running_scores = torch.full((1, k), _MASKED)
        self.running_scores[0, 0] = 0.0
        self.finished: list[tuple[list[int], float]] = [([], 0.0)] * k  # (tokens, cum log-prob)
        self.finished_scores = torch.full((1, k), _MASKED)
        self.is_finished = torch.zeros((1, k), dtype=torch.bool)
        self.improvable = torch.ones((1, 1), dtype=torch.bool)
        self.done = False

    def step(self, log_probs: torch.Tensor, token_ids: torch.Tensor) -> list[tuple[int, int]]:
        """log_probs: (k, m) float32, each running beam's top m >= `keep` next-token log-probabilities (log-softmax
        of its logits), best first, and `token_ids` (k, m) their tokens: the same decision as over whole rows, since
        a candidate the search keeps is among its own beam's top `keep`. Returns the next running beams as (parent
        running index, token); sets `done` when the search is over (then the returned beams are unused)."""
        k, keep, width = self.k, self.keep, log_probs.shape[-1]
        if width * k < keep:  # (a row is cut to its top `keep` only where the vocabulary has more)
            raise ConfigError(f"beam search: beam_width {k} needs a vocabulary of at least {keep // k} tokens")
        acc = (log_probs.float() + self.running_scores.view(k, 1)).reshape(1, -1)
        top_scores, top_index = torch.topk(acc, k=keep)
        parents = (top_index // width)[0].tolist()
        tokens = token_ids.reshape(-1)[top_index[0]].tolist()
        candidates = [self.running[p] + [t] for p, t in zip(parents, tokens)]
        length = self.cur_len + 1
        hits = torch.tensor([[t in self.eos or length >= self.max_len for t in tokens]])

        # The next running beams: the best k candidates that did not just end.
        masked = top_scores + hits.to(torch.float32) * _MASKED
        nxt = torch.topk(masked, k=k)[1][0].tolist()
        self.running_scores = masked[:, nxt]
        self.running = [candidates[j] for j in nxt]

        # The finished beams: the best k of those kept so far and the candidates among the first k that just ended.
        just = hits & self.top_k_mask[None, :]
        normalized = top_scores / ((length - self.prompt_len) ** self.params.length_penalty)
        full = bool(self.is_finished.all()) and self.params.early_stopping is True
        normalized = normalized + float(full) * _MASKED
        normalized = normalized + (~self.improvable).to(torch.float32) * _MASKED
        normalized = normalized + (~just) * _MASKED
        merged_scores = torch.cat((self.finished_scores, normalized), dim=1)
        merged = self.finished + [(c, float(s)) for c, s in zip(candidates, top_scores[0].tolist())]
        merged_finished = torch.cat((self.is_finished, just), dim=1)
        best = torch.topk(merged_scores, k=k)[1]
        self.finished = [merged[j] for j in best[0].tolist()]
        self.finished_scores = merged_scores.gather(1, best)
        self.is_finished = merged_finished.gather(1, best)

        self.cur_len = length
        self._update_improvable()
        exists_open = not (bool(self.is_finished.all()) and self.params.early_stopping is True)
        self.done = not (bool(self.improvable.any()) and exists_open and not bool(hits.all()))
        return [(parents[j], tokens[j]) for j in nxt]

    def _update_improvable(self) -> None:
        """Whether a running beam may still beat the worst finished one (transformers' heuristic)."""
        p = self.params
        if p.early_stopping == "never" and p.length_penalty > 0.0:
            best_length = self.max_len - self.prompt_len
        else:
            best_length = self.cur_len - self.prompt_len
        best_running = self.running_scores[:, :1] / (best_length**p.length_penalty)
        worst_finished = torch.where(
            self.is_finished, torch.min(self.finished_scores, dim=1, keepdim=True)[0], torch.tensor(_MASKED)
        )
        self.improvable = self.improvable & torch.any(best_running > worst_finished, dim=-1, keepdim=True)

    def results(self) -> list[tuple[list[int], float, float, str, str]]:
        """The finished beams, best first: (generated tokens, cum log-prob, score, finish reason, text)."""
        out = []
        for (tokens, cum), score in zip(self.finished, self.finished_scores[0].tolist()):
            reason = "stop" if tokens and tokens[-1] in self.eos else "length"
            text = self.tokenizer.decode(tokens, skip_special_tokens=True) if self.tokenizer is not None else ""
            out.append((tokens, cum, score, reason, text))
        return out

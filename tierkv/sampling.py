"""Sampling parameters (the fields vLLM users know) and the sampler."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from tierkv.errors import ConfigError
from tierkv.outputs import Logprob


@dataclass
class SamplingParams:
    """How to pick each next token, and when to stop.

    temperature 0 is greedy. top_k <= 0 and top_p = 1 and min_p = 0 disable those filters. `seed` makes a
    request's samples reproducible whatever else runs beside it. `n` samples share the prompt's KV blocks
    (copy-on-write). `stop` strings end the text before them (unless include_stop_str_in_output);
    `stop_token_ids` and the model's EOS end the output after that token (EOS unless ignore_eos).
    `logprobs=k` returns, per generated token, the log-probabilities of the chosen token and the k most likely
    (from the model's distribution before penalties, temperature and filters); `prompt_logprobs=k` likewise per
    prompt token, each given the tokens before it (None for the first; such a request reuses no cached prefix,
    since every prompt position's logits are needed). Requests with different
    `cache_salt`s never reuse each other's cached prefixes.

    Adjustments of the logits before temperature, as OpenAI, transformers and vLLM define them: `logit_bias`
    ({token id: bias in [-100, 100]}) is added; `repetition_penalty` (> 0, 1 = off) divides the positive logits and
    multiplies the negative ones of every token in the prompt or the output so far (transformers' rule);
    `frequency_penalty` and `presence_penalty` (in [-2, 2]) subtract count * frequency + presence for every token
    the output holds already (OpenAI's rule); `min_tokens` keeps EOS and `stop_token_ids` out until that many
    tokens are out.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    n: int = 1
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    cache_salt: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    logit_bias: dict[int, float] | None = None
    prompt_logprobs: int | None = None
    stop_list: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        def bad(name: str, value, want: str) -> ConfigError:
            return ConfigError(f"SamplingParams.{name}={value!r}: {want}")

        def number(value) -> bool:  # a real, finite number (not a bool, not NaN or infinity)
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise bad("max_tokens", self.max_tokens, "must be an integer >= 1")
        if not number(self.temperature) or self.temperature < 0:
            raise bad("temperature", self.temperature, "must be a finite number >= 0 (0 = greedy)")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool):
            raise bad("top_k", self.top_k, "must be an integer (<= 0 disables it)")
        if not number(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", self.top_p, "must be in (0, 1]")
        if not number(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", self.min_p, "must be in [0, 1]")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise bad("seed", self.seed, "must be an integer or None")
        if not isinstance(self.n, int) or isinstance(self.n, bool) or self.n < 1:
            raise bad("n", self.n, "must be an integer >= 1")
        if self.logprobs is not None and (
            not isinstance(self.logprobs, int) or isinstance(self.logprobs, bool) or self.logprobs < 0
        ):
            raise bad("logprobs", self.logprobs, "must be None or an integer >= 0")
        if self.prompt_logprobs is not None and (
            not isinstance(self.prompt_logprobs, int)
            or isinstance(self.prompt_logprobs, bool)
            or self.prompt_logprobs < 0
        ):
            raise bad("prompt_logprobs", self.prompt_logprobs, "must be None or an integer >= 0")
        if self.stop is not None and not isinstance(self.stop, (str, list, tuple)):
            raise bad("stop", self.stop, "must be a non-empty string or a list of them")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not isinstance(s, str) or not s for s in stop):
            raise bad("stop", self.stop, "must be a non-empty string or a list of them")
        self.stop_list = stop
        if self.cache_salt is not None and not isinstance(self.cache_salt, str):
            raise bad("cache_salt", self.cache_salt, "must be a string or None")
        if self.stop_token_ids is not None and (
            not isinstance(self.stop_token_ids, (list, tuple))
            or any(not isinstance(t, int) or isinstance(t, bool) for t in self.stop_token_ids)
        ):
            raise bad("stop_token_ids", self.stop_token_ids, "must be a list of integers")
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, getattr(self, name), "must be true or false")
        for name in ("presence_penalty", "frequency_penalty"):
            if not number(getattr(self, name)) or not -2 <= getattr(self, name) <= 2:
                raise bad(name, getattr(self, name), "must be in [-2, 2] (0 = off)")
        if not number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", self.repetition_penalty, "must be a finite number > 0 (1 = off)")
        if not isinstance(self.min_tokens, int) or isinstance(self.min_tokens, bool) or self.min_tokens < 0:
            raise bad("min_tokens", self.min_tokens, "must be an integer >= 0")
        if self.min_tokens > self.max_tokens:
            raise bad("min_tokens", self.min_tokens, f"must be at most max_tokens ({self.max_tokens})")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise bad("logit_bias", self.logit_bias, "must be a mapping of token id to a bias in [-100, 100]")
            bias = {}
            for token, value in self.logit_bias.items():
                try:
                    token = int(token)  # JSON keys are strings
                except (TypeError, ValueError):
                    raise bad("logit_bias", self.logit_bias, f"key {token!r} is not a token id") from None
                if token < 0 or not number(value) or not -100 <= value <= 100:
                    raise bad("logit_bias", self.logit_bias, f"token {token}: the bias must be in [-100, 100]")
                bias[token] = float(value)
            self.logit_bias = bias

    @property
    def adjusts_logits(self) -> bool:
        """Penalties, a bias or min_tokens change the logits before a token is picked (even a greedy one)."""
        return bool(
            self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
            or self.min_tokens
            or self.logit_bias
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def make_generator(
    params: SamplingParams, sample_index: int, device: torch.device, fallback: torch.Generator
) -> torch.Generator:
    """Each seeded sample gets its own stream of random numbers: reproducible whatever runs beside it."""
    if params.seed is None:
        return fallback
    g = torch.Generator(device=device)
    g.manual_seed((params.seed * 1_000_003 + sample_index) % (2**63))
    return g


def adjust_logits(
    logits: torch.Tensor, params: SamplingParams, prompt: list[int], output: list[int], eos_ids: tuple[int, ...]
) -> torch.Tensor:
    """One row (V,) float32 after logit_bias, repetition, frequency and presence penalties, and min_tokens."""
    x = logits.clone()
    vocab = x.shape[-1]
    if params.logit_bias:
        ids = [t for t in params.logit_bias if t < vocab]
        x[ids] += torch.tensor([params.logit_bias[t] for t in ids], dtype=x.dtype, device=x.device)
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt) | set(output)), dtype=torch.long, device=x.device)
        picked = x[seen]
        x[seen] = torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
    if (params.frequency_penalty or params.presence_penalty) and output:
        counts = torch.bincount(torch.tensor(output, dtype=torch.long, device=x.device), minlength=vocab)[:vocab]
        x -= counts.to(x.dtype) * params.frequency_penalty + (counts > 0).to(x.dtype) * params.presence_penalty
    if len(output) < params.min_tokens:
        stops = [t for t in (*eos_ids, *(params.stop_token_ids or ())) if t < vocab]
        x[stops] = float("-inf")
    return x


def process_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p, min-p as -inf masks; one row (V,) float32."""
    x = logits / params.temperature
    if params.top_k > 0 and params.top_k < x.shape[-1]:
        kth = torch.topk(x, params.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        probs = sorted_x.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of the tokens ranked above each one
        drop = before >= params.top_p
        x = x.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    if params.min_p > 0.0:
        probs = x.softmax(-1)
        x = x.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    return x


def sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token id from one row of float32 logits."""
    if params.greedy:
        return int(torch.argmax(logits))
    probs = process_logits(logits, params).softmax(-1)
    # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p, with one generator per sample.
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return int(torch.argmax(probs / noise))


def top_logprobs(logits: torch.Tensor, token: int, k: int) -> dict[int, Logprob]:
    """Log-probabilities, with their ranks, of `token` and of the k most likely tokens, from the raw distribution
    (the chosen token first; its rank counts the tokens strictly more likely, plus one)."""
    lp = torch.log_softmax(logits, dim=-1)
    chosen = lp[token]
    out = {token: Logprob(float(chosen), int((lp > chosen).sum()) + 1)}
    if k:
        values, ids = torch.topk(lp, k)
        for rank, (v, i) in enumerate(zip(values.tolist(), ids.tolist()), start=1):
            out.setdefault(i, Logprob(v, rank))
    return out

"""What `LLM.generate` returns: the shape vLLM users know."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Logprob:
    """One token's log-probability, as vLLM gives it: `rank` 1 is the most likely token; `decoded_token` its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    """One sample of a request."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = (
        None  # "stop" (EOS, stop token or stop string), "length", "abort", or None while running
    )
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    logprobs: list[dict[int, Logprob]] | None = None  # per generated token, when SamplingParams.logprobs is set
    cumulative_logprob: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """A request's prompt and its `n` samples."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    num_cached_tokens: int = 0
    # per prompt token when SamplingParams.prompt_logprobs is set: None for the first, then as `logprobs` gives them
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    # time.perf_counter() seconds: when the request was added, its first token, its last sample finished
    metrics: dict = field(default_factory=dict)

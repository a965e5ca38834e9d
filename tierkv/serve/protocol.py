"""OpenAI's HTTP protocol for completions and chat: request bodies into tierkv's SamplingParams and prompts, tierkv's
outputs into OpenAI's responses and stream chunks, and OpenAI's error shape."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tierkv.beam import BeamSearchParams
from tierkv.errors import ConfigError
from tierkv.outputs import RequestOutput
from tierkv.sampling import SamplingParams


class OpenAIError(Exception):
    """An error the client gets as `{"error": {"message", "type", "param", "code"}}` with HTTP `status`."""

    TYPES = {
        400: "invalid_request_error",
        401: "authentication_error",
        404: "not_found_error",
        413: "invalid_request_error",
    }

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = self.TYPES.get(self.status, "server_error" if self.status >= 500 else "rate_limit_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields both routes share; tierkv's own (top_k, min_p, ignore_eos, cache_salt, ...) as extra body fields."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    top_k: int | None = None
    min_p: float | None = None
    ignore_eos: bool | None = None
    cache_salt: str | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    prompt_logprobs: int | None = None  # vLLM's extra field: each choice gets "prompt_logprobs" in vLLM's shape
    priority: int = 0  # vLLM's extra field: lower runs first (a server started with scheduling_policy=priority)
    use_beam_search: bool = False  # vLLM's extra fields: beam search of width best_of (or n), the best n returned
    best_of: int | None = None
    length_penalty: float = 1.0
    early_stopping: bool | Literal["never"] = False

    def beam(self, max_tokens: int | None, logprobs: bool) -> BeamSearchParams | None:
        """The beam search the request asks for (use_beam_search), or None. `logprobs`: the request asks for them
        (beams come without)."""
        if self.use_beam_search and (logprobs or self.prompt_logprobs is not None):
            raise OpenAIError(400, "use_beam_search returns no log-probabilities: leave logprobs out", "logprobs")
        if not self.use_beam_search:
            if self.best_of is not None and self.best_of != self.n:
                raise OpenAIError(400, "best_of other than n needs use_beam_search: true", param="best_of")
            return None
        width = self.best_of if self.best_of is not None else self.n
        if width < self.n:
            raise OpenAIError(400, f"best_of {width} is less than n {self.n}: no more beams than the width", "best_of")
        try:
            return BeamSearchParams(
                width,
                max_tokens if max_tokens is not None else 16,
                self.length_penalty,
                self.early_stopping,
                bool(self.ignore_eos),
            )
        except ConfigError as exc:
            raise OpenAIError(400, str(exc)) from None

    def sampling(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        kwargs = {
            "n": self.n,
            "stop": self.stop,
            "seed": self.seed,
            "logprobs": logprobs,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "logit_bias": self.logit_bias,
        }
        if max_tokens is not None:
            kwargs["max_tokens"] = max_tokens
        for name in (
            "temperature",
            "top_p",
            "top_k",
            "min_p",
            "ignore_eos",
            "cache_salt",
            "stop_token_ids",
            "repetition_penalty",
            "min_tokens",
            "include_stop_str_in_output",
            "skip_special_tokens",
            "prompt_logprobs",
        ):
            if getattr(self, name) is not None:
                kwargs[name] = getattr(self, name)
        try:
            return SamplingParams(**kwargs)
        except ConfigError as exc:
            raise OpenAIError(400, str(exc)) from None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False

    def prompts(self) -> list:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        if not p:
            raise OpenAIError(400, "prompt is empty", param="prompt")
        return list(p)


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[ContentPart]

    def as_dict(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": text}


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None

    def max_new(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# -- responses ---------------------------------------------------------------------------------------------------------


def usage(outputs: list[RequestOutput]) -> dict:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": sum(o.num_cached_tokens for o in outputs)},
    }


def _decoded(lp) -> str:
    return lp.decoded_token if lp.decoded_token is not None else ""


def completion_logprobs(completion, start: int = 0) -> dict | None:
    """The legacy completions shape: tokens, token_logprobs, top_logprobs, text_offset (from `start`: the length
    of the echoed prompt, if any)."""
    if completion.logprobs is None:
        return None
    return _legacy(zip(completion.token_ids, completion.logprobs), start)


def _legacy(steps, pos: int) -> dict:
    tokens, values, tops, offsets = [], [], [], []
    for token, step in steps:
        chosen = step[token]
        tokens.append(_decoded(chosen))
        values.append(chosen.logprob)
        tops.append({_decoded(lp): lp.logprob for t, lp in step.items() if t != token or len(step) == 1})
        offsets.append(pos)
        pos += len(_decoded(chosen))
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


@dataclass
class Echo:
    """What `echo` puts before a prompt's completions: its text and, with logprobs, its tokens' entries in the
    legacy shape (the first token's log-probability is null: nothing comes before it)."""

    text: str
    logprobs: dict | None


def echo_of(out: RequestOutput, tokenizer, with_logprobs: bool) -> Echo:
    """(On the engine's thread: it decodes.)"""
    ids = out.prompt_token_ids
    text = out.prompt if out.prompt is not None else (tokenizer.decode(ids) if tokenizer is not None else "")
    if not with_logprobs:
        return Echo(text, None)
    first = tokenizer.decode(ids[:1]) if tokenizer is not None else ""
    rest = _legacy(zip(ids[1:], out.prompt_logprobs[1:]), len(first))
    return Echo(
        text,
        {
            "tokens": [first, *rest["tokens"]],
            "token_logprobs": [None, *rest["token_logprobs"]],
            "top_logprobs": [None, *rest["top_logprobs"]],
            "text_offset": [0, *rest["text_offset"]],
        },
    )


def joined(echo: dict | None, completion: dict | None) -> dict | None:
    if echo is None or completion is None:
        return echo or completion
    return {key: echo[key] + completion[key] for key in echo}


def vllm_prompt_logprobs(out: RequestOutput) -> list | None:
    """vLLM's "prompt_logprobs": per prompt token, null for the first, then {token id: {logprob, rank,
    decoded_token}}."""
    if out.prompt_logprobs is None:
        return None
    return [None if step is None else {str(t): asdict(lp) for t, lp in step.items()} for step in out.prompt_logprobs]


def chat_logprobs(completion, top: int) -> dict | None:
    if completion.logprobs is None:
        return None
    content = []
    for token, step in zip(completion.token_ids, completion.logprobs):
        chosen = step[token]
        ranked = sorted(step.values(), key=lambda lp: lp.rank or 0)[:top]
        content.append(
            {
                "token": _decoded(chosen),
                "logprob": chosen.logprob,
                "bytes": list(_decoded(chosen).encode()),
                "top_logprobs": [
                    {"token": _decoded(lp), "logprob": lp.logprob, "bytes": list(_decoded(lp).encode())}
                    for lp in ranked
                ],
            }
        )
    return {"content": content}


def stable_text(text: str, finished: bool, hold: int) -> str:
    """The part of a running sample's text that cannot change any more: `hold` characters are held back (a stop
    string may still end in them and be cut off), and a last character that is half of a UTF-8 sequence."""
    if finished:
        return text
    if hold:
        text = text[: max(0, len(text) - hold)]
    return text.rstrip("\ufffd")


def now() -> int:
    return int(time.time())

"""What users hand the engine, checked before anything runs: prompts (text or token ids) and per-request limits.

Every refusal is a ConfigError whose message names the prompt, the bad value and the fix. Nothing is converted
silently: a float, a bool or a string among token ids is an error, not a token.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence

import numpy as np
import torch

from tierkv.beam import BeamSearchParams
from tierkv.errors import ConfigError
from tierkv.sampling import SamplingParams

_TORCH_INTS = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
_TOKEN_HELP = "give a string, or token ids as a list of ints (or a 1-D integer numpy array or tensor)"


def _is_token_sequence(value) -> bool:
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.ndim == 1
    return isinstance(value, (list, tuple)) and bool(value) and isinstance(value[0], (int, np.integer))


def prompt_list(prompts) -> list:
    """The prompts of one call as a list: a single prompt (a string, one prompt's token ids, or a dict as vLLM's
    `{"prompt": text}` / `{"prompt_token_ids": ids}`) becomes a list of one."""
    if isinstance(prompts, (str, dict)) or _is_token_sequence(prompts):
        return [prompts]
    if isinstance(prompts, (list, tuple)) or (isinstance(prompts, (np.ndarray, torch.Tensor)) and prompts.ndim == 2):
        return list(prompts)  # a 2-D array or tensor: one prompt per row
    what = (
        f"a {prompts.ndim}-D {type(prompts).__name__}"
        if isinstance(prompts, (np.ndarray, torch.Tensor))
        else type(prompts).__name__
    )
    raise ConfigError(f"prompts: got {what}; {_TOKEN_HELP}, or a list of such prompts")


PROMPT_KEYS = ("prompt", "prompt_token_ids")


def unwrap_prompt(prompt, where: str):
    """A dict prompt (vLLM's TextPrompt / TokensPrompt) as the text or token ids it holds; other prompts as given."""
    if not isinstance(prompt, dict):
        return prompt
    given = [k for k in PROMPT_KEYS if k in prompt]
    unknown = sorted(str(k) for k in prompt if k not in PROMPT_KEYS)
    if len(given) != 1 or unknown:
        raise ConfigError(
            f"{where}: a dict prompt holds exactly one of 'prompt' (text) or 'prompt_token_ids' (token ids)"
            + (f"; unknown keys {unknown}" if unknown else f"; got keys {sorted(map(str, prompt))}")
        )
    value = prompt[given[0]]
    if given[0] == "prompt" and not isinstance(value, str):
        raise ConfigError(f"{where}: 'prompt' must be text; token ids go in 'prompt_token_ids'")
    return value


def check_messages(messages, where: str) -> None:
    """A chat: a non-empty list of {"role": ..., "content": ...} with string values."""
    if (
        not isinstance(messages, (list, tuple))
        or not messages
        or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        )
    ):
        raise ConfigError(f'{where}: a chat must be a non-empty list of {{"role": ..., "content": ...}} objects')


def chat_token_ids(tokenizer, messages, where: str, add_generation_prompt: bool = True) -> list[int]:
    """The token ids of a chat through the tokenizer's chat template (the template adds any special tokens)."""
    check_messages(messages, where)
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"{where}: a chat needs a chat template, and this model's tokenizer has none; give text")
    return list(
        tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
        )
    )


def token_ids(prompt, where: str, vocab_size: int) -> list[int]:
    """`prompt`'s token ids (a list of ints, or a 1-D integer array or tensor), checked against the vocabulary."""
    if isinstance(prompt, (np.ndarray, torch.Tensor)):
        integer = prompt.dtype.kind in "iu" if isinstance(prompt, np.ndarray) else prompt.dtype in _TORCH_INTS
        if prompt.ndim != 1 or not integer:
            raise ConfigError(
                f"{where}: a {type(prompt).__name__} of dtype {prompt.dtype} and {prompt.ndim} dimension(s); {_TOKEN_HELP}"
            )
        ids = prompt.tolist()
    elif isinstance(prompt, (list, tuple)):
        kinds = set(map(type, prompt))
        if kinds - {int}:  # numpy integer scalars are fine; bools, floats, strings and None are not
            for i, t in enumerate(prompt):
                if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
                    raise ConfigError(
                        f"{where}: token {i} is {t!r} ({type(t).__name__}), not an integer token id; {_TOKEN_HELP}"
                    )
            ids = [int(t) for t in prompt]
        else:
            ids = prompt
    else:
        raise ConfigError(f"{where}: got {prompt!r} ({type(prompt).__name__}); {_TOKEN_HELP}")
    if not ids:
        raise ConfigError(f"{where} is empty; give at least one token")
    try:
        packed = array("q", ids)
    except OverflowError:
        raise ConfigError(f"{where} has token ids outside the vocabulary [0, {vocab_size})") from None
    view = np.frombuffer(packed, dtype=np.int64)  # the range check without a Python loop over a long prompt
    if int(view.min()) < 0 or int(view.max()) >= vocab_size:
        raise ConfigError(f"{where} has token ids outside the vocabulary [0, {vocab_size})")
    return packed.tolist()


def check_request(where: str, prompt_len: int, params: SamplingParams, vocab_size: int, max_model_len: int) -> None:
    """Limits of the model that one request must respect (capacity of the tiers is checked apart)."""
    total = prompt_len + params.max_tokens
    if total > max_model_len:
        raise ConfigError(
            f"{where}: {prompt_len} tokens + max_tokens {params.max_tokens} = {total} exceeds max_model_len {max_model_len}; "
            "shorten the prompt, lower max_tokens, or raise max_model_len (at most the model's context length)"
        )
    for name in ("logprobs", "prompt_logprobs"):
        k = getattr(params, name)
        if k is not None and k > vocab_size:
            raise ConfigError(f"{where}: {name}={k} is more than the model's vocabulary of {vocab_size} tokens")


def sampling_list(sampling_params, count: int) -> list[SamplingParams | BeamSearchParams]:
    """One SamplingParams (or BeamSearchParams: a beam search) per prompt: the same for all, or exactly `count`."""
    if isinstance(sampling_params, (list, tuple)):
        if len(sampling_params) != count:
            raise ConfigError(f"{len(sampling_params)} SamplingParams for {count} prompts; give one, or one per prompt")
        params = list(sampling_params)
    else:
        params = [sampling_params if sampling_params is not None else SamplingParams()] * count
    for i, p in enumerate(params):
        if not isinstance(p, (SamplingParams, BeamSearchParams)):
            raise ConfigError(f"sampling params {i}: got {type(p).__name__}; give tierkv.SamplingParams(...)")
    return params


def request_ids(ids: Sequence | None, count: int, live: set[str]) -> None:
    """Caller-chosen request ids: one per prompt, strings or ints, unique among themselves and the live requests."""
    if ids is None:
        return
    if not isinstance(ids, (list, tuple)) or len(ids) != count:
        raise ConfigError(f"request_ids: give a list of {count} ids (one per prompt), got {ids!r}")
    seen = set()
    for rid in ids:
        if isinstance(rid, bool) or not isinstance(rid, (str, int)):
            raise ConfigError(f"request id {rid!r}: use a string or an integer")
        key = str(rid)
        if key in seen:
            raise ConfigError(f"request id {key!r} appears twice in this call; ids must be unique")
        if key in live:
            raise ConfigError(
                f"request id {key!r} is already in use by a request that has not finished; choose another id"
            )
        seen.add(key)


def priorities(priority, count: int, policy: str) -> list[int]:
    """One priority per prompt (0 each when None); any other than 0 needs scheduling_policy="priority"."""
    if priority is None:
        return [0] * count
    if not isinstance(priority, (list, tuple)) or len(priority) != count:
        raise ConfigError(f"priority: give one integer per prompt ({count}), got {priority!r}")
    if any(not isinstance(p, int) or isinstance(p, bool) for p in priority):
        raise ConfigError(f"priority: every entry must be an integer (lower runs first), got {priority!r}")
    if policy != "priority" and any(priority):
        raise ConfigError(
            "priority: requests have priorities but the engine schedules first come, first served; "
            'start it with scheduling_policy="priority"'
        )
    return list(priority)

"""The mappings of a batch run's YAML (and of its input records) checked against the fields of tierkv's own
dataclasses: unknown keys (with the closest known one), value types, and a record's sampling fields as the
SamplingParams or BeamSearchParams they make."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing

from tierkv.beam import BeamSearchParams
from tierkv.errors import ConfigError
from tierkv.sampling import SamplingParams


def suggest(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _type_ok(value, hint) -> bool:
    origin = typing.get_origin(hint)
    if hint is typing.Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(hint) or (typing.Any,)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # a hint we do not check (e.g. torch.dtype): the dataclass validates it


def _hint_name(hint) -> str:
    text = str(hint).replace("typing.", "").replace("NoneType", "None")
    return text.removeprefix("<class '").removesuffix("'>")


def check_section(where: str, data, cls, exclude=(), also=None) -> dict:
    """Keys and value types of one mapping against the fields of dataclass `cls` (and of `also`, if given);
    returns it as a dict."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of {cls.__name__} fields, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in exclude]
    if also is not None:
        hints = {**typing.get_type_hints(also), **hints}
        known += [f.name for f in dataclasses.fields(also) if f.name not in known]
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"{where}.{key}: unknown key{suggest(key, known)}; known keys: {', '.join(known)}")
        if not _type_ok(value, hints[key]):
            raise ConfigError(
                f"{where}.{key}: expected {_hint_name(hints[key])}, got {value!r} ({type(value).__name__})"
            )
    return dict(data)


BEAM_KEYS = ("beam_width", "length_penalty", "early_stopping")


def sampling_params(fields: dict, where: str) -> SamplingParams | BeamSearchParams:
    """A record's sampling fields as SamplingParams, or as BeamSearchParams where `beam_width` is set (beam search
    takes max_tokens, ignore_eos, length_penalty and early_stopping, nothing else)."""
    try:
        if fields.get("beam_width") is None:
            stray = [k for k in BEAM_KEYS if k in fields and fields[k] is not None]
            if stray:
                raise ConfigError(f"{', '.join(stray)} apply to beam search only: set beam_width too")
            return SamplingParams(**{k: v for k, v in fields.items() if k not in BEAM_KEYS})
        other = sorted(set(fields) - {*BEAM_KEYS, "max_tokens", "ignore_eos"})
        if other:
            raise ConfigError(
                f"beam search (beam_width) takes max_tokens, ignore_eos, length_penalty and early_stopping, "
                f"not {', '.join(other)}"
            )
        return BeamSearchParams(**fields)
    except (ConfigError, TypeError) as exc:
        raise ConfigError(f"{where}: {exc}") from None

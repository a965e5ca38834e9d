"""The shapes in which a step's whole prompts reach cuDNN's fused attention: few, and known ahead.

cuDNN plans every new shape of a batched SDPA call (prompts, length, heads, strides) the first time it meets it:
40-66 ms of host time on the H200, during which the GPU can run dry (2026-12-04, `benchmarks/cudnn_plans.py`). Left
as they come, a step's prompts make a new shape for nearly every step of a server (every prompt length is one) and
for many steps of a batch run (the count of prompts per step drifts, 16, 15, 14, ..., as decodes take budget). So
they are cut into *parts* whose shapes come from a small set:

- lengths rounded up to a bucket, four to an octave (1024, 1280, 1536, 1792, 2048, 2560, ...: under 25% padding).
  Padding on the right is exact under the causal mask: a prompt's real rows attend only to keys at or before them,
  all real, and the padded rows' outputs are dropped;
- counts that are powers of two: 15 prompts of one bucket go as 8 + 4, and the last 3 go with the leftovers.

What is left (short prompts, parts too small to gain from cuDNN, shapes not planned yet) goes through varlen flash
attention, which plans nothing. With a step budget of 16,384 tokens the set holds 42 shapes, which `tierkv serve`
plans before it takes requests (`prompt_attention.plan_ahead`): at 40-66 ms a plan, two to three seconds (an estimate,
not measured yet).

Pure host arithmetic: `cut` runs once a step, on the host's copy of the prompts' bounds.
"""

from __future__ import annotations

from dataclasses import dataclass

# Prompts shorter than this (after rounding up) take varlen flash attention: their attention is a small share of
# their step, and flash was faster at 1 x 1,000 tokens (0.11 against 0.16 ms, H200, 2026-12-04).
CUDNN_MIN_LENGTH = 512
# A part holds at least this many tokens (prompts x length): cuDNN's kernel was ~2x flash's at 8 x 1,024 and
# 1-2 x 8,192 tokens, slower at 1 x 1,000 (H200, 2026-12-04); between them no measurement yet says where it turns.
CUDNN_MIN_TOKENS = 4096
# Buckets per octave: 2 ** BUCKET_BITS.
BUCKET_BITS = 2


def bucket_length(n: int) -> int:
    """`n` rounded up to the next of 2 ** BUCKET_BITS evenly spaced lengths per octave (n itself where it is one)."""
    step = 1 << max(0, n.bit_length() - 1 - BUCKET_BITS)
    return -(-n // step) * step


@dataclass(frozen=True)
class Part:
    """Prompts (indices into the step's prompts, in row order) attended in one batched call, each padded to
    `length` rows; `count` is a power of two."""

    length: int
    prompts: tuple[int, ...]

    @property
    def count(self) -> int:
        return len(self.prompts)


def cut(
    lengths: list[int], min_length: int | None = None, min_tokens: int | None = None
) -> tuple[list[Part], list[int]]:
    """The step's prompts (their lengths, in row order) cut into parts, and the prompts left over (indices, in row
    order). Within a bucket the prompts go in row order, largest part first, so that a run of equal prompts that
    fill their bucket exactly stays a run of consecutive rows in each part. The thresholds default to the module's."""
    min_length = CUDNN_MIN_LENGTH if min_length is None else min_length
    min_tokens = CUDNN_MIN_TOKENS if min_tokens is None else min_tokens
    buckets: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        buckets.setdefault(bucket_length(n), []).append(i)
    parts: list[Part] = []
    rest: list[int] = []
    for length, members in buckets.items():
        if length < min_length:
            rest += members
            continue
        at = 0
        while at < len(members):
            count = 1 << ((len(members) - at).bit_length() - 1)
            if count * length < min_tokens:
                break
            parts.append(Part(length, tuple(members[at : at + count])))
            at += count
        rest += members[at:]
    return parts, sorted(rest)


def previous_bucket(length: int) -> int:
    """The bucket below `length` (a bucket): prompts of previous_bucket(length) + 1 .. length tokens round to it."""
    return length - (1 << max(0, (length - 1).bit_length() - 1 - BUCKET_BITS))


def shapes_within(
    budget: int, max_length: int, min_length: int | None = None, min_tokens: int | None = None
) -> list[tuple[int, int]]:
    """Every (count, length) that `cut` can make from a step of at most `budget` prompt tokens, prompts at most
    `max_length` long: the shapes to plan ahead. (A part's padded tokens can pass the budget by up to a quarter.)"""
    min_length = CUDNN_MIN_LENGTH if min_length is None else min_length
    min_tokens = CUDNN_MIN_TOKENS if min_tokens is None else min_tokens
    shapes = []
    count = 1
    while True:
        length = bucket_length(min_length)
        if count * (previous_bucket(length) + 1) > budget:
            return shapes
        while count * (previous_bucket(length) + 1) <= budget and previous_bucket(length) < max_length:
            if count * length >= min_tokens:
                shapes.append((count, length))
            length = bucket_length(length + 1)
        count *= 2

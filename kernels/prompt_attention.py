"""Causal attention of whole prompts over their own keys: the rows of a step's entries that start at position 0,
so that every key they attend to is written in this same step and is still at hand, contiguous, as the step's
k and v. No page table is needed for them.

Prompt prefill is where a serving engine spends most of its attention time. On CUDA, in half precision, prompts of one
length go through SDPA together, one batched call over (prompts, heads, length, head_dim) views of the step's q, k
and v (torch picks cuDNN's fused attention on Hopper): on an H200 it took 0.16 ms against 0.33 ms for tierkv's
paged prefill kernel at 8 x 1024 tokens, and 1.01 against 1.64 ms at 1 x 8192 (2026-12-04, `benchmarks/attention_prefill.py`). torch's
variable-length flash attention (FA2), which takes all prompts in one call whatever their lengths, was no faster
than the paged kernel there (0.33 ms, 1.72 ms): it serves sliding windows, which cuDNN's kernel does not take.
Rows with cached keys (a prompt's later chunk, a prefix hit, decode) keep the paged kernels.

cuDNN plans each shape it meets (prompts, length, heads, strides) on its first call: 40-66 ms of host time on the
H200 for every new count or length (2026-12-04, `benchmarks/cudnn_plans.py`), during which the GPU can run dry; in
item 1's profile (256 x 1024-token prompts) three of four prefill steps stalled 58-71 ms inside such a call. Varlen
flash attention builds no plan but is slower where prompts are long: 1.4x cuDNN's time at 16 x 1024, 1.7-1.9x at
1-2 x 8192, faster at 1 x 1000. So a step's prompts are cut into parts of a few dozen shapes (`prompt_shapes`:
lengths padded to a bucket, power-of-two counts), which `plan_ahead` plans at start-up; a part's shape that is not
planned yet goes through flash the first time this thread meets it and through cuDNN from the second, and short
prompts and small parts always take flash. cuDNN keeps its plans per thread, and so does the memory of shapes met.

`prompt_attention_reference` (SDPA, one prompt at a time) is what runs on CPU, in float32, and for sliding windows
where torch lacks the varlen function's window argument (torch < 2.11).
"""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache

import numpy as np
import torch
import torch.nn.functional as F

from tierkv.kernels import prompt_shapes


@dataclass
class PromptRows:
    """Whole prompts in a step: rows [row0, row0 + cu_seq[-1]) of the step, prompt i owning rows
    row0 + cu_seq[i] .. row0 + cu_seq[i + 1] at positions 0, 1, ...

    cu_seq: (P + 1,) int32 on the step's device; cu_seq_host: the same as a host list; max_len: the longest."""

    row0: int
    cu_seq: torch.Tensor
    cu_seq_host: list[int]
    max_len: int
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def cached(self, key, make: Callable):
        """What every layer of the step needs alike (how the prompts are cut, their gather indices), made once."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]


@cache
def _varlen():
    """torch's varlen flash attention with the window argument (torch >= 2.11), or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # pragma: no cover - torch < 2.10
        return None
    params = inspect.signature(varlen_attn).parameters
    if "window_size" not in params:
        return None  # torch 2.10 takes only is_causal: no sliding windows
    return varlen_attn, "enable_gqa" in params


def flash_supported(q: torch.Tensor, num_kv_heads: int) -> bool:
    """Whether the varlen flash kernel takes this step's queries (CUDA, half precision, head size a multiple of 8 up
    to 256, whole head groups)."""
    return (
        q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and q.shape[-1] % 8 == 0
        and q.shape[-1] <= 256
        and q.shape[1] % num_kv_heads == 0
        and _varlen() is not None
    )


def _window(sliding_window: int) -> tuple[int, int]:
    # tierkv's window W lets a query at p see keys p - W + 1 .. p: flash attention's (left, right) = (W - 1, 0).
    return (sliding_window - 1, 0) if sliding_window else (-1, 0)


def prompt_attention_flash(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prompts: PromptRows,
    scale: float,
    sliding_window: int = 0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """q (R, Hq, D), k and v (R, Hkv, D): the prompts' rows only (R = cu_seq[-1]). Returns (R, Hq, D), written into
    `out` when given."""
    varlen_attn, takes_gqa = _varlen()
    extra = {"enable_gqa": True} if takes_gqa and q.shape[1] != k.shape[1] else {}
    res = varlen_attn(
        q,
        k,
        v,
        prompts.cu_seq,
        prompts.cu_seq,
        prompts.max_len,
        prompts.max_len,
        scale=scale,
        window_size=_window(sliding_window),
        **extra,
    )
    if out is None:
        return res
    out.copy_(res)
    return out


def prompt_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prompts: PromptRows,
    scale: float,
    sliding_window: int = 0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain PyTorch, one prompt at a time (SDPA, causal, windowed by a mask)."""
    out = torch.empty_like(q) if out is None else out
    group = q.shape[1] // k.shape[1]
    bounds = prompts.cu_seq_host
    for r0, r1 in zip(bounds, bounds[1:]):
        qh = q[r0:r1].transpose(0, 1)[None]
        kh = k[r0:r1].transpose(0, 1).repeat_interleave(group, dim=0)[None]
        vh = v[r0:r1].transpose(0, 1).repeat_interleave(group, dim=0)[None]
        if sliding_window:
            pos = torch.arange(r1 - r0, device=q.device)
            allowed = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - sliding_window)
            res = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=allowed, scale=scale)
        else:
            res = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)
        out[r0:r1] = res[0].transpose(0, 1)
    return out


def prompt_runs(bounds: list[int]) -> list[tuple[int, int, int]]:
    """(first row, prompts, length) for each run of consecutive prompts of one length."""
    runs: list[tuple[int, int, int]] = []
    for r0, r1 in zip(bounds, bounds[1:]):
        if runs and runs[-1][2] == r1 - r0:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1, r1 - r0)
        else:
            runs.append((r0, 1, r1 - r0))
    return runs


# The cuDNN shapes met on each thread (cuDNN's plans are kept per thread, so is this): a part whose shape is not in
# it goes through flash attention and is noted, one whose shape is goes through SDPA (cuDNN), which plans it then if
# `plan_ahead` did not. Bounded by the shapes `prompt_shapes.cut` can make, a few dozen per model layout.
_met = threading.local()
# The (q, k, v) layouts met where flash attention runs (where cuDNN's plans matter), for plan_ahead: row strides, heads, head size, dtype, device.
_layouts: set[tuple] = set()


def _shapes_met() -> set[tuple]:
    if not hasattr(_met, "shapes"):
        _met.shapes = set()
    return _met.shapes


def _layout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, strides: tuple[int, int, int]) -> tuple:
    return (*strides, q.shape[1], k.shape[1], q.shape[2], q.dtype, q.device)


@dataclass
class _Gather:
    """A part's rows on the device: `rows` (count * length) the prompt rows each padded row reads (a prompt's last
    row repeated as padding); `src`, `dst` the padded rows that are real and the prompt rows they belong to."""

    rows: torch.Tensor
    src: torch.Tensor
    dst: torch.Tensor


def _gather_index(bounds: list[int], part: prompt_shapes.Part, device) -> _Gather:
    rows, src, dst = [], [], []
    for slot, i in enumerate(part.prompts):
        r0, n = bounds[i], bounds[i + 1] - bounds[i]
        at = np.arange(part.length)
        rows.append(r0 + np.minimum(at, n - 1))
        src.append(slot * part.length + at[:n])
        dst.append(r0 + at[:n])
    parts = [torch.from_numpy(np.concatenate(x)).to(device, non_blocking=True) for x in (rows, src, dst)]
    return _Gather(*parts)


def _shared_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int] | None:
    """(first element, width) of the one row span holding q's, k's and v's rows, where they are views of one buffer
    with one row stride (a step's fused projection): then one gather moves all three and keeps their strides."""
    xs = (q, k, v)
    if len({x.untyped_storage().data_ptr() for x in xs}) != 1 or len({x.stride(0) for x in xs}) != 1:
        return None
    if any(x.stride()[1:] != (x.shape[2], 1) for x in xs):
        return None
    lo = min(x.storage_offset() for x in xs)
    hi = max(x.storage_offset() + x.shape[1] * x.shape[2] for x in xs)
    return (lo, hi - lo) if hi - lo <= q.stride(0) else None


def _gathered(q, k, v, shared: tuple[int, int] | None, index: _Gather):
    """q, k and v of the part's padded rows: one gather of their shared rows (`_shared_rows`: their strides kept),
    else three."""
    if shared is None:
        return tuple(x.index_select(0, index.rows) for x in (q, k, v))
    lo, width = shared
    span = torch.as_strided(q, (q.shape[0], width), (q.stride(0), 1), lo).index_select(0, index.rows)
    n = index.rows.numel()
    return tuple(
        span[:, x.storage_offset() - lo :][:, : x.shape[1] * x.shape[2]].view(n, *x.shape[1:]) for x in (q, k, v)
    )


def _gathered_strides(q, k, v, shared: tuple[int, int] | None) -> tuple[int, int, int]:
    if shared is None:
        return tuple(x.shape[1] * x.shape[2] for x in (q, k, v))
    return (shared[1],) * 3


def batched_sdpa(q, k, v, count: int, length: int, scale: float) -> torch.Tensor:
    """Causal SDPA of `count` prompts of `length` rows, over (prompts, heads, length, head_dim) views of the rows;
    returns (count, length, heads, head_dim)."""

    def heads_first(x: torch.Tensor) -> torch.Tensor:
        return x.view(count, length, x.shape[1], x.shape[2]).transpose(1, 2)

    gqa = q.shape[1] != k.shape[1]
    res = F.scaled_dot_product_attention(
        heads_first(q), heads_first(k), heads_first(v), is_causal=True, scale=scale, enable_gqa=gqa
    )
    return res.transpose(1, 2)


def _attend_in_place(q, k, v, r0: int, count: int, length: int, scale: float, out) -> None:
    """`count` consecutive prompts of `length` rows from row r0: views of the rows, no copy in."""
    r1 = r0 + count * length
    out[r0:r1].view(count, length, *out.shape[1:]).copy_(
        batched_sdpa(q[r0:r1], k[r0:r1], v[r0:r1], count, length, scale)
    )


def _attend_part(q, k, v, shared, prompts: PromptRows, part: prompt_shapes.Part, view: bool, scale, out) -> None:
    bounds = prompts.cu_seq_host
    count, length = part.count, part.length
    if view:  # consecutive prompts that fill their bucket
        _attend_in_place(q, k, v, bounds[part.prompts[0]], count, length, scale, out)
        return
    index = prompts.cached(("gather", part), lambda: _gather_index(bounds, part, q.device))
    res = batched_sdpa(*_gathered(q, k, v, shared, index), count, length, scale)
    out.index_copy_(0, index.dst, res.reshape(count * length, *out.shape[1:]).index_select(0, index.src))


def _fills_its_bucket(bounds: list[int], part: prompt_shapes.Part) -> bool:
    first, last = part.prompts[0], part.prompts[-1]
    return last - first + 1 == part.count and all(bounds[i + 1] - bounds[i] == part.length for i in part.prompts)


def _segments(indices: list[int]) -> list[tuple[int, int]]:
    """Runs of consecutive prompt indices, as [first, end)."""
    runs: list[tuple[int, int]] = []
    for i in indices:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def prompt_attention_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prompts: PromptRows,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """No sliding window: the prompts cut into parts of bounded shapes (`prompt_shapes.cut`), each one batched,
    causal SDPA call; the prompts left over, and the parts whose shape is met for the first time on this thread,
    through varlen flash attention where torch has it (no cuDNN plan), else SDPA over runs of equal lengths."""
    out = torch.empty_like(q) if out is None else out
    flash = flash_supported(q, k.shape[1])
    bounds = prompts.cu_seq_host
    parts, rest = prompts.cached("cut", lambda: prompt_shapes.cut([b - a for a, b in zip(bounds, bounds[1:])]))
    shared = _shared_rows(q, k, v)
    in_place, gathered = (q.stride(0), k.stride(0), v.stride(0)), _gathered_strides(q, k, v, shared)
    if flash:  # the layouts parts will have (as views, or gathered), for plan_ahead: met by any step, parts or not
        _layouts.update(_layout(q, k, v, s) for s in {in_place, gathered})
    met = _shapes_met()
    rest = list(rest)
    for part in parts:
        view = _fills_its_bucket(bounds, part)
        shape = (part.count, part.length, *_layout(q, k, v, in_place if view else gathered))
        if flash and shape not in met:
            met.add(shape)
            rest += part.prompts
            continue
        _attend_part(q, k, v, shared, prompts, part, view, scale, out)
    for first, end in _segments(sorted(rest)):
        r0, r1 = bounds[first], bounds[end]
        if flash:
            cu = prompts.cu_seq[first : end + 1] - r0  # the segment's bounds, from 0 (on the device)
            seg = PromptRows(
                0,
                cu,
                [b - r0 for b in bounds[first : end + 1]],
                max(bounds[i + 1] - bounds[i] for i in range(first, end)),
            )
            prompt_attention_flash(q[r0:r1], k[r0:r1], v[r0:r1], seg, scale, out=out[r0:r1])
            continue
        for s0, count, length in prompt_runs(bounds[first : end + 1]):
            _attend_in_place(q, k, v, s0, count, length, scale, out)
    return out


def plan_ahead(budget: int, max_length: int) -> tuple[int, float]:
    """Plan now, on this thread, every cuDNN shape `prompt_shapes.cut` can make from steps of at most `budget` prompt
    tokens, for each (q, k, v) layout met so far (run a prefill step first): one SDPA call on zeros per shape, so
    that no step waits for a plan later. Returns (shapes planned, seconds)."""
    t0 = time.perf_counter()
    met = _shapes_met()
    planned = 0
    shapes = prompt_shapes.shapes_within(budget, max_length)
    for layout in list(_layouts):
        *strides, heads, kv_heads, head_dim, dtype, device = layout
        todo = [(count, length) for count, length in shapes if (count, length, *layout) not in met]
        if not todo:
            continue
        # One buffer of zeros for the largest shape; every shape's q, k and v are views of it (read only).
        buf = torch.zeros(max(c * n for c, n in todo) * max(strides), dtype=dtype, device=device)
        for count, length in todo:
            shape = (count, length, *layout)
            n = count * length
            q, k, v = (
                torch.as_strided(buf, (n, h, head_dim), (s, head_dim, 1))
                for h, s in zip((heads, kv_heads, kv_heads), strides)
            )
            with torch.inference_mode():
                batched_sdpa(q, k, v, count, length, head_dim**-0.5)
            met.add(shape)
            planned += 1
    return planned, time.perf_counter() - t0


def prompt_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prompts: PromptRows,
    scale: float,
    sliding_window: int = 0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of each prompt over its own keys: on CUDA in half precision batched SDPA (varlen flash
    attention for a sliding window), else the reference."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        if not sliding_window:
            return prompt_attention_sdpa(q, k, v, prompts, scale, out)
        if flash_supported(q, k.shape[1]):
            return prompt_attention_flash(q, k, v, prompts, scale, sliding_window, out)
    return prompt_attention_reference(q, k, v, prompts, scale, sliding_window, out)

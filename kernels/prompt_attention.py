"""Causal attention of whole prompts over their own keys: the rows of a step's entries that start at position 0,
so that every key they attend to is written in this same step and is still at hand, contiguous, as the step's
k and v. No page table is needed for them.

Prompt prefill is where a serving engine spends most of its attention time. On CUDA, in half precision, each run of
consecutive prompts of one length is one call of SDPA over strided views of the step's q, k and v (torch picks
cuDNN's fused attention on Hopper): on an H200 it took 0.16 ms against 0.33 ms for tierkv's paged prefill kernel at
8 x 1024 tokens, and 1.01 against 1.64 ms at 1 x 8192 (2026-12-04, `benchmarks/attention_prefill.py`). torch's
variable-length flash attention (FA2), which takes all prompts in one call whatever their lengths, was no faster
than the paged kernel there (0.33 ms, 1.72 ms): it serves sliding windows, which cuDNN's kernel does not take.
Rows with cached keys (a prompt's later chunk, a prefix hit, decode) keep the paged kernels.

cuDNN plans each shape it meets (prompts, length, heads) on its first call: 40-66 ms of host time on the H200 for
every new count or length (2026-12-04, `benchmarks/cudnn_plans.py`), during which the GPU can run dry. In item 1's
profile (256 x 1024-token prompts) three of four prefill steps stalled 58-71 ms inside such a call: the count of
whole prompts per step drifts (16, 15, 14, ...) as decodes take budget, and each count is a new shape. Varlen flash
attention builds no plan and is slower only where prompts are long: 1.4x cuDNN's time at 16 x 1024, faster at
1 x 1000, 1.7-1.9x at 1-2 x 8192. So prompts shorter than `CUDNN_MIN_LENGTH` always take varlen flash, and longer
ones take cuDNN from the second time their shape is met (the first goes through flash): a plan then pays for itself
within a step or two, and a server's prompts of ever-new lengths never wait for one.

`prompt_attention_reference` (SDPA, one prompt at a time) is what runs on CPU, in float32, and for sliding windows
where torch lacks the varlen function's window argument (torch < 2.11).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F


@dataclass
class PromptRows:
    """Whole prompts in a step: rows [row0, row0 + cu_seq[-1]) of the step, prompt i owning rows
    row0 + cu_seq[i] .. row0 + cu_seq[i + 1] at positions 0, 1, ...

    cu_seq: (P + 1,) int32 on the step's device; cu_seq_host: the same as a host list; max_len: the longest."""

    row0: int
    cu_seq: torch.Tensor
    cu_seq_host: list[int]
    max_len: int


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


# Prompts at least this long go through cuDNN once their shape is met again (see the module's docstring).
CUDNN_MIN_LENGTH = 2048
# The shapes (prompts, length, heads, kv heads, head size, dtype, device) of long runs met so far in this process,
# forgotten all at once past a bound: a server meets new lengths for as long as it runs, and a forgotten shape only
# costs one more call through flash attention.
_shapes_met: set[tuple] = set()
_SHAPES_KEPT = 4096


def _cudnn_planned(q: torch.Tensor, k: torch.Tensor, count: int, length: int) -> bool:
    """Whether a run of this shape goes through cuDNN: met before, and long (and note that it now has been met)."""
    if length < CUDNN_MIN_LENGTH:
        return False  # always varlen flash: a plan would not pay for itself
    shape = (count, length, q.shape[1], k.shape[1], q.shape[2], q.dtype, q.device)
    if shape in _shapes_met:
        return True
    if len(_shapes_met) >= _SHAPES_KEPT:
        _shapes_met.clear()
    _shapes_met.add(shape)
    return False


def prompt_attention_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prompts: PromptRows,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """No sliding window: one batched, causal SDPA call per run of equal-length prompts, over (prompts, heads,
    length, head_dim) views of the rows (no copy in; one copy of the output into `out`). On CUDA a run whose shape
    is met for the first time, or whose prompts are short, goes through varlen flash attention instead, where torch
    has it (no cuDNN plan)."""
    out = torch.empty_like(q) if out is None else out
    gqa = q.shape[1] != k.shape[1]
    flash = flash_supported(q, k.shape[1])
    first = 0  # the run's first prompt
    for r0, count, length in prompt_runs(prompts.cu_seq_host):
        r1 = r0 + count * length
        first += count
        if flash and not _cudnn_planned(q, k, count, length):
            cu = prompts.cu_seq[first - count : first + 1] - r0  # the run's bounds, from 0 (on the device)
            run = PromptRows(0, cu, [b - r0 for b in prompts.cu_seq_host[first - count : first + 1]], length)
            prompt_attention_flash(q[r0:r1], k[r0:r1], v[r0:r1], run, scale, out=out[r0:r1])
            continue

        def heads_first(x: torch.Tensor) -> torch.Tensor:
            return x[r0:r1].view(count, length, x.shape[1], x.shape[2]).transpose(1, 2)

        res = F.scaled_dot_product_attention(
            heads_first(q), heads_first(k), heads_first(v), is_causal=True, scale=scale, enable_gqa=gqa
        )
        out[r0:r1].view(count, length, q.shape[1], q.shape[2]).copy_(res.transpose(1, 2))
    return out


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

"""The workloads tierkv and vLLM both run, side by side on one GPU (benchmarks/vs_vllm.sh), engine-agnostic: plain
Python and numpy, so that either engine's side imports it and nothing else of the other.

Llama-3.1-8B shape, dummy bf16 weights, random prompt token ids (the same ids for both engines: one numpy
generator per workload, seeded), greedy, every request generating exactly its output length (ignore EOS). Each
engine runs with its own defaults except where a workload fixes a size (the GPU KV cache, the CPU tier), and warms
up first on other random ids (never a prefix of the timed prompts, which would be a cache hit). Both get the same
step budget (MAX_BATCHED_TOKENS, MAX_SEQS).

An engine side supplies `generate(prompts, max_tokens) -> list of output token-id lists`; `run` times the
workload's passes through it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

TOKEN_RANGE = (1000, 128000)  # clear of Llama-3's special ids
# Both engines: at most this many tokens in one step (vLLM's chunked-prefill budget, tierkv's
# max_num_batched_tokens) and this many sequences.
MAX_BATCHED_TOKENS = 16384
MAX_SEQS = 256


@dataclass(frozen=True)
class Workload:
    name: str
    what: str
    num: int  # requests (conversations, for "chat")
    input_len: int  # prompt tokens (each turn's new user tokens, for "chat")
    output_len: int
    gpu_kv_gib: float | None = None  # the GPU KV cache both engines get; None: what each sizes by itself
    cpu_gib: float | None = None  # tierkv's pinned CPU tier; vLLM's native CPU offloading buffer
    prefix_caching: bool = False  # (tierkv; vLLM keeps its default, on)
    passes: int = 1  # timed passes over the same prompts ("reread": the second finds them cached)
    turns: int = 0  # > 0: multi-turn chat, each turn re-sending the whole conversation
    vllm_offload: bool = False  # give vLLM its native CPU offloading (cpu_gib) as its CPU tier
    max_model_len: int = 2048
    tierkv_extra: dict = field(default_factory=dict)


WORKLOADS = {
    w.name: w
    for w in (
        Workload("fits", "256 x (1024 + 128), all KV on the GPU", 256, 1024, 128, cpu_gib=8),
        Workload(
            "spill",
            "32 x (8192 + 64), GPU KV 8 GiB (KV of all requests 4x that)",
            32,
            8192,
            64,
            gpu_kv_gib=8,
            cpu_gib=40,
            max_model_len=8320,
        ),
        Workload(
            "reread",
            "the spill requests twice with a 40 GiB CPU tier: the second pass finds the prompts cached",
            32,
            8192,
            64,
            gpu_kv_gib=8,
            cpu_gib=40,
            prefix_caching=True,
            passes=2,
            vllm_offload=True,
            max_model_len=8320,
        ),
        Workload(
            "chat",
            "multi-turn chat: 32 conversations x 4 turns of 1024 new tokens + 128 generated, each turn re-sending the"
            " whole conversation (18 GiB of histories, GPU KV 8 GiB, CPU tier 40 GiB)",
            32,
            1024,
            128,
            gpu_kv_gib=8,
            cpu_gib=40,
            prefix_caching=True,
            turns=4,
            vllm_offload=True,
            max_model_len=8320,  # (as "reread": one vLLM engine serves both)
        ),
        Workload(
            "outgrow",
            "64 x (1024 + 1024) started together, GPU KV 8 GiB: their KV grows to 2x the GPU while decoding",
            64,
            1024,
            1024,
            gpu_kv_gib=8,
            cpu_gib=40,
            max_model_len=8320,  # (as "spill": one vLLM engine serves both)
        ),
    )
}


def prompts(num: int, length: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(*TOKEN_RANGE, size=(num, length)).tolist()


def warmup_prompts(w: Workload) -> list[list[int]]:
    """Other random ids than the timed ones (seed 1), shaped like the workload's first requests."""
    return prompts(min(w.num, 34), min(w.input_len, 2048), seed=1)


def run(w: Workload, generate) -> list[dict]:
    """Time the workload's passes (or turns) through `generate`; one record per pass or turn."""
    records = []
    if w.turns:
        history = [[] for _ in range(w.num)]
        for turn in range(w.turns):
            new = prompts(w.num, w.input_len, seed=100 + turn)
            sent = [h + n for h, n in zip(history, new)]
            records.append(_timed(generate, sent, w.output_len, f"turn {turn + 1}"))
            history = [s + out for s, out in zip(sent, records[-1].pop("outputs"))]
        return records
    timed = prompts(w.num, w.input_len, seed=0)
    for i in range(w.passes):
        records.append(_timed(generate, timed, w.output_len, f"pass {i + 1}"))
        records[-1].pop("outputs")
    return records


def _timed(generate, sent: list[list[int]], max_tokens: int, label: str) -> dict:
    t0 = time.perf_counter()
    outputs = generate(sent, max_tokens)
    elapsed = time.perf_counter() - t0
    out_tokens = sum(map(len, outputs))
    if out_tokens != len(sent) * max_tokens:
        raise RuntimeError(f"{label}: {out_tokens} output tokens, expected {len(sent)} x {max_tokens}")
    return {
        "label": label,
        "elapsed_s": round(elapsed, 3),
        "input_tokens": sum(map(len, sent)),
        "output_tokens": out_tokens,
        "output_tok_per_s": round(out_tokens / elapsed, 1),
        "outputs": outputs,
    }


def summary(records: list[dict]) -> dict:
    """The workload's whole time and output rate over its passes or turns."""
    elapsed = sum(r["elapsed_s"] for r in records)
    out = sum(r["output_tokens"] for r in records)
    return {"elapsed_s": round(elapsed, 3), "output_tokens": out, "output_tok_per_s": round(out / elapsed, 1)}

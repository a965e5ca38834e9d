"""Where an engine's GPU time goes in a torch.profiler window, by kernel and by kind (GEMMs, attention, copies, the
rest), with the share of the window the GPU was busy: the same summary for either engine's side (plain torch, no
tierkv or vLLM import), so that the two profiles of one workload compare line by line."""

from __future__ import annotations

import re

KINDS = (  # first match wins: attention kernels' names can hold "gemm" or "cutlass" too
    (
        "attention",
        re.compile(r"flash|fmha|attn|attention|cudnn|sdpa|_split_kernel|_prefill_kernel|_reduce_kernel", re.I),
    ),
    ("gemm", re.compile(r"nvjet|gemm|xmma|cutlass|cublas|sm90_|sm80_|ampere_|_gemv_kernel", re.I)),
    ("copy", re.compile(r"memcpy|memset|_copy_blocks_kernel", re.I)),
)


def kind_of(name: str) -> str:
    return next((kind for kind, pattern in KINDS if pattern.search(name)), "other")


def covered(ranges: list[tuple[float, float]]) -> float:
    """Total length covered by (start, end) ranges (overlaps counted once)."""
    total, end = 0.0, None
    for s, e in sorted(ranges):
        if end is None or s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def summary(events, wall_s: float, top: int = 15) -> str:
    """The GPU's kernels and copies among `events` (torch.profiler FunctionEvents) over a window of `wall_s`."""
    gpu = [e for e in events if e.device_type.name == "CUDA"]
    if not gpu:
        return "no GPU events in the window"
    spans = [(e.time_range.start, e.time_range.end) for e in gpu]
    busy_ms = covered(spans) / 1e3
    by_name: dict[str, list[float]] = {}
    by_kind: dict[str, float] = {}
    for e in gpu:
        ms = (e.time_range.end - e.time_range.start) / 1e3
        entry = by_name.setdefault(e.name[:100], [0.0, 0])
        entry[0] += ms
        entry[1] += 1
        by_kind[kind_of(e.name)] = by_kind.get(kind_of(e.name), 0.0) + ms
    lines = [
        f"window {wall_s * 1e3:.1f} ms wall, GPU busy {busy_ms:.1f} ms ({busy_ms / (wall_s * 1e3):.0%}); "
        + "kernel time by kind: "
        + ", ".join(f"{k} {ms:.1f} ms" for k, ms in sorted(by_kind.items(), key=lambda kv: -kv[1]))
    ]
    lines.append(f"top {top} kernels (total ms, calls, name):")
    for name, (ms, calls) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"  {ms:9.1f}  x{calls:<6d} {name}")
    return "\n".join(lines)


def profiled(w, generate) -> str:
    """The workload's first pass (its first turn, for chat) through `generate` under torch.profiler: its summary."""
    import time

    import torch
    import workloads
    from torch.profiler import ProfilerActivity, profile

    sent = workloads.prompts(w.num, w.input_len, seed=100 if w.turns else 0)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        generate(sent, w.output_len)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    return f"{w.name}, first pass under the profiler: {wall:.2f} s\n" + summary(prof.events(), wall)

"""Does the GPU wait on the host? A torch.profiler trace of a window of engine steps run back to back (no syncs
between them, as in a real run): the GPU's busy time against the window's wall time, and the longest gaps in
which no kernel or copy ran, each with the host work that was going on when it began.

    python benchmarks/overlap_profile.py --model llama-3.1-8b --num-requests 256 --prompt-len 1024 --output-len 128 \
        --start-step 8 --steps 6

Item 3's streamed decode (one 256k-token sequence over an 8 GiB GPU tier; its runs took 35 prompt steps), and
item 3q's (the same with fp8 cold tiers and 128-token blocks):

    python benchmarks/overlap_profile.py --num-requests 1 --prompt-len 262144 --output-len 16 --gpu-memory 8GiB \
        --cpu-memory 40GiB --max-model-len 270000 --start-step 40 --steps 3
    ... --block-size 128 --cold-kv-dtype fp8

Where host-to-GPU copies run in the window (a streamed decode), it also reports the link: the share of the window in
which some copy ran, and its longest idle stretches with the GPU work that ran in them.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from common import (
    add_workload_args,
    annotate,
    log_compiles,
    ms_and_calls_by_name,
    ms_by_name,
    require_cuda,
    union,
    warm_up,
    workload_prompts,
)
from torch.profiler import ProfilerActivity, profile

import tierkv

HOST = ("tierkv.", "pm.", "sched.", "mover.")


def host_profile(llm, steps: int, top: int) -> None:
    """Each of `steps` steps timed alone (host wall time of step(), its prompt tokens), then as many more under
    cProfile: functions by their own time and by cumulative time."""
    import cProfile
    import pstats

    engine = llm.engine
    rows = []
    for _ in range(steps):
        p0, t0 = engine.counters.prompt_tokens, time.perf_counter()
        llm.step()
        rows.append((time.perf_counter() - t0, engine.counters.prompt_tokens - p0))
    torch.cuda.synchronize()
    print(
        "steps timed one by one (host ms in step(), prompt tokens): "
        + ", ".join(f"{s * 1e3:.1f} ({n})" for s, n in rows)
    )
    prof = cProfile.Profile()
    p0, t0 = engine.counters.prompt_tokens, time.perf_counter()
    prof.enable()
    for _ in range(steps):
        llm.step()
    prof.disable()
    torch.cuda.synchronize()
    print(
        f"{steps} more steps under cProfile: {(time.perf_counter() - t0) * 1e3 / steps:.1f} ms each, "
        f"{engine.counters.prompt_tokens - p0} prompt tokens"
    )
    stats = pstats.Stats(prof)
    for key in ("tottime", "cumulative"):
        print(f"by {key} (top {top}):")
        stats.sort_stats(key).print_stats(top)


def time_inside(events, start: float, end: float, name=lambda ev: ev.name) -> list[tuple[str, float]]:
    """(name, time within [start, end)) of the events that overlap that stretch, summed by `name(event)`, longest
    first."""
    inside: dict[str, float] = {}
    for ev in events:
        o = min(end, ev.time_range.end) - max(start, ev.time_range.start)
        if o > 0:
            inside[name(ev)] = inside.get(name(ev), 0.0) + o
    return sorted(inside.items(), key=lambda kv: -kv[1])


def is_copy_up(name: str) -> bool:
    """A host-to-GPU copy: a DMA from host memory, or the block-copy kernel (which also moves within the GPU)."""
    return name.startswith("Memcpy HtoD") or name.startswith("Memcpy2D HtoD") or "_copy_blocks_kernel" in name


def link_report(gpu_events, first: float, top: int = 6) -> None:
    """The host-to-GPU link in the window: busy share, and its longest idle stretches with the GPU work in them."""
    copies = [(e.time_range.start, e.time_range.end) for e in gpu_events if is_copy_up(e.name)]
    if not copies:
        return
    busy, gaps = union(copies)
    span = max(e for _, e in copies) - min(s for s, _ in copies)
    names = {e.name[:40] for e in gpu_events if is_copy_up(e.name)}
    print(
        f"link up: copies busy {busy / 1e3:.1f} ms of the {span / 1e3:.1f} ms from the first to the last copy "
        f"({busy / span:.0%}), idle {(span - busy) / 1e3:.1f} ms in {len(gaps)} gaps; copies seen: {sorted(names)}"
    )
    others = [e for e in gpu_events if not is_copy_up(e.name)]
    for s, e in sorted(gaps, key=lambda g: g[0] - g[1])[:top]:
        short = time_inside(others, s, e, name=lambda ev: ev.name[:40])
        work = ", ".join(f"{n} {ms / 1e3:.2f}" for n, ms in short[:5])
        print(f"  link idle {(e - s) / 1e3:6.2f} ms at +{(s - first) / 1e3:8.1f} ms; GPU ran: {work or 'nothing'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(ap)
    ap.add_argument("--cpu-memory", default="8GiB")
    ap.add_argument("--gpu-memory")
    ap.add_argument("--max-model-len", type=int, help="for prompts beyond the model's default (item 3's 256k tokens)")
    ap.add_argument("--start-step", type=int, default=8, help="steps run before the window")
    ap.add_argument("--steps", type=int, default=6, help="steps in the window")
    ap.add_argument("--max-num-batched-tokens", type=int, default=16384, help="the step budget (item 1's: 16,384)")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--cold-kv-dtype", help="the cold tiers' KV dtype (fp8: item 3q)")
    ap.add_argument("--staging-blocks", type=int, help="blocks per streamed chunk (the engine's default if unset)")
    ap.add_argument("--no-async-scheduling", action="store_true")
    ap.add_argument("--no-prefetch", action="store_true")
    ap.add_argument(
        "--oversubscribe", action="store_true", help="start every request at once (groups take turns, swapping)"
    )
    ap.add_argument("--trace", help="also write a chrome trace here")
    ap.add_argument("--top", type=int, default=20, help="kernels listed by GPU time")
    ap.add_argument("--gap-ops", type=int, default=4, help="gaps whose host ops are listed (the longest)")
    ap.add_argument(
        "--host-profile",
        action="store_true",
        help="instead of the GPU trace: the window's steps timed one by one, then run again under cProfile "
        "(the host's Python by function: where a host-bound step's time goes)",
    )
    args = ap.parse_args()
    if not require_cuda("overlap_profile"):
        return 2
    tiers = {"gpu_memory": args.gpu_memory} if args.gpu_memory else {}
    if args.max_model_len:
        tiers["max_model_len"] = args.max_model_len
    if args.cold_kv_dtype:
        tiers["cold_kv_dtype"] = args.cold_kv_dtype
    if args.staging_blocks:
        tiers["staging_blocks"] = args.staging_blocks
    llm = tierkv.LLM(
        args.model,
        load_format="dummy",
        cpu_memory=args.cpu_memory,
        max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size,
        **tiers,
        enable_prefix_caching=False,
        async_scheduling=not args.no_async_scheduling,
        prefetch=not args.no_prefetch,
        oversubscribe=args.oversubscribe,
    )
    prompts = workload_prompts(args.num_requests, args.prompt_len, llm.loaded.spec.vocab_size).tolist()
    warm_up(llm, prompts)  # the steps before the window compile the rest
    llm.add_requests(prompts, tierkv.SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True))
    engine = llm.engine
    log_compiles()
    for _ in range(args.start_step):
        llm.step()
    annotate(engine, ("_launch", "_complete"), "tierkv")
    annotate(engine.runner, ("run_forward",), "tierkv")
    annotate(engine.scheduler, ("admit", "schedule"), "sched")
    annotate(
        llm.pm,
        ("acquire", "release", "prefetch", "begin_step", "append_tokens", "free"),
        "pm",
    )
    annotate(llm.pm.placement, ("promote", "place_below"), "placement")
    annotate(llm.pm.mover, ("move", "collect", "synchronize"), "mover")
    if args.host_profile:
        host_profile(llm, args.steps, args.top)
        llm.close()
        return 0
    prompt0 = engine.counters.prompt_tokens
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            llm.step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    events = list(prof.events())
    gpu = [
        (e.time_range.start, e.time_range.end)
        for e in events
        if e.device_type.name == "CUDA" and not e.name.startswith(HOST)
    ]
    host = [e for e in events if e.device_type.name == "CPU" and e.name.startswith(HOST)]
    first = min(e.time_range.start for e in host)
    last = max(s[1] for s in gpu)
    busy, gaps = union([r for r in gpu if r[1] >= first])
    span = last - first
    prompt_tokens = engine.counters.prompt_tokens - prompt0
    kind = f"prompt tokens in the window: {prompt_tokens}" if prompt_tokens else "decode only"
    print(
        f"{args.steps} steps ({kind}), async scheduling "
        f"{'off' if args.no_async_scheduling else 'on'}: wall {wall * 1e3:.1f} ms, traced span {span / 1e3:.1f} ms, "
        f"GPU busy {busy / 1e3:.1f} ms ({busy / span:.0%}), idle {(span - busy) / 1e3:.1f} ms in {len(gaps)} gaps"
    )
    for s, e in sorted(gaps, key=lambda g: g[0] - g[1])[:10]:
        active = sorted(
            (h for h in host if h.time_range.start <= s <= h.time_range.end), key=lambda h: h.time_range.start
        )
        print(
            f"  gap {(e - s) / 1e3:7.2f} ms at +{(s - first) / 1e3:8.1f} ms, host in: {' > '.join(h.name for h in active) or '(between calls)'}"
        )
    # The host's own events (torch ops, CUDA and cuBLAS calls) during the longest gaps: what kept it from queueing
    # work while the GPU ran dry.
    ops = [e for e in events if e.device_type.name == "CPU" and not e.name.startswith(HOST)]
    for s, e in sorted(gaps, key=lambda g: g[0] - g[1])[: args.gap_ops]:
        top = time_inside(ops, s, e)[:8]
        print(
            f"  host ops in the {(e - s) / 1e3:.2f} ms gap at +{(s - first) / 1e3:.1f} ms: "
            + ", ".join(f"{name[:48]} {ms / 1e3:.2f}" for name, ms in top)
        )
    link_report([e for e in events if e.device_type.name == "CUDA" and e.time_range.end >= first], first)
    print("host per step (ms): " + ", ".join(f"{k} {v / args.steps:.2f}" for k, v in ms_by_name(host).items()))
    # CUDA runtime calls by host time: a synchronising call (cudaStreamSynchronize, cudaEventSynchronize, a
    # cudaMemcpy that waits, cudaHostAlloc, cudaMalloc) holds the host while the GPU drains.
    api = ms_and_calls_by_name(
        e for e in events if e.device_type.name == "CPU" and e.name.startswith("cuda") and e.time_range.start >= first
    )
    print(
        "CUDA runtime calls per step (host ms; top 6): "
        + ", ".join(f"{name} {ms / args.steps:.2f} (x{n / args.steps:.0f})" for name, (ms, n) in list(api.items())[:6])
    )
    kernels = ms_and_calls_by_name(
        (
            e
            for e in events
            if e.device_type.name == "CUDA" and not e.name.startswith(HOST) and e.time_range.end >= first
        ),
        name=lambda e: e.name[:90],
    )
    print(f"GPU time per step by kernel (ms; top {args.top}):")
    for name, (ms, n) in list(kernels.items())[: args.top]:
        print(f"  {ms / args.steps:8.2f}  x{n / args.steps:6.1f}  {name}")
    if args.trace:
        prof.export_chrome_trace(args.trace)
    llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

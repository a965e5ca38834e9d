"""Where a decode step of one sequence longer than the GPU tier spends its time: a torch.profiler trace of a few
steps, summarised per step as host phases (until the first GPU work, and in total) against the copy stream's busy
time and the compute stream's, plus which path moved the streamed chunks (copy engines or the kernel).

    python benchmarks/stream_profile.py --model llama-3.1-8b --prompt-len 131072 --gpu-memory 4GiB --cpu-memory 24GiB
    python benchmarks/stream_profile.py --model llama-3.1-8b --num-requests 256 --prompt-len 1024 --gpu-memory auto --cpu-memory 8GiB
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from common import annotate, ms_and_calls_by_name, ms_by_name, require_cuda, union, workload_prompts
from torch.profiler import ProfilerActivity, profile, record_function

import tierkv
import tierkv.runner
from tierkv import attention


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--prompt-len", type=int, default=131072)
    ap.add_argument("--gpu-memory", default="4GiB", help="GPU tier size, or auto (what the GPU has free)")
    ap.add_argument("--cpu-memory", default="24GiB")
    ap.add_argument(
        "--num-requests", type=int, default=1, help="sequences decoding together (profiled once all have prefilled)"
    )
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--trace")
    ap.add_argument("--staging-blocks", type=int, default=1024)
    ap.add_argument("--staging-buffers", type=int, default=2)
    ap.add_argument("--copy-streams", type=int, default=2)
    args = ap.parse_args()
    if not require_cuda("stream_profile"):
        return 2
    tierkv.runner.ModelRunner.staging_buffers = args.staging_buffers
    tierkv.runner.ModelRunner.staging_copy_streams = args.copy_streams
    llm = tierkv.LLM(
        args.model,
        load_format="dummy",
        gpu_memory=None if args.gpu_memory == "auto" else args.gpu_memory,
        cpu_memory=args.cpu_memory,
        staging_blocks=args.staging_blocks,
        max_model_len=args.prompt_len + 64,
        max_num_batched_tokens=8192,
        enable_prefix_caching=False,
    )
    prompts = workload_prompts(args.num_requests, args.prompt_len, llm.loaded.spec.vocab_size).tolist()
    llm.add_requests(prompts, tierkv.SamplingParams(max_tokens=args.steps + 4, ignore_eos=True))
    engine = llm.engine
    while engine.counters.generated_tokens < 2 * args.num_requests:
        llm.step()
    torch.cuda.synchronize()
    calls = {"copy engines": 0, "kernel": 0}
    real_runs, real_kernel = attention.copy_block_runs, attention.copy_blocks_triton

    def runs(*a, **k):
        calls["copy engines"] += 1
        return real_runs(*a, **k)

    def kernel(*a, **k):
        calls["kernel"] += 1
        return real_kernel(*a, **k)

    attention.copy_block_runs, attention.copy_blocks_triton = runs, kernel
    annotate(engine, ("_launch", "_complete"), "tierkv")
    annotate(engine.runner, ("run_forward",), "tierkv")
    annotate(llm.pm, ("acquire", "pin_in_place", "release", "prefetch", "begin_step"), "pm")
    walls = []
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            t0 = time.perf_counter()
            with record_function("tierkv.step"):
                llm.step()
            torch.cuda.synchronize()
            walls.append((time.perf_counter() - t0) * 1e3)
    events = list(prof.events())
    steps = sorted((e.time_range.start, e.time_range.end) for e in events if e.name == "tierkv.step")
    host_names = ("pm.", "tierkv.")
    for i, (s0, s1) in enumerate(steps):
        inside = [e for e in events if s0 <= e.time_range.start <= s1]
        gpu = [
            e for e in inside if e.device_type.name == "CUDA" and not e.name.startswith(host_names)
        ]  # not annotations
        copies = [(e.time_range.start, e.time_range.end) for e in gpu if "emcpy" in e.name or "copy_blocks" in e.name]
        compute = [
            (e.time_range.start, e.time_range.end) for e in gpu if not ("emcpy" in e.name or "copy_blocks" in e.name)
        ]
        first_gpu = min((r[0] for r in compute + copies), default=s1) - s0
        first_copy = min((r[0] for r in copies), default=s1) - s0
        print(
            f"step {i}: wall {walls[i]:.1f} ms; first GPU work at {first_gpu / 1e3:.1f} ms, first streamed copy at "
            f"{first_copy / 1e3:.1f} ms; copies busy {union(copies)[0] / 1e3:.1f} ms ({len(copies)} ops), compute busy "
            f"{union(compute)[0] / 1e3:.1f} ms ({len(compute)} ops); last GPU op ends at {(max(r[1] for r in copies + compute) - s0) / 1e3:.1f} ms"
        )
        by_name = ms_and_calls_by_name(gpu, name=lambda e: e.name[:60])
        print("   GPU ops: " + "; ".join(f"{k} {t:.1f} ms x{c}" for k, (t, c) in list(by_name.items())[:8]))
        mem = sorted((e.time_range.start, e.time_range.end) for e in gpu if "emcpy" in e.name and "Pinned" in e.name)
        gaps = sorted(((b[0] - a[1]) / 1e3 for a, b in zip(mem, mem[1:])), reverse=True)
        print(
            f"   gaps between host->device copies: total {sum(gaps):.1f} ms, largest "
            + ", ".join(f"{g:.2f}" for g in gaps[:6])
        )
        host = ms_by_name(e for e in inside if e.device_type.name == "CPU" and e.name.startswith(host_names))
        print("   host: " + ", ".join(f"{k} {v:.1f} ms" for k, v in host.items()))
    print(f"streamed chunk copies: {calls}")
    if args.trace:
        prof.export_chrome_trace(args.trace)
    llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

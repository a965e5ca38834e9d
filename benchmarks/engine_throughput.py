"""End-to-end generation throughput of tierkv on a model with dummy weights at real shapes.

    python benchmarks/engine_throughput.py --model llama-3.1-8b --num-requests 256 --prompt-len 1024 --output-len 128
    # one sequence whose KV (32 GiB) is larger than the GPU tier: decode time per token vs the PCIe bound
    python benchmarks/engine_throughput.py --num-requests 1 --prompt-len 262144 --output-len 16 --gpu-memory 8GiB \
        --cpu-memory 40GiB --max-model-len 270000

Prints output tokens/s, the median decode step (steps without prefill tokens) and the per-tier stats; writes JSON
with --out. The PCIe bound of a decode step is the KV that does not fit in the GPU tier (it must cross the link
every step) over the host-to-device copy bandwidth measured at the start of the run (a contiguous pinned copy).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from common import add_workload_args, log_compiles, run_meta, timed_generation, warm_up, workload_prompts, write_json

import tierkv
import tierkv.kv.mover
from tierkv.kv.stats import format_stats


def h2d_gbps(nbytes: int = 1 << 30) -> float:
    """Host-to-device bandwidth of one contiguous pinned copy (the link's ceiling for this run)."""
    src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(3):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    return 3 * nbytes / (time.perf_counter() - t) / 1e9


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(ap)
    ap.add_argument("--gpu-memory")
    ap.add_argument("--cpu-memory")
    ap.add_argument("--nvme-dir")
    ap.add_argument("--nvme-memory")
    ap.add_argument("--nvme-backend", help="auto, kvikio or posix (default: tierkv's)")
    ap.add_argument(
        "--kv-cache-dtype",
        help="fp8: the GPU tier holds blocks compressed (about twice the tokens; the cold tiers too; lossy, opt-in)",
    )
    ap.add_argument("--cold-kv-dtype", help="fp8: the CPU and NVMe tiers hold blocks compressed (lossy, opt-in)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-model-len", type=int)
    ap.add_argument("--slice-steps", type=int, help="steps a group keeps the GPU when not all fit (default: tierkv's)")
    ap.add_argument("--block-size", type=int, help="tokens per KV block (default: tierkv's)")
    ap.add_argument("--staging-blocks", type=int, help="blocks per streamed chunk (default: tierkv's)")
    ap.add_argument("--no-cuda-graphs", action="store_true", help="run decode steps eagerly (comparison)")
    ap.add_argument(
        "--no-async-scheduling",
        action="store_true",
        help="plan each step only after the last one's tokens are back (comparison)",
    )
    ap.add_argument("--no-prefetch", action="store_true", help="turn the engine's prefetch off (overlap comparison)")
    ap.add_argument(
        "--oversubscribe",
        action="store_true",
        help="start every request at once; groups take turns on the GPU, swapping",
    )
    ap.add_argument(
        "--serial-transfers",
        action="store_true",
        help="baseline: every GPU<->CPU transfer waits for the compute before it and compute waits for it (no overlap)",
    )
    ap.add_argument(
        "--h2d-priority",
        choices=["high", "default"],
        default="high",
        help="the host-to-GPU copy stream's priority (comparison: tierkv's is high)",
    )
    ap.add_argument("--out")
    args = ap.parse_args()
    tierkv.kv.mover.Mover.prioritize_h2d = args.h2d_priority == "high"
    opts = dict(
        load_format="dummy",
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs,
        prefetch=not args.no_prefetch,
        enable_prefix_caching=False,
        cuda_graphs=not args.no_cuda_graphs,
        async_scheduling=not args.no_async_scheduling,
        oversubscribe=args.oversubscribe,
    )
    for name in ("max_model_len", "block_size", "staging_blocks", "slice_steps"):
        if getattr(args, name):
            opts[name] = getattr(args, name)
    for name in (
        "gpu_memory",
        "cpu_memory",
        "nvme_dir",
        "nvme_memory",
        "nvme_backend",
        "kv_cache_dtype",
        "cold_kv_dtype",
    ):
        if getattr(args, name):
            opts[name] = getattr(args, name)
    t0 = time.perf_counter()
    llm = tierkv.LLM(args.model, **opts)
    load_s = time.perf_counter() - t0
    vocab = llm.loaded.spec.vocab_size
    prompts = workload_prompts(args.num_requests, args.prompt_len, vocab).tolist()
    params = tierkv.SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    link = h2d_gbps() if torch.cuda.is_available() else None
    warm_up(llm, prompts)
    llm.pm.reset_counters()
    llm.pm.mover.serialize = args.serial_transfers
    log_compiles()  # a kernel compiled inside the timed part is a finding: say so
    steps: list = []
    wall, generated, decode_steps = timed_generation(llm, prompts, params, steps)
    stats = llm.stats()
    print(format_stats(stats))
    step = statistics.median(decode_steps) if decode_steps else None
    # (As the GPU tier stores it: fp8 bytes under --kv-cache-dtype fp8.)
    kv_bytes = sum(len(p) + args.output_len for p in prompts) * llm.layout.block_nbytes // llm.layout.block_size
    gpu_bytes = stats["tiers"]["gpu"]["capacity_bytes"]
    # The per-step PCIe bound holds where one sequence streams its older KV every step (item 3). Where groups of
    # sequences take turns on the GPU instead, bytes cross at group changes, not every step: report the link time.
    streams = stats["engine"]["streamed_steps"] > 0
    bound = max(0, kv_bytes - gpu_bytes) / (link * 1e9) if link and streams else None
    # Beyond the GPU and CPU tiers together, the oldest blocks stay on NVMe and are read every step: the disk's
    # sequential O_DIRECT read rate, measured here after the run on the same directory, sets a bound of its own.
    nvme_bytes = max(0, kv_bytes - gpu_bytes - stats["tiers"].get("cpu", {}).get("capacity_bytes", 0))
    nvme_read = nvme_bound = None
    if bound and args.nvme_dir and nvme_bytes:
        from nvme_io import raw_direct

        # The disk's best: 16 MiB reads one at a time, or eight in flight (a virtio disk reads faster with several).
        _, alone, parallel = raw_direct(
            os.path.join(args.nvme_dir, "read-rate.bin"), min(nvme_bytes, 4 << 30), slices=[(16 << 20, 16 << 20, 8)]
        )
        nvme_read = max(alone, *parallel.values())
        nvme_bound = nvme_bytes / (nvme_read * 1e9)
    print(
        f"{args.num_requests} x ({args.prompt_len} + {args.output_len}) on {args.model}: {wall:.1f} s, "
        f"{generated / wall:.1f} output tok/s (load {load_s:.1f} s; {stats['engine']['steps']} steps, "
        f"{stats['engine']['preemptions']} preemptions, prefetch {'off' if args.no_prefetch else 'on'}, "
        f"{'transfers serialized with compute, ' if args.serial_transfers else ''}"
        f"{stats['engine']['deferred_steps']} steps overlapped by asynchronous scheduling"
        f"{', KV in fp8 on the GPU: ' + str(stats['tiers']['gpu']['capacity_blocks']) + ' blocks' if args.kv_cache_dtype else ''})"
    )
    if step is not None:
        line = f"median decode step {step * 1e3:.1f} ms over {len(decode_steps)} steps"
        if bound:
            line += (
                f"; KV {kv_bytes / 2**30:.1f} GiB, GPU tier {gpu_bytes / 2**30:.1f} GiB: {(kv_bytes - gpu_bytes) / 2**30:.1f} GiB "
                f"cross the link per step, PCIe bound {bound * 1e3:.1f} ms at {link:.1f} GB/s: step = {step / bound:.2f}x the bound"
            )
            if args.cold_kv_dtype and not args.kv_cache_dtype:
                line += f" (the bound of the KV's own bytes; the {args.cold_kv_dtype} cold tiers send fewer)"

        if nvme_bound:
            line += (
                f"; {nvme_bytes / 2**30:.1f} GiB of it read from NVMe per step, NVMe bound {nvme_bound * 1e3:.1f} ms at "
                f"{nvme_read:.2f} GB/s (sequential O_DIRECT 16 MiB reads, the faster of one or eight in flight, this run): "
                f"step = {step / max(bound, nvme_bound):.2f}x "
                "the larger bound"
            )
        print(line)
    moved = {k: v for k, v in stats["links"].items() if v["bytes"]}
    if moved and not streams:
        print(
            "links: "
            + ", ".join(f"{k} {v['bytes'] / 2**30:.1f} GiB in {v['seconds']:.2f} s" for k, v in moved.items())
            + f" (of {wall:.1f} s wall)"
        )
    write_json(
        args.out,
        run_meta(),
        wall_s=wall,
        output_tokens=generated,
        output_tok_per_s=generated / wall,
        stats=stats,
        decode_step_s=step,
        decode_steps=len(decode_steps),
        h2d_gbps=link,
        kv_bytes=kv_bytes,
        kv_cache_dtype=args.kv_cache_dtype,
        cold_kv_dtype=args.cold_kv_dtype,
        pcie_bound_s=bound,
        nvme_bytes_per_step=nvme_bytes if nvme_bound else None,
        nvme_read_gbps=nvme_read,
        nvme_bound_s=nvme_bound,
        prefetch=not args.no_prefetch,
        oversubscribe=args.oversubscribe,
        serial_transfers=args.serial_transfers,
        steps=steps,
    )
    llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

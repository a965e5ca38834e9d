"""Tensor-parallel scaling on one host: the same workload at each tensor_parallel_size, dummy bf16 weights.

    python benchmarks/tp_scaling.py --model llama-3.1-8b --tp 1 2 --num-requests 64 --prompt-len 1024 --output-len 128
    python benchmarks/tp_scaling.py --model llama-3.1-70b --tp 2 --num-requests 32 --prompt-len 8192 --output-len 64 \\
        --gpu-memory 8GiB --cpu-memory 60GiB        # KV spills to pinned RAM

Per size: output tok/s over the whole run, the median decode step (steps without prefill tokens), and the
traffic to and from the GPUs summed over the ranks with the links' busy time. Each size runs in its own
process group, one after the other.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from common import append_rows, run_meta, timed_generation, write_json

import tierkv


def run_one(args, tp: int) -> dict:
    opts = dict(
        load_format="dummy",
        tensor_parallel_size=tp,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs,
        enable_prefix_caching=False,
    )
    for name in ("gpu_memory", "cpu_memory"):
        if getattr(args, name):
            opts[name] = getattr(args, name)
    t0 = time.perf_counter()
    llm = tierkv.LLM(args.model, **opts)
    load_s = time.perf_counter() - t0
    try:
        vocab = llm.loaded.spec.vocab_size
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(0, vocab, (args.num_requests, args.prompt_len), generator=g).tolist()
        llm.generate(prompts[:2], tierkv.SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)  # warm-up
        llm.pm.reset_counters()
        params = tierkv.SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
        wall, generated, decode_steps = timed_generation(llm, prompts, params)
        stats = llm.stats()
    finally:
        llm.close()
    total = stats.get("tensor_parallel", {}).get("total", stats)
    row = {
        "tp": tp,
        "load_s": load_s,
        "wall_s": wall,
        "output_tokens": generated,
        "output_tok_per_s": generated / wall,
        "decode_step_ms": 1e3 * statistics.median(decode_steps) if decode_steps else None,
        "decode_steps": len(decode_steps),
        "bytes_to_gpu": total["tiers"]["gpu"]["bytes_in"],
        "bytes_from_gpu": total["tiers"]["gpu"]["bytes_out"],
        "transfer_s": sum(v["seconds"] for v in total["links"].values()),
        "engine": stats["engine"],
    }
    print(
        f"TP={tp}: {row['output_tok_per_s']:.1f} output tok/s, decode step {row['decode_step_ms'] or float('nan'):.1f} ms "
        f"(median of {len(decode_steps)}), {row['bytes_to_gpu'] / 2**30:.1f} GiB to the GPUs, load {load_s:.0f} s",
        flush=True,
    )
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--gpu-memory")
    ap.add_argument("--cpu-memory")
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--out")
    ap.add_argument("--record", help="append a markdown row per size to this file")
    args = ap.parse_args()
    rows = [run_one(args, tp) for tp in args.tp]
    meta = run_meta()
    base = rows[0]
    lines = []
    for r in rows:
        ratio = r["output_tok_per_s"] / base["output_tok_per_s"]
        lines.append(
            f"| {meta['date']} | {torch.cuda.device_count()}x {meta['device']} | {args.model}, TP={r['tp']}, {args.num_requests} x "
            f"({args.prompt_len} + {args.output_len}) | {r['output_tok_per_s']:.1f} output tok/s ({ratio:.2f}x TP={base['tp']}), "
            f"decode step {r['decode_step_ms'] or float('nan'):.1f} ms | `{meta['command']}` |"
        )
    print("\n".join(lines))
    append_rows(args.record, lines)
    write_json(args.out, meta, rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

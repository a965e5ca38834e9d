"""End-to-end generation throughput of tierkv on a model with dummy weights at real shapes.

    python benchmarks/engine_throughput.py --model llama-3.1-8b --num-requests 256 --prompt-len 1024 --output-len 128

Prints output tokens/s and the per-tier stats; writes JSON with --out.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import tierkv
from common import run_meta, write_json
from tierkv.stats import format_stats


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--gpu-memory")
    ap.add_argument("--cpu-memory")
    ap.add_argument("--nvme-dir")
    ap.add_argument("--nvme-memory")
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--out")
    args = ap.parse_args()
    opts = dict(load_format="dummy", max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs)
    for name in ("gpu_memory", "cpu_memory", "nvme_dir", "nvme_memory"):
        if getattr(args, name):
            opts[name] = getattr(args, name)
    t0 = time.perf_counter()
    llm = tierkv.LLM(args.model, **opts)
    load_s = time.perf_counter() - t0
    vocab = llm.loaded.spec.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, vocab, (args.num_requests, args.prompt_len), generator=g).tolist()
    params = tierkv.SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    llm.generate(prompts[:2], tierkv.SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)  # warm-up: compile kernels
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    stats = llm.stats()
    print(format_stats(stats))
    print(f"{args.num_requests} x ({args.prompt_len} + {args.output_len}) on {args.model}: {wall:.1f} s, "
          f"{generated / wall:.1f} output tok/s, {(generated + args.num_requests * args.prompt_len) / wall:.0f} total tok/s "
          f"(load {load_s:.1f} s; {stats['engine']['steps']} steps, {stats['engine']['preemptions']} preemptions)")
    write_json(args.out, run_meta(), wall_s=wall, output_tokens=generated, output_tok_per_s=generated / wall, stats=stats)
    llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

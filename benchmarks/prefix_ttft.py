"""Time to first token of a request whose long prefix is cached on the GPU, in pinned RAM, on NVMe, against
recomputing it, in one run.

    python benchmarks/prefix_ttft.py --model llama-3.1-8b --prefix-len 32768 --out prefix_ttft.json --record BENCHMARKS.md

Each measured request is the prefix plus its own 16-token suffix, max_tokens=1; its TTFT is the wall time of
that one generate() call (lookup, any load from a lower tier, the suffix's prefill, the first token). Each case
is measured `--repeats` times (the prefix demoted back to its tier before each) and reported as the median,
with the fastest and slowest. The NVMe case runs twice: loading what was found ("always") and with tierkv's
load-or-recompute choice ("auto").
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from common import append_rows, run_meta, write_json

import tierkv


def ttft(llm, prompt, salt=None) -> tuple[float, int]:
    params = tierkv.SamplingParams(max_tokens=1, temperature=0, ignore_eos=True, cache_salt=salt)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out.num_cached_tokens


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--prefix-len", type=int, default=32768)
    ap.add_argument("--gpu-memory", default="16GiB")
    ap.add_argument("--cpu-memory", default="8GiB")
    ap.add_argument("--nvme-dir", default="/tmp/tierkv-prefix-nvme")
    ap.add_argument("--nvme-memory", default="8GiB")
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out")
    ap.add_argument("--record")
    args = ap.parse_args()
    llm = tierkv.LLM(
        args.model,
        load_format="dummy",
        gpu_memory=args.gpu_memory,
        cpu_memory=args.cpu_memory,
        nvme_dir=args.nvme_dir,
        nvme_memory=args.nvme_memory,
        max_num_batched_tokens=args.max_num_batched_tokens,
        prefix_load="auto",
    )
    vocab = llm.loaded.spec.vocab_size
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, vocab, (args.prefix_len,), generator=g).tolist()

    def request() -> list[int]:
        return prefix + torch.randint(0, vocab, (16,), generator=g).tolist()

    kv_bytes = args.prefix_len * llm.layout.block_nbytes // llm.layout.block_size
    rows = {}
    ttft(llm, request(), salt="warm-up")  # compiles kernels, warms allocators
    llm.reset_prefix_cache()
    rows["recompute (cold cache)"] = [ttft(llm, request())]
    llm.reset_prefix_cache()
    rows["recompute (cold cache)"].append(ttft(llm, request()))
    rows["recompute (warm, other salt)"] = [
        ttft(llm, request(), salt=f"other-tenant-{i}") for i in range(max(2, args.repeats // 2))
    ]

    def measure(name: str, tiers: list[str], load: str, repeats: int) -> None:
        llm.engine.prefix.load = load
        rows[name] = []
        for _ in range(repeats):
            for tier in tiers:
                llm.pm.demote_cached(tier)
            rows[name].append(ttft(llm, request()))

    measure("hit on GPU", [], "auto", args.repeats)
    measure("hit in pinned RAM", ["cpu"], "always", args.repeats)
    measure("hit on NVMe, loaded", ["cpu", "nvme"], "always", max(1, args.repeats // 2))
    measure("hit on NVMe, load-or-recompute", ["cpu", "nvme"], "auto", max(1, args.repeats // 2))
    llm.engine.prefix.load = "auto"
    summary = {}
    for name, runs in rows.items():
        times = sorted(t for t, _ in runs)
        summary[name] = (statistics.median(times), times[0], times[-1], len(times), runs[0][1])
    stats = llm.stats()
    llm.close()
    base = summary["recompute (warm, other salt)"][0]
    meta = run_meta()
    print(f"{args.model}, prefix {args.prefix_len} tokens = {kv_bytes / 2**30:.2f} GiB of KV, {meta['device']}")
    for name, (med, lo, hi, n, cached) in summary.items():
        print(
            f"  {name:<32} TTFT {med * 1e3:8.1f} ms (median of {n}; {lo * 1e3:.1f}-{hi * 1e3:.1f})   reused {cached:>6} tokens   "
            f"{base / med:6.1f}x vs recompute"
        )
    print(f"  NVMe backend: {stats['tiers']['nvme'].get('backend')}; prefix stats: {stats['prefix']}")
    write_json(
        args.out,
        meta,
        rows={k: {"ttft_s": [t for t, _ in v], "cached_tokens": v[0][1]} for k, v in rows.items()},
        kv_bytes=kv_bytes,
        stats=stats,
    )
    append_rows(
        args.record,
        [
            f"| {meta['date']} | {meta['device']} | {name} | {med * 1e3:.1f} ms (median of {n}; {lo * 1e3:.1f}-{hi * 1e3:.1f}) | {cached} | "
            f"{base / med:.1f}x | `{meta['command']}` |"
            for name, (med, lo, hi, n, cached) in summary.items()
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

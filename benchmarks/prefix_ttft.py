"""Time to first token of a request whose long prefix is cached on the GPU, in pinned RAM, on NVMe, against
recomputing it, in one run.

    python benchmarks/prefix_ttft.py --model llama-3.1-8b --prefix-len 32768 --out prefix_ttft.json --record BENCHMARKS.md

Each measured request is the prefix plus its own 16-token suffix, max_tokens=1; its TTFT is the wall time of
that one generate() call (lookup, any load from a lower tier, the suffix's prefill, the first token). The NVMe
case runs twice: loading what was found ("always") and with tierkv's load-or-recompute choice ("auto").
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import tierkv
from common import append_rows, run_meta, write_json


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
    ap.add_argument("--out")
    ap.add_argument("--record")
    args = ap.parse_args()
    llm = tierkv.LLM(
        args.model, load_format="dummy", gpu_memory=args.gpu_memory, cpu_memory=args.cpu_memory, nvme_dir=args.nvme_dir,
        nvme_memory=args.nvme_memory, max_num_batched_tokens=args.max_num_batched_tokens, prefix_load="auto",
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
    rows["recompute (cold cache)"] = ttft(llm, request())
    rows["recompute (warm, other salt)"] = ttft(llm, request(), salt="other-tenant")
    rows["hit on GPU"] = ttft(llm, request())
    llm.pm.demote_cached("cpu")
    llm.engine.prefix_load = "always"
    rows["hit in pinned RAM"] = ttft(llm, request())
    llm.pm.demote_cached("cpu")
    llm.pm.demote_cached("nvme")
    rows["hit on NVMe, loaded"] = ttft(llm, request())
    llm.pm.demote_cached("cpu")
    llm.pm.demote_cached("nvme")
    llm.engine.prefix_load = "auto"
    rows["hit on NVMe, load-or-recompute"] = ttft(llm, request())
    stats = llm.stats()
    llm.close()
    base = rows["recompute (warm, other salt)"][0]
    meta = run_meta()
    print(f"{args.model}, prefix {args.prefix_len} tokens = {kv_bytes / 2**30:.2f} GiB of KV, {meta['device']}")
    for name, (t, cached) in rows.items():
        print(f"  {name:<32} TTFT {t * 1e3:9.1f} ms   reused {cached:>6} tokens   {base / t:6.1f}x vs recompute")
    print(f"  NVMe backend: {stats['tiers']['nvme'].get('backend')}; prefix stats: {stats['prefix']}")
    write_json(args.out, meta, rows={k: {"ttft_s": v[0], "cached_tokens": v[1]} for k, v in rows.items()}, kv_bytes=kv_bytes, stats=stats)
    append_rows(args.record, [
        f"| {meta['date']} | {meta['device']} | {name} | {t * 1e3:.1f} ms | {cached} | {base / t:.1f}x | `{meta['command']}` |"
        for name, (t, cached) in rows.items()
    ])
    return 0


if __name__ == "__main__":
    sys.exit(main())

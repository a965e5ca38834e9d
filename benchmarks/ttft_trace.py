"""Where the time of one pinned-RAM prefix hit goes: a torch.profiler trace of the request, summarised as a
timeline (host phases, the promotion's copy kernels, the compute kernels), plus a Chrome trace file.

    python benchmarks/ttft_trace.py --model llama-3.1-8b --prefix-len 32768 --trace ttft_trace.json
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from common import annotate
from torch.profiler import ProfilerActivity, profile, record_function

import tierkv


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--prefix-len", type=int, default=32768)
    ap.add_argument("--trace")
    args = ap.parse_args()
    llm = tierkv.LLM(
        args.model,
        load_format="dummy",
        gpu_memory="16GiB",
        cpu_memory="8GiB",
        max_num_batched_tokens=8192,
        prefix_load="always",
    )
    vocab = llm.loaded.spec.vocab_size
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, vocab, (args.prefix_len,), generator=g).tolist()
    params = tierkv.SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    llm.generate([prefix + [1] * 16], params, use_tqdm=False)
    for i in range(3):  # warm the hit path
        llm.pm.demote_cached("cpu")
        llm.generate([prefix + [2 + i] * 16], params, use_tqdm=False)
    llm.pm.demote_cached("cpu")
    torch.cuda.synchronize()
    engine = llm.engine
    annotate(engine, ("_admit", "_complete"), "tierkv")
    annotate(engine.runner, ("run_forward",), "tierkv")
    annotate(engine.prefix.hasher, ("keys",), "tierkv")
    annotate(llm.pm, ("lookup", "attach", "prefetch", "acquire"), "tierkv")
    annotate(llm.pm.mover, ("move",), "tierkv")
    annotate(llm, ("_add",), "tierkv")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        with record_function("tierkv.generate"):
            out = llm.generate([prefix + [9] * 16], params, use_tqdm=False)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    print(f"TTFT {wall * 1e3:.1f} ms, reused {out[0].num_cached_tokens} tokens")
    events = [e for e in prof.events() if e.device_type.name == "CUDA" or e.name.startswith("tierkv.")]
    start = min(e.time_range.start for e in prof.events() if e.name == "tierkv.generate")
    rows = []
    for e in events:
        name = e.name
        if e.device_type.name == "CUDA":
            if "copy_blocks" in name or ("emcpy" in name and "Pinned" in name):
                name = "copy_blocks (promotion)"
            elif "rms_norm" in name:
                name = "rms_norm"
            else:
                continue
        rows.append((e.time_range.start - start, e.time_range.end - start, name))
    rows.sort()
    shown = {}
    for s, e, name in rows:
        first = shown.setdefault(name, [s, e, 0])
        first[1] = max(first[1], e)
        first[2] += 1
    for name, (s, e, n) in sorted(shown.items(), key=lambda kv: kv[1][0]):
        print(f"  {name:<28} first start {s / 1e3:8.2f} ms   last end {e / 1e3:8.2f} ms   x{n}")
    copies = [(s, e) for s, e, name in rows if name.startswith("copy_blocks")]
    for s, e in copies:
        print(f"    copy kernel {s / 1e3:8.2f} -> {e / 1e3:8.2f} ms ({(e - s) / 1e3:.2f} ms)")
    if args.trace:
        prof.export_chrome_trace(args.trace)
    llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

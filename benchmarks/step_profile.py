"""Where an engine step's time goes: each phase timed (with a device sync after the GPU phases, so the split is
exact but the overlap between phases is lost), separately for prefill and decode steps.

    python benchmarks/step_profile.py --model llama-3.1-8b --num-requests 256 --prompt-len 1024 --output-len 64
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict

import torch
from common import add_workload_args, run_meta, workload_prompts, write_json

import tierkv

PM_CALLS = (
    "begin_step",
    "append_tokens",
    "acquire",
    "pin_in_place",
    "release",
    "prefetch",
    "add_sequence",
    "free",
    "fork",
    "register",
)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(ap, 256, 1024, 64)
    ap.add_argument("--gpu-memory")
    ap.add_argument("--cpu-memory")
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--out")
    args = ap.parse_args()
    # Steps run one at a time here (a sync after each): asynchronous scheduling would only blur the split.
    opts = dict(
        load_format="dummy",
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=False,
        async_scheduling=False,
    )
    for name in ("gpu_memory", "cpu_memory"):
        if getattr(args, name):
            opts[name] = getattr(args, name)
    llm = tierkv.LLM(args.model, **opts)
    engine, pm = llm.engine, llm.pm
    vocab = llm.loaded.spec.vocab_size
    prompts = workload_prompts(args.num_requests, args.prompt_len, vocab).tolist()
    llm.generate(prompts[:2], tierkv.SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)  # warm-up

    acc = defaultdict(float)

    def timed(name, fn, gpu=False):
        def wrapper(*a, **k):
            t = time.perf_counter()
            out = fn(*a, **k)
            if gpu:
                sync()
            acc[name] += time.perf_counter() - t
            return out

        return wrapper

    sched = engine.scheduler
    sched.admit = timed("schedule", sched.admit)
    sched.schedule = timed("schedule", sched.schedule)
    for name in PM_CALLS:
        setattr(pm, name, timed(f"pm.{name}", getattr(pm, name)))
    runner = engine.runner
    runner._stream_plan = timed("attention metadata", runner._stream_plan)
    model = runner.model
    model.forward = timed("model forward", model.forward, gpu=True)
    model.logits = timed("lm head", model.logits, gpu=True)
    engine._complete = timed("sample + update", engine._complete)

    llm.add_requests(prompts, tierkv.SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True))
    phases = {"prefill": defaultdict(float), "decode": defaultdict(float)}
    steps = {"prefill": 0, "decode": 0}
    sync()
    t_all = time.perf_counter()
    while llm.has_unfinished():
        acc.clear()
        prompt0 = engine.counters.prompt_tokens
        t = time.perf_counter()
        llm.step()
        sync()
        wall = time.perf_counter() - t
        kind = "decode" if engine.counters.prompt_tokens == prompt0 else "prefill"
        steps[kind] += 1
        phases[kind]["step"] += wall
        for name, v in acc.items():
            phases[kind][name] += v
        phases[kind]["other"] += wall - sum(acc.values())
    total = time.perf_counter() - t_all
    report = {}
    for kind in phases:
        n = max(1, steps[kind])
        report[kind] = {
            "steps": steps[kind],
            **{k: 1e3 * v / n for k, v in sorted(phases[kind].items(), key=lambda kv: -kv[1])},
        }
        print(
            f"{kind}: {steps[kind]} steps, per step (ms): "
            + ", ".join(f"{k} {v:.2f}" for k, v in report[kind].items() if k != "steps")
        )
    gen = args.num_requests * args.output_len
    print(f"total {total:.1f} s, {gen / total:.1f} output tok/s with syncs")
    write_json(args.out, run_meta(), report=report, total_s=total)
    llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

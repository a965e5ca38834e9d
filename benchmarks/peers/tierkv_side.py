"""tierkv's side of the comparison with vLLM: run workloads (benchmarks/peers/workloads.py), one engine each.

    python benchmarks/peers/tierkv_side.py fits spill --out-dir /tmp/vs

Writes tierkv_<workload>.json (per pass or turn: seconds, tokens, output tok/s; the engine's stats) per workload.
`--no-prompts-apart`: whole prompts go through the paged prefill kernel too (the A/B of kernels/prompt_attention);
`--max-num-batched-tokens N`: another step budget than vLLM's side gets (an A/B of tierkv alone). `--profile`: the
first pass under torch.profiler instead, summarised as vLLM's side's `--profile` summarises its own (gpu_time.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/, for common

import gpu_time  # noqa: E402
import workloads  # noqa: E402
from common import run_meta, warm_up  # noqa: E402

import tierkv  # noqa: E402
from tierkv.kv.prefix_reuse import PrefixReuse  # noqa: E402
from tierkv.runner import ModelRunner  # noqa: E402


def open_engine(w: workloads.Workload, model: str, max_batched_tokens: int) -> tierkv.LLM:
    opts = dict(
        load_format="dummy",
        max_num_batched_tokens=max_batched_tokens,
        max_num_seqs=workloads.MAX_SEQS,
        max_model_len=w.max_model_len,
        enable_prefix_caching=w.prefix_caching,
        **w.tierkv_extra,
    )
    if w.gpu_kv_gib:
        opts["gpu_memory"] = f"{w.gpu_kv_gib}GiB"
    if w.cpu_gib:
        opts["cpu_memory"] = f"{w.cpu_gib}GiB"
    return tierkv.LLM(model, **opts)


def ready_engine(w: workloads.Workload, model: str, max_batched_tokens: int):
    """(the engine for `w`, warmed up on other ids, its start-up seconds (opening, then warming up), and the
    `generate` that workloads.run and gpu_time.profiled take)."""
    t0 = time.perf_counter()
    llm = open_engine(w, model, max_batched_tokens)
    init_s = time.perf_counter() - t0
    warm_up(llm, workloads.warmup_prompts(w))
    warm_s = time.perf_counter() - t0 - init_s
    llm.pm.reset_counters()
    params = {}

    def generate(sent, max_tokens):
        sp = params.setdefault(max_tokens, tierkv.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
        return [o.outputs[0].token_ids for o in llm.generate(sent, sp, use_tqdm=False)]

    return llm, (init_s, warm_s), generate


def profile_one(w: workloads.Workload, model: str, max_batched_tokens: int) -> str:
    """The workload's first pass under the profiler (gpu_time.summary, as vLLM's side prints it)."""
    llm, _, generate = ready_engine(w, model, max_batched_tokens)
    try:
        return gpu_time.profiled(w, generate)
    finally:
        llm.close()


def run_one(
    w: workloads.Workload, model: str = "llama-3.1-8b", max_batched_tokens: int = workloads.MAX_BATCHED_TOKENS
) -> dict:
    llm, (init_s, warm_s), generate = ready_engine(w, model, max_batched_tokens)
    graphs = llm.engine.runner.graphs
    captures0 = graphs.captures if graphs else 0
    records = workloads.run(w, generate)
    stats = llm.stats()
    captured = (graphs.captures if graphs else 0) - captures0
    llm.close()
    engine = stats["engine"]
    return {
        "engine": "tierkv",
        "workload": w.name,
        "what": w.what,
        "init_s": round(init_s, 1),
        "warm_up_s": round(warm_s, 1),
        "decode_graphs_captured_in_timed_passes": captured,
        "prompts_apart": ModelRunner.prompts_apart,
        "max_batched_tokens": max_batched_tokens,
        "passes": records,
        "total": workloads.summary(records),
        "counters": {
            "preemptions": engine["preemptions"],
            "prefix": stats.get("prefix"),
            "links": {k: v for k, v in stats["links"].items() if v["bytes"]},
        },
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workloads", nargs="+", choices=sorted(workloads.WORKLOADS))
    ap.add_argument("--out-dir", default=".")
    ap.add_argument("--no-prompts-apart", action="store_true")
    ap.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=workloads.MAX_BATCHED_TOKENS,
        help="tierkv's step budget (A/B runs; vLLM's side keeps workloads.MAX_BATCHED_TOKENS)",
    )
    ap.add_argument(
        "--queued-lookahead",
        type=int,
        default=PrefixReuse.queued_lookahead,
        help="waiting requests whose cached prefixes eviction passes over (A/B runs: 0 is plain LRU)",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="instead of the timed runs: each workload's first pass under torch.profiler, and where the GPU time went "
        "(gpu_time.py; vLLM's side: vllm_side.py --profile)",
    )
    args = ap.parse_args()
    ModelRunner.prompts_apart = not args.no_prompts_apart
    default_lookahead = PrefixReuse.queued_lookahead
    PrefixReuse.queued_lookahead = args.queued_lookahead
    if args.profile:
        for name in args.workloads:
            print(profile_one(workloads.WORKLOADS[name], "llama-3.1-8b", args.max_num_batched_tokens))
        return 0
    os.makedirs(args.out_dir, exist_ok=True)
    for name in args.workloads:
        result = {
            "meta": run_meta(),
            **run_one(workloads.WORKLOADS[name], max_batched_tokens=args.max_num_batched_tokens),
        }
        suffix = (
            ("" if ModelRunner.prompts_apart else "_paged")
            + ("" if args.max_num_batched_tokens == workloads.MAX_BATCHED_TOKENS else f"_{args.max_num_batched_tokens}")
            + ("" if args.queued_lookahead == default_lookahead else f"_lookahead{args.queued_lookahead}")
        )
        with open(os.path.join(args.out_dir, f"tierkv_{name}{suffix}.json"), "w") as f:
            json.dump(result, f, indent=1)
        t = result["total"]
        print(
            f"tierkv {name}{suffix}: {t['elapsed_s']:.2f} s, {t['output_tok_per_s']:.1f} output tok/s ("
            + ", ".join(f"{r['label']} {r['elapsed_s']:.2f} s" for r in result["passes"])
            + f"; {result['counters']['preemptions']} preemptions; prefix tokens found by tier "
            + str((result["counters"]["prefix"] or {}).get("hit_tokens_by_tier"))
            + ")",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""vLLM's side of the comparison: the same workloads (benchmarks/peers/workloads.py) through vLLM's offline `LLM`.

vLLM is a benchmark peer, never a dependency of tierkv: it is brought to the GPU machine as ../shared/peers/README.md
says (installed into /tmp/vsite) and run with PYTHONPATH=/tmp/vsite:

    python benchmarks/peers/vllm_side.py fits --model /tmp/vch/c4/llama31_8b_dummy --out-dir /tmp/vs

Workloads that need the same engine settings share one engine (a start takes ~90 s: torch.compile and CUDA graphs):
group them in one call. Each engine gets the workload's GPU KV size (kv_cache_memory_bytes) where it fixes one, and
vLLM's native CPU offloading (kv_offloading_size, backend "native") of the workload's CPU size where the workload
gives vLLM a CPU tier; everything else is vLLM 0.26.0's defaults (FlashAttention 3, chunked prefill, prefix
caching, CUDA graphs FULL_AND_PIECEWISE) and the step budget both engines get (workloads.MAX_*). vLLM never lets
a running sequence's KV exceed its GPU cache: it admits fewer requests, or preempts and recomputes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

# Before vLLM is imported: no flashinfer sampler (flashinfer is not carried), no telemetry, offline.
for key, value in {
    "VLLM_USE_FLASHINFER_SAMPLER": "0",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_HOST_IP": "127.0.0.1",
}.items():
    os.environ.setdefault(key, value)

import gpu_time  # noqa: E402
import workloads  # noqa: E402


def engine_key(w: workloads.Workload) -> tuple:
    return (w.gpu_kv_gib, w.cpu_gib if w.vllm_offload else None, w.max_model_len)


def open_engine(w: workloads.Workload, model: str):
    from vllm import LLM

    kwargs = dict(
        model=model,
        load_format="dummy",
        dtype="bfloat16",
        max_model_len=w.max_model_len,
        max_num_seqs=workloads.MAX_SEQS,
        max_num_batched_tokens=workloads.MAX_BATCHED_TOKENS,
        gpu_memory_utilization=0.90,
        enable_prefix_caching=True,
        skip_tokenizer_init=True,
        seed=0,
        disable_log_stats=False,
    )
    if w.gpu_kv_gib:
        kwargs["kv_cache_memory_bytes"] = int(w.gpu_kv_gib * (1 << 30))
    if w.vllm_offload:
        kwargs["kv_offloading_size"] = w.cpu_gib
        kwargs["kv_offloading_backend"] = "native"
    return LLM(**kwargs)


def counters(llm) -> dict:
    """vLLM's own counters of preemptions, prefix-cache hits and offloading (summed over their labels)."""
    out: dict = {}
    for m in llm.get_metrics():
        if any(k in m.name for k in ("preempt", "prefix_cache", "kv_offload", "prompt_tokens", "generation_tokens")):
            value = getattr(m, "value", None)
            if isinstance(value, (int, float)):
                out[m.name] = out.get(m.name, 0) + value
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workloads", nargs="+", choices=sorted(workloads.WORKLOADS))
    ap.add_argument("--model", required=True, help="the Llama-3.1-8B config folder (from ../shared/peers)")
    ap.add_argument("--out-dir", default=".")
    ap.add_argument(
        "--profile",
        action="store_true",
        help="instead of the timed runs: the first workload's first pass once under torch.profiler, vLLM's engine in "
        "this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), and where the GPU time went (gpu_time.py; tierkv's side: "
        "tierkv_side.py --profile)",
    )
    args = ap.parse_args()
    if args.profile:  # (before vLLM is imported: the engine core must run in this process for the profiler to see it)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    chosen = [workloads.WORKLOADS[n] for n in args.workloads]
    if len({engine_key(w) for w in chosen}) != 1:
        raise SystemExit(f"these workloads need different vLLM engines: {[(w.name, engine_key(w)) for w in chosen]}")
    import vllm
    from vllm import SamplingParams

    t0 = time.perf_counter()
    llm = open_engine(chosen[0], args.model)
    init_s = time.perf_counter() - t0
    cfg = llm.llm_engine.vllm_config
    engine = {
        "vllm": vllm.__version__,
        "init_s": round(init_s, 1),
        "num_gpu_blocks": getattr(cfg.cache_config, "num_gpu_blocks", None),
        "block_size": cfg.cache_config.block_size,
        "kv_connector": cfg.kv_transfer_config.kv_connector if cfg.kv_transfer_config else None,
        "cudagraph_mode": str(cfg.compilation_config.cudagraph_mode),
    }
    print("vLLM engine", json.dumps(engine), flush=True)

    def generate(sent, max_tokens):
        sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
        outs = llm.generate([{"prompt_token_ids": p} for p in sent], sp, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    if args.profile:
        generate(workloads.warmup_prompts(chosen[0]), 4)
        print(gpu_time.profiled(chosen[0], generate), flush=True)
        return 0
    os.makedirs(args.out_dir, exist_ok=True)
    for i, w in enumerate(chosen):
        if i == 0:  # warm-up as tierkv's side does: other random ids, then short decodes
            generate(workloads.warmup_prompts(w), 4)
        before = counters(llm)
        records = workloads.run(w, generate)
        after = counters(llm)
        result = {
            "meta": {"date": datetime.date.today().isoformat(), "command": "python " + " ".join(sys.argv)},
            "engine": "vllm",
            "workload": w.name,
            "what": w.what,
            "vllm_engine": engine,
            "passes": records,
            "total": workloads.summary(records),
            "counters": {k: v - before.get(k, 0) for k, v in after.items()},
        }
        with open(os.path.join(args.out_dir, f"vllm_{w.name}.json"), "w") as f:
            json.dump(result, f, indent=1)
        t = result["total"]
        print(
            f"vllm {w.name}: {t['elapsed_s']:.2f} s, {t['output_tok_per_s']:.1f} output tok/s ("
            + ", ".join(f"{r['label']} {r['elapsed_s']:.2f} s" for r in records)
            + ")",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

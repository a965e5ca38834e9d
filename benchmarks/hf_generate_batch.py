"""The baseline of the fast-path issue's item 1, measured in the same call as tierkv: transformers' continuous
batching, `generate_batch()`, on the same requests as `engine_throughput.py` (same seed, same prompt and output
lengths; dummy bf16 weights at the real shape, greedy, every request generating exactly --output-len tokens).

    python benchmarks/hf_generate_batch.py --model llama-3.1-8b --num-requests 256 --prompt-len 1024 --output-len 128 \
        --out hf_generate_batch.json

The model loads with transformers' default attention; generate_batch() runs its paged variant of it for the run
(the H100 figure below came from attn_implementation="paged|sdpa").
A short generate_batch() call first pays the one-time costs (kernel selection) outside the timed run (as in
`tierkv bench --baseline hf`, through the same function). On the H100 (2026-11-22, another lease), 256 x
(1024 + 128): 217.5 output tok/s (150.6 s).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from common import add_workload_args, require_cuda, run_meta, workload_prompts, write_json


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(ap)
    ap.add_argument("--out")
    args = ap.parse_args()
    if not require_cuda("hf_generate_batch"):
        return 2
    import transformers
    from transformers import AutoModelForCausalLM

    from tierkv.bench_baselines import timed_generate_batch
    from tierkv.loader import load_hf_config, resolve_config_path

    device = torch.device("cuda")
    config = load_hf_config(resolve_config_path(args.model))
    t0 = time.perf_counter()
    with torch.device(device):  # random weights, initialised where they run
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    load_s = time.perf_counter() - t0
    # Which attention generate_batch() switches the model to for its run (it switches back after): recorded.
    switches: list[str] = []
    set_attn = model.set_attn_implementation
    model.set_attn_implementation = lambda impl, *a, **k: (switches.append(str(impl)), set_attn(impl, *a, **k))[1]
    # The same prompts as engine_throughput.py: one generator, seed 0, in request order.
    prompts = workload_prompts(args.num_requests, args.prompt_len, config.vocab_size).tolist()
    # No end-of-sequence token: every request runs its full --output-len, as in tierkv's run.
    wall, lengths = timed_generate_batch(model, prompts, args.output_len)
    generated = sum(lengths)
    if len(lengths) != args.num_requests or generated != args.num_requests * args.output_len:
        # A request that failed or stopped early would make the baseline look faster or slower than it is: say so.
        print(
            f"hf_generate_batch: {len(lengths)} of {args.num_requests} requests came back with {generated} tokens, not "
            f"{args.num_requests * args.output_len}: not a valid baseline",
            file=sys.stderr,
        )
        return 1
    meta = run_meta()
    meta["transformers"] = transformers.__version__
    row = dict(
        num_requests=args.num_requests,
        prompt_len=args.prompt_len,
        output_len=args.output_len,
        wall_s=wall,
        output_tokens=generated,
        output_tok_per_s=generated / wall,
        load_s=load_s,
        attn_implementation_loaded=model.config._attn_implementation,
        attn_implementation_switches=switches,
        max_gpu_bytes=torch.cuda.max_memory_allocated(),
    )
    write_json(args.out, meta, **row)
    print(
        f"transformers {transformers.__version__} generate_batch() (attention {switches[0] if switches else row['attn_implementation_loaded']}), {args.num_requests} x "
        f"({args.prompt_len} + {args.output_len}) on {args.model}: {wall:.1f} s, {generated / wall:.1f} output tok/s "
        f"(load {load_s:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

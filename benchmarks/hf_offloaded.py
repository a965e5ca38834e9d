"""The baseline of the fast-path issue's item 2: transformers' `generate()` with its offloaded KV cache
(`cache_implementation="offloaded"`: every layer's KV lives in CPU RAM and is brought to the GPU for its layer's
turn) on the same requests as `engine_throughput.py` (same seed, same prompt and output lengths), in batches of
the size it can hold (halved on out-of-memory).

    python benchmarks/hf_offloaded.py --model llama-3.1-8b --num-requests 32 --prompt-len 8192 --output-len 64 \
        --batch-size 8 --out hf_offloaded.json

Dummy (random) weights at the real shape, bf16, greedy, every request generating exactly --output-len tokens.
With --batches N only the first N batches run (the others have the same shapes); the JSON and the printed line
then say how many ran and give the measured time per batch, and the total for all requests as an extrapolation,
marked as such. The JSON is rewritten after every batch, so a run cut short by a time limit keeps what it measured.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from common import add_workload_args, require_cuda, run_meta, workload_prompts, write_json


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(ap, 32, 8192, 64)
    ap.add_argument("--batch-size", type=int, default=8, help="requests per generate() call (halved on out-of-memory)")
    ap.add_argument("--batches", type=int, help="run only this many batches (the rest have the same shapes)")
    ap.add_argument(
        "--cache",
        default="offloaded",
        choices=["offloaded", "dynamic"],
        help="transformers' cache (dynamic: all KV on the GPU)",
    )
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.device == "cuda" and not require_cuda(
        "hf_offloaded"
    ):  # (transformers' offloaded cache copies on CUDA streams)
        return 2
    import transformers
    from transformers import AutoModelForCausalLM

    from tierkv.loader import load_hf_config, resolve_config_path

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = load_hf_config(resolve_config_path(args.model))
    t0 = time.perf_counter()
    with torch.device(device):  # random weights, initialised where they run
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    load_s = time.perf_counter() - t0
    # The same prompts as engine_throughput.py: one generator, seed 0, in request order.
    prompts = workload_prompts(args.num_requests, args.prompt_len, config.vocab_size)
    kwargs = dict(max_new_tokens=args.output_len, min_new_tokens=args.output_len, do_sample=False, pad_token_id=0)
    if args.cache == "offloaded":
        kwargs["cache_implementation"] = "offloaded"

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    batch = args.batch_size
    # Warm-up at the full batch shape (2 new tokens): the first call at a new shape pays one-time costs (kernel
    # selection for long sequences, pinned host buffers for the offloaded layers, which torch's host allocator
    # keeps for reuse) that are not the offloaded cache's steady speed.
    warm = prompts[:batch].to(device)
    with torch.inference_mode():
        model.generate(
            warm, attention_mask=torch.ones_like(warm), **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2}
        )
    del warm
    done, walls, sizes, errors = 0, [], [], []
    meta = run_meta()
    meta["transformers"] = transformers.__version__

    def record(final: bool) -> dict:
        measured = sum(walls)
        tokens = done * args.output_len
        row = dict(
            cache=args.cache,
            batch_sizes=sizes,
            batch_walls_s=walls,
            requests_run=done,
            num_requests=args.num_requests,
            prompt_len=args.prompt_len,
            output_len=args.output_len,
            wall_s=measured,
            output_tokens=tokens,
            output_tok_per_s=tokens / measured if measured else None,
            load_s=load_s,
            errors=errors,
            complete=done == args.num_requests,
            max_gpu_bytes=torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
        )
        if done and done < args.num_requests:
            row["extrapolated_wall_s"] = measured / done * args.num_requests  # same shapes: time scales with requests
        if len(walls) > 1:
            # The first timed batch has run up to 1.6x slower than the rest despite the warm-up (2026-11-24, H100):
            # the rate of the batches after it, so that a ratio against this baseline can be given both ways.
            row["steady_output_tok_per_s"] = sum(sizes[1:]) * args.output_len / sum(walls[1:])
        write_json(args.out, meta, **row)
        return row

    limit = args.batches if args.batches else None
    while done < args.num_requests and (limit is None or len(walls) < limit):
        n = min(batch, args.num_requests - done)
        ids = prompts[done : done + n].to(device)
        try:
            sync()
            t = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
            sync()
            wall = time.perf_counter() - t
        except torch.OutOfMemoryError as exc:  # (the warm-up above already ran at --batch-size: rare here)
            errors.append(f"batch of {n}: out of memory ({str(exc).splitlines()[0][:120]})")
            del ids
            torch.cuda.empty_cache()
            if batch == 1:
                print("hf_offloaded: out of memory at batch size 1", file=sys.stderr)
                record(True)
                return 1
            batch //= 2
            print(f"  out of memory at batch {n}: trying {batch}")
            continue
        assert out.shape == (n, args.prompt_len + args.output_len), out.shape
        done += n
        walls.append(wall)
        sizes.append(n)
        print(
            f"  batch of {n}: {wall:.1f} s ({n * args.output_len / wall:.1f} output tok/s); {done}/{args.num_requests} requests"
        )
        record(False)
    row = record(True)
    line = (
        f"transformers {transformers.__version__} generate() ({args.cache} cache), {done} of {args.num_requests} x "
        f"({args.prompt_len} + {args.output_len}) in batches of {sizes[0] if sizes else batch}: {row['wall_s']:.1f} s, "
        f"{row['output_tok_per_s'] or 0:.2f} output tok/s"
    )
    if "extrapolated_wall_s" in row:
        line += f"; all {args.num_requests} requests extrapolated: {row['extrapolated_wall_s']:.1f} s"
    if "steady_output_tok_per_s" in row:
        line += f"; the batches after the first: {row['steady_output_tok_per_s']:.2f} output tok/s"
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())

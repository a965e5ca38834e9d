"""Beam search throughput with the beams' KV blocks shared against the same requests with sharing switched off
(each forked beam owning copies of all its blocks), in one run on one engine: what sharing buys when the GPU tier
decides how many beams run at once (the PagedAttention paper's beam search throughput measure).

    python benchmarks/beam_sharing.py --model llama-3.1-8b --num-requests 128 --prompt-len 512 --output-len 128 \\
        --beam-width 4 --gpu-memory 8GiB --out beam_sharing.json

Every beam runs to `--output-len` tokens (ignore_eos). Output tokens are the beams' tokens (each running beam's
token per step counts); the same engine runs both cases (its scheduler's sharing switched), each `--repeats` times
(median reported), after a warm-up. Also reported: the peak of live KV blocks, the copies made, preemptions.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
from common import run_meta, write_json

import tierkv
from tierkv import BeamSearchParams


def run_once(llm: tierkv.LLM, prompts: list[list[int]], params: BeamSearchParams) -> dict:
    before = llm.stats()
    llm.pm.ledger.peak_live_blocks = len(llm.pm.blocks)  # (the peak of this run)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    outs = llm.beam_search(prompts, params)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    after = llm.stats()
    tokens = after["engine"]["generated_tokens"] - before["engine"]["generated_tokens"]
    assert all(len(o.sequences) == params.beam_width for o in outs)
    return {
        "seconds": seconds,
        "beam_tokens": tokens,
        "beam_tokens_per_s": tokens / seconds,
        "requests_per_s": len(prompts) / seconds,
        "peak_live_blocks": after["peak_live_blocks"],
        "copies": after["cow_copies"] - before["cow_copies"],
        "forks": after["forks"] - before["forks"],
        "preemptions": after["engine"]["preemptions"] - before["engine"]["preemptions"],
        "steps": after["engine"]["steps"] - before["engine"]["steps"],
        "best_beams": [o.sequences[0].tokens[-params.max_tokens :] for o in outs],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--load-format", default="dummy")
    ap.add_argument("--num-requests", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--beam-width", type=int, default=4)
    ap.add_argument("--gpu-memory", default="8GiB")
    ap.add_argument("--cpu-memory", default="0GiB", help="a CPU tier beside the GPU (default none)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=16384)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default=None)
    ap.add_argument("--out")
    args = ap.parse_args()
    llm = tierkv.LLM(
        args.model,
        load_format=args.load_format,
        gpu_memory=args.gpu_memory,
        cpu_memory=args.cpu_memory,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=False,  # each case computes its prompts (a cached prompt would favour the second)
        **({"device": args.device} if args.device else {}),
    )
    vocab = llm.loaded.spec.vocab_size
    rng = np.random.default_rng(0)
    prompts = [rng.integers(2, vocab, args.prompt_len).tolist() for _ in range(args.num_requests)]
    params = BeamSearchParams(beam_width=args.beam_width, max_tokens=args.output_len, ignore_eos=True)
    llm.beam_search(prompts[:4], BeamSearchParams(beam_width=args.beam_width, max_tokens=8, ignore_eos=True))
    cases = {}
    for shared in (True, False):
        llm.scheduler.share_blocks = shared  # (read by the scheduler's reservations and the engine's forks)
        runs = [run_once(llm, prompts, params) for _ in range(args.repeats)]
        runs.sort(key=lambda r: r["seconds"])
        median = runs[len(runs) // 2]
        name = "shared" if shared else "unshared"
        cases[name] = {
            **{k: v for k, v in median.items() if k != "best_beams"},
            "seconds_all": [r["seconds"] for r in runs],
        }
        cases[name]["_beams"] = median["best_beams"]
        print(
            f"{name}: {median['beam_tokens_per_s']:.0f} beam tokens/s ({median['seconds']:.2f} s, "
            f"[{runs[0]['seconds']:.2f}-{runs[-1]['seconds']:.2f}]), peak {median['peak_live_blocks']} blocks, "
            f"{median['copies']} copies, {median['preemptions']} preemptions",
            flush=True,
        )
    a, b = cases["shared"].pop("_beams"), cases["unshared"].pop("_beams")
    # (bf16 on a GPU: other batch compositions may round differently, and a near tie then picks another beam)
    same = sum(x == y for x, y in zip(a, b)) / len(a)
    ratio = cases["shared"]["beam_tokens_per_s"] / cases["unshared"]["beam_tokens_per_s"]
    print(f"sharing: {ratio:.2f}x the beam tokens/s of private copies; best beams equal in {same:.0%} of requests")
    llm.close()
    if args.out:
        meta = {**vars(args), **run_meta()}
        write_json(args.out, meta, cases=cases, ratio=ratio, same_best_beams=same)
    return 0


if __name__ == "__main__":
    sys.exit(main())

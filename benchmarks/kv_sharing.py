"""KV memory saved by sharing blocks, the PagedAttention paper's measure: 1 - (distinct blocks the live sequences
hold) / (the blocks of their block tables added up), for parallel sampling (n samples share their prompt's blocks)
and beam search (beams share every common prefix), on requests of Alpaca-like lengths.

Parallel sampling's figure depends on lengths only; beam search's also on how long the beams keep common
prefixes, which depends on the model's distribution (a tiny model with random weights concentrates it): run it with
a real model too. Lengths: no dataset can be downloaded here, so prompt and output
lengths are drawn (seeded) from log-normal distributions with the means the paper reports for Alpaca (19.31 and
58.45 tokens); outputs run to their drawn length (ignore_eos). Block size 16, as the paper's.

    python benchmarks/kv_sharing.py --out kv_sharing.json
    python benchmarks/kv_sharing.py --model smollm2-135m-instruct --load-format auto   # a real model's beams

Per case: the saving at the step where the sequences' tables hold the most blocks ("peak"), and over the whole run
(saved blocks summed over steps / table blocks summed over steps).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

import tierkv
from tierkv import BeamSearchParams, SamplingParams


def alpaca_like(num: int, seed: int) -> tuple[list[int], list[int]]:
    """(prompt lengths, output lengths): log-normal, sigma 0.6, scaled to Alpaca's means (19.31, 58.45)."""
    rng = np.random.default_rng(seed)

    def draw(mean: float) -> list[int]:
        x = rng.lognormal(0.0, 0.6, num)
        return [max(1, round(v)) for v in x * mean / x.mean()]

    return draw(19.31), draw(58.45)


def measure(llm: tierkv.LLM, run) -> dict:
    """Run `run()` with the engine's steps observed: per step, table blocks and distinct blocks of live sequences."""
    ledger = llm.pm.ledger
    samples: list[tuple[int, int]] = []
    real_step = llm.engine.step

    def step():
        out = real_step()
        tables = [ledger.seq(i).blocks for i in ledger.sequences]
        logical = sum(map(len, tables))
        if logical:
            samples.append((logical, len({b.block_id for t in tables for b in t})))
        return out

    llm.engine.step = step
    try:
        run()
    finally:
        llm.engine.step = real_step
    peak_logical, peak_physical = max(samples)
    total_logical = sum(s[0] for s in samples)
    total_physical = sum(s[1] for s in samples)
    return {
        "steps": len(samples),
        "peak_table_blocks": peak_logical,
        "peak_distinct_blocks": peak_physical,
        "saved_at_peak": round(1 - peak_physical / peak_logical, 4),
        "saved_over_run": round(1 - total_physical / total_logical, 4),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-llama", help="a preset, a packaged model's name or a checkpoint folder")
    ap.add_argument("--load-format", default="dummy", help="dummy (random weights) or auto (the model's own)")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--widths", type=int, nargs="+", default=[2, 4, 6])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out")
    args = ap.parse_args()
    prompt_lens, output_lens = alpaca_like(args.num_requests, args.seed)
    rng = np.random.default_rng(args.seed + 1)
    results = []
    with tierkv.LLM(args.model, load_format=args.load_format, device="cpu", block_size=16, gpu_blocks=20_000) as llm:
        vocab = llm.loaded.spec.vocab_size
        prompts = [rng.integers(2, vocab, n).tolist() for n in prompt_lens]
        for width in args.widths:
            for kind in ("parallel sampling", "beam search"):
                t0 = time.perf_counter()
                if kind == "parallel sampling":
                    params = [
                        SamplingParams(n=width, max_tokens=m, temperature=1.0, seed=i, ignore_eos=True)
                        for i, m in enumerate(output_lens)
                    ]
                    r = measure(llm, lambda: llm.generate(prompts, params, use_tqdm=False))
                else:

                    def beams():
                        for p, m in zip(prompts, output_lens):  # one beam search per output length
                            llm.beam_search([p], BeamSearchParams(beam_width=width, max_tokens=m, ignore_eos=True))

                    r = measure(llm, beams)
                r.update(kind=kind, width=width, seconds=round(time.perf_counter() - t0, 1))
                results.append(r)
                print(
                    f"{kind}, width {width}: {r['saved_at_peak']:.1%} of the KV blocks saved at peak "
                    f"({r['peak_distinct_blocks']} distinct of {r['peak_table_blocks']}), {r['saved_over_run']:.1%} "
                    f"over the run",
                    flush=True,
                )
    if args.out:
        meta = {
            "date": time.strftime("%Y-%m-%d"),
            "command": "python " + " ".join(sys.argv),
            "prompt_len_mean": float(np.mean(prompt_lens)),
            "output_len_mean": float(np.mean(output_lens)),
        }
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Paged prefill attention (tierkv's Triton kernel) against SDPA over contiguous KV, on the same data; for whole
prompts (no cached keys) also what tierkv's engine runs for them (kernels/prompt_attention.py: batched SDPA over
strided views of the step's rows) and torch's varlen flash attention over the same rows.

bf16, 32 query / 8 KV heads, head_dim 128, block_size 16, blocks scattered at random over the pool (the worst
case for a paged kernel). A case is ENTRIESxLENGTH: ENTRIES prompts of LENGTH tokens, each prefilled in one
causal chunk; or ENTRIESxLENGTH+CACHED: per entry a chunk of LENGTH queries after CACHED tokens already in the
cache (chunked prefill). TFLOP/s counts the (query, key) pairs attended, the causal half only, at 4 * head_dim
FLOPs per pair and head (two matrix products). Median of do_bench.

    python benchmarks/attention_prefill.py --out attention_prefill.json --record BENCHMARKS.md
    python benchmarks/attention_prefill.py --sweep   # also time a grid of PREFILL_CONFIG values per case
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import torch
import torch.nn.functional as F
from common import append_rows, require_cuda, run_meta, write_json
from torch.nn.attention.bias import causal_lower_right

from tierkv.kernels.paged_attention import paged_attention_triton
from tierkv.kernels.paged_batch import PagedBatch
from tierkv.kernels.paged_decode import SPLIT_MAX_Q
from tierkv.kernels.paged_prefill import PREFILL_CONFIG, PREFILL_CONFIG_SMALL
from tierkv.kernels.prompt_attention import PromptRows, flash_supported, prompt_attention, prompt_attention_flash

SWEEP = [
    {"block_m": m, "block_n": n, "num_warps": w, "num_stages": s, "pack_gqa": p}
    for m, n, w, s, p in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4, 5), (False, True))
]
MAX_REL_ERROR = 1e-2


def parse_case(text: str) -> tuple[int, int, int]:
    """ "ENTRIESxLENGTH[+CACHED]" -> (entries, query tokens per entry, cached tokens per entry)."""
    try:
        entries, rest = text.split("x")
        length, _, cached = rest.partition("+")
        case = int(entries), int(length), int(cached or 0)
    except ValueError:
        raise SystemExit(
            f"attention_prefill: case {text!r}: write ENTRIESxLENGTH or ENTRIESxLENGTH+CACHED, e.g. 8x1024 or 1x2048+8192"
        ) from None
    if case[1] <= SPLIT_MAX_Q:
        raise SystemExit(
            f"attention_prefill: case {text!r}: chunks of at most {SPLIT_MAX_Q} queries go to the decode kernel; use a longer LENGTH"
        )
    return case


def case_name(entries: int, length: int, cached: int) -> str:
    return f"{entries}x{length}" + (f"+{cached}" if cached else "")


def build(entries: int, length: int, cached: int, heads: int, kv_heads: int, head_dim: int, block_size: int) -> dict:
    """Random bf16 data on CUDA, twice: contiguous q (B, Hq, L, D) and k, v (B, Hkv, cached + L, D) for SDPA; and
    paged: q (B * L, Hq, D), the same keys in blocks at random slots of one pool laid out as tierkv's (slots, layers,
    K/V, block_size, Hkv, D), and their PagedBatch."""
    dev = torch.device("cuda")
    torch.manual_seed(0)
    total = cached + length
    k = torch.randn(entries, kv_heads, total, head_dim, device=dev, dtype=torch.bfloat16)
    v = torch.randn(entries, kv_heads, total, head_dim, device=dev, dtype=torch.bfloat16)
    q = torch.randn(entries, heads, length, head_dim, device=dev, dtype=torch.bfloat16)
    nb = -(-total // block_size)
    slots = torch.randperm(entries * nb, device=dev).view(entries, nb)
    pool = torch.zeros(entries * nb, 1, 2, block_size, kv_heads, head_dim, device=dev, dtype=torch.bfloat16)
    for j, x in enumerate((k, v)):
        padded = F.pad(x, (0, 0, 0, nb * block_size - total))  # the last block's unused tail
        blocks = padded.view(entries, kv_heads, nb, block_size, head_dim).permute(0, 2, 3, 1, 4)
        pool[slots.flatten(), 0, j] = blocks.reshape(entries * nb, block_size, kv_heads, head_dim)
    meta = PagedBatch(
        q_starts=torch.arange(entries + 1, dtype=torch.int32, device=dev) * length,
        q_pos0=torch.full((entries,), cached, dtype=torch.int32, device=dev),
        context_lens=torch.full((entries,), total, dtype=torch.int32, device=dev),
        first_block=torch.zeros(entries, dtype=torch.int32, device=dev),
        block_tables=slots.to(torch.int32),
        max_q=length,
        max_context=total,
        q_starts_host=[i * length for i in range(entries + 1)],
    )
    qp = q.permute(0, 2, 1, 3).reshape(entries * length, heads, head_dim)
    return {"q": q, "k": k, "v": v, "qp": qp, "kc": pool[:, 0, 0], "vc": pool[:, 0, 1], "meta": meta}


def case(entries: int, length: int, cached: int, args, failed: dict) -> dict:
    """Time SDPA and the paged kernel (its default config, and with --sweep every SWEEP config not in `failed`) on
    one case. `failed` maps str(config) to why it failed (error type, or a wrong result); the sweep adds to it."""
    from triton.testing import do_bench

    shape = {"heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim, "block_size": args.block_size}
    data = build(entries, length, cached, **shape)
    q, k, v = data["q"], data["k"], data["v"]
    scale = args.head_dim**-0.5
    if cached:
        # is_causal aligns the mask top-left; a chunk after cached keys needs it bottom-right (causal_lower_right),
        # which FlashAttention takes only with as many K/V heads as query heads: expanded once, outside the timing.
        group = args.heads // args.kv_heads
        kx, vx = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        mask = causal_lower_right(length, cached + length)

        def sdpa():
            return F.scaled_dot_product_attention(q, kx, vx, attn_mask=mask, scale=scale)
    else:

        def sdpa():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)

    def paged(config=None):
        return paged_attention_triton(data["qp"], data["kc"], data["vc"], data["meta"], scale, prefill_config=config)

    want = sdpa().permute(0, 2, 1, 3).reshape(data["qp"].shape).float()

    def rel_error(got: torch.Tensor) -> float:
        return ((got.float() - want).norm() / want.norm()).item()

    err = rel_error(paged())
    if err > MAX_REL_ERROR:
        raise AssertionError(
            f"paged prefill {case_name(entries, length, cached)} differs from SDPA: relative error {err:.2e}"
        )
    pairs = entries * (length * cached + length * (length + 1) // 2)
    flops = 4 * pairs * args.heads * args.head_dim
    t_sdpa = do_bench(sdpa, warmup=25, rep=100, return_mode="median") / 1e3
    t_paged = do_bench(paged, warmup=25, rep=100, return_mode="median") / 1e3
    t_prompt = t_varlen = prompt_err = None
    if not cached and flash_supported(data["qp"], args.kv_heads):
        # Whole prompts, as the engine attends them: the step's own keys, rows back to back (B * L, H, D).
        kp, vp = (x.permute(0, 2, 1, 3).reshape(entries * length, args.kv_heads, args.head_dim) for x in (k, v))
        bounds = [i * length for i in range(entries + 1)]
        rows = PromptRows(0, torch.tensor(bounds, dtype=torch.int32, device=kp.device), bounds, length)

        def prompt():
            return prompt_attention(data["qp"], kp, vp, rows, scale)

        def varlen():
            return prompt_attention_flash(data["qp"], kp, vp, rows, scale)

        prompt_err = max(rel_error(prompt()), rel_error(varlen()))
        if prompt_err > MAX_REL_ERROR:
            raise AssertionError(f"prompt attention {case_name(entries, length, 0)}: relative error {prompt_err:.2e}")
        t_varlen = do_bench(varlen, warmup=25, rep=100, return_mode="median") / 1e3
        t_prompt = do_bench(prompt, warmup=25, rep=100, return_mode="median") / 1e3
    sweep = []
    if args.sweep:
        for cfg in SWEEP:
            key = str(cfg)
            if key in failed:
                continue
            try:
                cfg_err = rel_error(paged(cfg))
                t = do_bench(lambda: paged(cfg), warmup=5, rep=25, return_mode="median") / 1e3
            except Exception as exc:  # a config that does not compile (shared memory, registers) is skipped
                failed[key] = type(exc).__name__
                print(f"  {cfg}: {failed[key]}")
                continue
            if cfg_err > MAX_REL_ERROR:
                failed[key] = f"relative error {cfg_err:.2e}"
                print(f"  {cfg}: {failed[key]}")
                continue
            sweep.append({**cfg, "ms": t * 1e3, "tflops": flops / t / 1e12})
        sweep.sort(key=lambda r: r["ms"])
        for r in sweep[:5]:
            print(f"  sweep {case_name(entries, length, cached)}: {r}")
    return {
        "sweep": sweep,
        "config": PREFILL_CONFIG if args.head_dim <= 128 else PREFILL_CONFIG_SMALL,
        "entries": entries,
        "length": length,
        "cached": cached,
        "flops": flops,
        "rel_error": err,
        "sdpa_ms": t_sdpa * 1e3,
        "paged_ms": t_paged * 1e3,
        "sdpa_tflops": flops / t_sdpa / 1e12,
        "paged_tflops": flops / t_paged / 1e12,
        "ratio": t_sdpa / t_paged,
        "prompt_ms": t_prompt * 1e3 if t_prompt else None,
        "prompt_tflops": flops / t_prompt / 1e12 if t_prompt else None,
        "prompt_rel_error": prompt_err,
        "prompt_vs_paged": t_paged / t_prompt if t_prompt else None,
        "varlen_ms": t_varlen * 1e3 if t_varlen else None,
    }


def precompile(configs: list[dict], args) -> None:
    """Compile `configs` in parallel worker processes into Triton's on-disk cache, so that the sweep loads each
    kernel instead of compiling ~100 one after another (minutes). Best effort: if the pool fails, the sweep
    compiles as it goes."""
    jobs = max(1, min(args.jobs, len(configs)))
    shape = {"heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim, "block_size": args.block_size}
    t0 = time.perf_counter()
    try:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            failures = sum(pool.map(_compile_configs, [shape] * jobs, [configs[i::jobs] for i in range(jobs)]))
    except Exception as exc:
        print(f"precompile: {type(exc).__name__}: {exc}; compiling during the sweep instead", file=sys.stderr)
        return
    print(
        f"precompiled {len(configs)} configs in {time.perf_counter() - t0:.0f} s on {jobs} processes ({failures} failed: the sweep says why)"
    )


def _compile_configs(shape: dict, configs: list[dict]) -> int:
    """Worker process: run each config once on a small case of the benchmark's shapes. Its kernel specialises as
    the real cases' do (32 blocks per entry: every int argument a multiple of 16, as in the default cases), so
    the sweep finds it in the cache. Returns how many configs failed; the sweep reports why."""
    data = build(1, 32 * shape["block_size"], 0, **shape)
    failures = 0
    for cfg in configs:
        try:
            paged_attention_triton(data["qp"], data["kc"], data["vc"], data["meta"], 1.0, prefill_config=cfg)
        except Exception:
            failures += 1
    torch.cuda.synchronize()
    return failures


def print_best_overall(rows: list[dict]) -> None:
    """The sweep configs that are fastest across all cases: mean over cases of time / that case's best time."""
    scores: dict[tuple, list[float]] = {}
    for r in rows:
        best = r["sweep"][0]["ms"]
        for s in r["sweep"]:
            scores.setdefault(tuple((k, s[k]) for k in SWEEP[0]), []).append(s["ms"] / best)
    ranked = sorted(((sum(v) / len(v), dict(k)) for k, v in scores.items() if len(v) == len(rows)), key=lambda t: t[0])
    for score, cfg in ranked[:3]:
        print(f"sweep, all cases: {cfg}  mean time / case best {score:.3f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--cases", nargs="+", default=["8x1024", "1x8192", "2x4096", "1x2048+8192"], help="ENTRIESxLENGTH[+CACHED]"
    )
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--sweep", action="store_true", help="also time a grid of PREFILL_CONFIG values")
    ap.add_argument(
        "--jobs", type=int, default=min(16, os.cpu_count() or 1), help="processes compiling the sweep's kernels"
    )
    ap.add_argument("--out")
    ap.add_argument("--record")
    args = ap.parse_args()
    if not require_cuda("attention_prefill"):
        return 2
    cases = [parse_case(c) for c in args.cases]
    if args.sweep:
        precompile(SWEEP, args)
    rows, failed = [], {}
    for entries, length, cached in cases:
        r = case(entries, length, cached, args, failed)
        rows.append(r)
        print(
            f"{case_name(entries, length, cached)}: SDPA {r['sdpa_ms']:.3f} ms ({r['sdpa_tflops']:.0f} TFLOP/s)  paged {r['paged_ms']:.3f} ms "
            f"({r['paged_tflops']:.0f} TFLOP/s)  paged/SDPA speed {r['ratio']:.0%}  rel.err {r['rel_error']:.1e}"
            + (
                f"  whole prompts (engine: batched SDPA) {r['prompt_ms']:.3f} ms ({r['prompt_tflops']:.0f} TFLOP/s, "
                f"{r['prompt_vs_paged']:.2f}x paged; varlen flash {r['varlen_ms']:.3f} ms)"
                if r["prompt_ms"]
                else ""
            )
        )
    if args.sweep and all(r["sweep"] for r in rows):
        print_best_overall(rows)
    meta = run_meta()
    write_json(args.out, meta, rows=rows, sweep_failed=failed)
    shape = f"bf16, {args.heads}q/{args.kv_heads}kv, d={args.head_dim}, bs {args.block_size}"
    append_rows(
        args.record,
        [
            f"| {meta['date']} | {meta['device']} | prefill attention {case_name(r['entries'], r['length'], r['cached'])} causal ({shape}) | "
            f"paged {r['paged_ms']:.3f} ms = {r['paged_tflops']:.0f} TFLOP/s | SDPA contiguous {r['sdpa_ms']:.3f} ms = {r['sdpa_tflops']:.0f} TFLOP/s | "
            f"{r['ratio']:.0%} | `{meta['command']}` |"
            for r in rows
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

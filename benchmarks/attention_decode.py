"""Paged decode attention (tierkv's Triton kernel) against SDPA over contiguous KV, on the same data.

bf16, 32 query / 8 KV heads, head_dim 128, block_size 16, blocks scattered at random over the pool (the worst
case for a paged kernel). Effective bandwidth = bytes of K and V read / time. Median of do_bench. Beside it, the
same kernel over the same KV in an fp8 pool (`kv_cache_dtype="fp8"`: e4m3 codes decoded in registers, half the
bytes), checked against SDPA over the KV as that pool stores it.

    python benchmarks/attention_decode.py --out attn.json --record BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from common import append_rows, require_cuda, run_meta, write_json

from tierkv.kernels.kv_fp8 import layer_caches, write_kv_fp8
from tierkv.kernels.paged_attention import paged_attention_triton
from tierkv.kernels.paged_batch import PagedBatch


def case(batch: int, length: int, args) -> dict:
    from triton.testing import do_bench

    torch.manual_seed(0)
    hq, hkv, d, bs = args.heads, args.kv_heads, args.head_dim, args.block_size
    dev = torch.device("cuda")
    k = torch.randn(batch, hkv, length, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn(batch, hkv, length, d, device=dev, dtype=torch.bfloat16)
    q = torch.randn(batch, hq, 1, d, device=dev, dtype=torch.bfloat16)
    scale = d**-0.5
    # Paged copy of the same K/V: block b of sequence i goes to a random slot of one pool.
    nb = length // bs
    slots = torch.randperm(batch * nb, device=dev).view(batch, nb)
    pool = torch.empty(batch * nb, 1, 2, bs, hkv, d, device=dev, dtype=torch.bfloat16)
    pool[slots.flatten(), 0, 0] = k.view(batch, hkv, nb, bs, d).permute(0, 2, 3, 1, 4).reshape(batch * nb, bs, hkv, d)
    pool[slots.flatten(), 0, 1] = v.view(batch, hkv, nb, bs, d).permute(0, 2, 3, 1, 4).reshape(batch * nb, bs, hkv, d)
    kc, vc = pool[:, 0, 0], pool[:, 0, 1]
    meta = PagedBatch(
        q_starts=torch.arange(batch + 1, dtype=torch.int32, device=dev),
        q_pos0=torch.full((batch,), length - 1, dtype=torch.int32, device=dev),
        context_lens=torch.full((batch,), length, dtype=torch.int32, device=dev),
        first_block=torch.zeros(batch, dtype=torch.int32, device=dev),
        block_tables=slots.to(torch.int32),
        max_q=1,
        max_context=length,
    )
    qp = q[:, :, 0].contiguous()  # (T, Hq, D)

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)

    def paged(config=None):
        return paged_attention_triton(qp, kc, vc, meta, scale, decode_config=config)

    want = sdpa()[:, :, 0].float()
    got = paged().float()
    err = ((got - want).norm() / want.norm()).item()
    if err > 1e-2:
        raise AssertionError(f"paged decode differs from SDPA: relative error {err:.2e}")
    t_sdpa = do_bench(sdpa, warmup=25, rep=200, return_mode="median") / 1e3
    t_paged = do_bench(paged, warmup=25, rep=200, return_mode="median") / 1e3
    nbytes = 2 * k.numel() * k.element_size()
    # The same KV written into an fp8 pool token by token (write_kv_fp8 leaves k8/v8 holding the values as stored).
    record = 2 * bs * hkv * d + 2 * hkv * 4
    pool8 = torch.zeros(batch * nb, 1, record, dtype=torch.uint8, device=dev)
    k8, v8 = (x.permute(0, 2, 1, 3).reshape(batch * length, hkv, d).contiguous() for x in (k, v))
    pos = torch.arange(length, device=dev)
    flat = (slots[:, pos // bs] * bs + pos % bs).reshape(-1)
    caches = layer_caches(pool8, 0, bs, hkv, d)
    write_kv_fp8(k8, v8, *caches, flat)
    as_stored = [x.view(batch, length, hkv, d).transpose(1, 2) for x in (k8, v8)]
    want8 = F.scaled_dot_product_attention(q, *as_stored, scale=scale, enable_gqa=True)[:, :, 0].float()
    err8 = ((paged_attention_triton(qp, *caches, meta, scale).float() - want8).norm() / want8.norm()).item()
    if err8 > 1e-2:
        raise AssertionError(f"paged decode over the fp8 pool differs from SDPA over its KV: {err8:.2e}")
    t_fp8 = do_bench(lambda: paged_attention_triton(qp, *caches, meta, scale), warmup=25, rep=200, return_mode="median")
    t_fp8 /= 1e3
    sweep = []
    if args.sweep:
        for partition in (256, 512, 1024):
            for block_n in (32, 64, 128):
                for warps in (4, 8):
                    for stages in (1, 2, 3):
                        cfg = {"partition": partition, "block_n": block_n, "num_warps": warps, "num_stages": stages}
                        try:
                            t = do_bench(lambda: paged(cfg), warmup=5, rep=40, return_mode="median") / 1e3
                        except Exception as exc:  # a config that does not compile (resources) is skipped
                            print(f"  {cfg}: {type(exc).__name__}")
                            continue
                        sweep.append({**cfg, "ms": t * 1e3, "tbps": nbytes / t / 1e12})
        sweep.sort(key=lambda r: r["ms"])
        for r in sweep[:5]:
            print(f"  sweep B={batch} L={length}: {r}")
    return {
        "sweep": sweep,
        "batch": batch,
        "length": length,
        "kv_bytes": nbytes,
        "rel_error": err,
        "sdpa_ms": t_sdpa * 1e3,
        "paged_ms": t_paged * 1e3,
        "sdpa_tbps": nbytes / t_sdpa / 1e12,
        "paged_tbps": nbytes / t_paged / 1e12,
        "ratio": t_sdpa / t_paged,
        "fp8_ms": t_fp8 * 1e3,
        "fp8_tbps": batch * nb * record / t_fp8 / 1e12,
        "fp8_rel_error": err8,
        "fp8_speedup": t_paged / t_fp8,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=["32x8192", "1x131072", "8x32768"], help="BATCHxLENGTH")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--sweep", action="store_true", help="also time a grid of kernel configurations")
    ap.add_argument("--out")
    ap.add_argument("--record")
    args = ap.parse_args()
    if not require_cuda("attention_decode"):
        return 2
    rows = []
    for c in args.cases:
        b, length = (int(x) for x in c.split("x"))
        rows.append(case(b, length, args))
        r = rows[-1]
        print(
            f"B={b:>3} L={length:>7}: SDPA {r['sdpa_ms']:.3f} ms ({r['sdpa_tbps']:.2f} TB/s)  paged {r['paged_ms']:.3f} ms "
            f"({r['paged_tbps']:.2f} TB/s)  paged/SDPA bandwidth {r['ratio']:.0%}  rel.err {r['rel_error']:.1e}; fp8 pool "
            f"{r['fp8_ms']:.3f} ms ({r['fp8_tbps']:.2f} TB/s of its bytes, {r['fp8_speedup']:.2f}x bf16's paged)"
        )
    meta = run_meta()
    write_json(args.out, meta, rows=rows)
    append_rows(
        args.record,
        [
            f"| {meta['date']} | {meta['device']} | decode attention B={r['batch']} L={r['length']} (bf16, 32q/8kv, d=128, bs {args.block_size}) | "
            f"paged {r['paged_ms']:.3f} ms = {r['paged_tbps']:.2f} TB/s | SDPA contiguous {r['sdpa_ms']:.3f} ms = {r['sdpa_tbps']:.2f} TB/s | "
            f"{r['ratio']:.0%} | `{meta['command']}` |"
            for r in rows
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

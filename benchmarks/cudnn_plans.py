"""What a new prompt shape costs cuDNN's attention: the host time of SDPA's first call for each (prompts, length)
against its second, and varlen flash attention's (which builds no plan) on the same shape. Llama-3.1-8B's heads.

    python benchmarks/cudnn_plans.py
    python benchmarks/cudnn_plans.py --parts --plan-ahead 16384

--parts: cuDNN's GPU time (planned) against varlen flash's over a grid of (prompts, length), where the thresholds of
`kernels/prompt_shapes.py` (CUDNN_MIN_LENGTH, CUDNN_MIN_TOKENS) should sit. --plan-ahead BUDGET: the time
`prompt_attention.plan_ahead` takes to plan every shape a step of BUDGET tokens can make (the fused projection's
layout, as the engine's steps leave q, k and v).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from common import require_cuda

from tierkv.kernels import prompt_attention
from tierkv.kernels.prompt_attention import PromptRows, prompt_attention_flash

H, HKV, D = 32, 8, 128
SHAPES = [(16, 1024), (15, 1024), (14, 1024), (1, 1000), (1, 1001), (1, 1002), (2, 8192), (1, 8191)]


def timed(fn) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) * 1e3


def gpu_ms(fn, reps: int = 5) -> float:
    """Median GPU time of one call (CUDA events), after a first call."""
    fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def fused_rows(n: int):
    """q, k and v of n rows as the engine's fused projection leaves them (views of one buffer)."""
    qkv = torch.randn(n, (H + 2 * HKV) * D, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.split([H * D, HKV * D, HKV * D], dim=-1)
    return q.view(n, H, D), k.view(n, HKV, D), v.view(n, HKV, D)


def parts_grid() -> None:
    print("prompts x length: cuDNN (planned) ms, varlen flash ms, flash / cuDNN")
    for count in (1, 2, 4, 8, 16, 32):
        for length in (256, 512, 1024, 2048, 4096, 8192, 16384):
            if count * length > 32768:
                continue
            q, k, v = fused_rows(count * length)
            cu = [i * length for i in range(count + 1)]
            prompts = PromptRows(0, torch.tensor(cu, dtype=torch.int32, device="cuda"), cu, length)
            cudnn = gpu_ms(lambda: prompt_attention.batched_sdpa(q, k, v, count, length, D**-0.5))
            flash = gpu_ms(lambda: prompt_attention_flash(q, k, v, prompts, D**-0.5))
            print(f"{count:3d} x {length:5d}: {cudnn:7.3f} {flash:7.3f} {flash / cudnn:5.2f}x")


def plan_ahead_time(budget: int) -> None:
    q, k, v = fused_rows(1024)  # one short step meets the layout (flash; no part)
    cu = [0, 1024]
    prompt_attention.prompt_attention_sdpa(q, k, v, PromptRows(0, torch.tensor(cu, device="cuda").int(), cu, 1024), 0.1)
    with torch.inference_mode():
        planned, seconds = prompt_attention.plan_ahead(budget, budget)
    print(f"plan_ahead({budget}): {planned} shapes planned in {seconds:.2f} s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", action="store_true")
    ap.add_argument("--plan-ahead", type=int, metavar="BUDGET")
    args = ap.parse_args()
    if not require_cuda("cudnn_plans"):
        return 2
    torch.backends.cuda.enable_cudnn_sdp(True)
    if args.plan_ahead:
        plan_ahead_time(args.plan_ahead)  # first: no shape of the grid below planned yet
    if args.parts:
        parts_grid()
    if args.parts or args.plan_ahead:
        return 0
    for n, length in [(4, 256)] + SHAPES:  # the first shape warms up the library
        q = torch.randn(n, H, length, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(n, HKV, length, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)

        def sdpa():
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        rows = [x.transpose(1, 2).reshape(n * length, x.shape[1], D) for x in (q, k, v)]
        cu = [i * length for i in range(n + 1)]
        prompts = PromptRows(0, torch.tensor(cu, dtype=torch.int32, device="cuda"), cu, length)

        def flash():
            prompt_attention_flash(*rows, prompts, D**-0.5)

        first, second = timed(sdpa), timed(sdpa)
        flash_ms = min(timed(flash) for _ in range(3))
        print(
            f"{n:3d} x {length:5d}: cuDNN SDPA first call {first:7.2f} ms, second {second:6.2f} ms; varlen flash {flash_ms:6.2f} ms"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

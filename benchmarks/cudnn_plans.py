"""What a new prompt shape costs cuDNN's attention: the host time of SDPA's first call for each (prompts, length)
against its second, and varlen flash attention's (which builds no plan) on the same shape. Llama-3.1-8B's heads.

    python benchmarks/cudnn_plans.py
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F
from common import require_cuda

from tierkv.kernels.prompt_attention import PromptRows, prompt_attention_flash

H, HKV, D = 32, 8, 128
SHAPES = [(16, 1024), (15, 1024), (14, 1024), (1, 1000), (1, 1001), (1, 1002), (2, 8192), (1, 8191)]


def timed(fn) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) * 1e3


def main() -> int:
    if not require_cuda("cudnn_plans"):
        return 2
    torch.backends.cuda.enable_cudnn_sdp(True)
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

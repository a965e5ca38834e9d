"""Moving blocks between pools that store them differently: the GPU tier holds the KV as the model reads it, the
cold tiers may hold it compressed (`cold_kv_dtype="fp8"`: tierkv/kernels/kv_quant.py). Where both sides store alike
a move is a copy (always, under `kv_cache_dtype="fp8"`: every tier holds the same fp8 records); otherwise it is
quantized on the way down and dequantized on the way up, on the device that holds the KV, one batch at a time.
"""

from __future__ import annotations

import torch

from tierkv.kernels.block_copy import copy_blocks
from tierkv.kernels.kv_quant import dequantize_blocks, quantize_blocks
from tierkv.layout import KVLayout


def move_blocks(
    src: torch.Tensor,
    src_layout: KVLayout,
    src_idx: torch.Tensor,
    dst: torch.Tensor,
    dst_layout: KVLayout,
    dst_idx: torch.Tensor,
) -> None:
    """dst[dst_idx[i]] = src[src_idx[i]], converted between the two layouts' codecs. Indices are int64 tensors on
    the device that does the work: the CUDA device where either pool is on one (pinned host pools are read and
    written in place there), else the CPU."""
    if src_layout.codec == dst_layout.codec:
        copy_blocks(src, dst, src_idx, dst_idx)
        return
    n = len(src_idx)
    rows = torch.arange(n, dtype=torch.int64, device=src_idx.device)
    if src_layout.codec == "none":  # down: quantize where the KV is, then place the records
        copy_blocks(quantize_blocks(src, src_idx), dst, rows, dst_idx)
    else:  # up: gather the records next to the KV pool, then dequantize into it
        packed = torch.empty((n, *src_layout.block_shape), dtype=torch.uint8, device=dst.device)
        copy_blocks(src, packed, src_idx, rows)
        dequantize_blocks(packed, dst, dst_idx)

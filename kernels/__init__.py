"""Kernels of tierkv, each beside the plain PyTorch reference it must agree with.

On a machine without CUDA the reference is what runs; tests run the Triton kernels on tiny shapes under
TRITON_INTERPRET=1 against it.
"""

from tierkv.kernels.block_copy import copy_blocks, copy_blocks_reference, copy_blocks_triton
from tierkv.kernels.fused import (
    add_rms_norm,
    add_rms_norm_reference,
    add_rms_norm_triton,
    rms_norm,
    rms_norm_reference,
    rms_norm_triton,
    rotary_qk,
    rotary_qk_reference,
    rotary_qk_triton,
    rotary_reference,
    silu_mul,
    silu_mul_reference,
    silu_mul_triton,
)
from tierkv.kernels.gemv import gemv_reference, gemv_triton, linear
from tierkv.kernels.kv_write import write_kv, write_kv_reference, write_kv_triton
from tierkv.kernels.paged_attention import (
    PagedBatch,
    attention_reference,
    merge_partials,
    merge_partials_into,
    merge_partials_triton,
    paged_attention,
    paged_attention_reference,
    paged_attention_triton,
)

__all__ = [
    "add_rms_norm",
    "add_rms_norm_reference",
    "add_rms_norm_triton",
    "rms_norm",
    "rms_norm_reference",
    "rms_norm_triton",
    "rotary_qk",
    "rotary_qk_reference",
    "rotary_qk_triton",
    "rotary_reference",
    "silu_mul",
    "silu_mul_reference",
    "silu_mul_triton",
    "copy_blocks",
    "copy_blocks_reference",
    "copy_blocks_triton",
    "gemv_reference",
    "gemv_triton",
    "linear",
    "write_kv",
    "write_kv_reference",
    "write_kv_triton",
    "PagedBatch",
    "attention_reference",
    "merge_partials",
    "merge_partials_into",
    "merge_partials_triton",
    "paged_attention",
    "paged_attention_reference",
    "paged_attention_triton",
]

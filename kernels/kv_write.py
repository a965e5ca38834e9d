"""Write new keys and values into their cache slots (one layer): `cache[slot // block_size, slot % block_size] = kv`.

`slot_mapping[t]` is the flat slot (block slot * block_size + offset) of token t; the caches are one layer's
views of shape (num_slots, block_size, num_kv_heads, head_dim), or two `kv_fp8.Fp8Cache`s (an fp8 GPU tier: the
keys and values quantized into its blocks by `kv_fp8.write_kv_fp8`). Negative slots are skipped.
"""

from __future__ import annotations

import torch

from tierkv.kernels.kv_fp8 import Fp8Cache, write_kv_fp8

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


def write_kv_reference(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Plain PyTorch. k, v: (T, Hkv, D)."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    bs = k_cache.shape[1]
    k_cache[slots // bs, slots % bs] = k[keep].to(k_cache.dtype)
    v_cache[slots // bs, slots % bs] = v[keep].to(v_cache.dtype)


if triton is not None:

    @triton.jit
    def _write_kv_kernel(
        K,
        V,
        KC,
        VC,
        SLOTS,
        stride_kt,
        stride_vt,
        stride_ks,
        stride_kb,
        stride_vs,
        stride_vb,
        BS: tl.constexpr,
        NUMEL: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        t = tl.program_id(0)
        slot = tl.load(SLOTS + t).to(tl.int64)
        if slot >= 0:
            offs = tl.arange(0, BLOCK)
            mask = offs < NUMEL
            blk = slot // BS
            off = slot % BS
            k = tl.load(K + t * stride_kt + offs, mask=mask)
            v = tl.load(V + t * stride_vt + offs, mask=mask)
            tl.store(KC + blk * stride_ks + off * stride_kb + offs, k.to(KC.dtype.element_ty), mask=mask)
            tl.store(VC + blk * stride_vs + off * stride_vb + offs, v.to(VC.dtype.element_ty), mask=mask)


def write_kv_triton(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Triton: one program per token, copying its (Hkv, D) keys and values, which are contiguous in a block."""
    T = k.shape[0]
    if T == 0:
        return
    numel = k.shape[1] * k.shape[2]
    assert k.stride(1) == k.shape[2] and k.stride(2) == 1 and v.stride(1) == v.shape[2] and v.stride(2) == 1
    assert k_cache.stride(2) == k_cache.shape[3] and k_cache.stride(3) == 1
    block = max(16, 1 << (numel - 1).bit_length())
    _write_kv_kernel[(T,)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        k.stride(0),
        v.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        BS=k_cache.shape[1],
        NUMEL=numel,
        BLOCK=block,
    )


def write_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    """The Triton kernel on CUDA, the reference elsewhere. Into fp8 caches, k and v are overwritten with the
    values as stored (`kv_fp8.write_kv_fp8`)."""
    if isinstance(k_cache, Fp8Cache):
        write_kv_fp8(k, v, k_cache, v_cache, slot_mapping)
    elif k.is_cuda:
        write_kv_triton(k, v, k_cache, v_cache, slot_mapping)
    else:
        write_kv_reference(k, v, k_cache, v_cache, slot_mapping)

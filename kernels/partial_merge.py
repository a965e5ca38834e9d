"""Exact merging of two attention results over disjoint key sets, by their log-sum-exps: the PyTorch reference
(`merge_partials`), its Triton kernel (`merge_partials_triton`, in place) and the dispatch between them
(`merge_partials_into`, which the streaming path calls once per chunk and layer).
"""

from __future__ import annotations

import torch

from tierkv.kernels.paged_batch import _pow2

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


def merge_partials(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor):
    """Exact merge of two attention results over disjoint key sets: (out, lse). Rows with no keys have lse -inf."""
    m = torch.maximum(lse_a, lse_b)
    m_safe = torch.where(torch.isinf(m), 0.0, m)
    wa = torch.exp(lse_a - m_safe)
    wb = torch.exp(lse_b - m_safe)
    total = wa + wb
    denom = torch.where(total == 0, 1.0, total)
    out = (out_a.float() * (wa / denom)[..., None] + out_b.float() * (wb / denom)[..., None]).to(out_a.dtype)
    return out, torch.where(total == 0, float("-inf"), m_safe + torch.log(denom))


def merge_partials_into(out: torch.Tensor, lse: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> None:
    """`out, lse = merge_partials(out, lse, out_b, lse_b)` in place: one Triton launch on CUDA (the streaming path
    merges one chunk per layer this way), the reference elsewhere. out: (T, H, D), lse: (T, H) float32."""
    if out.is_cuda and triton is not None:
        merge_partials_triton(out, lse, out_b, lse_b)
        return
    merged, merged_lse = merge_partials(out, lse, out_b, lse_b)
    out.copy_(merged)
    lse.copy_(merged_lse)


# -- Triton -----------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _merge_kernel(
        out_ptr,
        lse_ptr,
        ob_ptr,
        lb_ptr,
        so_t,
        so_h,
        sl_t,
        sb_t,
        sb_h,
        slb_t,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        # One (row, head): the same arithmetic as merge_partials, in float32.
        t = tl.program_id(0)
        h = tl.program_id(1)
        la = tl.load(lse_ptr + t * sl_t + h)
        lb = tl.load(lb_ptr + t * slb_t + h)
        m = tl.maximum(la, lb)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        wa = tl.exp(la - m_safe)
        wb = tl.exp(lb - m_safe)
        total = wa + wb
        denom = tl.where(total == 0, 1.0, total)
        d = tl.arange(0, BLOCK_D)
        mask = d < HEAD_DIM
        a = tl.load(out_ptr + t * so_t + h * so_h + d, mask=mask).to(tl.float32)
        b = tl.load(ob_ptr + t * sb_t + h * sb_h + d, mask=mask).to(tl.float32)
        merged = a * (wa / denom) + b * (wb / denom)
        tl.store(out_ptr + t * so_t + h * so_h + d, merged.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(lse_ptr + t * sl_t + h, tl.where(total == 0, float("-inf"), m_safe + tl.log(denom)))


def merge_partials_triton(out: torch.Tensor, lse: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> None:
    """Triton implementation of `merge_partials_into` (in place on `out`, `lse`)."""
    T, H, D = out.shape
    if T == 0:
        return
    assert out.stride(2) == 1 and out_b.stride(2) == 1 and lse.stride(1) == 1 and lse_b.stride(1) == 1
    _merge_kernel[(T, H)](
        out,
        lse,
        out_b,
        lse_b,
        out.stride(0),
        out.stride(1),
        lse.stride(0),
        out_b.stride(0),
        out_b.stride(1),
        lse_b.stride(0),
        HEAD_DIM=D,
        BLOCK_D=_pow2(D),
    )

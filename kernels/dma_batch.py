"""Many copies on the copy engines from one host call: the CUDA driver's `cuMemcpyBatchAsync` (CUDA 12.8 and later).

Why: one `cudaMemcpy2DAsync` per run of blocks costs 4-7 us of host time (H200, 2026-12-04: 64 KiB pieces both ways
moved at 14% of the link, the rate at which one thread could queue them). A mover that queues one direction's
scattered blocks and then the other's therefore starts the second direction only when the first is nearly done,
and "both at once" becomes one after the other (57-62% of two contiguous copies at 2 MiB). One batch call queues
thousands of pieces in about the time of a few single copies, so both directions' DMAs run side by side.

The binding is ctypes over libcuda (no CUDA toolkit needed at install time). `available()` also runs a small copy
through it once and checks the bytes, so a driver that exports the symbol but misbehaves is never used. The
PyTorch reference is any per-piece `copy_` of the same bytes (tests/test_gpu.py compares the two).
"""

from __future__ import annotations

import ctypes

import numpy as np
import torch

_SRC_ORDER_STREAM = 1  # CU_MEMCPY_SRC_ACCESS_ORDER_STREAM: the source is read in stream order (it may change after)


class _Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _Attributes(ctypes.Structure):  # CUmemcpyAttributes (v1, CUDA 12.8); location hints (only for managed memory)
    # and flags (only for integrated GPUs) are left zero
    _fields_ = [
        ("src_access_order", ctypes.c_int),
        ("src_loc_hint", _Location),
        ("dst_loc_hint", _Location),
        ("flags", ctypes.c_uint),
    ]


_fn = None  # the driver's cuMemcpyBatchAsync, False once found missing or wrong


def _load():
    lib = ctypes.CDLL("libcuda.so.1")
    version = ctypes.c_int()
    if lib.cuDriverGetVersion(ctypes.byref(version)) != 0 or version.value < 12080:
        return None
    fn = lib.cuMemcpyBatchAsync  # the CUDA 12.8 ABI (with failIdx), still exported by later drivers under this name
    fn.restype = ctypes.c_int
    fn.argtypes = [
        ctypes.c_void_p,  # CUdeviceptr *dsts
        ctypes.c_void_p,  # CUdeviceptr *srcs
        ctypes.c_void_p,  # size_t *sizes
        ctypes.c_size_t,  # count
        ctypes.POINTER(_Attributes),  # attrs
        ctypes.c_void_p,  # size_t *attrsIdxs
        ctypes.c_size_t,  # numAttrs
        ctypes.POINTER(ctypes.c_size_t),  # failIdx
        ctypes.c_void_p,  # CUstream
    ]
    return fn


def available() -> bool:
    """True where batches of copies can be queued with one driver call (a CUDA driver of 12.8 or later that copies a
    test batch right)."""
    global _fn
    if _fn is None:
        _fn = False
        if torch.cuda.is_available():
            try:
                fn = _load()
                if fn is not None:
                    _fn = fn
                    if not _self_test():
                        _fn = False
            except Exception:  # noqa: BLE001 - no driver library, no symbol, a failing call: the fallback serves
                _fn = False
    return _fn is not False


def _self_test() -> bool:
    """Three scattered pieces up and back down through one batch each; the bytes must come back in place."""
    host = torch.arange(4096, dtype=torch.int32).pin_memory()
    dev = torch.zeros(4096, dtype=torch.int32, device="cuda")
    back = torch.zeros(4096, dtype=torch.int32).pin_memory()
    stream = torch.cuda.Stream()  # (not the legacy default stream: the batch call rejects it)
    stream.wait_stream(torch.cuda.current_stream())
    pieces = [(0, 1024, 256), (2048, 0, 512), (3000, 3500, 96)]  # (src word, dst word, words)
    up = [(dev.data_ptr() + 4 * d, host.data_ptr() + 4 * s, 4 * n) for s, d, n in pieces]
    down = [(back.data_ptr() + 4 * s, dev.data_ptr() + 4 * d, 4 * n) for s, d, n in pieces]
    copy_pieces(*map(np.array, zip(*up)), stream)
    copy_pieces(*map(np.array, zip(*down)), stream)
    stream.synchronize()
    want = torch.zeros_like(back)
    for s, _, n in pieces:
        want[s : s + n] = host[s : s + n]
    return torch.equal(back, want)


def copy_pieces(dsts: np.ndarray, srcs: np.ndarray, sizes: np.ndarray, stream: torch.cuda.Stream) -> None:
    """Queue `dsts[i] <- srcs[i]` (`sizes[i]` bytes, addresses as integers: device or pinned host memory) for every
    i on `stream` in one driver call, in stream order as a whole (pieces in any order among themselves, so they must
    not overlap). `stream` must not be the legacy default stream, which the driver rejects for batches."""
    if _fn is None or _fn is False:
        raise RuntimeError("dma_batch.copy_pieces: cuMemcpyBatchAsync is not available here; check available() first")
    if not stream.cuda_stream:
        raise ValueError(
            "dma_batch.copy_pieces: the driver rejects batches on the legacy default stream; queue them on a "
            "torch.cuda.Stream() of your own"
        )
    count = len(sizes)
    if count == 0:
        return
    dsts = np.ascontiguousarray(dsts, dtype=np.uint64)
    srcs = np.ascontiguousarray(srcs, dtype=np.uint64)
    sizes = np.ascontiguousarray(sizes, dtype=np.uint64)
    attrs = _Attributes(src_access_order=_SRC_ORDER_STREAM)
    first = np.zeros(1, dtype=np.uint64)
    fail = ctypes.c_size_t(0)
    err = _fn(
        dsts.ctypes.data,
        srcs.ctypes.data,
        sizes.ctypes.data,
        count,
        ctypes.byref(attrs),
        first.ctypes.data,
        1,
        ctypes.byref(fail),
        stream.cuda_stream,
    )
    if err != 0:
        raise RuntimeError(
            f"dma_batch.copy_pieces: cuMemcpyBatchAsync failed with CUresult {err} at piece {fail.value} of {count}"
        )

"""The decode-step GEMM kernel (gemv_triton) against torch.nn.functional.linear: in the Triton interpreter on CPU in
float32, and on the GPU in bf16 and fp16, with and without bias, over ragged shapes (K, N not multiples of the
tiles, rows from 1 to a tile of 64), replayed in a CUDA graph; and the dispatch `linear` that the model calls."""

import os

import pytest
import torch

from tierkv.kernels.gemv import gemv_reference, gemv_triton, linear

DEVICES = (["cpu"] if os.environ.get("TRITON_INTERPRET") == "1" else []) + (
    ["cuda"] if torch.cuda.is_available() else []
)


def data(m, n, k, bias, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(device, dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(device, dtype)
    b = torch.randn(n, generator=g).to(device, dtype) if bias else None
    return x, w, b


def close(got, want):
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:  # 16-bit outputs of float32 sums taken in another order: one rounding apart
        torch.testing.assert_close(got.float(), want.float(), rtol=1.6e-2, atol=1e-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "m, n, k, bias, block_n, block_k",
    [
        (1, 40, 64, False, 16, 32),
        (5, 70, 96, True, 16, 32),
        (16, 33, 130, True, 16, 32),
        (3, 64, 64, False, 32, 16),
        (40, 48, 80, True, 16, 32),
    ],  # 40 rows: a tile of 64
)
def test_gemv_matches_linear(device, m, n, k, bias, block_n, block_k):
    dtypes = [torch.float32] if device == "cpu" else [torch.bfloat16, torch.float16]
    for dtype in dtypes:
        x, w, b = data(m, n, k, bias, device, dtype)
        close(gemv_triton(x, w, b, block_n=block_n, block_k=block_k), gemv_reference(x, w, b))


@pytest.mark.parametrize("device", DEVICES)
def test_gemv_refuses_what_it_cannot_do(device):
    x, w, _ = data(65, 32, 32, False, device, torch.float32)
    with pytest.raises(ValueError, match="at most 64 rows"):
        gemv_triton(x, w)
    with pytest.raises(ValueError, match="contiguous along K"):
        gemv_triton(x[:4, ::2], w[:, ::2])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_linear_dispatch_and_graph_replay_on_the_gpu():
    # The model's shapes at a decode step (some scaled down), through the dispatch and the tiles it picks.
    for m, n, k in [
        (1, 6144, 512),
        (8, 4096, 4096),
        (16, 28672 // 4, 1024),
        (8, 512, 14336),
        (3, 70000, 256),
        (17, 256, 256),
    ]:
        x, w, b = data(m, n, k, m == 3, "cuda", torch.bfloat16)
        close(linear(x, w, b), gemv_reference(x, w, b))
    x32, w32, _ = data(8, 64, 64, False, "cuda", torch.float32)  # float32 stays with cuBLAS: exact to it
    assert torch.equal(linear(x32, w32), torch.nn.functional.linear(x32, w32))
    # Captured in a CUDA graph (as in the engine's decode graphs) and replayed on new inputs.
    x, w, b = data(8, 1000, 4096, True, "cuda", torch.bfloat16)
    linear(x, w, b)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = linear(x, w, b)
    for seed in range(3):
        x.copy_(data(8, 1000, 4096, False, "cuda", torch.bfloat16, seed=seed + 1)[0])
        graph.replay()
        close(y, gemv_reference(x, w, b))

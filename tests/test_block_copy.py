"""The batched block-copy kernel (Triton, in the interpreter on CPU) against its PyTorch reference."""

import pytest
import torch

from tierkv.kernels.block_copy import copy_blocks, copy_blocks_reference, copy_blocks_triton


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.uint8])
@pytest.mark.parametrize("block_shape", [(2, 2, 4, 1, 8), (1, 2, 1, 1, 3), (3, 2, 2, 2, 5)])
@pytest.mark.parametrize("max_programs", [1, 3, None])
def test_triton_copy_matches_reference(dtype, block_shape, max_programs):
    g = torch.Generator().manual_seed(hash((str(dtype), block_shape)) % 2**31)
    if dtype == torch.uint8:
        src = torch.randint(0, 256, (7, *block_shape), generator=g, dtype=torch.uint8)
        dst = torch.randint(0, 256, (6, *block_shape), generator=g, dtype=torch.uint8)
    else:
        src = torch.randn((7, *block_shape), generator=g).to(dtype)
        dst = torch.randn((6, *block_shape), generator=g).to(dtype)
    src_idx = torch.randperm(7, generator=g)[:4]
    dst_idx = torch.randperm(6, generator=g)[:4]
    want = dst.clone()
    copy_blocks_reference(src, want, src_idx, dst_idx)
    if torch.cuda.is_available():  # the compiled kernel, reading pinned host memory into device memory
        got = dst.cuda()
        copy_blocks_triton(src.pin_memory(), got, src_idx.cuda(), dst_idx.cuda(), max_programs=max_programs)
        got = got.cpu()
    else:  # TRITON_INTERPRET=1 (set by conftest)
        got = dst.clone()
        copy_blocks_triton(src, got, src_idx, dst_idx, max_programs=max_programs)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    untouched = [i for i in range(6) if i not in dst_idx.tolist()]
    assert torch.equal(got[untouched].view(torch.uint8), dst[untouched].view(torch.uint8))


def test_dispatch_uses_the_reference_off_cuda():
    src = torch.arange(24, dtype=torch.float32).view(4, 6)
    dst = torch.zeros(3, 6)
    copy_blocks(src, dst, torch.tensor([3, 0]), torch.tensor([0, 2]))
    assert torch.equal(dst[0], src[3]) and torch.equal(dst[2], src[0]) and not dst[1].any()


def test_mismatched_pools_are_refused():
    with pytest.raises(ValueError, match="pools differ"):
        copy_blocks_triton(torch.zeros(2, 4), torch.zeros(2, 5), torch.tensor([0]), torch.tensor([1]))


def test_strided_rows_copy_one_layer_of_each_block():
    """One layer's slice of scattered blocks (rows strided by a whole block) into a dense staging pool, and back."""
    g = torch.Generator().manual_seed(7)
    pool = torch.randn((6, 3, 2, 4, 2, 8), generator=g)  # (slots, layers, K/V, bs, Hkv, D)
    staging = torch.zeros((4, 2, 4, 2, 8))
    src_idx, dst_idx = torch.tensor([5, 1, 3]), torch.tensor([0, 1, 2])
    want = staging.clone()
    copy_blocks_reference(pool[:, 2], want, src_idx, dst_idx)
    assert torch.equal(want[1], pool[1, 2])
    back_want = pool.clone()
    copy_blocks_reference(want, back_want[:, 0], dst_idx, src_idx)
    if torch.cuda.is_available():  # pinned host pool -> device staging -> pinned host pool
        host = pool.pin_memory()
        got = staging.cuda()
        copy_blocks_triton(host[:, 2], got, src_idx.cuda(), dst_idx.cuda())
        copy_blocks_triton(got, host[:, 0], dst_idx.cuda(), src_idx.cuda())
        torch.cuda.synchronize()
        got, back = got.cpu(), host
    else:
        got, back = staging.clone(), pool.clone()
        copy_blocks_triton(pool[:, 2], got, src_idx, dst_idx, max_programs=2)
        copy_blocks_triton(got, back[:, 0], dst_idx, src_idx, max_programs=2)
    assert torch.equal(got, want)
    assert torch.equal(back, back_want)


def test_block_runs_split_where_either_side_stops_counting_up():
    from tierkv.kernels.block_copy import block_runs

    assert block_runs([], []).tolist() == []
    assert block_runs([4], [9]).tolist() == [[4, 9, 1]]
    assert block_runs([1, 2, 3, 7, 8, 2], [5, 6, 9, 10, 11, 0]).tolist() == [
        [1, 5, 2],
        [3, 9, 1],
        [7, 10, 2],
        [2, 0, 1],
    ]


def test_run_pieces_are_one_per_run_where_rows_are_contiguous_else_one_per_row():
    """The byte pieces a driver batch queues: a strided run becomes its rows, each at its own pitch on each side."""
    import numpy as np

    from tierkv.kernels.block_copy import run_pieces

    runs = np.array([(5, 0, 3), (1, 3, 1)])
    dst, src, sizes = run_pieces(runs, 10, 40, 10)  # rows of 10 bytes; source pitch 40, destination 10
    assert (dst.tolist(), src.tolist(), sizes.tolist()) == ([0, 10, 20, 30], [200, 240, 280, 40], [10] * 4)
    dst, src, sizes = run_pieces(runs, 10, 10, 10)  # contiguous both sides: one piece per run
    assert (dst.tolist(), src.tolist(), sizes.tolist()) == ([0, 30], [50, 10], [30, 10])

"""GPU-only checks (device machine): the UVA block-copy kernel, the mover's streams and events, races."""

import pytest
import torch
from kv_tools import read_tokens, write_tokens

from tierkv import KVLayout, PageManager, PageManagerConfig
from tierkv.kernels import dma_batch
from tierkv.kernels.block_copy import (
    block_runs,
    copy_2d_available,
    copy_block_runs,
    copy_blocks_reference,
    copy_blocks_triton,
    copy_engine_available,
)
from tierkv.kv.block import CPU, GPU
from tierkv.kv.mover import Mover
from tierkv.kv.tiers import MemoryTier, NvmeTier

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.uint8])
@pytest.mark.parametrize("shape", [(2, 2, 16, 8, 128), (3, 2, 4, 1, 7), (1, 2, 1, 1, 3)])
def test_uva_copy_kernel_both_directions(dtype, shape):
    torch.manual_seed(0)
    n_host, n_dev, batch = 9, 7, 5
    rand = (
        (lambda n: torch.randint(0, 255, (n, *shape), dtype=torch.uint8))
        if dtype == torch.uint8
        else (lambda n: torch.randn((n, *shape)).to(dtype))
    )
    host = rand(n_host).pin_memory()
    dev = rand(n_dev).cuda()
    src_idx = torch.randperm(n_host)[:batch]
    dst_idx = torch.randperm(n_dev)[:batch]
    # host -> device
    expect = dev.cpu()
    copy_blocks_reference(host, expect, src_idx, dst_idx)
    copy_blocks_triton(host, dev, src_idx.cuda(), dst_idx.cuda())
    torch.cuda.synchronize()
    assert torch.equal(dev.cpu(), expect)
    # device -> host
    expect = host.clone()
    copy_blocks_reference(dev.cpu(), expect, dst_idx, src_idx)
    copy_blocks_triton(dev, host, dst_idx.cuda(), src_idx.cuda())
    torch.cuda.synchronize()
    assert torch.equal(host, expect)


LAYOUT = KVLayout(num_layers=4, num_kv_heads=2, head_dim=64, dtype=torch.bfloat16, block_size=16)


def test_mover_all_links_with_staging_chunks(tmp_path):
    dev = torch.device("cuda")
    gpu = MemoryTier(GPU, LAYOUT, 8, 8, dev, pin=False)
    cpu = MemoryTier(CPU, LAYOUT, 8, 8, torch.device("cpu"), pin=True)
    nvme = NvmeTier(LAYOUT, 16, str(tmp_path / "nvme"))
    mover = Mover([gpu, cpu, nvme], dev, staging_blocks=3, debug_delays=True)
    try:
        data = torch.randn((6, *LAYOUT.block_shape)).to(LAYOUT.dtype)
        gpu.pool[:6] = data.cuda()
        h1 = mover.move(gpu, [0, 1, 2, 3, 4, 5], cpu, [7, 6, 5, 4, 3, 2], [mover.compute_marker()])
        h2 = mover.move(cpu, [7, 6, 5, 4, 3, 2], nvme, [10, 11, 12, 0, 1, 15], [h1])
        h3 = mover.move(nvme, [10, 11, 12, 0, 1, 15], gpu, [7, 6, 5, 4, 3, 2], [h2])  # 6 blocks, 3 per chunk
        h4 = mover.move(gpu, [7, 6, 5], nvme, [2, 3, 4], [h3])  # GPU -> NVMe through the staging buffer
        h4.wait()
        h3.wait_on(torch.cuda.current_stream())
        torch.cuda.synchronize()
        assert torch.equal(gpu.pool[[7, 6, 5, 4, 3, 2]].cpu(), data)
        out = torch.empty((3, *LAYOUT.block_shape), dtype=LAYOUT.dtype)
        nvme.store.read([2, 3, 4], out, [0, 1, 2])
        assert torch.equal(out, data[:3])
        assert nvme.store.backend_name.startswith("kvikio"), nvme.store.backend_reason
        mover.synchronize()
        assert mover.links[("gpu", "cpu")].seconds > 0
    finally:
        mover.close()
        for tier in (gpu, cpu, nvme):
            tier.close()


def test_eviction_waits_for_a_slow_compute_stream(tmp_path):
    """The d2h copy of an evicted block must not start before the compute stream has written it."""
    cfg = PageManagerConfig(
        LAYOUT, device="cuda", gpu_blocks=2, cpu_blocks=4, nvme_dir=str(tmp_path / "n"), nvme_blocks=4
    )
    with PageManager(cfg) as pm:
        for trial in range(5):
            seq = f"s{trial}"
            pm.add_sequence(seq)
            pm.append_tokens(seq, 32)
            table = pm.acquire([seq], writes={seq: (0, 32)})[0]
            value = torch.full((2, *LAYOUT.block_shape), float(trial + 1), dtype=LAYOUT.dtype, device="cuda")
            torch.cuda._sleep(50_000_000)  # ~30 ms of spinning on the compute stream before the write
            pm.tiers[GPU].pool[table] = value
            pm.release([seq])
            pm.evict([seq], to="cpu" if trial % 2 else "nvme")  # queued while the compute stream still spins
            got = read_tokens(pm, seq)
            assert torch.all(got == trial + 1), f"trial {trial}: eviction overtook the compute stream"
            pm.free(seq)


def test_identical_results_alone_and_in_a_crowd(tmp_path):
    """Many sequences through tiny tiers with delays injected: every byte still right (FAULTS.md)."""
    cfg = PageManagerConfig(
        LAYOUT,
        device="cuda",
        gpu_blocks=8,
        cpu_blocks=8,
        nvme_dir=str(tmp_path / "n"),
        nvme_blocks=256,
        staging_blocks=4,
        debug_delays=True,
    )
    g = torch.Generator().manual_seed(1)
    with PageManager(cfg) as pm:
        data = {}
        for i in range(60):
            n = int(torch.randint(1, 64, (1,), generator=g))
            kv = torch.randn((LAYOUT.num_layers, 2, n, LAYOUT.num_kv_heads, LAYOUT.head_dim), generator=g).to(
                LAYOUT.dtype
            )
            pm.add_sequence(i)
            pm.append_tokens(i, n)
            write_tokens(pm, i, 0, kv)
            data[i] = kv
            if i % 3 == 0:
                pm.prefetch([max(0, i - 7)])
        for _ in range(40):
            pm.begin_step()
            s = int(torch.randint(0, 60, (1,), generator=g))
            pm.acquire([s])
            pm.release([s])
        for i, kv in data.items():
            assert torch.equal(read_tokens(pm, i), kv), f"sequence {i}"


needs_copy_engine = pytest.mark.skipif(
    not copy_engine_available(), reason="needs a CUDA driver of 12.8 or later, or CuPy (the gpu extra)"
)
BATCH_MODES = [
    pytest.param(None, id="auto"),
    pytest.param(
        True,
        id="one-driver-call",
        marks=pytest.mark.skipif(not dma_batch.available(), reason="needs cuMemcpyBatchAsync (a 12.8+ driver)"),
    ),
    pytest.param(
        False, id="2d-per-run", marks=pytest.mark.skipif(not copy_2d_available(), reason="needs CuPy (the gpu extra)")
    ),
]


@needs_copy_engine
@pytest.mark.parametrize("batch", BATCH_MODES)
def test_copy_engine_runs_match_the_reference_both_directions(batch):
    """Runs of consecutive slots on the copy engines (one driver call for all, a 2D copy per run, or the mix),
    whole blocks and strided rows (one layer, a layer group)."""
    torch.manual_seed(0)
    shape = (4, 2, 8, 2, 32)
    src_slots, dst_slots = [3, 4, 5, 6, 10, 12, 13], [0, 1, 2, 3, 9, 14, 15]
    runs = block_runs(src_slots, dst_slots)
    assert runs.tolist() == [[3, 0, 4], [10, 9, 1], [12, 14, 2]]
    s_idx, d_idx = torch.tensor(src_slots), torch.tensor(dst_slots)
    stream = torch.cuda.Stream()
    for view in (lambda p: p, lambda p: p[:, 1], lambda p: p[:, 1:3]):
        host = torch.randn((20, *shape)).to(torch.bfloat16).pin_memory()
        dev = torch.randn((16, *shape)).to(torch.bfloat16).cuda()
        want = view(dev).cpu()
        copy_blocks_reference(view(host), want, s_idx, d_idx)
        copy_block_runs(view(host), view(dev), runs, stream, batch=batch)
        stream.synchronize()
        assert torch.equal(view(dev).cpu(), want)
        back = view(host).clone()
        # Queued behind a sleep and a fill on the copy stream: a copy that read its source when queued, not in
        # stream order, would carry the values from before the fill.
        with torch.cuda.stream(stream):
            torch.cuda._sleep(2_000_000)
            view(dev).fill_(7)
        copy_blocks_reference(torch.full_like(view(dev).cpu(), 7), back, d_idx, s_idx)
        copy_block_runs(view(dev), view(host), runs[:, [1, 0, 2]], stream, batch=batch)
        stream.synchronize()
        assert torch.equal(view(host), back)
    with pytest.raises(IndexError):
        copy_block_runs(host, dev, [(18, 15, 2)], stream, batch=batch)


@needs_copy_engine
@pytest.mark.parametrize("layered", [False, True])
def test_mover_sends_runs_of_consecutive_slots_to_the_copy_engines(layered, monkeypatch):
    monkeypatch.setattr(Mover, "layered_min_blocks", 4 if layered else 10**9)
    monkeypatch.setattr(Mover, "layer_group_bytes", 1)  # one layer per group
    dev = torch.device("cuda")
    gpu = MemoryTier(GPU, LAYOUT, 40, 40, dev, pin=False)
    cpu = MemoryTier(CPU, LAYOUT, 40, 40, torch.device("cpu"), pin=True)
    mover = Mover([gpu, cpu], dev, debug_delays=True)
    try:
        data = torch.randn((24, *LAYOUT.block_shape)).to(LAYOUT.dtype)
        cpu.pool[5:29] = data
        up = mover.move(cpu, list(range(5, 29)), gpu, list(range(10, 34)))  # one run: copy engines
        scattered = list(range(30, 40))
        down = mover.move(gpu, [10, 12, 14, 16, 18, 20, 22, 24, 26, 28], cpu, scattered, [up])  # scattered: the kernel
        down.wait()
        torch.cuda.synchronize()
        assert torch.equal(gpu.pool[10:34].cpu(), data)
        assert torch.equal(cpu.pool[30:40], data[0:20:2])
        mover.collect()  # folds in what the transfers reported
        links = mover.links
        assert links[("cpu", "gpu")].engine_batches == 1 and links[("gpu", "cpu")].engine_batches == 0
        assert len(getattr(up, "groups", [None])) == (LAYOUT.num_layers if layered else 1)
    finally:
        mover.close()
        gpu.close()
        cpu.close()

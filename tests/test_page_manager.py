"""The page manager on hand-made scenarios: placement, demotion, promotion, copy-on-write, errors, stats."""

import re

import pytest
import torch
from kv_tools import check_invariants, read_tokens, write_tokens

from tierkv import CapacityError, ConfigError, KVLayout, PageManager, PageManagerConfig
from tierkv.kv.placement import Placement

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=4, dtype=torch.float32, block_size=4)


def make(nvme_dir=None, gpu=2, cpu=2, nvme=0, **kw):
    return PageManager(
        PageManagerConfig(
            LAYOUT, gpu_blocks=gpu, cpu_blocks=cpu, nvme_dir=nvme_dir if nvme else None, nvme_blocks=nvme, **kw
        )
    )


def kv(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((LAYOUT.num_layers, 2, n, LAYOUT.num_kv_heads, LAYOUT.head_dim), generator=g)


def add(pm, seq, n, seed):
    data = kv(n, seed)
    pm.add_sequence(seq)
    pm.append_tokens(seq, n)
    write_tokens(pm, seq, 0, data)
    return data


def tiers_of(pm, seq):
    return [pm.residence(b)[0] for b in pm.block_table(seq)]


def test_blocks_demote_down_the_tiers_and_come_back_exact(nvme_dir):
    with make(nvme_dir, gpu=2, cpu=2, nvme=4) as pm:
        a = add(pm, "a", 8, 1)  # 2 blocks: fills the GPU
        b = add(pm, "b", 8, 2)  # pushes a to the CPU
        assert tiers_of(pm, "a") == ["cpu", "cpu"] and tiers_of(pm, "b") == ["gpu", "gpu"]
        c = add(pm, "c", 8, 3)  # pushes b to the CPU and a further down to NVMe
        assert tiers_of(pm, "a") == ["nvme", "nvme"] and tiers_of(pm, "b") == ["cpu", "cpu"]
        for seq, data in (("a", a), ("b", b), ("c", c)):
            assert torch.equal(read_tokens(pm, seq), data)
        before = pm.stats()["tiers"]
        table = pm.acquire(["a"])[0]  # promote a from NVMe straight to the GPU; c goes to the CPU, b to NVMe
        gpu_pool = pm.tiers[0].pool
        assert torch.equal(torch.cat([gpu_pool[s] for s in table], dim=2), a)
        pm.release(["a"])
        check_invariants(pm)
        assert tiers_of(pm, "b") == ["nvme", "nvme"] and tiers_of(pm, "c") == ["cpu", "cpu"]
        after = pm.stats()["tiers"]

        def delta(tier, key):
            return after[tier][key] - before[tier][key]

        assert (delta("gpu", "misses"), delta("cpu", "misses"), delta("nvme", "hits")) == (2, 2, 2)
        assert (delta("nvme", "blocks_out"), delta("nvme", "blocks_in"), delta("gpu", "blocks_in")) == (2, 2, 2)
        assert (delta("gpu", "evictions_out"), delta("cpu", "evictions_in"), delta("nvme", "evictions_in")) == (2, 2, 2)


def test_promotion_when_every_tier_is_full_uses_the_reserve(nvme_dir):
    with make(nvme_dir, gpu=2, cpu=2, nvme=2) as pm:
        data = {s: add(pm, s, 8, i) for i, s in enumerate("abc")}  # 6 blocks in 6 slots: nothing free
        assert pm.free_blocks() == 0
        for seq in "abcab":
            pm.acquire([seq])
            pm.release([seq])
            check_invariants(pm)
        for seq, d in data.items():
            assert torch.equal(read_tokens(pm, seq), d)
        assert tiers_of(pm, "b") == ["gpu", "gpu"]


def test_copy_on_write_shares_until_written():
    with make(gpu=4, cpu=4) as pm:
        a = add(pm, "a", 6, 1)  # one full block and a half-full one
        pm.fork("a", "b")
        assert [x.block_id for x in pm.block_table("a")] == [x.block_id for x in pm.block_table("b")]
        pm.append_tokens("b", 1)
        extra = kv(1, 9)
        write_tokens(pm, "b", 6, extra)
        ta, tb = pm.block_table("a"), pm.block_table("b")
        assert ta[0] is tb[0] and ta[0].ref_count == 2  # the full block stays shared
        assert ta[1] is not tb[1] and ta[1].ref_count == 1 and tb[1].ref_count == 1  # the written one was copied
        assert pm.placement.cow_copies == 1
        assert torch.equal(read_tokens(pm, "a"), a)
        assert torch.equal(read_tokens(pm, "b"), torch.cat([a, extra], dim=2))
        pm.free("a")
        assert tb[0].ref_count == 1
        check_invariants(pm)


def test_copy_on_write_of_a_block_living_on_nvme(nvme_dir):
    with make(nvme_dir, gpu=2, cpu=1, nvme=4) as pm:
        a = add(pm, "a", 4, 1)
        pm.fork("a", "b")
        pm.evict(["a"], to="nvme")
        assert tiers_of(pm, "a") == ["nvme"]
        new = kv(2, 5)
        write_tokens(pm, "b", 1, new)
        assert tiers_of(pm, "a") == ["nvme"] and tiers_of(pm, "b") == ["gpu"]
        assert torch.equal(read_tokens(pm, "a"), a)
        expect = a.clone()
        expect[:, :, 1:3] = new
        assert torch.equal(read_tokens(pm, "b"), expect)


def test_pinned_blocks_are_never_evicted():
    with make(gpu=2, cpu=4) as pm:
        add(pm, "a", 8, 1)
        pm.acquire(["a"])
        pm.add_sequence("b")
        pm.append_tokens("b", 4)  # no room on the GPU: created on the CPU, not by evicting a
        assert tiers_of(pm, "a") == ["gpu", "gpu"] and tiers_of(pm, "b") == ["cpu"]
        with pytest.raises(CapacityError, match="needs 3 KV blocks on the GPU at once"):
            pm.acquire(["b"])
        check_invariants(pm)
        pm.release(["a"])
        pm.acquire(["b"])
        assert tiers_of(pm, "b") == ["gpu"]
        pm.release(["b"])


def test_capacity_error_names_the_numbers_and_changes_nothing(nvme_dir):
    with make(nvme_dir, gpu=2, cpu=1, nvme=2) as pm:
        a = add(pm, "a", 12, 1)
        before = pm.stats()["tiers"]
        with pytest.raises(CapacityError, match=r"needs 3 new KV blocks \(4 tokens each\) but only 2 are free") as err:
            pm.append_tokens("a", 9)
        assert re.search(r"free: gpu \d of 2, cpu \d of 1, nvme \d of 2\)", str(err.value))
        assert pm.num_tokens("a") == 12 and pm.stats()["tiers"] == before
        assert torch.equal(read_tokens(pm, "a"), a)
        check_invariants(pm)


def test_prefetch_brings_the_next_sequence_up_without_touching_pinned_ones(nvme_dir):
    with make(nvme_dir, gpu=4, cpu=2, nvme=4) as pm:
        a = add(pm, "a", 8, 1)
        b = add(pm, "b", 8, 2)
        c = add(pm, "c", 8, 3)  # a is now below the GPU
        assert "gpu" not in tiers_of(pm, "a")
        pm.acquire(["c"])
        started = pm.prefetch(["a"])
        assert started == 2
        assert tiers_of(pm, "a") == ["gpu", "gpu"] and tiers_of(pm, "c") == ["gpu", "gpu"]
        pm.release(["c"])
        pm.begin_step()
        pm.acquire(["a"])
        assert pm.stats()["tiers"]["gpu"]["prefetched"] == 2
        pm.release(["a"])
        for seq, d in (("a", a), ("b", b), ("c", c)):
            assert torch.equal(read_tokens(pm, seq), d)


def test_prefetch_is_best_effort_when_the_gpu_is_pinned_full():
    with make(gpu=2, cpu=4) as pm:
        add(pm, "a", 8, 1)
        add(pm, "b", 8, 2)
        pm.acquire(["b"])
        assert pm.prefetch(["a"]) == 0
        assert tiers_of(pm, "a") == ["cpu", "cpu"]
        pm.release(["b"])


def test_evict_swaps_a_sequence_down_and_acquire_brings_it_back(nvme_dir):
    with make(nvme_dir, gpu=4, cpu=1, nvme=4) as pm:
        a = add(pm, "a", 12, 1)
        assert pm.evict(["a"], to="cpu") == 3  # one fits in the CPU tier, the rest go on to NVMe
        assert sorted(tiers_of(pm, "a")) == ["cpu", "nvme", "nvme"]
        assert pm.evict(["a"], to="nvme") == 1
        assert tiers_of(pm, "a") == ["nvme"] * 3
        pm.acquire(["a"])
        assert tiers_of(pm, "a") == ["gpu"] * 3
        pm.release(["a"])
        assert torch.equal(read_tokens(pm, "a"), a)
        with pytest.raises(ValueError, match="not a lower tier"):
            pm.evict(["a"], to="gpu")


def test_a_swap_into_a_full_gpu_goes_in_chunks_that_each_wait_only_for_their_own_victims(monkeypatch):
    """Swapping 64 blocks into a GPU tier full of another sequence's: four chunks of 16 (each chunk's victims out,
    then its blocks in, into the slots they left), not one batch out and one in, and every byte exact."""
    monkeypatch.setattr(Placement, "swap_chunk_blocks", 8)
    monkeypatch.setattr(Placement, "swap_chunks", 4)  # (one by default)
    with make(gpu=64, cpu=128) as pm:
        a = add(pm, "a", 256, 1)  # 64 blocks: fills the GPU
        b = add(pm, "b", 256, 2)  # pushes a down
        assert set(tiers_of(pm, "a")) == {"cpu"} and set(tiers_of(pm, "b")) == {"gpu"}
        before = {k: v["batches"] for k, v in pm.stats()["links"].items()}
        table = pm.acquire(["a"])[0]
        after = pm.stats()["links"]
        assert (
            after["gpu->cpu"]["batches"] - before.get("gpu->cpu", 0) == 4
            and after["cpu->gpu"]["batches"] - before.get("cpu->gpu", 0) == 4
        )
        assert torch.equal(torch.cat([pm.tiers[0].pool[s] for s in table], dim=2), a)
        pm.release(["a"])
        check_invariants(pm)
        assert torch.equal(read_tokens(pm, "b"), b) and torch.equal(read_tokens(pm, "a"), a)


def test_a_block_swapped_in_and_out_unwritten_moves_no_bytes_out():
    """A block promoted from the CPU tier keeps its CPU slot as a copy: demoted again unwritten, it moves no byte
    down (a swapped-in sequence's full blocks); a block written in between is copied down, its stale copy dropped."""
    with make(gpu=4, cpu=8) as pm:
        a = add(pm, "a", 16, 1)  # 4 blocks: fills the GPU
        b = add(pm, "b", 16, 2)  # pushes a to the CPU
        assert set(tiers_of(pm, "a")) == {"cpu"}
        pm.acquire(["a"])  # a comes back; b goes down (copied: it never had a copy)
        pm.release(["a"])
        assert pm.stats()["tiers"]["cpu"]["host_copies"] == 4
        out0 = pm.stats()["links"]["gpu->cpu"]["blocks"]
        new = kv(2, 3)
        write_tokens(pm, "a", 14, new)  # rewrites a's last block on the GPU: its copy is stale and goes
        a[:, :, 14:16] = new
        assert pm.stats()["tiers"]["cpu"]["host_copies"] == 3
        pm.acquire(["b"])  # a goes down: three blocks onto their copies, one copied
        pm.release(["b"])
        stats = pm.stats()
        assert stats["links"]["gpu->cpu"]["blocks"] - out0 == 1
        assert stats["tiers"]["cpu"]["onto_copies"] == 3 and stats["tiers"]["cpu"]["host_copies"] == 4  # b's, now
        check_invariants(pm)
        assert torch.equal(read_tokens(pm, "a"), a) and torch.equal(read_tokens(pm, "b"), b)


def test_host_copies_give_way_when_the_cpu_tier_needs_room():
    """Copies are spares: they count as free room, and new blocks take their slots (the copies dropped)."""
    with make(gpu=4, cpu=8) as pm:
        a = add(pm, "a", 16, 1)
        add(pm, "b", 16, 2)  # a on the CPU
        pm.acquire(["a"])  # a up, its 4 copies kept; b down: the CPU holds b and a's copies
        pm.release(["a"])
        pm.free("b")
        assert pm.stats()["tiers"]["cpu"]["host_copies"] == 4 and pm.free_blocks() == 8
        pm.add_sequence("c")
        pm.append_tokens("c", 24)  # 6 blocks: 4 in the open CPU slots, 2 in the slots of dropped copies
        assert pm.stats()["tiers"]["cpu"]["host_copies"] == 2
        check_invariants(pm)
        c = kv(24, 3)
        write_tokens(pm, "c", 0, c)
        check_invariants(pm)
        assert torch.equal(read_tokens(pm, "c"), c) and torch.equal(read_tokens(pm, "a"), a)


def test_a_sequence_demoted_tail_first_lands_in_consecutive_slots_in_its_own_order():
    """The GPU evicts a sequence's last block first (acquire touches it first, so that a cached prefix keeps its
    head); its blocks must still land below in ascending slots in logical order, the runs that a streamed decode
    moves up on the copy engines in one piece each (in descending slots, every block was a run of its own)."""
    with make(gpu=8, cpu=16) as pm:
        a = add(pm, "a", 32, 1)  # 8 blocks: fills the GPU
        pm.acquire(["a"])
        pm.release(["a"])
        add(pm, "b", 32, 2)  # pushes all of a down, tail first
        assert tiers_of(pm, "a") == ["cpu"] * 8
        slots = [b.slot for b in pm.block_table("a")]
        assert slots == list(range(slots[0], slots[0] + 8))
        assert torch.equal(read_tokens(pm, "a"), a)
        check_invariants(pm)


def test_long_write_goes_through_a_gpu_smaller_than_the_sequence(nvme_dir):
    with make(nvme_dir, gpu=2, cpu=2, nvme=8) as pm:
        a = add(pm, "a", 40, 1)  # 10 blocks through a 2-block GPU tier
        assert torch.equal(read_tokens(pm, "a"), a)
        assert torch.equal(read_tokens(pm, "a", 13, 31), a[:, :, 13:31])


def test_free_returns_every_slot(nvme_dir):
    with make(nvme_dir, gpu=2, cpu=2, nvme=4) as pm:
        for i, s in enumerate("abc"):
            add(pm, s, 7, i)
        pm.fork("a", "d")
        for s in "abcd":
            pm.free(s)
        check_invariants(pm)
        assert pm.free_blocks() == 8 and not pm.blocks


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(gpu_blocks=0), "GPU tier needs at least 1 block"),
        (dict(gpu_memory="100B"), "GPU tier needs at least 1 block"),
        (dict(gpu_blocks=2, gpu_memory="1GiB"), "give gpu_blocks or gpu_memory, not both"),
        (dict(gpu_blocks=2, cpu_blocks=-1), "cpu_blocks must be a non-negative integer"),
        (dict(gpu_blocks=2, cpu_memory="lots"), "cannot read 'lots' as a byte size"),
        (dict(gpu_blocks=2, nvme_blocks=4), "needs nvme_dir"),
        (dict(gpu_blocks=2, eviction="fifo"), "eviction 'fifo' is not one of lru, clock"),
        (dict(gpu_blocks=2, device="tpu"), "is not a device name|is not supported"),
    ],
)
def test_bad_configuration_is_refused_before_allocation(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        PageManagerConfig(LAYOUT, **kwargs)


def test_bad_layout_is_refused():
    with pytest.raises(ConfigError, match="block_size must be a positive integer"):
        KVLayout(2, 2, 4, torch.float32, block_size=0)
    with pytest.raises(ConfigError, match="dtype 'int8' is not supported"):
        KVLayout(2, 2, 4, "int8")


def test_cuda_refused_where_absent():
    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    with pytest.raises(ConfigError, match="CUDA is not available here"):
        PageManagerConfig(LAYOUT, gpu_blocks=2, device="cuda")


def test_nvme_dir_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "f"
    f.write_text("")
    with pytest.raises(ConfigError, match="is not a directory"):
        PageManagerConfig(LAYOUT, gpu_blocks=2, nvme_dir=str(f), nvme_blocks=2)


def test_byte_capacities_turn_into_blocks(nvme_dir):
    nbytes = LAYOUT.block_nbytes
    cfg = PageManagerConfig(
        LAYOUT,
        gpu_memory=3 * nbytes + 5,
        cpu_memory=f"{2 * nbytes}B",
        nvme_dir=nvme_dir,
        nvme_memory=f"{4 * nbytes / 1024}KiB",
    )
    assert (cfg.gpu_blocks, cfg.cpu_blocks, cfg.nvme_blocks) == (3, 2, 4)


def test_stats_table_and_dict(nvme_dir):
    with make(nvme_dir, gpu=2, cpu=2, nvme=4) as pm:
        add(pm, "a", 8, 1)
        add(pm, "b", 8, 2)
        add(pm, "c", 8, 3)
        s = pm.stats()
        assert set(s["tiers"]) == {"gpu", "cpu", "nvme"}
        assert s["tiers"]["nvme"]["backend"].startswith("kvikio" if torch.cuda.is_available() else "posix")
        assert s["links"]["gpu->cpu"]["bytes"] == s["links"]["gpu->cpu"]["blocks"] * LAYOUT.block_nbytes
        assert s["tiers"]["cpu"]["bytes_in"] == s["links"]["gpu->cpu"]["bytes"]
        table = pm.format_stats()
        assert "nvme" in table and "link gpu->cpu" in table and "evict out" in table

"""Placement on its own, with no tensors and no mover: the transfers it decides, as data."""

from types import SimpleNamespace

import pytest

from tierkv.handles import DONE
from tierkv.kv.block import CPU, GPU, NVME, SequenceTable
from tierkv.kv.ledger import BlockLedger
from tierkv.kv.placement import Placement
from tierkv.kv.prefix_index import PrefixIndex
from tierkv.kv.slots import SlotAllocator
from tierkv.kv.spares import SpareCopies
from tierkv.kv.stats import TierCounters


def make(gpu=4, cpu=8, nvme=16, reserve=1):
    sizes = {GPU: (gpu, gpu + reserve), CPU: (cpu, cpu), NVME: (nvme, nvme)}
    tiers = {k: SimpleNamespace(num_blocks=n, num_slots=s, slots=SlotAllocator(s)) for k, (n, s) in sizes.items()}
    ledger = BlockLedger(sorted(tiers), "lru")
    spares = SpareCopies({k: t.slots for k, t in tiers.items()})
    transfers = []

    def run(t):
        transfers.append(t)
        return DONE

    counters = {k: TierCounters() for k in tiers}
    placement = Placement(ledger, PrefixIndex(), spares, tiers, run, lambda: DONE, counters, 16, False)
    return placement, ledger, transfers


def written_sequence(placement, ledger, n):
    seq = SequenceTable()
    ledger.add_sequence("s", seq)
    for _ in range(n):
        placement.new_block(seq).has_data = True
    return seq


def test_new_blocks_fill_the_fastest_tier_first_and_move_no_bytes():
    placement, ledger, transfers = make()
    seq = written_sequence(placement, ledger, 6)
    assert [b.tier for b in seq.blocks] == [GPU] * 4 + [CPU] * 2
    assert transfers == []  # creating blocks copies nothing


def test_a_promotion_into_a_full_gpu_is_one_batch_each_way():
    placement, ledger, transfers = make()
    seq = written_sequence(placement, ledger, 8)  # 4 on the GPU, 4 on the CPU
    lower = [b for b in seq.blocks if b.tier != GPU]
    placement.promote(lower, protect={b.block_id for b in lower}, allow_reserved=True)
    directions = [(t.src, t.dst) for t in transfers]
    assert directions == [(GPU, CPU), (CPU, GPU)]  # victims out in one batch, then the blocks in, in one batch
    out, into = transfers
    assert len(out.src_slots) == len(into.src_slots) == 4
    assert sorted(b.slot for b in lower) == sorted(into.dst_slots) and all(b.tier == GPU for b in lower)
    assert ledger.resident(GPU) == 4 and ledger.resident(CPU) == 4
    # The blocks that went down are the least recently used: the first four, in their order.
    assert [b.tier for b in seq.blocks[:4]] == [CPU] * 4


def test_empty_blocks_move_without_a_transfer():
    placement, ledger, transfers = make()
    seq = SequenceTable()
    ledger.add_sequence("s", seq)
    for _ in range(6):
        placement.new_block(seq)  # never written
    lower = [b for b in seq.blocks if b.tier != GPU]
    placement.promote(lower, protect={b.block_id for b in lower}, allow_reserved=True)
    assert all(not t.src_slots for t in transfers)  # the batches carry no slot: nothing to copy
    assert all(b.tier == GPU for b in lower)


def test_make_room_cascades_down_the_tiers():
    placement, ledger, transfers = make(gpu=2, cpu=2, nvme=8)
    seq = written_sequence(placement, ledger, 4)  # GPU and CPU full
    assert placement.make_room(GPU, 2, protect=set(), allow_reserved=True) == 2
    assert [(t.src, t.dst, len(t.src_slots)) for t in transfers] == [(CPU, NVME, 2), (GPU, CPU, 2)]
    assert [b.tier for b in seq.blocks] == [CPU, CPU, NVME, NVME]


def test_room_is_checked_before_anything_changes():
    placement, ledger, _ = make(gpu=2, cpu=2, nvme=2)
    written_sequence(placement, ledger, 5)
    with pytest.raises(Exception, match="needs 2 new KV blocks .* only 1 are free"):
        placement.check_room(2, "appending")

"""The NVMe reader of streamed steps (tierkv/disk_stream.py): reads started ahead of the attention, queued behind
each other on the backend's threads, checked in order on another thread; here with random delays in every read, so
that reads overlap and finish out of order."""

import random
import threading
import time

import pytest
import torch

from tierkv import CorruptBlockError, KVLayout
from tierkv.disk_stream import DiskStream
from tierkv.kv.nvme_io import PosixBackend
from tierkv.kv.tiers import NvmeTier

LAYOUT = KVLayout(num_layers=4, num_kv_heads=2, head_dim=8, dtype=torch.float16, block_size=4)
SLOTS = 24


@pytest.fixture
def tier(nvme_dir, monkeypatch):
    real = PosixBackend._read_runs
    rng = random.Random(7)

    lock = threading.Lock()

    def delayed(self, runs):
        with lock:
            IN_FLIGHT[0] += 1
            IN_FLIGHT[1] = max(IN_FLIGHT)
        time.sleep(rng.random() * 0.004)  # shares of one read and of the reads queued behind it finish out of order
        real(self, runs)
        with lock:
            IN_FLIGHT[0] -= 1

    IN_FLIGHT[:] = [0, 0]
    monkeypatch.setattr(PosixBackend, "_read_runs", delayed)
    t = NvmeTier(LAYOUT, SLOTS, nvme_dir, backend="posix")
    yield t
    t.close()


IN_FLIGHT = [0, 0]  # shares being read now, the most at once


def written(tier):
    """Every slot written with its own block (a content key and tokens, so that checksums cover them too)."""
    g = torch.Generator().manual_seed(3)
    blocks = torch.randn((SLOTS, *LAYOUT.block_shape), generator=g).to(LAYOUT.dtype)
    keys = [bytes([s + 1]) * 16 for s in range(SLOTS)]  # (an all-zero key means "no key")
    tier.store.write(
        list(range(SLOTS)), blocks, list(range(SLOTS)), keys, [[s, s + 1, s + 2, s + 3] for s in range(SLOTS)]
    )
    return blocks


def step_reads(tier, chunks):
    return [(tier, chunk, layer) for layer in range(LAYOUT.num_layers) for chunk in chunks]


def test_every_read_arrives_whole_and_in_order_with_overlapping_delayed_reads(tier):
    blocks = written(tier)
    chunks = [[17, 3, 9, 22, 0], [5, 6, 7], [23, 1, 12, 11, 4]]
    stream = DiskStream(5, LAYOUT.block_shape[1:], LAYOUT.dtype, pin=False, ring=3)
    try:
        for _ in range(3):  # steps after steps reuse the ring
            reads = step_reads(tier, chunks)
            t0 = time.perf_counter()
            stream.start(reads)
            disk_seconds = 0.0
            for want in reads:
                read, host, seconds = stream.take()
                assert read == want
                _, slots, layer = read
                assert torch.equal(host, blocks[slots, layer])
                host.fill_(float("nan"))  # what the next read into this buffer must overwrite entirely
                stream.taken(None)
                disk_seconds += seconds
            # The reads' seconds are the disk's busy time: overlapping reads are not counted twice.
            assert 0 < disk_seconds <= time.perf_counter() - t0
    finally:
        stream.close()
    # Shares of several reads were in flight together (one read has at most 5 shares here, one per block): the
    # disk does not wait for a read to end before the next begins.
    assert IN_FLIGHT[1] > 5


def test_a_damaged_block_fails_the_take_of_its_last_layer_and_the_stream_goes_on(tier):
    blocks = written(tier)
    with open(tier.store.data_path, "r+b") as f:
        f.seek(tier.store._offset(9) + LAYOUT.block_nbytes - 10)  # in slot 9's last layer
        f.write(b"\xff" * 4)
    chunks = [[17, 3, 9], [5, 6]]
    reads = step_reads(tier, chunks)
    stream = DiskStream(3, LAYOUT.block_shape[1:], LAYOUT.dtype, pin=False, ring=3)
    try:
        stream.start(reads)
        last_chunk_with_9 = len(reads) - len(chunks)
        for _ in range(last_chunk_with_9):
            stream.take()
            stream.taken(None)
        with pytest.raises(CorruptBlockError, match=r"slots \[9\]"):
            stream.take()
        # The next step starts after the reads left in flight: the undamaged blocks read as written.
        stream.start(step_reads(tier, [[5, 6]]))
        for layer in range(LAYOUT.num_layers):
            _, host, _ = stream.take()
            assert torch.equal(host, blocks[[5, 6], layer])
            stream.taken(None)
    finally:
        stream.close()

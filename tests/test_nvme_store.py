"""The NVMe tier's files: round trips, reopening, checksums, the lock, layout changes, a disk too small."""

import os
import subprocess
import sys

import pytest
import torch

from tierkv import ConfigError, CorruptBlockError, KVLayout, StoreError
from tierkv.kv.nvme_store import HEADER_NBYTES, NvmeStore

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.float16, block_size=4)


def pool(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *LAYOUT.block_shape), generator=g).to(LAYOUT.dtype)


def test_round_trip_scattered_slots(nvme_dir):
    src = pool(6)
    with NvmeStore(nvme_dir, LAYOUT, 10, backend="posix") as store:
        store.write([7, 2, 3, 9, 0, 4], src, [0, 1, 2, 3, 4, 5])
        out = torch.zeros_like(src)
        store.read([3, 9, 7], out, [5, 0, 2])
    assert torch.equal(out[5], src[2]) and torch.equal(out[0], src[3]) and torch.equal(out[2], src[0])


def test_round_trip_after_reopening(nvme_dir):
    src = pool(4, seed=1)
    with NvmeStore(nvme_dir, LAYOUT, 8, backend="posix") as store:
        store.write([1, 2, 3, 6], src, [0, 1, 2, 3])
        checksum = store.record(2).checksum
    with NvmeStore(nvme_dir, LAYOUT, 8, backend="posix") as store:
        assert store.record(2).checksum == checksum
        assert store.record(0) is None
        out = torch.zeros_like(src)
        store.read([1, 2, 3, 6], out, [0, 1, 2, 3])
    assert torch.equal(out, src)


def test_reopening_with_more_slots_keeps_blocks(nvme_dir):
    src = pool(2, seed=2)
    with NvmeStore(nvme_dir, LAYOUT, 4, backend="posix") as store:
        store.write([0, 3], src, [0, 1])
    with NvmeStore(nvme_dir, LAYOUT, 16, backend="posix") as store:
        out = torch.zeros_like(src)
        store.read([0, 3], out, [0, 1])
        store.write([15], src, [0])
    assert torch.equal(out, src)


def test_block_altered_on_disk_is_detected(nvme_dir):
    src = pool(3, seed=3)
    with NvmeStore(nvme_dir, LAYOUT, 4, backend="posix") as store:
        store.write([0, 1, 2], src, [0, 1, 2])
        stride = store.slot_stride
    with open(os.path.join(nvme_dir, "blocks.bin"), "r+b") as f:
        f.seek(HEADER_NBYTES + stride + 17)
        byte = f.read(1)
        f.seek(HEADER_NBYTES + stride + 17)
        f.write(bytes([byte[0] ^ 0xFF]))
    with NvmeStore(nvme_dir, LAYOUT, 4, backend="posix") as store:
        out = torch.zeros_like(src)
        store.read([0, 2], out, [0, 2])  # untouched blocks still read fine
        with pytest.raises(CorruptBlockError, match=r"slots \[1\]"):
            store.read([1], out, [1])


def test_layout_change_drops_the_old_blocks_with_a_warning(nvme_dir):
    with NvmeStore(nvme_dir, LAYOUT, 4, backend="posix") as store:
        store.write([0], pool(1), [0])
    other = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.float32, block_size=4)
    with pytest.warns(RuntimeWarning, match="another model, layout or format"):
        store = NvmeStore(nvme_dir, other, 4, backend="posix")
    with store:
        assert store.record(0) is None


def test_second_process_gets_a_clear_lock_error(nvme_dir):
    with NvmeStore(nvme_dir, LAYOUT, 2, backend="posix"):
        code = (
            "import torch; from tierkv import KVLayout; from tierkv.kv.nvme_store import NvmeStore\n"
            f"NvmeStore({nvme_dir!r}, KVLayout(2, 2, 8, torch.float16, 4), 2, backend='posix')"
        )
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "is in use by another tierkv process" in proc.stderr and f"pid {os.getpid()}" in proc.stderr
    # Released on close: the same directory opens again.
    NvmeStore(nvme_dir, LAYOUT, 2, backend="posix").close()


def test_disk_too_small_is_refused_before_writing(nvme_dir):
    free = os.statvfs(os.path.dirname(nvme_dir) or ".").f_bavail * os.statvfs(os.path.dirname(nvme_dir) or ".").f_frsize
    too_many = free // LAYOUT.block_nbytes * 4 + 1000  # slots are padded to 4 KiB: 4x is comfortably over
    with pytest.raises(StoreError, match="the disk has only"):
        NvmeStore(nvme_dir, LAYOUT, too_many, backend="posix")
    assert not os.path.exists(os.path.join(nvme_dir, "blocks.bin"))


def test_bad_directory_and_backend_are_refused(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match="is not a directory"):
        NvmeStore(str(a_file), LAYOUT, 2)
    with pytest.raises(ConfigError, match="nvme_backend 'gds'"):
        NvmeStore(str(tmp_path / "d"), LAYOUT, 2, backend="gds")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="kvikio' cannot be used: no CUDA device"):
            NvmeStore(str(tmp_path / "d2"), LAYOUT, 2, backend="kvikio")


def test_auto_backend_reports_its_choice(nvme_dir):
    with NvmeStore(nvme_dir, LAYOUT, 2) as store:
        if torch.cuda.is_available():
            assert store.backend_name.startswith("kvikio"), store.backend_reason
        else:
            assert store.backend_name.startswith("posix")
            assert "no CUDA device" in store.backend_reason


@pytest.mark.parametrize("threads", [1, 3])
def test_posix_backend_spreads_runs_over_threads_and_reports_a_short_read(tmp_path, threads):
    """Runs read and written on several threads land where each asks; a run past
    the end of the file raises StoreError, once every other run has ended."""
    import numpy as np

    from tierkv.kv.nvme_io import ALIGN, PosixBackend

    path = tmp_path / "blocks"
    data = np.random.default_rng(0).integers(0, 255, 16 * ALIGN, dtype=np.uint8)
    path.write_bytes(data.tobytes())
    backend = PosixBackend(str(path), threads=threads)
    try:
        offsets = [5 * ALIGN, 0, 9 * ALIGN, 2 * ALIGN, 100, 7 * ALIGN + 3]
        bufs = [np.empty(ALIGN, np.uint8) for _ in offsets]
        backend.read([(o, b) for o, b in zip(offsets, bufs)])
        for o, b in zip(offsets, bufs):
            assert np.array_equal(b, data[o : o + ALIGN])
        with pytest.raises(StoreError, match="short read"):
            backend.read([(o, np.empty(ALIGN, np.uint8)) for o in (0, ALIGN, 16 * ALIGN, 3 * ALIGN)])
        writes = [(o, np.full(ALIGN, i, np.uint8)) for i, o in enumerate((ALIGN, 4 * ALIGN, 11 * ALIGN))]
        backend.write(writes)
        back = np.frombuffer(path.read_bytes(), np.uint8)
        for o, b in writes:
            assert np.array_equal(back[o : o + ALIGN], b)
    finally:
        backend.close()

"""The NVMe tier's files: preallocated block slots, a checksummed slot index, a lock, two I/O backends.

Files in `nvme_dir`:
- `blocks.bin`: a 4 KiB header (JSON: format version, KV layout, slot count, slot stride) then the slots,
  each `slot_stride` bytes (the block size rounded up to 4 KiB so every slot is O_DIRECT-aligned).
- `slots.idx`: one 64-byte record per slot (magic, checksum, tokens, content key). The checksum covers the
  block's content key, its token ids and its bytes together, so a record, a token entry and a block that do not
  belong together fail it (a key moved to another slot's bytes, tokens swapped between slots). Before a
  slot is rewritten its record is cleared; the new record is written only after the block's bytes (and, for
  blocks with a content key, after an fdatasync), so a record never vouches for bytes that are not there, even
  across a kill -9.
- `slots.tok`: the token ids of each slot's block (block_size int32 each), for content-keyed blocks: a hit on a
  key is only used if the stored tokens match too.
- `LOCK`: held with flock while a process uses the directory; a second process gets a clear error.

Backends (tierkv.kv.nvme_io): kvikio (CuFile pread/pwrite through its thread pool) where CUDA and kvikio work, else plain
positional file I/O with O_DIRECT where buffers and offsets allow. The choice is made at open and reported.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import struct
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import xxhash

from tierkv.errors import ConfigError, CorruptBlockError, StoreError
from tierkv.kv.nvme_io import ALIGN, KvikioBackend, PosixBackend, kvikio_unusable_reason
from tierkv.layout import KVLayout
from tierkv.sizes import format_nbytes

FORMAT_VERSION = 2  # 2: checksums cover key and tokens too
HEADER_NBYTES = 4096
RECORD = struct.Struct("<4sHHQQII32s")  # magic, version, flags, checksum, generation, num_tokens, reserved, key
RECORD_NBYTES = 64
MAGIC = b"TKVS"
assert RECORD.size == RECORD_NBYTES


def _round_up(n: int, align: int) -> int:
    return -(-n // align) * align


def block_checksum(data, key: bytes = b"", tokens: bytes = b"") -> int:
    """64-bit checksum (xxh3) of a block's content key, its token ids (int32 bytes) and its bytes; `data` is a
    buffer or a contiguous CPU tensor. Unkeyed blocks (swap) have neither key nor tokens."""
    h = _checksum_start(key, tokens)
    h.update(host_bytes(data) if isinstance(data, torch.Tensor) else data)
    return h.intdigest()


def _checksum_start(key: bytes, tokens: bytes):
    """The checksum's state before the block's bytes: fed the bytes in order (whole, or layer by layer), its
    digest is block_checksum's."""
    h = xxhash.xxh3_64()
    h.update(struct.pack("<II", len(key), len(tokens)))
    h.update(key)
    h.update(tokens)
    return h


@dataclass(frozen=True)
class SlotRecord:
    checksum: int
    generation: int
    num_tokens: int
    key: bytes


def _key_field(key: bytes) -> bytes:
    """A content key as its record holds it: 32 bytes."""
    return key.ljust(32, b"\0")[:32]


def _token_bytes(token_ids) -> bytes:
    return np.asarray(list(token_ids), dtype=np.int32).tobytes()


def host_bytes(t: torch.Tensor):
    """A writable numpy uint8 view of a contiguous CPU tensor (shares memory)."""
    return t.reshape(-1).view(torch.uint8).numpy()


class NvmeStore:
    """Fixed-size block slots in files under `directory`, with a checksum per slot verified on every read."""

    def __init__(self, directory: str, layout: KVLayout, num_slots: int, backend: str = "auto", tag: str = "") -> None:
        if backend not in ("auto", "kvikio", "posix"):
            raise ConfigError(f"nvme_backend {backend!r} is not one of 'auto', 'kvikio', 'posix'")
        if num_slots < 1:
            raise ConfigError(f"NVMe tier: needs at least 1 block slot, got {num_slots}")
        self.directory = os.path.abspath(directory)
        self.layout = layout
        self.num_slots = num_slots
        self.slot_stride = _round_up(layout.block_nbytes, ALIGN)
        self.tag = tag  # what else must match for stored blocks to be valid here (e.g. the model's fingerprint)
        self._lock_fd = -1
        self._tok_fd = -1
        self._sync_fd = -1
        self._backend = None
        self._idx_fd = -1
        self._generation = 0
        self.warnings: list[str] = []
        self._prepare_directory()
        try:
            self._lock()
            self._open_files()
            self._backend, self.backend_reason = self._choose_backend(backend)
        except BaseException:
            self.close()
            raise

    # -- opening -----------------------------------------------------------------------------------------
    def _prepare_directory(self) -> None:
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise ConfigError(f"nvme_dir {self.directory!r} exists and is not a directory; give a directory path")
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"nvme_dir {self.directory!r} cannot be created ({exc.strerror}); give a writable directory"
            ) from None
        if not os.access(self.directory, os.W_OK | os.X_OK):
            raise ConfigError(f"nvme_dir {self.directory!r} is not writable; give a writable directory")
        for name in ("LOCK", "blocks.bin", "slots.idx", "slots.tok"):
            path = os.path.join(self.directory, name)
            if os.path.lexists(path) and not os.path.isfile(path):
                raise StoreError(
                    f"NVMe tier: {path} is not a regular file; nvme_dir must hold only tierkv's own files: remove what is in "
                    "the way, or choose another nvme_dir"
                )

    def _lock(self) -> None:
        path = os.path.join(self.directory, "LOCK")
        self._lock_fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._lock_fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(self._lock_fd)
            self._lock_fd = -1
            raise StoreError(
                f"nvme_dir {self.directory!r} is in use by another tierkv process (pid {holder}); "
                "give each process its own nvme_dir, or stop the other process first"
            ) from None
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, f"{os.getpid()}\n".encode(), 0)

    def _header(self) -> dict:
        return {
            "format": "tierkv-nvme",
            "version": FORMAT_VERSION,
            "layout": self.layout.describe(),
            "slot_stride": self.slot_stride,
            "tag": self.tag,
        }

    def _open_files(self) -> None:
        data_path = os.path.join(self.directory, "blocks.bin")
        idx_path = os.path.join(self.directory, "slots.idx")
        want = self._header()
        reuse = False
        if os.path.exists(data_path) and os.path.exists(idx_path):
            with open(data_path, "rb") as f:
                raw = f.read(HEADER_NBYTES).rstrip(b"\0")
            try:
                found = json.loads(raw.decode())
                found.pop("num_slots", None)  # a different slot count is fine: the files are resized
            except (ValueError, UnicodeDecodeError, AttributeError):
                found = None
            if found == want:
                reuse = True
            else:
                self._warn(
                    f"NVMe store in {self.directory} was written by another model, layout or format "
                    f"({found!r}); its blocks are dropped and the store is reinitialised"
                )
        need = HEADER_NBYTES + self.num_slots * self.slot_stride
        have = os.path.getsize(data_path) if reuse else 0
        free = shutil.disk_usage(self.directory).free
        if need - have > free:
            raise StoreError(
                f"NVMe tier needs {format_nbytes(need)} in {self.directory} but the disk has only "
                f"{format_nbytes(free + have)} for it; lower nvme_blocks/nvme_memory or choose another nvme_dir"
            )
        mode = os.O_RDWR | os.O_CREAT | (0 if reuse else os.O_TRUNC)
        fd = self._open(data_path, mode)
        try:
            self._reserve(fd, data_path, need, have)
            header = json.dumps({**want, "num_slots": self.num_slots}).encode()
            os.pwrite(fd, header.ljust(HEADER_NBYTES, b"\0"), 0)
        finally:
            os.close(fd)
        self._data_path = data_path
        # The index and the token file are reserved whole too: a write that fills the disk can only happen here.
        self._idx_fd = self._open(idx_path, mode)
        self._reserve(self._idx_fd, idx_path, self.num_slots * RECORD_NBYTES, os.fstat(self._idx_fd).st_size)
        self._tok_path = os.path.join(self.directory, "slots.tok")
        self._tok_fd = self._open(self._tok_path, mode)
        self._reserve(self._tok_fd, self._tok_path, self.num_slots * self._tok_nbytes, os.fstat(self._tok_fd).st_size)
        self._sync_fd = self._open(data_path, os.O_RDONLY)
        self._records: list[SlotRecord | None] = self._load_records()
        self._generation = max((r.generation for r in self._records if r), default=0)

    def _open(self, path: str, flags: int) -> int:
        try:
            return os.open(path, flags, 0o644)
        except OSError as exc:
            raise StoreError(
                f"NVMe tier: cannot open {path} ({exc.strerror}); nvme_dir must hold only tierkv's own files, writable by "
                "this user: remove what is in the way, or choose another nvme_dir"
            ) from None

    def _reserve(self, fd: int, path: str, need: int, have: int) -> None:
        """Give the file `need` bytes of disk now (so that no later write can find the disk full), or say why not."""
        try:
            os.posix_fallocate(fd, 0, need)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise StoreError(
                    f"NVMe tier: the disk is full: reserving {format_nbytes(need)} for {path} failed; "
                    "lower nvme_blocks/nvme_memory, free space, or choose another nvme_dir"
                ) from None
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise StoreError(
                    f"NVMe tier: cannot reserve {format_nbytes(need)} for {path}: {exc.strerror}"
                ) from None
            os.ftruncate(fd, max(need, have))  # a file system without fallocate: sparse, as good as it gets
        if have > need:
            os.ftruncate(fd, need)

    def _load_records(self) -> list[SlotRecord | None]:
        raw = os.pread(self._idx_fd, self.num_slots * RECORD_NBYTES, 0)
        records: list[SlotRecord | None] = []
        for slot in range(self.num_slots):
            magic, version, _flags, checksum, gen, ntok, _res, key = RECORD.unpack_from(raw, slot * RECORD_NBYTES)
            ok = magic == MAGIC and version == FORMAT_VERSION
            records.append(SlotRecord(checksum, gen, ntok, key) if ok else None)
        return records

    def _choose_backend(self, backend: str):
        reason = kvikio_unusable_reason() if backend in ("auto", "kvikio") else "posix asked for"
        if backend == "kvikio" and reason is not None:
            raise ConfigError(f"nvme_backend 'kvikio' cannot be used: {reason}; use nvme_backend='auto' or 'posix'")
        if reason is None:
            try:
                return KvikioBackend(self._data_path), "kvikio usable"
            except Exception as exc:
                if backend == "kvikio":
                    raise ConfigError(f"nvme_backend 'kvikio' failed to open {self._data_path}: {exc}") from None
                reason = f"kvikio failed to open the block file ({exc})"
        return PosixBackend(self._data_path), reason

    def _warn(self, message: str) -> None:
        self.warnings.append(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)

    # -- I/O -----------------------------------------------------------------------------------------------
    @property
    def backend_name(self) -> str:
        return self._backend.name if self._backend else "closed"

    @property
    def _tok_nbytes(self) -> int:
        return 4 * self.layout.block_size

    def _offset(self, slot: int) -> int:
        return HEADER_NBYTES + slot * self.slot_stride

    def _runs(self, slots: Sequence[int], pool: torch.Tensor, rows: Sequence[int]) -> list[tuple[int, object]]:
        """(file offset, host buffer) runs, merging slots adjacent both in the file and in the pool."""
        contiguous_file = self.slot_stride == self.layout.block_nbytes
        pairs = sorted(zip(slots, rows))
        runs: list[tuple[int, object]] = []
        i = 0
        while i < len(pairs):
            j = i + 1
            if contiguous_file:
                while j < len(pairs) and pairs[j][0] == pairs[j - 1][0] + 1 and pairs[j][1] == pairs[j - 1][1] + 1:
                    j += 1
            slot0, row0 = pairs[i]
            runs.append((self._offset(slot0), host_bytes(pool[row0 : row0 + (j - i)])))
            i = j
        return runs

    def _check_slots(self, slots: Sequence[int]) -> None:
        for s in slots:
            if not 0 <= s < self.num_slots:
                raise IndexError(f"NVMe slot {s} out of range 0..{self.num_slots - 1}")

    def write(
        self,
        slots: Sequence[int],
        pool: torch.Tensor,
        rows: Sequence[int],
        keys: Sequence[bytes | None] | None = None,
        token_ids: Sequence[Sequence[int] | None] | None = None,
    ) -> None:
        """Write `pool[rows[i]]` (a contiguous CPU block pool) to `slots[i]`, then record their checksums.

        `keys[i]`/`token_ids[i]`: the block's content key and tokens, for blocks that a later process may reuse;
        their bytes are synced to disk before their records say they are there."""
        self._check_slots(slots)
        if len(set(slots)) != len(slots):
            raise ValueError("NVMe write: a slot appears twice in one batch")
        keyed = [i for i in range(len(slots)) if keys and keys[i]]
        toks = {i: _token_bytes(token_ids[i]) for i in keyed}
        checksums = [
            block_checksum(host_bytes(pool[r]), _key_field(keys[i]) if i in toks else b"", toks.get(i, b""))
            for i, r in enumerate(rows)
        ]
        blank = bytes(RECORD_NBYTES)
        with self._failing(self.directory + "/slots.idx"):
            for slot in slots:  # first: no record may vouch for a slot whose bytes are about to change
                if self._records[slot] is not None:
                    os.pwrite(self._idx_fd, blank, slot * RECORD_NBYTES)
                    self._records[slot] = None
        with self._failing(self._data_path):
            self._backend.write(self._runs(slots, pool, rows))
            if keyed:
                os.fdatasync(self._sync_fd)
        with self._failing(self._tok_path):
            for i in keyed:
                os.pwrite(self._tok_fd, toks[i].ljust(self._tok_nbytes, b"\0"), slots[i] * self._tok_nbytes)
        with self._failing(self.directory + "/slots.idx"):
            self._write_records(slots, checksums, keys, token_ids)

    @contextlib.contextmanager
    def _failing(self, path: str):
        """I/O errors on one of the store's files as a StoreError naming that file and what to do."""
        try:
            yield
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                hint = "the disk is full; free space on it, or lower nvme_blocks/nvme_memory"
            else:
                hint = f"{exc.strerror or exc}; check the disk and the file"
            raise StoreError(f"NVMe tier: write to {path} failed: {hint}") from None

    def _write_records(self, slots, checksums, keys, token_ids) -> None:
        for i, slot in enumerate(slots):
            self._generation += 1
            key = _key_field(keys[i] if keys and keys[i] else b"")
            ntok = len(token_ids[i]) if token_ids and token_ids[i] is not None else self.layout.block_size
            rec = SlotRecord(checksums[i], self._generation, ntok, key)
            raw = RECORD.pack(MAGIC, FORMAT_VERSION, 0, rec.checksum, rec.generation, rec.num_tokens, 0, rec.key)
            os.pwrite(self._idx_fd, raw, slot * RECORD_NBYTES)
            self._records[slot] = rec

    def keyed_entries(self) -> list[tuple[int, bytes, tuple[int, ...]]]:
        """(slot, content key, token ids) of every slot holding a content-keyed block, newest first per key."""
        best: dict[bytes, tuple[int, int]] = {}
        for slot, rec in enumerate(self._records):
            if rec is None or not any(rec.key):
                continue
            if rec.key not in best or rec.generation > best[rec.key][0]:
                best[rec.key] = (rec.generation, slot)
        out = []
        for key, (_, slot) in best.items():
            raw = os.pread(self._tok_fd, self._tok_nbytes, slot * self._tok_nbytes)
            ntok = self._records[slot].num_tokens
            toks = tuple(int(t) for t in torch.frombuffer(bytearray(raw), dtype=torch.int32)[:ntok].tolist())
            out.append((slot, key, toks))
        return out

    def drop_page_cache(self) -> None:
        """Ask the kernel to forget its cached pages of the block file, so the next reads come from the disk
        (a bandwidth measured through the page cache would be the RAM's, not the disk's)."""
        if hasattr(os, "posix_fadvise"):
            os.fdatasync(self._sync_fd)
            os.posix_fadvise(self._sync_fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def forget_keys(self) -> None:
        """Clear every record (the bytes stay but nothing vouches for them): used to reset the prefix cache."""
        os.pwrite(self._idx_fd, bytes(self.num_slots * RECORD_NBYTES), 0)
        self._records = [None] * self.num_slots

    def read(self, slots: Sequence[int], pool: torch.Tensor, rows: Sequence[int]) -> None:
        """Read `slots[i]` into `pool[rows[i]]`; raise CorruptBlockError if a block fails its checksum."""
        self._check_slots(slots)
        missing = [s for s in slots if self._records[s] is None]
        if missing:
            raise StoreError(f"NVMe tier: slots {missing[:8]} hold no block (never written); this is a tierkv bug")
        try:
            self._backend.read(self._runs(slots, pool, rows))
        except OSError as exc:
            raise self._read_error(exc) from None
        bad = [s for s, r in zip(slots, rows) if self._checksum_of(s, pool[r]) != self._records[s].checksum]
        if bad:
            raise CorruptBlockError(
                f"NVMe tier: {len(bad)} block(s) in {self._data_path} (slots {bad[:8]}) do not match their "
                "checksums: the file was changed or damaged on disk",
                slots=bad,
            )

    def _checksum_of(self, slot: int, block: torch.Tensor) -> int:
        """The checksum of `block` (just read from `slot`) with the key and tokens the store holds for that slot."""
        h = self.checksum_state(slot)
        h.update(host_bytes(block))
        return h.intdigest()

    @property
    def data_path(self) -> str:
        return self._data_path

    def checksum_state(self, slot: int):
        """The checksum's state of the block in `slot` before its bytes (its key and tokens fed in)."""
        rec = self._records[slot]
        if not any(rec.key):
            return _checksum_start(b"", b"")
        tokens = os.pread(self._tok_fd, self._tok_nbytes, slot * self._tok_nbytes)[: 4 * rec.num_tokens]
        return _checksum_start(rec.key, tokens)

    def start_layer_read(self, slots: Sequence[int], layer: int, out: torch.Tensor) -> Callable[[], None]:
        """Start reading layer `layer` of the blocks in `slots` into out[i] (a contiguous host tensor (len(slots),
        *one layer of a block as stored)): what attention over blocks left on disk reads, one layer at a time.
        Returns the wait for the reads, which raises StoreError if one failed; reads started one after another
        queue behind each other, so that the disk never waits between them. The caller checks the checksums
        (`checksum_state`: fed every layer in order, a block's digest must equal its record's)."""
        self._check_slots(slots)
        nbytes = self.layout.block_nbytes // self.layout.num_layers
        runs = [(self._offset(s) + layer * nbytes, host_bytes(out[i])) for i, s in enumerate(slots)]
        try:
            wait = self._backend.start_read(runs)
        except OSError as exc:
            raise self._read_error(exc) from None

        def wait_checked() -> None:
            try:
                wait()
            except OSError as exc:
                raise self._read_error(exc) from None

        return wait_checked

    def _read_error(self, exc: OSError) -> StoreError:
        return StoreError(f"NVMe tier: read from {self._data_path} failed: {exc.strerror or exc}; check the disk")

    def record(self, slot: int) -> SlotRecord | None:
        """What the index says slot `slot` holds (None: nothing written since the store was created)."""
        return self._records[slot]

    def __enter__(self) -> NvmeStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the files and release the directory lock. Safe to call twice."""
        if self._backend is not None:
            self._backend.close()
            self._backend = None
        for name in ("_idx_fd", "_tok_fd", "_sync_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)
        if self._lock_fd >= 0:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = -1

"""Attention for one engine step over the tiered paged KV cache.

Every entry of the step has its newest blocks (a window that holds the tokens written this step) acquired on the
GPU tier. Its older blocks, if any, stay where they are (GPU or pinned CPU tier) and are streamed, one layer at a
time, through a bounded staging area on the compute device in chunks of `staging_blocks` blocks; the partial
results over the window and over each chunk are merged exactly with their log-sum-exp. The smallest GPU tier
is therefore the window of one step, however long the sequence.

On CUDA the staging area has two buffers, each filled on its own copy stream (so that two copy engines share
the link): while the compute stream attends over one chunk, the next one is already crossing the link (copy engines for runs of consecutive slots,
else the block-copy kernel with a small grid), and the copies of layer i+1 start while layer i still computes.
Events order each buffer's copy before its attention and that attention before the buffer's next copy.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from tierkv.disk_stream import DiskStream
from tierkv.kernels.block_copy import copy_block_runs, copy_blocks, copy_blocks_triton, copy_engine_runs
from tierkv.kernels.kv_fp8 import layer_caches
from tierkv.kernels.kv_write import write_kv
from tierkv.kernels.paged_attention import paged_attention
from tierkv.kernels.paged_batch import PagedBatch
from tierkv.kernels.partial_merge import merge_partials_into
from tierkv.kernels.prompt_attention import PromptRows, prompt_attention
from tierkv.kv.tiers import MemoryTier, NvmeTier
from tierkv.layout import KVLayout


def padded_tables(tables: list[list[int]], width: int) -> np.ndarray:
    """Block tables as one (len(tables), width) int32 array, rows padded with 0 (a third of the time of building
    it from padded Python lists, at 256 sequences x 72 blocks)."""
    lens = np.fromiter(map(len, tables), dtype=np.int64, count=len(tables))
    flat = np.fromiter(itertools.chain.from_iterable(tables), dtype=np.int32, count=int(lens.sum()))
    out = np.zeros((len(tables), width), dtype=np.int32)
    out[np.arange(width)[None, :] < lens[:, None]] = flat
    return out


def host_to_device(parts: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """Small host arrays of one dtype, as 1-D tensors on `device`: on CUDA through one pinned buffer and one
    non-blocking copy. A plain `torch.tensor(..., device=cuda)` makes the host wait for everything queued on the
    stream, which would stall a step planned while the previous one still runs on the GPU."""
    # Every part starts on a 64-byte boundary of the buffer: Triton specialises kernels on 16-byte alignment of
    # their pointers, so views at arbitrary offsets would compile new variants (seconds each) as step sizes change.
    starts, at = [], 0
    for p in parts:
        starts.append(at)
        at += -(-len(p) // 16) * 16
    flat = np.zeros(at, dtype=parts[0].dtype)
    for p, a in zip(parts, starts):
        flat[a : a + len(p)] = p
    buf = torch.from_numpy(flat)
    if device.type == "cuda":
        buf = buf.pin_memory().to(device, non_blocking=True)
    return [buf[a : a + len(p)] for p, a in zip(parts, starts)]


def staging_views(buf: torch.Tensor, layout: KVLayout) -> tuple:
    """The (keys, values) the attention reads from a staging buffer (blocks, *one layer of a block as `layout`
    stores it): two views of the KV, or two Fp8Caches over fp8 records (decoded as the kernels read them)."""
    if layout.codec == "none":
        return buf[:, 0], buf[:, 1]
    return layer_caches(buf.unsqueeze(1), 0, layout.block_size, layout.num_kv_heads, layout.head_dim)


@dataclass
class StreamedEntry:
    """Blocks [0, len(slots)) of one entry that are not in its GPU window, grouped by the tier that holds them."""

    entry: int
    rows: tuple[int, int]  # its query rows in the step
    q_pos0: int
    tiers: list[MemoryTier | NvmeTier]  # per logical block
    slots: list[int]  # per logical block


class StepAttention:
    """The attention callable the model calls once per layer during a step."""

    def __init__(
        self,
        gpu: MemoryTier,
        batch: PagedBatch,
        slot_mapping: torch.Tensor,
        streamed: list[StreamedEntry],
        staging: torch.Tensor | None,
        scale: float,
        sliding_windows: tuple[int, ...],
        copy_streams: list[torch.cuda.Stream] | None = None,
        delay=None,
        prompts: PromptRows | None = None,
        disk: tuple[DiskStream, object] | None = None,
        staging_layout: KVLayout | None = None,
    ) -> None:
        self.gpu = gpu
        self.batch = batch  # the entries of rows [0, prompts.row0), or of every row when `prompts` is None
        self.prompts = prompts  # the step's last entries, whole prompts: attended over their own new keys
        self.slot_mapping = slot_mapping
        self.streamed = streamed
        # (buffers, staging_blocks, *a layer of a block as the lower tiers store it) on the compute device
        self.staging = staging
        self.staging_layout = staging_layout if staging_layout is not None else gpu.layout
        self.scale = scale
        self.windows = sliding_windows
        self.copy_streams = copy_streams if streamed and copy_streams else None
        self._delay = delay  # debug hook: holds the copy stream a random while before each copy (race tests)
        self._disk = disk  # (the runner's NVMe reader, the NVMe -> GPU link's stats record) where there is NVMe
        self._stream_index = [self._plan(s) for s in streamed]
        if disk is not None:
            # Every layer's slice of the blocks left on NVMe, in the order attend() takes them: read ahead.
            layers = gpu.pool.shape[1]
            nvme = [
                (t, idx[0])
                for plan in self._stream_index
                for moves, _ in plan
                for t, _, idx in moves
                if isinstance(t, NvmeTier)  # (a host tier's move may have no index: copy-engine runs instead)
            ]
            disk[0].start([(t, slots, i) for i in range(layers) for t, slots in nvme])
        self.layer_waits: list = []  # LayeredHandles of blocks still arriving: wait per layer, before writing or reading it
        self.gates: list | None = (
            None  # a decode graph's per-layer external events (graphs.LayerGates), waited on likewise
        )
        self._chunks = 0  # chunks streamed so far this step (buffer = count % buffers)
        if self.copy_streams is not None:
            buffers = staging.shape[0]
            self._filled = [torch.cuda.Event() for _ in range(buffers)]  # copy into buffer b done
            self._drained = [torch.cuda.Event() for _ in range(buffers)]  # attention over buffer b done
            # Everything the compute stream was ordered after (blocks arriving, the last step's reads of the
            # staging buffers) comes before the first copy of this step.
            start = torch.cuda.Event()
            start.record(torch.cuda.current_stream(staging.device))
            for stream in self.copy_streams:
                stream.wait_event(start)

    def _plan(self, s: StreamedEntry):
        """Per chunk: its copies (source tier, source slots, staging rows) and its attention metadata, prebuilt."""
        device = self.gpu.pool.device
        chunk = self.staging.shape[1]
        bs = self.gpu.layout.block_size
        rows = s.rows[1] - s.rows[0]
        firsts = range(0, len(s.slots), chunk)
        # The chunks' attention metadata is the same for every layer: built once per step, in one host-to-device copy.
        # Rows of 8 (3 unused): every chunk's views sit at the same offsets mod 16 bytes, so one kernel variant serves all.
        meta = host_to_device(
            [
                np.array(
                    [[0, rows, s.q_pos0, min(len(s.slots), f + chunk) * bs, f, 0, 0, 0] for f in firsts], dtype=np.int32
                ).ravel()
            ],
            device,
        )[0].view(-1, 8)
        table = torch.arange(min(chunk, len(s.slots)), dtype=torch.int32, device=device)[None]
        plan = []
        for i, first in enumerate(firsts):
            n = min(chunk, len(s.slots) - first)
            tiers = s.tiers[first : first + n]
            groups: dict[int, tuple[MemoryTier, list[int], list[int]]] = {}
            if tiers.count(tiers[0]) == n:  # the usual case: the whole chunk in one tier
                groups[0] = (tiers[0], s.slots[first : first + n], list(range(n)))
            else:
                for j, tier in enumerate(tiers):
                    entry = groups.setdefault(id(tier), (tier, [], []))
                    entry[1].append(s.slots[first + j])
                    entry[2].append(j)
            moves = []
            for tier, src, dst in groups.values():
                if isinstance(tier, NvmeTier):  # (its slots, for the reader; where its rows go: from dst[0] or at dst)
                    contiguous = dst == list(range(dst[0], dst[0] + len(dst)))
                    at = None if contiguous else host_to_device([np.asarray(dst, np.int64)], device)[0]
                    moves.append((tier, None, (src, dst[0], at)))
                    continue
                host_copy = self.copy_streams is not None and tier.is_host_memory
                runs = copy_engine_runs(src, dst) if host_copy else None
                as_index = (
                    None
                    if runs is not None
                    else tuple(host_to_device([np.asarray(src, np.int64), np.asarray(dst, np.int64)], device))
                )
                moves.append((tier, runs, as_index))
            batch = PagedBatch(
                q_starts=meta[i, 0:2],
                q_pos0=meta[i, 2:3],
                context_lens=meta[i, 3:4],
                first_block=meta[i, 4:5],
                block_tables=table[:, :n],
                max_q=rows,
                max_context=(first + n) * bs,
                q_starts_host=[0, rows],
            )
            plan.append((moves, batch))
        return plan

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.wait(layer)
        write_kv(k, v, *self.caches(layer), self.slot_mapping)
        return self.attend(layer, q, new_kv=(k, v))

    def wait(self, layer: int) -> None:
        """Order the current stream after this layer's share of the blocks still arriving: before the layer's KV is
        written or read."""
        if self.layer_waits or self.gates is not None:
            stream = torch.cuda.current_stream(self.gpu.pool.device)
            for handle in self.layer_waits:
                handle.wait_layer(layer, stream)
            if self.gates is not None:
                stream.wait_event(self.gates[layer])  # a wait node when captured

    def caches(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The GPU tier's (keys, values) of one layer, each (slots, block_size, Hkv, D), strided."""
        return self.gpu.layer_views(layer)

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        out: torch.Tensor | None = None,
        new_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Attention of q over the layer's cache, whose new keys and values are already written (after wait()).
        `out`: where the output goes (T, Hq, D), else a new tensor; `new_kv`: this step's keys and values (T, Hkv, D),
        which the whole prompts among the entries attend over (required when there are any; into an fp8 GPU tier,
        write_kv left them as stored, so that a prompt reads its keys as its later chunks and tokens do)."""
        k_cache, v_cache = self.caches(layer)
        window = self.windows[layer]
        if self.prompts is not None:
            out = torch.empty_like(q) if out is None else out
            r0 = self.prompts.row0
            k, v = new_kv
            prompt_attention(q[r0:], k[r0:], v[r0:], self.prompts, self.scale, window, out=out[r0:])
            if r0:
                self._attend_paged(layer, q[:r0], k_cache, v_cache, window, out[:r0])
            return out
        return self._attend_paged(layer, q, k_cache, v_cache, window, out)

    def _attend_paged(self, layer, q, k_cache, v_cache, window, out):
        """The paged kernels over `self.batch`'s rows, then the streamed chunks merged in."""
        if not self.streamed:
            return paged_attention(q, k_cache, v_cache, self.batch, self.scale, window, out=out)
        out, lse = paged_attention(q, k_cache, v_cache, self.batch, self.scale, window, need_lse=True, out=out)
        for s, plan in zip(self.streamed, self._stream_index):
            r0, r1 = s.rows
            q_rows = q[r0:r1]
            for moves, chunk in plan:
                buf = self._fill(layer, moves)
                k, v = staging_views(buf, self.staging_layout)
                part = paged_attention(q_rows, k, v, chunk, self.scale, window, need_lse=True)
                merge_partials_into(out[r0:r1], lse[r0:r1], *part)
                if self.copy_streams is not None:
                    self._drained[(self._chunks - 1) % len(self._drained)].record(torch.cuda.current_stream(q.device))
        return out

    def _fill(self, layer: int, moves) -> torch.Tensor:
        """Copy one chunk's blocks of `layer` into the next staging buffer, as their tier stores them; returns the
        buffer, ready to read on the current stream (on CUDA the copy runs on the copy stream, after the buffer's
        previous reader)."""
        b = self._chunks % self.staging.shape[0]
        self._chunks += 1
        buf = self.staging[b]
        if self.copy_streams is None:
            for tier, _, index in moves:
                if isinstance(tier, NvmeTier):
                    self._read_disk(*index[1:], buf, None)
                else:
                    copy_blocks(tier.pool[:, layer], buf, *index)
            return buf
        compute = torch.cuda.current_stream(buf.device)
        stream = self.copy_streams[b % len(self.copy_streams)]
        with torch.cuda.stream(stream):
            stream.wait_event(self._drained[b])
            if self._delay is not None:
                self._delay(stream)
            for tier, runs, index in moves:
                if isinstance(tier, NvmeTier):
                    self._read_disk(*index[1:], buf, stream)
                elif runs is not None:
                    copy_block_runs(tier.pool[:, layer], buf, runs, stream)
                else:
                    copy_blocks_triton(
                        tier.pool[:, layer], buf, *index, max_programs=32 if tier.is_host_memory else None
                    )
            self._filled[b].record(stream)
        compute.wait_event(self._filled[b])
        return buf

    def _read_disk(self, first_row: int, rows: torch.Tensor | None, buf, stream) -> None:
        """The next layer slice of blocks on NVMe (read ahead by the runner's DiskStream) into the staging rows of
        `buf` from `first_row` on, or into rows `rows` (a device index) where they are not consecutive; on CUDA
        copied on the copy stream `stream`."""
        reader, link_of = self._disk
        (tier, slots, layer), host, seconds = reader.take()
        link = link_of()
        link.seconds += seconds
        link.nbytes += host.numel() * host.element_size()
        link.batches += 1
        link.blocks += len(slots) if layer == 0 else 0  # each block counted once per step
        if rows is None:
            buf[first_row : first_row + len(slots)].copy_(host, non_blocking=stream is not None)
        else:
            buf.index_copy_(0, rows, host.to(buf.device, non_blocking=stream is not None))
        reader.taken(stream)

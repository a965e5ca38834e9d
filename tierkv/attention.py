"""Attention for one engine step over the tiered paged KV cache.

Every entry of the step has its newest blocks (a window that holds the tokens written this step) acquired on the
GPU tier. Its older blocks, if any, stay where they are (GPU or pinned CPU tier) and are streamed, one layer at a
time, through a bounded staging area on the compute device in chunks of `staging_blocks` blocks; the partial
results over the window and over each chunk are merged exactly with their log-sum-exp. The smallest GPU tier
is therefore the window of one step, however long the sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tierkv.kernels import PagedBatch, copy_blocks, merge_partials, paged_attention, write_kv
from tierkv.tiers import MemoryTier


@dataclass
class StreamedEntry:
    """Blocks [0, len(slots)) of one entry that are not in its GPU window, grouped by the tier that holds them."""

    entry: int
    rows: tuple[int, int]  # its query rows in the step
    q_pos0: int
    tiers: list[MemoryTier]  # per logical block
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
    ) -> None:
        self.gpu = gpu
        self.batch = batch
        self.slot_mapping = slot_mapping
        self.streamed = streamed
        self.staging = staging  # (staging_blocks, 2, block_size, Hkv, D) on the compute device
        self.scale = scale
        self.windows = sliding_windows
        self._stream_index = [self._plan(s) for s in streamed]
        self.layer_waits: list = []  # LayeredHandles of blocks still arriving: wait per layer, before reading it

    def _plan(self, s: StreamedEntry):
        """Per chunk: its copies (source tier, source slots, staging rows) and its attention metadata, prebuilt."""
        device = self.gpu.pool.device
        chunk = self.staging.shape[0]
        plan = []
        for first in range(0, len(s.slots), chunk):
            groups: dict[int, tuple[MemoryTier, list[int], list[int]]] = {}
            for j in range(first, min(first + chunk, len(s.slots))):
                tier = s.tiers[j]
                entry = groups.setdefault(id(tier), (tier, [], []))
                entry[1].append(s.slots[j])
                entry[2].append(j - first)
            n = min(chunk, len(s.slots) - first)
            moves = [
                (tier, torch.tensor(src, dtype=torch.int64, device=device), torch.tensor(dst, dtype=torch.int64, device=device))
                for tier, src, dst in groups.values()
            ]
            bs = self.gpu.pool.shape[3]
            rows = s.rows[1] - s.rows[0]
            # The chunk's attention metadata is the same for every layer: built once per step, not per layer.
            batch = PagedBatch(
                q_starts=torch.tensor([0, rows], dtype=torch.int32, device=device),
                q_pos0=torch.tensor([s.q_pos0], dtype=torch.int32, device=device),
                context_lens=torch.tensor([(first + n) * bs], dtype=torch.int32, device=device),
                first_block=torch.tensor([first], dtype=torch.int32, device=device),
                block_tables=torch.arange(n, dtype=torch.int32, device=device)[None],
                max_q=rows,
                max_context=(first + n) * bs,
            )
            plan.append((moves, batch))
        return plan

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.layer_waits:
            stream = torch.cuda.current_stream(q.device)
            for handle in self.layer_waits:
                handle.wait_layer(layer, stream)
        pool = self.gpu.pool[:, layer]  # (slots, 2, block_size, Hkv, D)
        k_cache, v_cache = pool[:, 0], pool[:, 1]
        write_kv(k, v, k_cache, v_cache, self.slot_mapping)
        window = self.windows[layer]
        if not self.streamed:
            return paged_attention(q, k_cache, v_cache, self.batch, self.scale, window)
        out, lse = paged_attention(q, k_cache, v_cache, self.batch, self.scale, window, need_lse=True)
        for s, plan in zip(self.streamed, self._stream_index):
            r0, r1 = s.rows
            q_rows = q[r0:r1]
            for moves, chunk in plan:
                for tier, src, dst in moves:
                    copy_blocks(tier.pool[:, layer], self.staging, src, dst)
                part = paged_attention(q_rows, self.staging[:, 0], self.staging[:, 1], chunk, self.scale, window, need_lse=True)
                out[r0:r1], lse[r0:r1] = merge_partials(out[r0:r1], lse[r0:r1], *part)
        return out

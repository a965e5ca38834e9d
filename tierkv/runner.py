"""The model runner: one step's forward pass over the paged KV cache, on whatever device holds the model.

It owns what the forward pass needs besides the page manager's decisions: the staging buffers and copy streams
through which KV below the GPU window is streamed, the attention scale, and the decode and piecewise CUDA graphs.
Under tensor parallelism every rank runs it with the same arguments (the followers need nothing else).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tierkv.attention import StepAttention, StreamedEntry, host_to_device, padded_tables, staging_views
from tierkv.disk_stream import DiskStream
from tierkv.graphs import DecodeGraphs, PiecewiseGraphs
from tierkv.kernels.kv_fp8 import caches_per_alignment
from tierkv.kernels.paged_attention import compile_variants
from tierkv.kernels.paged_batch import PagedBatch
from tierkv.kernels.prompt_attention import PromptRows
from tierkv.kv.block import CPU, GPU, NVME
from tierkv.kv.manager import PageManager
from tierkv.loader import LoadedModel


@dataclass(frozen=True)
class EntryPlan:
    """What a step runs for one sequence: tokens [start, end), its KV window from block `first_block` on."""

    seq_id: int
    start: int
    end: int
    first_block: int
    samples: bool  # its last row is sampled
    logit_rows: int = 0  # its first rows whose logits are returned too (a prompt's log-probabilities)

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


class ModelRunner:
    """Runs the model over one step's tokens with KV in `pm`'s tiers. `max_batch`: the most sequences a step holds
    (the decode graphs' largest batch); `cuda_graphs`: replay decode steps and the layers between attentions as
    CUDA graphs (CUDA only)."""

    staging_buffers = 2  # on CUDA: streamed chunks in flight (one being read, the others filling)
    staging_copy_streams = 2  # buffer b fills on stream b % this: two copy engines share the link
    prompts_apart = True  # whole prompts attend over their own keys (kernels/prompt_attention); False: A/B runs

    def __init__(
        self, loaded: LoadedModel, pm: PageManager, staging_blocks: int, max_batch: int = 256, cuda_graphs: bool = False
    ) -> None:
        self.model = loaded.model
        self.spec = loaded.spec
        self.pm = pm
        self.device = pm.device
        layout = pm.layout
        self.block_size = layout.block_size
        self.dtype = layout.dtype
        self.gpu_tier = pm.tiers[GPU]
        cuda = self.device.type == "cuda"
        # Streaming through staging: two buffers on CUDA (one fills on the copy stream while the other is read). They
        # hold a layer of each streamed block as the tiers below the GPU store it (fp8 records: the attention decodes
        # them as it reads, and only the compressed bytes are copied).
        self.staging_layout = next((pm.tiers[k].layout for k in (CPU, NVME) if k in pm.tiers), layout)
        self.staging = torch.empty(
            (self.staging_buffers if cuda else 1, staging_blocks, *self.staging_layout.block_shape[1:]),
            dtype=self.staging_layout.storage_dtype,
            device=self.device,
        )
        self.copy_streams = [torch.cuda.Stream(self.device) for _ in range(self.staging_copy_streams)] if cuda else None
        # Streamed blocks left on NVMe are read one layer at a time, ahead of the attention, into host buffers.
        self.disk = None
        if NVME in pm.tiers:
            stored = pm.tiers[NVME].layout  # a layer of a block as the disk holds it (compressed or not)
            layer_shape = stored.block_shape[1:] if stored.codec == "none" else (stored.record_nbytes,)
            reader = DiskStream(staging_blocks, layer_shape, stored.storage_dtype, pin=cuda)
            nvme, gpu = pm.tiers[NVME], self.gpu_tier
            self.disk = (reader, lambda: pm.mover.link_stats(nvme, gpu))  # (its record is replaced by a counter reset)
        if cuda:  # every attention kernel variant compiled now, not in the middle of a run
            dims = (self.spec.num_heads, layout.num_kv_heads, layout.head_dim, layout.block_size, layout.dtype)
            if layout.codec == "none":
                compile_variants(*dims, self.device)
            else:  # over 4 slots shaped as the GPU tier's (its strides, its layers' alignments)
                spare = torch.zeros((4, *layout.block_shape), dtype=torch.uint8, device=self.device)
                for caches in caches_per_alignment(spare, layout.block_size, layout.num_kv_heads, layout.head_dim):
                    compile_variants(*dims, self.device, caches=caches)
            if (
                self.staging_layout.codec != "none"
            ):  # and over the staging buffers' records, as streamed chunks read them
                compile_variants(*dims, self.device, caches=staging_views(self.staging[0], self.staging_layout))
        self.scale = self.spec.head_dim**-0.5
        graphs = cuda_graphs and cuda
        self.graphs = DecodeGraphs(self, max_batch) if graphs else None  # decode steps replayed as CUDA graphs
        # Other steps (prompt chunks, streamed KV): eager attention between graphs of everything else.
        self.pieces = PiecewiseGraphs(self) if graphs else None

    def close(self) -> None:
        """Stop the NVMe reader thread (after its reads in flight)."""
        if self.disk is not None:
            self.disk[0].close()

    def run_forward(
        self,
        plans: list[EntryPlan],
        tables: list[list[int]],
        placed: dict[int, list[tuple[int, int]]],
        input_ids: torch.Tensor,
        pending: list[tuple[int, torch.Tensor, int]] = (),
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, bool]:
        """The model over one step's tokens, with KV where `tables` (GPU window) and `placed` (older blocks,
        streamed) say; returns the logits of the sampled rows (or None), those of the entries' `logit_rows` in
        entry order (or None), and whether anything was streamed. Every
        tensor-parallel rank runs this with the same arguments. `pending`: input tokens still on the device
        (row, token tensor, its row), from the step before."""
        bs, dev = self.block_size, self.device
        n = np.fromiter((p.num_tokens for p in plans), dtype=np.int64, count=len(plans))
        q_starts = np.zeros(len(plans) + 1, dtype=np.int64)
        np.cumsum(n, out=q_starts[1:])
        starts = np.fromiter((p.start for p in plans), dtype=np.int64, count=len(plans))
        firsts = np.fromiter((p.first_block for p in plans), dtype=np.int64, count=len(plans))
        width = max(len(t) for t in tables)
        table = padded_tables(tables, width)
        entry = np.repeat(np.arange(len(plans)), n)
        positions = np.arange(q_starts[-1]) - q_starts[entry] + starts[entry]
        slots = table[entry, positions // bs - firsts[entry]].astype(np.int64) * bs + positions % bs
        rows = (q_starts[1:] - 1)[np.fromiter((p.samples for p in plans), dtype=bool, count=len(plans))]
        ids_d, positions_d, slots_d, rows_d = host_to_device([input_ids.numpy(), positions, slots, rows], dev)
        if pending:
            at, src = host_to_device(
                [np.array([r for r, _, _ in pending], np.int64), np.array([i for _, _, i in pending], np.int64)], dev
            )
            ids_d[at] = pending[0][1][src]  # every pending token comes from the one step in flight
        if self.graphs is not None and self.graphs.eligible(plans, tables):
            # Blocks still arriving: the replay waits for them layer by layer (its gates). (Running such a step as
            # piecewise graphs instead made it slower on the H100, 2026-11-24: item 4's decode steps with blocks
            # arriving took 22.6 ms at the median against 15.7 ms waiting whole before a replay; the host's
            # layer-by-layer launches cost more than the overlap saved.)
            return self.graphs.run(plans, tables, ids_d, positions, slots, self.pm.take_layer_waits()), None, False
        streamed = self._stream_plan(plans, placed)
        # The step's last entries that are whole prompts (every key they attend to is written in this step) attend
        # apart, over the step's own keys (kernels/prompt_attention); the paged kernels take the entries before them.
        split = len(plans)
        while self.prompts_apart and split and plans[split - 1].start == 0 and plans[split - 1].first_block == 0:
            split -= 1
        paged_width = max((len(t) for t in tables[:split]), default=1)
        prompt_bounds = q_starts[split:] - q_starts[split]
        q_starts_d, pos0_d, ctx_d, first_d, table_d, bounds_d = host_to_device(
            [
                q_starts[: split + 1].astype(np.int32),
                starts[:split].astype(np.int32),
                (starts + n)[:split].astype(np.int32),
                firsts[:split].astype(np.int32),
                np.ascontiguousarray(table[:split, :paged_width]).ravel(),
                prompt_bounds.astype(np.int32),
            ],
            dev,
        )
        batch = None
        if split:
            batch = PagedBatch(
                q_starts=q_starts_d,
                q_pos0=pos0_d,
                context_lens=ctx_d,
                first_block=first_d,
                block_tables=table_d.view(split, paged_width),
                max_q=int(n[:split].max()),
                max_context=int((starts + n)[:split].max()),
                q_starts_host=q_starts[: split + 1].tolist(),
            )
        prompts = None
        if split < len(plans):
            prompts = PromptRows(int(q_starts[split]), bounds_d, prompt_bounds.tolist(), int(n[split:].max()))
        attend = StepAttention(
            self.gpu_tier,
            batch,
            slots_d,
            streamed,
            self.staging,
            self.scale,
            self.spec.sliding_windows,
            self.copy_streams,
            self.pm.mover.debug_delay,
            prompts,
            self.disk,
            self.staging_layout,
        )
        attend.layer_waits = self.pm.take_layer_waits()  # blocks still arriving, layer group by layer group
        if self.pieces is not None and self.pieces.eligible(len(input_ids)):
            hidden = self.pieces.run(ids_d, positions_d, slots_d, attend)
        else:
            hidden = self.model(ids_d, positions_d, attend)
        logits = self.model.logits(hidden[rows_d]) if len(rows) else None
        prompt_logits = None
        if any(p.logit_rows for p in plans):
            wanted = np.concatenate([np.arange(q_starts[i], q_starts[i] + p.logit_rows) for i, p in enumerate(plans)])
            prompt_logits = self.model.logits(hidden[host_to_device([wanted], dev)[0]])
        return logits, prompt_logits, bool(streamed)

    def _stream_plan(self, plans: list[EntryPlan], placed: dict[int, list[tuple[int, int]]]) -> list[StreamedEntry]:
        out = []
        row = 0
        for i, p in enumerate(plans):
            if p.first_block:
                tiers = [self.pm.tiers[kind] for kind, _ in placed[p.seq_id]]
                out.append(
                    StreamedEntry(i, (row, row + p.num_tokens), p.start, tiers, [slot for _, slot in placed[p.seq_id]])
                )
            row += p.num_tokens
        return out

"""CUDA graphs for decode steps: the whole forward pass of a decode step (embedding, every layer's kernels, the
final norm and the LM head) replayed as one graph, so that Python and kernel-launch overhead leave the step's
critical path.

A step is replayed from a graph when every entry decodes one token over KV that is all in its GPU window (nothing
streamed from lower tiers) and tensor parallelism is off. Graphs are captured on first use, one per (batch bucket,
block-table width bucket); the step's inputs are copied into the graph's static buffers; the rows beyond the
batch take its first entry's token and position, slot -1 (the KV write skips it: padding never touches a cache
slot) and a context of 0 keys (their attention reads nothing; their outputs are dropped). The
attention kernels are the eager ones over the bucket's table width (partitions past an entry's context hold nothing
and weigh nothing), so a replay computes what the eager step computes. Blocks still arriving in layer groups are
waited for as a whole before a replay.

A step whose buckets have no graph yet replays a captured one for up to 4x the rows or 4x the table width if there
is one (the extra rows cost their share of the GEMMs, which read the same weights either way, and no attention),
instead of capturing: a capture runs the forward three times (100-450 ms at an 8B shape), and as a batch drains at
the end of a run each new bucket would pay it for a few steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tierkv.attention import StepAttention, host_to_device, padded_tables
from tierkv.kernels import PagedBatch
from tierkv.tiers import GPU


def _bucket(n: int, buckets: list[int]) -> int | None:
    for b in buckets:
        if n <= b:
            return b
    return None


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    ids: torch.Tensor  # (B,) int64
    positions: torch.Tensor  # (B,) int64
    slots: torch.Tensor  # (B,) int64: where each row's new K/V go
    live: torch.Tensor  # (B,) int64: 1 for the step's rows, 0 for padding (attends to no keys)
    tables: torch.Tensor  # (B, W) int32
    logits: torch.Tensor  # (B, vocab) float32, the graph's output
    batch: PagedBatch | None = None  # the attention metadata the graph reads: kept alive as long as the graph


class DecodeGraphs:
    """The captured decode graphs of one engine."""

    # The widest block table a graph is captured for, in tokens: wider steps (long contexts) run eagerly, where the
    # per-step launch overhead is small beside the attention itself and the split-K scratch would be large.
    max_context = 32768

    def __init__(self, engine) -> None:
        self.engine = engine
        self.max_batch = engine.scheduler.max_num_seqs if engine.scheduler is not None else 256
        self.batch_buckets = sorted({b for b in (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 160, 192, 224, 256) if b < self.max_batch}
                                    | {self.max_batch})
        bs = engine.block_size
        widths, w = [], 16
        while w * bs < self.max_context:
            widths.append(w)
            w *= 2
        widths.append(max(1, self.max_context // bs))
        self.width_buckets = widths
        self.graphs: dict[tuple[int, int], _Graph] = {}
        self.pool = None
        self.logits_out: torch.Tensor | None = None  # one output buffer shared by every graph (max batch x vocab)
        self.replays = 0
        self.captures = 0

    def eligible(self, plans, tables) -> bool:
        return (
            len(plans) <= self.max_batch
            and all(p.num_tokens == 1 and p.first_block == 0 and p.samples for p in plans)
            and max(len(t) for t in tables) <= self.width_buckets[-1]
        )

    def run(self, plans, tables, ids: torch.Tensor, positions: np.ndarray, slots: np.ndarray) -> torch.Tensor:
        """The decode step's logits (len(plans), vocab), from a replayed graph. `ids` (on the device), `positions`
        and `slots` (host): each entry's input token, its position and where its K/V go."""
        n = len(plans)
        B, W = self._pick(n, max(len(t) for t in tables))
        pad = B - n
        first = np.zeros(pad, dtype=np.int64)  # padded rows: entry 0's token and position, no slot, no keys
        live = np.concatenate([np.ones(n, dtype=np.int64), first])
        host_vec = [np.concatenate([positions, first + positions[0]]).astype(np.int64), np.concatenate([slots, first - 1]).astype(np.int64), live]
        host_tab = padded_tables(tables + [tables[0]] * pad, W)
        g = self.graphs.get((B, W))
        if g is None:
            g = self._capture(B, W, ids, host_vec, host_tab)
        else:
            self._fill(g, ids, host_vec, host_tab)
        g.graph.replay()
        self.replays += 1
        return g.logits[:n]

    def _pick(self, n: int, width: int) -> tuple[int, int]:
        """The (rows, table width) buckets of the graph for a step of n rows and this table width: its own, or a
        captured one for up to 4x the rows or the width (the smallest), rather than a new capture."""
        B, W = _bucket(n, self.batch_buckets), _bucket(width, self.width_buckets)
        if (B, W) in self.graphs:
            return B, W
        covering = [(b, w) for b, w in self.graphs if B <= b <= 4 * B and W <= w <= 4 * W]
        return min(covering, key=lambda k: (k[0] * k[1], k[0])) if covering else (B, W)

    def _fill(self, g: _Graph, ids: torch.Tensor, host_vec: list[np.ndarray], host_tab: np.ndarray) -> None:
        """The graph's input buffers from this step: `ids` (on the device), `host_vec` the (B,) positions, slots and
        live flags (int64), `host_tab` the (B, W) block tables (int32), each dtype in one non-blocking copy."""
        # Rows past the batch take its first entry's token (their slot is -1 and their context empty: see run).
        n = ids.shape[0]
        g.ids[:n].copy_(ids)
        g.ids[n:].copy_(ids[:1].expand(g.ids.shape[0] - n))
        positions, slots, live = host_to_device(host_vec, g.ids.device)
        g.positions.copy_(positions)
        g.slots.copy_(slots)
        g.live.copy_(live)
        g.tables.copy_(host_to_device([host_tab.reshape(-1)], g.tables.device)[0].view(g.tables.shape))

    def _forward(self, g: _Graph, batch: PagedBatch) -> torch.Tensor:
        e = self.engine
        attend = StepAttention(e.pm.tiers[GPU], batch, g.slots, [], None, e.scale, e.spec.sliding_windows)
        hidden = e.model(g.ids, g.positions, attend)
        out = self.logits_out[: g.ids.shape[0]]
        out.copy_(e.model.logits(hidden))
        return out

    def _capture(self, B: int, W: int, ids: torch.Tensor, host_vec: list[np.ndarray], host_tab: np.ndarray) -> _Graph:
        """Capture the graph for (B, W) with this step's inputs in its buffers (the warm-up runs and the capture
        write this step's K/V, the same bytes the replay then writes again)."""
        dev = self.engine.device
        if self.logits_out is None:
            self.logits_out = torch.empty((self.max_batch, self.engine.spec.vocab_size), dtype=torch.float32, device=dev)
        static = torch.zeros(B, dtype=torch.int64, device=dev)
        g = _Graph(torch.cuda.CUDAGraph(), static, torch.zeros_like(static), torch.zeros_like(static), torch.zeros_like(static),
                   torch.zeros((B, W), dtype=torch.int32, device=dev), None)
        self._fill(g, ids, host_vec, host_tab)
        # q_pos0 and context_lens are refreshed from the positions buffer inside the graph: a replay sees new ones.
        batch = PagedBatch(
            q_starts=torch.arange(B + 1, dtype=torch.int32, device=dev),
            q_pos0=torch.zeros(B, dtype=torch.int32, device=dev),
            context_lens=torch.zeros(B, dtype=torch.int32, device=dev),
            first_block=torch.zeros(B, dtype=torch.int32, device=dev),
            block_tables=g.tables,
            max_q=1,
            max_context=W * self.engine.block_size,
            q_starts_host=list(range(B + 1)),
        )
        g.batch = batch  # tensors made outside the capture that the graph reads must outlive it
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        compute = torch.cuda.current_stream(dev)
        side = torch.cuda.Stream(dev)
        side.wait_stream(compute)
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: compiles and autotunes outside the capture
                self._refresh(g, batch)
                self._forward(g, batch)
        compute.wait_stream(side)
        # thread_local: the mover's I/O thread may launch copies on its own streams meanwhile, which is fine here.
        with torch.cuda.graph(g.graph, pool=self.pool, stream=side, capture_error_mode="thread_local"):
            self._refresh(g, batch)
            g.logits = self._forward(g, batch)
        compute.wait_stream(side)
        self.graphs[(B, W)] = g
        self.captures += 1
        return g

    @staticmethod
    def _refresh(g: _Graph, batch: PagedBatch) -> None:
        batch.q_pos0.copy_(g.positions)
        batch.context_lens.copy_((g.positions + 1) * g.live)  # padding rows: no keys

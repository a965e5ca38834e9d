"""CUDA graphs for decode steps: the whole forward pass of a decode step (embedding, every layer's kernels, the
final norm and the LM head) replayed as one graph, so that Python and kernel-launch overhead leave the step's
critical path.

A step is replayed from a graph when every entry decodes one token over KV that is all in its GPU window (nothing
streamed from lower tiers) and tensor parallelism is off. Graphs are captured one per (batch bucket, block-table
width bucket): all of them at start-up (`LLM.warm_up`, from its first decode step, padded), else on first use.
The step's inputs are copied into the graph's static buffers; the rows beyond the batch take its first entry's
token and position, slot -1 (the KV write skips it: padding never touches a cache slot) and a context of 0 keys
(their attention reads nothing; their outputs are dropped). The attention kernels are the eager ones over the
bucket's table width (partitions past an entry's context hold nothing and weigh nothing), so a replay computes what
the eager step computes.

Blocks still arriving (a swapped-in sequence's KV, coming over in layer groups) are waited for layer by layer inside
the replay: such a step replays a graph captured with a wait node before each layer's KV write, on gate i, an
external CUDA event that the step points at the end of layer i's share of the transfers before the replay
(LayerGates). The first layers compute while the later ones cross the link, as in eager steps, at a graph's launch
cost. Steps with nothing arriving replay graphs captured without wait nodes (a bucket can have both). Where torch has
no external events, a step with blocks arriving waits for the transfers as a whole before the replay.

A step whose buckets have no graph yet replays a captured one for up to 4x the rows or 4x the table width if there
is one (the extra rows cost their share of the GEMMs, which read the same weights either way, and no attention),
instead of capturing: a capture runs the forward three times (100-450 ms at an 8B shape, with its kernels' first
compiles), and as a batch drains at the end of a run each new bucket would pay it for a few steps. A process that
warmed up has every bucket's graph without wait nodes before its first request (those with them are still captured
on first use).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tierkv.attention import StepAttention, host_to_device, padded_tables
from tierkv.handles import all_of
from tierkv.kernels.kv_write import write_kv
from tierkv.kernels.paged_batch import PagedBatch


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


def external_events_supported() -> bool:
    """Whether this torch makes events that captured graphs wait on as event-wait nodes (torch.cuda.Event(external=True))."""
    import inspect

    return "external" in inspect.signature(torch.cuda.Event.__new__).parameters


class LayerGates:
    """One external CUDA event per layer that decode graphs wait on (a wait node each) before the layer's KV write.

    A replay waits on each gate's record at its launch. Before replaying a step with blocks still arriving, arm()
    re-records gate i, on a stream of its own, after the transfers of layer i and every layer before it; a step
    with nothing arriving leaves the gates on records already complete (or ordered before the compute stream's
    earlier steps), and its waits cost nothing."""

    def __init__(self, layers: int, device: torch.device) -> None:
        self.events = [torch.cuda.Event(external=True) for _ in range(layers)]
        self.stream = torch.cuda.Stream(device)
        compute = torch.cuda.current_stream(device)
        for event in self.events:
            event.record(compute)  # created (torch skips waits on events never recorded, in captures too), complete
        self.armed = 0  # steps armed

    def arm(self, handles: list) -> None:
        """Point each layer's gate at the end of its layer group's transfer in every one of `handles` (LayeredHandles)."""
        need: list[list] = [[] for _ in self.events]
        for h in handles:
            for lo, _hi, event in h.groups:
                need[lo].append(event)  # groups run in layer order on one stream: the gate of a later layer covers it
        s = self.stream
        for layer, gate in enumerate(self.events):
            for event in need[layer]:
                s.wait_event(event)
            gate.record(s)
        self.armed += 1


class DecodeGraphs:
    """The captured decode graphs of one model runner."""

    # Graphs wait on LayerGates (one event-wait node per layer) for blocks still arriving; False: such steps wait for
    # the transfers whole before a replay, and the graphs hold no wait nodes (an A/B switch for benchmarks).
    layer_gates = True

    # The widest block table a graph is captured for, in tokens: wider steps (long contexts) run eagerly, where the
    # per-step launch overhead is small beside the attention itself and the split-K scratch would be large.
    max_context = 32768

    def __init__(self, runner, max_batch: int) -> None:
        self.runner = runner
        self.max_batch = max_batch
        self.batch_buckets = sorted(
            {b for b in (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 160, 192, 224, 256) if b < self.max_batch}
            | {self.max_batch}
        )
        bs = runner.block_size
        widths, w = [], 16
        while w * bs < self.max_context:
            widths.append(w)
            w *= 2
        widths.append(max(1, self.max_context // bs))
        self.width_buckets = widths
        self.graphs: dict[tuple[int, int, bool], _Graph] = {}  # (rows, table width, waits on the gates)
        self.pool = None
        self.logits_out: torch.Tensor | None = None  # one output buffer shared by every graph (max batch x vocab)
        self.replays = 0
        self.captures = 0
        self._capture_every_bucket_up_to = 0  # blocks: the next step captures every bucket's graph (0: none)
        layers = runner.spec.num_layers
        self.gates = LayerGates(layers, runner.device) if self.layer_gates and external_events_supported() else None

    def eligible(self, plans, tables) -> bool:
        return (
            len(plans) <= self.max_batch
            and all(p.num_tokens == 1 and p.first_block == 0 and p.samples and not p.logit_rows for p in plans)
            and max(len(t) for t in tables) <= self.width_buckets[-1]
        )

    def run(
        self, plans, tables, ids: torch.Tensor, positions: np.ndarray, slots: np.ndarray, arriving: list
    ) -> torch.Tensor:
        """The decode step's logits (len(plans), vocab), from a replayed graph. `ids` (on the device), `positions`
        and `slots` (host): each entry's input token, its position and where its K/V go. `arriving`: LayeredHandles
        of blocks still coming in, waited for layer by layer by a graph with wait nodes (the gates armed for them),
        or, where the graphs have no gates, by the compute stream as a whole before the replay."""
        n = len(plans)
        gated = bool(arriving) and self.gates is not None
        if gated:
            self.gates.arm(arriving)
        elif arriving:
            all_of(arriving).wait_on(torch.cuda.current_stream(self.runner.device))
        if self._capture_every_bucket_up_to and not gated:
            self._capture_every_bucket(ids, positions, slots, tables)
        B, W = self._pick(n, max(len(t) for t in tables), gated)
        host_vec, host_tab = self._padded(positions, slots, tables, B, W)
        g = self.graphs.get((B, W, gated))
        if g is None:
            g = self._capture(B, W, gated, ids, host_vec, host_tab)
        else:
            self._fill(g, ids, host_vec, host_tab)
        g.graph.replay()
        self.replays += 1
        return g.logits[:n]

    def capture_every_bucket_at_next_step(self, max_blocks: int) -> None:
        """Capture, at the next decode step a graph replays, the graph of every (rows, table width) bucket for
        tables of up to `max_blocks` blocks that it can pad to (as a server does at start-up): the steps that follow,
        whatever their batch and context, replay a graph of their own bucket and none waits for a capture."""
        self._capture_every_bucket_up_to = max_blocks

    def _capture_every_bucket(self, ids: torch.Tensor, positions: np.ndarray, slots: np.ndarray, tables) -> None:
        """Every bucket's graph from this step's inputs, padded (the rows past the step's attend to no keys and write
        no KV, so each capture computes this step; the replay that follows writes the same bytes again)."""
        widest = _bucket(min(self._capture_every_bucket_up_to, self.width_buckets[-1]), self.width_buckets)
        self._capture_every_bucket_up_to = 0
        n, width = len(tables), max(len(t) for t in tables)
        for B in (b for b in self.batch_buckets if b >= n):
            for W in (w for w in self.width_buckets if width <= w <= widest):
                if (B, W, False) not in self.graphs:
                    self._capture(B, W, False, ids, *self._padded(positions, slots, tables, B, W))

    @staticmethod
    def _padded(positions: np.ndarray, slots: np.ndarray, tables, B: int, W: int):
        """The graph's host inputs for a step of len(tables) rows padded to B rows and W blocks: (positions, slots,
        live flags) and the (B, W) tables. Padded rows: entry 0's token and position, no slot, no keys."""
        n = len(tables)
        first = np.zeros(B - n, dtype=np.int64)
        live = np.concatenate([np.ones(n, dtype=np.int64), first])
        host_vec = [
            np.concatenate([positions, first + positions[0]]).astype(np.int64),
            np.concatenate([slots, first - 1]).astype(np.int64),
            live,
        ]
        return host_vec, padded_tables(tables + [tables[0]] * (B - n), W)

    def _pick(self, n: int, width: int, gated: bool) -> tuple[int, int]:
        """The (rows, table width) buckets of the graph for a step of n rows and this table width: its own, or a
        captured one for up to 4x the rows or the width (the smallest), rather than a new capture."""
        B, W = _bucket(n, self.batch_buckets), _bucket(width, self.width_buckets)
        if (B, W, gated) in self.graphs:
            return B, W
        covering = [(b, w) for b, w, g in self.graphs if g == gated and B <= b <= 4 * B and W <= w <= 4 * W]
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

    def _forward(self, g: _Graph, batch: PagedBatch, gated: bool) -> torch.Tensor:
        e = self.runner
        attend = StepAttention(e.gpu_tier, batch, g.slots, [], None, e.scale, e.spec.sliding_windows)
        attend.gates = self.gates.events if gated else None
        hidden = e.model(g.ids, g.positions, attend)
        out = self.logits_out[: g.ids.shape[0]]
        out.copy_(e.model.logits(hidden))
        return out

    def _capture(
        self, B: int, W: int, gated: bool, ids: torch.Tensor, host_vec: list[np.ndarray], host_tab: np.ndarray
    ) -> _Graph:
        """Capture the graph for (B, W) with this step's inputs in its buffers (the warm-up runs and the capture
        write this step's K/V, the same bytes the replay then writes again)."""
        dev = self.runner.device
        if self.logits_out is None:
            self.logits_out = torch.empty(
                (self.max_batch, self.runner.spec.vocab_size), dtype=torch.float32, device=dev
            )
        static = torch.zeros(B, dtype=torch.int64, device=dev)
        g = _Graph(
            torch.cuda.CUDAGraph(),
            static,
            torch.zeros_like(static),
            torch.zeros_like(static),
            torch.zeros_like(static),
            torch.zeros((B, W), dtype=torch.int32, device=dev),
            None,
        )
        self._fill(g, ids, host_vec, host_tab)
        # q_pos0 and context_lens are refreshed from the positions buffer inside the graph: a replay sees new ones.
        batch = PagedBatch(
            q_starts=torch.arange(B + 1, dtype=torch.int32, device=dev),
            q_pos0=torch.zeros(B, dtype=torch.int32, device=dev),
            context_lens=torch.zeros(B, dtype=torch.int32, device=dev),
            first_block=torch.zeros(B, dtype=torch.int32, device=dev),
            block_tables=g.tables,
            max_q=1,
            max_context=W * self.runner.block_size,
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
                self._forward(g, batch, gated)
        compute.wait_stream(side)
        # thread_local: the mover's I/O thread may launch copies on its own streams meanwhile, which is fine here.
        with torch.cuda.graph(g.graph, pool=self.pool, stream=side, capture_error_mode="thread_local"):
            self._refresh(g, batch)
            g.logits = self._forward(g, batch, gated)
        compute.wait_stream(side)
        self.graphs[(B, W, gated)] = g
        self.captures += 1
        return g

    @staticmethod
    def _refresh(g: _Graph, batch: PagedBatch) -> None:
        batch.q_pos0.copy_(g.positions)
        batch.context_lens.copy_((g.positions + 1) * g.live)  # padding rows: no keys


@dataclass
class _Pieces:
    graphs: list  # torch.cuda.CUDAGraph per piece: piece i = layer i-1 after its attention + layer i up to it
    hidden: torch.Tensor  # (tokens, hidden) the last piece's output, final-normed


class PiecewiseGraphs:
    """CUDA graphs for the steps decode graphs do not take: steps with prompt chunks (a prompt's chunk beside the
    running decodes is most steps of a serving run with arrivals), KV streamed from lower tiers, tables past the
    decode graphs' widths. Such a step's attention changes shape from step to step, so it runs eagerly, layer by
    layer; everything between two attentions is one graph replay (piece i: layer i-1 from its attention output on,
    then layer i up to its attention, its new K/V written into the cache). A step of T tokens replays the pieces
    captured for the smallest bucket of at least T tokens: rows past T take stale ids and positions (they compute
    numbers no one reads) and slot -1 (they write no KV), and attention reads only the first T rows.

    Pieces are captured on first use of a bucket (one eager pass to compile and tune, then the capture: 30-100 ms at
    an 8B shape), or all at once by capture_all(). Every bucket shares one set of static buffers (sized for the
    largest; only one step runs at a time) and one memory pool: replays never interleave, and within a step the
    pieces run in the order they were captured. Blocks still arriving are waited for layer by layer, as in eager
    steps, before the piece that writes the layer's KV.

    Buckets: 16 tokens (the GEMMs of up to 16 rows take the GEMV kernel), then every 32 tokens up to 256, every 64
    up to 1,024, every 128 up to `max_tokens`: a step pays for at most 1/8 more rows than it has past 256 tokens,
    and capturing all 29 buckets takes 2-3 s at an 8B shape. Longer steps run eagerly (at 2,048 tokens their GEMMs
    take longer than launching them).
    """

    def __init__(self, runner, max_tokens: int = 2048, capture: bool = True) -> None:
        self.runner = runner
        self.capture = capture  # False: the pieces run eagerly, uncaptured (on CPU: the tests of the split itself)
        self.buckets = [
            b for b in (16, *range(32, 257, 32), *range(320, 1025, 64), *range(1152, 2049, 128)) if b < max_tokens
        ]
        self.buckets.append(max_tokens)
        self.pieces: dict[int, _Pieces] = {}
        self.pool = None
        self.replays = 0
        self.captures = 0
        spec, dev, top = runner.spec, runner.device, self.buckets[-1]
        self._ids = torch.zeros(top, dtype=torch.int64, device=dev)
        self._positions = torch.zeros(top, dtype=torch.int64, device=dev)
        self._slots = torch.full((top,), -1, dtype=torch.int64, device=dev)
        self._qkv = torch.zeros(
            (top, (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim), dtype=runner.dtype, device=dev
        )
        self._attn = torch.zeros((top, spec.num_heads, spec.head_dim), dtype=runner.dtype, device=dev)
        self._filled = 0  # rows of _slots that may hold a slot from an earlier step (>= 0)

    def eligible(self, num_tokens: int) -> bool:
        return num_tokens <= self.buckets[-1]  # (no engine has pieces under tensor parallelism: cuda_graphs is off)

    def capture_all(self) -> None:
        """Capture every bucket's pieces now (as a server does at start-up), not in the first steps that need them."""
        for b in self.buckets:
            if b not in self.pieces:
                self._capture(b)

    def _q(self, n: int) -> torch.Tensor:
        """The first n rows' queries (n, Hq, D): the leading columns of the q/k/v buffer the pieces write."""
        spec = self.runner.spec
        return self._qkv[:n, : spec.num_heads * spec.head_dim].view(n, spec.num_heads, spec.head_dim)

    def _kv(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first n rows' keys and values (n, Hkv, D) each, rotary applied: the q/k/v buffer's other columns."""
        spec = self.runner.spec
        q_cols, kv_cols = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        k = self._qkv[:n, q_cols : q_cols + kv_cols].view(n, spec.num_kv_heads, spec.head_dim)
        v = self._qkv[:n, q_cols + kv_cols :].view(n, spec.num_kv_heads, spec.head_dim)
        return k, v

    @torch.inference_mode()
    def run(
        self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, attend: StepAttention
    ) -> torch.Tensor:
        """The step's final-normed hidden states (T, hidden) for its T tokens `ids`, at `positions`, their K/V going
        to `slots` (all on the device), attention by `attend` (its KV writes are the pieces')."""
        n = ids.shape[0]
        B = _bucket(n, self.buckets)
        p = (self.pieces.get(B) or self._capture(B)) if self.capture else None
        # Rows past n must hold no slot (-1), or padding would write KV there. Widened before the copy, so that a
        # step cut off in between (an error, Ctrl-C) cannot leave slots in rows the next step thinks are clear.
        filled, self._filled = self._filled, max(self._filled, n)
        self._ids[:n].copy_(ids)
        self._positions[:n].copy_(positions)
        self._slots[:n].copy_(slots)
        if filled > n:
            self._slots[n:filled].fill_(-1)
        self._filled = n
        q, kv = self._q(n), self._kv(n)
        attn = self._attn[:n]
        count = self.runner.spec.num_layers + 1
        state: dict = {}
        for i in range(count):
            if i < count - 1:
                attend.wait(i)  # piece i writes layer i's K/V
            if p is not None:
                p.graphs[i].replay()
            else:
                self._piece(i, B, state)
            if i < count - 1:
                attend.attend(i, q, out=attn, new_kv=kv)
        self.replays += 1
        return (p.hidden if p is not None else state["hidden"])[:n]

    def _piece(self, i: int, n: int, state: dict) -> None:
        """Piece i over the first n rows of the static buffers; `state` carries x, residual, cos, sin between pieces."""
        model = self.runner.model
        layers = model.model.layers
        if i == 0:
            state["x"], state["cos"], state["sin"] = model.embed(self._ids[:n], self._positions[:n])
            state["residual"] = None
        else:
            state["x"], state["residual"] = layers[i - 1].post_attention(self._attn[:n], state["residual"])
        if i < len(layers):
            _, k, v, state["residual"] = layers[i].pre_attention(
                state["x"], state["residual"], state["cos"], state["sin"], self._qkv[:n]
            )
            write_kv(k, v, *self.runner.gpu_tier.layer_views(i), self._slots[:n])
        else:
            state["hidden"] = model.finish(state["x"], state["residual"])

    @torch.inference_mode()
    def _capture(self, n: int) -> _Pieces:
        """Capture bucket n's pieces (after one uncaptured pass on a side stream, which compiles and tunes), over
        slots all -1: neither pass writes KV."""
        dev = self.runner.device
        count = self.runner.spec.num_layers + 1
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        self._slots[: self._filled].fill_(-1)  # the warm-up and the captures run on these: no KV written
        self._filled = 0
        compute = torch.cuda.current_stream(dev)
        side = torch.cuda.Stream(dev)
        side.wait_stream(compute)
        with torch.cuda.stream(side):
            state: dict = {}
            for i in range(count):  # warm-up: compiles and tunes outside the capture
                self._piece(i, n, state)
            state = {}
            graphs = []
            for i in range(count):
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=self.pool, stream=side, capture_error_mode="thread_local"):
                    self._piece(i, n, state)
                graphs.append(g)
        compute.wait_stream(side)
        p = self.pieces[n] = _Pieces(graphs, state["hidden"])
        self.captures += 1
        return p

"""Tensor parallelism: one process per rank, torch.distributed between them (NCCL between GPUs, gloo on CPU).

Rank 0 is the driver: it runs the scheduler, the sampler and the page manager's decisions. Every page-manager
call it makes is recorded; before each forward pass it broadcasts a compact step plan (those calls, then the
step's entries and token ids) to the other ranks, which replay the calls on their own page manager: the page
manager is deterministic, so every rank's block tables stay identical while each rank moves the bytes of its own
KV heads in its own tiers, in parallel. Weights are split Megatron-style (attention heads, MLP columns then
rows, vocabulary), with one all-reduce after attention and one after the MLP.

Under `torchrun`, every rank runs the same script: `tierkv.LLM(...)` on rank 0 returns the driver; on the other
ranks it serves rank 0 and exits the process when rank 0 closes.
"""

from __future__ import annotations

import gc
import hashlib
import os
import socket
import sys
import time
import traceback
from array import array
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from tierkv.errors import ConfigError, TierKVError, WorkerError

# Never let NCCL, PyTorch or NVSHMEM use NVLink multicast (it can take a shared host's GPUs down).
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@dataclass
class TPContext:
    rank: int
    world: int
    group: object = None  # collectives on tensors (NCCL on CUDA, gloo on CPU)
    ctrl: object = None  # gloo group for step plans and stats

    def split(self, n: int, what: str) -> tuple[int, int]:
        """This rank's [lo, hi) of `n` things split evenly; refused where they do not split."""
        if n % self.world:
            raise ConfigError(
                f"tensor_parallel_size={self.world} does not divide {what} ({n}); choose a divisor of {n}"
            )
        per = n // self.world
        return self.rank * per, (self.rank + 1) * per

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, group=self.group)
        return t

    def all_gather_last(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's `t` along the last dimension."""
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


@dataclass(frozen=True)
class Shards:
    """Which slice of each weight this rank holds."""

    heads: tuple[int, int]  # query heads
    kv_heads: tuple[int, int]  # KV heads (replicated where there are fewer than ranks)
    intermediate: tuple[int, int]
    vocab: tuple[int, int]  # rows of the (padded) vocabulary
    vocab_padded: int

    @classmethod
    def for_rank(cls, spec, tp: TPContext | None) -> Shards:
        if tp is None or tp.world == 1:
            return cls(
                (0, spec.num_heads),
                (0, spec.num_kv_heads),
                (0, spec.intermediate_size),
                (0, spec.vocab_size),
                spec.vocab_size,
            )
        heads = tp.split(spec.num_heads, "the attention heads")
        group = spec.num_heads // spec.num_kv_heads
        if spec.num_kv_heads >= tp.world:
            kv = tp.split(spec.num_kv_heads, "the KV heads")
        else:  # fewer KV heads than ranks: each rank holds the one its query heads share
            if (heads[1] - heads[0]) > group or heads[0] // group != (heads[1] - 1) // group:
                raise ConfigError(f"tensor_parallel_size={tp.world}: a rank's query heads would need two KV heads")
            kv = (heads[0] // group, heads[0] // group + 1)
        inter = tp.split(spec.intermediate_size, "the MLP width")
        per = -(-spec.vocab_size // tp.world)
        return cls(heads, kv, inter, (tp.rank * per, (tp.rank + 1) * per), per * tp.world)

    def local_spec(self, spec):
        import dataclasses

        return dataclasses.replace(
            spec,
            num_heads=self.heads[1] - self.heads[0],
            num_kv_heads=self.kv_heads[1] - self.kv_heads[0],
            intermediate_size=self.intermediate[1] - self.intermediate[0],
        )

    def slice_of(self, name: str, head_dim: int):
        """(dim, lo, hi) of checkpoint tensor `name` that this rank holds, or None for the whole tensor."""
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            return 0, self.heads[0] * head_dim, self.heads[1] * head_dim
        if name.endswith(("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias")):
            return 0, self.kv_heads[0] * head_dim, self.kv_heads[1] * head_dim
        if name.endswith("o_proj.weight"):
            return 1, self.heads[0] * head_dim, self.heads[1] * head_dim
        if name.endswith(("gate_proj.weight", "up_proj.weight", "gate_proj.bias", "up_proj.bias")):
            return 0, *self.intermediate
        if name.endswith("down_proj.weight"):
            return 1, *self.intermediate
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            return 0, *self.vocab
        return None


# -- process groups ------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Testing the tensor-parallel path on a machine with one GPU: every rank on the same device, gloo between them
# (NCCL refuses two ranks on one GPU). Slow, for correctness checks only.
ONE_GPU_ENV = "TIERKV_TP_ONE_GPU"


def _one_gpu() -> bool:
    return os.environ.get(ONE_GPU_ENV) == "1"


def init_group(rank: int, world: int, init_method: str, device: torch.device, timeout_s: float) -> TPContext:
    os.environ.update(SAFE_ENV)
    backend = "nccl" if device.type == "cuda" and not _one_gpu() else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # torch.distributed.nn.functional binds `group=group.WORLD` as the default argument of ten functions when it
    # is first imported. Imported after the group exists (torch._dynamo imports it, and transformers imports
    # torch._dynamo while this rank loads the model's config), those defaults keep the world group alive after
    # destroy_process_group(): its backend's threads (gloo's pt_gloo_runloop) then live on into the interpreter's
    # teardown, where one still freeing the last collective's tensors needs the GIL, is ended by the finalizing
    # interpreter inside a noexcept destructor, and the process aborts ("terminate called without an active
    # exception", SIGABRT). Imported now, they bind None.
    from torch.distributed.nn import functional  # noqa: F401

    dist.init_process_group(
        backend, init_method=init_method, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s)
    )
    ctrl = (
        dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s)) if backend != "gloo" else dist.group.WORLD
    )
    return TPContext(rank, world, dist.group.WORLD, ctrl)


def broadcast_plan(tp: TPContext, plan: dict | None = None) -> dict:
    """Rank 0 sends `plan`; the others receive and return it."""
    box = [plan]
    dist.broadcast_object_list(box, src=0, group=tp.ctrl)
    return box[0]


def gather_objects(tp: TPContext, obj) -> list | None:
    out = [None] * tp.world if tp.rank == 0 else None
    dist.gather_object(obj, out, dst=0, group=tp.ctrl)
    return out


@dataclass
class Workers:
    """The worker processes rank 0 started (none under torchrun) and the queue they report their errors on."""

    procs: list = field(default_factory=list)
    errors: object = None
    beats: object = None  # shared array: each worker's last heartbeat (time.time()), written by a thread twice a second

    def frozen(self, stale_s: float = 3.0) -> list[int]:
        """Ranks whose process is alive but has not run for `stale_s` (stopped, or stuck holding the interpreter)."""
        if self.beats is None:
            return []
        now = time.time()
        return [rank for rank, p in enumerate(self.procs, start=1) if p.is_alive() and now - self.beats[rank] > stale_s]

    def failure(self, wait_s: float = 0.0) -> str | None:
        """What went wrong on a worker, naming its rank: the error it reported, or its exit; None if all are well."""
        start = time.monotonic()
        while True:
            reports = []
            while self.errors is not None:
                try:
                    reports.append(self.errors.get_nowait())
                except Exception:  # noqa: BLE001 - empty
                    break
            if reports:
                return "; ".join(f"tensor-parallel worker rank {rank} failed: {msg}" for rank, msg in sorted(reports))
            elapsed = time.monotonic() - start
            dead = [(rank, p.exitcode) for rank, p in enumerate(self.procs, start=1) if not p.is_alive()]
            if dead and elapsed >= min(0.5, wait_s):  # a dying worker's own report may still be on its way
                return "; ".join(f"tensor-parallel worker rank {rank} exited (exit code {code})" for rank, code in dead)
            if elapsed >= wait_s:
                return None
            time.sleep(0.05)

    def join(self, timeout_s: float = 60.0) -> None:
        for proc in self.procs:
            proc.join(timeout_s)
        self.kill()

    def kill(self) -> None:
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
                proc.join(5)


# -- rank 0: record the page manager's decisions, send them as step plans -----------------------------------------

# The page manager's methods that change its state (or order its transfers): rank 0 records each successful call
# and every other rank replays it, in order, on its own page manager.
REPLAYED = frozenset(
    {
        "add_sequence",
        "append_tokens",
        "fork",
        "free",
        "flush_copies",
        "attach",
        "register",
        "persist_keyed",
        "demote_cached",
        "reset_prefix_cache",
        "load_from_disk",
        "begin_step",
        "acquire",
        "pin_in_place",
        "release",
        "prefetch",
        "promote_cached",
        "evict",
        "synchronize",
        "reset_counters",
        "write_tokens",
    }
)


class BlockIds(tuple):
    """Blocks passed to a replayed call, sent by id (the ids are the same on every rank)."""


def tables_digest(tables) -> str:
    h = hashlib.blake2b(digest_size=16)
    for table in tables:
        h.update(array("q", [len(table), *table]).tobytes())
    return h.hexdigest()


class Driver:
    """Rank 0's side: the recorded calls not yet sent, the step plans, stats, shutdown, failure reports."""

    def __init__(self, tp: TPContext, workers: Workers, timeout_s: float) -> None:
        self.tp, self.workers, self.timeout_s = tp, workers, timeout_s
        self.ops: list[tuple] = []
        self.closed = False

    def record(self, name: str, args: tuple, kwargs: dict, result) -> None:
        from tierkv.page_manager import Block

        def pack(x):
            if isinstance(x, (list, tuple)) and x and all(isinstance(b, Block) for b in x):
                return BlockIds(b.block_id for b in x)
            if isinstance(x, torch.Tensor):
                raise TierKVError(f"page manager call {name} with a tensor cannot be replayed under tensor parallelism")
            return x

        expect = result if name == "load_from_disk" else None
        self.ops.append((name, tuple(pack(a) for a in args), {k: pack(v) for k, v in kwargs.items()}, expect))

    def _send(self, kind: str, **payload) -> None:
        if self.closed:
            raise WorkerError("the tensor-parallel workers were shut down (LLM.close() was called)")
        msg = {"kind": kind, "ops": self.ops, **payload}
        self.ops = []
        try:
            broadcast_plan(self.tp, msg)
        except Exception as exc:
            self.raise_if_worker_failed(exc)
            raise

    def send_step(self, plans, input_ids: torch.Tensor, tables) -> None:
        self._send(
            "step", plans=[tuple(p.__dict__.values()) for p in plans], input_ids=input_ids, digest=tables_digest(tables)
        )

    def flush(self) -> None:
        if self.ops:
            self._send("ops")

    def gather_stats(self, mine: dict) -> list[dict]:
        self._send("stats")
        try:
            return gather_objects(self.tp, mine)
        except Exception as exc:
            self.raise_if_worker_failed(exc)
            raise

    def close(self) -> None:
        """Send the last calls and the end; wait for the workers to close their tiers and exit."""
        if self.closed:
            return
        try:
            self._send("close")
        finally:
            self.closed = True
            self.workers.join()
            shutdown_group(self.tp)

    def raise_if_worker_failed(self, exc: BaseException) -> None:
        """After a failed collective: raise WorkerError naming the rank that died, failed or hung, if one did."""
        if isinstance(exc, WorkerError):
            raise exc
        reason = self.workers.failure(wait_s=2.0)
        if reason is None and _looks_like_timeout(exc):
            frozen = self.workers.frozen()
            which = f"rank {', '.join(map(str, frozen))} stopped running" if frozen else _which_ranks(self.tp)
            reason = f"a tensor-parallel worker did not answer within tp_timeout_s={self.timeout_s:g} s ({which})"
        if reason is None and isinstance(exc, (dist.DistError, RuntimeError)) and _looks_like_collective(exc):
            reason = f"a collective with the tensor-parallel workers failed ({_which_ranks(self.tp)}): {exc}"
        if reason is not None:
            self.closed = True
            self.workers.kill()
            shutdown_group(self.tp)
            raise WorkerError(
                f"{reason}; the run cannot go on. A YAML batch run started again resumes where it stopped"
            ) from exc


def _looks_like_timeout(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "timed out" in text or "timeout" in text


def _looks_like_collective(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(w in text for w in ("gloo", "nccl", "connection", "peer", "broken pipe", "socket"))


def _which_ranks(tp: TPContext) -> str:
    """Name the ranks that do not answer, through a monitored barrier on the gloo group (best effort)."""
    try:
        dist.monitored_barrier(group=tp.ctrl, timeout=timedelta(seconds=5), wait_all_ranks=True)
    except Exception as exc:  # noqa: BLE001 - its message names the ranks
        import re

        ranks = sorted({int(r) for r in re.findall(r"[Rr]ank[s]? ?\[?(\d+)", str(exc)) if int(r) != 0})
        if ranks:
            return "rank " + ", ".join(map(str, ranks)) + " not answering"
        return "could not tell which rank"
    return "every rank answers a barrier"


class RecordingPageManager:
    """Rank 0's page manager under tensor parallelism: the real one, with every state-changing call recorded for
    the other ranks (see REPLAYED); everything else passes through."""

    def __init__(self, pm, driver: Driver) -> None:
        object.__setattr__(self, "_pm", pm)
        object.__setattr__(self, "_driver", driver)

    def __getattr__(self, name: str):
        attr = getattr(self._pm, name)
        if name not in REPLAYED:
            return attr

        def call(*args, **kwargs):
            result = attr(*args, **kwargs)
            self._driver.record(name, args, kwargs, result)
            return result

        return call

    def __setattr__(self, name: str, value) -> None:
        setattr(self._pm, name, value)

    def __repr__(self) -> str:
        return f"Recording({self._pm!r})"


def total_stats(per_rank: list[dict]) -> dict:
    """Every rank's stats added up: capacities, use and traffic per tier and per link, in blocks and bytes (blocks
    count each rank's share of a block once per rank); link rates over the slowest rank's time, as the ranks
    move their bytes in parallel."""
    total: dict = {"tiers": {}, "links": {}}
    for name in per_rank[0]["tiers"]:
        entry: dict = {}
        for key, value in per_rank[0]["tiers"][name].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "hit_rate":
                entry[key] = sum(s["tiers"][name][key] for s in per_rank)
        lookups = entry.get("hits", 0) + entry.get("misses", 0)
        entry["hit_rate"] = entry["hits"] / lookups if lookups else None
        total["tiers"][name] = entry
    for key in {k for s in per_rank for k in s["links"]}:
        links = [s["links"][key] for s in per_rank if key in s["links"]]
        seconds = max(link["seconds"] for link in links)
        nbytes = sum(link["bytes"] for link in links)
        total["links"][key] = {
            "blocks": sum(link["blocks"] for link in links),
            "bytes": nbytes,
            "batches": sum(link["batches"] for link in links),
            "seconds": seconds,
            "gbps": nbytes / seconds / 1e9 if seconds > 0 else None,
        }
    return total


# -- the other ranks: replay, run the same forward pass ------------------------------------------------------------


class Follower:
    """A rank other than 0: replays rank 0's page-manager calls on its own page manager and runs each step's
    forward pass over its own KV heads."""

    def __init__(self, engine, tp: TPContext) -> None:
        self.engine, self.pm, self.tp = engine, engine.pm, tp
        self.tables: list[list[int]] = []
        self.placed: dict = {}

    def _unpack(self, x):
        if isinstance(x, BlockIds):
            return [self.pm.blocks[i] for i in x]
        return x

    def replay(self, ops) -> None:
        for name, args, kwargs, expect in ops:
            args = tuple(self._unpack(a) for a in args)
            result = getattr(self.pm, name)(*args, **{k: self._unpack(v) for k, v in kwargs.items()})
            if name == "acquire":
                self.tables = result
            elif name == "pin_in_place":
                self.placed[args[0]] = result
            elif expect is not None and result != expect:
                raise TierKVError(
                    f"rank {self.tp.rank}: {name} gave {result!r} here but {expect!r} on rank 0 (a block read back from "
                    "this rank's NVMe tier failed its checksum there, or here); the ranks' caches no longer agree"
                )

    def serve(self) -> None:
        from tierkv.engine import EntryPlan

        try:
            while True:
                msg = broadcast_plan(self.tp)
                self.replay(msg["ops"])
                kind = msg["kind"]
                if kind == "step":
                    if tables_digest(self.tables) != msg["digest"]:
                        raise TierKVError(
                            f"rank {self.tp.rank}: block tables differ from rank 0's (a tierkv bug); stopping"
                        )
                    plans = [EntryPlan(*p) for p in msg["plans"]]
                    self.engine.run_forward(plans, self.tables, self.placed, msg["input_ids"])
                    self.placed = {}
                elif kind == "stats":
                    gather_objects(self.tp, self.pm.stats())
                elif kind == "close":
                    return
        finally:
            self.pm.close()


def serve_rank(cfg, device: torch.device, tp: TPContext) -> None:
    """Build this rank's model shard and tiers, then follow rank 0 until it closes."""
    from tierkv.engine import Engine
    from tierkv.llm import setup_rank

    loaded, pm = setup_rank(cfg, device, tp)
    engine = Engine(loaded, pm, None, cfg.staging_blocks, cfg.seed, prefetch=False)
    Follower(engine, tp).serve()


# -- starting the ranks ----------------------------------------------------------------------------------------------


def rank_device(device: torch.device, local_rank: int, local_world: int) -> torch.device:
    if device.type != "cuda":
        return device
    base = device.index or 0
    if _one_gpu():
        return torch.device("cuda", base)
    have = torch.cuda.device_count()
    if base + local_world > have:
        raise ConfigError(
            f"tensor parallelism over {local_world} GPUs from cuda:{base} needs cuda:{base}..cuda:{base + local_world - 1}, "
            f"but this host has {have}; lower tensor_parallel_size or device"
        )
    return torch.device("cuda", base + local_rank)


def _heartbeat(beats, rank: int) -> None:
    while True:
        beats[rank] = time.time()
        time.sleep(0.5)


def _worker_main(rank: int, world: int, init_method: str, cfg, device: torch.device, errors, beats) -> None:
    import threading

    # SAFE_ENV came with the environment start() exported before spawning (and init_group sets it again).
    threading.Thread(target=_heartbeat, args=(beats, rank), daemon=True, name="tierkv-heartbeat").start()
    try:
        if device.type == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        tp = init_group(rank, world, init_method, device, cfg.tp_timeout_s)
        serve_rank(cfg, device, tp)
        shutdown_group(tp)
    except BaseException as exc:  # noqa: BLE001 - reported to rank 0, then the process ends
        errors.put((rank, f"{type(exc).__name__}: {exc}"))
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)


def under_torchrun() -> bool:
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def start(cfg, device: torch.device) -> tuple[TPContext, torch.device, Workers]:
    """Start the ranks. Spawned here: one worker process per rank 1..N-1, and this process becomes rank 0.
    Under torchrun: this process is RANK; a rank other than 0 builds its shard, serves rank 0 until it closes
    and then exits the process (so code after `tierkv.LLM(...)` runs on rank 0 only)."""
    os.environ.update(SAFE_ENV)
    world = cfg.tensor_parallel_size
    if under_torchrun():
        env_world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
        if env_world != world:
            raise ConfigError(
                f"tensor_parallel_size={world} but torchrun started {env_world} processes; make them equal"
            )
        local = int(os.environ.get("LOCAL_RANK", rank))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        dev = rank_device(device, local, local_world)
        tp = init_group(rank, world, "env://", dev, cfg.tp_timeout_s)
        if rank != 0:
            try:
                serve_rank(cfg, dev, tp)
            finally:
                shutdown_group(tp)
            # Served and closed (its tiers closed, the group destroyed and its threads joined): end the process
            # here, so that the script's code after `tierkv.LLM(...)` runs on rank 0 only.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        return tp, dev, Workers()
    if dist.is_initialized():
        raise ConfigError(
            "a torch.distributed process group already exists in this process; tierkv starts its own for "
            "tensor_parallel_size > 1 (destroy the other first, or run under torchrun)"
        )
    devices = [rank_device(device, r, world) for r in range(world)]
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    beats = ctx.Array("d", [time.time()] * world, lock=False)
    init_method = f"tcp://127.0.0.1:{free_port()}"
    procs = [
        ctx.Process(
            target=_worker_main,
            args=(r, world, init_method, cfg, devices[r], errors, beats),
            name=f"tierkv-tp-rank{r}",
            daemon=True,
        )
        for r in range(1, world)
    ]
    workers = Workers(procs, errors, beats)
    for proc in procs:
        proc.start()
    try:
        tp = init_group(0, world, init_method, devices[0], cfg.tp_timeout_s)
    except Exception as exc:
        reason = workers.failure(wait_s=2.0) or f"the workers did not join within tp_timeout_s={cfg.tp_timeout_s:g} s"
        workers.kill()
        raise WorkerError(f"tensor parallelism could not start: {reason}") from exc
    return tp, devices[0], workers


def shutdown_group(tp: TPContext | None = None) -> None:
    """Destroy the process groups and drop `tp`'s references to them. The last reference going frees each
    group's backend here, which finishes its queued work and joins its threads (gloo's) while the interpreter is
    whole; a group left referenced keeps them running into the interpreter's teardown, where they can abort the
    process (see init_group). `tp` is shared by the model's layers, so clearing it is enough on our side."""
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - after a failed peer there may be nothing left to tear down cleanly
            pass
    if tp is not None:
        tp.group = tp.ctrl = None
    # A group kept alive by a reference cycle (LLM() froze its objects out of the collector's view until close())
    # would end its threads only at some later collection: collect now, so that they end here. Seen as a flaky
    # test_the_same_code_runs_under_torchrun (gloo_tcp_loop still running after close(), 1 run in 2 of the suite).
    gc.collect()

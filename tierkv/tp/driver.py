"""Rank 0 under tensor parallelism: the page manager's calls recorded and sent as step plans, stats gathered,
the workers watched and their failures named."""

from __future__ import annotations

import hashlib
import re
import time
from array import array
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from tierkv.errors import TierKVError, WorkerError
from tierkv.kv.block import Block
from tierkv.tp.group import TPContext, broadcast_plan, gather_objects, shutdown_group


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
        "grow_to",
        "fork",
        "unshare",
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

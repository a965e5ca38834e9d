"""`tierkv run` with a `cluster:` section: the records spread over replicas on Ray, the driver the output's writer.

Each replica is a Ray actor holding one `LLM` (tierkv.cluster.replica). The driver keeps one call in flight per
replica: it sends records (longest first, up to `records_in_flight` per replica), the replica runs them with
those it holds and answers as soon as some finish, and the driver writes their lines, tops the replica up and
calls again (`ray.wait` on whichever answers first). Exactly once: the driver alone appends to the output, through
the same locked, fsynced OutputFile as a single-process run, so a kill of the driver, of a replica or of a node
loses at most records in flight, and a rerun resumes from the output as after any other kill.

A replica that dies is restarted by Ray (up to `max_restarts`); the records it held run again, apart from other
work, to find one that crashes its replica (tierkv.cluster.dispatch); such a record is written as an error line.
An error raised inside a replica (a failed step: a full disk, say) stops the run, as in a single process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from tierkv.batch import PreparedRecord, RunSpec, prepare, still_to_run
from tierkv.batch_output import OutputFile, error_line
from tierkv.cluster.dispatch import Dispatcher
from tierkv.cluster.replica import Replica
from tierkv.errors import ConfigError, TierKVError
from tierkv.tp.driver import total_stats


@dataclass
class ReplicaState:
    index: int
    handle: object
    node: str = ""
    pids: list = field(default_factory=list)  # one per process it has run in (restarts add one)
    load_s: float = 0.0
    records: int = 0  # lines written from its answers
    deaths: int = 0
    tokens: int = 0  # its LLM's generated tokens at its last answer (0 in a new process)
    kv: dict = field(default_factory=dict)
    ready: bool = False  # answering (False from a death until Ray has restarted it)
    retired: bool = False  # died more than max_restarts times: Ray will not restart it


def import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("cluster: needs Ray, which is not installed here; pip install 'tierkv[ray]'") from None
    return ray


def work_order(prepared: list[PreparedRecord]) -> list[int]:
    """Indices of the records in the order they are handed out: by priority, then the most work first (prompt and
    max_tokens), so that the long ones do not start last and hold the run's end."""
    return sorted(
        range(len(prepared)),
        key=lambda i: (prepared[i].record.priority, -(len(prepared[i].token_ids) + prepared[i].params.max_tokens)),
    )


def connect(ray, spec: RunSpec) -> bool:
    """Join the cluster (or start a local Ray); True if this call started Ray (then the run shuts it down)."""
    cluster = spec.cluster
    if ray.is_initialized():  # the calling process joined a cluster itself: used as it is
        started = False
    elif cluster.address is None:
        ray.init(address="local", include_dashboard=False)
        started = True
    else:
        try:
            ray.init(address=cluster.address)
        except ConnectionError as exc:
            raise ConfigError(
                f"cluster.address {cluster.address!r}: cannot join that Ray cluster ({exc}); check the address, or "
                "leave it out for a local Ray"
            ) from None
        started = False
    if started:  # a local Ray has what it has: refuse what it can never place, rather than wait forever
        gpus = spec.cluster.gpus(spec.engine)
        have = ray.cluster_resources()
        for what, need in (("CPU", cluster.cpus_per_replica), ("GPU", gpus)):
            if need * cluster.replicas > have.get(what, 0):
                ray.shutdown()
                raise ConfigError(
                    f"cluster: {cluster.replicas} replicas need {need * cluster.replicas:g} {what}s, and the local Ray "
                    f"has {have.get(what, 0):g}; lower cluster.replicas (or cpus_per_replica), or give "
                    "cluster.address of a larger cluster"
                )
    return started


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:800]


def run(spec: RunSpec, *, fresh: bool = False, show: bool = False, progress: bool = True, echo=print) -> dict:
    """Run every record not yet in the output over the cluster's replicas; returns a summary, as batch.run does,
    with `replicas` (per replica: node, pids, records, deaths), `restarts` and `errors` (records given up)."""
    ray = import_ray()
    prepared = prepare(spec)
    out = OutputFile(spec.output)
    started = False
    replicas: list[ReplicaState] = []
    summary: dict = {}
    bar = None
    try:
        todo, summary = still_to_run(spec, prepared, out, fresh)
        if not todo:
            return summary
        cluster = spec.cluster
        started = connect(ray, spec)
        t0 = time.perf_counter()
        gpus = spec.cluster.gpus(spec.engine)
        actor = ray.remote(Replica).options(
            num_cpus=cluster.cpus_per_replica, num_gpus=gpus, max_restarts=cluster.max_restarts, max_task_retries=0
        )
        replicas = [
            ReplicaState(i, actor.remote(i, spec.model, spec.engine, cluster.cpus_per_replica))
            for i in range(cluster.replicas)
        ]
        for r in replicas:  # every replica loaded before anything is discarded (--fresh), as in one process
            while not r.ready:
                try:
                    _ready(r, ray.get(r.handle.info.remote()))
                except ray.exceptions.ActorUnavailableError:  # it died loading and Ray is restarting it
                    continue
                except ray.exceptions.RayError as exc:  # (an error raised building its LLM: its last line)
                    cause = str(exc).strip().splitlines()[-1]
                    raise TierKVError(f"replica {r.index} could not start: {cause}") from None
        summary["load_s"] = time.perf_counter() - t0
        if fresh:
            out.discard()
        if progress:
            from tqdm import tqdm

            bar = tqdm(
                total=len(spec.records), initial=summary["already_done"], desc="records", unit="rec", dynamic_ncols=True
            )
        t1 = time.perf_counter()
        generated, errors = _loop(ray, spec, todo, replicas, out, bar, show, echo)
        summary["wall_s"] = time.perf_counter() - t1
        summary["generated_tokens"] = generated
        summary["errors"] = errors
        summary["restarts"] = sum(min(r.deaths, cluster.max_restarts) for r in replicas)  # (each one Ray restarted)
        summary["replicas"] = [
            {"replica": r.index, "node": r.node, "pids": r.pids, "records": r.records, "deaths": r.deaths}
            for r in replicas
        ]
        summary["stats"] = _total_stats(ray, replicas)
        return summary
    finally:
        if bar is not None:
            bar.close()
        try:
            _stop(ray, replicas)
            if started:
                ray.shutdown()
        finally:
            out.close(remove_if_empty="load_s" not in summary)


def _ready(r: ReplicaState, info: dict) -> None:
    r.node, r.load_s, r.tokens, r.kv, r.ready = info["node"], info["load_s"], 0, {}, True
    if not r.pids or r.pids[-1] != info["pid"]:
        r.pids.append(info["pid"])


def _loop(ray, spec, todo, replicas, out, bar, show, echo) -> tuple[int, int]:
    """Hand the records out and write what comes back until every one is written; (tokens generated, errors)."""
    disp = Dispatcher(work_order(todo), spec.cluster.records_in_flight, len(replicas))
    calls: dict = {}  # in flight, one per replica: ObjectRef -> (replica, "info" or "work")
    idle: set[int] = set()  # replicas alive with nothing to do (until a death puts records back)
    generated = errors = 0
    t0 = time.perf_counter()

    def send(r: ReplicaState) -> None:
        batch = disp.take(r.index)
        if batch or disp.holds(r.index):
            calls[r.handle.work.remote([(k, todo[k]) for k in batch])] = (r, "work")
            idle.discard(r.index)
        else:
            idle.add(r.index)

    for r in replicas:
        send(r)
    while not disp.done:
        if not calls:
            raise TierKVError(
                f"every replica died more than cluster.max_restarts ({spec.cluster.max_restarts}) times; the records "
                f"finished so far are in {spec.output}; fix the cause and run again to finish the rest"
            )
        (ref,), _ = ray.wait(list(calls), num_returns=1)
        r, kind = calls.pop(ref)
        try:
            answer = ray.get(ref)
        except ray.exceptions.RayActorError as exc:  # its process died (or Ray lost touch with it)
            if kind == "info":  # (asked while Ray restarts it: "unavailable" until it is back, "died" for good)
                if isinstance(exc, ray.exceptions.ActorDiedError):
                    r.retired = True
                else:
                    calls[r.handle.info.remote()] = (r, "info")
                continue
            r.deaths += 1
            r.kv, r.ready = {}, False
            for k in disp.died(r.index):
                p = todo[k]
                why = f"the replica running this record died twice with it, the last time with no other record: {_why(exc)}"
                out.write(error_line(p.record.id, len(p.token_ids), p.fingerprint, why))
                errors += 1
                if bar is not None:
                    bar.update(1)
            if r.deaths > spec.cluster.max_restarts:
                r.retired = True
            else:
                calls[r.handle.info.remote()] = (r, "info")  # answers once Ray has restarted it
            for q in replicas:  # the records it held wait for a replica that is free
                if q.index in idle:
                    send(q)
            continue
        except ray.exceptions.RayTaskError as exc:  # an error inside the replica: stops the run, as in one process
            cause = exc.cause if isinstance(exc.cause, BaseException) else exc
            if isinstance(cause, TierKVError):
                raise type(cause)(f"replica {r.index} ({r.node}): {cause}") from None
            raise cause from None
        if kind == "info":
            _ready(r, answer)
        else:
            lines = dict(answer["lines"])
            for k in disp.finished(r.index, list(lines)):
                out.write(lines[k])
                r.records += 1
                if show:
                    echo(f"--- {lines[k]['id']}: {lines[k]['text']!r} ({lines[k]['outputs'][0]['finish_reason']})")
                if bar is not None:
                    bar.update(1)
            generated += answer["generated_tokens"] - r.tokens
            r.tokens, r.kv = answer["generated_tokens"], answer["kv"]
        send(r)
        if bar is not None:
            bar.set_postfix_str(_postfix(replicas, generated / max(1e-9, time.perf_counter() - t0)), refresh=False)
    return generated, errors


def _postfix(replicas: list[ReplicaState], rate: float) -> str:
    tiers: dict[str, int] = {}
    for r in replicas:
        for k, v in r.kv.items():
            tiers[k] = tiers.get(k, 0) + v
    used = sum(tiers.values()) or 1
    share = " ".join(f"{k} {100 * v / used:.0f}%" for k, v in tiers.items())
    alive = sum(not r.retired for r in replicas)
    deaths = sum(r.deaths for r in replicas)
    return f"{rate:.0f} tok/s, KV {share}, {alive} replicas" + (f", {deaths} died" if deaths else "")


def _total_stats(ray, replicas: list[ReplicaState]) -> dict:
    """The stats of the replicas answering now, added up (tiers, links, engine counters); those of a replica's
    earlier processes died with them."""
    per_replica = []
    for r in replicas:
        if r.ready and not r.retired:
            try:
                per_replica.append(ray.get(r.handle.stats.remote(), timeout=60))
            except ray.exceptions.RayError:
                r.ready = False
    if not per_replica:
        return {"tiers": {}, "links": {}, "engine": {"steps": 0, "preemptions": 0}}
    total = total_stats(per_replica)
    total["engine"] = {
        k: sum(s["engine"][k] or 0 for s in per_replica)
        for k, v in per_replica[0]["engine"].items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    return total


def _stop(ray, replicas: list[ReplicaState]) -> None:
    """Close the LLM of every replica answering (cached prefixes written down to its NVMe tier), then end every
    replica's process."""
    try:
        ray.get([r.handle.close.remote() for r in replicas if r.ready and not r.retired], timeout=120)
    except ray.exceptions.RayError:  # (one that cannot close now loses nothing the output needs)
        pass
    for r in replicas:
        ray.kill(r.handle, no_restart=True)

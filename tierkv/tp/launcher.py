"""Starting the ranks: worker processes spawned by rank 0, or every rank under torchrun."""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tierkv.errors import ConfigError, WorkerError
from tierkv.tp.driver import Workers
from tierkv.tp.follower import serve_rank
from tierkv.tp.group import SAFE_ENV, TPContext, free_port, init_group, rank_device, shutdown_group


def _heartbeat(beats, rank: int) -> None:
    while True:
        beats[rank] = time.time()
        time.sleep(0.5)


def _worker_main(rank: int, world: int, init_method: str, cfg, device: torch.device, errors, beats) -> None:
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

"""One replica of a cluster run: a Ray actor (the driver wraps this class with ray.remote) holding one `LLM`.

The driver sends records with `work`; the replica runs them beside those it already holds (continuous batching)
and answers as soon as any finish, with their result lines and its figures. It writes nothing: the driver is the
output's only writer. This module imports no Ray.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time

import torch

from tierkv.batch import PreparedRecord, result_line
from tierkv.errors import StoreError
from tierkv.llm import LLM
from tierkv.tp.group import SAFE_ENV

LOCK_WAIT_S = 60.0  # how long a new replica waits for its nvme_dir, held by the replica it replaces


class Replica:
    def __init__(self, index: int, model: str, engine: dict, cpus: float) -> None:
        """Replica `index` of a run: `LLM(model, **engine)`, its NVMe tier (if any) in nvme_dir/replica-<index>;
        on the CPU, it computes with as many threads as the `cpus` Ray gives it (more would fight the others)."""
        os.environ.update(SAFE_ENV)  # (NVLink multicast off in every process: tierkv/tp/group.py says why)
        engine = dict(engine)
        if engine.get("device") == "cpu":
            torch.set_num_threads(max(1, int(cpus)))
        if engine.get("nvme_dir"):
            engine["nvme_dir"] = os.path.join(engine["nvme_dir"], f"replica-{index}")
            _wait_for_lock(engine["nvme_dir"])
        t0 = time.perf_counter()
        self.llm = LLM(model, **engine)
        self.load_s = time.perf_counter() - t0
        self.held: dict[str, PreparedRecord] = {}

    def info(self) -> dict:
        """Where it runs and how long its model took to load. Drops whatever it holds: the driver asks after it
        lost touch with this replica (a call that failed), and has handed those records out again."""
        if self.held:
            self.llm.abort(list(self.held))
            self.held.clear()
        return {"pid": os.getpid(), "node": socket.gethostname(), "load_s": self.load_s}

    def work(self, records: list[tuple[int, PreparedRecord]]) -> dict:
        """Queue `records` (key, record) beside those it holds, then step until some finish (or none is left).
        Returns {"lines": [(key, result line)], "generated_tokens": so far, "kv": live blocks per tier}."""
        if records:
            self.llm.add_requests(
                [p.token_ids for _, p in records],
                [p.params for _, p in records],
                request_ids=[str(key) for key, _ in records],
                priority=[p.record.priority for _, p in records],
            )
            self.held.update((str(key), p) for key, p in records)
        lines = []
        while not lines and self.llm.has_unfinished():
            for output in self.llm.step():
                lines.append((int(output.request_id), result_line(self.held.pop(output.request_id), output)))
        return {
            "lines": lines,
            "generated_tokens": self.llm.engine.counters.generated_tokens,
            "kv": self.llm.kv_blocks_by_tier(),
        }

    def stats(self) -> dict:
        return self.llm.stats()

    def close(self) -> None:
        self.llm.close()


def _wait_for_lock(nvme_dir: str) -> None:
    """Wait (up to LOCK_WAIT_S) until no process holds nvme_dir's LOCK: a replica that replaces one whose driver
    was killed may start before Ray has ended the old one."""
    path = os.path.join(nvme_dir, "LOCK")
    deadline = time.monotonic() + LOCK_WAIT_S
    while os.path.exists(path):
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise StoreError(
                    f"nvme_dir {nvme_dir!r} is still in use by another process after {LOCK_WAIT_S:.0f} s; stop it "
                    "(an earlier run's replica?) or give this run another engine.nvme_dir"
                ) from None
            time.sleep(0.2)
        finally:
            os.close(fd)

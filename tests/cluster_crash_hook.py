"""Test-only (tests/test_cluster.py): a Ray worker setup hook that makes a replica's process die, as a crash in
native code would, when it is sent the record whose prompt is CRASH_PROMPT. Product code knows nothing of it."""

import os

CRASH_PROMPT = "this record crashes its replica"


def setup() -> None:
    from tierkv.cluster import replica

    work = replica.Replica.work

    def crashing(self, records):
        if any(p.record.prompt == CRASH_PROMPT for _, p in records):
            os._exit(3)
        return work(self, records)

    replica.Replica.work = crashing

"""Which records of a cluster run wait, which replica holds which, and what a replica's death says about them.

Plain bookkeeping (no Ray): the driver asks `take(replica)` for the records to send to a replica that is free,
reports what came back with `finished`, and a replica's death with `died`. Records are handed out in the order
given (the driver gives them longest first), up to `records_in_flight` per replica, and no more at once than a
replica's share of those waiting (so that a short run, or a run's end, is spread over every replica).

A replica that dies takes no record down with it: its records are run again, but apart from everything else, so
that a record that kills its replica can be found. They go back as a probe: a group that an empty replica runs on
its own (it gets nothing else until the group is done). A probe that dies is split in two, and so on down to a
record alone; a record that dies alone, having died before (in a group, or alone), has now made two replicas
die and is given up as failed. A replica killed from outside (its node lost, kill -9) costs two probes that run
through; a record that crashes every replica it is on costs about log2(records_in_flight) + 1 deaths.
"""

from __future__ import annotations

from collections import Counter, deque


class Dispatcher:
    """The records of one run (by key, in hand-out order) across `replicas` replicas (by index)."""

    def __init__(self, keys: list, records_in_flight: int, replicas: int) -> None:
        self.order = {key: i for i, key in enumerate(keys)}
        self.waiting = deque(keys)
        self.probes: deque[list] = deque()  # groups a replica died holding, each to run alone on one replica
        self.held: dict[int, set] = {}
        self.probing: set[int] = set()  # replicas running a probe (given nothing else until it is done)
        self.deaths: Counter = Counter()  # per record: deaths of the replicas it was on
        self.left = set(keys)  # neither finished nor failed
        self.records_in_flight = records_in_flight
        self.replicas = replicas

    @property
    def done(self) -> bool:
        return not self.left

    def holds(self, replica: int) -> int:
        return len(self.held.get(replica, ()))

    def take(self, replica: int) -> list:
        """The records to send `replica` now (it is alive and answering): a probe if it holds nothing and one
        waits, else more records up to records_in_flight. Empty if it should get nothing."""
        held = self.held.setdefault(replica, set())
        if replica in self.probing:
            return []
        if not held and self.probes:
            group = self.probes.popleft()
            self.probing.add(replica)
            held.update(group)
            return group
        share = -(-len(self.waiting) // self.replicas)
        batch = [self.waiting.popleft() for _ in range(min(share, self.records_in_flight - len(held)))]
        held.update(batch)
        return batch

    def finished(self, replica: int, keys) -> list:
        """`replica` answered these records; returns those to write: the ones it held (a key it no longer holds,
        handed to another after a lost call, is not written twice)."""
        held = self.held.get(replica, set())
        accepted = [key for key in keys if key in held]
        held.difference_update(accepted)
        self.left.difference_update(accepted)
        if not held:
            self.probing.discard(replica)
        return accepted

    def died(self, replica: int) -> list:
        """`replica` died (or was restarted): what it held runs again as probes. Returns the records given up now:
        those that were alone on it and had died before."""
        group = sorted(self.held.pop(replica, set()), key=self.order.__getitem__)
        self.probing.discard(replica)
        for key in group:
            self.deaths[key] += 1
        if len(group) == 1 and self.deaths[group[0]] >= 2:
            self.left.discard(group[0])
            return group
        if len(group) == 1:
            self.probes.appendleft(group)
        elif group:
            half = len(group) // 2
            self.probes.extendleft([group[half:], group[:half]])  # (appendleft reverses: first half goes first)
        return []

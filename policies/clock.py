"""CLOCK (second chance) eviction."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator

from tierkv.policies.base import EvictionPolicy


class ClockPolicy(EvictionPolicy):
    """Second chance: keys sit on a ring with a reference bit; a hand sweeps the ring.

    - `insert` puts the key just behind the hand (it is examined last) with its bit clear.
    - `touch` sets the key's bit.
    - `pop_victims` sweeps from the hand: a key that is not evictable is passed over with its bit unchanged;
      an evictable key with its bit set has it cleared and is passed over (its second chance); an evictable key
      with its bit clear is the victim, leaves the ring, and the hand stays on the key that followed it.
      The sweep stops when it has `n` victims or a full turn of the ring changed nothing.
    """

    name = "clock"

    def __init__(self) -> None:
        self._ring: list[Hashable] = []
        self._ref: dict[Hashable, bool] = {}
        self._hand = 0

    def insert(self, key: Hashable) -> None:
        if key in self._ref:
            raise KeyError(f"CLOCK: key {key!r} is already tracked")
        # Behind the hand = at the hand's index, pushing the hand's key one place on.
        self._ring.insert(self._hand, key)
        self._hand = (self._hand + 1) % len(self._ring)
        self._ref[key] = False

    def touch(self, key: Hashable) -> None:
        if key not in self._ref:
            raise KeyError(key)
        self._ref[key] = True

    def remove(self, key: Hashable) -> None:
        del self._ref[key]
        idx = self._ring.index(key)
        del self._ring[idx]
        if idx < self._hand:
            self._hand -= 1
        if self._hand >= len(self._ring):
            self._hand = 0

    def pop_victims(self, n: int, evictable: Callable[[Hashable], bool]) -> list[Hashable]:
        victims: list[Hashable] = []
        idle = 0  # keys passed over since the last bit was cleared or victim taken
        while len(victims) < n and self._ring and idle < len(self._ring):
            key = self._ring[self._hand]
            if not evictable(key):
                self._advance()
                idle += 1
            elif self._ref[key]:
                self._ref[key] = False
                self._advance()
                idle = 0
            else:
                victims.append(key)
                del self._ref[key]
                del self._ring[self._hand]
                if self._hand >= len(self._ring):
                    self._hand = 0
                idle = 0
        return victims

    def restore(self, keys: list[Hashable]) -> None:
        """At the hand, bits clear: the next sweep examines them first."""
        for key in reversed(keys):
            if key in self._ref:
                raise KeyError(f"CLOCK: key {key!r} is already tracked")
            self._ring.insert(self._hand, key)
            self._ref[key] = False

    def _advance(self) -> None:
        self._hand = (self._hand + 1) % len(self._ring)

    def referenced(self, key: Hashable) -> bool:
        """The key's reference bit (for tests and debugging)."""
        return self._ref[key]

    def __contains__(self, key: object) -> bool:
        return key in self._ref

    def __len__(self) -> int:
        return len(self._ring)

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._ring[self._hand :] + self._ring[: self._hand])

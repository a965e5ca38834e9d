"""Least recently used eviction."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Iterator

from tierkv.policies.base import EvictionPolicy


class LRUPolicy(EvictionPolicy):
    """Evict the key whose last insert or touch is oldest. Non-evictable keys are skipped and keep their place."""

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[Hashable, None] = OrderedDict()  # first = least recently used

    def insert(self, key: Hashable) -> None:
        if key in self._order:
            raise KeyError(f"LRU: key {key!r} is already tracked")
        self._order[key] = None

    def touch(self, key: Hashable) -> None:
        self._order.move_to_end(key)

    def touch_many(self, keys: Iterable[Hashable]) -> None:
        move = self._order.move_to_end
        for key in keys:
            move(key)

    def remove(self, key: Hashable) -> None:
        del self._order[key]

    def pop_victims(self, n: int, evictable: Callable[[Hashable], bool]) -> list[Hashable]:
        victims = []
        for key in self._order:
            if len(victims) == n:
                break
            if evictable(key):
                victims.append(key)
        for key in victims:
            del self._order[key]
        return victims

    def restore(self, keys: list[Hashable]) -> None:
        for key in reversed(keys):
            self._order[key] = None
            self._order.move_to_end(key, last=False)

    def __contains__(self, key: object) -> bool:
        return key in self._order

    def __len__(self) -> int:
        return len(self._order)

    def __iter__(self) -> Iterator[Hashable]:
        return iter(list(self._order))

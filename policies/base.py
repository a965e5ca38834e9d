"""The interface every eviction policy implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Iterable, Iterator


class EvictionPolicy(ABC):
    """Orders the blocks resident in one tier for eviction.

    The page manager calls `insert` when a block arrives in the tier, `touch` on every access, `remove` when a
    block leaves for any reason other than being chosen as a victim, and `pop_victims` when it needs room.
    Keys are opaque hashables; the policy never learns what a block holds.
    """

    name: str = "base"

    @abstractmethod
    def insert(self, key: Hashable) -> None:
        """Start tracking `key` (a block that just became resident). Inserting a tracked key is an error."""

    @abstractmethod
    def touch(self, key: Hashable) -> None:
        """Record an access to a tracked `key`."""

    def touch_many(self, keys: Iterable[Hashable]) -> None:
        """Record accesses to tracked `keys`, in order (one call per step for all of its blocks)."""
        for key in keys:
            self.touch(key)

    @abstractmethod
    def remove(self, key: Hashable) -> None:
        """Stop tracking `key` (the block was freed or moved out by the page manager itself)."""

    @abstractmethod
    def pop_victims(self, n: int, evictable: Callable[[Hashable], bool]) -> list[Hashable]:
        """Choose up to `n` keys to evict, in eviction order, skipping keys for which `evictable` is false.

        The chosen keys stop being tracked. Fewer than `n` come back when fewer are evictable.
        """

    @abstractmethod
    def restore(self, keys: list[Hashable]) -> None:
        """Put back victims the caller could not evict after all: tracked again, first in line next time."""

    @abstractmethod
    def __contains__(self, key: object) -> bool: ...

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __iter__(self) -> Iterator[Hashable]:
        """Tracked keys in the order the policy would consider them for eviction now (first = next victim)."""

"""Eviction policies by name, as the engine's `eviction` option spells them."""

from __future__ import annotations

from tierkv.policies.base import EvictionPolicy
from tierkv.policies.clock import ClockPolicy
from tierkv.policies.lru import LRUPolicy

EVICTION_POLICIES: dict[str, type[EvictionPolicy]] = {"lru": LRUPolicy, "clock": ClockPolicy}


def make_eviction_policy(name: str) -> EvictionPolicy:
    """A fresh eviction policy by name ("lru" or "clock")."""
    try:
        return EVICTION_POLICIES[name]()
    except KeyError:
        known = ", ".join(sorted(EVICTION_POLICIES))
        raise ValueError(f"unknown eviction policy {name!r}; choose one of: {known}") from None

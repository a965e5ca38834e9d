"""Eviction and prefetch policies for tierkv's page manager.

Pure Python, no torch: a policy sees block keys (any hashable) and never touches tensors. The page manager
keeps one eviction policy instance per tier, tells it of every insert, access and removal, and asks it for
victims when the tier is full.
"""

from tierkv.policies.base import EvictionPolicy
from tierkv.policies.clock import ClockPolicy
from tierkv.policies.lru import LRUPolicy
from tierkv.policies.prefetch import NextScheduledPrefetch, PrefetchPolicy

EVICTION_POLICIES: dict[str, type[EvictionPolicy]] = {"lru": LRUPolicy, "clock": ClockPolicy}


def make_eviction_policy(name: str) -> EvictionPolicy:
    """A fresh eviction policy by name ("lru" or "clock")."""
    try:
        return EVICTION_POLICIES[name]()
    except KeyError:
        known = ", ".join(sorted(EVICTION_POLICIES))
        raise ValueError(f"unknown eviction policy {name!r}; choose one of: {known}") from None


__all__ = [
    "EvictionPolicy",
    "LRUPolicy",
    "ClockPolicy",
    "PrefetchPolicy",
    "NextScheduledPrefetch",
    "EVICTION_POLICIES",
    "make_eviction_policy",
]

"""LRU and CLOCK on hand-worked traces, and the prefetch policy's plan."""

import pytest

from tierkv.policies.clock import ClockPolicy
from tierkv.policies.lru import LRUPolicy
from tierkv.policies.prefetch import NextScheduledPrefetch
from tierkv.policies.registry import make_eviction_policy


def everything(_key):
    return True


def test_lru_evicts_least_recently_used_first():
    p = LRUPolicy()
    for k in "abcd":
        p.insert(k)
    p.touch("b")  # order now a c d b
    assert p.pop_victims(2, everything) == ["a", "c"]
    assert list(p) == ["d", "b"]
    p.insert("e")  # d b e
    p.touch("d")  # b e d
    assert p.pop_victims(1, lambda k: k != "b") == ["e"]  # b is pinned: skipped, keeps its place
    assert list(p) == ["b", "d"]
    assert p.pop_victims(5, everything) == ["b", "d"]
    assert len(p) == 0


def test_lru_remove_and_errors():
    p = LRUPolicy()
    p.insert(1)
    p.insert(2)
    p.remove(1)
    assert 1 not in p and 2 in p
    with pytest.raises(KeyError):
        p.insert(2)
    assert p.pop_victims(1, lambda k: False) == []


def test_clock_second_chance_trace():
    p = ClockPolicy()
    for k in "abcd":
        p.insert(k)
    assert list(p) == ["a", "b", "c", "d"]  # new keys go behind the hand: oldest examined first
    p.touch("a")
    p.touch("c")
    # a: bit set -> cleared, passed over; b: bit clear -> victim. The hand stays on c.
    assert p.pop_victims(1, everything) == ["b"]
    assert list(p) == ["c", "d", "a"]
    assert not p.referenced("a") and p.referenced("c")
    # c: bit set -> cleared; d: clear -> victim. The hand wraps to a.
    assert p.pop_victims(1, everything) == ["d"]
    assert list(p) == ["a", "c"]
    p.insert("e")  # behind the hand: examined last
    assert list(p) == ["a", "c", "e"]
    p.touch("e")
    # a is pinned: passed over with its bit untouched; c (cleared before) is the victim; e gets its second
    # chance (bit cleared), a is passed over again, then e is the victim.
    assert p.pop_victims(2, lambda k: k != "a") == ["c", "e"]
    assert list(p) == ["a"]


def test_clock_stops_after_a_full_turn_without_change():
    p = ClockPolicy()
    for k in range(5):
        p.insert(k)
        p.touch(k)
    assert p.pop_victims(3, lambda k: False) == []
    assert all(p.referenced(k) for k in range(5))  # non-evictable keys keep their bits
    # All bits set: the first turn clears them, the second takes victims in ring order.
    assert p.pop_victims(2, everything) == [0, 1]


def test_clock_remove_keeps_hand_consistent():
    p = ClockPolicy()
    for k in "abcde":
        p.insert(k)
    assert p.pop_victims(1, everything) == ["a"]  # hand on b
    p.remove("e")  # behind the hand
    p.remove("b")  # at the hand: the hand moves on to c
    assert list(p) == ["c", "d"]
    assert p.pop_victims(2, everything) == ["c", "d"]


def test_make_eviction_policy_names():
    assert isinstance(make_eviction_policy("lru"), LRUPolicy)
    assert isinstance(make_eviction_policy("clock"), ClockPolicy)
    with pytest.raises(ValueError, match="unknown eviction policy 'fifo'"):
        make_eviction_policy("fifo")


def test_next_scheduled_prefetch_plans_in_schedule_order_within_budget():
    p = NextScheduledPrefetch()
    resident = {"a1", "b2"}
    upcoming = [["a1", "a2", "a3"], ["b1", "b2"], ["c1"]]
    assert p.plan(upcoming, resident.__contains__, 10) == ["a2", "a3", "b1", "c1"]
    # The budget cuts the second sequence short and the plan stops there.
    assert p.plan(upcoming, resident.__contains__, 3) == ["a2", "a3", "b1"]
    # A block shared by two sequences is planned once.
    assert p.plan([["x", "y"], ["y", "z"]], lambda k: False, 10) == ["x", "y", "z"]


def test_policies_import_neither_torch_nor_the_engine():
    import ast
    import pathlib

    import tierkv.policies

    imported = set()
    (folder,) = tierkv.policies.__path__
    for path in pathlib.Path(folder).glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                imported.add(node.module or "")
    assert not any(name.split(".")[0] in ("torch", "numpy", "triton") for name in imported), imported
    assert all(name.startswith("tierkv.policies") for name in imported if name.startswith("tierkv")), imported


def test_restore_puts_victims_back_first_in_line():
    lru = LRUPolicy()
    for k in "abcd":
        lru.insert(k)
    got = lru.pop_victims(2, everything)
    assert got == ["a", "b"]
    lru.restore(got)
    assert list(lru) == ["a", "b", "c", "d"]
    clock = ClockPolicy()
    for k in "abcd":
        clock.insert(k)
    clock.touch("c")
    got = clock.pop_victims(2, everything)
    assert got == ["a", "b"]
    clock.restore(got)
    assert list(clock)[:2] == ["a", "b"] and clock.pop_victims(1, everything) == ["a"]

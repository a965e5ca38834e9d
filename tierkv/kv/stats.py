"""Per-tier counters and link traffic, as a dict and as a printable table. Stats report what happened."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from tierkv.kv.block import CPU, TIER_NAMES
from tierkv.kv.tiers import NvmeTier
from tierkv.sizes import format_nbytes

if TYPE_CHECKING:
    from tierkv.kv.manager import PageManager


@dataclass
class TierCounters:
    """Events counted by the page manager for one tier."""

    hits: int = 0  # lookups of a block for a step that found it in this tier
    misses: int = 0  # lookups that passed through this tier without finding the block
    evictions_in: int = 0  # blocks demoted into this tier (eviction or swap-out)
    evictions_out: int = 0  # blocks demoted out of this tier
    blocks_in: int = 0  # blocks whose bytes were copied into this tier (any reason)
    blocks_out: int = 0  # blocks whose bytes were copied out of this tier
    prefetched: int = 0  # blocks brought here by prefetch (GPU tier)
    onto_copies: int = 0  # of evictions_in: blocks demoted onto the copy kept since their promotion (no bytes moved)


def count_lookups(counters: dict[int, TierCounters], kinds: list[int], found: dict[int, int]) -> None:
    """Hits and misses of lookups that found `found[tier]` blocks in each tier: a hit where the block was, a miss in
    every faster tier."""
    total = sum(found.values())
    deeper = total - found.get(kinds[0], 0)
    counters[kinds[0]].hits += found.get(kinds[0], 0)
    counters[kinds[0]].misses += deeper
    for k in kinds[1:]:
        deeper -= found.get(k, 0)
        counters[k].hits += found.get(k, 0)
        counters[k].misses += deeper


def build_stats(pm: PageManager) -> dict:
    """The page manager's stats as a JSON-able dict: {"tiers": {...}, "links": {...}, ...}."""
    block_nbytes = pm.layout.block_nbytes
    links = {}
    for (src, dst), link in sorted(pm.mover.links.items()):
        links[f"{src}->{dst}"] = {
            "blocks": link.blocks,
            "bytes": link.nbytes,
            "batches": link.batches,
            "copy_engine_batches": link.engine_batches,
            "seconds": link.seconds,
            "gbps": link.nbytes / link.seconds / 1e9 if link.seconds > 0 else None,
        }
    tiers = {}
    for kind in pm.kinds:
        name = TIER_NAMES[kind]
        tier = pm.tiers[kind]
        c = pm.counters[kind]
        lookups = c.hits + c.misses
        inbound = [v for k, v in links.items() if k.endswith(f"->{name}")]
        outbound = [v for k, v in links.items() if k.startswith(f"{name}->")]
        entry = {
            "capacity_blocks": tier.num_blocks,
            "capacity_bytes": tier.num_blocks * tier.layout.block_nbytes,
            "used_blocks": pm.resident(kind),
            "pinned_blocks": sum(1 for b in pm.blocks.values() if b.tier == kind and b.pins),
            **asdict(c),
            "hit_rate": c.hits / lookups if lookups else None,
            "bytes_in": sum(v["bytes"] for v in inbound),
            "bytes_out": sum(v["bytes"] for v in outbound),
            "seconds_in": sum(v["seconds"] for v in inbound),
            "seconds_out": sum(v["seconds"] for v in outbound),
        }
        entry["cached_blocks"] = pm.cached[kind]
        if kind == CPU:
            entry["host_copies"] = pm.host_copies  # CPU copies of GPU blocks, kept from their promotion (spares)
        if isinstance(tier, NvmeTier):
            entry["backend"] = tier.store.backend_name
            entry["write_through_copies"] = pm.copies
        tiers[name] = entry
    return {
        "block_nbytes": block_nbytes,
        "block_size": pm.layout.block_size,
        "step": pm.step,
        "live_blocks": len(pm.blocks),
        "sequences": len(pm.sequences),
        "peak_live_blocks": pm.ledger.peak_live_blocks,
        "forks": pm.ledger.forks,
        "cow_copies": pm.placement.cow_copies,
        "dropped_cached_blocks": pm.placement.dropped_cached,  # cached blocks that found no room in any tier
        "superseded_cached_blocks": pm.placement.superseded,  # cached blocks whose key moved to a faster new copy
        "tiers": tiers,
        "links": links,
    }


def format_stats(stats: dict) -> str:
    """A fixed-width table of per-tier figures, then one line per link."""
    cols = [
        ("tier", 5),
        ("used/cap", 13),
        ("hits", 8),
        ("misses", 8),
        ("hit%", 6),
        ("evict in", 9),
        ("evict out", 9),
        ("in", 11),
        ("out", 11),
        ("move s", 8),
    ]
    lines = ["  ".join(f"{name:>{w}}" for name, w in cols)]
    for name, t in stats["tiers"].items():
        hit = f"{100 * t['hit_rate']:.0f}" if t["hit_rate"] is not None else "-"
        row = [
            name,
            f"{t['used_blocks']}/{t['capacity_blocks']}",
            t["hits"],
            t["misses"],
            hit,
            t["evictions_in"],
            t["evictions_out"],
            format_nbytes(t["bytes_in"]),
            format_nbytes(t["bytes_out"]),
            f"{t['seconds_in'] + t['seconds_out']:.3f}",
        ]
        lines.append("  ".join(f"{str(v):>{w}}" for v, (_, w) in zip(row, cols)))
    for key, link in stats["links"].items():
        rate = f"{link['gbps']:.2f} GB/s" if link["gbps"] else "-"
        lines.append(
            f"  link {key:<10} {link['blocks']:>8} blocks  {format_nbytes(link['bytes']):>11}  "
            f"{link['batches']:>6} batches  {link['seconds']:.3f} s  {rate}"
        )
    for t in stats["tiers"].values():
        if "backend" in t:
            lines.append(f"  nvme backend: {t['backend']}")
    return "\n".join(lines)

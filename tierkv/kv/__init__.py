"""The KV side: which block lives in which tier, and the moves between tiers.

Records and bookkeeping, plain Python (no torch): `block` (a block, a spare copy, a block table, the tier kinds),
`slots` (a tier's free slots), `transfer` (a move as data), `ledger` (every block and table: reference counts, pins,
residence order per tier), `prefix_index` (content key -> block), `spares` (host and write-through copies),
`step_plan` (what one acquire asks for), `placement` (make room, demote, promote, copy-on-write, write-through: the
decisions, each byte move handed to the mover as a `Transfer`; loads from disk are waited for there, to check their
checksums). `manager` joins them behind the `PageManager` API. Storage (torch): `tiers` (the block pools),
`nvme_store` and `nvme_io` (the NVMe tier's files and I/O backends), `mover` (runs transfers on side streams and an
I/O thread), `storage` (opens the tiers and the mover from a config). Around the manager: `repair` (the bookkeeping
put right after a failed step), `prefix_cache` (content keys, the load-or-recompute choice), `prefix_reuse` (a
request's cached prefix found and attached), `stats` (what happened, per tier and link).
"""

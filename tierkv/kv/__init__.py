"""The KV side: which block lives in which tier, and the moves between tiers.

Bookkeeping (no torch): `block` (a block, a sequence's table), `ledger` (every block and table: reference counts,
pins, residence order per tier), `prefix_index` (content key -> block), `spares` (host and write-through copies),
`slots` (free slots per tier), `transfer` (a move as data), `step_plan` (checking what a step asks for), `placement`
(make room, demote, promote, copy-on-write: decisions that it hands out as transfers). `manager` joins them behind
the `PageManager` API. Storage and I/O (torch): `tiers` (the block pools), `nvme_store` and `nvme_io` (the NVMe
tier's files), `mover` (runs transfers on streams and an I/O thread). `repair` puts the bookkeeping right after a
failed step; `prefix_reuse` finds a request's cached prefix; `stats` reports what happened.
"""

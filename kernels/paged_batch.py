"""`PagedBatch`, the description of one paged-attention call that every attention module reads, and `_pow2`, which
rounds their launches' tile dimensions up to a power of two.

One layer's cache is two views `k_cache`, `v_cache` of shape (num_slots, block_size, num_kv_heads, head_dim)
(strided: tierkv keeps every layer of a block together). A batch is described by `PagedBatch`: per entry, the
query rows it owns in the flattened `q` (shape (T, num_heads, head_dim)), the absolute position of its first
query token, its context length after this step, and its block table: the slots of its logical blocks
`first_block, first_block + 1, ...` (blocks before `first_block` are not in the table: the caller streams them
and merges their partial results with `partial_merge.merge_partials`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PagedBatch:
    """Per-entry description of one attention call (all int tensors on the device of `q`, except where noted).

    q_starts: (B + 1,) int32, entry i owns rows q_starts[i]:q_starts[i+1] of q.
    q_pos0: (B,) int32, absolute position of each entry's first query row.
    context_lens: (B,) int32, keys [0, context_len) exist once this step's keys are written.
    first_block: (B,) int32, logical index of block_tables[i, 0].
    block_tables: (B, max_blocks) int32 slots, padded with 0.
    max_q: the largest number of query rows of an entry (host int).
    max_context: the largest context length (host int; sizes the decode kernel's grid without a device sync).
    q_starts_host: optional, q_starts as a host list (the prefill kernel's tiles are then built without a sync;
    they are built once per batch and reused by every layer).
    """

    q_starts: torch.Tensor
    q_pos0: torch.Tensor
    context_lens: torch.Tensor
    first_block: torch.Tensor
    block_tables: torch.Tensor
    max_q: int
    max_context: int
    q_starts_host: list[int] | None = None  # q_starts as a host list, where the caller has it (saves a device sync)
    _tiles: dict = field(
        default_factory=dict, repr=False, compare=False
    )  # prefill tiles per (tile height, first entry), on device: see paged_prefill._prefill_tiles
    _short: tuple[int, int, int] | None = field(default=None, repr=False, compare=False)  # paged_decode._leading_short

    def __post_init__(self) -> None:
        # The host sizes pick kernels and grids on the GPU only (the reference ignores them): checked here, so that a
        # wrong one fails on the CPU too.
        if not (isinstance(self.max_q, int) and isinstance(self.max_context, int)):
            raise TypeError(
                f"PagedBatch: max_q and max_context must be host ints, got {self.max_q!r}, {self.max_context!r}"
            )

    @property
    def num_entries(self) -> int:
        return self.q_pos0.shape[0]


def _pow2(n: int, floor: int = 16) -> int:
    return max(floor, 1 << (max(1, n) - 1).bit_length())

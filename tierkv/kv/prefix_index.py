"""The prefix index: content key -> the block holding that prefix's KV, in any tier."""

from __future__ import annotations

from collections.abc import Sequence

from tierkv.kv.block import Block


class PrefixIndex:
    """Keyed blocks by content key (see `tierkv.kv.prefix_cache` for the keys). A hit counts only where the block's
    stored token ids match too, so a hash collision cannot give wrong output."""

    def __init__(self) -> None:
        self._blocks: dict[bytes, Block] = {}

    def lookup(self, keys: Sequence[bytes], token_blocks: Sequence[Sequence[int]]) -> list[Block]:
        """The longest run of indexed blocks matching `keys` in order, whose stored tokens match too."""
        hits = []
        for key, tokens in zip(keys, token_blocks):
            block = self._blocks.get(key)
            if block is None or block.token_ids != tuple(tokens):
                break
            hits.append(block)
        return hits

    def add(self, block: Block, key: bytes, token_ids: Sequence[int]) -> bool:
        """Give `block` its key; False (nothing changed) if it has one already or another block has this one."""
        if block.key is not None or key in self._blocks:
            return False
        block.key = key
        block.token_ids = tuple(token_ids)
        self._blocks[key] = block
        return True

    def remove(self, block: Block) -> None:
        """Forget the block's key (the block keeps it: it is going away)."""
        if block.key is not None:
            self._blocks.pop(block.key, None)

    def adopt(self, block: Block) -> None:
        """Index a block that already carries its key (found in the NVMe store at start-up)."""
        self._blocks[block.key] = block

    def forget_key(self, block: Block) -> None:
        """The block stops being a prefix block: its key and tokens go (its spare copies are the caller's)."""
        if block.key is not None:
            self._blocks.pop(block.key, None)
            block.key = block.token_ids = None

    def replace(self, blocks: dict[bytes, Block]) -> None:
        """The whole index at once (rebuilt after a failed step)."""
        self._blocks = dict(blocks)

    def clear(self) -> None:
        self._blocks.clear()

    def get(self, key: bytes) -> Block | None:
        return self._blocks.get(key)

    def items(self):
        return self._blocks.items()

    def values(self):
        return self._blocks.values()

    def __len__(self) -> int:
        return len(self._blocks)

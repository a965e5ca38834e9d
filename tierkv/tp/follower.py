"""The ranks other than 0: replay rank 0's page-manager calls and run the same forward pass on their shard."""

from __future__ import annotations

import torch

from tierkv.errors import TierKVError
from tierkv.rank import setup_rank
from tierkv.runner import EntryPlan, ModelRunner
from tierkv.tp.driver import BlockIds, tables_digest
from tierkv.tp.group import TPContext, broadcast_plan, gather_objects


class Follower:
    """A rank other than 0: replays rank 0's page-manager calls on its own page manager and runs each step's
    forward pass over its own KV heads."""

    def __init__(self, runner: ModelRunner, tp: TPContext) -> None:
        self.runner, self.pm, self.tp = runner, runner.pm, tp
        self.tables: list[list[int]] = []
        self.placed: dict = {}

    def _unpack(self, x):
        if isinstance(x, BlockIds):
            return [self.pm.blocks[i] for i in x]
        return x

    def replay(self, ops) -> None:
        for name, args, kwargs, expect in ops:
            args = tuple(self._unpack(a) for a in args)
            result = getattr(self.pm, name)(*args, **{k: self._unpack(v) for k, v in kwargs.items()})
            if name == "acquire":
                self.tables = result
            elif name == "pin_in_place":
                self.placed[args[0]] = result
            elif expect is not None and result != expect:
                raise TierKVError(
                    f"rank {self.tp.rank}: {name} gave {result!r} here but {expect!r} on rank 0 (a block read back from "
                    "this rank's NVMe tier failed its checksum there, or here); the ranks' caches no longer agree"
                )

    def serve(self) -> None:
        try:
            while True:
                msg = broadcast_plan(self.tp)
                self.replay(msg["ops"])
                kind = msg["kind"]
                if kind == "step":
                    if tables_digest(self.tables) != msg["digest"]:
                        raise TierKVError(
                            f"rank {self.tp.rank}: block tables differ from rank 0's (a tierkv bug); stopping"
                        )
                    plans = [EntryPlan(*p) for p in msg["plans"]]
                    self.runner.run_forward(plans, self.tables, self.placed, msg["input_ids"])
                    self.placed = {}
                elif kind == "stats":
                    gather_objects(self.tp, self.pm.stats())
                elif kind == "close":
                    return
        finally:
            self.pm.close()


def serve_rank(cfg, device: torch.device, tp: TPContext) -> None:
    """Build this rank's model shard and tiers, then follow rank 0 until it closes."""
    loaded, pm = setup_rank(cfg, device, tp)
    Follower(ModelRunner(loaded, pm, cfg.staging_blocks), tp).serve()

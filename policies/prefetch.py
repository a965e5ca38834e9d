"""Prefetch policies: which blocks to bring to the fastest tier ahead of the step that reads them."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Sequence


class PrefetchPolicy(ABC):
    """Chooses blocks to prefetch from what the scheduler will run next. Never touches tensors."""

    name: str = "base"

    @abstractmethod
    def plan(
        self,
        upcoming: Sequence[Sequence[Hashable]],
        is_resident: Callable[[Hashable], bool],
        budget_blocks: int,
    ) -> list[Hashable]:
        """Keys to prefetch, most urgent first, at most `budget_blocks` of them.

        `upcoming` lists the block keys of each sequence in the order the scheduler will run them;
        `is_resident` says whether a key is already in (or on its way to) the target tier.
        """


class NextScheduledPrefetch(PrefetchPolicy):
    """Fetch the missing blocks of the sequences scheduled next, whole sequences first, in schedule order.

    A sequence whose missing blocks do not all fit in what is left of the budget is fetched in part
    (its first blocks), and the plan stops there: later sequences would only compete with it for room.
    """

    name = "next-scheduled"

    def plan(
        self,
        upcoming: Sequence[Sequence[Hashable]],
        is_resident: Callable[[Hashable], bool],
        budget_blocks: int,
    ) -> list[Hashable]:
        chosen: list[Hashable] = []
        seen: set[Hashable] = set()
        for keys in upcoming:
            missing = [k for k in keys if k not in seen and not is_resident(k)]
            seen.update(missing)
            room = budget_blocks - len(chosen)
            chosen.extend(missing[:room])
            if len(missing) > room:
                break
        return chosen

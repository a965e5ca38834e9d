"""Prefix reuse for the engine: start a request from the longest prefix of its prompt cached in any tier, load
it or recompute it (whichever is faster), and key each newly completed block for later requests."""

from __future__ import annotations

from itertools import islice

from tierkv.kv.block import GPU, NVME, TIER_NAMES
from tierkv.kv.manager import PageManager
from tierkv.kv.prefix_cache import LoadOrRecompute, PrefixHasher, PrefixStats


class PrefixReuse:
    """The engine's use of `pm`'s prefix index. `load`: "auto" (load or recompute, from the measured link and
    prefill speeds) or "always"; `prefetch`: start bringing found blocks to the GPU as soon as they are found."""

    # A long prompt is looked up in two parts: the first `early_blocks` blocks, whose promotion starts at once where
    # it is sure to be used, then the rest (hashing 2,048 blocks takes milliseconds the link can already use).
    early_blocks = 128
    # Eviction passes over the cached prefixes of at most this many waiting requests (`wanted_by`).
    queued_lookahead = 64

    def __init__(self, pm: PageManager, hasher: PrefixHasher, load: str = "auto", prefetch: bool = True) -> None:
        self.pm, self.hasher, self.load, self.prefetch = pm, hasher, load, prefetch
        self.block_size = pm.layout.block_size
        self.chooser = LoadOrRecompute(pm.layout.block_nbytes, self.block_size)
        self.stats = PrefixStats()
        self.register_blocks = True  # False while calibrating: the throwaway prompts leave no keys
        self._queued_keys: dict[int, list[bytes]] = {}  # a waiting request's (arrival's) block keys, made once
        self._wanted: tuple[int, set[int]] = (-1, set())  # (the step it was found in, the blocks)

    def wanted_by(self, waiting, step: int) -> set[int]:
        """The ids of cached blocks that the first `queued_lookahead` waiting requests would start from (their
        prompts' longest cached prefixes), found once per step: eviction passes over them while other blocks can
        go. Each request's keys are made once and kept for its start."""
        if self._wanted[0] == step:
            return self._wanted[1]
        bs, pm = self.block_size, self.pm
        wanted: set[int] = set()
        for req in islice(waiting, self.queued_lookahead):
            if req.params.prompt_logprobs is not None:
                continue  # computed whole, whatever is cached
            keys = self._queued_keys.get(req.arrival)
            if keys is None:
                full = (len(req.prompt_ids) - 1) // bs
                keys = self.hasher.keys(self.hasher.root(req.params.cache_salt), req.prompt_ids, full)
                self._queued_keys[req.arrival] = keys
            for key in keys:
                block = pm.index.get(key)
                if block is None:
                    break
                wanted.add(block.block_id)
        self._wanted = (step, wanted)
        return wanted

    def forget(self, req) -> None:
        """Drop what was kept for a request that leaves the queue without starting (aborted)."""
        self._queued_keys.pop(req.arrival, None)

    def start(self, req, seq) -> None:
        """Start the sequence with the longest prefix of its prompt whose KV is stored in any tier (at least the
        last prompt token is always computed, for its logits)."""
        bs, pm, stats = self.block_size, self.pm, self.stats
        prompt = req.prompt_ids
        seq.root = self.hasher.root(req.params.cache_salt)
        if req.params.prompt_logprobs is not None:
            return  # the logits of every prompt position are wanted: computed, not reused (its blocks are still keyed)
        full = (len(prompt) - 1) // bs
        head = min(full, self.early_blocks)
        if self.load == "auto":
            self.chooser.observe_links(pm.mover.links)  # the rates the early promotion and the choice go by
        saved = self._queued_keys.pop(req.arrival, None)  # made while it waited, if eviction asked for them
        keys = saved[:head] if saved is not None else self.hasher.keys(seq.root, prompt, head)
        hits = pm.lookup(keys, (prompt[j * bs : (j + 1) * bs] for j in range(head)))  # sliced only up to a miss
        tiers = [TIER_NAMES[b.tier] for b in hits]  # where each was found (before any promotion)
        if self.prefetch:
            self._promote_early(hits, tiers)
        if len(hits) == head < full:
            more = saved[head:] if saved is not None else self.hasher.keys(keys[-1], prompt[head * bs :], full - head)
            keys += more
            found = pm.lookup(more, (prompt[j * bs : (j + 1) * bs] for j in range(head, full)))
            hits += found
            tiers += [TIER_NAMES[b.tier] for b in found]
        stats.queried_tokens += full * bs
        if self.load == "auto":
            use = self.chooser.choose(tiers, len(prompt))
        else:
            use = len(hits)
        stats.recomputed_by_choice += (len(hits) - use) * bs
        hits = hits[:use]
        if any(b.tier == NVME for b in hits):
            good = pm.load_from_disk(hits, protect=set())
            stats.dropped_corrupt += (len(hits) - good) * bs
            hits = hits[:good]
        for tier in tiers[: len(hits)]:
            stats.by_tier[tier] += bs
        pm.attach(seq.seq_id, hits)
        seq.num_computed = len(hits) * bs
        seq.keys = keys[: len(hits)]
        req.num_cached_tokens = len(hits) * bs
        stats.hit_tokens += len(hits) * bs
        if any(b.tier != GPU for b in hits) and self.prefetch:
            pm.prefetch([seq.seq_id])  # one batched promotion, started now, while other work runs

    def _promote_early(self, hits: list, tiers: list[str]) -> None:
        """Start promoting the leading found blocks that are in the GPU or CPU tier, where loading them is sure to
        be chosen: with "always", or where each costs less to load than to recompute (then the choice over the whole
        prefix, made later, keeps at least these)."""
        lead = 0
        while lead < len(tiers) and tiers[lead] in ("gpu", "cpu"):
            lead += 1
        if not lead or "cpu" not in tiers[:lead]:
            return
        if self.load == "auto" and self.chooser.prefill_tokens_per_s is not None:
            if self.chooser.load_seconds("cpu") >= self.block_size / self.chooser.prefill_tokens_per_s:
                return
        self.pm.promote_cached(hits[:lead])

    def register_full_blocks(self, seq) -> None:
        """Give the sequence's newly completed blocks their content keys (chained from its root)."""
        bs = self.block_size
        # Blocks whose tokens are all known on the host (with asynchronous scheduling the KV can be one token ahead).
        while len(seq.keys) < min(seq.num_computed, len(seq.token_ids)) // bs:
            j = len(seq.keys)
            tokens = seq.token_ids[j * bs : (j + 1) * bs]
            key = self.hasher.key(seq.keys[-1] if seq.keys else seq.root, tokens)
            self.pm.register(seq.seq_id, j, key, tokens)
            seq.keys.append(key)

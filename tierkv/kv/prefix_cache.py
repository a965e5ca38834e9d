"""Prefix reuse: content keys for KV blocks, and the choice between loading a cached prefix and recomputing it.

A full block's key is SHA-256 over its parent's key and its token ids; the chain starts from a root that covers
everything else that changes the KV for the same tokens: a fingerprint of the model's weights (so a fine-tune
with the same config never shares), the dtype, the block size, and an optional per-request `cache_salt` (so
tenants do not share). A hit is used only if the stored token ids match as well, so even a hash collision cannot
give wrong output.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

KEY_VERSION = b"tierkv-prefix-v1"


@torch.no_grad()
def model_fingerprint(model: torch.nn.Module, description: dict) -> str:
    """SHA-256 (hex) of the model's description and of every parameter's name, shape, dtype and 64 sampled values.

    Cheap at start-up (one small device-to-host copy) and different for any two checkpoints that differ in more
    than a handful of weights."""
    h = hashlib.sha256(json.dumps(description, sort_keys=True).encode())
    samples = []
    for name, p in sorted(model.named_parameters()):
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        flat = p.detach().reshape(-1)
        k = min(64, flat.numel())
        idx = torch.arange(k, dtype=torch.int64, device=flat.device) * (flat.numel() - 1) // max(1, k - 1)
        samples.append(flat[idx].float())
    h.update(torch.cat(samples).cpu().numpy().tobytes())
    return h.hexdigest()


class PrefixHasher:
    """Chained block keys for one model, dtype and block size."""

    def __init__(self, fingerprint: str, block_size: int) -> None:
        self.fingerprint = fingerprint
        self.block_size = block_size

    def root(self, cache_salt: str | None) -> bytes:
        salt = b"" if cache_salt is None else b"salt:" + cache_salt.encode()
        return hashlib.sha256(KEY_VERSION + self.fingerprint.encode() + f":{self.block_size}:".encode() + salt).digest()

    @staticmethod
    def _chain(parent: bytes, token_bytes: bytes) -> bytes:
        return hashlib.sha256(parent + token_bytes).digest()

    @classmethod
    def key(cls, parent: bytes, tokens: Sequence[int]) -> bytes:
        return cls._chain(parent, array("q", tokens).tobytes())

    def keys(self, parent: bytes, token_ids: Sequence[int], num_blocks: int) -> list[bytes]:
        """Keys of the first `num_blocks` full blocks of `token_ids`, chained from `parent`."""
        bs = self.block_size
        raw = array("q", token_ids[: num_blocks * bs]).tobytes()  # one conversion; each block is a slice of it
        step = bs * 8
        chain = self._chain
        out = []
        for j in range(num_blocks):
            parent = chain(parent, raw[j * step : (j + 1) * step])
            out.append(parent)
        return out


@dataclass
class PrefixStats:
    queried_tokens: int = 0  # prompt tokens looked up (full blocks)
    hit_tokens: int = 0  # prompt tokens whose stored KV was reused
    by_tier: dict[str, int] = field(default_factory=lambda: {"gpu": 0, "cpu": 0, "nvme": 0})
    recomputed_by_choice: int = 0  # tokens found in a tier but recomputed because that was faster
    dropped_corrupt: int = 0  # tokens found on NVMe whose blocks failed their checksum

    def as_dict(self) -> dict:
        return {
            "queried_tokens": self.queried_tokens,
            "hit_tokens": self.hit_tokens,
            "hit_rate": self.hit_tokens / self.queried_tokens if self.queried_tokens else None,
            "hit_tokens_by_tier": dict(self.by_tier),
            "recomputed_by_choice": self.recomputed_by_choice,
            "dropped_corrupt_tokens": self.dropped_corrupt,
        }


class LoadOrRecompute:
    """Chooses how much of a found prefix to load, from measured rates: bytes per second from each tier to the
    GPU (link stats of the page manager's moves) and prefill tokens per second (the engine's prefill steps)."""

    def __init__(self, block_nbytes: int, block_size: int) -> None:
        self.block_nbytes = block_nbytes
        self.block_size = block_size
        self.bandwidth: dict[str, float] = {}  # tier name -> bytes/s to the GPU
        self.prefill_tokens_per_s: float | None = None

    # Steps with fewer prefill tokens say more about per-step overhead than about the cost of a token.
    MIN_OBSERVED_TOKENS = 256

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        if tokens < self.MIN_OBSERVED_TOKENS or seconds <= 0:
            return
        rate = tokens / seconds
        self.prefill_tokens_per_s = (
            rate if self.prefill_tokens_per_s is None else 0.7 * self.prefill_tokens_per_s + 0.3 * rate
        )

    def observe_links(self, links: dict) -> None:
        """Take the bandwidths measured so far from the page manager's link stats ((src, dst) -> LinkStats): each
        link's recent rate over large batches where it has one; else, where nothing is known yet, its bytes over its
        seconds. (Small batches measure mostly their fixed latency and their wait for SMs: the few prefix loads of a
        chat run on the H200, 72 blocks, read as a 0.37 GB/s link; every prefix found in the CPU tier was then
        recomputed, and the rate never measured again.)"""
        for (src, dst), link in list(links.items()):
            name = f"{src}->{dst}"
            if link.rate is not None:
                self.bandwidth[name] = link.rate
            elif name not in self.bandwidth and link.seconds > 0 and link.nbytes > 0:
                self.bandwidth[name] = link.nbytes / link.seconds

    def load_seconds(self, tier: str) -> float:
        """Seconds to bring one block from `tier` to the GPU (NVMe via the CPU tier where there is one)."""
        if tier == "gpu":
            return 0.0

        def per_block(link: str) -> float:
            bw = self.bandwidth.get(link)
            return float("inf") if not bw else self.block_nbytes / bw

        if tier == "cpu":
            return per_block("cpu->gpu")
        return min(per_block("nvme->gpu"), per_block("nvme->cpu") + per_block("cpu->gpu"))

    def choose(self, tiers: Sequence[str], prompt_len: int) -> int:
        """How many of the found blocks (in order, by the tier each lives in) to load; the rest is recomputed.

        Minimises load time of the first j blocks + prefill time of the remaining tokens over j. Without a
        prefill measurement yet, everything found is loaded."""
        if self.prefill_tokens_per_s is None:
            return len(tiers)
        per_token = 1.0 / self.prefill_tokens_per_s
        best_j, best_cost, load = 0, prompt_len * per_token, 0.0
        for j, tier in enumerate(tiers, 1):
            load += self.load_seconds(tier)
            cost = load + (prompt_len - j * self.block_size) * per_token
            if cost <= best_cost:
                best_j, best_cost = j, cost
        return best_j

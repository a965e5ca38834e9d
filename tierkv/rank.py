"""Building one rank's engine parts: the model (this rank's shard under tensor parallelism) and its page manager.
`tierkv.LLM` and the tensor-parallel followers both start here."""

from __future__ import annotations

import dataclasses
import os

import torch

from tierkv.capacity import check_gpu_tier, resolve_capacities
from tierkv.config import EngineConfig, PageManagerConfig
from tierkv.kv.manager import PageManager
from tierkv.kv.prefix_cache import model_fingerprint
from tierkv.layout import KVLayout, parse_dtype
from tierkv.loader import load_model
from tierkv.tp.group import broadcast_plan, gather_objects


def setup_rank(cfg: EngineConfig, device: torch.device, tp=None) -> tuple:
    """Load the model (this rank's shard under tensor parallelism) and build its page manager: (loaded, pm).

    Under tensor parallelism every rank runs this; the ranks agree on the tiers' sizes in blocks (the smallest any
    rank can hold), and each rank's NVMe files live in `nvme_dir/rank-N`."""
    loaded = load_model(cfg.model, device, _dtype(cfg.dtype), cfg.load_format, cfg.seed, tp=tp)
    spec = loaded.spec
    dtype = next(loaded.model.parameters()).dtype
    layout = KVLayout(spec.num_layers, spec.num_kv_heads, spec.head_dim, dtype, cfg.block_size, cfg.gpu_codec)
    nvme_dir = cfg.nvme_dir if tp is None or cfg.nvme_dir is None else os.path.join(cfg.nvme_dir, f"rank-{tp.rank}")
    ranks = 1 if tp is None else tp.world
    cold_nbytes = layout.compressed(cfg.cold_codec).block_nbytes
    caps = resolve_capacities(
        dataclasses.replace(cfg, nvme_dir=nvme_dir), layout.block_nbytes, device, ranks, cold_nbytes
    )
    if tp is not None:
        every = gather_objects(tp, caps)
        caps = broadcast_plan(tp, tuple(min(c[i] for c in every) for i in range(3)) if tp.rank == 0 else None)
    gpu, cpu, nvme = caps
    check_gpu_tier(gpu, layout.block_nbytes)
    description = {"spec": dataclasses.asdict(spec), "dtype": str(dtype)}
    if tp is not None:
        description["tensor_parallel"] = [tp.rank, tp.world]
    fingerprint = model_fingerprint(loaded.model, description)
    pm = PageManager(
        PageManagerConfig(
            layout,
            device=device,
            gpu_blocks=gpu,
            cpu_blocks=cpu,
            nvme_dir=nvme_dir if nvme else None,
            nvme_blocks=nvme,
            eviction=cfg.eviction,
            nvme_backend=cfg.nvme_backend,
            store_tag=fingerprint,
            # Under tensor parallelism the prefixes a previous process stored are not adopted: the ranks would
            # have to agree on which of them every rank still holds intact (not built yet).
            adopt_stored=cfg.enable_prefix_caching and tp is None,
            write_through=cfg.write_through,
            cold_codec=cfg.cold_codec,
        )
    )
    return loaded, pm


def _dtype(name):
    if name is None:
        return None
    return parse_dtype(name)

"""Opening a page manager's storage from its config: the tiers and the mover that runs transfers between them."""

from __future__ import annotations

import torch

from tierkv.config import PageManagerConfig
from tierkv.kv.block import CPU, GPU, NVME
from tierkv.kv.mover import Mover
from tierkv.kv.tiers import MemoryTier, NvmeTier, Tier, check_host_memory


def open_tiers(config: PageManagerConfig) -> tuple[dict[int, Tier], Mover]:
    """The tiers `config` asks for (GPU always; CPU and NVMe where given blocks), by kind, and their mover. The
    host memory they need is checked first; a failure part-way closes what was opened."""
    layout, cold, device = config.layout, config.cold_layout, config.device
    cuda = device.type == "cuda"
    host = {"cpu": config.cpu_blocks * cold.block_nbytes} if config.cpu_blocks else {}
    if not cuda:  # the "GPU" tier is ordinary memory too
        host["gpu"] = (config.gpu_blocks + config.gpu_reserve_blocks) * layout.block_nbytes
    check_host_memory(host)
    tiers: dict[int, Tier] = {}
    try:
        tiers[GPU] = MemoryTier(
            GPU, layout, config.gpu_blocks, config.gpu_blocks + config.gpu_reserve_blocks, device, pin=False
        )
        if config.cpu_blocks:
            tiers[CPU] = MemoryTier(CPU, cold, config.cpu_blocks, config.cpu_blocks, torch.device("cpu"), pin=cuda)
        if config.nvme_blocks:
            tiers[NVME] = NvmeTier(cold, config.nvme_blocks, config.nvme_dir, config.nvme_backend, config.store_tag)
        mover = Mover(list(tiers.values()), device, config.staging_blocks, config.debug_delays)
    except BaseException:
        for tier in tiers.values():
            tier.close()
        raise
    return tiers, mover

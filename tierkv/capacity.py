"""How many KV blocks each tier gets, and whether a request can ever run with them: the arithmetic that the
API, the batch runner's checks and the engine's set-up share."""

from __future__ import annotations

import os
import shutil

import torch

from tierkv.config import EngineConfig, resolve_blocks
from tierkv.errors import CapacityError, ConfigError
from tierkv.layout import request_blocks
from tierkv.sampling import SamplingParams
from tierkv.scheduler import Scheduler
from tierkv.sizes import format_nbytes

MIN_GPU_BLOCKS = 2  # one step's window: the blocks its new tokens are written into (a chunk may straddle two)


def _ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def resolve_capacities(
    cfg: EngineConfig, block_nbytes: int, device: torch.device, ranks: int = 1, cold_nbytes: int | None = None
) -> tuple[int, int, int]:
    """Blocks per tier (gpu, cpu, nvme): as given, or defaults from the machine (see EngineConfig). With `ranks`
    tensor-parallel ranks on the host, the defaults that share one resource (RAM, the disk) are split between them.
    `cold_nbytes`: a block's bytes in the CPU and NVMe tiers, where they store blocks compressed."""
    gpu_nbytes, block_nbytes = block_nbytes, cold_nbytes or block_nbytes
    if cfg.gpu_blocks is not None or cfg.gpu_memory is not None:
        gpu = resolve_blocks("gpu", cfg.gpu_blocks, cfg.gpu_memory, gpu_nbytes)
    elif device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        activations = 2 * 2**30  # room for one step's activations and the streaming staging
        gpu = max(0, int(free - (1 - cfg.gpu_memory_utilization) * total) - activations) // gpu_nbytes
    else:
        gpu = min(2**30, _ram_bytes() // 10) // ranks // gpu_nbytes
    if cfg.cpu_blocks is not None or cfg.cpu_memory is not None:
        cpu = resolve_blocks("cpu", cfg.cpu_blocks, cfg.cpu_memory, block_nbytes)
    else:
        cpu = min(64 * 2**30, _ram_bytes() // 4) // ranks // block_nbytes if device.type == "cuda" else 0
    if cfg.nvme_blocks is not None or cfg.nvme_memory is not None:
        nvme = resolve_blocks("nvme", cfg.nvme_blocks, cfg.nvme_memory, block_nbytes)
    elif cfg.nvme_dir:
        os.makedirs(cfg.nvme_dir, exist_ok=True)
        nvme = min(256 * 2**30, shutil.disk_usage(cfg.nvme_dir).free // 2) // ranks // block_nbytes
    else:
        nvme = 0
    return gpu, cpu, nvme


def make_scheduler(cfg: EngineConfig, gpu: int, cpu: int, nvme: int) -> Scheduler:
    """The scheduler for tiers of (gpu, cpu, nvme) blocks under `cfg`'s batching options."""
    return Scheduler(
        cfg.block_size,
        gpu,
        gpu + cpu + nvme,
        cfg.max_num_batched_tokens,
        cfg.max_num_seqs,
        cfg.slice_steps,
        cfg.oversubscribe,
        cfg.scheduling_policy == "priority",
    )


def tier_blocks(pm) -> tuple[int, int, int]:
    """The page manager's (gpu, cpu, nvme) capacities in blocks (0 for an absent tier)."""
    gpu = pm.tiers[0].num_blocks
    cpu = pm.tiers[1].num_blocks if 1 in pm.tiers else 0
    return gpu, cpu, sum(t.num_blocks for t in pm.tiers.values()) - gpu - cpu


def check_gpu_tier(gpu_blocks: int, block_nbytes: int) -> None:
    if gpu_blocks < MIN_GPU_BLOCKS:
        raise ConfigError(
            f"the GPU tier holds {gpu_blocks} blocks ({format_nbytes(gpu_blocks * block_nbytes)}, {format_nbytes(block_nbytes)} "
            f"each); it needs at least {MIN_GPU_BLOCKS} (the blocks one step writes into; older KV can be streamed from "
            "the CPU tier); raise gpu_blocks or gpu_memory"
        )


def check_request_fits(
    what: str, prompt_len: int, params: SamplingParams, scheduler: Scheduler, gpu: int, cpu: int, nvme: int
) -> None:
    """Raise CapacityError if a request can never run with these tiers: all of them together (a sequence longer
    than the GPU tier streams its older blocks from the CPU and NVMe tiers)."""
    need = request_blocks(prompt_len, params.max_tokens, params.n, scheduler.block_size, scheduler.share_blocks)
    total = gpu + cpu + nvme
    if need > total:
        raise CapacityError(
            f"{what} ({prompt_len} tokens, max_tokens {params.max_tokens}, n {params.n}) may need {need} KV blocks but all "
            f"tiers together hold {total} (gpu {gpu} + cpu {cpu} + nvme {nvme}); "
            "raise the tier capacities (nvme_dir/nvme_memory is the cheapest) or shorten the request"
        )

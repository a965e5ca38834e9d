"""Configuration of the page manager, validated on construction, before anything is allocated."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from tierkv.errors import ConfigError
from tierkv.layout import KVLayout
from tierkv.sizes import parse_nbytes

EVICTION_NAMES = ("lru", "clock")


def resolve_blocks(name: str, num_blocks: int | None, nbytes: str | int | None, block_nbytes: int) -> int:
    """A tier's capacity in blocks, given as a block count or as a byte size (floor division)."""
    if num_blocks is not None and nbytes is not None:
        raise ConfigError(f"{name} tier: give {name}_blocks or {name}_memory, not both")
    if nbytes is not None:
        return parse_nbytes(nbytes, f"{name}_memory") // block_nbytes
    if num_blocks is None:
        return 0
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 0:
        raise ConfigError(f"{name}_blocks must be a non-negative integer, got {num_blocks!r}")
    return num_blocks


def resolve_device(device: str | torch.device) -> torch.device:
    """torch.device from "cpu", "cuda" or "cuda:N", refused if CUDA is asked for and absent."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {device!r} is not a device name; use 'cuda', 'cuda:N' or 'cpu'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} asked for, but CUDA is not available here; use device='cpu'")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        if dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type != "cpu":
        raise ConfigError(f"device {device!r} is not supported; use 'cuda', 'cuda:N' or 'cpu'")
    return dev


@dataclass
class PageManagerConfig:
    """Capacities of the three tiers and how blocks move between them.

    Capacities are in blocks (`*_blocks`) or in bytes (`*_memory`, e.g. "20GiB"); a tier of 0 blocks is absent,
    except the GPU tier, which needs at least one block. On a machine without CUDA the "gpu" tier lives in
    ordinary memory and everything runs synchronously through the same code. The GPU tier stores blocks as
    `layout` says (its codec "fp8": compressed, `kv_cache_dtype="fp8"`).
    """

    layout: KVLayout
    device: str | torch.device = "cpu"
    gpu_blocks: int | None = None
    gpu_memory: str | int | None = None
    cpu_blocks: int | None = None
    cpu_memory: str | int | None = None
    nvme_dir: str | None = None
    nvme_blocks: int | None = None
    nvme_memory: str | int | None = None
    eviction: str = "lru"
    nvme_backend: str = "auto"
    # Extra GPU slots, beyond gpu_blocks, that let a promotion land before its victim leaves when every
    # tier below is full. None: 1/16 of the GPU tier, at least 1 and at most 64.
    gpu_reserve_blocks: int | None = None
    # Pinned staging for NVMe <-> GPU transfers on CUDA, in blocks (bounds the size of one I/O chunk).
    staging_blocks: int = 32
    # Tests only: random delays on transfer streams and the I/O thread, to expose missing orderings.
    debug_delays: bool = False
    # What must match for blocks stored in nvme_dir to be reused (e.g. the model's fingerprint), and whether to
    # index the content-keyed blocks a previous process left there.
    store_tag: str = ""
    adopt_stored: bool = False
    # Keyed blocks are copied to NVMe as soon as they are keyed (write-through) instead of only when evicted or
    # at close (write-back): the cache on disk is always complete, at the cost of disk writes.
    write_through: bool = False
    # How the CPU and NVMe tiers store blocks: None (as the GPU tier does), "none" or "fp8" (compressed on the way
    # down, about half the bytes; lossy: see cold_kv_dtype in EngineConfig). Below an fp8 GPU tier: fp8.
    cold_codec: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.layout, KVLayout):
            raise ConfigError(f"layout must be a tierkv.KVLayout, got {type(self.layout).__name__}")
        self.device = resolve_device(self.device)
        if self.cold_codec is None:
            self.cold_codec = self.layout.codec
        if self.layout.codec == "fp8" and self.cold_codec != "fp8":
            raise ConfigError(
                f"cold_codec {self.cold_codec!r} below an fp8 GPU tier: the cold tiers would hold twice the bytes and "
                "no more accuracy; leave cold_codec unset (the cold tiers then store fp8 too)"
            )
        nbytes = self.layout.block_nbytes
        cold = self.cold_layout.block_nbytes
        self.gpu_blocks = resolve_blocks("gpu", self.gpu_blocks, self.gpu_memory, nbytes)
        self.cpu_blocks = resolve_blocks("cpu", self.cpu_blocks, self.cpu_memory, cold)
        self.nvme_blocks = resolve_blocks("nvme", self.nvme_blocks, self.nvme_memory, cold)
        self.gpu_memory = self.cpu_memory = self.nvme_memory = None
        if self.gpu_blocks < 1:
            raise ConfigError(
                f"the GPU tier needs at least 1 block of {nbytes} bytes; got gpu_blocks={self.gpu_blocks} "
                "(a gpu_memory below one block rounds down to 0); raise gpu_blocks or gpu_memory"
            )
        if self.nvme_blocks and not self.nvme_dir:
            raise ConfigError(
                f"nvme_blocks={self.nvme_blocks} needs nvme_dir: a directory on the NVMe disk for the block files"
            )
        if self.nvme_dir is not None:
            if not isinstance(self.nvme_dir, (str, os.PathLike)) or not str(self.nvme_dir):
                raise ConfigError(f"nvme_dir must be a directory path, got {self.nvme_dir!r}")
            if os.path.exists(self.nvme_dir) and not os.path.isdir(self.nvme_dir):
                raise ConfigError(
                    f"nvme_dir {str(self.nvme_dir)!r} exists and is not a directory; give a directory path"
                )
            if self.nvme_blocks == 0:
                raise ConfigError(
                    f"nvme_dir {str(self.nvme_dir)!r} is set but the NVMe tier has 0 blocks; set nvme_blocks or nvme_memory"
                )
        if self.eviction not in EVICTION_NAMES:
            raise ConfigError(f"eviction {self.eviction!r} is not one of {', '.join(EVICTION_NAMES)}")
        if self.nvme_backend not in ("auto", "kvikio", "posix"):
            raise ConfigError(f"nvme_backend {self.nvme_backend!r} is not one of 'auto', 'kvikio', 'posix'")
        if self.gpu_reserve_blocks is None:
            self.gpu_reserve_blocks = min(64, max(1, self.gpu_blocks // 16))
        if not isinstance(self.gpu_reserve_blocks, int) or self.gpu_reserve_blocks < 1:
            raise ConfigError(f"gpu_reserve_blocks must be a positive integer, got {self.gpu_reserve_blocks!r}")
        if not isinstance(self.staging_blocks, int) or self.staging_blocks < 1:
            raise ConfigError(f"staging_blocks must be a positive integer, got {self.staging_blocks!r}")

    @property
    def total_blocks(self) -> int:
        return self.gpu_blocks + self.cpu_blocks + self.nvme_blocks

    @property
    def cold_layout(self) -> KVLayout:
        """The layout of the CPU and NVMe tiers' blocks."""
        return self.layout.compressed(self.cold_codec)


@dataclass
class EngineConfig:
    """Everything `tierkv.LLM` takes besides the model, validated before the model loads.

    Tier capacities as in PageManagerConfig; None picks a default from the machine once the model's KV
    block size is known (GPU: `gpu_memory_utilization` of the device memory left after the weights; CPU
    tier: a quarter of the RAM, at most 64 GiB, when the compute device is a GPU; NVMe: half of the free
    disk, at most 256 GiB, when nvme_dir is given).

    With `enable_prefix_caching`, full KV blocks are kept by content after their requests finish and reused by
    later requests with the same prefix, from any tier; stored on NVMe, they outlive the process. `prefix_load`
    "auto" recomputes a found prefix where that is faster than loading it (measured), "always" loads it.
    """

    model: str
    tokenizer: str | None = None
    device: str | None = None
    dtype: str | None = None
    load_format: str = "auto"
    block_size: int = 16
    gpu_blocks: int | None = None
    gpu_memory: str | int | None = None
    cpu_blocks: int | None = None
    cpu_memory: str | int | None = None
    nvme_dir: str | None = None
    nvme_blocks: int | None = None
    nvme_memory: str | int | None = None
    eviction: str = "lru"
    nvme_backend: str = "auto"
    gpu_memory_utilization: float = 0.9
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    max_model_len: int | None = None
    staging_blocks: int = 1024
    slice_steps: int = 8
    # Start new sequences even where the ones already begun would then not fit on the GPU together (all take
    # turns, swapping KV through the lower tiers): earlier first tokens for later requests, lower throughput.
    oversubscribe: bool = False
    # "fcfs": requests start in arrival order; "priority": by each request's priority (lower first, as vLLM), and
    # running sequences of lower priority give their GPU room to higher ones, swapped down (never recomputed).
    scheduling_policy: str = "fcfs"
    prefetch: bool = True
    cuda_graphs: bool = True
    async_scheduling: bool = True  # plan step n+1 while the device runs step n (steps whose samples are all greedy)
    seed: int = 0
    enable_prefix_caching: bool = True
    prefix_load: str = "auto"
    write_through: bool = False
    # The GPU tier's KV: "auto" (the model's dtype) or "fp8" (e4m3 codes with a power-of-two float32 scale per
    # layer, keys or values, and head of each block: about half the bytes, so about twice the tokens in the same
    # gpu_memory; lossy, opt-in; the accuracy is measured in tests/test_fp8_kv_cache.py). The cold tiers then
    # store fp8 too, and blocks move between the tiers as they are.
    kv_cache_dtype: str = "auto"
    # The CPU and NVMe tiers' KV: None (as the GPU tier stores it: exact) or "fp8" (e4m3 with a float32 scale per
    # layer, keys or values, and head of each block: about half the bytes to store and move; lossy, opt-in; the
    # accuracy is measured in tests/test_cold_fp8.py).
    cold_kv_dtype: str | None = None
    # Tensor parallelism: ranks (one process and one GPU each; see tierkv.tp). Tier capacities are per rank.
    tensor_parallel_size: int = 1
    tp_timeout_s: float = 600.0  # a rank that does not answer a collective for this long ends the run

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ConfigError(f"model must be a checkpoint folder, a config file or a preset name, got {self.model!r}")
        if self.device is not None:
            resolve_device(self.device)
        if self.dtype is not None:
            from tierkv.layout import parse_dtype

            parse_dtype(self.dtype)
        if self.load_format not in ("auto", "dummy"):
            raise ConfigError(f"load_format {self.load_format!r} is not one of 'auto', 'dummy'")
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise ConfigError(f"scheduling_policy {self.scheduling_policy!r} is not one of 'fcfs', 'priority'")
        if self.eviction not in EVICTION_NAMES:
            raise ConfigError(f"eviction {self.eviction!r} is not one of {', '.join(EVICTION_NAMES)}")
        for name in (
            "block_size",
            "max_num_batched_tokens",
            "max_num_seqs",
            "staging_blocks",
            "slice_steps",
            "tensor_parallel_size",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 1):
            raise ConfigError(f"max_model_len must be a positive integer or None, got {self.max_model_len!r}")
        if not isinstance(self.gpu_memory_utilization, (int, float)) or not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        for tier in ("gpu", "cpu", "nvme"):
            if getattr(self, f"{tier}_blocks") is not None and getattr(self, f"{tier}_memory") is not None:
                raise ConfigError(f"give {tier}_blocks or {tier}_memory, not both")
            if getattr(self, f"{tier}_memory") is not None:
                parse_nbytes(getattr(self, f"{tier}_memory"), f"{tier}_memory")  # refused now, not after loading
            if getattr(self, f"{tier}_blocks") is not None:
                resolve_blocks(tier, getattr(self, f"{tier}_blocks"), None, 1)
        if (self.nvme_blocks or self.nvme_memory) and not self.nvme_dir:
            raise ConfigError("an NVMe tier size needs nvme_dir: a directory on the NVMe disk for the block files")
        if self.nvme_dir is not None and os.path.exists(self.nvme_dir) and not os.path.isdir(self.nvme_dir):
            raise ConfigError(f"nvme_dir {self.nvme_dir!r} exists and is not a directory; give a directory path")
        if (
            isinstance(self.tp_timeout_s, bool)
            or not isinstance(self.tp_timeout_s, (int, float))
            or self.tp_timeout_s <= 0
        ):
            raise ConfigError(f"tp_timeout_s must be a positive number of seconds, got {self.tp_timeout_s!r}")
        for name in (
            "oversubscribe",
            "prefetch",
            "cuda_graphs",
            "async_scheduling",
            "enable_prefix_caching",
            "write_through",
        ):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.kv_cache_dtype not in ("auto", "fp8"):
            raise ConfigError(
                f"kv_cache_dtype {self.kv_cache_dtype!r} is not one of 'auto' (the model's dtype) or 'fp8' (e4m3 "
                "codes with a scale per block, layer and head: about twice the tokens on the GPU, lossy)"
            )
        if self.cold_kv_dtype not in (None, "fp8"):
            raise ConfigError(
                f"cold_kv_dtype {self.cold_kv_dtype!r} is not one of None (as the GPU tier stores the KV) or 'fp8'"
            )
        if self.prefix_load not in ("auto", "always"):
            raise ConfigError(
                f"prefix_load {self.prefix_load!r} is not one of 'auto' (load or recompute, whichever is faster) or 'always'"
            )

    @property
    def gpu_codec(self) -> str:
        """How the GPU tier stores blocks: "none" (the model's dtype) or "fp8" (KVLayout.codec)."""
        return "fp8" if self.kv_cache_dtype == "fp8" else "none"

    @property
    def cold_codec(self) -> str:
        """How the CPU and NVMe tiers store blocks: as the GPU tier, or "fp8" where cold_kv_dtype says so."""
        return self.cold_kv_dtype or self.gpu_codec


@dataclass
class ClusterConfig:
    """A batch run spread over replicas on a Ray cluster (a run YAML's `cluster:` section): each replica is one Ray
    actor holding one `LLM` built from the run's `engine:` section, on engine.tensor_parallel_size GPUs (with
    device cuda) and `cpus_per_replica` CPUs."""

    backend: str = "ray"
    # "auto" (the cluster this machine belongs to), a cluster's address ("host:6379", "ray://host:10001"), or None:
    # a local Ray that tierkv starts and stops.
    address: str | None = None
    replicas: int = 1
    cpus_per_replica: float = 1.0
    # GPUs Ray reserves per replica (with engine.device cuda): None, engine.tensor_parallel_size; a fraction below 1
    # lets replicas share a GPU (each then needs its own engine.gpu_memory or gpu_blocks).
    gpus_per_replica: float | None = None
    records_in_flight: int = 64  # per replica: records sent to it and not yet answered (more ahead of its engine)
    max_restarts: int = 8  # per replica; one that dies more often is given up, its records go to the others

    def __post_init__(self) -> None:
        if self.backend != "ray":
            raise ConfigError(f"backend {self.backend!r} is not supported; the one backend is 'ray'")
        if self.address is not None and (not isinstance(self.address, str) or not self.address.strip()):
            raise ConfigError(
                f"address {self.address!r}: give 'auto', a Ray cluster's address (host:6379 or ray://host:10001), or "
                "leave it out for a local Ray started by tierkv"
            )
        for name, low in (("replicas", 1), ("records_in_flight", 1), ("max_restarts", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
        value = self.cpus_per_replica
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise ConfigError(f"cpus_per_replica must be a number > 0, got {value!r}")
        value = self.gpus_per_replica
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value):
            raise ConfigError(
                f"gpus_per_replica must be a number > 0 (a fraction: replicas share a GPU), got {value!r}"
            )

    def gpus(self, engine: dict) -> float:
        """GPUs Ray reserves for each replica of a run with this `engine:` section: none on the CPU; gpus_per_replica
        where given (a fraction: replicas share a GPU); else engine.tensor_parallel_size."""
        if engine.get("device") != "cuda":
            return 0
        tp = engine.get("tensor_parallel_size", 1)
        given = self.gpus_per_replica
        if given is None or given == tp:
            return tp
        if given > 1 or tp > 1:
            raise ConfigError(
                f"cluster.gpus_per_replica {given:g} with engine.tensor_parallel_size {tp}: a replica runs on "
                "tensor_parallel_size GPUs; leave gpus_per_replica out, or give a fraction below 1 with "
                "tensor_parallel_size 1 for replicas sharing a GPU"
            )
        if engine.get("gpu_memory") is None and engine.get("gpu_blocks") is None:
            raise ConfigError(
                f"cluster.gpus_per_replica {given:g}: replicas sharing a GPU each need engine.gpu_memory (or "
                "gpu_blocks), else the first one's GPU tier takes the GPU's free memory and the next finds none"
            )
        return given

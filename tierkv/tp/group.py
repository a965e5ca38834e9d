"""The ranks' process groups and collectives, and the slice of every weight a rank holds."""

from __future__ import annotations

import dataclasses
import gc
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from tierkv.errors import ConfigError

# Never let NCCL, PyTorch or NVSHMEM use NVLink multicast (it can take a shared host's GPUs down).
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@dataclass
class TPContext:
    rank: int
    world: int
    group: object = None  # collectives on tensors (NCCL on CUDA, gloo on CPU)
    ctrl: object = None  # gloo group for step plans and stats

    def split(self, n: int, what: str) -> tuple[int, int]:
        """This rank's [lo, hi) of `n` things split evenly; refused where they do not split."""
        if n % self.world:
            raise ConfigError(
                f"tensor_parallel_size={self.world} does not divide {what} ({n}); choose a divisor of {n}"
            )
        per = n // self.world
        return self.rank * per, (self.rank + 1) * per

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, group=self.group)
        return t

    def all_gather_last(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's `t` along the last dimension."""
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


@dataclass(frozen=True)
class Shards:
    """Which slice of each weight this rank holds."""

    heads: tuple[int, int]  # query heads
    kv_heads: tuple[int, int]  # KV heads (replicated where there are fewer than ranks)
    intermediate: tuple[int, int]
    vocab: tuple[int, int]  # rows of the (padded) vocabulary
    vocab_padded: int

    @classmethod
    def for_rank(cls, spec, tp: TPContext | None) -> Shards:
        if tp is None or tp.world == 1:
            return cls(
                (0, spec.num_heads),
                (0, spec.num_kv_heads),
                (0, spec.intermediate_size),
                (0, spec.vocab_size),
                spec.vocab_size,
            )
        heads = tp.split(spec.num_heads, "the attention heads")
        group = spec.num_heads // spec.num_kv_heads
        if spec.num_kv_heads >= tp.world:
            kv = tp.split(spec.num_kv_heads, "the KV heads")
        else:  # fewer KV heads than ranks: each rank holds the one its query heads share
            if (heads[1] - heads[0]) > group or heads[0] // group != (heads[1] - 1) // group:
                raise ConfigError(f"tensor_parallel_size={tp.world}: a rank's query heads would need two KV heads")
            kv = (heads[0] // group, heads[0] // group + 1)
        inter = tp.split(spec.intermediate_size, "the MLP width")
        per = -(-spec.vocab_size // tp.world)
        return cls(heads, kv, inter, (tp.rank * per, (tp.rank + 1) * per), per * tp.world)

    def local_spec(self, spec):
        return dataclasses.replace(
            spec,
            num_heads=self.heads[1] - self.heads[0],
            num_kv_heads=self.kv_heads[1] - self.kv_heads[0],
            intermediate_size=self.intermediate[1] - self.intermediate[0],
        )

    def slice_of(self, name: str, head_dim: int):
        """(dim, lo, hi) of checkpoint tensor `name` that this rank holds, or None for the whole tensor."""
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            return 0, self.heads[0] * head_dim, self.heads[1] * head_dim
        if name.endswith(("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias")):
            return 0, self.kv_heads[0] * head_dim, self.kv_heads[1] * head_dim
        if name.endswith("o_proj.weight"):
            return 1, self.heads[0] * head_dim, self.heads[1] * head_dim
        if name.endswith(("gate_proj.weight", "up_proj.weight", "gate_proj.bias", "up_proj.bias")):
            return 0, *self.intermediate
        if name.endswith("down_proj.weight"):
            return 1, *self.intermediate
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            return 0, *self.vocab
        return None


# -- process groups ------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Testing the tensor-parallel path on a machine with one GPU: every rank on the same device, gloo between them
# (NCCL refuses two ranks on one GPU). Slow, for correctness checks only.
ONE_GPU_ENV = "TIERKV_TP_ONE_GPU"


def _one_gpu() -> bool:
    return os.environ.get(ONE_GPU_ENV) == "1"


def init_group(rank: int, world: int, init_method: str, device: torch.device, timeout_s: float) -> TPContext:
    os.environ.update(SAFE_ENV)
    backend = "nccl" if device.type == "cuda" and not _one_gpu() else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # torch.distributed.nn.functional binds `group=group.WORLD` as the default argument of ten functions when it
    # is first imported. Imported after the group exists (torch._dynamo imports it, and transformers imports
    # torch._dynamo while this rank loads the model's config), those defaults keep the world group alive after
    # destroy_process_group(): its backend's threads (gloo's pt_gloo_runloop) then live on into the interpreter's
    # teardown, where one still freeing the last collective's tensors needs the GIL, is ended by the finalizing
    # interpreter inside a noexcept destructor, and the process aborts ("terminate called without an active
    # exception", SIGABRT). Imported now, they bind None.
    from torch.distributed.nn import functional  # noqa: F401

    dist.init_process_group(
        backend, init_method=init_method, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s)
    )
    ctrl = (
        dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s)) if backend != "gloo" else dist.group.WORLD
    )
    return TPContext(rank, world, dist.group.WORLD, ctrl)


def broadcast_plan(tp: TPContext, plan: dict | None = None) -> dict:
    """Rank 0 sends `plan`; the others receive and return it."""
    box = [plan]
    dist.broadcast_object_list(box, src=0, group=tp.ctrl)
    return box[0]


def gather_objects(tp: TPContext, obj) -> list | None:
    out = [None] * tp.world if tp.rank == 0 else None
    dist.gather_object(obj, out, dst=0, group=tp.ctrl)
    return out


def rank_device(device: torch.device, local_rank: int, local_world: int) -> torch.device:
    if device.type != "cuda":
        return device
    base = device.index or 0
    if _one_gpu():
        return torch.device("cuda", base)
    have = torch.cuda.device_count()
    if base + local_world > have:
        raise ConfigError(
            f"tensor parallelism over {local_world} GPUs from cuda:{base} needs cuda:{base}..cuda:{base + local_world - 1}, "
            f"but this host has {have}; lower tensor_parallel_size or device"
        )
    return torch.device("cuda", base + local_rank)


def shutdown_group(tp: TPContext | None = None) -> None:
    """Destroy the process groups and drop `tp`'s references to them. The last reference going frees each
    group's backend here, which finishes its queued work and joins its threads (gloo's) while the interpreter is
    whole; a group left referenced keeps them running into the interpreter's teardown, where they can abort the
    process (see init_group). `tp` is shared by the model's layers, so clearing it is enough on our side."""
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - after a failed peer there may be nothing left to tear down cleanly
            pass
    if tp is not None:
        tp.group = tp.ctrl = None
    # A group kept alive by a reference cycle (LLM() froze its objects out of the collector's view until close())
    # would end its threads only at some later collection: collect now, so that they end here. Seen as a flaky
    # test_the_same_code_runs_under_torchrun (gloo_tcp_loop still running after close(), 1 run in 2 of the suite).
    gc.collect()

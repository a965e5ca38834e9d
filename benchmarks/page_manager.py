"""The page manager alone under a decode-like workload whose KV outgrows the GPU tier (no model).

    python benchmarks/page_manager.py --device cuda --layout llama-3.1-8b --gpu-blocks 256 --cpu-blocks 1024 \
        --nvme-blocks 1024 --nvme-dir /tmp/nvme --json out.json


Sequences arrive with a prompt, then grow one token per step until done. A step runs a group of running
sequences whose blocks fit on the GPU together; a group keeps the GPU for `slice_steps` steps, then the
next group in round-robin order takes over, so the others' blocks are demoted to the CPU and NVMe tiers
and promoted back when their turn comes (swap-based time slicing); the next group is prefetched.
Every token's KV is a pattern derived from (sequence, position), written straight into the GPU slots the
page manager hands out (as the engine's kernel would), and every sequence is read back and compared when
it finishes: the run fails loudly if a single byte moved wrong.
"""

from __future__ import annotations

import random
import sys
import tempfile
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tierkv.config import PageManagerConfig
from tierkv.kv.manager import PageManager
from tierkv.layout import KVLayout

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from kv_tools import read_tokens, write_tokens  # noqa: E402 - the tests' host-side byte access

# KV shapes of real models (per token: layers x K,V x kv heads x head dim).
LAYOUT_PRESETS: dict[str, dict] = {
    "smollm2-135m": dict(num_layers=30, num_kv_heads=3, head_dim=64),
    "llama-3.1-8b": dict(num_layers=32, num_kv_heads=8, head_dim=128),
    "qwen2.5-7b": dict(num_layers=28, num_kv_heads=4, head_dim=128),
    "tiny": dict(num_layers=2, num_kv_heads=2, head_dim=16),
}


@dataclass
class BenchConfig:
    """The workload and the tiers it runs on (defaults: SmolLM2-135M's KV shape, a few seconds on 2 CPU cores)."""

    layout: str = "smollm2-135m"
    dtype: str = "bfloat16"
    block_size: int = 16
    device: str = "cpu"
    num_seqs: int = 24
    prompt_min: int = 64
    prompt_max: int = 512
    gen_tokens: int = 32
    slice_steps: int = 8
    gpu_blocks: int = 48
    cpu_blocks: int = 96
    nvme_blocks: int = 512
    nvme_dir: str | None = None
    eviction: str = "lru"
    prefetch: bool = True
    seed: int = 0


def _pattern(layout: KVLayout, seq: int, positions: torch.Tensor) -> torch.Tensor:
    """The KV that token `positions` of sequence `seq` hold: shape (n, L, 2, H, D), unique bit patterns."""
    numel = layout.block_numel // layout.block_size
    bits = torch.iinfo(torch.int16).max if layout.dtype.itemsize == 2 else torch.iinfo(torch.int32).max
    int_type = torch.int16 if layout.dtype.itemsize == 2 else torch.int32
    base = (seq * 1_000_003 + positions.to(torch.int64) * 7919)[:, None]
    values = ((base + torch.arange(numel, dtype=torch.int64)[None]) % bits).to(int_type)
    return values.view(layout.dtype).view(len(positions), *layout.token_shape)


def _expected(layout: KVLayout, seq: int, length: int) -> torch.Tensor:
    return _pattern(layout, seq, torch.arange(length)).permute(1, 2, 0, 3, 4)


def run(cfg: BenchConfig, progress=None) -> dict:
    """Run the workload; returns figures and the page manager's stats. Raises AssertionError on a wrong byte."""
    layout = KVLayout(**LAYOUT_PRESETS[cfg.layout], dtype=cfg.dtype, block_size=cfg.block_size)
    rng = random.Random(cfg.seed)
    tmp = None
    nvme_dir = cfg.nvme_dir
    if cfg.nvme_blocks and nvme_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="tierkv-bench-")
        nvme_dir = tmp.name
    pm = PageManager(
        PageManagerConfig(
            layout,
            device=cfg.device,
            gpu_blocks=cfg.gpu_blocks,
            cpu_blocks=cfg.cpu_blocks,
            nvme_dir=nvme_dir if cfg.nvme_blocks else None,
            nvme_blocks=cfg.nvme_blocks,
            eviction=cfg.eviction,
        )
    )
    try:
        return _run(cfg, pm, layout, rng, progress)
    finally:
        pm.close()
        if tmp is not None:
            tmp.cleanup()


def _run(cfg: BenchConfig, pm: PageManager, layout: KVLayout, rng: random.Random, progress) -> dict:
    waiting = deque(range(cfg.num_seqs))
    prompts = {s: rng.randint(cfg.prompt_min, cfg.prompt_max) for s in waiting}
    generated: dict[int, int] = {}
    running: deque[int] = deque()
    gpu_budget = pm.tiers[0].num_blocks
    bs = layout.block_size
    steps = decode_tokens = prompt_tokens = verified = 0
    group: list[int] = []
    slice_left = 0
    t0 = time.perf_counter()

    def blocks_for_slice(s: int) -> int:
        return layout.num_blocks_for(pm.num_tokens(s) + min(cfg.slice_steps, cfg.gen_tokens - generated[s]))

    def next_group(order) -> list[int]:
        group, used = [], 0
        for s in order:
            need = blocks_for_slice(s)
            if used + need > gpu_budget:
                break
            group.append(s)
            used += need
        return group

    while waiting or running:
        # Admit while the tiers can hold the newcomer's whole life (prompt + generated tokens).
        while waiting:
            s = waiting[0]
            need = layout.num_blocks_for(prompts[s] + cfg.gen_tokens)
            if need > gpu_budget:
                raise ValueError(
                    f"sequence of {prompts[s] + cfg.gen_tokens} tokens needs {need} blocks > gpu_blocks {gpu_budget}"
                )
            reserved = sum(layout.num_blocks_for(prompts[r] + cfg.gen_tokens) - len(pm.block_table(r)) for r in running)
            if need > pm.free_blocks() - reserved:
                break
            waiting.popleft()
            pm.add_sequence(s)
            pm.append_tokens(s, prompts[s])
            kv = _pattern(layout, s, torch.arange(prompts[s])).permute(1, 2, 0, 3, 4)
            write_tokens(pm, s, 0, kv)
            prompt_tokens += prompts[s]
            generated[s] = 0
            running.append(s)
        if not running:
            raise RuntimeError("no sequence fits in the tiers; raise the capacities")
        group = [s for s in group if s in running]
        if slice_left == 0 or not group:
            running.rotate(-len(group))
            group, slice_left = next_group(running), cfg.slice_steps
        slice_left -= 1
        pm.begin_step()
        for s in group:
            pm.append_tokens(s, 1)
        writes = {s: (pm.num_tokens(s) - 1, pm.num_tokens(s)) for s in group}
        tables = pm.acquire(group, writes=writes)
        positions = torch.tensor([pm.num_tokens(s) - 1 for s in group])
        slots = torch.tensor([table[p // bs] for table, p in zip(tables, positions.tolist())])
        values = torch.cat([_pattern(layout, s, positions[i : i + 1]) for i, s in enumerate(group)])
        pool = pm.tiers[0].pool
        pool[slots.to(pool.device), :, :, (positions % bs).to(pool.device)] = values.to(pool.device, non_blocking=True)
        pm.release(group)
        if cfg.prefetch and slice_left <= 1:
            rest = list(running)[len(group) :] + list(running)[: len(group)]
            pm.prefetch(next_group(rest))
        steps += 1
        decode_tokens += len(group)
        for s in group:
            generated[s] += 1
            if generated[s] == cfg.gen_tokens:
                got = read_tokens(pm, s)
                want = _expected(layout, s, pm.num_tokens(s))
                if not torch.equal(got.view(torch.uint8), want.contiguous().view(torch.uint8)):
                    raise AssertionError(f"sequence {s}: KV read back differs from what was written")
                verified += 1
                pm.free(s)
                running.remove(s)
        if progress is not None:
            progress(verified, cfg.num_seqs)
    pm.synchronize()
    wall = time.perf_counter() - t0
    stats = pm.stats()
    return {
        "config": asdict(cfg),
        "block_nbytes": layout.block_nbytes,
        "steps": steps,
        "decode_tokens": decode_tokens,
        "prompt_tokens": prompt_tokens,
        "wall_s": wall,
        "decode_tokens_per_s": decode_tokens / wall,
        "verified_sequences": verified,
        "stats": stats,
    }


def main() -> int:
    import argparse
    import json
    from dataclasses import fields

    from tierkv.kv.stats import format_stats

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = BenchConfig()
    for f in fields(BenchConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif f.name == "layout":
            ap.add_argument(flag, choices=sorted(LAYOUT_PRESETS), default=default)
        else:
            ap.add_argument(flag, type=int if isinstance(default, int) else str, default=default)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    cfg = BenchConfig(**{f.name: getattr(args, f.name) for f in fields(BenchConfig)})
    result = run(cfg)
    print(format_stats(result["stats"]))
    print(
        f"{result['steps']} steps, {result['decode_tokens']} decode tokens in {result['wall_s']:.2f} s "
        f"({result['decode_tokens_per_s']:.0f} tokens/s of page-manager work); "
        f"{result['verified_sequences']}/{cfg.num_seqs} sequences read back bit-exact"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

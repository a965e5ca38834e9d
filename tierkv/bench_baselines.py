"""The yardsticks of `tierkv bench`: each link's copy bandwidth measured at the start of a run (the ceiling a
run's link utilisation is reported against), and the same requests through transformers as the baseline."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import torch

from tierkv.bench_report import with_spread

if TYPE_CHECKING:
    from tierkv.benchmark import BenchRequest

# -- link ceilings --------------------------------------------------------------------------------------------------


def measure_links(device: torch.device, nvme_dir: str | None, nbytes: int = 64 * 2**20) -> dict[str, float]:
    """Copy bandwidth of each link in GB/s, measured now with one contiguous transfer of `nbytes`."""
    out = {}
    host = torch.empty(nbytes, dtype=torch.uint8)
    if device.type == "cuda":
        host = host.pin_memory()
    host.random_()
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)

    def timed(fn) -> float:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        return nbytes / best / 1e9

    out["cpu->gpu"] = timed(lambda: dev.copy_(host, non_blocking=True))
    out["gpu->cpu"] = timed(lambda: host.copy_(dev, non_blocking=True))
    if nvme_dir:
        os.makedirs(nvme_dir, exist_ok=True)
        path = os.path.join(nvme_dir, ".tierkv-linktest")
        data = host.numpy()
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_DIRECT", 0)
        try:
            fd = os.open(path, flags, 0o644)
        except OSError:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            buf = _aligned(nbytes)

            def write():
                os.pwritev(fd, [buf], 0)
                os.fsync(fd)

            def read():
                os.preadv(fd, [buf], 0)

            buf[:] = data[: len(buf)]
            out["cpu->nvme"] = timed(write)
            out["nvme->cpu"] = timed(read)
        finally:
            os.close(fd)
            os.unlink(path)
    return out


def _aligned(nbytes: int):
    import numpy as np

    raw = np.empty(nbytes + 4096, dtype=np.uint8)
    skip = (-raw.ctypes.data) % 4096
    return raw[skip : skip + nbytes]


def link_ceiling(ceilings: dict[str, float], link: str) -> float | None:
    src, dst = link.split("->")
    if "nvme" in (src, dst):
        return ceilings.get("cpu->nvme" if dst == "nvme" else "nvme->cpu")
    return ceilings.get("cpu->gpu" if dst == "gpu" else "gpu->cpu")


# -- the transformers baseline ------------------------------------------------------------------------------------


def timed_generate_batch(model, prompts: list[list[int]], max_new: int) -> tuple[float, list[int]]:
    """transformers' continuous batching, greedy, no end-of-sequence token (every request runs max_new tokens): a
    short warm-up call, then one timed generate_batch() over `prompts`. Returns its wall time and the number of
    tokens each request that came back generated."""
    from transformers import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=max_new, do_sample=False, eos_token_id=None, pad_token_id=0)
    model.generate_batch(inputs=[prompts[0][:8]], generation_config=cfg, progress_bar=False)  # warm-up
    t0 = time.perf_counter()
    outs = model.generate_batch(inputs=prompts, generation_config=cfg, progress_bar=False)
    wall = time.perf_counter() - t0
    return wall, [len(o.generated_tokens) for o in outs.values()]


def run_hf(
    model_path: str, load_format: str, reqs: list[BenchRequest], device: torch.device, dtype, repeats: int = 1
) -> dict[str, dict]:
    """The same requests through transformers, each method `repeats` times (the median run, with the spread):
    generate() with the dynamic and the offloaded cache (all requests in one left-padded batch), and
    generate_batch() (its continuous batching)."""
    import gc

    from transformers import AutoModelForCausalLM

    from tierkv.loader import load_hf_config, resolve_config_path

    gc.collect()  # tierkv's runs are over: give their memory back before transformers takes its own
    if device.type == "cuda":
        torch.cuda.empty_cache()
    path = resolve_config_path(model_path)
    if load_format == "dummy" or os.path.isfile(path):
        with torch.device(device):  # initialise the random weights where they will run
            model = AutoModelForCausalLM.from_config(load_hf_config(path), dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model = model.to(device).eval()
    results = {}
    max_new = max(r.output_len for r in reqs)
    width = max(len(r.prompt_ids) for r in reqs)
    ids = torch.zeros((len(reqs), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for k, r in enumerate(reqs):
        ids[k, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
        mask[k, width - len(r.prompt_ids) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    useful = sum(r.output_len for r in reqs)
    for name, kwargs in (
        ("hf generate (dynamic cache)", {}),
        ("hf generate (offloaded cache)", {"cache_implementation": "offloaded"}),
    ):
        if "offloaded" in name and device.type != "cuda":
            results[name] = {"error": "transformers' offloaded cache needs CUDA"}
            continue
        try:
            runs = []
            for _ in range(repeats):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                model.generate(
                    ids,
                    attention_mask=mask,
                    max_new_tokens=max_new,
                    min_new_tokens=max_new,
                    do_sample=False,
                    pad_token_id=0,
                    **kwargs,
                )
                if device.type == "cuda":
                    torch.cuda.synchronize()
                wall = time.perf_counter() - t0
                runs.append({"wall_s": wall, "output_tokens": useful, "output_tokens_per_s": useful / wall})
            results[name] = with_spread(runs)
        except Exception as exc:  # e.g. out of memory at this batch size: reported, not hidden
            results[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    try:
        runs = []
        for _ in range(repeats):
            wall, lengths = timed_generate_batch(model, [r.prompt_ids for r in reqs], max_new)
            generated = sum(lengths)
            runs.append({"wall_s": wall, "output_tokens": generated, "output_tokens_per_s": generated / wall})
        results["hf generate_batch"] = with_spread(runs)
    except Exception as exc:
        results["hf generate_batch"] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    return results

"""`tierkv bench`: the offload benchmark. Workloads through the engine, swept over policies, block sizes and
tier capacities, with transformers as the baseline in the same run.

Workloads:
- synthetic: prompt and output lengths drawn uniformly from LO:HI ranges;
- shared-prefix: every request is one shared prefix plus its own suffix;
- long-context: one request with a long prompt;
- trace: a JSONL file, one request per line: {"prompt_len": N | "prompt": [ids], "output_len": M, "arrival_s": T}.
Requests arrive at once (offline) unless the trace or --request-rate spreads them out.

Per run: requests/s, output tokens/s, time to first token and time per output token percentiles, per-tier hit
rates, bytes moved per link and each link's utilisation against the copy bandwidth measured at the start
(tierkv.bench_baselines, with the transformers baseline); the table and PNG plots are tierkv.bench_report's.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import tempfile
import time
from dataclasses import dataclass

import torch

from tierkv.bench_baselines import link_ceiling, measure_links, run_hf
from tierkv.bench_report import with_spread
from tierkv.errors import ConfigError


@dataclass
class BenchRequest:
    prompt_ids: list[int]
    output_len: int
    arrival_s: float = 0.0


def _range(spec: str, what: str) -> tuple[int, int]:
    try:
        lo, _, hi = str(spec).partition(":")
        lo_i, hi_i = int(lo), int(hi or lo)
    except ValueError:
        raise ConfigError(f"{what}: {spec!r} is not N or LO:HI (integers)") from None
    if lo_i < 1 or hi_i < lo_i:
        raise ConfigError(f"{what}: {spec!r} must satisfy 1 <= LO <= HI")
    return lo_i, hi_i


def make_workload(args, vocab: int) -> list[BenchRequest]:
    rng = random.Random(args.seed)

    def tokens(n: int) -> list[int]:
        return [rng.randrange(2, vocab) for _ in range(n)]

    out_lo, out_hi = _range(args.output_len, "--output-len")
    if args.workload == "synthetic":
        p_lo, p_hi = _range(args.prompt_len, "--prompt-len")
        reqs = [
            BenchRequest(tokens(rng.randint(p_lo, p_hi)), rng.randint(out_lo, out_hi)) for _ in range(args.num_requests)
        ]
    elif args.workload == "shared-prefix":
        prefix = tokens(args.prefix_len)
        s_lo, s_hi = _range(args.prompt_len, "--prompt-len")
        reqs = [
            BenchRequest(prefix + tokens(rng.randint(s_lo, s_hi)), rng.randint(out_lo, out_hi))
            for _ in range(args.num_requests)
        ]
    elif args.workload == "long-context":
        reqs = [BenchRequest(tokens(args.context_len), out_hi)]
    elif args.workload == "trace":
        if not args.trace or not os.path.isfile(args.trace):
            raise ConfigError(f"--workload trace needs --trace FILE (a JSONL file); got {args.trace!r}")
        reqs = []
        with open(args.trace) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    r = json.loads(line)
                    prompt = r["prompt"] if "prompt" in r else tokens(int(r["prompt_len"]))
                    reqs.append(
                        BenchRequest(
                            [int(t) % vocab for t in prompt], int(r["output_len"]), float(r.get("arrival_s", 0.0))
                        )
                    )
                except (ValueError, KeyError, TypeError) as exc:
                    raise ConfigError(
                        f"--trace {args.trace}:{n}: needs prompt_len or prompt, and output_len ({exc})"
                    ) from None
    else:
        raise ConfigError(f"--workload {args.workload!r} is not synthetic, shared-prefix, long-context or trace")
    if args.request_rate and args.workload != "trace":
        t = 0.0
        for r in reqs:
            r.arrival_s = t
            t += rng.expovariate(args.request_rate)
    return reqs


# -- runs ----------------------------------------------------------------------------------------------------------


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    xs = sorted(values)

    def q(p: float) -> float:
        return xs[min(len(xs) - 1, int(round(p * (len(xs) - 1))))]

    return {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99)}


def _summarise(outputs: list, wall: float, reqs: list[BenchRequest]) -> dict:
    ttft, tpot = [], []
    for out in outputs:
        m = out.metrics
        ttft.append(m["first_token_time"] - m["arrival_time"])
        n = len(out.outputs[0].token_ids)
        if n > 1:
            tpot.append((m["finished_time"] - m["first_token_time"]) / (n - 1))
    generated = sum(len(o.token_ids) for out in outputs for o in out.outputs)
    return {
        "requests": len(outputs),
        "wall_s": wall,
        "requests_per_s": len(outputs) / wall,
        "output_tokens": generated,
        "output_tokens_per_s": generated / wall,
        "prompt_tokens": sum(len(r.prompt_ids) for r in reqs),
        "ttft_s": _percentiles(ttft),
        "tpot_s": _percentiles(tpot),
    }


def _run_requests(llm, reqs: list[BenchRequest]) -> tuple[list, float]:
    """Submit the requests at their arrival times and step the engine until all finish; (outputs, wall seconds)."""
    from tierkv.sampling import SamplingParams

    pending = sorted(enumerate(reqs), key=lambda x: x[1].arrival_s)
    outputs: dict[str, object] = {}
    base = llm.engine._arrivals
    t0 = time.perf_counter()
    i = 0
    while i < len(pending) or llm.has_unfinished():
        now = time.perf_counter() - t0
        batch = []
        while i < len(pending) and pending[i][1].arrival_s <= now:
            batch.append(pending[i])
            i += 1
        if batch:
            llm.add_requests(
                [r.prompt_ids for _, r in batch],
                [SamplingParams(max_tokens=r.output_len, temperature=0, ignore_eos=True) for _, r in batch],
                request_ids=[f"{base}-{k}" for k, _ in batch],
            )
        if llm.has_unfinished():
            for out in llm.step():
                outputs[out.request_id] = out
        elif i < len(pending):
            time.sleep(max(0.0, pending[i][1].arrival_s - (time.perf_counter() - t0)))
    llm.pm.synchronize()
    return [outputs[f"{base}-{k}"] for k in range(len(reqs))], time.perf_counter() - t0


def _phases(workload: str, llm) -> list[str]:
    """shared-prefix: cold (nothing cached), then warm with the prefix cached on the GPU, in pinned RAM, on NVMe."""
    if workload != "shared-prefix" or llm.engine.prefix is None:
        return ["run"]
    return ["cold", "warm gpu"] + [f"warm {llm.pm.tiers[k].name}" for k in llm.pm.kinds[1:]]


def run_tierkv(
    model: str,
    engine: dict,
    reqs: list[BenchRequest],
    ceilings: dict[str, float],
    workload: str = "synthetic",
    repeats: int = 1,
) -> dict:
    from tierkv.llm import LLM
    from tierkv.sampling import SamplingParams

    llm = LLM(model, **engine)
    phases = {}
    try:
        # Warm up kernels and allocators on a throwaway request.
        llm.generate(
            [reqs[0].prompt_ids[:8]],
            SamplingParams(max_tokens=2, ignore_eos=True, cache_salt="warm-up"),
            use_tqdm=False,
        )
        llm.pm.synchronize()
        for phase in _phases(workload, llm):
            runs = []
            for _ in range(repeats):  # each from the same starting state of the prefix cache
                if phase in ("run", "cold"):
                    llm.reset_prefix_cache()
                elif phase != "warm gpu":
                    llm.pm.demote_cached(phase.split()[1])
                base = llm.stats()
                outputs, wall = _run_requests(llm, reqs)
                runs.append(_phase_result(outputs, wall, reqs, base, llm.stats(), ceilings))
            phases[phase] = with_spread(runs)
    finally:
        llm.close()
    result = dict(phases["run"] if "run" in phases else phases["cold"])
    if "run" not in phases:
        result["phases"] = phases
    return result


def _phase_result(outputs, wall, reqs, base, stats, ceilings) -> dict:
    result = _summarise(outputs, wall, reqs)
    result["tiers"] = {}
    for name, t in stats["tiers"].items():
        b = base["tiers"][name]
        lookups = (t["hits"] - b["hits"]) + (t["misses"] - b["misses"])
        result["tiers"][name] = {
            "capacity_blocks": t["capacity_blocks"],
            "hit_rate": (t["hits"] - b["hits"]) / lookups if lookups else None,
            "bytes_in": t["bytes_in"] - b["bytes_in"],
            "bytes_out": t["bytes_out"] - b["bytes_out"],
            "evictions_out": t["evictions_out"] - b["evictions_out"],
        }
    result["links"] = {}
    for link, v in stats["links"].items():
        before = base["links"].get(link, {})
        nbytes = v["bytes"] - before.get("bytes", 0)
        busy = v["seconds"] - before.get("seconds", 0.0)  # time the link was copying (timed per batch)
        ceiling = link_ceiling(ceilings, link)
        gbps = nbytes / busy / 1e9 if busy > 0 else None
        result["links"][link] = {
            "bytes": nbytes,
            "busy_s": busy,
            "busy_share": busy / wall,  # of the run's wall time
            "gbps_while_busy": gbps,
            "of_ceiling": gbps / ceiling if gbps and ceiling else None,  # the copy rate against the measured one
        }
    p, q = stats["prefix"], base["prefix"]
    queried = p["queried_tokens"] - q["queried_tokens"]
    hit = p["hit_tokens"] - q["hit_tokens"]
    result["prefix"] = {
        "hit_rate": hit / queried if queried else None,
        "hit_tokens": hit,
        "hit_tokens_by_tier": {k: v - q["hit_tokens_by_tier"][k] for k, v in p["hit_tokens_by_tier"].items()},
        "recomputed_by_choice": p["recomputed_by_choice"] - q["recomputed_by_choice"],
    }
    result["engine"] = stats["engine"]
    return result


# -- the command --------------------------------------------------------------------------------------------------


def sweep(args) -> list[dict]:
    """One engine config per combination of the swept options."""
    combos = itertools.product(args.eviction, args.block_size, args.gpu_blocks, args.cpu_blocks, args.nvme_blocks)
    runs = []
    for eviction, block_size, gpu, cpu, nvme in combos:
        engine = {
            "_config": {
                "eviction": eviction,
                "block_size": block_size,
                "gpu_blocks": gpu,
                "cpu_blocks": cpu,
                "nvme_blocks": nvme,
            }
        }
        engine |= {
            "eviction": eviction,
            "block_size": block_size,
            "gpu_blocks": gpu,
            "cpu_blocks": cpu,
            "max_num_batched_tokens": args.max_num_batched_tokens,
            "load_format": args.load_format,
            "seed": args.seed,
        }
        if args.device:
            engine["device"] = args.device
        if args.dtype:
            engine["dtype"] = args.dtype
        if nvme:
            engine["nvme_blocks"] = nvme
            engine["nvme_dir"] = os.path.join(args.nvme_dir, f"run-{len(runs)}")
        runs.append(engine)
    return runs


def main(args) -> dict:
    from tierkv.config import resolve_device
    from tierkv.loader import load_hf_config, resolve_config_path
    from tierkv.model import ModelSpec

    device = resolve_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    path = resolve_config_path(args.model)
    if os.path.isfile(path):
        args.load_format = "dummy"  # a config without weights: random weights at its shapes
    spec = ModelSpec.from_hf_config(load_hf_config(path))
    reqs = make_workload(args, spec.vocab_size)
    tmp = None
    if args.nvme_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="tierkv-bench-")
        args.nvme_dir = tmp.name
    try:
        ceilings = measure_links(device, args.nvme_dir if any(args.nvme_blocks) else None)
        results = []
        for engine in sweep(args):
            label = engine.pop("_config")
            r = run_tierkv(args.model, engine, reqs, ceilings, args.workload, args.repeats)
            r["config"] = label
            results.append(r)
        baseline = None
        if args.baseline == "hf":
            dtype = (
                getattr(torch, args.dtype)
                if args.dtype
                else (torch.bfloat16 if device.type == "cuda" else torch.float32)
            )
            baseline = run_hf(args.model, args.load_format, reqs, device, dtype, args.repeats)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return {
        "workload": {
            "kind": args.workload,
            "requests": len(reqs),
            "prompt_tokens": sum(len(r.prompt_ids) for r in reqs),
            "output_tokens": sum(r.output_len for r in reqs),
            "model": args.model,
            "device": str(device),
        },
        "repeats": args.repeats,
        "link_ceilings_gbps": ceilings,
        "runs": results,
        "baseline": baseline,
    }

"""What every benchmark records beside its numbers: when, where, and the command that produced them."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time

import torch

from tierkv.kv.block import GPU


def run_meta() -> dict:
    meta = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "command": "python " + " ".join(sys.argv),
    }
    meta.update(_code_version())
    return meta


def _code_version() -> dict:
    """The commit the run's code is, as far as git can tell: `commit` (HEAD, or $TIERKV_COMMIT where the caller knows
    better) and `tree_matches_commit` (False where tracked files differ from HEAD: a copy whose `.git` is older than
    its files, as on the device machine, or uncommitted edits; then `commit` is not the code that ran)."""
    out: dict = {}
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        if head.returncode == 0:
            out["commit"] = head.stdout.strip()
            changed = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
            )
            if changed.returncode == 0:
                out["tree_matches_commit"] = not changed.stdout.strip()
    except OSError:
        pass
    if os.environ.get("TIERKV_COMMIT"):
        out["commit"] = os.environ["TIERKV_COMMIT"]
        out.pop("tree_matches_commit", None)
    return out


def require_cuda(tool: str) -> bool:
    """True where a CUDA device is visible; otherwise says so for `tool` (a GPU-only benchmark) and returns False."""
    if torch.cuda.is_available():
        return True
    print(
        f"{tool}: needs a CUDA device, and torch sees none (torch {torch.__version__}, built for CUDA "
        f"{torch.version.cuda or 'none'}). Run it on a machine with an NVIDIA GPU and a CUDA build of torch.",
        file=sys.stderr,
    )
    return False


def add_workload_args(ap, num_requests: int = 256, prompt_len: int = 1024, output_len: int = 128) -> None:
    """The workload options that the engine runs and their transformers baselines share: the model, and
    num_requests prompts of prompt_len random tokens, each generating exactly output_len tokens."""
    ap.add_argument(
        "--model", default="llama-3.1-8b", help="a preset name (dummy weights at its shape) or a checkpoint folder"
    )
    ap.add_argument("--num-requests", type=int, default=num_requests)
    ap.add_argument("--prompt-len", type=int, default=prompt_len)
    ap.add_argument("--output-len", type=int, default=output_len)


def workload_prompts(num_requests: int, prompt_len: int, vocab_size: int) -> torch.Tensor:
    """The prompts of a workload, (num_requests, prompt_len) token ids: one generator seeded 0, in request order, so
    that tierkv's runs and the transformers baselines get the same requests."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (num_requests, prompt_len), generator=g)


def write_json(path: str | None, meta: dict, **results) -> None:
    if path:
        with open(path, "w") as f:
            json.dump({"meta": meta, **results}, f, indent=2)


def append_rows(path: str | None, lines: list[str]) -> None:
    """Append markdown table rows (to BENCHMARKS.md, or a file to merge into it)."""
    if path:
        with open(path, "a") as f:
            f.writelines(line + "\n" for line in lines)


def alloc_retries() -> int:
    return torch.cuda.memory_stats().get("num_alloc_retries", 0) if torch.cuda.is_available() else 0


def warm_up(llm, prompts: list[list[int]]) -> None:
    """Compile the kernels for every kind of step a run of `prompts` has (prefill, prefill mixed with decodes,
    decode; greedy), and decode steps of one sequence (their GEMMs take another kernel, as when a run's last
    sequences drain), on short prefixes of the prompts, then `LLM.warm_up()`, so that no compilation, capture or
    cuDNN plan lands inside the timed part."""
    import tierkv

    params = tierkv.SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    warm = [p[: min(len(p), 2048)] for p in prompts[:2]]
    warm += [p[:512] for p in prompts[2 : 2 + min(len(prompts) - 2, 32)]]
    llm.generate(warm, params, use_tqdm=False)
    llm.generate([prompts[0][:64]], params, use_tqdm=False)
    # As a server starts: every token bucket's piecewise graphs captured, the prompt-attention shapes cuDNN can meet
    # within the step budget planned.
    llm.warm_up()


def timed_generation(llm, prompts, params, all_steps: list | None = None) -> tuple[float, int, list[float]]:
    """Run `prompts` to completion one engine step at a time: (wall seconds, output tokens, the wall time of each
    decode step, i.e. each step that computed no prompt tokens). `all_steps` gets, per step: seconds, prompt tokens,
    running sequences, decode graphs captured in it, seconds of Python garbage collection in it, the CUDA
    caching allocator's retries in it (an allocation that found no cached block and no free memory: it frees every
    cached block, which waits for the device, and tries again), blocks copied into the GPU tier, blocks copied out
    of it, blocks of those in that were prefetched, and whether the step was left running on the device (1) or
    completed within its call (0: asynchronous scheduling did not overlap it)."""
    import gc

    gc_time = [0.0, 0.0]  # total, start of the collection under way

    def on_gc(phase, info) -> None:
        if phase == "start":
            gc_time[1] = time.perf_counter()
        else:
            gc_time[0] += time.perf_counter() - gc_time[1]

    gc.callbacks.append(on_gc)
    graphs = llm.engine.runner.graphs
    llm.add_requests(prompts, params)
    counters = llm.engine.counters
    generated0, decode_steps = counters.generated_tokens, []
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    other = []
    gpu = llm.pm.counters[GPU]
    while llm.has_unfinished():
        prompt0, s0 = counters.prompt_tokens, time.perf_counter()
        captures0, gc0, retries0 = graphs.captures if graphs else 0, gc_time[0], alloc_retries()
        moved0 = (gpu.blocks_in, gpu.blocks_out, gpu.prefetched)
        llm.step()
        (decode_steps if counters.prompt_tokens == prompt0 else other).append(time.perf_counter() - s0)
        if all_steps is not None:
            all_steps.append(
                (
                    time.perf_counter() - s0,
                    counters.prompt_tokens - prompt0,
                    len(llm.scheduler.running),
                    (graphs.captures if graphs else 0) - captures0,
                    gc_time[0] - gc0,
                    alloc_retries() - retries0,
                    gpu.blocks_in - moved0[0],
                    gpu.blocks_out - moved0[1],
                    gpu.prefetched - moved0[2],
                    int(llm.engine._inflight is not None),
                )
            )
    gc.callbacks.remove(on_gc)
    if all_steps:
        print(
            f"decode graphs captured during the run: {sum(s[3] for s in all_steps)}; garbage collection "
            f"{sum(s[4] for s in all_steps):.2f} s, longest {max(s[4] for s in all_steps) * 1e3:.0f} ms; CUDA allocator retries "
            f"{sum(s[5] for s in all_steps)}"
        )
    print(
        f"steps: {len(other)} with prompt tokens, {sum(other):.2f} s; {len(decode_steps)} decode only, {sum(decode_steps):.2f} s"
    )
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0, counters.generated_tokens - generated0, decode_steps


def annotate(owner, names, prefix: str) -> None:
    """Wrap each method `names` of `owner` in a torch.profiler range named `prefix.name` (for trace summaries)."""
    from torch.profiler import record_function

    for name in names:
        fn = getattr(owner, name)

        def wrapped(*a, _fn=fn, _label=f"{prefix}.{name}", **k):
            with record_function(_label):
                return _fn(*a, **k)

        setattr(owner, name, wrapped)


def union(ranges: list[tuple[float, float]]) -> tuple[float, list[tuple[float, float]]]:
    """Total length covered by the (start, end) ranges, and the gaps between the covered stretches."""
    total, end, gaps = 0.0, None, []
    for s, e in sorted(ranges):
        if end is None or s > end:
            if end is not None:
                gaps.append((end, s))
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total, gaps


def ms_and_calls_by_name(events, name=lambda e: e.name) -> dict[str, tuple[float, int]]:
    """Total duration in ms and number of profiler events per name (`name(event)`), longest first."""
    totals: dict[str, tuple[float, int]] = {}
    for e in events:
        key = name(e)
        ms, calls = totals.get(key, (0.0, 0))
        totals[key] = (ms + (e.time_range.end - e.time_range.start) / 1e3, calls + 1)
    return dict(sorted(totals.items(), key=lambda kv: -kv[1][0]))


def ms_by_name(events) -> dict[str, float]:
    """Total duration in ms of profiler events per name, longest first."""
    return {k: ms for k, (ms, _) in ms_and_calls_by_name(events).items()}


def log_compiles() -> None:
    """Print each Triton compilation (a new specialisation in the middle of a run costs seconds)."""
    try:
        from triton.runtime.jit import JITFunction
    except ImportError:
        return
    real = JITFunction._do_compile

    def logged(self, *a, **k):
        t = time.perf_counter()
        out = real(self, *a, **k)
        constexprs = a[3] if len(a) > 3 else ""
        print(
            f"  compiled {getattr(self.fn, '__name__', self)} in {time.perf_counter() - t:.2f} s (constexprs {str(constexprs)[:160]})"
        )
        return out

    JITFunction._do_compile = logged

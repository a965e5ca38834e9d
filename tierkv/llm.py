"""`tierkv.LLM`: the Python API, in the shape users know from vLLM."""

from __future__ import annotations

import dataclasses
import gc
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import fields

import torch

from tierkv import inputs
from tierkv.config import EngineConfig, PageManagerConfig, resolve_blocks, resolve_device
from tierkv.engine import Engine
from tierkv.errors import CapacityError, ConfigError, TierKVError
from tierkv.layout import KVLayout
from tierkv.loader import load_model
from tierkv.outputs import RequestOutput
from tierkv.page_manager import PageManager
from tierkv.prefix_cache import PrefixHasher, PrefixStats, model_fingerprint
from tierkv.sampling import SamplingParams
from tierkv.scheduler import Scheduler
from tierkv.sizes import format_nbytes

MIN_GPU_BLOCKS = 2  # one step's window: the blocks its new tokens are written into (a chunk may straddle two)

PromptType = str | Sequence[int]


def _ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class LLM:
    """A model with a tiered paged KV cache (GPU memory, pinned CPU memory, NVMe files).

        llm = tierkv.LLM("path/to/checkpoint", gpu_memory="20GiB", cpu_memory="64GiB", nvme_dir="/mnt/nvme/kv")
        outputs = llm.generate(["Once upon a time"], tierkv.SamplingParams(max_tokens=64, temperature=0))

    Keyword arguments are the fields of `tierkv.config.EngineConfig`.
    """

    def __init__(self, model: str, **kwargs) -> None:
        known = {f.name for f in fields(EngineConfig)} - {"model"}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ConfigError(f"LLM() got unknown option(s) {unknown}; known options: {sorted(known)}")
        self.config = cfg = EngineConfig(model=model, **kwargs)
        device = resolve_device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._closed = False
        self._broken: str | None = None  # why no more steps can run (tensor parallelism after a failed step)
        self._queued: set[int] = set()  # arrivals of add_requests() requests not yet returned by step()
        self._ready: list = []  # those that finished, for the next step() to return
        self._driver = tp = None
        if cfg.tensor_parallel_size > 1:
            from tierkv import parallel

            tp, device, workers = parallel.start(cfg, device)  # under torchrun, ranks other than 0 never return
            self._driver = parallel.Driver(tp, workers, cfg.tp_timeout_s)
        try:
            self._build(cfg, device, tp)
        except BaseException as exc:
            if self._driver is not None:
                try:
                    if not isinstance(exc, TierKVError) or isinstance(exc, parallel.WorkerError):
                        self._driver.raise_if_worker_failed(exc)  # a worker's failure, named, if that is what it was
                finally:
                    self._driver.workers.kill()
                    parallel.shutdown_group(self._driver.tp)
            raise

    def _build(self, cfg: EngineConfig, device: torch.device, tp) -> None:
        self.loaded, pm = setup_rank(cfg, device, tp)
        if cfg.tokenizer is not None:
            from tierkv.loader import load_tokenizer

            self.loaded.tokenizer = load_tokenizer(cfg.tokenizer)
        spec = self.loaded.spec
        self.layout = pm.layout
        self.fingerprint = pm.config.store_tag
        gpu, cpu, nvme = tier_blocks(pm)
        self.max_model_len = cfg.max_model_len or spec.max_position_embeddings or 1 << 30
        if self._driver is not None:
            from tierkv.parallel import RecordingPageManager

            pm = RecordingPageManager(pm, self._driver)
        self.pm = pm
        self.scheduler = Scheduler(
            cfg.block_size,
            gpu,
            gpu + cpu + nvme,
            cfg.max_num_batched_tokens,
            cfg.max_num_seqs,
            cfg.slice_steps,
            cfg.oversubscribe,
        )
        hasher = PrefixHasher(self.fingerprint, cfg.block_size) if cfg.enable_prefix_caching else None
        self.engine = Engine(
            self.loaded,
            self.pm,
            self.scheduler,
            cfg.staging_blocks,
            cfg.seed,
            cfg.prefetch,
            hasher,
            cfg.prefix_load,
            cuda_graphs=cfg.cuda_graphs and self._driver is None,
            async_scheduling=cfg.async_scheduling,
        )
        self.engine.tp_driver = self._driver
        if hasher is not None and cfg.prefix_load == "auto":
            self._calibrate()
        # Everything tracked so far (the model, the tiers, and the ~400k objects of the imported libraries) leaves
        # the cyclic collector's view: a full collection over them took 0.2-0.3 s and, landing between two steps,
        # stalled the GPU that long (H100, item 1 of the fast-path benchmarks). close() gives them back.
        gc.freeze()

    def _calibrate(self) -> None:
        """Measure what the load-or-recompute choice needs: each lower tier's time to bring blocks to the GPU
        (through the page manager's own paths) and the prefill speed (a throwaway prompt, run twice: the first
        run also compiles the kernels)."""
        pm, bs = self.pm, self.layout.block_size
        n = min(8, pm.tiers[0].num_blocks - 1, pm.free_blocks() // 2)
        if n >= 1 and len(pm.kinds) > 1:
            pm.add_sequence("__probe__")
            pm.append_tokens("__probe__", n * bs)
            pm.acquire(["__probe__"], writes={"__probe__": (0, n * bs)})
            pm.release(["__probe__"])
            for kind in pm.kinds[1:]:
                pm.evict(["__probe__"], to=pm.tiers[kind].name)
                pm.synchronize()
                if kind == 2:
                    pm.tiers[kind].store.drop_page_cache()
                pm.acquire(["__probe__"])
                pm.release(["__probe__"])
                pm.synchronize()
            pm.free("__probe__")
        engine = self.engine
        engine.register_blocks = False
        try:
            gpu, cpu = pm.tiers[0].num_blocks, pm.tiers[1].num_blocks if 1 in pm.tiers else 0
            fits = min(gpu + cpu, pm.free_blocks() // 2) * bs - 1  # a probe that needs no more than the tiers give
            length = min(
                max(4 * bs, 2 * engine.chooser.MIN_OBSERVED_TOKENS),
                self.max_model_len - 1,
                fits,
                self.config.max_num_batched_tokens,
            )
            if length >= 2:
                probe = [int(t) % self.loaded.spec.vocab_size for t in range(7, 7 + length)]
                for _ in range(2):
                    self.generate([probe], SamplingParams(max_tokens=1, cache_salt="__calibration__"), use_tqdm=False)
        finally:
            engine.register_blocks = True
            engine.prefix_stats = PrefixStats()
            engine.counters = type(engine.counters)()
            engine.chooser.observe_links(pm.mover.links)  # keep the measured bandwidths, not the traffic
            self.pm.reset_counters()

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix (in memory and in the NVMe store's index); returns the blocks dropped."""
        self._usable()
        return self.pm.reset_prefix_cache()

    def get_tokenizer(self):
        return self.loaded.tokenizer

    # -- requests ------------------------------------------------------------------------------------------------
    def _usable(self) -> None:
        """Refuse work on a closed engine, or on one whose tensor-parallel ranks can no longer agree."""
        if self._closed:
            raise ConfigError("this LLM is closed; create a new tierkv.LLM(...) to run more requests")
        if self._broken is not None:
            raise TierKVError(f"this LLM cannot run more steps: {self._broken}; close it and create a new one")

    def _prepare(self, prompts, sampling_params) -> list[tuple[str | None, list[int], SamplingParams]]:
        """Tokenize and check every prompt before anything runs, so a bad one fails the call, not the run."""
        prompts = inputs.prompt_list(prompts)
        params = inputs.sampling_list(sampling_params, len(prompts))
        tok = self.loaded.tokenizer
        vocab = self.loaded.spec.vocab_size
        prepared = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            if isinstance(prompt, str):
                if tok is None:
                    raise ConfigError(
                        f"prompt {i} is text but the model has no tokenizer; pass token ids or tokenizer="
                    )
                if not prompt:
                    raise ConfigError(f"prompt {i} is an empty string; give some text")
                ids = inputs.token_ids(tok(prompt).input_ids, f"prompt {i}", vocab)
                text = prompt
            else:
                ids = inputs.token_ids(prompt, f"prompt {i}", vocab)
                text = None
            inputs.check_request(f"prompt {i}", len(ids), p, vocab, self.max_model_len)
            prepared.append((text, ids, p))
        self._check_capacity(prepared)
        return prepared

    def _check_capacity(self, prepared) -> None:
        gpu, cpu, nvme = tier_blocks(self.pm)
        for i, (_, ids, p) in enumerate(prepared):
            check_request_fits(f"prompt {i}", len(ids), p, self.scheduler, gpu, cpu, nvme)

    def _add(self, prompts, sampling_params, request_ids=None) -> list:
        self._usable()
        prepared = self._prepare(prompts, sampling_params)
        inputs.request_ids(request_ids, len(prepared), {r.request_id for r in self.engine.live.values()})
        base = self.engine._arrivals
        ids = (
            [str(rid) for rid in request_ids]
            if request_ids is not None
            else [str(base + i) for i in range(len(prepared))]
        )
        added = []
        try:
            for i, (rid, (text, tokens, p)) in enumerate(zip(ids, prepared)):
                added.append(self.engine.add_request(rid, i, text, tokens, p))
        except BaseException:
            self.engine.abort(added)  # all of the call or none of it
            raise
        return added

    def add_requests(self, prompts, sampling_params=None, request_ids: list[str] | None = None) -> list[str]:
        """Queue prompts for `step()`. Every prompt is checked first: a bad one queues nothing. Returns request ids
        (`request_ids` if given: unique, and not those of requests still running)."""
        added = self._add(prompts, sampling_params, request_ids)
        self._queued.update(r.arrival for r in added)
        return [r.request_id for r in added]

    def _step(self) -> list:
        """One engine step; afterwards (also after a failed one) the queued requests that finished are set aside
        for `step()`, wherever they finished (a `generate()` call runs steps too)."""
        self._usable()
        try:
            return self.engine.step()
        except BaseException as exc:
            if self._driver is not None:
                self._broken = f"a step failed under tensor parallelism ({type(exc).__name__}: {exc})"
            raise
        finally:
            for req in self.engine.take_finished():
                if req.arrival in self._queued:
                    self._queued.discard(req.arrival)
                    if not req.aborted:  # an abort is reported once: by the exception of the step that caused it
                        self._ready.append(req)

    def step(self) -> list[RequestOutput]:
        """Run one engine step; returns the requests queued by `add_requests` that have finished since the last
        call (in this step, or in steps a `generate()` ran). A step that fails aborts the requests it was running
        (their ids are in the exception's `aborted_request_ids`); the next call works."""
        self._step()
        ready, self._ready = self._ready, []
        return [req.output() for req in ready]

    def abort(self, request_ids) -> int:
        """Stop requests by id (queued or running): their KV blocks are freed in every tier at once, and they are
        not returned by `step()`. Ids of finished or unknown requests are ignored. Returns how many were stopped."""
        self._usable()
        wanted = {str(rid) for rid in ([request_ids] if isinstance(request_ids, (str, int)) else request_ids)}
        found = [r for r in self.engine.live.values() if r.request_id in wanted]
        self.engine.abort(found)
        for req in self.engine.take_finished():
            if req.arrival in self._queued:
                self._queued.discard(req.arrival)
                if not req.aborted:
                    self._ready.append(req)
        return len(found)

    def has_unfinished(self) -> bool:
        return self.engine.has_unfinished or bool(self._ready)

    def kv_blocks_by_tier(self) -> dict[str, int]:
        """Live KV blocks in each tier now."""
        return {self.pm.tiers[k].name: self.pm.resident(k) for k in self.pm.kinds}

    def generate(
        self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None, use_tqdm: bool = True
    ) -> list[RequestOutput]:
        """Run the prompts (strings or token-id lists) to completion; one RequestOutput per prompt, in order.

        If anything interrupts it (an error, Ctrl-C), the call's unfinished requests are aborted, their blocks
        freed, and the error raised; the LLM stays usable."""
        requests = self._add(prompts, sampling_params)
        bar = None
        try:
            if use_tqdm:
                from tqdm import tqdm

                bar = tqdm(total=len(requests), desc="generating", unit="req", dynamic_ncols=True)
            done = 0
            t0 = time.perf_counter()
            tokens0 = self.engine.counters.generated_tokens
            while not all(r.finished for r in requests):
                self._step()
                if bar is not None:
                    now = sum(r.finished for r in requests)
                    rate = (self.engine.counters.generated_tokens - tokens0) / max(1e-9, time.perf_counter() - t0)
                    bar.set_postfix_str(f"{rate:.0f} tok/s", refresh=False)
                    bar.update(now - done)
                    done = now
        except BaseException:
            self._abort_own(requests)
            raise
        finally:
            if bar is not None:
                bar.close()
        return [r.output() for r in requests]

    def _abort_own(self, requests) -> None:
        """A call that ends early stops its own unfinished requests (nobody else would collect them)."""
        if self._broken is None and not self._closed:
            self.engine.abort([r for r in requests if not r.finished])
            self.engine.take_finished()

    def stream(
        self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None
    ) -> Iterator[RequestOutput]:
        """Like generate, but yields a RequestOutput (cumulative, as in vLLM) each time a request gets new tokens.
        Leaving the loop early (break, an error) aborts the call's unfinished requests and frees their blocks."""
        requests = self._add(prompts, sampling_params)
        mine = {r.arrival for r in requests}
        try:
            while not all(r.finished for r in requests):
                for req in self._step():
                    if req.arrival in mine:
                        yield req.output()
        finally:
            self._abort_own(requests)

    # -- figures and shutdown --------------------------------------------------------------------------------------
    def stats(self) -> dict:
        """The page manager's per-tier stats plus the scheduler's and engine's figures."""
        c = self.engine.counters
        s = self.pm.stats()
        s["engine"] = {
            "steps": c.steps,
            "prompt_tokens": c.prompt_tokens,
            "generated_tokens": c.generated_tokens,
            "busy_s": c.busy_s,
            "generated_tokens_per_s": c.generated_tokens / c.busy_s if c.busy_s else None,
            "preemptions": self.scheduler.preemptions,
            "streamed_steps": c.streamed_steps,
            "deferred_steps": c.deferred_steps,
            "graph_steps": self.engine.graphs.replays if self.engine.graphs is not None else 0,
            "graphs_captured": self.engine.graphs.captures if self.engine.graphs is not None else 0,
            # graph steps that waited layer by layer for blocks still arriving (swapped in, prefetched late)
            "graph_steps_gated": self.engine.graphs.gates.armed
            if self.engine.graphs is not None and self.engine.graphs.gates
            else 0,
            # steps run as piecewise graphs (eager attention between graphs of the rest), and their buckets captured
            "piecewise_steps": self.engine.pieces.replays if self.engine.pieces is not None else 0,
            "piecewise_captured": self.engine.pieces.captures if self.engine.pieces is not None else 0,
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
        }
        s["prefix"] = self.engine.prefix_stats.as_dict()
        if self._driver is not None:
            from tierkv.parallel import total_stats

            per_rank = self._driver.gather_stats(s.copy())
            s["tensor_parallel"] = {"size": len(per_rank), "per_rank": per_rank, "total": total_stats(per_rank)}
        return s

    def close(self) -> None:
        """Finish: write the cached prefixes that live only in faster tiers down to NVMe (so that the next process
        on this nvme_dir finds them), then release the tiers and the directory. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        gc.unfreeze()  # what init froze (this engine's objects among them) can be collected again
        try:
            self.engine.drop_inflight()
            for seq in list(self.scheduler.running):
                self.pm.free(seq.seq_id)
            self.scheduler.running.clear()
            if self.engine.hasher is not None and self._driver is None:
                self.pm.persist_keyed()
        finally:
            try:
                if self._driver is not None:
                    self._driver.close()
            finally:
                self.pm.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def setup_rank(cfg: EngineConfig, device: torch.device, tp=None) -> tuple:
    """Load the model (this rank's shard under tensor parallelism) and build its page manager: (loaded, pm).

    Under tensor parallelism every rank runs this; the ranks agree on the tiers' sizes in blocks (the smallest any
    rank can hold), and each rank's NVMe files live in `nvme_dir/rank-N`."""
    loaded = load_model(cfg.model, device, _dtype(cfg.dtype), cfg.load_format, cfg.seed, tp=tp)
    spec = loaded.spec
    dtype = next(loaded.model.parameters()).dtype
    layout = KVLayout(spec.num_layers, spec.num_kv_heads, spec.head_dim, dtype, cfg.block_size)
    nvme_dir = cfg.nvme_dir if tp is None or cfg.nvme_dir is None else os.path.join(cfg.nvme_dir, f"rank-{tp.rank}")
    ranks = 1 if tp is None else tp.world
    caps = resolve_capacities(dataclasses.replace(cfg, nvme_dir=nvme_dir), layout.block_nbytes, device, ranks)
    if tp is not None:
        from tierkv.parallel import broadcast_plan, gather_objects

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
        )
    )
    return loaded, pm


def resolve_capacities(
    cfg: EngineConfig, block_nbytes: int, device: torch.device, ranks: int = 1
) -> tuple[int, int, int]:
    """Blocks per tier (gpu, cpu, nvme): as given, or defaults from the machine (see EngineConfig). With `ranks`
    tensor-parallel ranks on the host, the defaults that share one resource (RAM, the disk) are split between them."""
    if cfg.gpu_blocks is not None or cfg.gpu_memory is not None:
        gpu = resolve_blocks("gpu", cfg.gpu_blocks, cfg.gpu_memory, block_nbytes)
    elif device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        activations = 2 * 2**30  # room for one step's activations and the streaming staging
        gpu = max(0, int(free - (1 - cfg.gpu_memory_utilization) * total) - activations) // block_nbytes
    else:
        gpu = min(2**30, _ram_bytes() // 10) // ranks // block_nbytes
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
    """Raise CapacityError if a request can never run with these tiers (all of them together, or streaming)."""
    need = scheduler.reservation(_Probe([0] * prompt_len, params))
    total = gpu + cpu + nvme
    if need > total:
        raise CapacityError(
            f"{what} ({prompt_len} tokens, max_tokens {params.max_tokens}, n {params.n}) may need {need} KV blocks but all "
            f"tiers together hold {total} (gpu {gpu} + cpu {cpu} + nvme {nvme}); "
            "raise the tier capacities (nvme_dir/nvme_memory is the cheapest) or shorten the request"
        )
    longest = scheduler.blocks_for(prompt_len + params.max_tokens)
    if longest > gpu and longest - gpu > cpu:
        raise CapacityError(
            f"{what} needs {longest} blocks, more than the GPU tier's {gpu}: its older blocks are streamed from the "
            f"CPU tier, which must hold {longest - gpu} of them but holds {cpu}; raise cpu_blocks/cpu_memory or gpu_blocks"
        )


class _Probe:
    """Just enough of a Request for Scheduler.reservation."""

    def __init__(self, prompt_ids, params) -> None:
        self.prompt_ids = prompt_ids
        self.params = params


def _dtype(name):
    if name is None:
        return None
    from tierkv.layout import parse_dtype

    return parse_dtype(name)

"""`tierkv.LLM`: the Python API, in the shape users know from vLLM."""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator, Sequence
from dataclasses import fields

import torch

from tierkv import inputs, start_up
from tierkv.beam import BeamSearchOutput, BeamSearchParams, BeamSearchSequence
from tierkv.capacity import check_request_fits, make_scheduler, tier_blocks
from tierkv.config import EngineConfig, resolve_device
from tierkv.engine import Engine
from tierkv.errors import ConfigError, TierKVError, WorkerError
from tierkv.kv.prefix_cache import PrefixHasher, PrefixStats
from tierkv.outputs import RequestOutput
from tierkv.rank import setup_rank
from tierkv.sampling import SamplingParams
from tierkv.tp.driver import Driver, RecordingPageManager, total_stats
from tierkv.tp.group import shutdown_group
from tierkv.tp.launcher import start as start_ranks

PromptType = str | Sequence[int]


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
            tp, device, workers = start_ranks(cfg, device)  # under torchrun, ranks other than 0 never return
            self._driver = Driver(tp, workers, cfg.tp_timeout_s)
        try:
            self._build(cfg, device, tp)
        except BaseException as exc:
            if self._driver is not None:
                try:
                    if not isinstance(exc, TierKVError) or isinstance(exc, WorkerError):
                        self._driver.raise_if_worker_failed(exc)  # a worker's failure, named, if that is what it was
                finally:
                    self._driver.workers.kill()
                    shutdown_group(self._driver.tp)
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
            pm = RecordingPageManager(pm, self._driver)
        self.pm = pm
        self.scheduler = make_scheduler(cfg, gpu, cpu, nvme)
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
            start_up.calibrate(self)
        # Everything tracked so far (the model, the tiers, and the ~400k objects of the imported libraries) leaves
        # the cyclic collector's view: a full collection over them took 0.2-0.3 s and, landing between two steps,
        # stalled the GPU that long (H100, item 1 of the fast-path benchmarks). close() gives them back.
        gc.freeze()

    def warm_up(self) -> None:
        """Do now what the first requests would otherwise wait for: compile the kernels of a prefill step and of
        decode steps and capture every CUDA graph the engine uses (seconds on a GPU). `tierkv serve` calls it before
        it accepts connections. The throwaway request it runs is not counted and leaves no cached prefix."""
        self._usable()
        start_up.warm_up(self)

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

    def _prepare(self, prompts, sampling_params) -> list[tuple[str | None, list[int], SamplingParams, object]]:
        """Tokenize and check every prompt before anything runs, so a bad one fails the call, not the run. Each
        entry: (text, token ids, the SamplingParams it is scheduled by, its BeamSearchParams or None)."""
        prompts = inputs.prompt_list(prompts)
        params = inputs.sampling_list(sampling_params, len(prompts))
        tok = self.loaded.tokenizer
        vocab = self.loaded.spec.vocab_size
        prepared = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            prompt = inputs.unwrap_prompt(prompt, f"prompt {i}")
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
            beam = p if isinstance(p, BeamSearchParams) else None
            p = beam.reservation() if beam is not None else p
            inputs.check_request(f"prompt {i}", len(ids), p, vocab, self.max_model_len)
            prepared.append((text, ids, p, beam))
        self._check_capacity(prepared)
        return prepared

    def _check_capacity(self, prepared) -> None:
        gpu, cpu, nvme = tier_blocks(self.pm)
        for i, (_, ids, p, _) in enumerate(prepared):
            check_request_fits(f"prompt {i}", len(ids), p, self.scheduler, gpu, cpu, nvme)

    def _add(self, prompts, sampling_params, request_ids=None, priority=None) -> list:
        self._usable()
        prepared = self._prepare(prompts, sampling_params)
        inputs.request_ids(request_ids, len(prepared), {r.request_id for r in self.engine.live.values()})
        priorities = inputs.priorities(priority, len(prepared), self.config.scheduling_policy)
        base = self.engine._arrivals
        ids = (
            [str(rid) for rid in request_ids]
            if request_ids is not None
            else [str(base + i) for i in range(len(prepared))]
        )
        added = []
        try:
            for i, (rid, (text, tokens, p, beam)) in enumerate(zip(ids, prepared)):
                added.append(self.engine.add_request(rid, i, text, tokens, p, priorities[i], beam))
        except BaseException:
            self.engine.abort(added)  # all of the call or none of it
            raise
        return added

    def add_requests(
        self, prompts, sampling_params=None, request_ids: list[str] | None = None, priority: list[int] | None = None
    ) -> list[str]:
        """Queue prompts for `step()`. Every prompt is checked first: a bad one queues nothing. Returns request ids
        (`request_ids` if given: unique, and not those of requests still running). `priority`: one int per prompt
        (lower runs first) under scheduling_policy="priority"."""
        added = self._add(prompts, sampling_params, request_ids, priority)
        self._queued.update(r.arrival for r in added)
        return [r.request_id for r in added]

    def submit(
        self, prompts, sampling_params=None, request_ids: list[str] | None = None, priority: list[int] | None = None
    ) -> list[str]:
        """Queue prompts whose progress `step_outputs()` reports, every step (a server's way in; `step()` does not
        return them). Checked as add_requests checks; returns their ids."""
        return [r.request_id for r in self._add(prompts, sampling_params, request_ids, priority)]

    def step_outputs(self) -> list[RequestOutput]:
        """Run one engine step; the output so far (cumulative, as in vLLM) of every request that got new tokens or
        finished in it, whichever way it was queued."""
        return [req.output() for req in self._step()]

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
            self._collect_finished()

    def _collect_finished(self) -> None:
        """Set aside for `step()` the queued requests the engine finished (wherever they finished)."""
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
        self._collect_finished()
        return len(found)

    abort_request = abort  # vLLM's name for it

    def has_unfinished(self) -> bool:
        return self.engine.has_unfinished or bool(self._ready)

    def kv_blocks_by_tier(self) -> dict[str, int]:
        """Live KV blocks in each tier now."""
        return {self.pm.tiers[k].name: self.pm.resident(k) for k in self.pm.kinds}

    def generate(
        self,
        prompts,
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: list[int] | None = None,
    ) -> list[RequestOutput]:
        """Run the prompts (strings or token-id lists) to completion; one RequestOutput per prompt, in order.
        `priority`: one int per prompt, lower first (scheduling_policy="priority" only).

        If anything interrupts it (an error, Ctrl-C), the call's unfinished requests are aborted, their blocks
        freed, and the error raised; the LLM stays usable."""
        requests = self._add(prompts, sampling_params, priority=priority)
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

    def beam_search(self, prompts, params: BeamSearchParams, use_tqdm: bool = False) -> list[BeamSearchOutput]:
        """Beam search over each prompt (strings or token-id lists), as transformers' generate(num_beams=k) decides
        it, inside the engine: the beams share KV blocks (copy-on-write) through every tier, beside any other
        requests. One BeamSearchOutput per prompt: its beam_width beams, best first."""
        if not isinstance(params, BeamSearchParams):
            raise ConfigError(f"beam_search: params must be a tierkv.BeamSearchParams, got {type(params).__name__}")
        if params.beam_width == 1:  # transformers' num_beams=1 is greedy decoding: the same here
            return self._greedy_as_beams(prompts, params)
        requests = self._add(prompts, params)
        try:
            while not all(r.finished for r in requests):
                self._step()
        except BaseException:
            self._abort_own(requests)
            raise
        return [
            BeamSearchOutput(
                [
                    BeamSearchSequence(req.prompt_ids + tokens, text, cum, score, reason)
                    for tokens, cum, score, reason, text in req.beam.results()
                ]
            )
            for req in requests
        ]

    def _greedy_as_beams(self, prompts, params: BeamSearchParams) -> list[BeamSearchOutput]:
        greedy = SamplingParams(max_tokens=params.max_tokens, temperature=0, ignore_eos=params.ignore_eos, logprobs=0)
        outs = []
        for out in self.generate(prompts, greedy, use_tqdm=False):
            c = out.outputs[0]
            score = c.cumulative_logprob / (len(c.token_ids) ** params.length_penalty)
            reason = "stop" if c.finish_reason == "stop" else "length"
            beam = BeamSearchSequence(out.prompt_token_ids + c.token_ids, c.text, c.cumulative_logprob, score, reason)
            outs.append(BeamSearchOutput([beam]))
        return outs

    def chat(
        self,
        messages,
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Like generate, for chats: `messages` is one conversation (a list of {"role", "content"} dicts) or a list of
        them, each turned into tokens by the model's chat template (which adds any special tokens itself)."""
        self._usable()
        convs = (
            [messages]
            if isinstance(messages, (list, tuple)) and messages and isinstance(messages[0], dict)
            else messages
        )
        if not isinstance(convs, (list, tuple)) or not convs:
            raise ConfigError("chat: give one conversation (a list of {'role', 'content'} dicts) or a list of them")
        tok = self.loaded.tokenizer
        ids = [
            inputs.chat_token_ids(tok, conv, f"conversation {i}", add_generation_prompt) for i, conv in enumerate(convs)
        ]
        return self.generate(ids, sampling_params, use_tqdm=use_tqdm)

    def _abort_own(self, requests) -> None:
        """A call that ends early stops its own unfinished requests (nobody else would collect them)."""
        if self._broken is None and not self._closed:
            self.engine.abort([r for r in requests if not r.finished])
            self._collect_finished()

    def stream(
        self,
        prompts,
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        priority: list[int] | None = None,
    ) -> Iterator[RequestOutput]:
        """Like generate, but yields a RequestOutput (cumulative, as in vLLM) each time a request gets new tokens.
        Leaving the loop early (break, an error) aborts the call's unfinished requests and frees their blocks."""
        requests = self._add(prompts, sampling_params, priority=priority)
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
        graphs, pieces = self.engine.runner.graphs, self.engine.runner.pieces
        s["engine"] = {
            "steps": c.steps,
            "prompt_tokens": c.prompt_tokens,
            "generated_tokens": c.generated_tokens,
            "busy_s": c.busy_s,
            "generated_tokens_per_s": c.generated_tokens / c.busy_s if c.busy_s else None,
            "preemptions": self.scheduler.preemptions,
            "streamed_steps": c.streamed_steps,
            "deferred_steps": c.deferred_steps,
            "graph_steps": graphs.replays if graphs is not None else 0,
            "graphs_captured": graphs.captures if graphs is not None else 0,
            # graph steps that waited layer by layer for blocks still arriving (swapped in, prefetched late)
            "graph_steps_gated": graphs.gates.armed if graphs is not None and graphs.gates else 0,
            # steps run as piecewise graphs (eager attention between graphs of the rest), and their buckets captured
            "piecewise_steps": pieces.replays if pieces is not None else 0,
            "piecewise_captured": pieces.captures if pieces is not None else 0,
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
        }
        s["prefix"] = (self.engine.prefix.stats if self.engine.prefix is not None else PrefixStats()).as_dict()
        if self.engine.prefix is not None:  # what the load-or-recompute choice goes by now
            chooser = self.engine.prefix.chooser
            s["prefix"]["choice_prefill_tokens_per_s"] = chooser.prefill_tokens_per_s
            s["prefix"]["choice_link_bytes_per_s"] = dict(chooser.bandwidth)
        if self._driver is not None:
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
            self.engine.runner.close()
            for seq in list(self.scheduler.running):
                self.pm.free(seq.seq_id)
            self.scheduler.running.clear()
            if self.engine.prefix is not None and self._driver is None:
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

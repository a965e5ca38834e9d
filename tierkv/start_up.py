"""What an `LLM` does once, before its first request: measure what the load-or-recompute choice needs
(`calibrate`), and compile and capture what a first request would otherwise wait for (`warm_up`). Both run
throwaway requests whose steps are not counted and whose blocks are not kept as cached prefixes."""

from __future__ import annotations

import contextlib

from tierkv.kernels import prompt_attention
from tierkv.kv.prefix_cache import PrefixStats
from tierkv.sampling import SamplingParams


@contextlib.contextmanager
def throwaway(llm):
    """Work inside is left out of the counters and the prefix cache (the link rates it measured are kept)."""
    engine, pm = llm.engine, llm.pm
    if engine.prefix is not None:
        engine.prefix.register_blocks = False
    try:
        yield
    finally:
        if engine.prefix is not None:
            engine.prefix.register_blocks = True
            engine.prefix.stats = PrefixStats()
            engine.prefix.chooser.observe_links(pm.mover.links)  # keep the measured bandwidths, not the traffic
        engine.counters = type(engine.counters)()
        pm.reset_counters()


def _probe(llm, length: int) -> list[int]:
    return [t % llm.loaded.spec.vocab_size for t in range(7, 7 + length)]


def calibrate(llm) -> None:
    """Each lower tier's time to bring blocks to the GPU (through the page manager's own paths) and the prefill speed
    (a throwaway prompt, run twice: the first run also compiles the kernels)."""
    pm, bs, engine = llm.pm, llm.layout.block_size, llm.engine
    n = min(8, pm.tiers[0].num_blocks - 1, pm.free_blocks() // 2)
    # Twice, keeping the second: the first round trip also compiles the copy kernels, and a copy timed with
    # its compile reads as a link a hundred times slower (then every prefix found below the GPU is recomputed,
    # and with nothing loaded the rate is never measured again).
    for attempt in range(2 if n >= 1 and len(pm.kinds) > 1 else 0):
        if attempt:
            pm.mover.collect()
            pm.mover.links.clear()
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
    with throwaway(llm):
        gpu, cpu = pm.tiers[0].num_blocks, pm.tiers[1].num_blocks if 1 in pm.tiers else 0
        fits = min(gpu + cpu, pm.free_blocks() // 2) * bs - 1  # a probe that needs no more than the tiers give
        length = min(
            max(4 * bs, 2 * engine.prefix.chooser.MIN_OBSERVED_TOKENS),
            llm.max_model_len - 1,
            fits,
            llm.config.max_num_batched_tokens,
        )
        if length >= 2:
            for _ in range(2):
                llm.generate(
                    [_probe(llm, length)], SamplingParams(max_tokens=1, cache_salt="__calibration__"), use_tqdm=False
                )


def warm_up(llm) -> None:
    """A throwaway prompt of two blocks and a bit through a prefill step and decode steps (the KV write, fused, GEMV
    and decode-attention kernels compile, and the first decode step captures the decode graph of every batch and
    table-width bucket, as vLLM captures its graphs at start-up), then every token bucket's piecewise graphs, and the
    cuDNN plans of the prompt-attention shapes the step budget allows (cuDNN keeps its plans per thread: call this
    on the thread that will run the engine's steps)."""
    bs = llm.layout.block_size
    # Within every limit a request has (a server may run a tiny max_model_len or tiers): start-up must not fail here.
    room = min(llm.max_model_len, llm.pm.free_blocks() * bs)
    max_tokens = min(3, room - 1)
    length = min(2 * bs + 3, room - max_tokens, llm.config.max_num_batched_tokens)
    graphs = llm.engine.runner.graphs
    if max_tokens >= 1 and length >= 1:
        if graphs is not None:  # its first decode step captures every decode graph a step can replay
            graphs.capture_every_bucket_at_next_step(-(-llm.max_model_len // bs))
        with throwaway(llm):
            llm.generate(
                [_probe(llm, length)],
                SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, cache_salt="__warm_up__"),
                use_tqdm=False,
            )
        if graphs is not None:
            graphs.capture_every_bucket_at_next_step(0)  # (a request of one token made no decode step: not later)
    pieces = llm.engine.runner.pieces
    if pieces is not None:
        pieces.capture_all()
    # The throwaway prompt's step met the model's q, k and v layout (where flash attention runs: CUDA, half precision).
    prompt_attention.plan_ahead(llm.config.max_num_batched_tokens, llm.max_model_len)

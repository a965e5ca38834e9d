"""The engine on a CUDA device (device machine): Triton kernels inside the whole model, against transformers."""

import random

import pytest
import torch
from kv_tools import check_invariants
from tiny_models import hf_greedy, make_checkpoint, random_prompts

import tierkv
from tierkv import SamplingParams

pytestmark = pytest.mark.gpu


class _LongHolds(random.Random):
    """For the mover's debug hook (`_debug_rng`): every hold on a copy stream is as long as the hook's longest, or up
    to twice that (1-2 ms on the H100), never near zero. The hook holds a stream once per batch, before all of its
    layer groups; a tiny model's swap-in is a few KiB, so after a short hold it is already complete when `acquire`,
    some tens of microseconds after launching it, asks whether it is done, and the step has nothing in flight."""

    def randrange(self, start, stop=None, step=1):
        lo, hi = (0, start) if stop is None else (start, stop)
        return super().randrange(hi, 2 * hi - lo)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_float32_on_gpu_equals_transformers(arch, tmp_path):
    hf = make_checkpoint(tmp_path / "m", arch).cuda()
    prompts = random_prompts(8, 5, 300, hf.config.vocab_size, seed=1)
    want = [hf_greedy(hf, p, 24) for p in prompts]
    with tierkv.LLM(
        str(tmp_path / "m"),
        device="cuda",
        dtype="float32",
        gpu_blocks=12,
        cpu_blocks=10,
        nvme_dir=str(tmp_path / "nvme"),
        nvme_blocks=200,
        max_num_batched_tokens=128,
    ) as llm:
        outs = llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0), use_tqdm=False)
        stats = llm.stats()
    assert [o.outputs[0].token_ids for o in outs] == want
    assert stats["tiers"]["nvme"]["blocks_in"] > 0 and stats["engine"]["streamed_steps"] > 0


def test_bfloat16_logits_close_and_greedy_agrees(tmp_path):
    """bf16: the first token's distribution is as close to the float32 truth as transformers' own bf16 is, and
    greedy paths agree token for token except where transformers' logits put our token within bf16 rounding of
    its top choice (a near tie)."""
    truth = make_checkpoint(tmp_path / "m", "llama", initializer_range=0.2).cuda()
    hf = make_checkpoint(tmp_path / "m2", "llama", initializer_range=0.2).to(
        "cuda", torch.bfloat16
    )  # same seed, same weights
    prompts = random_prompts(6, 20, 200, hf.config.vocab_size, seed=2)
    with tierkv.LLM(
        str(tmp_path / "m"),
        device="cuda",
        dtype="bfloat16",
        gpu_blocks=8,
        cpu_blocks=16,
        nvme_dir=str(tmp_path / "nvme"),
        nvme_blocks=200,
        max_num_batched_tokens=64,
    ) as llm:
        outs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0, logprobs=5), use_tqdm=False)
    exact = 0
    for p, out in zip(prompts, outs):
        ids = torch.tensor([p], device="cuda")
        with torch.no_grad():
            true_lp = torch.log_softmax(truth(ids).logits[0, -1].float(), -1)
        ref = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=12,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        hf_lp = torch.log_softmax(ref.logits[0][0].float(), -1)
        ours = out.outputs[0].logprobs[0]
        ours_err = max(abs(v.logprob - float(true_lp[t])) for t, v in ours.items())
        hf_err = max(abs(float(hf_lp[t]) - float(true_lp[t])) for t in ours)
        assert ours_err <= 2 * hf_err + 0.02, f"bf16 error {ours_err:.3f} vs transformers' bf16 {hf_err:.3f}"
        got, want = out.outputs[0].token_ids, ref.sequences[0, len(p) :].tolist()
        if got == want:
            exact += 1
            continue
        j = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
        logits = ref.logits[j][0].float()
        assert float(logits.max() - logits[got[j]]) < 0.1, f"step {j}: not a near tie in transformers' own logits"
    assert exact >= len(prompts) // 2, f"only {exact} of {len(prompts)} greedy paths agree in full"


def test_prefix_hit_promoted_in_layer_groups_is_exact(tmp_path, monkeypatch):
    """A prefix cached in pinned RAM comes back in layer groups (one event per group) while the step's first
    layers already compute; with the copy stream held back by a random sleep before each transfer, the output
    is still exact (without the per-layer waits the step would read blocks not yet there). The prompt's step runs
    as piecewise graphs: each layer's wait comes before the graph piece that writes that layer's KV."""
    from tierkv.handles import LayeredHandle
    from tierkv.kv.mover import Mover

    monkeypatch.setattr(Mover, "layered_min_blocks", 8)
    monkeypatch.setattr(Mover, "layer_group_bytes", 1)  # one layer per group
    hf = make_checkpoint(tmp_path / "m", "llama", num_hidden_layers=4).cuda()
    prefix = random_prompts(1, 400, 400, hf.config.vocab_size, seed=4)[0]
    prompts = [prefix + [5, 6, 7], prefix + [9, 8]]
    seen = []
    with tierkv.LLM(
        str(tmp_path / "m"),
        device="cuda",
        dtype="float32",
        block_size=4,
        gpu_blocks=400,
        cpu_blocks=400,
        prefix_load="always",
        max_num_batched_tokens=512,
    ) as llm:
        first = llm.generate(prompts[:1], SamplingParams(max_tokens=8, temperature=0), use_tqdm=False)
        llm.pm.demote_cached("cpu")
        llm.pm.mover._debug_rng = random.Random(1)  # random sleeps on the copy streams before each transfer
        launch = llm.pm.mover._launch

        def spy(*args):
            handle = launch(*args)
            seen.append(handle)
            return handle

        llm.pm.mover._launch = spy
        second = llm.generate(prompts[1:], SamplingParams(max_tokens=8, temperature=0), use_tqdm=False)
        pieces = llm.stats()["engine"]["piecewise_steps"]
    assert second[0].num_cached_tokens == 400
    assert pieces > 0, "the prompt steps did not run as piecewise graphs (their layer-by-layer waits untested)"
    assert any(isinstance(h, LayeredHandle) and len(h.groups) == 4 for h in seen), (
        "the hit was not promoted in layer groups"
    )
    assert first[0].outputs[0].token_ids == hf_greedy(hf, prompts[0], 8)
    assert second[0].outputs[0].token_ids == hf_greedy(hf, prompts[1], 8)


@pytest.mark.parametrize("min_run", [1, 10**9])
@pytest.mark.parametrize("nvme", [False, True])
def test_streaming_on_the_copy_stream_is_exact_with_delays(tmp_path, monkeypatch, min_run, nvme):
    """Sequences longer than the GPU tier stream their older KV through two staging buffers filled on a copy
    stream (copy engines, or the kernel); with that stream held back by random sleeps before each copy, the output
    is still exact (a missing event between a buffer's copy and its attention, or its attention and its next
    copy, would show as wrong tokens). With `nvme`, the CPU tier is small and the oldest blocks stream from disk
    (the reader thread's pinned buffers), chunks mixing both tiers."""
    from tierkv import attention
    from tierkv.kernels import block_copy

    if min_run == 1 and not block_copy.copy_engine_available():
        pytest.skip("needs CuPy (the gpu extra) for 2D copies")
    monkeypatch.setattr(block_copy, "COPY_ENGINE_MIN_RUN", min_run)
    calls = []
    real = attention.copy_block_runs
    monkeypatch.setattr(attention, "copy_block_runs", lambda *a: (calls.append(1), real(*a)))
    hf = make_checkpoint(tmp_path / "m", "llama").cuda()
    prompts = random_prompts(3, 300, 600, hf.config.vocab_size, seed=5)
    want = [hf_greedy(hf, p, 16) for p in prompts]
    with tierkv.LLM(
        str(tmp_path / "m"),
        device="cuda",
        dtype="float32",
        gpu_blocks=12,
        cpu_blocks=24 if nvme else 200,
        staging_blocks=5,
        max_num_batched_tokens=64,
        **(dict(nvme_dir=str(tmp_path / "nvme"), nvme_blocks=400) if nvme else {}),
    ) as llm:
        llm.pm.mover._debug_rng = random.Random(2)
        outs = llm.generate(prompts, SamplingParams(max_tokens=16, temperature=0), use_tqdm=False)
        stats = llm.stats()
    assert [o.outputs[0].token_ids for o in outs] == want
    assert stats["engine"]["streamed_steps"] > 0
    if nvme:
        assert stats["links"]["nvme->gpu"]["bytes"] > 0  # some of it streamed from disk
    assert (len(calls) > 0) == (min_run == 1)


def test_decode_steps_replayed_as_cuda_graphs_match_eager_steps(tmp_path):
    """Decode steps replayed from CUDA graphs (batch sizes change as sequences finish: 6 to 2 rows replay the 8-row
    graph, whose extra rows write no KV and attend to nothing; 1 row gets its own) give the same tokens as eager
    steps and as transformers, and log-probabilities as close as float32 allows (the GEMMs see the padded batch)."""
    hf = make_checkpoint(tmp_path / "m", "llama").cuda()
    prompts = random_prompts(6, 5, 120, hf.config.vocab_size, seed=8)
    lens = [8, 30, 12, 20, 5, 26]
    params = [SamplingParams(max_tokens=n, temperature=0, logprobs=3) for n in lens]
    outs, stats = {}, {}
    for graphs in (True, False):
        with tierkv.LLM(
            str(tmp_path / "m"),
            device="cuda",
            dtype="float32",
            gpu_blocks=200,
            cpu_blocks=16,
            max_num_batched_tokens=256,
            cuda_graphs=graphs,
        ) as llm:
            outs[graphs] = llm.generate(prompts, params, use_tqdm=False)
            stats[graphs] = llm.stats()["engine"]
    assert stats[True]["graph_steps"] >= 20 and stats[True]["graphs_captured"] == 2
    assert stats[False]["graph_steps"] == 0
    for a, b, p, n in zip(outs[True], outs[False], prompts, lens):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids == hf_greedy(hf, p, n)
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert la.keys() == lb.keys()
            assert all(abs(la[t].logprob - lb[t].logprob) < 1e-4 and la[t].rank == lb[t].rank for t in la)


def test_a_graph_waits_on_its_gates_as_they_stood_at_its_launch():
    """LayerGates, what decode graphs wait on for blocks still arriving: a replay launched after arm() waits for the
    armed transfers (it reads what they wrote, though the copy is held back); a gate armed again after a replay's
    launch does not hold that replay back (if it did, a step whose transfers wait for the step before could never
    finish: the asynchronous scheduler arms step N+1 while step N still runs)."""
    from tierkv.graphs import LayerGates, external_events_supported
    from tierkv.handles import LayeredHandle

    if not external_events_supported():
        pytest.skip("this torch has no external CUDA events: decode graphs wait for arriving blocks as a whole")
    dev = torch.device("cuda")
    gates = LayerGates(2, dev)
    x, y = torch.zeros(4, device=dev), torch.zeros(8, device=dev)
    g = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.graph(g, stream=side):
        for layer in range(2):
            torch.cuda.current_stream(dev).wait_event(gates.events[layer])
            y[4 * layer : 4 * layer + 4].copy_(x * (layer + 1))
    torch.cuda.synchronize()
    copier = torch.cuda.Stream(dev)
    for value in (1.0, 2.0, 3.0):
        marks = []
        with torch.cuda.stream(copier):
            for layer in range(2):
                torch.cuda._sleep(50_000_000)  # tens of ms: the replay reaches its waits long before the copy lands
                x.fill_(value)
                event = torch.cuda.Event()
                event.record(copier)
                marks.append((layer, layer + 1, event))
        gates.arm([LayeredHandle(marks)])
        g.replay()
        torch.cuda.synchronize()
        assert y.tolist() == [value] * 4 + [2 * value] * 4
    # Armed again after a launch (and before the replay reaches its waits: the compute stream is held back first):
    # that replay must finish while the new transfer is still held back.
    torch.cuda._sleep(200_000_000)  # ~0.1 s
    g.replay()
    done = torch.cuda.Event()
    done.record()
    with torch.cuda.stream(copier):
        torch.cuda._sleep(3_000_000_000)  # ~1-2 s
        late = torch.cuda.Event()
        late.record(copier)
    gates.arm([LayeredHandle([(0, 2, late)])])
    done.synchronize()
    assert not late.query()  # the replay finished before the transfer it was not launched after
    torch.cuda.synchronize()


def test_decode_graphs_wait_layer_by_layer_for_swapped_blocks(tmp_path, monkeypatch):
    """Groups taking turns on a small GPU tier, swapped back in one layer at a time with the copy streams held back
    at random, prefetch off so that blocks are still in flight when their step starts: the decode steps replay their
    graphs, waiting on gates layer by layer. Same tokens as eager steps and transformers. The holds are long
    (_LongHolds): with the hook's random ones, 2 of 34 H100 runs had no decode step meet blocks in flight."""
    from tierkv.kv.mover import Mover

    monkeypatch.setattr(Mover, "layered_min_blocks", 4)
    monkeypatch.setattr(Mover, "layer_group_bytes", 1)  # one layer per group
    hf = make_checkpoint(tmp_path / "m", "llama").cuda()
    prompts = random_prompts(8, 5, 150, hf.config.vocab_size, seed=13)
    outs, stats = {}, {}
    for graphs in (True, False):
        with tierkv.LLM(
            str(tmp_path / "m"),
            device="cuda",
            dtype="float32",
            cuda_graphs=graphs,
            gpu_blocks=24,
            cpu_blocks=400,
            max_num_batched_tokens=128,
            oversubscribe=True,
            prefetch=False,
        ) as llm:
            llm.pm.mover._debug_rng = _LongHolds(5)
            outs[graphs] = llm.generate(prompts, SamplingParams(max_tokens=14, temperature=0), use_tqdm=False)
            stats[graphs] = llm.stats()["engine"]
            if graphs:
                kinds = {gated for _, _, gated in llm.engine.runner.graphs.graphs}
            check_invariants(llm.pm)
    assert stats[True]["preemptions"] > 0 and stats[True]["graph_steps_gated"] > 0, stats[True]
    assert kinds == {True, False}, f"graphs captured with wait nodes: {kinds} (both kinds expected); {stats[True]}"
    assert (
        [o.outputs[0].token_ids for o in outs[True]]
        == [o.outputs[0].token_ids for o in outs[False]]
        == [hf_greedy(hf, p, 14) for p in prompts]
    )


@pytest.mark.parametrize("case", ["mixed", "streamed", "swapped"])
def test_piecewise_graph_steps_match_eager_steps(case, tmp_path, monkeypatch):
    """Steps that decode graphs do not take run as piecewise graphs (eager attention between replays of the rest,
    token counts padded to a bucket): prompt chunks beside decodes; KV streamed from the CPU tier through staging;
    groups taking turns, swapped back in one layer at a time with the copy streams held back at random (a step with
    prompt tokens whose blocks are still arriving waits layer by layer, each before the piece that writes that
    layer's KV; whether a step meets blocks in flight depends on timing: the prefix test below makes sure of one).
    Same tokens as eager steps and as transformers, log-probabilities as close as float32 allows (the GEMMs see
    padded rows)."""
    from tierkv.kv.mover import Mover

    if case == "swapped":
        monkeypatch.setattr(Mover, "layered_min_blocks", 4)
        monkeypatch.setattr(Mover, "layer_group_bytes", 1)  # one layer per group
    hf = make_checkpoint(tmp_path / "m", "llama").cuda()
    kwargs = dict(
        mixed=dict(gpu_blocks=200, cpu_blocks=16, max_num_batched_tokens=64),
        streamed=dict(gpu_blocks=12, cpu_blocks=200, staging_blocks=5, max_num_batched_tokens=64),
        # Prefetch off: groups come back in the step that needs them, still in flight when it starts.
        swapped=dict(gpu_blocks=24, cpu_blocks=400, max_num_batched_tokens=128, oversubscribe=True, prefetch=False),
    )[case]
    lengths = (300, 600) if case == "streamed" else (5, 150)
    prompts = random_prompts(3 if case == "streamed" else 8, *lengths, hf.config.vocab_size, seed=11)
    lens = [16 - i for i in range(len(prompts))]
    params = [SamplingParams(max_tokens=n, temperature=0, logprobs=3) for n in lens]
    outs, stats = {}, {}
    for graphs in (True, False):
        with tierkv.LLM(str(tmp_path / "m"), device="cuda", dtype="float32", cuda_graphs=graphs, **kwargs) as llm:
            llm.pm.mover._debug_rng = random.Random(3)
            outs[graphs] = llm.generate(prompts, params, use_tqdm=False)
            stats[graphs] = llm.stats()["engine"]
            check_invariants(llm.pm)
    assert stats[True]["piecewise_steps"] > 0 and stats[False]["piecewise_steps"] == 0
    if case == "streamed":
        assert stats[True]["streamed_steps"] > 0
    if case == "swapped":
        assert stats[True]["preemptions"] > 0
    for a, b, p, n in zip(outs[True], outs[False], prompts, lens):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids == hf_greedy(hf, p, n)
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert la.keys() == lb.keys()
            assert all(abs(la[t].logprob - lb[t].logprob) < 1e-4 and la[t].rank == lb[t].rank for t in la)


def test_transfers_serialized_with_compute_give_the_same_tokens(tmp_path):
    """The overlap benchmark's baseline (Mover.serialize: each transfer after the compute queued before it, compute
    after the transfer, no layer-by-layer waits): groups swapping on a small tier, same tokens as transformers."""
    hf = make_checkpoint(tmp_path / "m", "llama").cuda()
    prompts = random_prompts(6, 5, 150, hf.config.vocab_size, seed=12)
    with tierkv.LLM(
        str(tmp_path / "m"),
        device="cuda",
        dtype="float32",
        gpu_blocks=24,
        cpu_blocks=400,
        max_num_batched_tokens=128,
        oversubscribe=True,
        prefetch=False,
    ) as llm:
        llm.pm.mover.serialize = True
        outs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0), use_tqdm=False)
        stats = llm.stats()
        check_invariants(llm.pm)
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(hf, p, 12) for p in prompts]
    assert stats["engine"]["preemptions"] > 0 and stats["tiers"]["gpu"]["blocks_in"] > 0


@pytest.mark.parametrize("gpu_blocks", [200, 24])
def test_asynchronous_steps_on_gpu_match_synchronous_ones(gpu_blocks, tmp_path):
    """Steps planned and launched while the previous one still runs (its greedy tokens fed on the device), decode
    graphs replayed among them, stops landing mid-run, copy streams held back at random (races): the tokens equal
    synchronous steps' and transformers'. With 24 GPU blocks groups take turns and KV swaps to pinned RAM."""
    hf = make_checkpoint(tmp_path / "m", "llama").cuda()
    prompts = random_prompts(8, 5, 150, hf.config.vocab_size, seed=9)
    free = [hf_greedy(hf, p, 20) for p in prompts]
    params = [SamplingParams(max_tokens=20 - i, temperature=0) for i in range(len(prompts))]
    params[2] = SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[free[2][3]])
    outs, stats = {}, {}
    for on in (True, False):
        with tierkv.LLM(
            str(tmp_path / "m"),
            device="cuda",
            dtype="float32",
            gpu_blocks=gpu_blocks,
            cpu_blocks=400,
            max_num_batched_tokens=128,
            async_scheduling=on,
            oversubscribe=True,
        ) as llm:
            llm.pm.mover._debug_rng = random.Random(4)
            outs[on] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
            stats[on] = llm.stats()["engine"]
            check_invariants(llm.pm)
    assert outs[True] == outs[False]
    for i, got in enumerate(outs[True]):
        want = free[i][: 20 - i] if i != 2 else free[2][: free[2].index(free[2][3]) + 1]
        assert got == want, f"prompt {i}"
    assert stats[True]["deferred_steps"] > 10 and stats[True]["graph_steps"] > 0
    if gpu_blocks == 24:
        assert stats[True]["preemptions"] > 0


def test_warm_up_plans_the_prompt_shapes_so_that_parts_skip_flash_at_their_first_meeting(tmp_path, monkeypatch):
    """LLM.warm_up plans every cuDNN shape the step budget allows (on this thread); a step of eight 600-token prompts
    (a part of 8 x 640 after padding) then sends them to cuDNN at once: flash attention sees no prompt of theirs."""
    import threading

    import tierkv.kernels.prompt_attention as prompt_attention_module
    from tierkv.kernels import prompt_shapes

    monkeypatch.setattr(prompt_attention_module, "_met", threading.local())
    make_checkpoint(tmp_path / "m", "llama")
    flashed = []
    real = prompt_attention_module.prompt_attention_flash

    def spy(q, k, v, prompts, *a, **kw):
        b = prompts.cu_seq_host
        flashed.extend(y - x for x, y in zip(b, b[1:]))
        return real(q, k, v, prompts, *a, **kw)

    monkeypatch.setattr(prompt_attention_module, "prompt_attention_flash", spy)
    prompts = random_prompts(8, 600, 600, 512, seed=4)
    with tierkv.LLM(
        str(tmp_path / "m"), device="cuda", dtype="bfloat16", gpu_blocks=512, max_num_batched_tokens=8192
    ) as llm:
        llm.warm_up()
        planned = prompt_attention_module._shapes_met()
        assert {s[:2] for s in planned} >= set(prompt_shapes.shapes_within(8192, llm.max_model_len))
        flashed.clear()
        outs = llm.generate(prompts, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), use_tqdm=False)
    assert 600 not in flashed
    assert all(len(o.outputs[0].token_ids) == 4 for o in outs)


def test_warm_up_captures_every_decode_graph_so_that_no_request_waits_for_a_capture(tmp_path):
    """LLM.warm_up's first decode step captures the graph of every batch bucket (max_num_seqs 8: 1, 2, 4, 8 rows) and
    table-width bucket up to max_model_len (2,048 tokens: 16 to 128 blocks), padded from its one row; a run of six
    requests whose batch drains from 6 to 1 row then captures nothing and gives transformers' greedy tokens."""
    hf = make_checkpoint(tmp_path / "m", "llama").cuda()
    prompts = random_prompts(6, 5, 120, hf.config.vocab_size, seed=8)
    lens = [8, 30, 12, 20, 5, 26]
    with tierkv.LLM(
        str(tmp_path / "m"), device="cuda", dtype="float32", gpu_blocks=200, max_num_seqs=8, cuda_graphs=True
    ) as llm:
        graphs = llm.engine.runner.graphs
        assert graphs.batch_buckets == [1, 2, 4, 8] and llm.max_model_len == 2048
        llm.warm_up()
        assert {(b, w) for b, w, gated in graphs.graphs} == {(b, w) for b in (1, 2, 4, 8) for w in (16, 32, 64, 128)}
        captured = graphs.captures
        outs = llm.generate(prompts, [SamplingParams(max_tokens=n, temperature=0) for n in lens], use_tqdm=False)
        assert graphs.captures == captured and llm.stats()["engine"]["graph_steps"] >= 20
    for out, p, n in zip(outs, prompts, lens):
        assert out.outputs[0].token_ids == hf_greedy(hf, p, n)

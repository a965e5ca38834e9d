"""Whole prompts attended over their own keys (kernels/prompt_attention): the reference against dense attention,
torch's varlen flash kernel against the reference (CUDA), and the engine, whose steps put whole prompts last and
attend them apart, against the same steps attended by the paged kernels alone."""

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from tiny_models import hf_greedy, make_checkpoint, random_prompts

import tierkv
import tierkv.attention
import tierkv.kernels.prompt_attention as prompt_attention_module
from tierkv import SamplingParams
from tierkv.kernels import prompt_shapes
from tierkv.kernels.paged_attention import attention_reference
from tierkv.kernels.prompt_attention import (
    PromptRows,
    flash_supported,
    prompt_attention,
    prompt_attention_flash,
    prompt_attention_reference,
    prompt_attention_sdpa,
    prompt_runs,
)
from tierkv.runner import ModelRunner


def make_prompts(lengths, num_heads, num_kv_heads, head_dim, dtype=torch.float32, device="cpu", seed=0):
    """q, k, v of prompts of these lengths, back to back, as views into one q/k/v buffer (as a step's projection
    leaves them: strided rows), and their PromptRows."""
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    cols = (num_heads + 2 * num_kv_heads) * head_dim
    qkv = torch.randn((total, cols), generator=g).to(dtype=dtype, device=device)
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    rows = PromptRows(0, torch.tensor(bounds, dtype=torch.int32, device=device), bounds, max(lengths))
    shape = (total, -1, head_dim)
    return q.view(shape), k.view(shape), v.view(shape), rows


def dense(q, k, v, rows, scale, window):
    """attention_reference (dense, masked by positions) one prompt at a time."""
    out = torch.empty_like(q)
    b = rows.cu_seq_host
    for r0, r1 in zip(b, b[1:]):
        pos = torch.arange(r1 - r0, device=q.device)
        out[r0:r1] = attention_reference(q[r0:r1], k[r0:r1], v[r0:r1], pos, pos, scale, window)
    return out


@pytest.mark.parametrize("window", [0, 5])
def test_reference_equals_dense_attention_per_prompt(window):
    q, k, v, rows = make_prompts([1, 7, 20, 3], num_heads=4, num_kv_heads=2, head_dim=8)
    got = prompt_attention_reference(q, k, v, rows, 0.3, window)
    torch.testing.assert_close(got, dense(q, k, v, rows, 0.3, window), rtol=1e-5, atol=1e-5)
    # Each prompt sees only its own keys: changing another prompt's keys leaves it alone.
    k2 = k.clone()
    k2[1:8] += 1.0
    again = prompt_attention_reference(q, k2, v, rows, 0.3, window)
    assert torch.equal(again[:1], got[:1]) and torch.equal(again[8:], got[8:])
    assert not torch.equal(again[1:8], got[1:8])


def test_batched_sdpa_over_runs_of_equal_lengths_equals_the_reference():
    """Runs of consecutive equal-length prompts go through SDPA together, as strided views of the rows."""
    lengths = [3, 3, 3, 5, 5, 1, 3, 16]
    assert prompt_runs([0, 3, 6, 9, 14, 19, 20, 23, 39]) == [(0, 3, 3), (9, 2, 5), (19, 1, 1), (20, 1, 3), (23, 1, 16)]
    q, k, v, rows = make_prompts(lengths, num_heads=4, num_kv_heads=2, head_dim=8, seed=3)
    want = prompt_attention_reference(q, k, v, rows, 0.4)
    out = torch.full_like(q, float("nan"))
    assert prompt_attention_sdpa(q, k, v, rows, 0.4, out=out) is out
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_flash_is_not_taken_where_it_cannot_run():
    q, k, _, _ = make_prompts([4], num_heads=4, num_kv_heads=2, head_dim=8)
    assert not flash_supported(q, k.shape[1])  # CPU
    if torch.cuda.is_available():
        assert not flash_supported(q.cuda(), k.shape[1])  # float32
        assert not flash_supported(q.cuda().half(), 3)  # heads not in whole groups


class _Spy:
    """Counts the steps whose whole prompts were attended apart, and those that had other entries before them."""

    def __init__(self, monkeypatch):
        self.calls = self.mixed = 0
        real = tierkv.attention.prompt_attention

        def spy(q, k, v, prompts, *args, **kwargs):
            self.calls += 1
            self.mixed += prompts.row0 > 0
            return real(q, k, v, prompts, *args, **kwargs)

        monkeypatch.setattr(tierkv.attention, "prompt_attention", spy)


@pytest.mark.parametrize("arch, window", [("llama", None), ("mistral", 24)])
def test_engine_attends_whole_prompts_apart_exactly(arch, window, tmp_path, monkeypatch):
    """Steps that hold decodes, a prompt's later chunk and whole prompts together (a small token budget): the whole
    prompts go last and attend apart, and every token and log-probability equals the same run with the paged
    kernels alone, and transformers' greedy output (KV over the GPU and CPU tiers; sliding windows too)."""
    overrides = {"sliding_window": window} if window else {}
    hf = make_checkpoint(tmp_path / "m", arch, **overrides)
    prompts = random_prompts(8, 5, 70, hf.config.vocab_size, seed=5)
    params = [SamplingParams(max_tokens=10 + i, temperature=0, logprobs=3) for i in range(len(prompts))]
    spy = _Spy(monkeypatch)
    outs = {}
    for apart in (True, False):
        monkeypatch.setattr(ModelRunner, "prompts_apart", apart)
        before = spy.calls
        with tierkv.LLM(str(tmp_path / "m"), gpu_blocks=40, cpu_blocks=60, max_num_batched_tokens=48) as llm:
            outs[apart] = llm.generate(prompts, params, use_tqdm=False)
        assert (spy.calls > before) == apart
    assert spy.mixed > 0  # some steps had decodes or later chunks before their whole prompts
    # On CPU both runs attend whole prompts with the same SDPA reference: equal to the bit. On CUDA in float32 the
    # paged run takes the Triton kernel: equal to float32 rounding.
    tol = 1e-4 if torch.cuda.is_available() else 0.0
    for a, b, p, sp in zip(outs[True], outs[False], prompts, params):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids == hf_greedy(hf, p, sp.max_tokens)
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert la.keys() == lb.keys() and all(abs(la[t].logprob - lb[t].logprob) <= tol for t in la)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "lengths, heads, window",
    [
        ([1, 17, 300, 1024], (32, 8, 128), 0),  # Llama-3.1-8B's heads
        ([1024] * 8, (32, 8, 128), 0),
        ([5, 700, 64, 64, 64], (4, 2, 64), 48),  # a sliding window
        ([8192], (32, 8, 128), 0),
        ([33, 33, 7, 7, 7, 1], (8, 8, 64), 0),  # no GQA
    ],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_paths_equal_the_reference(lengths, heads, window, dtype):
    """What the engine runs on CUDA (batched SDPA; varlen flash for a sliding window), and varlen flash for every
    case, against the reference in float32."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (runs on the device machine)")
    num_heads, num_kv_heads, head_dim = heads
    q, k, v, rows = make_prompts(lengths, num_heads, num_kv_heads, head_dim, dtype, "cuda", seed=len(lengths))
    assert flash_supported(q, num_kv_heads)
    scale = head_dim**-0.5
    want = prompt_attention_reference(q.float(), k.float(), v.float(), rows, scale, window)
    # prompt_attention twice: shapes met for the first time go through varlen flash, then through cuDNN.
    for impl in (prompt_attention, prompt_attention, prompt_attention_flash):
        out = torch.full_like(q, float("nan"))
        got = impl(q, k, v, rows, scale, window, out=out)
        assert got is out
        torch.testing.assert_close(got.float(), want, rtol=0, atol=2e-2, msg=lambda m: f"{impl.__name__}: {m}")


@pytest.mark.gpu
def test_parts_go_to_cudnn_from_their_second_meeting_or_at_once_when_planned_ahead(monkeypatch):
    """cuDNN plans every new shape (~50 ms of host time): a part whose shape is new to the thread takes varlen flash
    attention, then SDPA (cuDNN) from the next meeting; on a thread that ran plan_ahead, SDPA at once. A step with a
    part viewed in place (4 x 1024), two gathered and padded (4 prompts of 1,100-1,280 -> 1,280; 5,000 -> 5,120)
    and two prompts left over (9 and 2,000 tokens: too few for a part)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (runs on the device machine)")
    monkeypatch.setattr(prompt_attention_module, "_met", threading.local())
    lengths = [1024] * 4 + [9, 1100, 1280, 1200, 1250, 2000, 5000]
    q, k, v, rows = make_prompts(lengths, 32, 8, 128, torch.bfloat16, "cuda", seed=9)
    want = prompt_attention_reference(q.float(), k.float(), v.float(), rows, 0.125)  # (SDPA, before the spy)
    sdpa_runs = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, *a, **k):
        sdpa_runs.append(tuple(q.shape[:3:2]))  # (prompts, length)
        return real(q, *a, **k)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    parts = [(4, 1024), (4, 1280), (1, 5120)]
    for expected in ([], parts):
        got = prompt_attention(q, k, v, rows, 0.125)
        assert sdpa_runs == expected
        torch.testing.assert_close(got.float(), want, rtol=0, atol=2e-2)
        sdpa_runs.clear()

    def planned_then_step():
        planned, _ = prompt_attention_module.plan_ahead(budget=16384, max_length=8192)
        assert planned >= len(prompt_shapes.shapes_within(16384, 8192))  # (every shape: this thread had met none)
        sdpa_runs.clear()
        torch.testing.assert_close(prompt_attention(q, k, v, rows, 0.125).float(), want, rtol=0, atol=2e-2)

    with ThreadPoolExecutor(1) as other_thread:
        other_thread.submit(planned_then_step).result()
    assert sdpa_runs == parts


@pytest.fixture
def small_parts(monkeypatch):
    """Thresholds small enough for CPU-sized prompts to make parts, and a clean memory of shapes and layouts."""
    monkeypatch.setattr(prompt_shapes, "CUDNN_MIN_LENGTH", 4)
    monkeypatch.setattr(prompt_shapes, "CUDNN_MIN_TOKENS", 8)
    monkeypatch.setattr(prompt_attention_module, "_met", threading.local())
    monkeypatch.setattr(prompt_attention_module, "_layouts", set())


# Buckets: 9 -> 10 (with a 10: a part of two, gathered, padded), 12 (alone: a view), four 16s (a view), 3 (short:
# left over), 20 and 17 -> 20 (a part of two, gathered, padded), 14 (alone: a view).
MIXED = [9, 10, 12, 16, 16, 16, 16, 3, 20, 17, 14]


@pytest.mark.parametrize("fused", [True, False])
def test_parts_padded_to_their_bucket_equal_the_reference(small_parts, fused):
    """Right padding is exact under the causal mask: parts gathered and padded to their bucket, parts viewed in
    place, and the prompts left over, against the reference; q, k and v as views of one projection (one gather keeps
    their strides) or as tensors of their own (three gathers)."""
    q, k, v, rows = make_prompts(MIXED, num_heads=4, num_kv_heads=2, head_dim=8, seed=11)
    if not fused:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    parts, rest = prompt_shapes.cut(MIXED)
    assert [(p.length, p.count) for p in parts] == [(10, 2), (12, 1), (16, 4), (20, 2), (14, 1)] and rest == [7]
    want = prompt_attention_reference(q, k, v, rows, 0.4)
    out = torch.full_like(q, float("nan"))
    assert prompt_attention_sdpa(q, k, v, rows, 0.4, out=out) is out
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


class _FlashSpy:
    """Flash attention where it cannot run (CPU): the reference in its place, noting the prompt lengths it got."""

    def __init__(self, monkeypatch):
        self.lengths = []
        monkeypatch.setattr(prompt_attention_module, "flash_supported", lambda q, kv_heads: True)

        def flash(q, k, v, prompts, scale, sliding_window=0, out=None):
            b = prompts.cu_seq_host
            self.lengths += [y - x for x, y in zip(b, b[1:])]
            return prompt_attention_reference(q, k, v, prompts, scale, sliding_window, out)

        monkeypatch.setattr(prompt_attention_module, "prompt_attention_flash", flash)

    def take(self):
        got, self.lengths = sorted(self.lengths), []
        return got


def test_a_parts_shape_goes_to_cudnn_from_its_second_meeting_on_each_thread(small_parts, monkeypatch):
    """Where flash attention runs, a part whose shape this thread has not met goes through flash (no cuDNN plan
    waited for), and through SDPA from the next meeting; the prompts left over always take flash."""
    spy = _FlashSpy(monkeypatch)
    q, k, v, rows = make_prompts(MIXED, num_heads=4, num_kv_heads=2, head_dim=8, seed=12)
    want = prompt_attention_reference(q, k, v, rows, 0.4)
    for expected in (sorted(MIXED), [3]):
        torch.testing.assert_close(prompt_attention_sdpa(q, k, v, rows, 0.4), want, rtol=1e-5, atol=1e-5)
        assert spy.take() == expected
    # cuDNN keeps its plans per thread: on another thread every shape is new again.
    with ThreadPoolExecutor(1) as other_thread:
        other_thread.submit(prompt_attention_sdpa, q, k, v, rows, 0.4).result()
    assert spy.take() == sorted(MIXED)


def test_shapes_planned_ahead_go_to_cudnn_at_their_first_meeting(small_parts, monkeypatch):
    """plan_ahead plans every shape a step budget allows, for the layouts met (here: the fused projection's, met by
    one short step): then a step of new lengths sends its parts straight to SDPA, exactly."""
    spy = _FlashSpy(monkeypatch)
    q, k, v, rows = make_prompts([3, 2], num_heads=4, num_kv_heads=2, head_dim=8, seed=13)
    prompt_attention_sdpa(q, k, v, rows, 0.4)  # the layout is met (by a step too short for any part)
    assert spy.take() == [2, 3]
    planned, seconds = prompt_attention_module.plan_ahead(budget=64, max_length=64)
    assert planned == len(prompt_shapes.shapes_within(64, 64))
    assert seconds >= 0
    assert prompt_attention_module.plan_ahead(budget=64, max_length=64)[0] == 0  # nothing left to plan
    q, k, v, rows = make_prompts(MIXED[:7], num_heads=4, num_kv_heads=2, head_dim=8, seed=14)
    want = prompt_attention_reference(q, k, v, rows, 0.4)
    torch.testing.assert_close(prompt_attention_sdpa(q, k, v, rows, 0.4), want, rtol=1e-5, atol=1e-5)
    assert spy.take() == []

"""Whole prompts attended over their own keys (kernels/prompt_attention): the reference against dense attention,
torch's varlen flash kernel against the reference (CUDA), and the engine, whose steps put whole prompts last and
attend them apart, against the same steps attended by the paged kernels alone."""

import pytest
import torch
from tiny_models import hf_greedy, make_checkpoint, random_prompts

import tierkv
import tierkv.attention
import tierkv.kernels.prompt_attention as prompt_attention_module
from tierkv import SamplingParams
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
def test_long_prompts_go_to_cudnn_only_when_their_shape_is_met_again(monkeypatch):
    """cuDNN plans every new shape (~50 ms of host time): short prompts always take varlen flash attention; long
    ones take it the first time their shape is met and SDPA (cuDNN) after. A step of three runs, two of them new
    and one short, then the same again."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (runs on the device machine)")
    long = prompt_attention_module.CUDNN_MIN_LENGTH
    q, k, v, rows = make_prompts([long, long, long, 9, long + 3], 8, 2, 64, torch.bfloat16, "cuda", seed=9)
    want = prompt_attention_reference(q.float(), k.float(), v.float(), rows, 0.125)  # (SDPA, before the spy)
    sdpa_runs = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, *a, **k):
        sdpa_runs.append(tuple(q.shape[:3:2]))  # (prompts, length)
        return real(q, *a, **k)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    first3 = PromptRows(0, rows.cu_seq[:4], rows.cu_seq_host[:4], long)
    prompt_attention(q[: 3 * long], k[: 3 * long], v[: 3 * long], first3, 0.125)  # meets (3, long)
    assert sdpa_runs == []
    for expected in ([(3, long)], [(3, long), (1, long + 3)]):
        got = prompt_attention(q, k, v, rows, 0.125)
        assert sdpa_runs == expected
        torch.testing.assert_close(got.float(), want, rtol=0, atol=2e-2)
        sdpa_runs.clear()


def test_the_shapes_met_are_forgotten_past_a_bound(monkeypatch):
    """A server meets new prompt lengths for as long as it runs: the memory of long shapes met stays bounded, and a
    shape forgotten goes through flash attention once more before cuDNN again."""
    monkeypatch.setattr(prompt_attention_module, "_shapes_met", set())
    monkeypatch.setattr(prompt_attention_module, "_SHAPES_KEPT", 2)
    planned = prompt_attention_module._cudnn_planned
    q = k = torch.zeros((1, 4, 8))
    long = prompt_attention_module.CUDNN_MIN_LENGTH
    assert [planned(q, k, 1, long), planned(q, k, 1, long)] == [False, True]
    assert not planned(q, k, 1, long + 1)  # two shapes kept
    assert not planned(q, k, 1, long + 2)  # a third: the first two are forgotten
    assert len(prompt_attention_module._shapes_met) == 1
    assert [planned(q, k, 1, long), planned(q, k, 1, long)] == [False, True]
    assert not planned(q, k, 1, long - 1) and not planned(q, k, 1, long - 1)  # short: never cuDNN

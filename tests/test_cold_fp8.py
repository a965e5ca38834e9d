"""Cold tiers storing KV as fp8 (`cold_kv_dtype="fp8"`): blocks come back from the CPU and NVMe tiers as exactly
their quantized copies, and on the packaged SmolLM2 model greedy output stays close to the uncompressed run's, by
measures reported with thresholds (the accuracy of a lossy option, measured)."""

import math
import random

import pytest
import torch
from kv_tools import check_invariants
from test_page_manager import LAYOUT, add, tiers_of
from tiny_models import make_checkpoint, random_prompts

import tierkv
from tierkv import PageManager, PageManagerConfig
from tierkv.kernels.kv_quant import dequantize_blocks_reference, quantize_blocks_reference


def quantized_copy(kv: torch.Tensor) -> torch.Tensor:
    """What fp8 storage gives back for KV (L, 2, n, H, D): each block of block_size tokens quantized and restored."""
    bs = LAYOUT.block_size
    blocks = torch.stack([kv[:, :, i : i + bs] for i in range(0, kv.shape[2], bs)])
    idx = torch.arange(len(blocks))
    back = torch.empty_like(blocks)
    dequantize_blocks_reference(quantize_blocks_reference(blocks, idx), back, idx)
    return torch.cat(list(back), dim=2)


def greedy_agreement(ref: list, other: list) -> tuple[float, float, float, int]:
    """How close the greedy outputs `other` (CompletionOutputs with logprobs, one per prompt) are to `ref`: the share
    of generated tokens equal at the same position, the share of outputs equal whole, and the mean absolute
    difference of the chosen tokens' log-probabilities while both runs share their context (up to each output's
    first difference), over how many tokens."""
    equal = total = whole = 0
    diffs = []
    for a, b in zip(ref, other):
        pairs = list(zip(a.token_ids, b.token_ids))
        equal += sum(x == y for x, y in pairs)
        total += len(pairs)
        whole += a.token_ids == b.token_ids
        for j, (x, y) in enumerate(pairs):
            diffs.append(abs(a.logprobs[j][x].logprob - b.logprobs[j][y].logprob))
            if x != y:
                break
    return equal / total, whole / len(ref), sum(diffs) / len(diffs), len(diffs)


def test_blocks_come_back_from_fp8_cold_tiers_as_their_quantized_copies(nvme_dir):
    config = PageManagerConfig(LAYOUT, gpu_blocks=2, cpu_blocks=2, nvme_dir=nvme_dir, nvme_blocks=4, cold_codec="fp8")
    with PageManager(config) as pm:
        a = add(pm, "a", 8, 1)
        b = add(pm, "b", 8, 2)
        add(pm, "c", 8, 3)  # a is pushed down to NVMe (through the CPU tier, as records), b to the CPU tier
        assert tiers_of(pm, "a") == ["nvme", "nvme"] and tiers_of(pm, "b") == ["cpu", "cpu"]
        stats = pm.stats()
        for seq, data in (("a", a), ("b", b)):
            table = pm.acquire([seq])[0]
            got = torch.cat([pm.tiers[0].pool[s] for s in table], dim=2)
            pm.release([seq])
            assert torch.equal(got, quantized_copy(data))
            assert not torch.equal(got, data)  # (it was compressed: fp8 does not hold these float32 values)
        check_invariants(pm)
    record = 2 * LAYOUT.block_size * LAYOUT.num_kv_heads * LAYOUT.head_dim + 2 * LAYOUT.num_kv_heads * 4
    cold_block = LAYOUT.num_layers * record
    assert stats["tiers"]["cpu"]["capacity_bytes"] == 2 * cold_block  # a quarter of float32's, plus the scales
    assert stats["links"]["gpu->cpu"]["bytes"] == stats["links"]["gpu->cpu"]["blocks"] * cold_block


PROMPTS = [
    f"{verb} {topic}."
    for verb in ("Write one sentence about", "Give two facts about", "Describe briefly", "Name a use of", "Explain")
    for topic in (
        "the moon", "rivers", "bread", "winter", "bicycles", "libraries", "the ocean", "volcanoes", "music", "bees",
    )
]  # fmt: skip


def test_fp8_cold_tiers_keep_smollm2s_greedy_output_close(tmp_path, smollm2_gguf):
    """50 chat prompts, 16 greedy tokens each, on a GPU tier of 2 blocks beside 1 CPU block and NVMe: every prompt
    is longer than the GPU tier, so every step of every request attends over older KV streamed from the CPU tier
    and the disk, stored in the KV's dtype in one run and as fp8 in the other. Reported and checked: the share of
    generated tokens equal at the same position, the share of outputs equal whole, and the mean absolute
    difference of the chosen tokens' log-probabilities where both runs still share their context (up to each
    output's first difference).

    Measured here (2026-12-04): 94.2% of tokens and 84% of outputs equal, 0.027 nats (with 24 tokens each: 88.7%,
    66%, 0.027). e4m3 keeps 3
    mantissa bits (each value within 1/16); the published fp8 KV caches (vLLM's per-tensor scales, TensorRT-LLM's)
    stay within about 1% of task accuracy. Greedy outputs of a 135M model meet near ties often, after which their
    positions differ, so the bars are on agreement at 80% of tokens and 50% of whole outputs, and on the
    log-probability error, which does not cascade, at 0.05 nats."""
    params = tierkv.SamplingParams(max_tokens=16, temperature=0, logprobs=1)
    runs = {}
    for cold in (None, "fp8"):
        with tierkv.LLM(
            "smollm2-135m-instruct",
            device="cpu",
            gpu_blocks=2,
            cpu_blocks=1,
            nvme_dir=str(tmp_path / f"nvme-{cold}"),
            nvme_blocks=64,
            enable_prefix_caching=False,
            cold_kv_dtype=cold,
        ) as llm:
            tok = llm.loaded.tokenizer
            chat = [[{"role": "user", "content": p}] for p in PROMPTS]
            prompts = [
                list(tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False))
                for c in chat
            ]
            outs = llm.generate(prompts, params, use_tqdm=False)
            stats = llm.stats()
            # streamed as stored: fp8 records staged, decoded by the attention as it reads them
            assert llm.engine.runner.staging.dtype == (torch.uint8 if cold else torch.float32)
        assert stats["engine"]["streamed_steps"] >= len(PROMPTS) * 12 and stats["tiers"]["nvme"]["blocks_in"] > 0
        runs[cold] = [o.outputs[0] for o in outs]
    share, whole_share, mean_diff, compared = greedy_agreement(runs[None], runs["fp8"])
    print(f"fp8 cold tiers: {share:.1%} of tokens equal, {whole_share:.0%} of outputs equal whole, "
          f"mean |d logprob| {mean_diff:.4f} over {compared} tokens")  # fmt: skip
    assert math.isfinite(mean_diff)
    assert share >= 0.8 and whole_share >= 0.5 and mean_diff < 0.05


@pytest.mark.gpu
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_streamed_fp8_chunks_on_the_copy_stream_are_exact_with_delays(tmp_path, kv_cache_dtype):
    """On CUDA, sequences longer than the GPU tier stream their older KV from fp8 cold tiers (pinned RAM and disk)
    as records, copied raw into the staging buffers on the copy streams and decoded by the attention kernels as they
    read them. With the copy streams held back by random sleeps, the tokens are those of the same run without the
    sleeps: a missing event between a buffer's copy and its attention would show as other tokens."""
    hf = make_checkpoint(tmp_path / "m", "llama")
    prompts = random_prompts(3, 300, 600, hf.config.vocab_size, seed=5)
    opts = dict(
        device="cuda",
        dtype="float32",
        gpu_blocks=12,
        cpu_blocks=24,
        staging_blocks=5,
        max_num_batched_tokens=64,
        kv_cache_dtype=kv_cache_dtype,
        cold_kv_dtype="fp8",
        enable_prefix_caching=False,
    )
    runs = []
    for delays in (False, True):
        with tierkv.LLM(str(tmp_path / "m"), nvme_dir=str(tmp_path / f"nvme-{delays}"), nvme_blocks=400, **opts) as llm:
            if delays:
                llm.pm.mover._debug_rng = random.Random(2)
            outs = llm.generate(prompts, tierkv.SamplingParams(max_tokens=16, temperature=0), use_tqdm=False)
            stats = llm.stats()
            assert llm.engine.runner.staging.dtype == torch.uint8
        assert stats["engine"]["streamed_steps"] > 0 and stats["links"]["nvme->gpu"]["bytes"] > 0
        runs.append([o.outputs[0].token_ids for o in outs])
    assert runs[0] == runs[1]

"""Prompt log-probabilities (SamplingParams.prompt_logprobs): each prompt token's log-probability given the tokens
before it, and the k most likely alternatives, equal to transformers' logits over the whole prompt; with chunked
prefill, KV over all three tiers, and a prompt whose prefix is cached (it is computed, not reused)."""

import pytest
import torch
from tiny_models import make_checkpoint, random_prompts

import tierkv
from tierkv import ConfigError, SamplingParams


def reference(hf, prompt, k):
    """transformers' log-probabilities: per prompt token after the first, (its log-prob, its rank, the top k)."""
    with torch.no_grad():
        lp = torch.log_softmax(hf(torch.tensor([prompt])).logits[0, :-1].float(), -1)
    rows = []
    for j, token in enumerate(prompt[1:]):
        chosen = lp[j, token]
        top = torch.topk(lp[j], k)
        rows.append((float(chosen), int((lp[j] > chosen).sum()) + 1, top.indices.tolist(), top.values.tolist()))
    return rows


def test_prompt_logprobs_equal_transformers_across_chunks_and_tiers(tmp_path):
    hf = make_checkpoint(tmp_path / "m", "llama")
    prompts = random_prompts(4, 20, 60, hf.config.vocab_size, seed=9)
    prompts.append(list(prompts[0]))  # the same prompt again: its prefix is cached by then
    k = 3
    params = SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=k, n=1)
    with tierkv.LLM(
        str(tmp_path / "m"),
        block_size=4,
        gpu_blocks=12,
        cpu_blocks=10,
        nvme_dir=str(tmp_path / "nvme"),
        nvme_blocks=200,
        max_num_batched_tokens=24,  # prompts in several chunks, beside other requests' decodes
    ) as llm:
        outs = llm.generate(prompts[:4], params, use_tqdm=False)
        again = llm.generate(prompts[4:], params, use_tqdm=False)[0]
        n2 = llm.generate([prompts[1]], SamplingParams(max_tokens=2, temperature=0.8, n=2, seed=1, prompt_logprobs=0))
        stats = llm.stats()
        plain = llm.generate([prompts[2]], SamplingParams(max_tokens=2), use_tqdm=False)[0]
    assert stats["tiers"]["nvme"]["blocks_in"] > 0 and stats["tiers"]["cpu"]["blocks_in"] > 0
    assert again.num_cached_tokens == 0  # not reused: every position's logits were needed
    assert plain.prompt_logprobs is None
    for prompt, out in zip(prompts, [*outs, again]):
        got = out.prompt_logprobs
        assert len(got) == len(prompt) and got[0] is None
        for j, (row, (lp, rank, top_ids, top_values)) in enumerate(zip(got[1:], reference(hf, prompt, k))):
            token = prompt[j + 1]
            assert abs(row[token].logprob - lp) < 1e-4 and row[token].rank == rank
            assert row[token].decoded_token == llm.get_tokenizer().decode([token])
            for r, (t, v) in enumerate(zip(top_ids, top_values), start=1):
                assert abs(row[t].logprob - v) < 1e-4 and row[t].rank in (r, rank)  # (the prompt token keeps its own)
            assert set(row) == {token, *top_ids}
    only = n2[0].prompt_logprobs
    assert len(only) == len(prompts[1]) and all(set(r) == {t} for r, t in zip(only[1:], prompts[1][1:]))


def test_bad_prompt_logprobs_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=-1)
    with pytest.raises(ConfigError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=True)
    make_checkpoint(tmp_path / "m", "llama")
    with tierkv.LLM(str(tmp_path / "m"), gpu_blocks=8, cpu_blocks=8) as llm:
        with pytest.raises(ConfigError, match="prompt_logprobs=100000 is more than the model's vocabulary"):
            llm.generate([[5, 6, 7]], SamplingParams(prompt_logprobs=100_000), use_tqdm=False)

"""Penalties, logit bias and min_tokens: transformers' repetition penalty and OpenAI's presence/frequency formula,
token for token, with the KV spread over all three tiers."""

import pytest
import torch
from tiny_models import make_checkpoint, random_prompts

import tierkv
from tierkv import ConfigError, SamplingParams


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("pen")
    hf = make_checkpoint(path, "llama")
    return str(path), hf


def tiered(path, nvme):
    return tierkv.LLM(path, device="cpu", block_size=4, gpu_blocks=6, cpu_blocks=8, nvme_dir=str(nvme), nvme_blocks=128)


def openai_greedy(hf, prompt, n, presence, frequency):
    """Greedy decoding with OpenAI's rule applied to transformers' logits: logit -= count * frequency + presence."""
    ids = list(prompt)
    out = []
    for _ in range(n):
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0, -1].float()
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.shape[0]) if out else None
        if counts is not None:
            logits = logits - counts * frequency - (counts > 0).float() * presence
        token = int(torch.argmax(logits))
        out.append(token)
        ids.append(token)
    return out


def test_repetition_penalty_equals_transformers(model, tmp_path):
    path, hf = model
    prompts = random_prompts(4, 8, 30, hf.config.vocab_size, seed=11)
    params = SamplingParams(max_tokens=12, temperature=0, repetition_penalty=1.8, ignore_eos=True)
    with tiered(path, tmp_path) as llm:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        stats = llm.stats()
    for prompt, tokens in zip(prompts, got):
        ids = torch.tensor([prompt])
        want = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=12,
            min_new_tokens=12,
            do_sample=False,
            repetition_penalty=1.8,
        )[0, len(prompt) :].tolist()
        assert tokens == want
    plain = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    with tiered(path, tmp_path / "plain") as llm:
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, plain, use_tqdm=False)] != got  # it bites
    assert stats["links"]["cpu->nvme"]["bytes"] > 0  # the KV went through all three tiers


@pytest.mark.parametrize("presence, frequency", [(1.5, 0.0), (0.0, 1.2), (0.7, 0.9), (-1.0, 0.5)])
def test_presence_and_frequency_follow_openais_formula(model, tmp_path, presence, frequency):
    path, hf = model
    prompts = random_prompts(3, 5, 20, hf.config.vocab_size, seed=12)
    params = SamplingParams(
        max_tokens=10, temperature=0, presence_penalty=presence, frequency_penalty=frequency, ignore_eos=True
    )
    with tiered(path, tmp_path) as llm:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert got == [openai_greedy(hf, p, 10, presence, frequency) for p in prompts]


def test_min_tokens_holds_eos_back_and_logit_bias_moves_the_choice(model, tmp_path):
    path, hf = model
    with tiered(path, tmp_path) as llm:
        eos = llm.loaded.eos_token_ids[0]
        forced = SamplingParams(max_tokens=10, temperature=0, min_tokens=4, logit_bias={eos: 100})
        out = llm.generate([[5, 6, 7]], forced, use_tqdm=False)[0].outputs[0]
        assert len(out.token_ids) == 5 and out.token_ids[-1] == eos and out.finish_reason == "stop"
        assert eos not in out.token_ids[:4]
        pushed = SamplingParams(max_tokens=6, temperature=0, logit_bias={"77": 100}, ignore_eos=True)
        assert llm.generate([[5, 6, 7]], pushed, use_tqdm=False)[0].outputs[0].token_ids == [77] * 6


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(presence_penalty=3), "presence_penalty=3"),
        (dict(frequency_penalty=float("nan")), "frequency_penalty"),
        (dict(repetition_penalty=0), "repetition_penalty=0"),
        (dict(min_tokens=20, max_tokens=10), "at most max_tokens"),
        (dict(logit_bias={"x": 1}), "not a token id"),
        (dict(logit_bias={5: 101}), r"\[-100, 100\]"),
    ],
)
def test_bad_values_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SamplingParams(**kwargs)

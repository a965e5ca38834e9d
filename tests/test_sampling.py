"""Sampling parameters and the sampler's filters, on hand-made logits."""

import math

import pytest
import torch

from tierkv import ConfigError, SamplingParams
from tierkv.sampling import make_generator, process_logits, sample_row, top_logprobs

LOGITS = torch.log(torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15]))  # probabilities 0.05 0.4 0.1 0.3 0.15


def kept(params):
    return [i for i, v in enumerate(process_logits(LOGITS.clone(), params).tolist()) if v != float("-inf")]


def test_filters_keep_what_their_definitions_say():
    assert kept(SamplingParams(top_k=2)) == [1, 3]
    assert kept(SamplingParams(top_p=0.5)) == [1, 3]  # 0.4 < 0.5, so the next token (0.3) is needed too
    assert kept(SamplingParams(top_p=0.4)) == [1]  # 0.4 reaches 0.4: nothing more
    assert kept(SamplingParams(top_p=0.75)) == [1, 3, 4]
    assert kept(SamplingParams(min_p=0.3)) == [1, 3, 4]  # threshold 0.3 * 0.4 = 0.12
    assert kept(SamplingParams(top_k=3, min_p=0.5)) == [1, 3]
    assert kept(SamplingParams()) == [0, 1, 2, 3, 4]


def test_temperature_scales_before_filtering():
    hot = process_logits(LOGITS.clone(), SamplingParams(temperature=2.0))
    assert torch.allclose(hot, LOGITS / 2.0)


def test_sampling_draws_from_the_distribution():
    g = make_generator(SamplingParams(seed=3), 0, torch.device("cpu"), torch.Generator())
    params = SamplingParams(temperature=1.0)
    counts = torch.zeros(5)
    n = 20000
    for _ in range(n):
        counts[sample_row(LOGITS, params, g)] += 1
    probs = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])
    # Each frequency within 4 standard deviations of its probability.
    assert torch.all((counts / n - probs).abs() <= 4 * torch.sqrt(probs * (1 - probs) / n))


def test_greedy_and_seeds():
    assert sample_row(LOGITS, SamplingParams(temperature=0), torch.Generator()) == 1
    params = SamplingParams(temperature=1.0, seed=11)
    a = [sample_row(LOGITS, params, make_generator(params, 0, torch.device("cpu"), None)) for _ in range(1)]
    g1 = make_generator(params, 0, torch.device("cpu"), None)
    g2 = make_generator(params, 0, torch.device("cpu"), None)
    g3 = make_generator(params, 1, torch.device("cpu"), None)
    s1 = [sample_row(LOGITS, params, g1) for _ in range(50)]
    s2 = [sample_row(LOGITS, params, g2) for _ in range(50)]
    s3 = [sample_row(LOGITS, params, g3) for _ in range(50)]
    assert s1 == s2 and s1 != s3 and a[0] == s1[0]


def test_top_logprobs():
    lp = top_logprobs(LOGITS, 2, 2)
    assert list(lp) == [2, 1, 3]  # the chosen token first, then the two most likely
    assert lp[1].logprob == pytest.approx(math.log(0.4), abs=1e-6) and lp[1].rank == 1 and lp[3].rank == 2
    assert lp[2].logprob == pytest.approx(math.log(0.1), abs=1e-6) and lp[2].rank == 4  # 0.4, 0.3, 0.15 above it


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_tokens=0), "max_tokens=0"),
        (dict(temperature=-1), "temperature=-1"),
        (dict(top_p=0), "top_p=0"),
        (dict(min_p=2), "min_p=2"),
        (dict(n=0), "n=0"),
        (dict(seed="x"), "seed='x'"),
        (dict(stop=[""]), "stop="),
        (dict(logprobs=-1), "logprobs=-1"),
        (dict(stop_token_ids=["a"]), "stop_token_ids"),
    ],
)
def test_bad_sampling_params(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SamplingParams(**kwargs)

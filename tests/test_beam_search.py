"""Beam search inside the engine against transformers' generate(num_beams=k): the same beams, token for token and
in order, with the same scores, for k = 1, 2, 4, with beams ending at EOS (an EOS the tiny model often picks),
each early-stopping rule, length penalties, and tiers small enough that the beams' shared blocks pass through the
CPU and NVMe tiers; and beam requests beside greedy and sampled ones in the same steps."""

from collections import Counter

import pytest
import torch
from kv_tools import check_invariants
from tiny_models import hf_greedy, make_checkpoint, random_prompts

import tierkv
from tierkv import BeamSearchParams, ConfigError, SamplingParams


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Per architecture: a checkpoint whose EOS is a token its greedy outputs often hold (same weights as with the
    default EOS), so that beams end at EOS along the way."""
    made = {}
    for arch in ("llama", "qwen2"):
        probe = make_checkpoint(tmp_path_factory.mktemp(f"{arch}_probe"), arch)
        prompts = random_prompts(6, 5, 20, probe.config.vocab_size, seed=7)
        common = Counter(t for p in prompts for t in hf_greedy(probe, p, 12)).most_common(1)[0][0]
        path = tmp_path_factory.mktemp(arch)
        made[arch] = (str(path), make_checkpoint(path, arch, eos_token_id=common))
    return made


def engine(path, nvme, **kw):
    opts = dict(block_size=4, gpu_blocks=24, cpu_blocks=12, nvme_dir=str(nvme), nvme_blocks=400)
    return tierkv.LLM(path, **{**opts, **kw})


def hf_beams(hf, prompt, params: BeamSearchParams):
    ids = torch.tensor([prompt])
    k = params.beam_width
    out = hf.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        num_beams=k,
        num_return_sequences=k,
        do_sample=False,
        max_new_tokens=params.max_tokens,
        length_penalty=params.length_penalty,
        early_stopping=params.early_stopping,
        return_dict_in_generate=True,
        output_scores=True,
    )
    if k == 1:
        return [(out.sequences[0, len(prompt) :].tolist(), None)]
    lengths = (out.beam_indices >= 0).sum(dim=1).tolist()
    return [
        (seq[len(prompt) : len(prompt) + n].tolist(), float(s))
        for seq, n, s in zip(out.sequences, lengths, out.sequences_scores)
    ]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize(
    "k, length_penalty, early_stopping",
    [(1, 1.0, False), (2, 1.0, False), (4, 1.0, False), (4, 0.5, True), (2, 2.0, "never"), (4, -1.0, False)],
)
def test_beams_equal_transformers(models, arch, k, length_penalty, early_stopping, tmp_path):
    path, hf = models[arch]
    prompts = random_prompts(6, 5, 20, hf.config.vocab_size, seed=7)  # the probe's: their greedy outputs hold EOS
    params = BeamSearchParams(beam_width=k, max_tokens=14, length_penalty=length_penalty, early_stopping=early_stopping)
    with engine(path, tmp_path / "nvme") as llm:
        outs = llm.beam_search(prompts, params)
        stats = llm.stats()
        check_invariants(llm.pm)
        assert not llm.pm.sequences  # every beam's blocks freed
    ended_at_eos = 0
    for prompt, out in zip(prompts, outs):
        want = hf_beams(hf, prompt, params)
        assert len(out.sequences) == k
        for r, (beam, (tokens, score)) in enumerate(zip(out.sequences, want)):
            assert beam.tokens == prompt + tokens, f"beam {r} differs from transformers'"
            if score is not None:
                assert abs(beam.score - score) <= 1e-5 * max(1.0, abs(score))
            ended_at_eos += beam.finish_reason == "stop"
    if length_penalty < 0 or k == 1:  # (short beams win with a negative penalty; greedy stops at its first EOS)
        assert ended_at_eos > 0  # some beams ended at EOS
    if k > 1:
        assert stats["tiers"]["nvme"]["blocks_in"] > 0 or stats["tiers"]["cpu"]["blocks_in"] > 0


def test_beams_share_blocks_and_mix_with_greedy_and_sampled_requests(models, tmp_path):
    """Beam, greedy and seeded sampled requests in the same steps: each gets what it gets alone; the beams' KV is
    shared (far fewer distinct blocks live than the live sequences' block tables add up to)."""
    path, hf = models["llama"]
    prompts = random_prompts(6, 20, 40, hf.config.vocab_size, seed=12)
    beam = BeamSearchParams(beam_width=4, max_tokens=12)
    greedy, sampled = SamplingParams(max_tokens=12, temperature=0), SamplingParams(max_tokens=12, seed=5, n=2)
    with engine(path, tmp_path / "alone") as llm:
        alone_beams = llm.beam_search(prompts[:2], beam)
        alone_greedy = llm.generate(prompts[2:4], greedy, use_tqdm=False)
        alone_sampled = llm.generate(prompts[4:], sampled, use_tqdm=False)
    with engine(path, tmp_path / "mixed", max_num_batched_tokens=48) as llm:
        ids = llm.add_requests(prompts[2:], [greedy, greedy, sampled, sampled])
        saved = []  # per step: 1 - distinct blocks / blocks of every live sequence's table (the paper's measure)
        real_step = llm.engine.step

        def step():
            out = real_step()
            tables = [llm.pm.ledger.seq(i).blocks for i in llm.pm.ledger.sequences]
            logical = sum(map(len, tables))
            if logical:
                saved.append(1 - len({b.block_id for t in tables for b in t}) / logical)
            return out

        llm.engine.step = step
        mixed_beams = llm.beam_search(prompts[:2], beam)
        done = {}
        while llm.has_unfinished():
            done.update({o.request_id: o for o in llm.step()})
    assert [[b.tokens for b in o.sequences] for o in mixed_beams] == [
        [b.tokens for b in o.sequences] for o in alone_beams
    ]
    mixed = [done[i] for i in ids]
    assert [o.outputs[0].token_ids for o in mixed[:2]] == [o.outputs[0].token_ids for o in alone_greedy]
    assert [[c.token_ids for c in o.outputs] for o in mixed[2:]] == [
        [c.token_ids for c in o.outputs] for o in alone_sampled
    ]
    assert max(saved) > 0.3  # the beams (and the sampled pairs) share their prompts' and common prefixes' blocks


def test_the_unshared_baseline_gives_the_same_beams_from_private_copies(models, tmp_path, monkeypatch):
    """With sharing off (the baseline benchmarks/beam_sharing.py measures against), each forked beam or sample owns
    copies of all its blocks: the same outputs, no block held by two sequences, more copies made."""
    path, hf = models["llama"]
    prompts = random_prompts(3, 20, 40, hf.config.vocab_size, seed=3)
    beam, sampled = BeamSearchParams(beam_width=4, max_tokens=10), SamplingParams(max_tokens=10, seed=5, n=3)

    def run(nvme):
        shared_most = 0
        with engine(path, nvme, gpu_blocks=64, cpu_blocks=64) as llm:
            real_step = llm.engine.step

            def step():
                nonlocal shared_most
                out = real_step()
                held = Counter(b.block_id for i in llm.pm.ledger.sequences for b in llm.pm.ledger.seq(i).blocks)
                shared_most = max([shared_most, *held.values()])
                return out

            llm.engine.step = step
            beams = [[b.tokens for b in o.sequences] for o in llm.beam_search(prompts, beam)]
            samples = [[c.token_ids for c in o.outputs] for o in llm.generate(prompts, sampled, use_tqdm=False)]
            check_invariants(llm.pm)
            return beams, samples, shared_most, llm.stats()["cow_copies"]

    shared = run(tmp_path / "shared")
    monkeypatch.setattr(tierkv.scheduler.Scheduler, "share_blocks", False)
    unshared = run(tmp_path / "unshared")
    assert unshared[:2] == shared[:2]
    assert shared[2] > 1 and unshared[2] == 1  # blocks were shared, and then never
    assert unshared[3] > shared[3]


def test_beams_run_together_where_their_shared_blocks_fit_once(models, tmp_path):
    """The scheduler counts a request's shared prompt blocks once: 4 beams of a 40-token prompt (10 blocks) fit a
    24-block GPU tier together (10 + 4 x 3 blocks at most), where charging each beam its whole table (4 x 13) would
    run them a pair at a time. Every beam then takes a token every step: one step per token after the prompt."""
    path, hf = models["llama"]
    prompt = random_prompts(1, 40, 40, hf.config.vocab_size, seed=4)[0]
    params = BeamSearchParams(beam_width=4, max_tokens=8, ignore_eos=True)
    with tierkv.LLM(path, block_size=4, gpu_blocks=200) as llm:
        roomy = llm.beam_search([prompt], params)[0]
    with tierkv.LLM(path, block_size=4, gpu_blocks=24, max_num_batched_tokens=64) as llm:
        out = llm.beam_search([prompt], params)[0]
        stats = llm.stats()
    assert [b.tokens for b in out.sequences] == [b.tokens for b in roomy.sequences]
    assert stats["engine"]["preemptions"] == 0
    assert (
        stats["engine"]["steps"] == 1 + params.max_tokens - 1
    )  # the prompt's step (its first token), then one a token


def test_beam_search_params_are_checked(models):
    for bad in (dict(beam_width=0), dict(beam_width=2, max_tokens=0), dict(beam_width=2, early_stopping="soon")):
        with pytest.raises(ConfigError, match="BeamSearchParams"):
            BeamSearchParams(**bad)
    path, _ = models["llama"]
    with tierkv.LLM(path, gpu_blocks=8, cpu_blocks=8) as llm:
        with pytest.raises(ConfigError, match="BeamSearchParams"):
            llm.beam_search([[5, 6]], SamplingParams())

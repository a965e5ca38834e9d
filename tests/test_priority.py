"""Priority scheduling (scheduling_policy="priority", lower runs first, as vLLM): requests of higher priority
start at once even where lower ones fill the GPU tier, which give their room up by swapping their KV down (never
recomputing it) and finish later with exactly the output they would have had alone."""

import pytest
from tiny_models import hf_greedy, make_checkpoint, random_prompts

import tierkv
from tierkv import ConfigError, SamplingParams

OPTS = dict(block_size=4, gpu_blocks=40, cpu_blocks=200, max_num_batched_tokens=64)


def started(llm, request_ids) -> list[bool]:
    live = {r.request_id: r for r in llm.engine.live.values()}
    return [bool(live[rid].sequences) and live[rid].sequences[0].num_computed > 0 for rid in request_ids]


@pytest.mark.parametrize("policy", ["priority", "fcfs"])
def test_high_priority_requests_start_at_once_and_the_preempted_finish_exactly(policy, tmp_path):
    hf = make_checkpoint(tmp_path / "m", "llama")
    low = random_prompts(4, 30, 40, hf.config.vocab_size, seed=1)
    high = random_prompts(2, 20, 30, hf.config.vocab_size, seed=2)
    params = SamplingParams(max_tokens=40, temperature=0)
    with tierkv.LLM(str(tmp_path / "m"), scheduling_policy=policy, **OPTS) as llm:
        ranks = policy == "priority"
        low_ids = llm.add_requests(low, params, [f"low{i}" for i in range(4)], priority=[1] * 4 if ranks else None)
        for _ in range(8):  # the low ones fill the GPU tier: three run, one waits for room
            llm.step()
        assert started(llm, low_ids) == [True, True, True, False]
        high_ids = llm.add_requests(high, params, request_ids=["high0", "high1"], priority=[0, 0] if ranks else None)
        llm.step()
        if policy == "priority":
            assert started(llm, high_ids) == [True, True]  # at once, ahead of the waiting low one too
        else:
            assert started(llm, high_ids) == [False, False]  # first come, first served: they wait for room
        done = {}
        while llm.has_unfinished():
            done.update({o.request_id: o for o in llm.step()})
        stats = llm.stats()
    for rid, prompt in zip(low_ids + high_ids, low + high):
        assert done[rid].outputs[0].token_ids == hf_greedy(hf, prompt, 40), rid
    if policy == "priority":
        assert stats["engine"]["preemptions"] > 0 and stats["links"]["gpu->cpu"]["blocks"] > 0
        assert stats["links"]["cpu->gpu"]["blocks"] > 0  # the preempted came back from the CPU tier


def test_priorities_are_checked(tmp_path):
    make_checkpoint(tmp_path / "m", "llama")
    with tierkv.LLM(str(tmp_path / "m"), **OPTS) as llm:
        with pytest.raises(ConfigError, match='scheduling_policy="priority"'):
            llm.generate([[5, 6]], SamplingParams(max_tokens=2), priority=[1], use_tqdm=False)
        assert llm.generate([[5, 6]], SamplingParams(max_tokens=2), priority=[0], use_tqdm=False)
    with tierkv.LLM(str(tmp_path / "m"), scheduling_policy="priority", **OPTS) as llm:
        with pytest.raises(ConfigError, match="one integer per prompt"):
            llm.generate([[5, 6], [7, 8]], SamplingParams(max_tokens=2), priority=[1], use_tqdm=False)
        with pytest.raises(ConfigError, match="must be an integer"):
            llm.generate([[5, 6]], SamplingParams(max_tokens=2), priority=[0.5], use_tqdm=False)
    with pytest.raises(ConfigError, match="scheduling_policy 'lifo'"):
        tierkv.LLM(str(tmp_path / "m"), scheduling_policy="lifo")

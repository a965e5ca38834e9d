"""The Python API's vLLM-shaped entry points: dict prompts, chat through the model's template, abort_request."""

import pytest
from tiny_models import make_chat_checkpoint, make_checkpoint
from transformers import AutoTokenizer

import tierkv
from tierkv import ConfigError, SamplingParams

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is a KV cache?"}]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat")
    make_chat_checkpoint(path)
    return str(path)


def small_llm(path):
    return tierkv.LLM(path, device="cpu", block_size=4, gpu_blocks=4, cpu_blocks=32)


def tokens(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def test_dict_prompts_are_the_text_or_ids_they_hold(chat_model):
    with small_llm(chat_model) as llm:
        want = llm.generate(["hello there", [5, 6, 7, 8]], GREEDY, use_tqdm=False)
        got = llm.generate([{"prompt": "hello there"}, {"prompt_token_ids": [5, 6, 7, 8]}], GREEDY, use_tqdm=False)
        assert tokens(got) == tokens(want)
        assert got[0].prompt == "hello there" and got[1].prompt_token_ids == [5, 6, 7, 8]
        assert tokens(llm.generate({"prompt": "hello there"}, GREEDY, use_tqdm=False)) == tokens(want)[:1]
        for bad, message in (
            ({"prompt": [1, 2]}, "'prompt' must be text"),
            ({"text": "x"}, r"unknown keys \['text'\]"),
            ({"prompt": "a", "prompt_token_ids": [1]}, "exactly one of"),
        ):
            with pytest.raises(ConfigError, match=message):
                llm.generate(["fine", bad], GREEDY, use_tqdm=False)
        assert not llm.has_unfinished()  # a bad prompt queued nothing, its good neighbour neither


def test_chat_equals_generate_on_the_templates_tokens(chat_model):
    tok = AutoTokenizer.from_pretrained(chat_model)
    ids = list(tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=False))
    assert tok.decode(ids).endswith("assistant:")
    with small_llm(chat_model) as llm:
        want = llm.generate([ids], GREEDY, use_tqdm=False)
        got = llm.chat(CHAT, GREEDY, use_tqdm=False)
        assert got[0].prompt_token_ids == ids and tokens(got) == tokens(want)
        other = [{"role": "user", "content": "and a block table?"}]
        both = llm.chat([CHAT, other], GREEDY, use_tqdm=False)
        assert tokens(both)[0] == tokens(want)[0] and len(both) == 2
        with pytest.raises(ConfigError, match="a chat must be a non-empty list"):
            llm.chat([{"role": "user"}], GREEDY, use_tqdm=False)


def test_chat_without_a_template_says_so(tmp_path):
    make_checkpoint(tmp_path, "llama")
    with small_llm(str(tmp_path)) as llm, pytest.raises(ConfigError, match="needs a chat template"):
        llm.chat(CHAT, GREEDY, use_tqdm=False)


def test_abort_request_stops_it_and_frees_its_blocks(chat_model):
    with small_llm(chat_model) as llm:
        [rid] = llm.add_requests(["a prompt that runs a while"], SamplingParams(max_tokens=40, ignore_eos=True))
        llm.step()
        assert llm.pm.sequences
        assert llm.abort_request(rid) == 1
        assert not llm.pm.sequences and not llm.has_unfinished() and llm.step() == []


def test_warm_up_counts_nothing_keeps_nothing_and_changes_no_output(chat_model):
    """What `tierkv serve` runs before its first connection: the engine's stats read as if nothing ran, no block is
    held or cached, the load-or-recompute choice keeps its calibration, and outputs are those of a cold engine."""
    prompts = [list(range(7, 18)), [20, 21, 22]]  # the first: the warm-up's own prompt at block size 4
    with small_llm(chat_model) as cold:
        want = tokens(cold.generate(prompts, GREEDY, use_tqdm=False))
    with small_llm(chat_model) as llm:
        chooser = llm.engine.prefix.chooser
        calibrated = chooser.prefill_tokens_per_s
        llm.warm_up()
        stats = llm.stats()
        assert {
            k: stats["engine"][k] for k in ("steps", "prompt_tokens", "generated_tokens", "running")
        } == dict.fromkeys(("steps", "prompt_tokens", "generated_tokens", "running"), 0)
        assert stats["prefix"]["queried_tokens"] == 0
        assert all(t["used_blocks"] == 0 and t["cached_blocks"] == 0 for t in stats["tiers"].values())
        assert chooser.prefill_tokens_per_s == calibrated
        assert tokens(llm.generate(prompts, GREEDY, use_tqdm=False)) == want
        assert llm.stats()["prefix"]["hit_tokens"] == 0  # the warm-up's prompt left no prefix to find


@pytest.mark.parametrize("limits", [dict(max_model_len=4), dict(gpu_blocks=2, cpu_blocks=0)])
def test_warm_up_fits_its_request_within_the_engines_limits(chat_model, limits):
    """A server with a tiny context or tier still starts: the warm-up's request is sized to fit, not refused."""
    opts = dict(device="cpu", block_size=4, gpu_blocks=4, cpu_blocks=32) | limits
    with tierkv.LLM(chat_model, **opts) as llm:
        llm.warm_up()
        assert llm.stats()["engine"]["steps"] == 0
        out = llm.generate([[5, 6]], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True), use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 2

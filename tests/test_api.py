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

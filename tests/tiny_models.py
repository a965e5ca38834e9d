"""Tiny random-weight decoders saved as Hugging Face checkpoint folders (with a small byte-level BPE tokenizer),
and transformers' own greedy output for them: the ground truth of the engine tests."""

from __future__ import annotations

import torch

ARCHS = ("llama", "mistral", "qwen2", "qwen3")
_CORPUS = [
    "Once upon a time there was a little cat who lived in a big house by the sea.",
    "The quick brown fox jumps over the lazy dog, and the dog does not mind at all.",
    "Tiered memory keeps hot blocks on the GPU and cold ones in host memory or on disk.",
]


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def make_config(arch: str, vocab_size: int, **overrides):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[arch]
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=None,
        tie_word_embeddings=arch == "qwen2",
    )
    if arch == "mistral":
        kwargs["sliding_window"] = None
    kwargs.update(overrides)
    return cls(**kwargs)


def make_checkpoint(path, arch: str, seed: int = 0, **overrides):
    """Save a random-weight model and its tokenizer in `path`; returns the transformers model (float32, eval)."""
    from transformers import AutoModelForCausalLM

    tokenizer = make_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(arch, len(tokenizer), **overrides)).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def make_chat_checkpoint(path, arch: str = "llama"):
    """make_checkpoint, with a small chat template in the tokenizer (for chat routes and LLM.chat)."""
    from transformers import AutoTokenizer

    model = make_checkpoint(path, arch)
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)
    return model


def random_prompts(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(2, vocab, (length,), generator=g).tolist() for length in lengths]  # no BOS/EOS inside


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' generate() for one prompt alone: the reference output."""
    ids = torch.tensor([prompt], device=model.device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt) :].tolist()

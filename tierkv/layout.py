"""The shape of one KV block, the unit every tier stores and moves."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch

from tierkv.errors import ConfigError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """torch dtype from a name ("bfloat16", "float16", "float32") or a torch dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ConfigError(f"dtype {dtype} is not supported for the KV cache; use one of {sorted(DTYPES)}")
        return dtype
    name = str(dtype).removeprefix("torch.")
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    name = aliases.get(name, name)
    if name not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not supported for the KV cache; use one of {sorted(DTYPES)}")
    return DTYPES[name]


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold `num_tokens` tokens: the one place this is computed."""
    return -(-num_tokens // block_size)


def request_blocks(prompt_len: int, max_tokens: int, n: int, block_size: int, share: bool = True) -> int:
    """Blocks a request may need at most: each of its `n` samples grows to prompt + max_tokens tokens, and they
    share the prompt's full blocks (unless `share` is off: each owns copies)."""
    full = blocks_for(prompt_len + max_tokens, block_size)
    shared = prompt_len // block_size if share else 0
    return full + (n - 1) * (full - shared)


@dataclass(frozen=True)
class KVLayout:
    """One block holds `block_size` tokens of keys and values for every layer.

    Block shape: (num_layers, 2, block_size, num_kv_heads, head_dim), index 0 of the second axis = keys,
    1 = values. All of a block's bytes are contiguous, so a block is one large extent on every tier
    (an 8B-class model at block_size 16 gives 2 MiB blocks).
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype = torch.bfloat16
    block_size: int = 16
    # "fp8": blocks stored compressed (`kv_cache_dtype="fp8"` on the GPU tier, `cold_kv_dtype="fp8"` on the cold
    # tiers): per layer, the keys' and values' e4m3 codes then their float32 scales per head
    # (tierkv/kernels/kv_quant.py, kv_fp8.py); a block is (num_layers, record) bytes, about half of bf16. `dtype`
    # stays the KV's own: what the codes decode to.
    codec: str = "none"

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"KV layout: {name} must be a positive integer, got {value!r}")
        if self.block_size > 4096:
            raise ConfigError(
                f"KV layout: block_size {self.block_size} tokens is too large; use at most 4096 (16 is usual)"
            )
        object.__setattr__(self, "dtype", parse_dtype(self.dtype))
        if self.codec not in ("none", "fp8"):
            raise ConfigError(f"KV layout: codec {self.codec!r} is not one of 'none', 'fp8'")
        if self.codec == "fp8" and (self.block_size * self.num_kv_heads * self.head_dim) % 2:
            raise ConfigError(
                "fp8 KV (kv_cache_dtype or cold_kv_dtype) needs block_size x num_kv_heads x head_dim to be even (its "
                f"scales align to 4 bytes); got {self.block_size} x {self.num_kv_heads} x {self.head_dim}: use an even "
                "block_size"
            )

    def compressed(self, codec: str) -> KVLayout:
        """The same KV stored with `codec` ("none": this layout uncompressed)."""
        return replace(self, codec=codec)

    @property
    def kv_shape(self) -> tuple[int, int, int, int, int]:
        """A block's KV as the model reads it: (num_layers, 2, block_size, num_kv_heads, head_dim)."""
        return (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def record_nbytes(self) -> int:
        """Bytes of one layer of a block as stored."""
        if self.codec == "fp8":
            return 2 * self.block_size * self.num_kv_heads * self.head_dim + 2 * self.num_kv_heads * 4
        return 2 * self.block_size * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    @property
    def storage_dtype(self) -> torch.dtype:
        """The element type of a pool of these blocks."""
        return torch.uint8 if self.codec != "none" else self.dtype

    @property
    def block_shape(self) -> tuple[int, ...]:
        """A block as stored: the KV's shape, or (num_layers, record bytes) compressed."""
        return self.kv_shape if self.codec == "none" else (self.num_layers, self.record_nbytes)

    @property
    def token_shape(self) -> tuple[int, int, int, int]:
        """Shape of one token's KV across layers: (num_layers, 2, num_kv_heads, head_dim)."""
        return (self.num_layers, 2, self.num_kv_heads, self.head_dim)

    @property
    def block_numel(self) -> int:
        return math.prod(self.block_shape)

    @property
    def block_nbytes(self) -> int:
        return self.block_numel * self.storage_dtype.itemsize

    @property
    def token_nbytes(self) -> int:
        return self.block_nbytes // self.block_size

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` tokens."""
        return blocks_for(num_tokens, self.block_size)

    def describe(self) -> dict:
        """JSON-able description; two layouts with equal descriptions store identical bytes per block."""
        d = asdict(self)
        d["dtype"] = str(self.dtype).removeprefix("torch.")
        if self.codec == "none":
            del d["codec"]  # (as before codecs existed: stores written then stay readable)
        return d

    @classmethod
    def from_hf_config(cls, config, dtype: str | torch.dtype = torch.bfloat16, block_size: int = 16) -> KVLayout:
        """The layout for a transformers decoder config (Llama, Mistral, Qwen2 and kin)."""
        num_heads = config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        return cls(config.num_hidden_layers, num_kv_heads, head_dim, parse_dtype(dtype), block_size)

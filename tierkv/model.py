"""tierkv's own forward pass for Llama-family decoders (Llama, Mistral, Qwen2, Qwen3) over the paged KV cache.

Module and parameter names follow transformers' checkpoints (`model.layers.N.self_attn.q_proj.weight`, ...) so
safetensors load by name. The arithmetic follows transformers' own, step for step (RMSNorm in float32, rotary
embeddings as cos/sin of float32 angles, residual adds in the model dtype), so that greedy decoding matches
`generate()` token for token in float32. Attention goes through a per-step callable that owns the KV cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from tierkv.errors import ConfigError
from tierkv.kernels.fused import add_rms_norm, rms_norm, rotary_qk, silu_mul
from tierkv.kernels.gemv import linear

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")

# (layer index, q (T, Hq, D), k (T, Hkv, D), v (T, Hkv, D)) -> attention output (T, Hq, D)
AttentionFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ModelSpec:
    """What tierkv needs to know of a decoder config, normalised across architectures."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    sliding_windows: tuple[int, ...]  # per layer; 0 = full attention
    max_position_embeddings: int

    @classmethod
    def from_hf_config(cls, config) -> ModelSpec:
        archs = getattr(config, "architectures", None) or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            by_type = {
                "llama": "LlamaForCausalLM",
                "mistral": "MistralForCausalLM",
                "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM",
            }
            arch = by_type.get(getattr(config, "model_type", ""))
        if arch is None:
            raise ConfigError(
                f"model architecture {archs or getattr(config, 'model_type', '?')} is not supported; "
                f"tierkv runs {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act {config.hidden_act!r} is not supported; tierkv's MLP is SiLU-gated")
        num_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        layers = config.num_hidden_layers
        window = getattr(config, "sliding_window", None) or 0
        if arch == "MistralForCausalLM":
            windows = (window,) * layers
        elif arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
            types = getattr(config, "layer_types", None) or ["full_attention"] * layers
            windows = tuple(window if t == "sliding_attention" else 0 for t in types)
        else:
            windows = (0,) * layers
        qwen2 = arch == "Qwen2ForCausalLM"
        return cls(
            architecture=arch,
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=layers,
            num_heads=num_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=config.rms_norm_eps,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=True if qwen2 else bool(getattr(config, "attention_bias", False)),
            o_bias=False if qwen2 else bool(getattr(config, "attention_bias", False)),
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
            sliding_windows=windows,
            max_position_embeddings=getattr(config, "max_position_embeddings", 0) or 0,
        )


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def add_then_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(self(residual + x), residual + x), in one pass over x and residual."""
        return add_rms_norm(x, residual, self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """cos/sin tables from the config's rope parameters (default, linear, llama3, yarn, longrope)."""

    def __init__(self, config, head_dim: int) -> None:
        super().__init__()
        params = getattr(config, "rope_parameters", None) or {}
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type == "default":
            base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
            inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
            scaling = 1.0
        elif rope_type == "dynamic":
            raise ConfigError(
                "rope_type 'dynamic' (NTK scaling that changes with the sequence length) is not supported"
            )
        else:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            if rope_type not in ROPE_INIT_FUNCTIONS:
                raise ConfigError(f"rope_type {rope_type!r} is not supported")
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.scaling = scaling

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[:, None].float() * self.inv_freq.to(positions.device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scaling).to(dtype), (emb.sin() * self.scaling).to(dtype)


class RowParallelLinear(nn.Module):
    """A Linear whose input features are split across ranks: partial products are summed (one all-reduce), then
    the bias is added once. Without tensor parallelism it is an ordinary Linear (same parameter names)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp is None:
            return linear(x, self.weight, self.bias)
        y = self.tp.all_reduce(linear(x, self.weight))
        return y if self.bias is None else y + self.bias


@torch.no_grad()
def _fuse_linears(*linears: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate the weights (and biases) of Linears that read the same input along the output dim; each Linear's
    parameters then become views into the concatenation (no memory kept twice; names and loading unchanged)."""
    weight = torch.cat([m.weight for m in linears])
    bias = torch.cat([m.bias for m in linears]) if linears[0].bias is not None else None
    lo = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight.data = weight[lo : lo + n]
        if bias is not None:
            m.bias.data = bias[lo : lo + n]
        lo += n
    return weight, bias


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, tp=None) -> None:
        super().__init__()
        d, h, kv = spec.head_dim, spec.num_heads, spec.num_kv_heads
        self.spec = spec
        self.q_proj = nn.Linear(spec.hidden_size, h * d, bias=spec.qkv_bias)
        self.k_proj = nn.Linear(spec.hidden_size, kv * d, bias=spec.qkv_bias)
        self.v_proj = nn.Linear(spec.hidden_size, kv * d, bias=spec.qkv_bias)
        self.o_proj = RowParallelLinear(h * d, spec.hidden_size, spec.o_bias, tp)
        if spec.qk_norm:
            self.q_norm = RMSNorm(d, spec.rms_norm_eps)
            self.k_norm = RMSNorm(d, spec.rms_norm_eps)
        self.qkv: tuple[torch.Tensor, torch.Tensor | None] | None = None  # (weight, bias) once fused

    def fuse(self) -> None:
        """One (q + k + v, hidden) weight for the three projections, so that a step runs one GEMM instead of
        three; q_proj/k_proj/v_proj keep their parameters (same names) as views into it."""
        self.qkv = _fuse_linears(self.q_proj, self.k_proj, self.v_proj)

    def forward(
        self, layer: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: AttentionFn
    ) -> torch.Tensor:
        q, k, v = self.project(x, cos, sin)
        return self.output(attend(layer, q, k, v))

    def project(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (T, Hq, D), k and v (T, Hkv, D), rotary applied. `out` (T, (Hq + 2 Hkv) D): where they are written
        (q, k and v are then views into it), as a graph's static buffer."""
        spec = self.spec
        T = x.shape[0]
        sizes = [spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim]
        if self.qkv is not None:
            qkv = linear(x, *self.qkv)
            if out is not None:
                qkv = out.copy_(qkv)
            q, k, v = qkv.split(sizes, dim=-1)
        elif out is not None:
            q, k, v = out.split(sizes, dim=-1)
            for proj, dst in ((self.q_proj, q), (self.k_proj, k), (self.v_proj, v)):
                dst.copy_(proj(x))
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(T, spec.num_heads, spec.head_dim)
        k = k.view(T, spec.num_kv_heads, spec.head_dim)
        v = v.view(T, spec.num_kv_heads, spec.head_dim)
        if spec.qk_norm:
            qn, kn = self.q_norm(q), self.k_norm(k)
            q, k = (q.copy_(qn), k.copy_(kn)) if out is not None else (qn, kn)
        q, k = rotary_qk(q, k, cos, sin)  # in place
        return q, k, v

    def output(self, out: torch.Tensor) -> torch.Tensor:
        """The output projection of the attention output (T, Hq, D)."""
        return self.o_proj(out.reshape(out.shape[0], self.spec.num_heads * self.spec.head_dim))


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec, tp=None) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=spec.mlp_bias)
        self.up_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=spec.mlp_bias)
        self.down_proj = RowParallelLinear(spec.intermediate_size, spec.hidden_size, spec.mlp_bias, tp)
        self.gate_up: tuple[torch.Tensor, torch.Tensor | None] | None = None  # (weight, bias) once fused

    def fuse(self) -> None:
        """One (2 x intermediate, hidden) weight for gate and up (one GEMM); their parameters become views into it."""
        self.gate_up = _fuse_linears(self.gate_proj, self.up_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is not None:
            gate, up = linear(x, *self.gate_up).chunk(2, dim=-1)  # silu_mul reads the halves in place
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(silu_mul(gate, up))


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, tp=None) -> None:
        super().__init__()
        self.self_attn = Attention(spec, tp)
        self.mlp = MLP(spec, tp)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)

    def forward(
        self, layer: int, x: torch.Tensor, residual: torch.Tensor | None, cos, sin, attend: AttentionFn
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream is `residual + x` (just `x` in the first layer, whose x is the embedding): the add is
        left to the norm that follows it, which fuses the two. Returns (MLP output, residual) for the next one."""
        q, k, v, residual = self.pre_attention(x, residual, cos, sin)
        return self.post_attention(attend(layer, q, k, v), residual)

    def pre_attention(self, x, residual, cos, sin, qkv_out: torch.Tensor | None = None):
        """(q, k, v, residual): the layer up to its attention (see Attention.project for `qkv_out`)."""
        if residual is None:
            normed, residual = self.input_layernorm(x), x
        else:
            normed, residual = self.input_layernorm.add_then_norm(x, residual)
        return *self.self_attn.project(normed, cos, sin, qkv_out), residual

    def post_attention(self, attn: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(MLP output, residual): the layer from its attention output (T, Hq, D) on."""
        normed, residual = self.post_attention_layernorm.add_then_norm(self.self_attn.output(attn), residual)
        return self.mlp(normed), residual


class VocabParallelEmbedding(nn.Module):
    """Each rank holds rows [lo, hi) of the vocabulary; lookups outside them give zeros, summed across ranks."""

    def __init__(self, rows: tuple[int, int], hidden: int, tp) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows[1] - rows[0], hidden))
        self.lo, self.tp = rows[0], tp

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp is None:
            return nn.functional.embedding(ids, self.weight)
        local = ids - self.lo
        inside = (local >= 0) & (local < self.weight.shape[0])
        out = nn.functional.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight) * inside[:, None].to(
            self.weight.dtype
        )
        return self.tp.all_reduce(out)


class _Body(nn.Module):
    def __init__(self, spec: ModelSpec, shards, tp) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(shards.vocab, spec.hidden_size, tp)
        self.layers = nn.ModuleList(DecoderLayer(spec, tp) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)


class CausalLM(nn.Module):
    """The decoder. `forward` runs the flattened tokens of one step; `logits` projects chosen rows to the vocab.

    With tensor parallelism (`tp`), this rank's module holds its shards (`shards`) and `spec` is the local one
    (its heads, KV heads and MLP width); `vocab_size` stays the model's."""

    def __init__(self, spec: ModelSpec, hf_config, shards=None, tp=None) -> None:
        super().__init__()
        from tierkv.tp.group import Shards

        shards = shards or Shards.for_rank(spec, None)
        self.spec, self.shards, self.tp = spec, shards, tp
        self.model = _Body(spec, shards, tp)
        self.rotary = RotaryEmbedding(hf_config, spec.head_dim)
        if not spec.tie_word_embeddings:
            self.lm_head = nn.Linear(spec.hidden_size, shards.vocab[1] - shards.vocab[0], bias=False)

    def fuse_projections(self) -> None:
        """Run q/k/v as one GEMM and gate/up as one (call once the weights are loaded): at a decode step each GEMM
        is a read of its weights, and fewer, larger ones come closer to the memory bandwidth (H100, M=8: 88% of
        it against 82% for seven separate; benchmarks/decode_gemms.py)."""
        for layer in self.model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attend: AttentionFn) -> torch.Tensor:
        """input_ids, positions: (T,); returns the final-normed hidden states (T, hidden)."""
        x, cos, sin = self.embed(input_ids, positions)
        residual = None
        for i, layer in enumerate(self.model.layers):
            x, residual = layer(i, x, residual, cos, sin, attend)
        return self.finish(x, residual)

    def embed(
        self, input_ids: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(embeddings, cos, sin) of the step's tokens: what the first layer takes."""
        x = self.model.embed_tokens(input_ids)
        return (x, *self.rotary(positions, x.dtype))

    def finish(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """The final-normed hidden states from the last layer's output and residual."""
        return self.model.norm.add_then_norm(x, residual)[0]

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(n, vocab_size) float32; with tensor parallelism every rank takes part and gets the whole rows."""
        weight = self.model.embed_tokens.weight if self.spec.tie_word_embeddings else self.lm_head.weight
        out = linear(hidden, weight).float()
        if self.tp is not None:
            out = self.tp.all_gather_last(out)[:, : self.spec.vocab_size]
        return out

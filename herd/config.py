"""Model configurations: frozen dataclasses and the presets of every official Llama size. No torch here.

Facts and their sources are in shared/SPEC.md §1 (text), §5 (Llama 4).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from herd.errors import ConfigError


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None = None) -> int:
    """Meta's FeedForward hidden size rule: int(2*4D/3), times the multiplier, rounded up to multiple_of."""
    h = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        h = int(ffn_dim_multiplier * h)
    return multiple_of * ((h + multiple_of - 1) // multiple_of)


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 "llama3" frequency scaling (SPEC.md §1)."""

    rope_type: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type != "llama3":
            raise ConfigError(f"rope scaling type {self.rope_type!r} is not supported (expected 'llama3')")
        if self.factor <= 0 or self.original_max_position_embeddings <= 0:
            raise ConfigError(f"rope scaling needs factor > 0 and original_max_position_embeddings > 0, got {self}")
        if self.high_freq_factor < self.low_freq_factor or self.low_freq_factor <= 0:
            raise ConfigError(f"rope scaling needs 0 < low_freq_factor <= high_freq_factor, got {self}")


@dataclass(frozen=True)
class MoEConfig:
    """Llama 4 mixture of experts (SPEC.md §5): E routed SwiGLU experts, top-k sigmoid routing, one shared expert.

    Meta params.json `moe_args` / HF `num_local_experts`, `num_experts_per_tok`, `intermediate_size` (expert and
    shared-expert hidden size), `interleave_moe_layer_step`.
    """

    n_experts: int
    top_k: int = 1
    expert_ffn_dim: int = 8192  # hidden size of each routed expert and of the shared expert
    interleave_step: int = 1  # layer i is MoE iff (i + 1) % step == 0 (HF moe_layers = range(step-1, L, step))
    shared_expert: bool = True

    def __post_init__(self):
        for name in ("n_experts", "top_k", "expert_ffn_dim", "interleave_step"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"moe config field {name} must be a positive integer, got {value!r}")
        if self.top_k > self.n_experts:
            raise ConfigError(f"moe top_k ({self.top_k}) exceeds the number of experts ({self.n_experts})")


@dataclass(frozen=True)
class ModelConfig:
    """One Llama-family text transformer. Derived sizes are properties."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    ffn_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    head_dim_override: int | None = None
    family: str = "llama"  # llama2, llama3, llama3.1, llama3.2, llama3.3, llama4, or llama (unknown)
    # Llama 4 pieces (None / 0 / False = off): SPEC.md §5. With moe set, ffn_dim is the hidden size of the dense
    # (non-MoE) layers (HF intermediate_size_mlp) and moe.expert_ffn_dim that of the experts (HF intermediate_size).
    moe: MoEConfig | None = None
    nope_layer_interval: int = 0  # layer i has no RoPE iff interval and (i + 1) % interval == 0
    attention_chunk_size: int = 0  # RoPE layers attend within chunks of this many positions (0 = global)
    use_qk_norm: bool = False  # weightless RMS norm of q and k after RoPE, on RoPE layers only
    attn_temperature_tuning: bool = False  # NoPE layers scale q by 1 + attn_scale*ln(floor((pos+1)/floor_scale)+1)
    attn_scale: float = 0.1
    floor_scale: float = 8192.0

    def __post_init__(self):
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config field {name} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim_override is None and self.dim % self.n_heads:
            raise ConfigError(f"dim ({self.dim}) must be a multiple of n_heads ({self.n_heads}) or head_dim given")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if not (self.norm_eps > 0 and math.isfinite(self.norm_eps)):
            raise ConfigError(f"norm_eps must be a positive number, got {self.norm_eps}")
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise ConfigError(f"rope_theta must be a positive number, got {self.rope_theta}")
        for name in ("nope_layer_interval", "attention_chunk_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"config field {name} must be an integer >= 0 (0 = off), got {value!r}")
        if not (self.floor_scale > 0 and math.isfinite(self.floor_scale) and math.isfinite(self.attn_scale)):
            raise ConfigError(f"floor_scale must be positive and attn_scale finite, got {self.floor_scale}, "
                              f"{self.attn_scale}")

    @property
    def head_dim(self) -> int:
        return self.head_dim_override if self.head_dim_override is not None else self.dim // self.n_heads

    @property
    def n_rep(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.n_heads // self.n_kv_heads

    @property
    def is_llama4(self) -> bool:
        """True when any Llama 4 piece is on: then only the Llama 4 formats (herd/formats/llama4.py) can hold it."""
        return (self.moe is not None or bool(self.nope_layer_interval) or bool(self.attention_chunk_size)
                or self.use_qk_norm or self.attn_temperature_tuning)

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and (layer + 1) % self.moe.interleave_step == 0

    def uses_rope(self, layer: int) -> bool:
        return not (self.nope_layer_interval and (layer + 1) % self.nope_layer_interval == 0)

    def is_chunked_layer(self, layer: int) -> bool:
        """Llama 4: RoPE layers attend within chunks of attention_chunk_size; NoPE layers see the whole context."""
        return bool(self.attention_chunk_size) and self.uses_rope(layer)

    def layer_ffn_dim(self, layer: int) -> int:
        """Hidden size of layer `layer`'s feed-forward: the experts' for an MoE layer, else ffn_dim."""
        return self.moe.expert_ffn_dim if self.is_moe_layer(layer) else self.ffn_dim

    def param_counts(self) -> tuple[int, int]:
        """(total, active-per-token) parameter counts computed from the config."""
        d, hd = self.dim, self.head_dim
        attn = d * hd * (self.n_heads * 2 + self.n_kv_heads * 2)
        total = active = 0
        for i in range(self.n_layers):
            norms = 2 * d
            if self.is_moe_layer(i):
                m = self.moe
                expert = 3 * d * m.expert_ffn_dim
                shared = expert if m.shared_expert else 0
                router = d * m.n_experts
                total += attn + norms + m.n_experts * expert + shared + router
                active += attn + norms + m.top_k * expert + shared + router
            else:
                ffn = 3 * d * self.ffn_dim
                total += attn + norms + ffn
                active += attn + norms + ffn
        emb = self.vocab_size * d
        out = 0 if self.tie_embeddings else self.vocab_size * d
        total += emb + out + d
        active += emb + out + d
        return total, active

    @property
    def n_params(self) -> int:
        return self.param_counts()[0]

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown herd config keys: {unknown}")
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        if d.get("moe") is not None:
            d["moe"] = MoEConfig(**d["moe"])
        return cls(**d)


def _llama2(dim, n_layers, n_heads, n_kv_heads=None, mult=None, multiple_of=256) -> ModelConfig:
    return ModelConfig(
        dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads or n_heads, vocab_size=32000,
        ffn_dim=ffn_hidden_dim(dim, multiple_of, mult), norm_eps=1e-5, rope_theta=10000.0, max_seq_len=4096,
        family="llama2",
    )


def _llama3(dim, n_layers, n_heads, mult, multiple_of, family, scaling=None, ctx=8192, tied=False,
            n_kv_heads=8) -> ModelConfig:
    return ModelConfig(
        dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=128256,
        ffn_dim=ffn_hidden_dim(dim, multiple_of, mult), norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=scaling, max_seq_len=ctx, tie_embeddings=tied, family=family,
    )


def _llama4(n_experts: int, interleave: int, qk_norm: bool, scaling: RopeScaling | None, ctx: int) -> ModelConfig:
    """Llama 4 text model (SPEC.md §5): 48 layers, a NoPE layer every 4th, chunked local attention elsewhere."""
    return ModelConfig(
        dim=5120, n_layers=48, n_heads=40, n_kv_heads=8, vocab_size=202048, ffn_dim=16384, norm_eps=1e-5,
        rope_theta=500000.0, rope_scaling=scaling, max_seq_len=ctx, family="llama4",
        moe=MoEConfig(n_experts=n_experts, top_k=1, expert_ffn_dim=8192, interleave_step=interleave),
        nope_layer_interval=4, attention_chunk_size=8192, use_qk_norm=qk_norm, attn_temperature_tuning=True,
        attn_scale=0.1, floor_scale=8192.0,
    )


_S8 = RopeScaling(factor=8.0)
_S32 = RopeScaling(factor=32.0)  # 3.2 1B/3B: HF configs and a Meta maintainer (SPEC.md §1, llama-models#166)

PRESETS: dict[str, ModelConfig] = {
    "llama-2-7b": _llama2(4096, 32, 32),
    "llama-2-13b": _llama2(5120, 40, 40),
    "llama-2-70b": _llama2(8192, 80, 64, n_kv_heads=8, mult=1.3, multiple_of=4096),
    "llama-3-8b": _llama3(4096, 32, 32, 1.3, 1024, "llama3"),
    "llama-3-70b": _llama3(8192, 80, 64, 1.3, 4096, "llama3"),
    "llama-3.1-8b": _llama3(4096, 32, 32, 1.3, 1024, "llama3.1", _S8, 131072),
    "llama-3.1-70b": _llama3(8192, 80, 64, 1.3, 4096, "llama3.1", _S8, 131072),
    "llama-3.1-405b": _llama3(16384, 126, 128, 1.2, 4096, "llama3.1", _S8, 131072),
    "llama-3.2-1b": _llama3(2048, 16, 32, 1.5, 256, "llama3.2", _S32, 131072, tied=True),
    "llama-3.2-3b": _llama3(3072, 28, 24, 1.0, 256, "llama3.2", _S32, 131072, tied=True),
    "llama-3.3-70b": _llama3(8192, 80, 64, 1.3, 4096, "llama3.3", _S8, 131072),
    # Llama 4: contexts of the instruct models (HF converter); Scout's scaling: Meta's args default (SPEC.md §5, §7.6)
    "llama-4-scout-17b-16e": _llama4(16, 1, True, RopeScaling(factor=16.0, low_freq_factor=1.0,
                                                               high_freq_factor=1.0), 10485760),
    "llama-4-maverick-17b-128e": _llama4(128, 2, False, None, 1048576),
}

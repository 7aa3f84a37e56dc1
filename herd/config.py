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
    """Llama 4 mixture of experts (SPEC.md §5)."""

    n_experts: int
    top_k: int = 1
    expert_ffn_dim: int = 8192  # hidden size of each routed expert and of the shared expert
    interleave_step: int = 1  # layer i is MoE iff (i + 1) % interleave_step == 0
    shared_expert: bool = True


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
    # Llama 4 pieces (None / 0 = off): SPEC.md §5.
    moe: MoEConfig | None = None
    nope_layer_interval: int = 0  # layer i has no RoPE iff interval and (i + 1) % interval == 0
    attention_chunk_size: int = 0  # RoPE layers attend within chunks of this many positions
    use_qk_norm: bool = False
    attn_temperature_tuning: bool = False
    attn_scale: float = 0.1
    floor_scale: float = 8192.0
    dense_ffn_dim: int = 0  # FFN size of the non-MoE layers of an interleaved Llama 4 model (0 = ffn_dim)

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

    @property
    def head_dim(self) -> int:
        return self.head_dim_override if self.head_dim_override is not None else self.dim // self.n_heads

    @property
    def n_rep(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.n_heads // self.n_kv_heads

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and (layer + 1) % self.moe.interleave_step == 0

    def uses_rope(self, layer: int) -> bool:
        return not (self.nope_layer_interval and (layer + 1) % self.nope_layer_interval == 0)

    def layer_ffn_dim(self, layer: int) -> int:
        if self.moe is not None and not self.is_moe_layer(layer) and self.dense_ffn_dim:
            return self.dense_ffn_dim
        return self.ffn_dim

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
                ffn = 3 * d * self.layer_ffn_dim(i)
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
}

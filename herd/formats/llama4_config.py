"""Llama 4 text configs: HF config.json (Llama4TextConfig / Llama4Config), Meta's llama4 params.json and GGUF
`llama4` metadata, each to and from a herd ModelConfig (SPEC.md §4, §5).

The tensors of each format are moved by llama4.py, which also holds the readers and writers. Floor 6 (formats);
imports herd.config, herd.errors and the containers' public helpers (hf.py, meta.py, gguf.py); no container imports
this module.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from herd.config import ModelConfig, MoEConfig, RopeScaling, ffn_hidden_dim
from herd.errors import ConfigError, FormatError
from herd.formats.gguf import GGUFFile, llama3_rope_factors, llama_metadata, metadata_value, rope_scaling_from_factors
from herd.formats.hf import IGNORED_KEYS, rope_scaling
from herd.formats.meta import stated_rope_scaling

def _need_shared_expert(config: ModelConfig, fmt: str) -> None:
    if config.moe is not None and not config.moe.shared_expert:
        raise ConfigError(f"{fmt} Llama 4 checkpoints always have a shared expert; this config has none")


def _int(cfg: dict, key: str, where: str, default: Any = ..., minimum: int = 1) -> int:
    v = cfg.get(key, default)
    if v is ...:
        raise ConfigError(f"{where}: required key {key!r} is missing")
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise ConfigError(f"{where}: {key} must be an integer >= {minimum}, got {v!r}")
    return v


def _num(cfg: dict, key: str, where: str, default: Any = ...) -> float:
    v = cfg.get(key, default)
    if v is ...:
        raise ConfigError(f"{where}: required key {key!r} is missing")
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise ConfigError(f"{where}: {key} must be a number, got {v!r}")
    return float(v)


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face: config.json (Llama4TextConfig, or Llama4Config with a text_config)

HF_MODEL_TYPES = ("llama4_text", "llama4")
# Llama4TextConfig class defaults (transformers), used for keys a config.json leaves out; they are not the released
# models' values (SPEC.md §7.11), which every saved config states anyway.
_HF_DEFAULTS = {"head_dim": 128, "intermediate_size_mlp": 16384, "num_experts_per_tok": 1, "num_local_experts": 16,
                "interleave_moe_layer_step": 1, "use_qk_norm": True, "no_rope_layer_interval": 4,
                "attention_chunk_size": 8192, "attn_temperature_tuning": True, "floor_scale": 8192,
                "attn_scale": 0.1, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072, "rope_theta": 500000.0}
_HF_TEXT_KEYS = {
    "vocab_size", "hidden_size", "intermediate_size", "intermediate_size_mlp", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
    "tie_word_embeddings", "num_experts_per_tok", "num_local_experts", "moe_layers", "interleave_moe_layer_step",
    "use_qk_norm", "rope_parameters", "rope_theta", "rope_scaling", "no_rope_layers", "no_rope_layer_interval",
    "attention_chunk_size", "layer_types", "attn_temperature_tuning", "floor_scale", "attn_scale", "attention_bias",
}
# keys that do not change the text model's forward pass (training knobs, bookkeeping, generation defaults)
_HF_IGNORED = {"output_router_logits", "router_aux_loss_coef", "router_jitter_noise", "for_llm_compressor",
               "cache_implementation", "attn_implementation"}
# keys of the multimodal wrapper (Llama4ForConditionalGeneration); its vision tower is not read here
_HF_WRAPPER_KEYS = {"text_config", "vision_config", "boi_token_index", "eoi_token_index", "image_token_index",
                    "tie_word_embeddings"}


def _hf_ignored() -> set[str]:
    return IGNORED_KEYS | _HF_IGNORED


def _every_kth(layers: list, k: int, n: int) -> bool:
    return list(layers) == list(range(k - 1, n, k))


def config_from_hf_llama4(cfg: dict, where: str = "config.json") -> ModelConfig:
    """HF Llama4TextConfig dict (or a Llama4Config holding one in text_config) -> ModelConfig."""
    if cfg.get("model_type") == "llama4":
        unknown = sorted(set(cfg) - _HF_WRAPPER_KEYS - _hf_ignored())
        if unknown:
            raise ConfigError(f"{where}: unknown config keys {unknown}")
        if not isinstance(cfg.get("text_config"), dict):
            raise ConfigError(f"{where}: a Llama4Config needs a text_config object")
        cfg, where = cfg["text_config"], where + " text_config"
    elif cfg.get("model_type", "llama4_text") != "llama4_text":
        raise ConfigError(f"{where}: model_type {cfg.get('model_type')!r} is not Llama 4 ({HF_MODEL_TYPES})")
    unknown = sorted(set(cfg) - _HF_TEXT_KEYS - _hf_ignored())
    if unknown:
        raise ConfigError(f"{where}: unknown config keys {unknown}")
    if cfg.get("attention_bias"):
        raise ConfigError(f"{where}: attention_bias=true is not a Llama 4 architecture")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{where}: hidden_act {cfg['hidden_act']!r} is not supported (Llama 4 uses 'silu')")
    c = {**_HF_DEFAULTS, **{k: v for k, v in cfg.items() if v is not None or k == "attention_chunk_size"}}
    dim, L = _int(c, "hidden_size", where), _int(c, "num_hidden_layers", where)
    n_heads = _int(c, "num_attention_heads", where)
    head_dim = cfg.get("head_dim", 128)
    head_dim = dim // n_heads if head_dim is None else _int(c, "head_dim", where)

    # MoE layers: an explicit list or every interleave_moe_layer_step-th layer
    n_experts = _int(c, "num_local_experts", where, minimum=0)
    step = c.get("interleave_moe_layer_step") or 0
    moe_layers = c.get("moe_layers")
    if moe_layers is None:
        moe_layers = list(range(step - 1, L, step)) if (step and n_experts) else []
    moe = None
    if moe_layers:
        if not n_experts:
            raise ConfigError(f"{where}: moe_layers {moe_layers} but num_local_experts is 0")
        step = moe_layers[0] + 1
        if not _every_kth(moe_layers, step, L):
            raise ConfigError(f"{where}: moe_layers {moe_layers} is not every k-th layer; herd supports the "
                              f"interleave_moe_layer_step patterns (layers k-1, 2k-1, ...)")
        moe = MoEConfig(n_experts=n_experts, top_k=_int(c, "num_experts_per_tok", where),
                        expert_ffn_dim=_int(c, "intermediate_size", where), interleave_step=step)

    # NoPE layers: no_rope_layers[i] == 0, every no_rope_layer_interval-th layer
    interval = _int(c, "no_rope_layer_interval", where)
    no_rope = c.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(L)]
    if len(no_rope) < L or any(v not in (0, 1) for v in no_rope):
        raise ConfigError(f"{where}: no_rope_layers must list 0 or 1 for each of the {L} layers, got {no_rope}")
    nope = [i for i in range(L) if no_rope[i] == 0]
    nope_interval = nope[0] + 1 if nope else 0
    if nope and not _every_kth(nope, nope_interval, L):
        raise ConfigError(f"{where}: NoPE layers {nope} (no_rope_layers) are not every k-th layer")

    chunk = c.get("attention_chunk_size")
    chunk = 0 if chunk is None else _int(c, "attention_chunk_size", where)
    if c.get("layer_types") is not None:
        want = ["chunked_attention" if (no_rope[i] and chunk) else "full_attention" for i in range(L)]
        if list(c["layer_types"])[:L] != want:
            raise ConfigError(f"{where}: layer_types {c['layer_types']} disagree with no_rope_layers and "
                              f"attention_chunk_size (expected {want})")

    rope = c.get("rope_parameters") or {}
    scaling = rope_scaling(c.get("rope_scaling") or rope, where)
    theta = c.get("rope_theta") if "rope_theta" in cfg else rope.get("rope_theta", _HF_DEFAULTS["rope_theta"])
    try:
        return ModelConfig(
            dim=dim, n_layers=L, n_heads=n_heads, n_kv_heads=_int(c, "num_key_value_heads", where, n_heads),
            vocab_size=_int(c, "vocab_size", where), ffn_dim=_int(c, "intermediate_size_mlp", where),
            norm_eps=_num(c, "rms_norm_eps", where), rope_theta=float(theta), rope_scaling=scaling,
            max_seq_len=_int(c, "max_position_embeddings", where),
            tie_embeddings=bool(c.get("tie_word_embeddings", False)),
            head_dim_override=head_dim if head_dim * n_heads != dim else None, family="llama4", moe=moe,
            nope_layer_interval=nope_interval, attention_chunk_size=chunk, use_qk_norm=bool(c["use_qk_norm"]),
            attn_temperature_tuning=bool(c["attn_temperature_tuning"]), attn_scale=_num(c, "attn_scale", where),
            floor_scale=_num(c, "floor_scale", where),
        )
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: a value has the wrong type ({e})") from None


def config_to_hf_llama4(config: ModelConfig, dtype: torch.dtype, bos_id=None, eos_id=None) -> dict:
    """config.json of a Llama4ForCausalLM ("llama4_text"); per-layer lists stated explicitly."""
    _need_shared_expert(config, "HF")
    L, m = config.n_layers, config.moe
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        s = config.rope_scaling
        rope.update(rope_type="llama3", factor=s.factor, low_freq_factor=s.low_freq_factor,
                    high_freq_factor=s.high_freq_factor,
                    original_max_position_embeddings=s.original_max_position_embeddings)
    interval = config.nope_layer_interval or L + 1  # HF divides by it: "never" is an interval past the last layer
    no_rope = [int(config.uses_rope(i)) for i in range(L)]
    cfg = {
        "architectures": ["Llama4ForCausalLM"], "model_type": "llama4_text", "vocab_size": config.vocab_size,
        "hidden_size": config.dim, "intermediate_size": m.expert_ffn_dim if m else config.ffn_dim,
        "intermediate_size_mlp": config.ffn_dim, "num_hidden_layers": L, "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads, "head_dim": config.head_dim, "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len, "rms_norm_eps": config.norm_eps,
        "tie_word_embeddings": config.tie_embeddings, "attention_bias": False,
        "num_local_experts": m.n_experts if m else 0, "num_experts_per_tok": m.top_k if m else 1,
        "interleave_moe_layer_step": m.interleave_step if m else 1,
        "moe_layers": [i for i in range(L) if config.is_moe_layer(i)],
        "use_qk_norm": config.use_qk_norm, "no_rope_layer_interval": interval, "no_rope_layers": no_rope,
        "attention_chunk_size": config.attention_chunk_size or None,
        "layer_types": ["chunked_attention" if config.is_chunked_layer(i) else "full_attention" for i in range(L)],
        "attn_temperature_tuning": config.attn_temperature_tuning,
        "floor_scale": int(config.floor_scale) if float(config.floor_scale).is_integer() else config.floor_scale,
        "attn_scale": config.attn_scale, "rope_parameters": rope, "dtype": str(dtype).removeprefix("torch."),
    }
    if bos_id is not None:
        cfg["bos_token_id"] = bos_id
    if eos_id is not None:
        cfg["eos_token_id"] = eos_id
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# Meta: params.json (llama_models.llama4.args.ModelArgs)

_META_KEYS = {"dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "vocab_size", "multiple_of",
              "ffn_dim_multiplier", "ffn_exp", "norm_eps", "attention_chunk_size", "rope_theta", "use_scaled_rope",
              "rope_scaling_factor", "rope_high_freq_factor", "nope_layer_interval", "use_qk_norm",
              "attn_temperature_tuning", "floor_scale", "attn_scale", "vision_args", "moe_args",
              "quantization_args", "lora_args", "max_batch_size", "max_seq_len",
              "rope_scaling"}  # rope_scaling: herd's extension for a scaling Meta's two keys cannot say
_MOE_KEYS = {"num_experts", "capacity_factor", "auto_scale_F", "top_k", "interleave_moe_layer_step"}
_LLAMA4_ONLY = {"moe_args", "nope_layer_interval", "attention_chunk_size", "use_qk_norm", "ffn_exp",
                "attn_temperature_tuning", "rope_scaling_factor", "rope_high_freq_factor", "vision_args"}


def is_llama4_params(params: dict) -> bool:
    """Whether a Meta params.json describes a Llama 4 model (it has keys only llama4's ModelArgs knows)."""
    p = params.get("model", params) if isinstance(params.get("model"), dict) else params
    return bool(_LLAMA4_ONLY & set(p))


def meta_expert_hidden(dim: int, multiple_of: int, multiplier: float, ffn_exp: float, auto_scale: bool = True,
                       capacity_factor: float = 1.0) -> int:
    """Meta's MoE hidden size rule (llama4/moe.py): int(ffn_exp*D) -> 2/3 -> x multiplier -> /(capacity+1) ->
    round up to multiple_of."""
    h = int(2 * int(ffn_exp * dim) / 3)
    h = int(multiplier * h)
    if auto_scale:
        h = int(h / (capacity_factor + 1))
    return h + (-h % multiple_of)


def config_from_params_llama4(params: dict, where: str) -> ModelConfig:
    """llama4 params.json -> ModelConfig."""
    if isinstance(params.get("model"), dict):
        params = params["model"]
    unknown = sorted(set(params) - _META_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown params.json keys {unknown}")
    for key in ("quantization_args", "lora_args"):
        value = params.get(key)
        if value and (key == "lora_args" or value.get("scheme")):
            raise ConfigError(f"{where}: {key} {value} is set; herd reads only plain bf16/fp32 Llama 4 weights")
    dim, L, n_heads = (_int(params, k, where) for k in ("dim", "n_layers", "n_heads"))
    n_kv = params.get("n_kv_heads") or n_heads
    if params.get("head_dim") not in (None, dim // n_heads):
        raise ConfigError(f"{where}: head_dim {params['head_dim']} is not dim / n_heads, which Meta's llama4 code "
                          f"always uses")
    multiple_of = _int(params, "multiple_of", where, 256)
    mult = params.get("ffn_dim_multiplier")
    ffn = ffn_hidden_dim(dim, multiple_of, mult)
    moe = None
    if params.get("moe_args"):
        a = params["moe_args"]
        bad = sorted(set(a) - _MOE_KEYS)
        if bad:
            raise ConfigError(f"{where}: unknown moe_args keys {bad}")
        if mult is None or params.get("ffn_exp") is None:
            raise ConfigError(f"{where}: an MoE model needs ffn_dim_multiplier and ffn_exp")
        expert = meta_expert_hidden(dim, multiple_of, _num(params, "ffn_dim_multiplier", where),
                                    _num(params, "ffn_exp", where), bool(a.get("auto_scale_F", True)),
                                    _num(a, "capacity_factor", where + " moe_args", 1.0))
        moe = MoEConfig(n_experts=_int(a, "num_experts", where + " moe_args"),
                        top_k=_int(a, "top_k", where + " moe_args", 1), expert_ffn_dim=expert,
                        interleave_step=_int(a, "interleave_moe_layer_step", where + " moe_args", 1))
    scaling = stated_rope_scaling(params, where)
    if scaling is None and params.get("use_scaled_rope"):
        # Meta's args: only Scout uses scaled rope; factor 16 and high_freq_factor 1 unless stated (SPEC.md §5)
        scaling = RopeScaling(factor=float(params.get("rope_scaling_factor") or 16.0), low_freq_factor=1.0,
                              high_freq_factor=float(params.get("rope_high_freq_factor") or 1.0),
                              original_max_position_embeddings=8192)
    return ModelConfig(
        dim=dim, n_layers=L, n_heads=n_heads, n_kv_heads=n_kv, vocab_size=_int(params, "vocab_size", where),
        ffn_dim=ffn, norm_eps=_num(params, "norm_eps", where, 1e-5), rope_theta=_num(params, "rope_theta", where,
                                                                                      500000.0),
        rope_scaling=scaling, max_seq_len=params.get("max_seq_len") or 262144, family="llama4", moe=moe,
        nope_layer_interval=params.get("nope_layer_interval") or 0,
        attention_chunk_size=params.get("attention_chunk_size") or 0,
        use_qk_norm=bool(params.get("use_qk_norm", False)),
        attn_temperature_tuning=bool(params.get("attn_temperature_tuning", False)),
        attn_scale=_num(params, "attn_scale", where, 0.1), floor_scale=_num(params, "floor_scale", where, 8192.0),
    )


def _ffn_params(config: ModelConfig) -> dict:
    """multiple_of, ffn_dim_multiplier, ffn_exp (and moe capacity) that make Meta's rules give config's sizes."""
    m = config.moe
    for multiple_of in (2048, 1024, 512, 256, 128, 64, 32, 16, 8):
        for mult in (1.2, 1.3, 1.0, 1.5, 2.0):
            if ffn_hidden_dim(config.dim, multiple_of, mult) != config.ffn_dim:
                continue
            if m is None:
                return {"multiple_of": multiple_of, "ffn_dim_multiplier": mult}
            if meta_expert_hidden(config.dim, multiple_of, mult, 4.0) == m.expert_ffn_dim:
                return {"multiple_of": multiple_of, "ffn_dim_multiplier": mult, "ffn_exp": 4.0,
                        "moe": {"capacity_factor": 1.0, "auto_scale_F": True}}
    # any sizes: multiple_of 1 and a multiplier that lands half-way inside the wanted integer (robust to rounding);
    # the capacity factor then scales the dense size down to the expert size
    h = int(2 * 4 * config.dim / 3)
    mult = (config.ffn_dim + 0.5) / h
    out: dict[str, Any] = {"multiple_of": 1, "ffn_dim_multiplier": mult}
    if m is not None:
        out.update(ffn_exp=4.0, moe={"capacity_factor": config.ffn_dim / (m.expert_ffn_dim + 0.5) - 1.0,
                                     "auto_scale_F": True})
    return out


def params_from_config_llama4(config: ModelConfig) -> dict:
    """llama4 params.json for a config; FFN rule parameters are chosen so Meta's code rebuilds its sizes."""
    _need_shared_expert(config, "Meta")
    if config.head_dim != config.dim // config.n_heads:
        raise ConfigError(f"Meta's llama4 code needs head_dim = dim / n_heads; this config has {config.head_dim}")
    ffn = _ffn_params(config)
    params: dict[str, Any] = {
        "dim": config.dim, "n_layers": config.n_layers, "n_heads": config.n_heads, "n_kv_heads": config.n_kv_heads,
        "vocab_size": config.vocab_size, "multiple_of": ffn["multiple_of"],
        "ffn_dim_multiplier": ffn["ffn_dim_multiplier"], "norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta, "use_scaled_rope": config.rope_scaling is not None,
        "nope_layer_interval": config.nope_layer_interval or None,
        "attention_chunk_size": config.attention_chunk_size or None, "use_qk_norm": config.use_qk_norm,
        "attn_temperature_tuning": config.attn_temperature_tuning, "floor_scale": config.floor_scale,
        "attn_scale": config.attn_scale, "max_seq_len": config.max_seq_len,
    }
    if config.moe is not None:
        m = config.moe
        params["ffn_exp"] = ffn["ffn_exp"]
        params["moe_args"] = {"num_experts": m.n_experts, "top_k": m.top_k,
                              "interleave_moe_layer_step": m.interleave_step, **ffn["moe"]}
    s = config.rope_scaling
    if s is not None:
        params.update(rope_scaling_factor=s.factor, rope_high_freq_factor=s.high_freq_factor)
        if s.low_freq_factor != 1.0 or s.original_max_position_embeddings != 8192:  # Meta hard-codes these two
            params["rope_scaling"] = {"rope_type": s.rope_type, "factor": s.factor, "low_freq_factor":
                                      s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
                                      "original_max_position_embeddings": s.original_max_position_embeddings}
    got = config_from_params_llama4(params, "params")
    if (got.ffn_dim, got.moe) != (config.ffn_dim, config.moe):
        raise ConfigError(f"cannot express ffn_dim {config.ffn_dim} / moe {config.moe} in Meta's params.json rules")
    return params


# ---------------------------------------------------------------------------------------------------------------
# GGUF, architecture "llama4" (llama.cpp's converter: Llama4Model in convert_hf_to_gguf.py)
#
# llama.cpp hard-codes what the standard keys do not say: chunk size 8192, a NoPE layer every 4th, QK-norm unless
# the model has 128 experts, temperature tuning with scale 0.1 and floor 8192; `llama4.attention.sliding_window` = 0
# turns chunking and NoPE off. herd reads those defaults, and writes its own values under the herd keys below so a
# herd file round-trips any config (llama.cpp ignores unknown keys; it computes what it hard-codes).

ARCH = "llama4"  # general.architecture
GGUF_HERD_KEYS = {  # herd extension key (after "llama4.") -> ModelConfig field
    "attention.chunk_size": "attention_chunk_size", "no_rope_layer_interval": "nope_layer_interval",
    "attention.use_qk_norm": "use_qk_norm", "attention.temperature_tuning": "attn_temperature_tuning",
    "attention.temperature_scale": "attn_scale", "attention.temperature_floor_scale": "floor_scale",
}


def config_from_gguf_llama4(g: GGUFFile) -> ModelConfig:
    """ModelConfig of a GGUFFile (herd.formats.gguf.read_gguf) of architecture llama4."""
    a = ARCH
    md = g.metadata
    dim = metadata_value(g, f"{a}.embedding_length", int)
    n_heads = metadata_value(g, f"{a}.attention.head_count", int)
    n_kv = metadata_value(g, f"{a}.attention.head_count_kv", int, n_heads)
    head_dim = metadata_value(g, f"{a}.attention.key_length", int, 0) or dim // n_heads
    if metadata_value(g, f"{a}.rope.dimension_count", int, head_dim) != head_dim:
        raise ConfigError(f"{g.path}: rope over part of the head is not supported")
    emb = g.tensors.get("token_embd.weight")
    if emb is None:
        raise FormatError(f"{g.path}: tensor token_embd.weight is missing")
    vocab = emb.shape[0]
    if metadata_value(g, f"{a}.vocab_size", int, vocab) != vocab:
        raise FormatError(f"{g.path}: {a}.vocab_size disagrees with token_embd.weight ({vocab} rows)")
    theta = metadata_value(g, f"{a}.rope.freq_base", float, 500000.0)
    scaling = None
    freqs = g.tensors.get("rope_freqs.weight")
    if freqs is not None:
        factors = freqs.dequantize()
        ctx0 = metadata_value(g, f"{a}.rope.scaling.original_context_length", int, 0) or None
        scaling = rope_scaling_from_factors(factors, head_dim, theta, ctx0)
        if scaling is not None and f"{a}.rope.scaling.llama3.factor" in md:  # herd's keys name it exactly
            stated = RopeScaling(factor=metadata_value(g, f"{a}.rope.scaling.llama3.factor", float),
                                 low_freq_factor=metadata_value(g, f"{a}.rope.scaling.llama3.low_freq_factor", float),
                                 high_freq_factor=metadata_value(g, f"{a}.rope.scaling.llama3.high_freq_factor", float),
                                 original_max_position_embeddings=ctx0 or 8192)
            if not np.allclose(llama3_rope_factors(stated, head_dim, theta), factors, rtol=1e-5, atol=0):
                raise FormatError(f"{g.path}: rope scaling keys {stated} disagree with tensor rope_freqs.weight")
            scaling = stated
    n_experts = metadata_value(g, f"{a}.expert_count", int, 0)
    moe = None
    if n_experts:
        moe = MoEConfig(n_experts=n_experts, top_k=metadata_value(g, f"{a}.expert_used_count", int, 1),
                        expert_ffn_dim=metadata_value(g, f"{a}.expert_feed_forward_length", int),
                        interleave_step=metadata_value(g, f"{a}.interleave_moe_layer_step", int, 1))
    swa_off = md.get(f"{a}.attention.sliding_window", None) == 0
    fields: dict[str, Any] = {"attention_chunk_size": 0 if swa_off else 8192,
                              "nope_layer_interval": 0 if swa_off else 4, "use_qk_norm": n_experts != 128,
                              "attn_temperature_tuning": not swa_off, "attn_scale": 0.1, "floor_scale": 8192.0}
    for key, field_name in GGUF_HERD_KEYS.items():
        if f"{a}.{key}" in md:
            v = md[f"{a}.{key}"]
            fields[field_name] = bool(v) if isinstance(fields[field_name], bool) else type(fields[field_name])(v)
    return ModelConfig(
        dim=dim, n_layers=metadata_value(g, f"{a}.block_count", int), n_heads=n_heads, n_kv_heads=n_kv,
        vocab_size=vocab, ffn_dim=metadata_value(g, f"{a}.feed_forward_length", int),
        norm_eps=metadata_value(g, f"{a}.attention.layer_norm_rms_epsilon", float), rope_theta=theta,
        rope_scaling=scaling,
        max_seq_len=metadata_value(g, f"{a}.context_length", int), tie_embeddings="output.weight" not in g.tensors,
        head_dim_override=head_dim if head_dim * n_heads != dim else None, family="llama4", moe=moe, **fields,
    )


def gguf_metadata_llama4(config: ModelConfig) -> list[tuple[str, Any, str]]:
    """(key, value, gguf value type name) of the architecture keys llama.cpp's llama4 loader reads, plus herd's."""
    _need_shared_expert(config, "GGUF")
    a = ARCH
    u32: list[tuple[str, int]] = []
    m = config.moe
    if m is not None:
        u32 += [("expert_count", m.n_experts), ("expert_used_count", m.top_k),
                ("expert_feed_forward_length", m.expert_ffn_dim), ("interleave_moe_layer_step", m.interleave_step)]
    else:  # llama.cpp reads these keys unconditionally
        u32 += [("expert_feed_forward_length", config.ffn_dim), ("interleave_moe_layer_step", 1)]
    s = config.rope_scaling
    if s is not None:  # llama.cpp reads the tensor rope_freqs; these keys say which scaling made it
        u32.append(("rope.scaling.original_context_length", s.original_max_position_embeddings))
    if not config.attention_chunk_size and not config.nope_layer_interval:
        u32.append(("attention.sliding_window", 0))  # llama.cpp: no chunking, RoPE on every layer
    u32 += [("attention.chunk_size", config.attention_chunk_size),
            ("no_rope_layer_interval", config.nope_layer_interval)]
    out = llama_metadata(config, a, u32)  # the keys every llama-like architecture has, then these
    out += [(f"{a}.attention.use_qk_norm", config.use_qk_norm, "BOOL"),
            # not the standard rope.scaling.factor / type keys: llama.cpp would add linear scaling / reject "llama3"
            *([] if s is None else [(f"{a}.rope.scaling.llama3.factor", s.factor, "FLOAT32"),
                                    (f"{a}.rope.scaling.llama3.low_freq_factor", s.low_freq_factor, "FLOAT32"),
                                    (f"{a}.rope.scaling.llama3.high_freq_factor", s.high_freq_factor, "FLOAT32")]),
            (f"{a}.attention.temperature_tuning", config.attn_temperature_tuning, "BOOL"),
            (f"{a}.attention.temperature_scale", config.attn_scale, "FLOAT32"),
            (f"{a}.attention.temperature_floor_scale", config.floor_scale, "FLOAT32")]
    return out

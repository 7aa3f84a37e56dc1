"""Llama 4 text checkpoints: HF `Llama4ForCausalLM` safetensors, Meta's llama4 `consolidated.NN.pth`, GGUF `llama4`.

Facts in SPEC.md §5 (architecture, Meta and HF names) and §4 (GGUF). The dispatchers in hf.py, meta.py and gguf.py
send Llama 4 files here. Inside herd a Llama 4 model uses the names of Meta's reference model after its load hooks
(herd/models/moe.py lists the MoE ones); q/k rows are in Meta's interleaved-pair order in all three formats, so
nothing here permutes them (HF's Llama 4 applies RoPE to adjacent pairs, unlike HF's Llama).

Expert layouts, herd (= Meta's model) <-> each format:
  herd experts.w1 / w3  (E, D, F)   HF experts.gate_up_proj (E, D, 2F) = cat(w1, w3, -1)
                                    Meta file experts.moe_w_in_eD_F / moe_w_swiglu_eD_F (E*D, F)
                                    GGUF ffn_gate_exps / ffn_up_exps (E, F, D) = w.transpose(1, 2)
  herd experts.w2       (E, F, D)   HF experts.down_proj (E, F, D); Meta moe_w_out_eF_D (E*F, D);
                                    GGUF ffn_down_exps (E, D, F)
  herd router_DE        (D, E)      HF router.weight (E, D); Meta router_DE (D, E); GGUF ffn_gate_inp (E, D)
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from herd.config import ModelConfig, MoEConfig, RopeScaling, ffn_hidden_dim
from herd.errors import ConfigError, FormatError
from herd.formats import keymaps

# ---------------------------------------------------------------------------------------------------------------
# Shapes every Llama 4 checkpoint must fill, by herd name

def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """herd name -> shape of every weight of a Llama 4 text model (output.weight only when untied)."""
    D, hd, V = config.dim, config.head_dim, config.vocab_size
    shapes = {"tok_embeddings.weight": (V, D), "norm.weight": (D,)}
    if not config.tie_embeddings:
        shapes["output.weight"] = (V, D)
    for i in range(config.n_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "attention.wq.weight": (config.n_heads * hd, D), p + "attention.wk.weight": (config.n_kv_heads * hd, D),
            p + "attention.wv.weight": (config.n_kv_heads * hd, D), p + "attention.wo.weight": (D, config.n_heads * hd),
            p + "attention_norm.weight": (D,), p + "ffn_norm.weight": (D,),
        })
        if config.is_moe_layer(i):
            m = config.moe
            E, F_ = m.n_experts, m.expert_ffn_dim
            shapes.update({p + "feed_forward.router_DE": (D, E), p + "feed_forward.experts.w1": (E, D, F_),
                           p + "feed_forward.experts.w3": (E, D, F_), p + "feed_forward.experts.w2": (E, F_, D)})
            if m.shared_expert:
                shapes.update({p + "feed_forward.shared_expert.w1.weight": (F_, D),
                               p + "feed_forward.shared_expert.w3.weight": (F_, D),
                               p + "feed_forward.shared_expert.w2.weight": (D, F_)})
        else:
            F_ = config.ffn_dim
            shapes.update({p + "feed_forward.w1.weight": (F_, D), p + "feed_forward.w3.weight": (F_, D),
                           p + "feed_forward.w2.weight": (D, F_)})
    return shapes


def check_state_dict(sd: dict[str, Any], config: ModelConfig, where: str) -> None:
    """Every expected tensor present with its shape, nothing else; errors name the tensor."""
    shapes = expected_shapes(config)
    missing = sorted(set(shapes) - set(sd))
    extra = sorted(set(sd) - set(shapes) - {"rope.freqs"})
    if missing or extra:
        raise FormatError(f"{where}: tensors do not match the config: missing {missing[:6]}"
                          f"{'...' if len(missing) > 6 else ''}, unexpected {extra[:6]}"
                          f"{'...' if len(extra) > 6 else ''}")
    for name, shape in shapes.items():
        if tuple(sd[name].shape) != shape:
            raise FormatError(f"{where}: tensor {name} has shape {tuple(sd[name].shape)}, the config expects {shape}")


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
# Hugging Face: config.json (Llama4TextConfig, or Llama4Config with a text_config) + safetensors

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
_HF_SKIPPED_PREFIXES = ("vision_model.", "multi_modal_projector.")


def _hf_ignored() -> set[str]:
    from herd.formats.hf import IGNORED_KEYS

    return IGNORED_KEYS | _HF_IGNORED


def _every_kth(layers: list, k: int, n: int) -> bool:
    return list(layers) == list(range(k - 1, n, k))


def config_from_hf_llama4(cfg: dict, where: str = "config.json") -> ModelConfig:
    """HF Llama4TextConfig dict (or a Llama4Config holding one in text_config) -> ModelConfig."""
    from herd.formats.hf import _rope_scaling

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
    scaling = _rope_scaling(c.get("rope_scaling") or rope, where)
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


# herd name pattern -> HF name pattern for the tensors that are the same matrix under another name
HF_NAMES: dict[str, str] = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "layers.{i}.attention.wq.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "layers.{i}.attention.wk.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "layers.{i}.attention.wv.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "layers.{i}.attention.wo.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.attention_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "layers.{i}.feed_forward.w1.weight": "model.layers.{i}.feed_forward.gate_proj.weight",
    "layers.{i}.feed_forward.w3.weight": "model.layers.{i}.feed_forward.up_proj.weight",
    "layers.{i}.feed_forward.w2.weight": "model.layers.{i}.feed_forward.down_proj.weight",
    "layers.{i}.feed_forward.shared_expert.w1.weight": "model.layers.{i}.feed_forward.shared_expert.gate_proj.weight",
    "layers.{i}.feed_forward.shared_expert.w3.weight": "model.layers.{i}.feed_forward.shared_expert.up_proj.weight",
    "layers.{i}.feed_forward.shared_expert.w2.weight": "model.layers.{i}.feed_forward.shared_expert.down_proj.weight",
    "layers.{i}.feed_forward.experts.w2": "model.layers.{i}.feed_forward.experts.down_proj",
    # these two change layout on the way (see the module docstring)
    "layers.{i}.feed_forward.router_DE": "model.layers.{i}.feed_forward.router.weight",
    "layers.{i}.feed_forward.experts.w1+w3": "model.layers.{i}.feed_forward.experts.gate_up_proj",
}


_TO_HF, _FROM_HF = keymaps.compile_names(HF_NAMES), keymaps.compile_names({v: k for k, v in HF_NAMES.items()})


def hf_to_herd(tensors: dict[str, torch.Tensor], config: ModelConfig, where: str) -> dict[str, torch.Tensor]:
    """HF Llama 4 tensors (text part; a multimodal file's language_model.* prefix is dropped) -> herd names."""
    from herd.formats.keymaps import HF_IGNORED

    sd: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.startswith(_HF_SKIPPED_PREFIXES) or HF_IGNORED.fullmatch(name):
            continue
        name = name.removeprefix("language_model.")
        herd = keymaps.rename(name, _FROM_HF)
        if herd is None:
            raise FormatError(f"{where}: unexpected tensor {name!r} for a Llama 4 text model")
        if herd.endswith("router_DE"):
            t = t.t().contiguous()
        elif herd.endswith("experts.w1+w3"):  # (E, D, 2F), gate first
            if t.dim() != 3 or t.shape[-1] % 2:
                raise FormatError(f"{where}: tensor {name} has shape {tuple(t.shape)}, expected (E, D, 2F)")
            gate, up = t.chunk(2, dim=-1)
            prefix = herd.removesuffix("w1+w3")
            sd[prefix + "w1"], sd[prefix + "w3"] = gate.contiguous(), up.contiguous()
            continue
        sd[herd] = t
    if config.tie_embeddings:
        sd.pop("output.weight", None)
    return sd


def herd_to_hf(sd: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """herd state dict -> HF Llama4ForCausalLM tensors."""
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        if name == "output.weight" and config.tie_embeddings:
            continue
        if name.endswith("experts.w3"):
            continue  # written with w1
        if name.endswith("experts.w1"):
            fused = keymaps.rename(name.removesuffix("w1") + "w1+w3", _TO_HF)
            out[fused] = torch.cat((t, sd[name[:-1] + "3"]), dim=-1)
            continue
        hf = keymaps.rename(name, _TO_HF)
        if hf is None:
            raise FormatError(f"tensor {name} has no Hugging Face Llama 4 name")
        out[hf] = t.t() if name.endswith("router_DE") else t
    return {k: v.contiguous() for k, v in out.items()}


def load_hf_llama4(folder: str | Path, dtype: torch.dtype | None = None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read an HF Llama 4 folder (Llama4ForCausalLM, or the text part of Llama4ForConditionalGeneration)."""
    from herd.formats.hf import read_hf_tensors, read_json

    folder = Path(folder)
    config = config_from_hf_llama4(read_json(folder / "config.json"), str(folder / "config.json"))
    sd = hf_to_herd(read_hf_tensors(folder), config, str(folder))
    check_state_dict(sd, config, str(folder))
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    return config, sd


def save_hf_llama4(folder: str | Path, config: ModelConfig, state_dict: dict[str, torch.Tensor],
                   max_shard_bytes: int = 5 * 2**30, bos_id=None, eos_id=None) -> None:
    """Write config.json + model.safetensors (sharded with an index past max_shard_bytes) for Llama4ForCausalLM."""
    from herd.formats.hf import write_shards, write_text_atomic

    folder = Path(folder)
    check_state_dict({k: v for k, v in state_dict.items() if not (k == "output.weight" and config.tie_embeddings)},
                     config, "state dict")
    hf_sd = herd_to_hf(state_dict, config)
    folder.mkdir(parents=True, exist_ok=True)
    write_shards(folder, hf_sd, max_shard_bytes)
    dtype = next(iter(hf_sd.values())).dtype
    write_text_atomic(folder / "config.json", json.dumps(config_to_hf_llama4(config, dtype, bos_id, eos_id),
                                                          indent=2))


# ---------------------------------------------------------------------------------------------------------------
# Meta: params.json (llama_models.llama4.args.ModelArgs) + consolidated.NN.pth model-parallel shards

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
    scaling = None
    if isinstance(params.get("rope_scaling"), dict):
        try:
            scaling = RopeScaling(**params["rope_scaling"])
        except TypeError as e:
            raise ConfigError(f"{where}: bad rope_scaling ({e})") from None
    elif params.get("use_scaled_rope"):
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


# Meta file names that map one-to-one onto herd names (per layer, after "layers.{i}.")
_META_SAME = {"attention.wo.weight", "feed_forward.router_DE", "feed_forward.w1.weight", "feed_forward.w2.weight",
              "feed_forward.w3.weight", "attention_norm.weight", "ffn_norm.weight",
              "feed_forward.shared_expert.w1.weight", "feed_forward.shared_expert.w2.weight",
              "feed_forward.shared_expert.w3.weight"}  # the model's own names, as Meta's load hooks leave them
_META_RENAME = {
    "attention.wqkv.layer_norm_weight": "attention_norm.weight",
    "feed_forward.norm.weight": "ffn_norm.weight",
    "feed_forward.mlp.layer_norm_weight": "ffn_norm.weight",
    "feed_forward.mlp.layer_norm.weight": "ffn_norm.weight",
    "feed_forward.mlp.fc2_weight": "feed_forward.w2.weight",
    "feed_forward.w_in_shared_FD.weight": "feed_forward.shared_expert.w1.weight",
    "feed_forward.w_swiglu_FD.weight": "feed_forward.shared_expert.w3.weight",
    "feed_forward.w_out_shared_DF.weight": "feed_forward.shared_expert.w2.weight",
}
_META_EXPERTS = {"feed_forward.experts.moe_w_in_eD_F": "feed_forward.experts.w1",
                 "feed_forward.experts.moe_w_swiglu_eD_F": "feed_forward.experts.w3",
                 "feed_forward.experts.moe_w_out_eF_D": "feed_forward.experts.w2"}
_HERD_TO_META = {v: k for k, v in {**_META_RENAME, **_META_EXPERTS}.items()
                 if ".shared_expert." in v or ".experts." in v}
# tensors of the released files that carry nothing the text model needs
_META_IGNORED = re.compile(r"rope\.freqs|freq_cis|layers\.\d+\.(.*\._extra_state|feed_forward\.(global_gate_stats_3E|"
                           r"running_gate_stats_3E|expert_activation_DE))|vision_embeddings\..*|vision_projection\..*")
# model-parallel split axis of each Meta file tensor (None: replicated); see llama_models/checkpoint.py
_META_AXIS = {"attention.wq.weight": 0, "attention.wk.weight": 0, "attention.wv.weight": 0, "attention.wo.weight": 1,
              "feed_forward.w1.weight": 0, "feed_forward.w3.weight": 0,
              "feed_forward.w2.weight": 1, "feed_forward.mlp.fc2_weight": 1, "feed_forward.w_in_shared_FD.weight": 0,
              "feed_forward.w_swiglu_FD.weight": 0, "feed_forward.w_out_shared_DF.weight": 1}
_LAYER = re.compile(r"^layers\.(\d+)\.(.*)$")


def _merge_shards(name: str, parts: list[torch.Tensor], config: ModelConfig, where: str) -> torch.Tensor:
    """One Meta file tensor from its model-parallel pieces (returned as is for a single shard)."""
    n = len(parts)
    if n == 1:
        return parts[0]
    if name in ("tok_embeddings.weight", "output.weight"):
        return torch.cat(parts, 0)
    m = _LAYER.match(name)
    key = m.group(2) if m else name
    if key == "attention.wqkv.weight":  # each shard is [q_i; k_i; v_i]
        hd = config.head_dim
        sizes = [config.n_heads * hd // n, config.n_kv_heads * hd // n, config.n_kv_heads * hd // n]
        pieces = [p.split(sizes, 0) for p in parts]
        return torch.cat([torch.cat(x, 0) for x in zip(*pieces)], 0)
    if key == "feed_forward.mlp.fc1_weight":  # each shard is [w1_i; w3_i]
        return torch.cat([p.view(2, p.shape[0] // 2, -1) for p in parts], 1).flatten(0, 1)
    if key in _META_EXPERTS:  # (E*D, F/n) or (E*F/n, D): unflatten the experts, join along F
        E = config.moe.n_experts
        axis = 1 if key.endswith("eF_D") else 2
        return torch.cat([p.unflatten(0, (E, -1)) for p in parts], axis).flatten(0, 1)
    axis = _META_AXIS.get(key)
    return parts[0] if axis is None else torch.cat(parts, axis)


def _split_shards(name: str, t: torch.Tensor, n: int, config: ModelConfig) -> list[torch.Tensor]:
    """The inverse of _merge_shards."""
    if n == 1:
        return [t]
    m = _LAYER.match(name)
    key = m.group(2) if m else name
    if name in ("tok_embeddings.weight", "output.weight"):
        parts = t.chunk(n, 0)
    elif key == "attention.wqkv.weight":
        hd = config.head_dim
        q, k, v = t.split([config.n_heads * hd, config.n_kv_heads * hd, config.n_kv_heads * hd], 0)
        parts = [torch.cat(x, 0) for x in zip(q.chunk(n, 0), k.chunk(n, 0), v.chunk(n, 0))]
    elif key == "feed_forward.mlp.fc1_weight":
        w1, w3 = t.chunk(2, 0)
        parts = [torch.cat(x, 0) for x in zip(w1.chunk(n, 0), w3.chunk(n, 0))]
    elif key in _META_EXPERTS:
        E = config.moe.n_experts
        axis = 1 if key.endswith("eF_D") else 2
        parts = [p.flatten(0, 1) for p in t.unflatten(0, (E, -1)).chunk(n, axis)]
    elif _META_AXIS.get(key) is not None:
        parts = t.chunk(n, _META_AXIS[key])
    else:
        return [t] * n
    if len(parts) != n or len({tuple(p.shape) for p in parts}) != 1:
        raise ConfigError(f"tensor {name} of shape {tuple(t.shape)} does not split evenly into {n} shards")
    return [p.clone().contiguous() for p in parts]


def meta_to_herd(sd: dict[str, torch.Tensor], config: ModelConfig, where: str) -> dict[str, torch.Tensor]:
    """Meta llama4 file tensors (merged) -> herd names; both the fused released names and the model's own."""
    hd, D = config.head_dim, config.dim
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        if _META_IGNORED.fullmatch(name):
            continue
        if name in ("tok_embeddings.weight", "norm.weight", "output.weight"):
            out[name] = t
            continue
        m = _LAYER.match(name)
        if m is None:
            raise FormatError(f"{where}: unexpected tensor {name!r} for a Llama 4 text model")
        p, key = f"layers.{m.group(1)}.", m.group(2)
        if key == "attention.wqkv.weight":
            sizes = [config.n_heads * hd, config.n_kv_heads * hd, config.n_kv_heads * hd]
            if t.shape[0] != sum(sizes):
                raise FormatError(f"{where}: tensor {name} has {t.shape[0]} rows, expected {sum(sizes)} "
                                  f"(q {sizes[0]} + k {sizes[1]} + v {sizes[2]})")
            for k, part in zip("qkv", t.split(sizes, 0)):
                out[p + f"attention.w{k}.weight"] = part
        elif key in ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight") or key in _META_SAME:
            out[p + key] = t
        elif key in _META_RENAME:
            out[p + _META_RENAME[key]] = t
        elif key == "feed_forward.mlp.fc1_weight":
            out[p + "feed_forward.w1.weight"], out[p + "feed_forward.w3.weight"] = t.chunk(2, 0)
        elif key in _META_EXPERTS:
            if config.moe is None:
                raise FormatError(f"{where}: tensor {name} holds experts but params.json has no moe_args")
            E = config.moe.n_experts
            rows = D if key.endswith("eD_F") else config.moe.expert_ffn_dim
            if t.dim() == 2 and t.shape[0] != E * rows:
                raise FormatError(f"{where}: tensor {name} has {t.shape[0]} rows, expected {E} experts x {rows}")
            out[p + _META_EXPERTS[key]] = t.reshape(E, rows, -1)
        else:
            raise FormatError(f"{where}: unexpected tensor {name!r} for a Llama 4 text model")
    return out


def herd_to_meta(sd: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """herd state dict -> the released llama4 file layout (fused wqkv and fc1, moe_w_* experts, norms by block)."""
    out: dict[str, torch.Tensor] = {}
    if "output.weight" not in sd:  # tied: Meta files always carry output.weight
        out["output.weight"] = sd["tok_embeddings.weight"]
    for name, t in sd.items():
        m = _LAYER.match(name)
        if m is None:
            out[name] = t
            continue
        i, key = int(m.group(1)), m.group(2)
        p = f"layers.{i}."
        moe = config.is_moe_layer(i)
        if key == "attention.wq.weight":
            out[p + "attention.wqkv.weight"] = torch.cat(
                (t, sd[p + "attention.wk.weight"], sd[p + "attention.wv.weight"]), 0)
        elif key in ("attention.wk.weight", "attention.wv.weight", "feed_forward.w3.weight"):
            continue  # fused above / below
        elif key == "attention_norm.weight":
            out[p + "attention.wqkv.layer_norm_weight"] = t
        elif key == "ffn_norm.weight":
            out[p + ("feed_forward.norm.weight" if moe else "feed_forward.mlp.layer_norm_weight")] = t
        elif key == "feed_forward.w1.weight":
            out[p + "feed_forward.mlp.fc1_weight"] = torch.cat((t, sd[p + "feed_forward.w3.weight"]), 0)
        elif key == "feed_forward.w2.weight":
            out[p + "feed_forward.mlp.fc2_weight"] = t
        elif key.startswith("feed_forward.shared_expert."):
            out[p + _HERD_TO_META[key]] = t
        elif key.startswith("feed_forward.experts."):
            out[p + _HERD_TO_META[key]] = t.flatten(0, 1)
        else:  # attention.wo, router_DE
            out[name] = t
    return out


def load_meta_llama4(folder: str | Path, dtype: torch.dtype | None = None) -> tuple[ModelConfig, dict]:
    """Read a Meta llama4 folder, merging model-parallel shards."""
    from herd.formats.meta import read_params, read_shards

    folder = Path(folder)
    params, params_path = read_params(folder)
    config = config_from_params_llama4(params, str(params_path))
    shards = read_shards(folder)
    merged = {name: _merge_shards(name, [s[name] for s in shards], config, str(folder))
              for name in shards[0] if not _META_IGNORED.fullmatch(name)}
    sd = meta_to_herd(merged, config, str(folder))
    if "output.weight" in sd and torch.equal(sd["output.weight"], sd["tok_embeddings.weight"]):
        config = config.replace(tie_embeddings=True)
        del sd["output.weight"]
    check_state_dict(sd, config, str(folder))
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    return config, sd


def save_meta_llama4(folder: str | Path, config: ModelConfig, state_dict: dict[str, torch.Tensor],
                     n_shards: int = 1) -> None:
    """Write params.json + consolidated.00.pth ... in the released llama4 layout, split into n_shards."""
    folder = Path(folder)
    params = params_from_config_llama4(config)
    check_state_dict({k: v for k, v in state_dict.items() if not (k == "output.weight" and config.tie_embeddings)},
                     config, "state dict")
    meta = herd_to_meta(state_dict, config)
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n_shards)]
    for name, t in meta.items():
        for s, part in zip(shards, _split_shards(name, t, n_shards, config)):
            s[name] = part.contiguous()
    from herd.formats.meta import write_shards

    write_shards(folder, shards, params)


# ---------------------------------------------------------------------------------------------------------------
# GGUF, architecture "llama4" (llama.cpp's converter: Llama4Model in convert_hf_to_gguf.py)
#
# llama.cpp hard-codes what the standard keys do not say: chunk size 8192, a NoPE layer every 4th, QK-norm unless
# the model has 128 experts, temperature tuning with scale 0.1 and floor 8192; `llama4.attention.sliding_window` = 0
# turns chunking and NoPE off. herd reads those defaults, and writes its own values under the herd keys below so a
# herd file round-trips any config (llama.cpp ignores unknown keys; it computes what it hard-codes).

GGUF_ARCH = "llama4"
GGUF_HERD_KEYS = {  # herd extension key (after "llama4.") -> ModelConfig field
    "attention.chunk_size": "attention_chunk_size", "no_rope_layer_interval": "nope_layer_interval",
    "attention.use_qk_norm": "use_qk_norm", "attention.temperature_tuning": "attn_temperature_tuning",
    "attention.temperature_scale": "attn_scale", "attention.temperature_floor_scale": "floor_scale",
}

# GGUF name pattern -> herd name pattern; experts and router change layout (module docstring)
GGUF_TENSOR_NAMES: dict[str, str] = {
    **keymaps.GGUF_NAMES,
    "blk.{i}.ffn_gate_shexp.weight": "layers.{i}.feed_forward.shared_expert.w1.weight",
    "blk.{i}.ffn_up_shexp.weight": "layers.{i}.feed_forward.shared_expert.w3.weight",
    "blk.{i}.ffn_down_shexp.weight": "layers.{i}.feed_forward.shared_expert.w2.weight",
    "blk.{i}.ffn_gate_inp.weight": "layers.{i}.feed_forward.router_DE",  # (E, D) <-> (D, E)
    "blk.{i}.ffn_gate_exps.weight": "layers.{i}.feed_forward.experts.w1",  # (E, F, D) <-> (E, D, F)
    "blk.{i}.ffn_up_exps.weight": "layers.{i}.feed_forward.experts.w3",  # (E, F, D) <-> (E, D, F)
    "blk.{i}.ffn_down_exps.weight": "layers.{i}.feed_forward.experts.w2",  # (E, D, F) <-> (E, F, D)
}
_GGUF_TRANSPOSED = ("router_DE", "experts.w1", "experts.w3", "experts.w2")
_FROM_GGUF = keymaps.compile_names(GGUF_TENSOR_NAMES)
_TO_GGUF = keymaps.compile_names({v: k for k, v in GGUF_TENSOR_NAMES.items()})
GGUF_IGNORED = re.compile(r"blk\.\d+\.attn_rot_embd\.weight")


def gguf_to_herd_name(name: str) -> str | None:
    return keymaps.rename(name, _FROM_GGUF)


def herd_to_gguf_name(name: str) -> str | None:
    return keymaps.rename(name, _TO_GGUF)


def gguf_to_herd_tensor(herd_name: str, t: torch.Tensor) -> torch.Tensor:
    """A GGUF tensor (torch order) in herd's layout: experts and router are transposed on their last two axes."""
    return t.transpose(-1, -2).contiguous() if herd_name.endswith(_GGUF_TRANSPOSED) else t


def herd_to_gguf_tensor(herd_name: str, t: torch.Tensor) -> torch.Tensor:
    return t.transpose(-1, -2).contiguous() if herd_name.endswith(_GGUF_TRANSPOSED) else t


def config_from_gguf_llama4(g) -> ModelConfig:
    """ModelConfig of a GGUFFile (herd.formats.gguf.read_gguf) of architecture llama4."""
    from herd.formats.gguf import _get, llama3_rope_factors, rope_scaling_from_factors

    a = GGUF_ARCH
    md = g.metadata
    dim = _get(g, f"{a}.embedding_length", int)
    n_heads = _get(g, f"{a}.attention.head_count", int)
    n_kv = _get(g, f"{a}.attention.head_count_kv", int, n_heads)
    head_dim = _get(g, f"{a}.attention.key_length", int, 0) or dim // n_heads
    if _get(g, f"{a}.rope.dimension_count", int, head_dim) != head_dim:
        raise ConfigError(f"{g.path}: rope over part of the head is not supported")
    emb = g.tensors.get("token_embd.weight")
    if emb is None:
        raise FormatError(f"{g.path}: tensor token_embd.weight is missing")
    vocab = emb.shape[0]
    if _get(g, f"{a}.vocab_size", int, vocab) != vocab:
        raise FormatError(f"{g.path}: {a}.vocab_size disagrees with token_embd.weight ({vocab} rows)")
    theta = _get(g, f"{a}.rope.freq_base", float, 500000.0)
    scaling = None
    freqs = g.tensors.get("rope_freqs.weight")
    if freqs is not None:
        factors = freqs.dequantize()
        ctx0 = _get(g, f"{a}.rope.scaling.original_context_length", int, 0) or None
        scaling = rope_scaling_from_factors(factors, head_dim, theta, ctx0)
        if scaling is not None and f"{a}.rope.scaling.llama3.factor" in md:  # herd's keys name it exactly
            stated = RopeScaling(factor=_get(g, f"{a}.rope.scaling.llama3.factor", float),
                                 low_freq_factor=_get(g, f"{a}.rope.scaling.llama3.low_freq_factor", float),
                                 high_freq_factor=_get(g, f"{a}.rope.scaling.llama3.high_freq_factor", float),
                                 original_max_position_embeddings=ctx0 or 8192)
            if not np.allclose(llama3_rope_factors(stated, head_dim, theta), factors, rtol=1e-5, atol=0):
                raise FormatError(f"{g.path}: rope scaling keys {stated} disagree with tensor rope_freqs.weight")
            scaling = stated
    n_experts = _get(g, f"{a}.expert_count", int, 0)
    moe = None
    if n_experts:
        moe = MoEConfig(n_experts=n_experts, top_k=_get(g, f"{a}.expert_used_count", int, 1),
                        expert_ffn_dim=_get(g, f"{a}.expert_feed_forward_length", int),
                        interleave_step=_get(g, f"{a}.interleave_moe_layer_step", int, 1))
    swa_off = md.get(f"{a}.attention.sliding_window", None) == 0
    fields: dict[str, Any] = {"attention_chunk_size": 0 if swa_off else 8192,
                              "nope_layer_interval": 0 if swa_off else 4, "use_qk_norm": n_experts != 128,
                              "attn_temperature_tuning": not swa_off, "attn_scale": 0.1, "floor_scale": 8192.0}
    for key, field_name in GGUF_HERD_KEYS.items():
        if f"{a}.{key}" in md:
            v = md[f"{a}.{key}"]
            fields[field_name] = bool(v) if isinstance(fields[field_name], bool) else type(fields[field_name])(v)
    return ModelConfig(
        dim=dim, n_layers=_get(g, f"{a}.block_count", int), n_heads=n_heads, n_kv_heads=n_kv, vocab_size=vocab,
        ffn_dim=_get(g, f"{a}.feed_forward_length", int),
        norm_eps=_get(g, f"{a}.attention.layer_norm_rms_epsilon", float), rope_theta=theta, rope_scaling=scaling,
        max_seq_len=_get(g, f"{a}.context_length", int), tie_embeddings="output.weight" not in g.tensors,
        head_dim_override=head_dim if head_dim * n_heads != dim else None, family="llama4", moe=moe, **fields,
    )


def state_from_gguf_llama4(g, dtype: torch.dtype = torch.float32, keep_quantized: bool = False
                           ) -> tuple[ModelConfig, dict[str, Any]]:
    """(config, herd state dict) of a llama4 GGUFFile. With keep_quantized, 2-D block-quantized weights stay
    GGUFTensor objects as in herd.formats.gguf.load_gguf, and so do block-quantized experts, in GGUF's layout
    (E, out, in) (build_quantized_model makes them a QuantExperts); the router is always dequantized.
    `rope.freqs` appears only when the file's rope_freqs match no llama3 setting."""
    from herd.quant import blocks

    config = config_from_gguf_llama4(g)
    shapes = expected_shapes(config)
    state: dict[str, Any] = {}
    for gname, t in g.tensors.items():
        name = gguf_to_herd_name(gname)
        if name is None:
            if GGUF_IGNORED.fullmatch(gname):
                continue
            raise FormatError(f"{g.path}: tensor {gname} is not a known llama4 tensor")
        if name == "rope.freqs":
            if config.rope_scaling is None:
                state[name] = torch.from_numpy(t.dequantize().reshape(-1))
            continue
        want = shapes.get(name)
        if want is None:
            raise FormatError(f"{g.path}: tensor {gname} does not belong to this {config.n_layers}-layer model")
        layout = tuple(want[:-2]) + (want[-1], want[-2]) if name.endswith(_GGUF_TRANSPOSED) else want
        if tuple(t.shape) != layout:
            raise FormatError(f"{g.path}: tensor {gname} has shape {tuple(t.shape)}, expected {layout}")
        if t.type_name not in blocks.GGML_TYPES:
            raise FormatError(f"{g.path}: tensor {gname} is {t.type_name}, which herd cannot dequantize")
        if keep_quantized and t.is_quantized and (name.endswith(_GGUF_TRANSPOSED[1:])  # the experts
                                                  or len(t.shape) == 2 and not name.endswith(_GGUF_TRANSPOSED)):
            state[name] = t
            continue
        w = gguf_to_herd_tensor(name, torch.from_numpy(t.dequantize()))
        state[name] = w if dtype == torch.float32 else w.to(dtype)
    missing = sorted(set(shapes) - set(state))
    if missing:
        raise FormatError(f"{g.path}: tensors missing for herd names {missing[:8]}")
    return config, state


def load_gguf_llama4(path: str | os.PathLike, dtype: torch.dtype = torch.float32, keep_quantized: bool = False):
    """(config, herd state dict, metadata) of a llama4 GGUF file, like herd.formats.gguf.load_gguf."""
    from herd.formats.gguf import read_gguf

    g = read_gguf(path)
    if g.architecture != GGUF_ARCH:
        raise ConfigError(f"{g.path}: GGUF architecture {g.architecture!r} is not llama4")
    config, state = state_from_gguf_llama4(g, dtype, keep_quantized)
    return config, state, g.metadata


def gguf_metadata_llama4(config: ModelConfig) -> list[tuple[str, Any, str]]:
    """(key, value, gguf value type name) of the architecture keys llama.cpp's llama4 loader reads, plus herd's."""
    _need_shared_expert(config, "GGUF")
    a = GGUF_ARCH
    u32 = [("context_length", config.max_seq_len), ("embedding_length", config.dim), ("block_count", config.n_layers),
           ("feed_forward_length", config.ffn_dim), ("attention.head_count", config.n_heads),
           ("attention.head_count_kv", config.n_kv_heads), ("rope.dimension_count", config.head_dim),
           ("vocab_size", config.vocab_size)]
    if config.head_dim_override is not None:
        u32 += [("attention.key_length", config.head_dim), ("attention.value_length", config.head_dim)]
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
    out = [(f"{a}.{k}", v, "UINT32") for k, v in u32]
    out += [(f"{a}.attention.layer_norm_rms_epsilon", config.norm_eps, "FLOAT32"),
            (f"{a}.rope.freq_base", config.rope_theta, "FLOAT32"),
            (f"{a}.attention.use_qk_norm", config.use_qk_norm, "BOOL"),
            # not the standard rope.scaling.factor / type keys: llama.cpp would add linear scaling / reject "llama3"
            *([] if s is None else [(f"{a}.rope.scaling.llama3.factor", s.factor, "FLOAT32"),
                                    (f"{a}.rope.scaling.llama3.low_freq_factor", s.low_freq_factor, "FLOAT32"),
                                    (f"{a}.rope.scaling.llama3.high_freq_factor", s.high_freq_factor, "FLOAT32")]),
            (f"{a}.attention.temperature_tuning", config.attn_temperature_tuning, "BOOL"),
            (f"{a}.attention.temperature_scale", config.attn_scale, "FLOAT32"),
            (f"{a}.attention.temperature_floor_scale", config.floor_scale, "FLOAT32")]
    return out


def write_gguf_llama4(path: str | os.PathLike, config: ModelConfig, state_dict: dict[str, torch.Tensor],
                      tokenizer_metadata: dict[str, Any], chat_template: str | None = None, quant: str = "f16",
                      name: str = "") -> None:
    """Write a llama.cpp-loadable GGUF of arch llama4 with gguf-py's writer. Norms, router and rope factors stay
    F32; other weights (experts included) get `quant` where their rows fill whole blocks, else F16. Atomic."""
    import gguf

    from herd.formats.gguf import WRITE_QUANTS, _value_type, llama3_rope_factors
    from herd.quant import blocks

    if quant not in WRITE_QUANTS:
        raise ConfigError(f"quant {quant!r} is not supported for GGUF output (choose from {', '.join(WRITE_QUANTS)})")
    weight_type, output_type, file_type = WRITE_QUANTS[quant]
    sd = {k: v for k, v in state_dict.items() if not (k == "output.weight" and config.tie_embeddings)}
    check_state_dict(sd, config, "state dict")
    metadata = gguf_metadata_llama4(config)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    w = gguf.GGUFWriter(str(tmp), GGUF_ARCH)
    if name:
        w.add_name(name)
    w.add_key_value("general.file_type", file_type, gguf.GGUFValueType.UINT32)
    w.add_key_value("general.quantization_version", gguf.GGML_QUANT_VERSION, gguf.GGUFValueType.UINT32)
    for key, value, vtype in metadata:
        w.add_key_value(key, value, gguf.GGUFValueType[vtype])
    meta = {k: v for k, v in tokenizer_metadata.items() if k.startswith("tokenizer.")}
    if chat_template is not None:
        meta["tokenizer.chat_template"] = chat_template
    for key, value in meta.items():
        if isinstance(value, np.ndarray):
            value = value.tolist()
        vtype, item = _value_type(key, value)
        if vtype == gguf.GGUFValueType.ARRAY and not value:
            continue
        w.add_key_value(key, list(value) if vtype == gguf.GGUFValueType.ARRAY else value, gguf.GGUFValueType(vtype),
                        sub_type=gguf.GGUFValueType(item) if item is not None else None)

    def add(gname: str, t: torch.Tensor, type_name: str) -> None:
        x = t.detach().to(torch.float32).contiguous().numpy()
        if type_name == "F32":
            w.add_tensor(gname, x)
        elif type_name == "F16":
            w.add_tensor(gname, x.astype(np.float16))
        else:
            w.add_tensor(gname, blocks.quantize(x, type_name),
                         raw_dtype=gguf.GGMLQuantizationType(blocks.type_id(type_name)))

    try:
        if config.rope_scaling is not None:
            add("rope_freqs.weight", torch.from_numpy(
                llama3_rope_factors(config.rope_scaling, config.head_dim, config.rope_theta)), "F32")
        for hname in expected_shapes(config):
            t = herd_to_gguf_tensor(hname, sd[hname])
            kind = "F32" if (t.dim() == 1 or hname.endswith("router_DE")) else weight_type
            if hname == "output.weight" or (hname == "tok_embeddings.weight" and config.tie_embeddings):
                kind = output_type
            if t.shape[-1] % blocks.GGML_TYPES[kind][1]:
                kind = "F16"  # llama.cpp's fallback for rows that do not fill whole blocks
            add(herd_to_gguf_name(hname), t, kind)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise

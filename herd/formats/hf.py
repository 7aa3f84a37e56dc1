"""Hugging Face checkpoints: config.json + model.safetensors (or a sharded index), read and written (SPEC.md §3).

A container: safetensors files, their index, config.json keys shared by every Llama, and the dense Llama
(LlamaForCausalLM) mapping. It never imports a model family; llama4.py and mllama.py build on its helpers, and
herd/formats/__init__.py picks the family. Floor 6 (formats); imports herd.config, herd.errors and formats' own
io / keymaps / shapes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from herd.config import ModelConfig, RopeScaling
from herd.errors import ConfigError, FormatError
from herd.formats import keymaps
from herd.formats.io import cast, read_json, save_safetensors_atomic, write_text_atomic
from herd.formats.shapes import check_state_dict

# config.json keys that do not change the math of a Llama forward pass.
IGNORED_KEYS = {
    "architectures", "model_type", "initializer_range", "use_cache", "pad_token_id", "bos_token_id", "eos_token_id",
    "pretraining_tp", "attention_dropout", "torch_dtype", "dtype", "transformers_version", "_name_or_path",
    "output_attentions", "output_hidden_states", "return_dict", "tie_encoder_decoder", "is_encoder_decoder",
    "chunk_size_feed_forward", "add_cross_attention", "tokenizer_class", "prefix", "sep_token_id",
    "decoder_start_token_id", "task_specific_params", "problem_type", "id2label", "label2id", "finetuning_task",
    "quantization_config_ignored", "cross_attention_hidden_size", "torchscript", "use_bfloat16", "tf_legacy_loss",
    "pruned_heads", "is_decoder", "num_labels", "max_length", "bad_words_ids", "begin_suppress_tokens",
}
USED_KEYS = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta",
    "rope_scaling", "rope_parameters", "tie_word_embeddings", "attention_bias", "mlp_bias",
}


def rope_scaling(d: dict | None, where: str) -> RopeScaling | None:
    if not d:
        return None
    kind = d.get("rope_type", d.get("type"))
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        raise ConfigError(f"{where}: rope scaling type {kind!r} is not supported (herd knows 'llama3')")
    try:
        return RopeScaling(
            factor=float(d["factor"]), low_freq_factor=float(d.get("low_freq_factor", 1.0)),
            high_freq_factor=float(d.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(d.get("original_max_position_embeddings", 8192)),
        )
    except KeyError as e:
        raise ConfigError(f"{where}: rope scaling is missing key {e}") from None


def guess_family(vocab_size: int, scaling: RopeScaling | None) -> str:
    if vocab_size == 128256:
        if scaling is None:
            return "llama3"
        return "llama3.2" if scaling.factor == 32 else "llama3.1"
    if vocab_size == 32000:
        return "llama2"
    return "llama"


def config_from_hf(cfg: dict, where: str = "config.json") -> ModelConfig:
    """HF LlamaConfig dict -> ModelConfig. Unknown keys are an error naming them."""
    model_type = cfg.get("model_type", "llama")
    if model_type != "llama":
        raise ConfigError(f"{where}: model_type {model_type!r} is not a Llama text model (expected 'llama')")
    unknown = sorted(set(cfg) - IGNORED_KEYS - USED_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown config keys {unknown}")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag):
            raise ConfigError(f"{where}: {flag}=true is not a Llama architecture (Llama has no biases)")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{where}: hidden_act {cfg['hidden_act']!r} is not supported (Llama uses 'silu')")
    rope = cfg.get("rope_parameters") or {}
    scaling_src = cfg.get("rope_scaling") or rope
    theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
    try:
        n_heads = cfg["num_attention_heads"]
        dim = cfg["hidden_size"]
        scaling = rope_scaling(scaling_src, where)
        head_dim = cfg.get("head_dim")
        return ModelConfig(
            dim=dim, n_layers=cfg["num_hidden_layers"], n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads, vocab_size=cfg["vocab_size"],
            ffn_dim=cfg["intermediate_size"], norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta), rope_scaling=scaling,
            max_seq_len=cfg.get("max_position_embeddings", 2048),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            head_dim_override=head_dim if head_dim not in (None, dim // n_heads) else None,
            family=guess_family(cfg["vocab_size"], scaling),
        )
    except KeyError as e:
        raise ConfigError(f"{where}: required key {e} is missing") from None
    except TypeError as e:
        raise ConfigError(f"{where}: a value has the wrong type ({e})") from None


def config_to_hf(config: ModelConfig, dtype: torch.dtype, bos_id: int | None = None,
                 eos_id: int | list[int] | None = None) -> dict:
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": config.vocab_size,
        "hidden_size": config.dim, "intermediate_size": config.ffn_dim, "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads, "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim, "hidden_act": "silu", "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps, "rope_theta": config.rope_theta,
        "tie_word_embeddings": config.tie_embeddings, "attention_bias": False, "mlp_bias": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if config.rope_scaling is not None:
        s = config.rope_scaling
        cfg["rope_scaling"] = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                               "high_freq_factor": s.high_freq_factor,
                               "original_max_position_embeddings": s.original_max_position_embeddings}
    if bos_id is not None:
        cfg["bos_token_id"] = bos_id
    if eos_id is not None:
        cfg["eos_token_id"] = eos_id
    return cfg


def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise FormatError(f"{index}: no weight_map")
        files = sorted({folder / f for f in weight_map.values()})
        for f in files:
            if not f.exists():
                raise FormatError(f"{index}: names shard {f.name}, which is missing")
        return files
    single = folder / "model.safetensors"
    if single.exists():
        return [single]
    others = sorted(folder.glob("*.safetensors"))
    if others:
        return others
    raise FormatError(f"{folder}: no model.safetensors, sharded index or *.safetensors file")


def read_hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF checkpoint by their HF names (memory-mapped by safetensors)."""
    out: dict[str, torch.Tensor] = {}
    for f in weight_files(folder):
        try:
            with safe_open(f, framework="pt") as sf:
                for name in sf.keys():
                    out[name] = sf.get_tensor(name)
        except SafetensorError as e:
            raise FormatError(f"{f}: not a readable safetensors file ({e})") from None
        except OSError as e:
            raise FormatError(f"{f}: cannot be read ({e})") from None
    return out


def hf_to_herd_state_dict(tensors: dict[str, torch.Tensor], config: ModelConfig, where: str) -> dict:
    sd = {}
    for name, t in tensors.items():
        if keymaps.HF_IGNORED.fullmatch(name):
            continue
        herd_name = keymaps.hf_to_herd_name(name)
        if herd_name is None:
            raise FormatError(f"{where}: unexpected tensor {name!r} for a Llama model")
        if herd_name.endswith("attention.wq.weight"):
            t = keymaps.permute_hf_to_meta(t, config.n_heads)
        elif herd_name.endswith("attention.wk.weight"):
            t = keymaps.permute_hf_to_meta(t, config.n_kv_heads)
        sd[herd_name] = t
    if config.tie_embeddings:
        sd.pop("output.weight", None)
    return sd


def load_llama(folder: str | Path, dtype: torch.dtype | None = None, cfg: dict | None = None
               ) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read an HF Llama folder: (config, state dict in herd names, q/k in Meta order). cfg: its config.json, when
    the caller has read it already."""
    folder = Path(folder)
    where = str(folder / "config.json")
    config = config_from_hf(read_json(folder / "config.json") if cfg is None else cfg, where)
    sd = hf_to_herd_state_dict(read_hf_tensors(folder), config, str(folder))
    check_state_dict(sd, config, str(folder))
    return config, cast(sd, dtype)


def save_llama(folder: str | Path, config: ModelConfig, state_dict: dict[str, torch.Tensor],
               max_shard_bytes: int = 5 * 2**30, bos_id=None, eos_id=None) -> None:
    """Write config.json + model.safetensors (sharded with an index past max_shard_bytes) of a LlamaForCausalLM."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hf_sd: dict[str, torch.Tensor] = {}
    for name, t in state_dict.items():
        if name == "output.weight" and config.tie_embeddings:
            continue
        if name.endswith("attention.wq.weight"):
            t = keymaps.permute_meta_to_hf(t, config.n_heads)
        elif name.endswith("attention.wk.weight"):
            t = keymaps.permute_meta_to_hf(t, config.n_kv_heads)
        hf_name = keymaps.herd_to_hf_name(name)
        if hf_name is None:
            raise FormatError(f"tensor {name} has no Hugging Face name")
        hf_sd[hf_name] = t.contiguous()
    dtype = next(iter(hf_sd.values())).dtype
    write_shards(folder, hf_sd, max_shard_bytes)
    write_text_atomic(folder / "config.json", json.dumps(config_to_hf(config, dtype, bos_id, eos_id), indent=2))


def write_shards(folder: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> None:
    """model.safetensors, or model-NNNNN-of-NNNNN.safetensors shards of at most max_shard_bytes (a tensor larger than
    that gets a shard of its own) with model.safetensors.index.json; names in sorted order, each file atomic."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    if len(shards) == 1:
        save_safetensors_atomic(shards[0], folder / "model.safetensors")
        return
    weight_map = {}
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_safetensors_atomic(shard, folder / fname)
        weight_map.update({n: fname for n in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    write_text_atomic(folder / "model.safetensors.index.json",
                       json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))

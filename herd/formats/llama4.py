"""Llama 4 text checkpoints: HF `Llama4ForCausalLM` safetensors, Meta's llama4 `consolidated.NN.pth`, GGUF `llama4`.

Facts in SPEC.md §5 (architecture, Meta and HF names) and §4 (GGUF). herd/formats/__init__.py sends Llama 4 files
here; this module builds on the containers (hf.py, meta.py, gguf.py), which never import it. Its configs are read and
written by llama4_config.py, its name tables are in keymaps.py. Inside herd a Llama 4 model uses the names of Meta's
reference model after its load hooks (herd/models/moe.py lists the MoE ones); q/k rows are in Meta's interleaved-pair
order in all three formats, so nothing here permutes them (HF's Llama 4 applies RoPE to adjacent pairs, unlike HF's
Llama).

Expert layouts, herd (= Meta's model) <-> each format:
  herd experts.w1 / w3  (E, D, F)   HF experts.gate_up_proj (E, D, 2F) = cat(w1, w3, -1)
                                    Meta file experts.moe_w_in_eD_F / moe_w_swiglu_eD_F (E*D, F)
                                    GGUF ffn_gate_exps / ffn_up_exps (E, F, D) = w.transpose(1, 2)
  herd experts.w2       (E, F, D)   HF experts.down_proj (E, F, D); Meta moe_w_out_eF_D (E*F, D);
                                    GGUF ffn_down_exps (E, D, F)
  herd router_DE        (D, E)      HF router.weight (E, D); Meta router_DE (D, E); GGUF ffn_gate_inp (E, D)

Floor 6 (formats); imports herd.config, herd.errors and formats' containers, io, keymaps and shapes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from herd.config import ModelConfig
from herd.errors import ConfigError, FormatError
from herd.formats import gguf, hf, keymaps, llama4_config, meta
from herd.formats.io import cast, read_json, write_text_atomic
from herd.formats.llama4_config import (ARCH, config_from_gguf_llama4, config_from_hf_llama4, config_from_params_llama4,
                                        config_to_hf_llama4, params_from_config_llama4)
from herd.formats.shapes import check_state_dict

# ---------------------------------------------------------------------------------------------------------------
# Hugging Face: Llama4ForCausalLM safetensors (or the text part of Llama4ForConditionalGeneration)

_TO_HF = keymaps.compile_names(keymaps.LLAMA4_HF_NAMES)
_FROM_HF = keymaps.compile_names({v: k for k, v in keymaps.LLAMA4_HF_NAMES.items()})


def hf_to_herd(tensors: dict[str, torch.Tensor], config: ModelConfig, where: str) -> dict[str, torch.Tensor]:
    """HF Llama 4 tensors (text part; a multimodal file's language_model.* prefix is dropped) -> herd names."""
    sd: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.startswith(keymaps.LLAMA4_HF_VISION_PREFIXES) or keymaps.HF_IGNORED.fullmatch(name):
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


def load_hf_llama4(folder: str | Path, dtype: torch.dtype | None = None, cfg: dict | None = None
                   ) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read an HF Llama 4 folder (Llama4ForCausalLM, or the text part of Llama4ForConditionalGeneration). cfg: its
    config.json, when the caller has read it already."""
    folder = Path(folder)
    where = str(folder / "config.json")
    config = config_from_hf_llama4(read_json(folder / "config.json") if cfg is None else cfg, where)
    sd = hf_to_herd(hf.read_hf_tensors(folder), config, str(folder))
    check_state_dict(sd, config, str(folder))
    return config, cast(sd, dtype)


def save_hf_llama4(folder: str | Path, config: ModelConfig, state_dict: dict[str, torch.Tensor],
                   max_shard_bytes: int = 5 * 2**30, bos_id=None, eos_id=None) -> None:
    """Write config.json + model.safetensors (sharded with an index past max_shard_bytes) for Llama4ForCausalLM."""
    folder = Path(folder)
    check_state_dict({k: v for k, v in state_dict.items() if not (k == "output.weight" and config.tie_embeddings)},
                     config, "state dict")
    hf_sd = herd_to_hf(state_dict, config)
    folder.mkdir(parents=True, exist_ok=True)
    hf.write_shards(folder, hf_sd, max_shard_bytes)
    dtype = next(iter(hf_sd.values())).dtype
    write_text_atomic(folder / "config.json", json.dumps(config_to_hf_llama4(config, dtype, bos_id, eos_id),
                                                          indent=2))


# ---------------------------------------------------------------------------------------------------------------
# Meta: consolidated.NN.pth model-parallel shards in the released llama4 layout (fused wqkv and fc1, moe_w_* experts)

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
    if key in keymaps.LLAMA4_META_EXPERTS:  # (E*D, F/n) or (E*F/n, D): unflatten the experts, join along F
        E = config.moe.n_experts
        axis = 1 if key.endswith("eF_D") else 2
        return torch.cat([p.unflatten(0, (E, -1)) for p in parts], axis).flatten(0, 1)
    axis = keymaps.LLAMA4_META_AXIS.get(key)
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
    elif key in keymaps.LLAMA4_META_EXPERTS:
        E = config.moe.n_experts
        axis = 1 if key.endswith("eF_D") else 2
        parts = [p.flatten(0, 1) for p in t.unflatten(0, (E, -1)).chunk(n, axis)]
    elif keymaps.LLAMA4_META_AXIS.get(key) is not None:
        parts = t.chunk(n, keymaps.LLAMA4_META_AXIS[key])
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
        if keymaps.LLAMA4_META_IGNORED.fullmatch(name):
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
        elif key in ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight") \
                or key in keymaps.LLAMA4_META_SAME:
            out[p + key] = t
        elif key in keymaps.LLAMA4_META_RENAME:
            out[p + keymaps.LLAMA4_META_RENAME[key]] = t
        elif key == "feed_forward.mlp.fc1_weight":
            out[p + "feed_forward.w1.weight"], out[p + "feed_forward.w3.weight"] = t.chunk(2, 0)
        elif key in keymaps.LLAMA4_META_EXPERTS:
            if config.moe is None:
                raise FormatError(f"{where}: tensor {name} holds experts but params.json has no moe_args")
            E = config.moe.n_experts
            rows = D if key.endswith("eD_F") else config.moe.expert_ffn_dim
            if t.dim() == 2 and t.shape[0] != E * rows:
                raise FormatError(f"{where}: tensor {name} has {t.shape[0]} rows, expected {E} experts x {rows}")
            out[p + keymaps.LLAMA4_META_EXPERTS[key]] = t.reshape(E, rows, -1)
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
            out[p + keymaps.LLAMA4_HERD_TO_META[key]] = t
        elif key.startswith("feed_forward.experts."):
            out[p + keymaps.LLAMA4_HERD_TO_META[key]] = t.flatten(0, 1)
        else:  # attention.wo, router_DE
            out[name] = t
    return out


def load_meta_llama4(folder: str | Path, dtype: torch.dtype | None = None, params: dict | None = None
                     ) -> tuple[ModelConfig, dict]:
    """Read a Meta llama4 folder, merging model-parallel shards. params: its params.json, when the caller has read it
    already."""
    folder = Path(folder)
    params_path = folder / "params.json"
    config = config_from_params_llama4(read_json(params_path) if params is None else params, str(params_path))
    shards = meta.read_shards(folder)
    merged = {name: _merge_shards(name, [s[name] for s in shards], config, str(folder))
              for name in shards[0] if not keymaps.LLAMA4_META_IGNORED.fullmatch(name)}
    sd = meta_to_herd(merged, config, str(folder))
    if "output.weight" in sd and torch.equal(sd["output.weight"], sd["tok_embeddings.weight"]):
        config = config.replace(tie_embeddings=True)
        del sd["output.weight"]
    check_state_dict(sd, config, str(folder))
    return config, cast(sd, dtype)


def save_meta_llama4(folder: str | Path, config: ModelConfig, state_dict: dict[str, torch.Tensor],
                     n_shards: int = 1) -> None:
    """Write params.json + consolidated.00.pth ... in the released llama4 layout, split into n_shards."""
    folder = Path(folder)
    params = params_from_config_llama4(config)
    check_state_dict({k: v for k, v in state_dict.items() if not (k == "output.weight" and config.tie_embeddings)},
                     config, "state dict")
    released = herd_to_meta(state_dict, config)
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n_shards)]
    for name, t in released.items():
        for s, part in zip(shards, _split_shards(name, t, n_shards, config)):
            s[name] = part.contiguous()
    meta.write_shards(folder, shards, params)


# ---------------------------------------------------------------------------------------------------------------
# GGUF, architecture "llama4": the container's reader and writer, given llama4's names, layouts and metadata


def _gguf_metadata(config: ModelConfig) -> list:
    return llama4_config.gguf_metadata_llama4(config)  # looked up when called: a test swaps it for llama.cpp's keys


GGUF_ARCH = gguf.GGUFArch(
    ARCH, keymaps.LLAMA4_GGUF_NAMES, config_from_gguf_llama4, _gguf_metadata,
    transposed=keymaps.LLAMA4_GGUF_TRANSPOSED,
    quantized_stacks=("experts.w1", "experts.w3", "experts.w2"),  # kept as GGUF (E, out, in) blocks for QuantExperts
    float32=("router_DE",),
)

"""Every weight-name table of the formats herd reads, and the q/k row permutation between RoPE layouts (SPEC.md §1,
§3, §5, §6).

herd's own names are Meta's. HF's Llama stores q/k rows in rotate-half order; Meta (and GGUF) in interleaved
pairs. Every other tensor is the same matrix under another name. Patterns use "{i}" for the layer index. Tables for
Llama (HF, Meta, GGUF), Llama 4's text model (HF, Meta's released files, GGUF) and the vision towers (Mllama, Llama
4) live here; the code that moves tensors between layouts lives with each family (llama4.py, mllama.py).

Floor 6 (formats); imports nothing from herd.
"""

from __future__ import annotations

import re

import torch

# herd (Meta) name pattern -> HF name pattern; "{i}" is the layer index.
HF_NAMES: dict[str, str] = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "layers.{i}.attention.wq.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "layers.{i}.attention.wk.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "layers.{i}.attention.wv.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "layers.{i}.attention.wo.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.feed_forward.w1.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.feed_forward.w3.weight": "model.layers.{i}.mlp.up_proj.weight",
    "layers.{i}.feed_forward.w2.weight": "model.layers.{i}.mlp.down_proj.weight",
    "layers.{i}.attention_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
}

# HF tensors that carry no weights herd needs (old checkpoints store the RoPE table).
HF_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

# Meta's model-parallel shards: the axis each tensor is split along (None = replicated, take shard 0).
# tok_embeddings: dim 1 for Llama 2 (ParallelEmbedding), dim 0 for Llama 3 (VocabParallelEmbedding).
META_SHARD_AXIS: dict[str, int | None] = {
    "attention.wq": 0, "attention.wk": 0, "attention.wv": 0, "attention.wo": 1,
    "feed_forward.w1": 0, "feed_forward.w3": 0, "feed_forward.w2": 1,
    "attention_norm": None, "ffn_norm": None, "norm": None, "output": 0,
}

_LAYER = re.compile(r"\.(\d+)\.")


# GGUF (llama.cpp) name pattern -> herd name pattern of the llama architecture; llama4 extends it.
GGUF_NAMES: dict[str, str] = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
    "rope_freqs.weight": "rope.freqs",
    "blk.{i}.attn_norm.weight": "layers.{i}.attention_norm.weight",
    "blk.{i}.attn_q.weight": "layers.{i}.attention.wq.weight",
    "blk.{i}.attn_k.weight": "layers.{i}.attention.wk.weight",
    "blk.{i}.attn_v.weight": "layers.{i}.attention.wv.weight",
    "blk.{i}.attn_output.weight": "layers.{i}.attention.wo.weight",
    "blk.{i}.ffn_norm.weight": "layers.{i}.ffn_norm.weight",
    "blk.{i}.ffn_gate.weight": "layers.{i}.feed_forward.w1.weight",
    "blk.{i}.ffn_up.weight": "layers.{i}.feed_forward.w3.weight",
    "blk.{i}.ffn_down.weight": "layers.{i}.feed_forward.w2.weight",
}


# ---------------------------------------------------------------------------------------------------------------
# Llama 4 text model (SPEC.md §5): HF Llama4ForCausalLM names are Llama's with `feed_forward` for `mlp`, plus MoE.

LLAMA4_HF_NAMES: dict[str, str] = {
    **{k: v.replace(".mlp.", ".feed_forward.") for k, v in HF_NAMES.items()},
    "layers.{i}.feed_forward.shared_expert.w1.weight": "model.layers.{i}.feed_forward.shared_expert.gate_proj.weight",
    "layers.{i}.feed_forward.shared_expert.w3.weight": "model.layers.{i}.feed_forward.shared_expert.up_proj.weight",
    "layers.{i}.feed_forward.shared_expert.w2.weight": "model.layers.{i}.feed_forward.shared_expert.down_proj.weight",
    "layers.{i}.feed_forward.experts.w2": "model.layers.{i}.feed_forward.experts.down_proj",
    # these two change layout on the way (llama4.py's docstring)
    "layers.{i}.feed_forward.router_DE": "model.layers.{i}.feed_forward.router.weight",
    "layers.{i}.feed_forward.experts.w1+w3": "model.layers.{i}.feed_forward.experts.gate_up_proj",
}
# prefixes of a Llama4ForConditionalGeneration's vision tensors, which the text reader skips
LLAMA4_HF_VISION_PREFIXES = ("vision_model.", "multi_modal_projector.")

# GGUF name pattern -> herd name pattern of arch llama4; experts and router change layout (llama4.py's docstring)
LLAMA4_GGUF_NAMES: dict[str, str] = {
    **GGUF_NAMES,
    "blk.{i}.ffn_gate_shexp.weight": "layers.{i}.feed_forward.shared_expert.w1.weight",
    "blk.{i}.ffn_up_shexp.weight": "layers.{i}.feed_forward.shared_expert.w3.weight",
    "blk.{i}.ffn_down_shexp.weight": "layers.{i}.feed_forward.shared_expert.w2.weight",
    "blk.{i}.ffn_gate_inp.weight": "layers.{i}.feed_forward.router_DE",  # (E, D) <-> (D, E)
    "blk.{i}.ffn_gate_exps.weight": "layers.{i}.feed_forward.experts.w1",  # (E, F, D) <-> (E, D, F)
    "blk.{i}.ffn_up_exps.weight": "layers.{i}.feed_forward.experts.w3",  # (E, F, D) <-> (E, D, F)
    "blk.{i}.ffn_down_exps.weight": "layers.{i}.feed_forward.experts.w2",  # (E, D, F) <-> (E, F, D)
}
# herd-name suffixes GGUF stores with the last two axes swapped
LLAMA4_GGUF_TRANSPOSED = ("router_DE", "experts.w1", "experts.w3", "experts.w2")
# tensors that carry nothing herd needs (old converters stored the RoPE table per layer)
GGUF_IGNORED = re.compile(r"blk\.\d+\.attn_rot_embd\.weight")

# Meta's released llama4 files, per layer (after "layers.{i}."): names that are herd's own, as Meta's load hooks
# leave them ...
LLAMA4_META_SAME = {"attention.wo.weight", "feed_forward.router_DE", "feed_forward.w1.weight",
                    "feed_forward.w2.weight", "feed_forward.w3.weight", "attention_norm.weight", "ffn_norm.weight",
                    "feed_forward.shared_expert.w1.weight", "feed_forward.shared_expert.w2.weight",
                    "feed_forward.shared_expert.w3.weight"}
# ... names that are the same matrix under another name ...
LLAMA4_META_RENAME = {
    "attention.wqkv.layer_norm_weight": "attention_norm.weight",
    "feed_forward.norm.weight": "ffn_norm.weight",
    "feed_forward.mlp.layer_norm_weight": "ffn_norm.weight",
    "feed_forward.mlp.layer_norm.weight": "ffn_norm.weight",
    "feed_forward.mlp.fc2_weight": "feed_forward.w2.weight",
    "feed_forward.w_in_shared_FD.weight": "feed_forward.shared_expert.w1.weight",
    "feed_forward.w_swiglu_FD.weight": "feed_forward.shared_expert.w3.weight",
    "feed_forward.w_out_shared_DF.weight": "feed_forward.shared_expert.w2.weight",
}
# ... and the experts, flattened (E*D, F) / (E*F, D) in the file
LLAMA4_META_EXPERTS = {"feed_forward.experts.moe_w_in_eD_F": "feed_forward.experts.w1",
                       "feed_forward.experts.moe_w_swiglu_eD_F": "feed_forward.experts.w3",
                       "feed_forward.experts.moe_w_out_eF_D": "feed_forward.experts.w2"}
# herd -> Meta names the writer uses for the experts (shared and routed)
LLAMA4_HERD_TO_META = {v: k for k, v in {**LLAMA4_META_RENAME, **LLAMA4_META_EXPERTS}.items()
                       if ".shared_expert." in v or ".experts." in v}
# tensors of the released files that carry nothing the text model needs
LLAMA4_META_IGNORED = re.compile(r"rope\.freqs|freq_cis|layers\.\d+\.(.*\._extra_state|feed_forward\.("
                                 r"global_gate_stats_3E|running_gate_stats_3E|expert_activation_DE))|"
                                 r"vision_embeddings\..*|vision_projection\..*")
# model-parallel split axis of each Meta file tensor (None: replicated); see llama_models/checkpoint.py
LLAMA4_META_AXIS = {
    "attention.wq.weight": 0, "attention.wk.weight": 0, "attention.wv.weight": 0, "attention.wo.weight": 1,
    "feed_forward.w1.weight": 0, "feed_forward.w3.weight": 0, "feed_forward.w2.weight": 1,
    "feed_forward.mlp.fc2_weight": 1, "feed_forward.w_in_shared_FD.weight": 0,
    "feed_forward.w_swiglu_FD.weight": 0, "feed_forward.w_out_shared_DF.weight": 1,
}

# ---------------------------------------------------------------------------------------------------------------
# Vision towers (SPEC.md §6): HF names -> herd (Meta) names

# one encoder block, the same in Mllama's and Llama 4's towers (HF suffix -> herd suffix, before .weight / .bias)
VISION_BLOCK = {
    "self_attn.q_proj": "attn.wq", "self_attn.k_proj": "attn.wk", "self_attn.v_proj": "attn.wv",
    "self_attn.o_proj": "attn.wo", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
    "input_layernorm": "ln_1", "post_attention_layernorm": "ln_2",
}
# Mllama: tensors of the vision tower outside its blocks (after "vision_model." / "vision_model.vision_encoder.")
MLLAMA_VISION_TOP = {
    "class_embedding": "class_embedding",
    "gated_positional_embedding.embedding": "positional_embedding",
    "gated_positional_embedding.tile_embedding.weight": "gated_positional_embedding",
    "gated_positional_embedding.gate": "gated_positional_embedding_gate",
    "pre_tile_positional_embedding.embedding.weight": "pre_tile_pos_embed.embedding",
    "pre_tile_positional_embedding.gate": "pre_tile_pos_embed.gate",
    "post_tile_positional_embedding.embedding.weight": "post_tile_pos_embed.embedding",
    "post_tile_positional_embedding.gate": "post_tile_pos_embed.gate",
    "layernorm_pre.weight": "ln_pre.weight", "layernorm_pre.bias": "ln_pre.bias",
    "layernorm_post.weight": "ln_post.weight", "layernorm_post.bias": "ln_post.bias",
    "patch_embedding.weight": "conv1._linear.weight",
}
# Mllama: a cross-attention block of the text model (after its layer prefix)
MLLAMA_CROSS = {
    "cross_attn.q_proj.weight": "attention.wq.weight", "cross_attn.k_proj.weight": "attention.wk.weight",
    "cross_attn.v_proj.weight": "attention.wv.weight", "cross_attn.o_proj.weight": "attention.wo.weight",
    "cross_attn.q_norm.weight": "attention.q_norm.weight", "cross_attn.k_norm.weight": "attention.k_norm.weight",
    "cross_attn_attn_gate": "gate_attn", "cross_attn_mlp_gate": "gate_ffwd",
    "input_layernorm.weight": "attention_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight", "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
}
# Mllama: transformers 5 module paths (model.language_model...) -> the saved ones (language_model.model...)
MLLAMA_HF_PREFIXES = [("model.language_model.", "language_model.model."), ("model.vision_model.", "vision_model."),
                      ("model.multi_modal_projector.", "multi_modal_projector."),
                      ("lm_head.", "language_model.lm_head.")]
# Llama 4: tensors of the vision tower outside its blocks, and its projector
LLAMA4_VISION_TOP = {
    "vision_model.patch_embedding.linear.weight": "vision_embeddings.vision_encoder.conv1._linear.weight",
    "vision_model.class_embedding": "vision_embeddings.vision_encoder.class_embedding",
    "vision_model.positional_embedding_vlm": "vision_embeddings.vision_encoder.positional_embedding_vlm",
    "vision_model.layernorm_pre.weight": "vision_embeddings.vision_encoder.ln_pre.weight",
    "vision_model.layernorm_pre.bias": "vision_embeddings.vision_encoder.ln_pre.bias",
    "vision_model.layernorm_post.weight": "vision_embeddings.vision_encoder.ln_post.weight",
    "vision_model.layernorm_post.bias": "vision_embeddings.vision_encoder.ln_post.bias",
    "vision_model.vision_adapter.mlp.fc1.weight": "vision_embeddings.vision_adapter.mlp.c_fc.weight",
    "vision_model.vision_adapter.mlp.fc2.weight": "vision_embeddings.vision_adapter.mlp.c_proj.weight",
    "multi_modal_projector.linear_1.weight": "vision_projection.weight",
}


# ---------------------------------------------------------------------------------------------------------------
# Renaming

def compile_names(table: dict[str, str]) -> list[tuple[re.Pattern, str]]:
    """A name table (patterns with "{i}" for the layer index) -> match rules for rename()."""
    return [(re.compile("^" + re.escape(src).replace(r"\{i\}", r"(?P<i>\d+)") + "$"), dst)
            for src, dst in table.items()]


def rename(name: str, rules) -> str | None:
    """The name a table's rules give `name`, or None if no pattern matches."""
    for pattern, dst in rules:
        m = pattern.match(name)
        if m:
            return dst.replace("{i}", m.group("i")) if "i" in m.groupdict() else dst
    return None


_TO_HF = compile_names(HF_NAMES)
_FROM_HF = compile_names({v: k for k, v in HF_NAMES.items()})


def herd_to_hf_name(name: str) -> str | None:
    return rename(name, _TO_HF)


def hf_to_herd_name(name: str) -> str | None:
    return rename(name, _FROM_HF)


def permute_meta_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Interleaved pairs -> rotate-half rows: W_hf[h*hd + p*hd/2 + i] = W_meta[h*hd + 2i + p]."""
    out_dim, in_dim = w.shape
    hd = out_dim // n_heads
    return w.view(n_heads, hd // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def permute_hf_to_meta(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rotate-half rows -> interleaved pairs (the inverse of permute_meta_to_hf)."""
    out_dim, in_dim = w.shape
    hd = out_dim // n_heads
    return w.view(n_heads, 2, hd // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def meta_shard_axis(name: str, family: str) -> int | None:
    """Concatenation axis of a Meta model-parallel tensor, by its herd name."""
    if name == "tok_embeddings.weight":
        return 1 if family == "llama2" else 0
    key = _LAYER.sub(".", name).removeprefix("layers.").removesuffix(".weight")
    key = key.lstrip(".")
    if key not in META_SHARD_AXIS:
        return None
    return META_SHARD_AXIS[key]

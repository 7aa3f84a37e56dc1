"""Weight names of other formats, as tables, and the q/k row permutation between RoPE layouts (SPEC.md §1, §3).

herd's own names are Meta's. HF's Llama stores q/k rows in rotate-half order; Meta (and GGUF) in interleaved
pairs. Every other tensor is the same matrix under another name.
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

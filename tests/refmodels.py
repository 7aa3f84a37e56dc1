"""Tiny random reference checkpoints built with transformers, one per Llama variant (shared by the tests)."""

from __future__ import annotations

from pathlib import Path

import torch

# name -> LlamaConfig kwargs: Llama 2 MHA, Llama 3 GQA, 3.1 llama3 scaling, 3.2 tied embeddings with factor 32.
VARIANTS = {
    "llama2-mha": dict(num_attention_heads=4, num_key_value_heads=4, rope_theta=10000.0, vocab_size=256),
    "llama3-gqa": dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0, vocab_size=300),
    "llama3.1-scaled": dict(num_attention_heads=4, num_key_value_heads=1, rope_theta=500000.0, vocab_size=300,
                            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "llama3.2-tied": dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0, vocab_size=300,
                          tie_word_embeddings=True,
                          rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
}


def make_hf_model(variant: str, seed: int = 0):
    """A tiny random transformers LlamaForCausalLM (2 layers, dim 64) with well-separated logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, max_position_embeddings=256,
              rms_norm_eps=1e-5, initializer_range=0.3, bos_token_id=1, eos_token_id=2)
    kw.update(VARIANTS[variant])
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**kw)).eval()
    return model


def save_hf_model(variant: str, folder: Path, seed: int = 0):
    model = make_hf_model(variant, seed)
    model.save_pretrained(folder)
    return model

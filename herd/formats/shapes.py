"""The tensors a config implies, by herd name and shape, and the one checker every reader and writer runs.

Dense Llama and Llama 4 (MoE layers, shared expert) share one table: a dense layer is the special case of a config
without experts. The order of the names is the order writers emit tensors (attention_norm first, as llama.cpp's
converter does).

Floor 6 (formats); imports herd.config and herd.errors only.
"""

from __future__ import annotations

from typing import Any, Iterable

from herd.config import ModelConfig
from herd.errors import FormatError


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """herd name -> shape of every weight of a text model (output.weight only when untied)."""
    D, hd, V = config.dim, config.head_dim, config.vocab_size
    q, kv = config.n_heads * hd, config.n_kv_heads * hd
    shapes = {"tok_embeddings.weight": (V, D), "norm.weight": (D,)}
    if not config.tie_embeddings:
        shapes["output.weight"] = (V, D)
    for i in range(config.n_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "attention_norm.weight": (D,), p + "ffn_norm.weight": (D,),
            p + "attention.wq.weight": (q, D), p + "attention.wk.weight": (kv, D),
            p + "attention.wv.weight": (kv, D), p + "attention.wo.weight": (D, q),
        })
        if config.is_moe_layer(i):  # router_DE (D, E); experts w1/w3 (E, D, F), w2 (E, F, D); see models/moe.py
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


def _listed(names: list[str]) -> str:
    return f"{names[:6]}{'...' if len(names) > 6 else ''}"


def check_tensors(sd: dict[str, Any], shapes: dict[str, tuple[int, ...]], where: str,
                  optional: Iterable[str] = ()) -> None:
    """Every name of `shapes` present in `sd` with its shape, nothing else but the `optional` names; FormatError
    naming the tensor otherwise."""
    missing = sorted(set(shapes) - set(sd))
    extra = sorted(set(sd) - set(shapes) - set(optional))
    if missing or extra:
        raise FormatError(f"{where}: tensors do not match the config: missing {_listed(missing)}, "
                          f"unexpected {_listed(extra)}")
    for name, shape in shapes.items():
        if tuple(sd[name].shape) != tuple(shape):
            raise FormatError(f"{where}: tensor {name} has shape {tuple(sd[name].shape)}, the config expects "
                              f"{tuple(shape)}")


def check_state_dict(sd: dict[str, Any], config: ModelConfig, where: str) -> None:
    """A text model's state dict against its config (`rope.freqs`, GGUF's own rope divisors, may come along)."""
    check_tensors(sd, expected_shapes(config), where, optional=("rope.freqs",))

"""A Transformer whose linear layers (and tied embedding) stay in their GGUF block formats."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from herd.config import ModelConfig
from herd.errors import FormatError
from herd.ops.rope import inv_frequencies


class QuantEmbedding(nn.Module):
    """Token lookup from a quantized (V, D) table: dequantizes only the rows asked for."""

    def __init__(self, table):
        super().__init__()
        self.table = table  # a QuantLinear; shared with the output layer when the embeddings are tied
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table.embedding(ids)


def build_quantized_model(config: ModelConfig, state_dict: dict) -> nn.Module:
    """Model from load_gguf(..., keep_quantized=True): GGUFTensor entries become QuantLinear layers, holding the
    file's blocks as they are; float tensors (norms) are assigned. Nothing is dequantized up front."""
    from herd.formats.gguf import GGUFTensor
    from herd.models.llama import Transformer
    from herd.quant.linear import QuantLinear

    with torch.device("meta"):
        model = Transformer(config)
    floats = {}
    for name, t in state_dict.items():
        if not isinstance(t, GGUFTensor):
            floats[name] = t
            continue
        out_f, in_f = (int(s) for s in t.shape)
        layer = QuantLinear.from_blocks(np.asarray(t.data), t.ggml_type, out_f, in_f)
        if name == "tok_embeddings.weight":
            model.tok_embeddings = QuantEmbedding(layer)
            if config.tie_embeddings:
                model.output = layer
            continue
        module_name = name.removesuffix(".weight")
        try:
            parent = model.get_submodule(module_name.rpartition(".")[0]) if "." in module_name else model
            current = model.get_submodule(module_name)
        except AttributeError:
            raise FormatError(f"tensor {name!r} has no linear layer in the model") from None
        if not isinstance(current, nn.Linear) or (current.out_features, current.in_features) != (out_f, in_f):
            raise FormatError(f"tensor {name!r} of shape {(out_f, in_f)} does not fit layer {module_name}")
        setattr(parent, module_name.rpartition(".")[2], layer)
    if config.tie_embeddings and not isinstance(model.tok_embeddings, QuantEmbedding):
        floats.setdefault("output.weight", floats.get("tok_embeddings.weight"))
    expected = {k for k, v in model.state_dict(keep_vars=True).items() if v.is_meta}
    missing = sorted(expected - set(floats))
    if missing:
        raise FormatError(f"checkpoint lacks tensors {missing[:8]}")
    model.load_state_dict({k: floats[k].float() for k in expected}, strict=False, assign=True)
    if config.tie_embeddings and isinstance(model.output, nn.Linear):
        model.tie_weights()
    model.inv_freq = inv_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()

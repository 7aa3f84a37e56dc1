"""Quantized models, whole: the module swaps that turn a float Llama (or a GGUF state dict still in blocks) into one
whose linear layers, embedding and Llama 4 experts hold ggml blocks, and attach the native decode step.

Floor: quant/ sits above models/ (it imports the model classes to swap their modules) and below formats/ and the
engine; nothing here reads a file. Every entry point ends in decode.attach(model): the engine then drives the C
decode step through model.decode_step, without importing quant.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from herd.errors import ConfigError, FormatError
from herd.quant import decode
from herd.quant.blocks import type_name
from herd.quant.experts import QuantExperts, load_gguf_experts
from herd.quant.linear import QUANT_TYPES, SCHEMES, QuantEmbedding, QuantLinear


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantize_model(model: nn.Module, scheme: str = "q4_1", include: str | Callable[[str], bool] | None = None,
                   exclude: str | Callable[[str], bool] | None = None, act: str | None = None,
                   threads: int | None = None) -> list[str]:
    """Swap every nn.Linear whose qualified name matches `include` (regex or predicate; default all) and not
    `exclude` for a QuantLinear of `scheme`, and every such Llama 4 Experts module for a QuantExperts. Layers whose
    in_features the scheme cannot split are left as they are. Returns the names swapped."""
    from herd.models.moe import Experts

    qk = QUANT_TYPES[scheme.upper()][1] if scheme.upper() in QUANT_TYPES else None
    if qk is None or scheme.lower() not in SCHEMES:
        raise ConfigError(f"unknown quantization scheme {scheme!r} (choose from {', '.join(SCHEMES)})")

    def matches(rule, name, default):
        if rule is None:
            return default
        return rule(name) if callable(rule) else re.search(rule, name) is not None

    swapped = []
    for name, mod in list(model.named_modules()):
        if type(mod) is Experts and QuantExperts.fits(mod.w1.shape[1], mod.w1.shape[2], scheme, scheme, scheme) \
                and matches(include, name, True) and not matches(exclude, name, False):
            _set_module(model, name, QuantExperts.from_experts(mod, scheme, act=act, threads=threads))
            swapped.append(name)
        if type(mod) is not nn.Linear or mod.in_features % qk:
            continue
        if matches(include, name, True) and not matches(exclude, name, False):
            _set_module(model, name, QuantLinear.from_linear(mod, scheme, act=act, threads=threads))
            swapped.append(name)
    decode.attach(model)
    return swapped


def load_quantized_linears(model: nn.Module, gguf_tensors: dict, act: str | None = None,
                           threads: int | None = None, strict: bool = True) -> list[str]:
    """For each `name -> (raw uint8, ggml_type, shape)` of a quantized type, with name a Linear weight of the model
    ("layers.0.attention.wq.weight") and shape its torch-order (out, in), put a QuantLinear holding those blocks in
    place of the Linear. Float tensors are skipped (load them with the state dict). Returns the modules swapped."""
    swapped = []
    for name, (raw, ggml_type, shape) in gguf_tensors.items():
        if type_name(ggml_type) not in QUANT_TYPES:
            continue
        mod_name = name[:-len(".weight")] if name.endswith(".weight") else name
        try:
            mod = model.get_submodule(mod_name)
        except AttributeError:
            mod = None
        if not isinstance(mod, (nn.Linear, QuantLinear)):
            if strict:
                raise FormatError(f"tensor {name!r}: no nn.Linear named {mod_name!r} in the model")
            continue
        out_f, in_f = (int(s) for s in shape)
        if (out_f, in_f) != (mod.out_features, mod.in_features):
            raise FormatError(f"tensor {name!r}: shape {(out_f, in_f)} but the model's layer is "
                              f"({mod.out_features}, {mod.in_features})")
        bias = mod.bias.detach() if getattr(mod, "bias", None) is not None else None
        _set_module(model, mod_name, QuantLinear.from_blocks(raw, ggml_type, out_f, in_f, bias=bias, act=act,
                                                             threads=threads))
        swapped.append(mod_name)
    return swapped


def build_quantized_model(config, state_dict: dict, act: str | None = None, threads: int | None = None,
                          dtype: torch.dtype | None = None) -> nn.Module:
    """A herd Transformer from a state dict (herd names) whose block-quantized 2-D entries are still GGUF tensors
    (objects with .data uint8, .ggml_type, .shape (out, in)), as `load_gguf(..., keep_quantized=True)` returns:
    each such Linear becomes a QuantLinear and such an Embedding a QuantEmbedding, both holding the blocks; a tied
    output layer multiplies by the embedding's blocks; Llama 4 experts given as 3-D GGUF tensors (GGUF layout
    (E, out, in)) become a QuantExperts (herd.quant.experts). Other quantized weights are dequantized."""
    from herd.models.llama import build_model

    floats = {n: t for n, t in state_dict.items() if isinstance(t, torch.Tensor)}
    quant = {n: t for n, t in state_dict.items() if not isinstance(t, torch.Tensor)}
    if dtype is None:
        dtype = next((t.dtype for t in floats.values() if t.is_floating_point()), torch.float32)
    # meta placeholders let the model's strict loader check names and shapes; the swaps below replace them
    # (3-D expert tensors: GGUF's (E, out, in) is herd's (E, in, out))
    placeholders = {n: torch.empty(tuple(int(d) for d in (t.shape if len(t.shape) != 3 else
                                                          (t.shape[0], t.shape[2], t.shape[1]))),
                                   dtype=dtype, device="meta") for n, t in quant.items()}
    model = build_model(config, {**floats, **placeholders}, dtype)
    for name in load_gguf_experts(model, quant, act=act, threads=threads):
        del quant[name]
    as_float = []  # "name (TYPE)" of the quantized tensors no quantized module holds
    for name, t in quant.items():
        mod_name = name[:-len(".weight")] if name.endswith(".weight") else name
        try:
            mod = model.get_submodule(mod_name)
        except AttributeError:  # a parameter, e.g. experts.w1 of types QuantExperts cannot hold
            mod = None
        tid, shape = int(t.ggml_type), tuple(int(d) for d in t.shape)
        if type(mod) is nn.Linear and type_name(tid) in QUANT_TYPES and shape[1] % QUANT_TYPES[type_name(tid)][1] == 0:
            bias = mod.bias.detach() if mod.bias is not None else None
            _set_module(model, mod_name, QuantLinear.from_blocks(t.data, tid, shape[0], shape[1], bias=bias, act=act,
                                                                 threads=threads))
        elif type(mod) is nn.Embedding and type_name(tid) in QUANT_TYPES:
            _set_module(model, mod_name, QuantEmbedding.from_blocks(t.data, tid, shape[0], shape[1], dtype))
        else:  # e.g. a router, a type or a shape the kernels cannot take: a float copy, never silently
            from herd.quant.blocks import dequantize

            as_float.append(f"{name} ({type_name(tid)})")
            w = torch.from_numpy(dequantize(np.asarray(t.data), tid, shape)).to(dtype)
            if w.dim() == 3:  # experts: GGUF (E, out, in) -> herd (E, in, out)
                w = w.transpose(1, 2).contiguous()
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, nn.Parameter(w, requires_grad=False))
    if as_float:
        more = f" and {len(as_float) - 10} more" if len(as_float) > 10 else ""
        warnings.warn(f"herd: {len(as_float)} quantized tensor(s) dequantized to float32, no quantized layer takes "
                      f"them: {', '.join(as_float[:10])}{more}", RuntimeWarning, stacklevel=2)
    if getattr(config, "tie_embeddings", False) and "output.weight" not in state_dict \
            and isinstance(getattr(model, "tok_embeddings", None), QuantEmbedding):
        model.output = model.tok_embeddings.as_linear(act=act, threads=threads)
    inv_freq = getattr(model, "inv_freq", None)
    if isinstance(inv_freq, torch.Tensor) and inv_freq.is_meta:  # derived on the embedding's (meta) device
        from herd.ops.rope import inv_frequencies

        model.inv_freq = inv_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise FormatError(f"quantized model: tensors {left[:8]} were not loaded")
    decode.attach(model)
    return model

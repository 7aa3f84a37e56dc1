"""The native decode step: every layer of a Llama model with quantized linear layers, for one new token per row, in
one C call (herd/quant/csrc/herd_decode.c) instead of ~40 small PyTorch operations per layer.

Attached from outside, like any module swap: `attach(model)` (done by quantize_model and build_quantized_model)
sets `model.decode_step`, a NativeDecodeStep; the engine calls it for each decode step and runs the model's own
forward when it answers None. It answers only when the model and cache qualify (`plan_for`): plain Llama layers
(RoPE, no QK-norm, no chunked attention, no MoE), all seven linear layers of every block QuantLinear without bias,
float32 norms and cache, no gradients. Anything else -- a paged or ring cache, bf16, LoRA, training -- runs the
PyTorch path. HERD_NO_NATIVE_DECODE=1 (or `model.decode_step.enabled = False`) turns it off. The results equal the
PyTorch path's up to float32 summation order (tests/test_fast_decode.py). The model itself knows nothing of this.
"""

from __future__ import annotations

import ctypes
import operator
import os
import weakref

import torch

from herd.errors import ConfigError
from herd.quant import native
from herd.quant.linear import QuantLinear

_P, _I64 = ctypes.c_void_p, ctypes.c_int64


class _Linear(ctypes.Structure):
    _fields_ = [("w", _P), ("type", _I64), ("mode", _I64), ("out_features", _I64)]


class _Layer(ctypes.Structure):
    _fields_ = [("attn_norm", _P), ("ffn_norm", _P)] \
        + [(n, _Linear) for n in ("wq", "wk", "wv", "wo", "w1", "w2", "w3")] + [("k_cache", _P), ("v_cache", _P)]


class _Model(ctypes.Structure):
    _fields_ = [(n, _I64) for n in ("dim", "n_heads", "n_kv_heads", "head_dim", "hidden", "n_layers")] \
        + [("eps", ctypes.c_double)] + [(n, _I64) for n in ("cache_rows", "cache_len", "row_stride")] \
        + [("inv_freq", _P), ("final_norm", _P), ("layers", _P)]


DISABLED = os.environ.get("HERD_NO_NATIVE_DECODE", "") not in ("", "0")


def _eligible(model) -> bool:
    from herd.models.llama import FeedForward, RMSNorm

    c = model.config
    if c.moe is not None or c.attention_chunk_size or c.use_qk_norm or c.nope_layer_interval:
        return False
    for block in model.layers:
        a, ff = block.attention, block.feed_forward
        if not (a.use_rope and a.qk_norm_eps is None and a.temperature is None and not a.chunk):
            return False
        if type(ff) is not FeedForward or type(block.attention_norm) is not RMSNorm:
            return False
        lins = (a.wq, a.wk, a.wv, a.wo, ff.w1, ff.w2, ff.w3)
        if any(type(l) is not QuantLinear or l.bias is not None or not l.weight.is_cpu
               or not l.weight.is_contiguous() for l in lins):
            return False
        if ff.w1.out_features != model.layers[0].feed_forward.w1.out_features:  # one hidden size in the C code
            return False
    norms = [n.weight for b in model.layers for n in (b.attention_norm, b.ffn_norm)] + [model.norm.weight]
    return all(w.dtype is torch.float32 and w.is_cpu and w.is_contiguous() for w in norms) \
        and model.inv_freq.dtype is torch.float32 and model.inv_freq.is_contiguous()


class DecodePlan:
    """The ctypes tables herd_llama_decode reads for one model: built once, holding references to every tensor it
    points to (so no pointer can dangle), and checked against the model's modules on every call."""

    def __init__(self, model):
        c = model.config
        self.model_tensors = []
        self.layers = (_Layer * c.n_layers)()
        for i, block in enumerate(model.layers):
            a, ff = block.attention, block.feed_forward
            L = self.layers[i]
            L.attn_norm = self._keep(block.attention_norm.weight)
            L.ffn_norm = self._keep(block.ffn_norm.weight)
            for name, lin in (("wq", a.wq), ("wk", a.wk), ("wv", a.wv), ("wo", a.wo), ("w1", ff.w1), ("w2", ff.w2),
                              ("w3", ff.w3)):
                setattr(L, name, _Linear(self._keep(lin.weight), lin.ggml_type, lin._mode, lin.out_features))
        self.threads = next((l.threads for b in model.layers for l in self._linears(b) if l.threads), None)
        self.spec = _Model(dim=c.dim, n_heads=c.n_heads, n_kv_heads=c.n_kv_heads, head_dim=c.head_dim,
                           hidden=model.layers[0].feed_forward.w1.out_features, n_layers=c.n_layers, eps=c.norm_eps,
                           inv_freq=self._keep(model.inv_freq), final_norm=self._keep(model.norm.weight),
                           layers=ctypes.addressof(self.layers))
        self.signature = _signature(model)
        self.cache = None  # weak reference to the KVCache whose buffers self.layers points to

    @staticmethod
    def _linears(block):
        a, ff = block.attention, block.feed_forward
        return (a.wq, a.wk, a.wv, a.wo, ff.w1, ff.w2, ff.w3)

    def _keep(self, t: torch.Tensor) -> int:
        if not t.is_contiguous():
            raise ConfigError("native decode needs contiguous weights")
        self.model_tensors.append(t)
        return t.data_ptr()

    def current(self, model) -> bool:
        """Whether the model still holds, at the same addresses and with the same activation modes, every tensor
        this plan points to (a module swap, load_state_dict(assign=True), .to() or .data = ... all show here)."""
        try:
            weights, modes, floats = _signature(model)
        except (KeyError, AttributeError, TypeError):  # a module swapped for one of another kind
            return False
        return all(map(operator.is_, weights, self.signature[0])) and modes == self.signature[1] \
            and floats == self.signature[2] and len(weights) == len(self.signature[0])

    def bind(self, cache) -> bool:
        """Point the layer tables at this cache's buffers (checked and done once per cache); False if the cache
        is not one the C code can use."""
        if self.cache is not None and self.cache() is cache:
            return True
        if not _cache_ok(cache):
            return False
        for i, L in enumerate(self.layers):
            L.k_cache, L.v_cache = cache.k[i].data_ptr(), cache.v[i].data_ptr()
        k0 = cache.k[0]
        self.spec.cache_rows, self.spec.cache_len, self.spec.row_stride = k0.shape[0], k0.shape[2], k0.stride(0)
        self.cache = weakref.ref(cache)
        return True

    def run(self, x: torch.Tensor, pos: torch.Tensor, cache, rows: torch.Tensor | None) -> torch.Tensor:
        """x (B, D) float32 contiguous, updated in place to the final-normed hidden state; pos, rows (B,) int64;
        the cache bound by bind()."""
        lib = native._lib
        rc = lib.herd_llama_decode(ctypes.addressof(self.spec), x.data_ptr(), x.shape[0], pos.data_ptr(),
                                   None if rows is None else rows.data_ptr(), self.threads or torch.get_num_threads())
        if rc:
            raise ConfigError(f"native decode failed (code {rc}): a position or cache row is outside the cache "
                              f"(positions {pos.tolist()}, rows {None if rows is None else rows.tolist()}, cache "
                              f"{self.spec.cache_rows} rows x {self.spec.cache_len} positions)")
        return x


def _signature(model) -> tuple:
    """What the plan depends on, cheap to recompute per call: each linear layer's weight buffer (by identity: a
    uint8 buffer is only ever replaced, never converted) and activation mode, and the address, dtype and
    requires_grad of each float tensor (a parameter may get new data in place, e.g. from .to()). Read through the
    modules' own dicts: nn.Module attribute lookup would cost more than the check is worth."""
    weights, modes, floats = [], [], []
    for block in model._modules["layers"]._modules.values():
        m = block._modules
        att, ff = m["attention"]._modules, m["feed_forward"]._modules
        for lin in (att["wq"], att["wk"], att["wv"], att["wo"], ff["w1"], ff["w2"], ff["w3"]):
            weights.append(lin._buffers["weight"])
            modes.append(lin.__dict__["_mode"])
        floats += (m["attention_norm"]._parameters["weight"], m["ffn_norm"]._parameters["weight"])
    floats += (model._buffers["inv_freq"], model._modules["norm"]._parameters["weight"])
    return weights, modes, [(t.data_ptr(), t.dtype, t.requires_grad) for t in floats]


def _cache_ok(cache) -> bool:
    from herd.models.kv_cache import KVCache

    if type(cache) is not KVCache or cache.window:
        return False
    k0 = cache.k[0]
    return (k0.dtype is torch.float32 and k0.is_cpu and k0[0].is_contiguous()
            and all(t.stride() == k0.stride() and t.shape == k0.shape for t in cache.k + cache.v))


def plan_for(model, cache) -> DecodePlan | None:
    """The model's native decode plan when this model and cache can take the native path, else None."""
    step = getattr(model, "decode_step", None)
    return step.plan_for(model, cache) if isinstance(step, NativeDecodeStep) else None


class NativeDecodeStep:
    """model.decode_step: step(model, tokens (B, 1), input_pos (B, 1), cache, rows (B,) | None) -> logits (B, 1, V),
    or None when this model and cache must take the PyTorch path. The model is passed in, not held: a copy of the
    model carries a copy of the step, and the plan is rebuilt for whichever model it is handed."""

    def __init__(self):
        self.enabled = True
        self.plan: DecodePlan | None = None

    def plan_for(self, model, cache) -> DecodePlan | None:
        if DISABLED or not self.enabled or torch.compiler.is_compiling():
            return None
        if not (native._lib if native._tried else native.load()):
            return None
        if self.plan is None or not self.plan.current(model):
            self.plan = DecodePlan(model) if _eligible(model) else None
        return self.plan if self.plan is not None and self.plan.bind(cache) else None

    def __call__(self, model, tokens: torch.Tensor, input_pos: torch.Tensor, cache, rows: torch.Tensor | None = None):
        plan = self.plan_for(model, cache)
        if plan is None:
            return None
        B = tokens.shape[0]
        h = model.tok_embeddings(tokens.reshape(B, 1))
        if h.dtype is not torch.float32 or h.requires_grad:
            return None
        x = h.reshape(B, -1).clone()  # (B, D), updated in place to the final-normed hidden state
        rows = None if rows is None else rows.reshape(B).to(torch.int64).contiguous()
        plan.run(x, input_pos.reshape(B).to(torch.int64).contiguous(), cache, rows)
        return model.output(x.view(B, 1, -1))


def attach(model) -> None:
    """Give a model whose linear layers are quantized its native decode step (model.decode_step); a model that does
    not qualify keeps running its PyTorch path (the step answers None), so attaching is always safe."""
    if not isinstance(getattr(model, "decode_step", None), NativeDecodeStep):
        model.decode_step = NativeDecodeStep()

"""The native decode step: every layer of a Llama model with quantized linear layers, for one new token per row, in
one C call (herd/quant/csrc/herd_decode.c) instead of ~40 small PyTorch operations per layer. The same step
prefills a prompt (NativeDecodeStep.prefill: the prompt's tokens are rows of one cache row, attended together),
with each token's attention that of decoding it alone.

Attached from outside, like any module swap: `attach(model)` (done by quantize_model and build_quantized_model)
sets `model.decode_step`, a NativeDecodeStep; the engine calls it for each decode step and runs the model's own
forward when it answers None. It answers only when the model and cache qualify (`plan_for`): plain Llama layers
(RoPE, no QK-norm, no chunked attention, no MoE), all seven linear layers of every block QuantLinear without bias,
float32 norms, a float32, float16 or q8_0 cache (a KVCache, or the scheduler's paged cache: a page pool per layer and a page table), no
gradients. Anything else -- a ring cache, bf16, LoRA, training -- runs the PyTorch path. HERD_NO_NATIVE_DECODE=1
(or `model.decode_step.enabled = False`) turns it off. The results equal the PyTorch path's up to float32 summation
order (tests/test_fast_decode.py, tests/test_paged_decode.py). Over a paged cache the linear layers run on the rows
padded to the kernels' row granule, so that a row's bits do not depend on its batch (the scheduler's promise); the
output layer keeps that promise below linear.F32_GEMM_MIN_ROWS padded rows in float mode, where it switches to
torch's GEMM. The model itself knows nothing of this.
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
        + [("inv_freq", _P), ("final_norm", _P), ("layers", _P), ("page_table", _P)] \
        + [(n, _I64) for n in ("table_stride", "page_size", "n_pages", "row_align", "kv_type", "kv_vec_bytes")]


# KV cache types the C step reads and writes (HD_KV_* in herd_decode.c): storage dtype and bytes per head vector
_KV_CODES = {"f32": (0, torch.float32, lambda hd: 4 * hd), "f16": (1, torch.float16, lambda hd: 2 * hd),
             "q8_0": (2, torch.uint8, lambda hd: hd // 32 * 34)}


def _kv_code(cache, hd: int) -> tuple[int, int] | None:
    """(HD_KV_* code, bytes per stored head vector) of this cache's buffers, or None if the C step cannot read them."""
    code, dtype, nbytes = _KV_CODES.get(getattr(cache, "kv_type", "f32"), (None, None, None))
    k0 = cache.k[0]
    if code is None or k0.dtype is not dtype or k0.shape[-1] * k0.element_size() != nbytes(hd):
        return None
    return code, nbytes(hd)


_ERR_PAGE = -3  # HD_ERR_PAGE in herd_decode.c
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
        self._block0 = model.layers[0]
        self.spec = _Model(dim=c.dim, n_heads=c.n_heads, n_kv_heads=c.n_kv_heads, head_dim=c.head_dim,
                           hidden=model.layers[0].feed_forward.w1.out_features, n_layers=c.n_layers, eps=c.norm_eps,
                           inv_freq=self._keep(model.inv_freq), final_norm=self._keep(model.norm.weight),
                           layers=ctypes.addressof(self.layers))
        self.signature = _signature(model)
        self.cache = None  # weak reference to the cache whose buffers self.layers points to
        self.cache_ptrs = ()  # the addresses bound: a buffer replaced in the same cache object binds again
        self.output = model.output  # measured by row_granule() with the blocks' layers
        self._granule: int | None = None  # row_granule(), measured on first use

    @staticmethod
    def _linears(block):
        a, ff = block.attention, block.feed_forward
        return (a.wq, a.wk, a.wv, a.wo, ff.w1, ff.w2, ff.w3)

    def _keep(self, t: torch.Tensor) -> int:
        if not t.is_contiguous():
            raise ConfigError("native decode needs contiguous weights")
        self.model_tensors.append(t)
        return t.data_ptr()

    def row_granule(self) -> int:
        """Smallest g such that herd_q_matmul gives every row the same bits for every row count that is a multiple
        of g, for each kind of linear layer of this model (the kernels change with the row count: fewer than 4 rows
        take another path in float mode, one row in the integer modes); measured once, on 16 weight rows. 0 if none
        up to 8 does."""
        if self._granule is None:
            lins = [*self._linears(self._block0), *([self.output] if type(self.output) is QuantLinear else [])]
            kinds = {(l.ggml_type, l._mode, l.in_features): l for l in lins}
            self._granule = max(_matmul_granule(l) for l in kinds.values())
        return self._granule

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
        if self.cache is not None and self.cache() is cache and self.cache_ptrs == _cache_ptrs(cache):
            return True
        paged = _is_paged(cache)
        if not (_paged_ok(cache) if paged else _cache_ok(cache)):
            return False
        for i, L in enumerate(self.layers):
            L.k_cache, L.v_cache = cache.k[i].data_ptr(), cache.v[i].data_ptr()
        k0, spec = cache.k[0], self.spec
        code = _kv_code(cache, spec.head_dim)
        if code is None:  # vectors of another width than this model's heads
            return False
        spec.kv_type, spec.kv_vec_bytes = code
        if paged:  # pools (n_pages, P, KV, hd), table (rows, pages_per_row)
            t = cache.table
            spec.cache_rows, spec.cache_len, spec.row_stride = t.shape[0], t.shape[1] * k0.shape[1], 0
            spec.page_table, spec.table_stride, spec.page_size, spec.n_pages = t.data_ptr(), t.stride(0), \
                k0.shape[1], k0.shape[0]
            # the scheduler promises batch invariance: pad the linear layers' rows to the kernels' granule
            spec.row_align = self.row_granule()
        else:  # (rows, KV, S, hd); BatchRun promises no invariance: no padding, no extra work
            spec.cache_rows, spec.cache_len, spec.row_stride = k0.shape[0], k0.shape[2], k0.stride(0) // k0.shape[3]
            spec.page_table, spec.table_stride, spec.page_size, spec.n_pages, spec.row_align = None, 0, 0, 0, 0
        self.cache, self.cache_ptrs = weakref.ref(cache), _cache_ptrs(cache)
        return True

    def run(self, x: torch.Tensor, pos: torch.Tensor, cache, rows: torch.Tensor | None) -> torch.Tensor:
        """x (B, D) float32 contiguous, updated in place to the final-normed hidden state; pos, rows (B,) int64;
        the cache bound by bind()."""
        lib = native._lib
        rc = lib.herd_llama_decode(ctypes.addressof(self.spec), x.data_ptr(), x.shape[0], pos.data_ptr(),
                                   None if rows is None else rows.data_ptr(), self.threads or torch.get_num_threads())
        if rc:
            what = "a page id in the page table is outside the page pool" if rc == _ERR_PAGE else \
                "a position or cache row is outside the cache"
            raise ConfigError(f"native decode failed (code {rc}): {what} (positions {pos.tolist()}, rows "
                              f"{None if rows is None else rows.tolist()}, cache {self.spec.cache_rows} rows x "
                              f"{self.spec.cache_len} positions" + (f", {self.spec.n_pages} pages of "
                              f"{self.spec.page_size})" if self.spec.page_table else ")"))
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


def _matmul_granule(lin: QuantLinear, max_rows: int = 24) -> int:
    """row_granule() for one linear layer's weight type, activation mode and input size (on its first weight rows)."""
    n, k = min(lin.out_features, 16), lin.in_features
    x = torch.randn(max_rows, k, generator=torch.Generator().manual_seed(0))
    ys = {}
    for m in range(1, max_rows + 1):
        ys[m] = torch.empty(m, n)
        rc = native._lib.herd_q_matmul(x.data_ptr(), m, k, lin.weight.data_ptr(), lin.ggml_type, n, ys[m].data_ptr(),
                                       lin._mode, -1, 1)
        if rc:
            return 0
    for g in (1, 2, 4, 8):
        if all(torch.equal(ys[m], ys[max_rows][:m]) for m in range(g, max_rows + 1, g)):
            return g
    return 0


def _cache_ok(cache) -> bool:
    from herd.models.kv_cache import KVCache

    if type(cache) is not KVCache or cache.window:
        return False
    k0 = cache.k[0]
    return (_kv_code(cache, cache_head_dim(cache)) is not None and k0.is_cpu and k0[0].is_contiguous()
            and k0.stride(0) % k0.shape[3] == 0
            and all(t.stride() == k0.stride() and t.shape == k0.shape and t.dtype is k0.dtype for t in cache.k + cache.v))


def _is_paged(cache) -> bool:
    """The scheduler's PagedKVCache (herd/engine/scheduler.py), known by its shape rather than imported: the engine
    floor sits above this one."""
    return isinstance(getattr(cache, "table", None), torch.Tensor) and hasattr(cache, "page_size")


def _paged_ok(cache) -> bool:
    """Pools (n_pages, P, KV, hd) float32 (or f16 / q8_0 storage), CPU, contiguous, all of one shape; table (rows,
    pages) int64 on the CPU with unit stride along a row; no ring layers."""
    if getattr(cache, "window", 0):
        return False
    k0, t = cache.k[0], cache.table
    return (k0.dim() == 4 and k0.shape[1] == cache.page_size and _kv_code(cache, cache_head_dim(cache)) is not None
            and k0.is_cpu
            and all(b.is_contiguous() and b.shape == k0.shape and b.dtype is k0.dtype for b in cache.k + cache.v)
            and t.dim() == 2 and t.dtype is torch.int64 and t.is_cpu and t.stride(1) == 1)


def cache_head_dim(cache) -> int:
    """The head dimension of a cache's vectors (its storage width for f32 / f16; 32 values per 34 bytes for q8_0)."""
    w = cache.k[0].shape[-1]
    return w // 34 * 32 if getattr(cache, "kv_type", "f32") == "q8_0" else w


def _cache_ptrs(cache) -> tuple:
    """The addresses a bound plan points to (the table's, and each layer's buffers'): cheap to compare per call."""
    table = getattr(cache, "table", None)
    return (table.data_ptr() if isinstance(table, torch.Tensor) else 0,) + tuple(b.data_ptr() for b in cache.k + cache.v)


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

    def batch_invariant(self, model, cache) -> bool:
        """Whether this step takes this cache and gives each row the same bits whatever the batch (a paged cache,
        rows padded inside to the kernels' granule, attention over exactly each row's keys): the scheduler then
        adds no padding rows of its own."""
        plan = self.plan_for(model, cache)
        return plan is not None and plan.spec.row_align > 0

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
        return _output(model, plan, x)

    def prefill(self, model, tokens: torch.Tensor, input_pos: torch.Tensor, cache, rows: torch.Tensor | None = None,
                chunk: int = 0):
        """A prompt (1, T) at input_pos (1, T) into one cache row (rows (1,), default row 0) through the same C step,
        `chunk` tokens a call (0: all): logits (1, 1, V) of the last token, or None when this model and cache must
        take the PyTorch path. The step attends the tokens of one row together (herd_decode.c,
        hd_attend_tokens_avx512), with each token's arithmetic that of decoding it alone; with integer activations
        (the default; their kernels give a row the same bits in any batch) a prefilled prompt therefore leaves the
        cache and the hidden states bit for bit as decoding it token by token would."""
        plan = self.plan_for(model, cache)
        if plan is None or tokens.shape[0] != 1:
            return None
        T = tokens.shape[1]
        h = model.tok_embeddings(tokens.reshape(1, T))[0]
        if h.dtype is not torch.float32 or h.requires_grad:
            return None
        pos = input_pos.reshape(T).to(torch.int64)
        row = 0 if rows is None else int(rows.reshape(-1)[0])
        step = chunk if 0 < chunk < T else T
        for a in range(0, T, step):
            x = h[a:a + step].contiguous()  # (n, D), updated in place
            plan.run(x, pos[a:a + step].contiguous(), cache, torch.full((x.shape[0],), row, dtype=torch.int64))
        return _output(model, plan, x[-1:])


def _output(model, plan: DecodePlan, x: torch.Tensor) -> torch.Tensor:
    """Logits (B, 1, V) of the final-normed hidden states x (B, D): the output layer on the same padded row count as
    the plan's layers (batch invariance), the padding rows dropped."""
    B, g = x.shape[0], plan.spec.row_align
    if g > 1 and B % g:
        x = torch.cat((x, x.new_zeros(g - B % g, x.shape[1])))
    return model.output(x[:, None])[:B]


def attach(model) -> None:
    """Give a model whose linear layers are quantized its native decode step (model.decode_step); a model that does
    not qualify keeps running its PyTorch path (the step answers None), so attaching is always safe."""
    if not isinstance(getattr(model, "decode_step", None), NativeDecodeStep):
        model.decode_step = NativeDecodeStep()

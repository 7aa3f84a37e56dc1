"""Quantized linear layers: GGML blocks held as stored in GGUF (uint8, no float copy), multiplied by native kernels.

`QuantLinear` replaces `nn.Linear` by module swap (`quantize_model`, `load_quantized_linears`); the model class is
untouched. Weight formats: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS (layouts:
SPEC.md §4 and herd/quant/blocks.py). A C library built before a type was added lacks it: that type then takes the
PyTorch path (`_has_native`).

Three arithmetic modes (`act=`), each in the C kernels (herd/quant/csrc) and in the PyTorch fallback:
  "int16" (default): activations rounded per row and 32-element block to int16 with a float32 scale
          (d = max|x| / 32767, q = round-half-even(x / d)), integer dot products with the weight values
          (VNNI vpdpwssd / pmaddwd), then the scales. Error ~1/258 of int8's: mean KL from float32 on the default
          model ~1e-7 (llama.cpp's own: ~3e-3); decode speed within ~15% of int8 on one core, and both are bound by
          memory bandwidth on two.
  "int8": the same with int8 activations (d = max|x| / 127) -- llama.cpp's arithmetic; the fastest (prefill about
          2x int16), KL about llama.cpp's.
  "f32":  float32 activations, each weight block dequantized in registers (equal to dequantize-then-matmul up to
          float rounding); half the decode speed of the integer modes.
The fallback reproduces the kernels' integer rounding of activations bit for bit. Measurements: see
benchmarks/bench_kernels.py (speed per layer and mode, `--kl` for the error on the default model).

Paths: native ctypes call in eager mode (a few microseconds of overhead per call); `torch.ops.herd.quant_linear`
(a torch.library op with a fake implementation) under torch.compile or when x needs a gradient; the pure PyTorch
fallback when the library is missing, HERD_NO_NATIVE=1, or the tensors are not on the CPU.
"""

from __future__ import annotations

import os
import weakref
from collections import OrderedDict
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from herd.errors import ConfigError, FormatError
from herd.quant import native
from herd.quant.blocks import GGML_TYPES, IQ4_NL_VALUES, type_name

# name -> (ggml type id, elements per block, bytes per block) of the formats the kernels multiply
QUANT_TYPES = {n: GGML_TYPES[n] for n in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                                          "Q6_K", "IQ4_NL", "IQ4_XS")}
_BY_ID = {tid: (name, qk, bs) for name, (tid, qk, bs) in QUANT_TYPES.items()}
SCHEMES = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k")  # what from_float can produce

ACT_MODES = {"f32": 0, "int8": 1, "int16": 2}
_ACT_BITS = {1: 8, 2: 16}
DEFAULT_ACT = os.environ.get("HERD_QUANT_ACT", "int16")
# float mode from this many rows on: dequantize (C, threaded) and call torch's GEMM (measured crossover)
F32_GEMM_MIN_ROWS = 32
# types the C library multiplies with its scalar kernels only (no SIMD yet): from F32_GEMM_MIN_ROWS rows on, in every
# mode, dequantize row tiles and use torch's GEMM (measured 2048 x 2048, 64 rows, one thread: 220 ms -> 60 ms)
_SCALAR_ONLY = frozenset(GGML_TYPES[n][0] for n in ("Q2_K", "Q3_K", "IQ4_NL", "IQ4_XS"))
_DEQUANT_CHUNK_ELEMS = 1 << 24  # float32 scratch per GEMM chunk: 64 MiB


def _type_info(ggml_type: int | str) -> tuple[int, str, int, int]:
    """(id, name, elements per block, bytes per block) of a type QuantLinear supports; FormatError otherwise."""
    if ggml_type in _BY_ID:
        name, qk, bs = _BY_ID[ggml_type]
        return ggml_type, name, qk, bs
    name = type_name(ggml_type)
    if name not in QUANT_TYPES:
        raise FormatError(f"QuantLinear cannot multiply ggml type {name} (supported: {', '.join(QUANT_TYPES)})")
    tid, qk, bs = QUANT_TYPES[name]
    return tid, name, qk, bs


_native_has: dict[int, bool] = {}  # ggml type id -> whether the loaded C library multiplies it


def _has_native(lib, tid: int) -> bool:
    """Whether the loaded C library handles this type (asked once per type: one library per process)."""
    ok = _native_has.get(tid)
    if ok is None:
        ok = _native_has[tid] = lib.herd_q_block_elems(tid) > 0
    return ok


# ---------------------------------------------------------------------------------------------------------------
# PyTorch reference / fallback: dequantize blocks, quantize activations

def _f16(b: torch.Tensor, start: int) -> torch.Tensor:
    """fp16 at byte `start` of every block -> float32 (B, 1)."""
    return b[:, start:start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    return torch.cat([qs & 0xF, qs >> 4], dim=-1)


def _bits32(qh: torch.Tensor) -> torch.Tensor:
    """(B, 4) bytes, a little-endian u32 -> (B, 32) with bit j at column j."""
    q = qh.to(torch.int64)
    word = q[:, 0] | (q[:, 1] << 8) | (q[:, 2] << 16) | (q[:, 3] << 24)
    return ((word[:, None] >> torch.arange(32, device=qh.device)) & 1).to(torch.uint8)


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lo, mid, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([lo & 63, (hi & 0xF) | ((lo >> 6) << 4)], dim=1)
    mn = torch.cat([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], dim=1)
    return sc.float(), mn.float()


_IQ4_VALUES = torch.from_numpy(IQ4_NL_VALUES.astype(np.float32))


def _two_bit_groups(qs: torch.Tensor) -> torch.Tensor:
    """Q2_K / Q3_K low bits: (B, 64) bytes -> (B, 8, 32); group 4h + s, element l is bits 2s, 2s+1 of qs[32h + l]."""
    shifts = (2 * torch.arange(4, device=qs.device, dtype=torch.uint8))[:, None]
    return ((qs.reshape(-1, 2, 1, 32) >> shifts) & 3).reshape(-1, 8, 32)


def _dq_blocks(b: torch.Tensor, name: str) -> torch.Tensor:
    """(B, block bytes) uint8 -> (B, block elems) float32. Same operations in the same order as blocks.py, so the
    same bits (layouts in blocks.py's _dq_* docstrings)."""
    B = b.shape[0]
    if name == "Q8_0":
        return _f16(b, 0) * b[:, 2:].contiguous().view(torch.int8).float()
    if name == "Q4_0":
        return _f16(b, 0) * (_nibbles(b[:, 2:]).float() - 8)
    if name == "Q4_1":
        return _f16(b, 0) * _nibbles(b[:, 4:]).float() + _f16(b, 2)
    if name == "Q5_0":
        return _f16(b, 0) * ((_nibbles(b[:, 6:]) | (_bits32(b[:, 2:6]) << 4)).float() - 16)
    if name == "Q5_1":
        return _f16(b, 0) * (_nibbles(b[:, 8:]) | (_bits32(b[:, 4:8]) << 4)).float() + _f16(b, 2)
    if name in ("Q4_K", "Q5_K"):
        sc, mn = _k_scales(b[:, 4:16])
        dsc, dmn = (_f16(b, 0) * sc)[:, :, None], (_f16(b, 2) * mn)[:, :, None]  # (B, 8, 1)
        qs = b[:, 16:].reshape(B, 4, 1, 32) if name == "Q4_K" else b[:, 48:].reshape(B, 4, 1, 32)
        q = torch.cat([qs & 0xF, qs >> 4], dim=2).reshape(B, 8, 32)  # sub-block 2c: low nibbles, 2c+1: high
        if name == "Q5_K":
            shifts = torch.arange(8, device=b.device, dtype=torch.uint8)[:, None]
            q = q | (((b[:, 16:48].reshape(B, 1, 32) >> shifts) & 1) << 4)
        return (dsc * q.float() - dmn).reshape(B, 256)
    if name == "Q6_K":
        ql = b[:, :128].reshape(B, 2, 64)
        qh = b[:, 128:192].reshape(B, 2, 1, 32)
        scales = b[:, 192:208].contiguous().view(torch.int8).float()  # one per 16 elements
        d = (_f16(b, 208) * scales)[:, :, None]
        low = torch.cat([ql & 0xF, ql >> 4], dim=2)  # (B, 2, 128)
        shifts = (2 * torch.arange(4, device=b.device, dtype=torch.uint8))[:, None]
        high = ((qh >> shifts) & 3).reshape(B, 2, 128)
        q = ((low | (high << 4)).float() - 32).reshape(B, 16, 16)
        return (d * q).reshape(B, 256)
    if name == "Q2_K":  # scales[16] | qs[64] | d | dmin; per 16 elements y = (d * sc) * q - dmin * m
        sc = b[:, :16]
        dl = (_f16(b, 80) * (sc & 0xF).float())[:, :, None]  # (B, 16, 1)
        ml = (_f16(b, 82) * (sc >> 4).float())[:, :, None]
        q = _two_bit_groups(b[:, 16:80]).reshape(B, 16, 16).float()
        return (dl * q - ml).reshape(B, 256)
    if name == "Q3_K":  # hmask[32] | qs[64] | scales[12] | d; q = low 2 bits - 4 where the hmask bit is clear
        s = b[:, 96:108]
        low = torch.cat([s[:, :8] & 0xF, s[:, :8] >> 4], dim=1)
        high = torch.cat([(s[:, 8:12] >> (2 * i)) & 3 for i in range(4)], dim=1)
        dl = (_f16(b, 108) * ((low | (high << 4)).float() - 32))[:, :, None]  # (B, 16, 1)
        bit = (b[:, :32].reshape(B, 1, 32) >> torch.arange(8, device=b.device, dtype=torch.uint8)[:, None]) & 1
        q = _two_bit_groups(b[:, 32:96]).float() - 4 * (1 - bit).float()  # (B, 8, 32)
        return (dl * q.reshape(B, 16, 16)).reshape(B, 256)
    if name == "IQ4_NL":  # d | qs[16]: y = d * IQ4_NL_VALUES[nibble]
        return _f16(b, 0) * _IQ4_VALUES.to(b.device)[_nibbles(b[:, 2:]).long()]
    if name == "IQ4_XS":  # d | scales_h u16 | scales_l[4] | qs[128]: per 32 elements (d * (ls - 32)) * value
        sl = b[:, 4:8]
        low = torch.stack([sl & 0xF, sl >> 4], dim=2).reshape(B, 8).long()
        sh = b[:, 2].long() | (b[:, 3].long() << 8)
        high = (sh[:, None] >> (2 * torch.arange(8, device=b.device))) & 3
        dl = (_f16(b, 0) * ((low | (high << 4)).float() - 32))[:, :, None]  # (B, 8, 1)
        qs = b[:, 8:].reshape(B, 8, 16)
        q = _IQ4_VALUES.to(b.device)[torch.cat([qs & 0xF, qs >> 4], dim=2).long()]
        return (dl * q).reshape(B, 256)
    raise FormatError(f"no dequantizer for {name}")


def dequantize_torch(raw: torch.Tensor, ggml_type: int | str, in_features: int) -> torch.Tensor:
    """(n, row bytes) uint8 blocks -> (n, in_features) float32, in PyTorch (the fallback; equals gguf-py's)."""
    _, name, qk, bs = _type_info(ggml_type)
    n = raw.shape[0]
    return _dq_blocks(raw.reshape(-1, bs), name).reshape(n, in_features)


def quantize_activations(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., k) -> q (..., k) int8 or int16, d float32 (..., k/32): the rounding the int8 / int16 kernels apply,
    bit for bit: per 32-element block d = max|x| / L (L = 127 or 32767), q = round-half-even(x * (1/d))."""
    k = x.shape[-1]
    if k % 32:
        raise ConfigError(f"quantized activations need a last dim multiple of 32, got {k}")
    if bits not in (8, 16):
        raise ConfigError(f"activation bits must be 8 or 16, got {bits}")
    lim = 127.0 if bits == 8 else 32767.0
    xb = x.float().reshape(*x.shape[:-1], k // 32, 32)
    d = xb.abs().amax(dim=-1, keepdim=True) / lim
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(xb * inv).clamp_(-lim, lim)
    return q.to(torch.int8 if bits == 8 else torch.int16).reshape(x.shape), d.squeeze(-1)


def fake_quantize_activations(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """x rounded to the integer grid the kernels use, back in float32: q * d."""
    q, d = quantize_activations(x, bits)
    k = x.shape[-1]
    return (q.float().reshape(*x.shape[:-1], k // 32, 32) * d[..., None]).reshape(x.shape)


# The fallback dequantizes a layer's blocks on every call; to keep it usable, the float weights it makes are
# cached (bounded by HERD_FALLBACK_CACHE_MB, least recently used first out; an entry goes when its blocks are freed
# or changed in place).
FALLBACK_CACHE_MB = float(os.environ.get("HERD_FALLBACK_CACHE_MB", "2048"))
_fallback_cache: OrderedDict = OrderedDict()  # id(raw) -> (raw._version, key, float weight)


def _fallback_weight(raw: torch.Tensor, tid: int, n: int, k: int) -> torch.Tensor:
    """dequantize_torch(raw), cached per blocks tensor."""
    key = id(raw)
    hit = _fallback_cache.get(key)
    if hit is not None and hit[0] == raw._version and hit[1] == (tid, n, k):
        _fallback_cache.move_to_end(key)
        return hit[2]
    w = dequantize_torch(raw.reshape(n, -1), tid, k)
    budget = FALLBACK_CACHE_MB * 2**20
    if w.numel() * 4 <= budget:
        if hit is None:
            weakref.finalize(raw, _fallback_cache.pop, key, None)
        _fallback_cache[key] = (raw._version, (tid, n, k), w)
        _fallback_cache.move_to_end(key)
        while sum(e[2].numel() * 4 for e in _fallback_cache.values()) > budget:
            _fallback_cache.popitem(last=False)
    return w


# ---------------------------------------------------------------------------------------------------------------
# native calls

_ERRORS = {-1: "unsupported ggml type", -2: "bad shape", -3: "instruction set not compiled in", -4: "bad mode",
           -5: "out of memory"}


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = MemoryError if rc == -5 else ConfigError
        raise err(f"herd native kernel {what}: {_ERRORS.get(rc, rc)}")


def _threads(threads: int | None) -> int:
    return threads if threads and threads > 0 else torch.get_num_threads()


def dequantize_native(raw: torch.Tensor, ggml_type: int, n: int, k: int, threads: int | None = None,
                      isa: int = -1) -> torch.Tensor:
    """(n, row bytes) uint8 -> (n, k) float32 with the C kernels (falls back to PyTorch without them)."""
    lib = native.load()
    if lib is None or not _has_native(lib, _type_info(ggml_type)[0]):
        return dequantize_torch(raw, ggml_type, k)
    raw = raw.contiguous()
    out = torch.empty((n, k), dtype=torch.float32)
    _check(lib.herd_q_dequantize(raw.data_ptr(), ggml_type, n, k, out.data_ptr(), isa, _threads(threads)),
           "dequantize")
    return out


def quant_matmul(x: torch.Tensor, raw: torch.Tensor, ggml_type: int, n: int, act: str | None = None,
                 threads: int | None = None, isa: int = -1, use_native: bool | None = None) -> torch.Tensor:
    """y (..., n) = x (..., k) . dequant(raw)^T in float32; `act` picks the arithmetic (module docstring; None =
    DEFAULT_ACT). use_native: None = the C kernels when loaded (CPU tensors), True = require them, False = the
    PyTorch fallback. isa: -1 = best compiled, 0 scalar, 1 AVX2, 2 AVX-512 (for tests and benchmarks)."""
    tid, name, qk, bs = _type_info(ggml_type)
    act = act or DEFAULT_ACT
    k = x.shape[-1]
    if k % qk or raw.numel() != n * (k // qk) * bs:
        raise ConfigError(f"{name} weight of {raw.numel()} bytes does not hold {n} rows of {k} inputs")
    if act not in ACT_MODES:
        raise ConfigError(f"act must be one of {list(ACT_MODES)}, got {act!r}")
    mode = ACT_MODES[act]
    lib = (native._lib if native._tried else native.load()) if use_native is not False else None
    if lib is not None and not (x.is_cpu and raw.is_cpu and _has_native(lib, tid)):
        lib = None
    x2 = x.reshape(-1, k)
    if lib is None:
        if use_native:
            why = native.load_error() or ("not a CPU tensor" if not (x.is_cpu and raw.is_cpu) else
                                          f"this build of the library lacks {name}")
            raise ConfigError(f"native kernels requested but unavailable ({why})")
        w = _fallback_weight(raw, tid, n, k)
        x2 = x2.float()
        y = F.linear(fake_quantize_activations(x2, _ACT_BITS[mode]) if mode else x2, w)
    else:
        if x2.dtype is not torch.float32 or not x2.is_contiguous():
            x2 = x2.float().contiguous()
        y = _native_matmul(lib, x2, raw.contiguous(), tid, n, k, mode, _threads(threads), isa)
    return y.reshape(*x.shape[:-1], n)


def _native_matmul(lib, x2: torch.Tensor, raw: torch.Tensor, tid: int, n: int, k: int, mode: int, threads: int,
                   isa: int = -1) -> torch.Tensor:
    """x2 (m, k) float32 contiguous, raw (n, row bytes) contiguous, both CPU and checked by the caller -> (m, n)."""
    m = x2.shape[0]
    if m >= F32_GEMM_MIN_ROWS and (mode == 0 or tid in _SCALAR_ONLY):
        if mode:  # the integer modes' rounding of x, then float products: equal up to float32 rounding
            x2 = fake_quantize_activations(x2, _ACT_BITS[mode])
        return _f32_gemm(x2, raw, tid, n, k, threads, isa)
    y = torch.empty(m, n)
    rc = lib.herd_q_matmul(x2.data_ptr(), m, k, raw.data_ptr(), tid, n, y.data_ptr(), mode, isa, threads)
    if rc:
        _check(rc, "matmul")
    return y


def _f32_gemm(x2: torch.Tensor, raw: torch.Tensor, tid: int, n: int, k: int, threads: int, isa: int) -> torch.Tensor:
    """Float mode, many rows: dequantize row chunks of W into float32 scratch and use torch's GEMM."""
    step = max(16, _DEQUANT_CHUNK_ELEMS // k)
    raw2 = raw.reshape(n, -1)
    if step >= n:
        return F.linear(x2, dequantize_native(raw2, tid, n, k, threads, isa))
    y = torch.empty((x2.shape[0], n), dtype=torch.float32)
    for r in range(0, n, step):
        rows = min(step, n - r)
        torch.mm(x2, dequantize_native(raw2[r:r + rows], tid, rows, k, threads, isa).t(), out=y[:, r:r + rows])
    return y


# ---------------------------------------------------------------------------------------------------------------
# torch.library op: used under torch.compile and for autograd (gradient with respect to x only)

_OPS = torch.library.Library("herd", "FRAGMENT")
_OPS.define("quant_linear(Tensor x, Tensor weight, int ggml_type, int out_features, int act, int threads) -> Tensor")
_ACT_NAMES = {v: k for k, v in ACT_MODES.items()}


def _op_cpu(x, weight, ggml_type, out_features, act, threads):
    return quant_matmul(x, weight, ggml_type, out_features, _ACT_NAMES[act], threads or None)


_OPS.impl("quant_linear", _op_cpu, "CPU")


@torch.library.register_fake("herd::quant_linear")
def _op_fake(x, weight, ggml_type, out_features, act, threads):
    return x.new_empty((*x.shape[:-1], out_features), dtype=torch.float32)


def _op_setup_context(ctx, inputs, output):
    x, weight, ggml_type, out_features, _, threads = inputs
    ctx.save_for_backward(weight)
    ctx.meta = (ggml_type, out_features, x.shape[-1], threads)


def _op_backward(ctx, grad):
    (weight,) = ctx.saved_tensors
    ggml_type, n, k, threads = ctx.meta
    w = dequantize_native(weight.reshape(n, -1), ggml_type, n, k, threads or None)
    return grad.float() @ w, None, None, None, None, None  # straight-through for the integer rounding of x


torch.library.register_autograd("herd::quant_linear", _op_backward, setup_context=_op_setup_context)


# ---------------------------------------------------------------------------------------------------------------
# the module

class QuantLinear(nn.Module):
    """y = x W^T (+ b) with W kept as GGML blocks: buffer `weight` (out_features, row bytes) uint8."""

    def __init__(self, in_features: int, out_features: int, ggml_type: int | str, bias: bool = False,
                 act: str | None = None, threads: int | None = None, device=None):
        super().__init__()
        tid, name, qk, bs = _type_info(ggml_type)
        if in_features <= 0 or in_features % qk:
            raise ConfigError(f"{name} needs in_features a positive multiple of {qk}, got {in_features}")
        if out_features <= 0:
            raise ConfigError(f"out_features must be positive, got {out_features}")
        self.in_features, self.out_features = in_features, out_features
        self.ggml_type, self.type_name = tid, name
        self.act, self.threads = act or DEFAULT_ACT, threads
        self._nbytes = out_features * (in_features // qk * bs)
        self.register_buffer("weight", torch.zeros((out_features, in_features // qk * bs), dtype=torch.uint8,
                                                   device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)

    @classmethod
    def from_blocks(cls, raw: torch.Tensor | np.ndarray, ggml_type: int | str, out_features: int, in_features: int,
                    bias: torch.Tensor | None = None, **kwargs) -> "QuantLinear":
        """Wrap raw GGML bytes (as read from a GGUF tensor) of an (out_features, in_features) weight."""
        layer = cls(in_features, out_features, ggml_type, bias=bias is not None, device="meta", **kwargs)
        shape = (out_features, layer.weight.shape[1])
        if isinstance(raw, np.ndarray):
            arr = raw.reshape(-1).view(np.uint8) if raw.dtype != np.uint8 else raw.reshape(-1)
            raw = torch.from_numpy(arr if arr.flags.writeable else arr.copy())
        if raw.dtype != torch.uint8:
            raise FormatError(f"{layer.type_name} blocks must be uint8 bytes, got {raw.dtype}")
        if raw.numel() != shape[0] * shape[1]:
            raise FormatError(f"{layer.type_name} weight ({out_features}, {in_features}) needs "
                              f"{shape[0] * shape[1]} bytes, got {raw.numel()}")
        layer.weight = raw.reshape(shape).contiguous()
        if bias is not None:
            layer.bias = bias.detach().float().reshape(out_features).contiguous()
        return layer

    @classmethod
    def from_float(cls, weight: torch.Tensor, scheme: str = "q4_1", bias: torch.Tensor | None = None,
                   **kwargs) -> "QuantLinear":
        """Quantize a float (out, in) weight to a GGML block scheme: q8_0, q4_0, q4_1, q5_0, q5_1 or q4_k."""
        if scheme.lower() not in SCHEMES:
            raise ConfigError(f"unknown quantization scheme {scheme!r} (choose from {', '.join(SCHEMES)})")
        w = weight.detach().float().cpu().numpy()
        raw = quantize_weight(w, scheme)
        return cls.from_blocks(raw, scheme.upper(), w.shape[0], w.shape[1], bias=bias, **kwargs)

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: str = "q4_1", **kwargs) -> "QuantLinear":
        return cls.from_float(linear.weight, scheme, bias=linear.bias, **kwargs)

    @classmethod
    def concat(cls, layers: Iterable["QuantLinear"], **kwargs) -> "QuantLinear":
        """One layer computing the outputs of several (same type and in_features) side by side, e.g. wq|wk|wv."""
        layers = list(layers)
        first = layers[0]
        for l in layers[1:]:
            if (l.ggml_type, l.in_features) != (first.ggml_type, first.in_features):
                raise ConfigError("QuantLinear.concat needs the same ggml type and in_features in every layer")
        bias = None
        if any(l.bias is not None for l in layers):
            bias = torch.cat([l.bias if l.bias is not None else torch.zeros(l.out_features) for l in layers])
        kwargs.setdefault("act", first.act)
        kwargs.setdefault("threads", first.threads)
        return cls.from_blocks(torch.cat([l.weight for l in layers]), first.ggml_type,
                               sum(l.out_features for l in layers), first.in_features, bias=bias, **kwargs)

    @property
    def act(self) -> str:
        return self._act

    @act.setter
    def act(self, value: str) -> None:
        if value not in ACT_MODES:
            raise ConfigError(f"act must be one of {list(ACT_MODES)}, got {value!r}")
        self._act, self._mode = value, ACT_MODES[value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self._buffers["weight"]  # (cheaper than the nn.Module attribute lookup)
        if torch.compiler.is_compiling():  # an opaque op in the graph; the library is loaded when it runs
            lib = None
        else:
            lib = native._lib if native._tried else native.load()
        if (lib is not None and x.dtype is torch.float32 and x.is_cpu and w.is_cpu and w.is_contiguous()
                and w.numel() == self._nbytes and _has_native(lib, self.ggml_type)
                and not (x.requires_grad and torch.is_grad_enabled())):
            # eager fast path: one ctypes call (~5 us of overhead in all)
            k, n = self.in_features, self.out_features
            if x.shape[-1] != k:
                raise ConfigError(f"QuantLinear expects {k} input features, got shape {tuple(x.shape)}")
            if not x.is_contiguous():
                x = x.contiguous()
            if x.dim() == 2:
                y = _native_matmul(lib, x, w, self.ggml_type, n, k, self._mode, self.threads or torch.get_num_threads())
            else:
                y = _native_matmul(lib, x.view(-1, k), w, self.ggml_type, n, k, self._mode,
                                   self.threads or torch.get_num_threads()).view(*x.shape[:-1], n)
        elif x.is_cpu and (torch.compiler.is_compiling() or (x.requires_grad and torch.is_grad_enabled())):
            y = torch.ops.herd.quant_linear(x, w, self.ggml_type, self.out_features, self._mode, self.threads or 0)
        else:
            y = quant_matmul(x, w, self.ggml_type, self.out_features, self._act, self.threads)
        bias = self._buffers["bias"]
        if bias is not None:
            y = y + bias
        return y if x.dtype is torch.float32 or not x.is_floating_point() else y.to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        """The float32 (out_features, in_features) weight."""
        return dequantize_native(self.weight, self.ggml_type, self.out_features, self.in_features, self.threads)

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of the dequantized weight, (*ids.shape, in_features): the tied token embedding."""
        return QuantEmbedding.from_blocks(self.weight, self.ggml_type, self.out_features, self.in_features)(ids)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, type={self.type_name}, "
                f"act={self.act}, bias={self.bias is not None}")


class QuantEmbedding(nn.Module):
    """Token embedding read from a GGML-block table: buffer `weight` (num_embeddings, row bytes) uint8; forward
    dequantizes only the looked-up rows. A tied output layer shares the same buffer (QuantLinear)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, ggml_type: int | str, dtype=torch.float32,
                 device=None):
        super().__init__()
        tid, name, qk, bs = _type_info(ggml_type)
        if embedding_dim <= 0 or embedding_dim % qk:
            raise ConfigError(f"{name} needs embedding_dim a positive multiple of {qk}, got {embedding_dim}")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.ggml_type, self.type_name, self.dtype = tid, name, dtype
        self.register_buffer("weight", torch.zeros((num_embeddings, embedding_dim // qk * bs), dtype=torch.uint8,
                                                   device=device))

    @classmethod
    def from_blocks(cls, raw: torch.Tensor | np.ndarray, ggml_type: int | str, num_embeddings: int,
                    embedding_dim: int, dtype=torch.float32) -> "QuantEmbedding":
        emb = cls(num_embeddings, embedding_dim, ggml_type, dtype, device="meta")
        emb.weight = QuantLinear.from_blocks(raw, ggml_type, num_embeddings, embedding_dim).weight
        return emb

    def as_linear(self, **kwargs) -> QuantLinear:
        """The tied output layer: a QuantLinear over the same blocks (no copy)."""
        return QuantLinear.from_blocks(self.weight, self.ggml_type, self.num_embeddings, self.embedding_dim, **kwargs)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1).to(torch.int64).contiguous()
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings):
            raise ConfigError(f"token ids out of range [0, {self.num_embeddings})")
        w = self.weight
        lib = native._lib if native._tried else native.load()
        if lib is None or not w.is_cpu or not _has_native(lib, self.ggml_type):
            out = dequantize_torch(w[flat.to(w.device)], self.ggml_type, self.embedding_dim)
        else:
            out = torch.empty((flat.numel(), self.embedding_dim), dtype=torch.float32)
            _check(lib.herd_q_dequantize_rows(w.data_ptr(), self.ggml_type, self.embedding_dim, flat.data_ptr(),
                                              flat.numel(), out.data_ptr(), _threads(None)), "dequantize_rows")
        out = out.reshape(*ids.shape, self.embedding_dim)
        return out if self.dtype == torch.float32 else out.to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, type={self.type_name}"


# ---------------------------------------------------------------------------------------------------------------
# quantizers (float -> GGML blocks) and model-level swaps

def quantize_weight(w: np.ndarray, scheme: str) -> np.ndarray:
    """float32 (out, in) -> (out, row bytes) uint8 blocks of `scheme` (ggml's reference rounding, q4_k: ours)."""
    from herd.quant import blocks

    name = scheme.upper()
    if name == "Q4_K":
        return quantize_q4_k(w)
    return blocks.quantize(np.ascontiguousarray(w, dtype=np.float32), name)


def quantize_q4_k(w: np.ndarray) -> np.ndarray:
    """float32 (..., k), k % 256 == 0 -> Q4_K blocks (..., k/256*144). Per 32-element sub-block an affine fit
    (min(0, x_min) .. x_max over 15 steps), its scale and min rounded to 6 bits of the super-block's d / dmin, then
    the 4-bit values rounded against the rounded scales. Simpler than ggml's iterative search; its mean squared
    error measured within 1% of Q4_1's (fp16 scale and min per 32) on Gaussian and heavy-tailed weights."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.shape[-1] % 256:
        raise ConfigError(f"Q4_K needs a last dim multiple of 256, got {w.shape[-1]}")
    x = w.reshape(-1, 8, 32)  # (B, sub-block, element)
    lo = np.minimum(x.min(axis=2), 0.0)  # (B, 8)
    hi = x.max(axis=2)
    scale = np.maximum(hi - lo, 0.0) / 15.0
    mins = -lo
    d = scale.max(axis=1, keepdims=True) / 63.0  # (B, 1)
    dmin = mins.max(axis=1, keepdims=True) / 63.0
    d16, dmin16 = d.astype(np.float16), dmin.astype(np.float16)
    d32, dmin32 = d16.astype(np.float32), dmin16.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d32 > 0, np.rint(scale / d32), 0).clip(0, 63).astype(np.uint8)
        mn = np.where(dmin32 > 0, np.rint(mins / dmin32), 0).clip(0, 63).astype(np.uint8)
        eff_d = d32 * sc  # (B, 8) what the decoder will use
        eff_m = dmin32 * mn
        q = np.where(eff_d[:, :, None] > 0, np.rint((x + eff_m[:, :, None]) / eff_d[:, :, None]), 0)
    q = q.clip(0, 15).astype(np.uint8)  # (B, 8, 32)
    s = np.zeros((x.shape[0], 12), np.uint8)
    s[:, 0:4] = (sc[:, 0:4] & 63) | ((sc[:, 4:8] >> 4) << 6)
    s[:, 4:8] = (mn[:, 0:4] & 63) | ((mn[:, 4:8] >> 4) << 6)
    s[:, 8:12] = (sc[:, 4:8] & 0xF) | ((mn[:, 4:8] & 0xF) << 4)
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(-1, 128)  # chunk c: sub-block 2c low nibbles, 2c+1 high
    out = np.concatenate([d16.view(np.uint8), dmin16.view(np.uint8), s, qs], axis=1)
    return out.reshape(*w.shape[:-1], w.shape[-1] // 256 * 144)

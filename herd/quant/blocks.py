"""ggml block formats: dequantize and quantize in vectorized numpy, no torch and no C.

Layouts are in SPEC.md §4 (from ggml `ggml-common.h` / `ggml-quants.c`). Every function works on whole arrays of
blocks at once; the only Python loops run over chunks of a tensor (to keep temporaries in cache), never over blocks.
Results equal gguf-py's `gguf.quants` bit for bit: the float32 operations are done in the same order (no fused
multiply-add), and quantization uses the same rounding rules as ggml's reference `quantize_row_*_ref`.
"""

from __future__ import annotations

import math

import numpy as np

from herd.errors import FormatError

QK_K = 256  # super-block size of the K-quants
# The 16 values a 4-bit index of IQ4_NL / IQ4_XS stands for (ggml-common.h `kvalues_iq4nl`): a non-uniform grid,
# denser near zero, fitted by llama.cpp to the distribution of weights. Values times the block scale.
IQ4_NL_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int8)

# name -> (ggml type id, elements per block, bytes per block)
GGML_TYPES: dict[str, tuple[int, int, int]] = {
    "F32": (0, 1, 4),
    "F16": (1, 1, 2),
    "Q4_0": (2, 32, 18),
    "Q4_1": (3, 32, 20),
    "Q5_0": (6, 32, 22),
    "Q5_1": (7, 32, 24),
    "Q8_0": (8, 32, 34),
    "Q2_K": (10, QK_K, 84),
    "Q3_K": (11, QK_K, 110),
    "Q4_K": (12, QK_K, 144),
    "Q5_K": (13, QK_K, 176),
    "Q6_K": (14, QK_K, 210),
    "IQ4_NL": (20, 32, 18),
    "IQ4_XS": (23, QK_K, 136),
    "BF16": (30, 1, 2),
}
TYPE_NAMES: dict[int, str] = {tid: name for name, (tid, _, _) in GGML_TYPES.items()}
QUANTIZABLE = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")

_CHUNK_ELEMS = 1 << 18  # elements per chunk: float32 temporaries of ~1 MiB stay in L2


def type_name(ggml_type: int | str) -> str:
    """Canonical name ('Q4_1') of a ggml type given by id or by name (any case)."""
    if isinstance(ggml_type, str):
        name = ggml_type.upper()
        if name in GGML_TYPES:
            return name
    elif isinstance(ggml_type, (int, np.integer)) and int(ggml_type) in TYPE_NAMES:
        return TYPE_NAMES[int(ggml_type)]
    raise FormatError(f"ggml type {ggml_type!r} is not supported by herd (supported: {', '.join(GGML_TYPES)})")


def type_id(ggml_type: int | str) -> int:
    return GGML_TYPES[type_name(ggml_type)][0]


def nbytes(ggml_type: int | str, shape: tuple[int, ...]) -> int:
    """Bytes taken by a tensor of this type and (torch-order) shape; the last dim runs along the blocks."""
    _, block, size = GGML_TYPES[type_name(ggml_type)]
    n = math.prod(shape)
    if not shape or shape[-1] % block:
        raise FormatError(f"shape {tuple(shape)}: last dim must be a multiple of the {type_name(ggml_type)} "
                          f"block size {block}")
    return n // block * size


# ---------------------------------------------------------------------------------------------------------------
# small helpers

def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The fp16 stored at byte `start` of every block, as float32 (n, 1)."""
    return blocks[:, start:start + 2].view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 16) packed bytes -> (n, 32) uint8: element j < 16 is the low nibble of byte j, j >= 16 the high one."""
    return np.concatenate([qs & 0xF, qs >> 4], axis=1)


def _bits32(qh: np.ndarray) -> np.ndarray:
    """(n, 4) bytes read as a little-endian u32 -> (n, 32) uint8 holding bit j at column j."""
    return np.unpackbits(qh, axis=1, bitorder="little")


def _k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K packed 6-bit (scale, min) of the 8 sub-blocks: (n, 12) bytes -> two (n, 8) uint8."""
    lo, mid, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([lo & 63, (hi & 0xF) | ((lo >> 6) << 4)], axis=1)
    mn = np.concatenate([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], axis=1)
    return sc, mn


# ---------------------------------------------------------------------------------------------------------------
# dequantization of one chunk of blocks: (n, block bytes) uint8 -> (n, block elems) float32

def _dq_q8_0(b, out):
    np.multiply(b[:, 2:].view(np.int8), _f16(b, 0), out=out)  # int8 -> float32 is exact


def _dq_q4_0(b, out):
    q = _nibbles(b[:, 2:]).astype(np.int8) - np.int8(8)
    np.multiply(_f16(b, 0), q, out=out)


def _dq_q4_1(b, out):
    np.multiply(_nibbles(b[:, 4:]), _f16(b, 0), out=out)  # y = d*q + m, rounded after each step like gguf-py
    out += _f16(b, 2)


def _dq_q5_0(b):
    q = (_nibbles(b[:, 6:]) | (_bits32(b[:, 2:6]) << 4)).astype(np.int8) - np.int8(16)
    return _f16(b, 0) * q.astype(np.float32)


def _dq_q5_1(b):
    q = (_nibbles(b[:, 8:]) | (_bits32(b[:, 4:8]) << 4)).astype(np.float32)
    return _f16(b, 0) * q + _f16(b, 2)


def _dq_q4_k(b):
    n = b.shape[0]
    sc, mn = _k_scales(b[:, 4:16])
    dsc = (_f16(b, 0) * sc.astype(np.float32))[:, :, None]  # (n, 8, 1)
    dmn = (_f16(b, 2) * mn.astype(np.float32))[:, :, None]
    qs = b[:, 16:].reshape(n, 4, 1, 32)  # chunk c: sub-block 2c = low nibbles, 2c+1 = high nibbles
    q = np.concatenate([qs & 0xF, qs >> 4], axis=2).reshape(n, 8, 32).astype(np.float32)
    return (dsc * q - dmn).reshape(n, QK_K)


def _dq_q5_k(b):
    n = b.shape[0]
    sc, mn = _k_scales(b[:, 4:16])
    dsc = (_f16(b, 0) * sc.astype(np.float32))[:, :, None]
    dmn = (_f16(b, 2) * mn.astype(np.float32))[:, :, None]
    qh = b[:, 16:48].reshape(n, 1, 32)
    qs = b[:, 48:].reshape(n, 4, 1, 32)
    low = np.concatenate([qs & 0xF, qs >> 4], axis=2).reshape(n, 8, 32)
    high = (qh >> np.arange(8, dtype=np.uint8)[:, None]) & 1  # sub-block j takes bit j of qh[l]
    q = (low | (high << 4)).astype(np.float32)
    return (dsc * q - dmn).reshape(n, QK_K)


def _dq_q6_k(b):
    n = b.shape[0]
    ql = b[:, :128].reshape(n, 2, 64)  # two halves of 128 elements
    qh = b[:, 128:192].reshape(n, 2, 1, 32)
    scales = b[:, 192:208].view(np.int8).astype(np.float32)  # one per 16 elements
    d = (_f16(b, 208) * scales)[:, :, None]  # (n, 16, 1)
    low = np.concatenate([ql & 0xF, ql >> 4], axis=2)  # (n, 2, 128): groups g = 0..3 of 32
    high = ((qh >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3).reshape(n, 2, 128)
    q = ((low | (high << 4)).astype(np.int8) - np.int8(32)).astype(np.float32).reshape(n, 16, 16)
    return (d * q).reshape(n, QK_K)


def _dq_q2_k(b):
    """Q2_K, 84 bytes: scales[16] | qs[64] | d | dmin. Sub-block j of 16 elements: y = (d * (scales[j] & 15)) * q
    - dmin * (scales[j] >> 4), q in 0..3. Element 128h + 32s + l (half h, shift s) is bits 2s, 2s+1 of qs[32h + l],
    so sub-block j = 8h + 2s + (l >= 16)."""
    n = b.shape[0]
    sc = b[:, :16]
    dl = (_f16(b, 80) * (sc & 0xF).astype(np.float32))[:, :, None]  # (n, 16, 1); d * 4-bit int: exact
    ml = (_f16(b, 82) * (sc >> 4).astype(np.float32))[:, :, None]
    qs = b[:, 16:80].reshape(n, 2, 1, 32)
    q = ((qs >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3).reshape(n, 16, 16).astype(np.float32)
    return (dl * q - ml).reshape(n, QK_K)  # dl * q is exact: one rounding, in the subtraction


def _q3_k_scales(s: np.ndarray) -> np.ndarray:
    """Q3_K's 16 signed 6-bit scales from 12 bytes: low 4 bits of scale j are nibble j // 8 of byte j % 8, its high
    2 bits are bits 2 (j // 4), +1 of byte 8 + j % 4; stored with an offset of 32. (n, 12) -> (n, 16) float32."""
    low = np.concatenate([s[:, :8] & 0xF, s[:, :8] >> 4], axis=1)
    high = np.concatenate([(s[:, 8:12] >> (2 * i)) & 3 for i in range(4)], axis=1)
    return ((low | (high << 4)).astype(np.int8) - np.int8(32)).astype(np.float32)


def _dq_q3_k(b):
    """Q3_K, 110 bytes: hmask[32] | qs[64] | scales[12] | d. Element e = 128h + 32s + l: low 2 bits are bits 2s, 2s+1
    of qs[32h + l] (as in Q2_K), and q = low - 4 unless bit e // 32 of hmask[l] is set; y = (d * scale[e // 16]) * q,
    exact (a product of an fp16, a 6-bit and a 3-bit integer)."""
    n = b.shape[0]
    dl = (_f16(b, 108) * _q3_k_scales(b[:, 96:108]))[:, :, None]  # (n, 16, 1)
    qs = b[:, 32:96].reshape(n, 2, 1, 32)
    low = ((qs >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3).reshape(n, 8, 32)
    high = (b[:, :32].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8)[:, None]) & 1  # group g: bit g of hmask[l]
    q = (low.astype(np.int8) - ((high ^ 1) << 2).astype(np.int8)).astype(np.float32)
    return (dl * q.reshape(n, 16, 16)).reshape(n, QK_K)


_IQ4_F32 = IQ4_NL_VALUES.astype(np.float32)


def _dq_iq4_nl(b):
    """IQ4_NL, 18 bytes: d | qs[16], nibbles as in Q4_0; y = d * IQ4_NL_VALUES[nibble] (exact)."""
    return _f16(b, 0) * _IQ4_F32[_nibbles(b[:, 2:])]


def _dq_iq4_xs(b):
    """IQ4_XS, 136 bytes: d | scales_h (u16) | scales_l[4] | qs[128]. Sub-block j of 32 elements: 6-bit scale
    ls = (nibble j % 2 of scales_l[j // 2]) | (bits 2j, 2j+1 of scales_h) << 4, and y = (d * (ls - 32)) *
    IQ4_NL_VALUES[nibble], its 16 bytes qs[16j..] packed as in IQ4_NL. d * (ls - 32) is exact, then one rounding."""
    n = b.shape[0]
    sl = b[:, 4:8]
    low = np.stack([sl & 0xF, sl >> 4], axis=2).reshape(n, 8)
    sh = b[:, 2:4].view(np.uint16)  # (n, 1)
    high = ((sh >> (2 * np.arange(8, dtype=np.uint16))) & 3).astype(np.uint8)
    ls = ((low | (high << 4)).astype(np.int8) - np.int8(32)).astype(np.float32)
    dl = (_f16(b, 0) * ls)[:, :, None]  # (n, 8, 1)
    qs = b[:, 8:].reshape(n, 8, 16)
    return (dl * _IQ4_F32[np.concatenate([qs & 0xF, qs >> 4], axis=2)]).reshape(n, QK_K)


_DEQUANT = {"Q8_0": _dq_q8_0, "Q4_0": _dq_q4_0, "Q4_1": _dq_q4_1, "Q5_0": _dq_q5_0, "Q5_1": _dq_q5_1,
            "Q2_K": _dq_q2_k, "Q3_K": _dq_q3_k, "Q4_K": _dq_q4_k, "Q5_K": _dq_q5_k, "Q6_K": _dq_q6_k,
            "IQ4_NL": _dq_iq4_nl, "IQ4_XS": _dq_iq4_xs}
_WRITES_OUT = ("Q8_0", "Q4_0", "Q4_1")  # these write into the output chunk instead of returning it


def dequantize(raw: np.ndarray, ggml_type: int | str, shape: tuple[int, ...]) -> np.ndarray:
    """Raw ggml bytes -> float32 array of `shape` (torch order; the last dim runs along the blocks). Exact."""
    name = type_name(ggml_type)
    shape = tuple(int(s) for s in shape)
    raw = np.asarray(raw)
    if raw.dtype != np.uint8:
        raw = raw.view(np.uint8)
    raw = raw.reshape(-1)
    need = nbytes(name, shape)
    if raw.size != need:
        raise FormatError(f"{name} tensor of shape {shape} needs {need} bytes, got {raw.size}")
    if name == "F32":
        return raw.view(np.float32).reshape(shape).copy()
    if name == "F16":
        return raw.view(np.float16).astype(np.float32).reshape(shape)
    if name == "BF16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
    _, block, size = GGML_TYPES[name]
    blocks = raw.reshape(-1, size)
    out = np.empty((blocks.shape[0], block), np.float32)
    step = max(1, _CHUNK_ELEMS // block)
    fn = _DEQUANT[name]
    with np.errstate(invalid="ignore", over="ignore"):  # NaN / inf scales give NaN / inf, as in ggml
        for i in range(0, blocks.shape[0], step):
            if name in _WRITES_OUT:
                fn(blocks[i:i + step], out[i:i + step])
            else:
                out[i:i + step] = fn(blocks[i:i + step])
    return out.reshape(shape)


# ---------------------------------------------------------------------------------------------------------------
# quantization (ggml's reference rounding; gguf-py implements the same for these types)

def _recip(d: np.ndarray) -> np.ndarray:
    """1/d, and 0 where d == 0 (an all-zero block)."""
    with np.errstate(divide="ignore"):
        return np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)


def _round_away(x: np.ndarray) -> np.ndarray:
    """C roundf: nearest integer, halves away from zero (exact in float32)."""
    a = np.abs(x)
    f = np.floor(a)
    return np.copysign(f + (a - f >= 0.5), x)


def _absmax_signed(b: np.ndarray) -> np.ndarray:
    """The element of largest magnitude in each block, sign kept (first one on ties), (n, 1)."""
    return np.take_along_axis(b, np.abs(b).argmax(axis=1, keepdims=True), axis=1)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """(n, 32) uint8 -> (n, 16): byte j = q[j] low nibble | q[j+16] high nibble."""
    return (q[:, :16] & 0xF) | (q[:, 16:] << 4)


def _fp16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).view(np.uint8)


def _q_q8_0(b):
    d = np.abs(b).max(axis=1, keepdims=True) / np.float32(127)
    q = _round_away(b * _recip(d)).astype(np.int8).view(np.uint8)
    return np.concatenate([_fp16_bytes(d), q], axis=1)


def _q_q4_0(b):
    d = _absmax_signed(b) / np.float32(-8)
    q = np.trunc(b * _recip(d) + np.float32(8.5)).astype(np.uint8).clip(0, 15)
    return np.concatenate([_fp16_bytes(d), _pack_nibbles(q)], axis=1)


def _q_q4_1(b):
    lo, hi = b.min(axis=1, keepdims=True), b.max(axis=1, keepdims=True)
    d = (hi - lo) / np.float32(15)
    q = np.trunc((b - lo) * _recip(d) + np.float32(0.5)).astype(np.uint8).clip(0, 15)
    return np.concatenate([_fp16_bytes(d), _fp16_bytes(lo), _pack_nibbles(q)], axis=1)


def _q_q5_0(b):
    d = _absmax_signed(b) / np.float32(-16)
    q = np.trunc(b * _recip(d) + np.float32(16.5)).astype(np.uint8).clip(0, 31)
    qh = np.packbits(q >> 4, axis=1, bitorder="little")  # bit j of a little-endian u32
    return np.concatenate([_fp16_bytes(d), qh, _pack_nibbles(q)], axis=1)


def _q_q5_1(b):
    lo, hi = b.min(axis=1, keepdims=True), b.max(axis=1, keepdims=True)
    d = (hi - lo) / np.float32(31)
    q = np.trunc((b - lo) * _recip(d) + np.float32(0.5)).astype(np.uint8).clip(0, 31)
    qh = np.packbits(q >> 4, axis=1, bitorder="little")
    return np.concatenate([_fp16_bytes(d), _fp16_bytes(lo), qh, _pack_nibbles(q)], axis=1)


_QUANT = {"Q8_0": _q_q8_0, "Q4_0": _q_q4_0, "Q4_1": _q_q4_1, "Q5_0": _q_q5_0, "Q5_1": _q_q5_1}


def _to_bf16(x: np.ndarray) -> np.ndarray:
    """ggml's fp32 -> bf16: NaN made quiet, otherwise round to nearest even."""
    n = x.view(np.uint32)
    n = np.where((n & 0x7FFFFFFF) > 0x7F800000, (n & np.uint32(0xFFFF0000)) | np.uint32(0x400000), n)
    n = (n.astype(np.uint64) + (0x7FFF + ((n >> 16) & 1))) >> 16
    return n.astype(np.uint16)


def quantize(x: np.ndarray, ggml_type: int | str) -> np.ndarray:
    """float32 array -> raw ggml bytes, shape (*x.shape[:-1], row bytes). Blocks run along the last dim."""
    name = type_name(ggml_type)
    if name not in QUANTIZABLE:
        raise FormatError(f"herd cannot quantize to {name} (it can: {', '.join(QUANTIZABLE)})")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 0:
        x = x.reshape(1)
    _, block, size = GGML_TYPES[name]
    if x.shape[-1] % block:
        raise FormatError(f"cannot quantize shape {x.shape} to {name}: the last dim must be a multiple of {block}")
    row_bytes = x.shape[-1] // block * size
    out_shape = (*x.shape[:-1], row_bytes)
    if name == "F32":
        return x.view(np.uint8).reshape(out_shape).copy()
    if name == "F16":
        return x.astype(np.float16).view(np.uint8).reshape(out_shape)
    if name == "BF16":
        return _to_bf16(x).view(np.uint8).reshape(out_shape)
    blocks = x.reshape(-1, block)
    out = np.empty((blocks.shape[0], size), np.uint8)
    step = max(1, _CHUNK_ELEMS // block)
    fn = _QUANT[name]
    for i in range(0, blocks.shape[0], step):
        out[i:i + step] = fn(blocks[i:i + step])
    return out.reshape(out_shape)

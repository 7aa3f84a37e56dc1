"""GGUF: a validating reader, the GGUF <-> herd name table, config and weights loading, and a writer.

Format facts are in SPEC.md §4. The reader is herd's own small parser over a copy-on-write mmap: it checks every
count, length, dimension and offset against the file size before using it, so a damaged file gives a FormatError
naming the file and the problem instead of a crash, a hang or a huge allocation. Tensor data is never copied
until it is dequantized.

q/k rows: llama.cpp's converter undoes HF's rotate-half permutation, so GGUF `attn_q` / `attn_k` of arch llama hold
rows in Meta's interleaved-pair order (ggml rope mode NORM), which is herd's order: no permutation here
(checked against transformers' GGUF loader in tests/test_gguf.py).
"""

from __future__ import annotations

import math
import mmap
import os
import re
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from herd.config import ModelConfig, RopeScaling
from herd.errors import ConfigError, FormatError, ModelNotFoundError
from herd.formats import keymaps
from herd.quant import blocks

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME_BYTES = 64  # GGML_MAX_NAME, counting the NUL that llama.cpp adds
MAX_KEY_BYTES = 65535
MAX_ARRAY_DEPTH = 4
MAX_NUMBER_ARRAY = 1 << 22  # numbers in one metadata array (vocabularies have ~10^5; a damaged count has 10^18)

# ---------------------------------------------------------------------------------------------------------------
# Names: GGUF pattern -> herd pattern per architecture; "{i}" is the layer index. Another architecture (llama4)
# adds its own table here, its ignorable tensors below, and its config reader to CONFIG_READERS.

TENSOR_NAMES: dict[str, dict[str, str]] = {"llama": keymaps.GGUF_NAMES}
# Tensors that carry nothing herd needs (old converters stored the RoPE table per layer).
IGNORED_TENSORS: dict[str, re.Pattern] = {"llama": re.compile(r"blk\.\d+\.attn_rot_embd\.weight")}


_RULES: dict[str, tuple[list, list]] = {}


def _rules(arch: str) -> tuple[list, list]:
    """(GGUF -> herd, herd -> GGUF) compiled rules of an architecture's table."""
    if arch not in _RULES:
        table = TENSOR_NAMES[arch]
        _RULES[arch] = (keymaps.compile_names(table), keymaps.compile_names({v: k for k, v in table.items()}))
    return _RULES[arch]


def gguf_to_herd_name(name: str, arch: str = "llama") -> str | None:
    """'blk.3.ffn_gate.weight' -> 'layers.3.feed_forward.w1.weight'; None if the name is not in the table."""
    return keymaps.rename(name, _rules(arch)[0])


def herd_to_gguf_name(name: str, arch: str = "llama") -> str | None:
    return keymaps.rename(name, _rules(arch)[1])


# ---------------------------------------------------------------------------------------------------------------
# Reader

# GGUF metadata value types (SPEC.md §4)
T_UINT8, T_INT8, T_UINT16, T_INT16, T_UINT32, T_INT32, T_FLOAT32, T_BOOL, T_STRING, T_ARRAY = range(10)
T_UINT64, T_INT64, T_FLOAT64 = 10, 11, 12
_NUMPY_OF = {T_UINT8: "u1", T_INT8: "i1", T_UINT16: "<u2", T_INT16: "<i2", T_UINT32: "<u4", T_INT32: "<i4",
             T_FLOAT32: "<f4", T_BOOL: "u1", T_UINT64: "<u8", T_INT64: "<i8", T_FLOAT64: "<f8"}
_STRUCT_OF = {t: struct.Struct("<" + c) for t, c in zip(
    (T_UINT8, T_INT8, T_UINT16, T_INT16, T_UINT32, T_INT32, T_FLOAT32, T_BOOL, T_UINT64, T_INT64, T_FLOAT64),
    "BbHhIifBQqd")}
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")
_MIN_KV_BYTES = 8 + 1 + 4 + 1  # key length, a 1-byte key, value type, a 1-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8  # name length, 1-byte name, n_dims, one dim, type, offset


@dataclass
class GGUFTensor:
    """One tensor of a GGUF file; `data` is a uint8 view of its bytes in the file's copy-on-write mmap."""

    name: str
    ggml_type: int
    shape: tuple[int, ...]  # torch order: the last dim is ggml's ne[0], the one the blocks run along
    data: np.ndarray = field(repr=False)

    @property
    def type_name(self) -> str:
        return _type_name(self.ggml_type)

    @property
    def is_quantized(self) -> bool:
        return self.type_name not in ("F32", "F16", "BF16")

    def dequantize(self) -> np.ndarray:
        """float32 array of `shape` (a fresh, writable copy)."""
        try:
            return blocks.dequantize(self.data, self.ggml_type, self.shape)
        except FormatError as e:
            raise FormatError(f"tensor {self.name}: {e}") from None


@dataclass
class GGUFFile:
    path: Path
    metadata: dict[str, Any]  # key -> str, int, float, bool or list (bytes for a string that is not UTF-8)
    tensors: dict[str, GGUFTensor]  # by GGUF name, in file order
    architecture: str
    version: int = 3
    alignment: int = DEFAULT_ALIGNMENT
    data_offset: int = 0  # where the tensor data section starts in the file
    value_types: dict[str, tuple[int, int | None]] = field(default_factory=dict, repr=False)  # (type, array item type)


def _type_name(ggml_type: int) -> str:
    if ggml_type in blocks.TYPE_NAMES:
        return blocks.TYPE_NAMES[ggml_type]
    try:
        import gguf

        return gguf.GGMLQuantizationType(ggml_type).name
    except (ImportError, ValueError):
        return f"type {ggml_type}"


def _ggml_block_sizes(ggml_type: int) -> tuple[int, int] | None:
    """(elements, bytes) per block of any ggml type, also the ones herd cannot dequantize; None if unknown."""
    name = blocks.TYPE_NAMES.get(ggml_type)
    if name is not None:
        return blocks.GGML_TYPES[name][1:]
    try:
        import gguf

        return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
    except (ImportError, ValueError, KeyError):
        return None


class _Parser:
    """Bounds-checked cursor over the mmap of a GGUF file."""

    def __init__(self, path: Path, buf, size: int):
        self.path, self.buf, self.size, self.pos = path, buf, size, 0

    def fail(self, problem: str) -> FormatError:
        return FormatError(f"{self.path}: {problem}")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"{what} at byte {self.pos} needs {n} bytes but the file ends at byte {self.size} "
                            f"(truncated or corrupt)")

    def scalar(self, s: struct.Struct, what: str):
        self.need(s.size, what)
        (v,) = s.unpack_from(self.buf, self.pos)
        self.pos += s.size
        return v

    def u32(self, what: str) -> int:
        return self.scalar(_U32, what)

    def u64(self, what: str) -> int:
        return self.scalar(_U64, what)

    def raw_string(self, what: str, limit: int | None = None) -> bytes:
        n = self.u64(f"length of {what}")
        if limit is not None and n > limit:
            raise self.fail(f"{what} is {n} bytes long, more than the limit of {limit}")
        self.need(n, what)
        b = self.buf[self.pos:self.pos + n]
        self.pos += n
        return b

    def name(self, what: str, limit: int) -> str:
        b = self.raw_string(what, limit)
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} {b[:80]!r} is not valid UTF-8") from None

    def value(self, vtype: int, what: str, depth: int = 0):
        if vtype in _STRUCT_OF:
            v = self.scalar(_STRUCT_OF[vtype], what)
            if vtype == T_BOOL:
                return bool(v)
            if vtype == T_FLOAT32:
                return float(str(np.float32(v)))  # shortest decimal: 1e-05, not 9.99999974e-06
            return v
        if vtype == T_STRING:
            return _decode(self.raw_string(what))
        if vtype == T_ARRAY:
            if depth >= MAX_ARRAY_DEPTH:
                raise self.fail(f"{what}: arrays nested more than {MAX_ARRAY_DEPTH} deep")
            item = self.u32(f"item type of {what}")
            count = self.u64(f"length of {what}")
            min_item = {T_STRING: 8, T_ARRAY: 12}.get(item) or (_STRUCT_OF[item].size if item in _STRUCT_OF else 0)
            if not min_item:
                raise self.fail(f"{what}: unknown array item type {item}")
            if count * min_item > self.size - self.pos:
                raise self.fail(f"{what}: array of {count} items cannot fit in the {self.size - self.pos} bytes "
                                f"left in the file")
            if item in _NUMPY_OF:
                if count > MAX_NUMBER_ARRAY:  # as python numbers that could take 40x the bytes of the file
                    raise self.fail(f"{what}: array of {count} numbers, more than herd reads ({MAX_NUMBER_ARRAY})")
                a = np.frombuffer(self.buf, _NUMPY_OF[item], count, self.pos)
                self.pos += a.nbytes
                return (a != 0).tolist() if item == T_BOOL else a.tolist()
            if item == T_STRING:
                return self.string_array(count, what)
            return [self.value(T_ARRAY, f"{what}[{k}]", depth + 1) for k in range(count)]
        raise self.fail(f"{what}: unknown value type {vtype}")

    def string_array(self, count: int, what: str) -> list:
        buf, pos, size, unpack = self.buf, self.pos, self.size, _U64.unpack_from
        out = []
        append = out.append
        for k in range(count):  # ~0.6 us a string: the default model's 98k vocabulary strings take ~60 ms
            if pos + 8 > size:
                self.pos = pos
                self.need(8, f"length of {what}[{k}]")
            (n,) = unpack(buf, pos)
            pos += 8
            if n > size - pos:
                self.pos = pos
                self.need(n, f"{what}[{k}]")
            append(_decode(buf[pos:pos + n]))
            pos += n
        self.pos = pos
        return out


def _decode(b: bytes) -> str | bytes:
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return b  # GGUF strings should be UTF-8; keep the bytes rather than guess


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse and validate a GGUF file's header; tensor data stays in the mmap."""
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"{path}: no such GGUF file")
    size = path.stat().st_size
    if size < 24:
        raise FormatError(f"{path}: {size} bytes is too short for a GGUF header (24 bytes); truncated?")
    with open(path, "rb") as f:
        # copy-on-write: tensors can be used in place (no second copy of the weights; pages are read from the
        # page cache as touched), and a write to one changes this process's copy, never the file
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    p = _Parser(path, buf, size)
    magic = buf[0:4]
    if magic != GGUF_MAGIC:
        raise p.fail(f"not a GGUF file: magic bytes {magic!r}, expected {GGUF_MAGIC!r}")
    p.pos = 4
    version = p.u32("version")
    if version not in (2, 3):
        if int.from_bytes(version.to_bytes(4, "little"), "big") in (2, 3):
            raise p.fail("big-endian GGUF files are not supported")
        raise p.fail(f"GGUF version {version} is not supported (expected 2 or 3)")
    n_tensors = p.u64("tensor count")
    n_kv = p.u64("metadata count")
    if n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES > size - p.pos:
        raise p.fail(f"header claims {n_kv} metadata entries and {n_tensors} tensors, more than a "
                     f"{size}-byte file can hold (truncated or corrupt)")

    metadata: dict[str, Any] = {}
    value_types: dict[str, tuple[int, int | None]] = {}
    for k in range(n_kv):
        key = p.name(f"metadata key #{k}", MAX_KEY_BYTES)
        if not key:
            raise p.fail(f"metadata key #{k} is empty")
        if key in metadata:
            raise p.fail(f"metadata key {key!r} appears twice")
        vtype = p.u32(f"value type of {key}")
        item = None
        if vtype == T_ARRAY:
            p.need(4, f"item type of {key}")
            item = _U32.unpack_from(buf, p.pos)[0]
        metadata[key] = p.value(vtype, f"metadata {key}")
        value_types[key] = (vtype, item)

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 or alignment & (alignment - 1):
        raise p.fail(f"general.alignment must be a positive power of two, got {alignment!r}")
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise p.fail(f"metadata general.architecture is missing or not a string ({arch!r})")

    infos = []
    for k in range(n_tensors):
        name = p.name(f"name of tensor #{k}", MAX_NAME_BYTES - 1)
        n_dims = p.u32(f"n_dims of tensor {name}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise p.fail(f"tensor {name} has {n_dims} dimensions (expected 1 to {MAX_DIMS})")
        ne = [p.u64(f"dims of tensor {name}") for _ in range(n_dims)]
        ggml_type = p.u32(f"type of tensor {name}")
        offset = p.u64(f"offset of tensor {name}")
        if any(d <= 0 or d >= 1 << 62 for d in ne):
            raise p.fail(f"tensor {name} has bad dimensions {ne} (each must be positive and < 2^62)")
        sizes = _ggml_block_sizes(ggml_type)
        if sizes is None:
            raise p.fail(f"tensor {name} has unknown ggml type {ggml_type}")
        block, block_bytes = sizes
        if ne[0] % block:
            raise p.fail(f"tensor {name}: row length {ne[0]} is not a multiple of the {_type_name(ggml_type)} "
                         f"block size {block}")
        n_elem = math.prod(ne)
        n_bytes = n_elem // block * block_bytes
        if n_bytes > size:
            raise p.fail(f"tensor {name} of shape {ne[::-1]} ({_type_name(ggml_type)}) needs {n_bytes} bytes, "
                         f"more than the whole file ({size})")
        infos.append((name, ggml_type, tuple(ne[::-1]), offset, n_bytes))

    data_start = -(-p.pos // alignment) * alignment
    tensors: dict[str, GGUFTensor] = {}
    for name, ggml_type, shape, offset, n_bytes in infos:
        if name in tensors:
            raise p.fail(f"tensor {name} appears twice")
        if offset % alignment:
            raise p.fail(f"tensor {name}: offset {offset} is not a multiple of the alignment {alignment}")
        if data_start + offset + n_bytes > size:
            raise p.fail(f"tensor {name}: bytes {data_start + offset}..{data_start + offset + n_bytes} lie past "
                         f"the end of the file ({size} bytes); truncated?")
        data = np.frombuffer(buf, np.uint8, n_bytes, data_start + offset)
        tensors[name] = GGUFTensor(name, ggml_type, shape, data)
    spans = sorted((offset, offset + n_bytes, name) for name, _, _, offset, n_bytes in infos)
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            raise p.fail(f"tensors {a} and {b} overlap in the file")
    return GGUFFile(path, metadata, tensors, arch, version, alignment, data_start, value_types)


# ---------------------------------------------------------------------------------------------------------------
# Config

def _get(g: GGUFFile, key: str, kind: type, default: Any = ...) -> Any:
    """A metadata value of the expected kind (int or float), or default; errors name the file and key."""
    if key not in g.metadata:
        if default is ...:
            raise FormatError(f"{g.path}: metadata key {key} is missing")
        return default
    v = g.metadata[key]
    if isinstance(v, list) and v and all(x == v[0] for x in v):  # per-layer arrays with one value
        v = v[0]
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) if kind is float else (
        isinstance(v, int) and not isinstance(v, bool))
    if not ok:
        raise FormatError(f"{g.path}: metadata {key} should be {'a number' if kind is float else 'an integer'}, "
                          f"found {v!r}")
    return kind(v)


def llama3_rope_factors(scaling: RopeScaling, head_dim: int, theta: float) -> np.ndarray:
    """Per-frequency divisors of Llama 3.1 scaling, as llama.cpp's `rope_freqs` tensor (SPEC.md §4): (hd/2,)."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    s, lf, hf, lo = (scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor,
                     scaling.original_max_position_embeddings)
    out = np.ones_like(freqs)
    out[wavelen > lo / lf] = s
    band = (wavelen >= lo / hf) & (wavelen <= lo / lf)
    if hf > lf:
        smooth = (lo / wavelen[band] - lf) / (hf - lf)
        out[band] = 1 / ((1 - smooth) / s + smooth)
    return out.astype(np.float32)


def rope_scaling_from_factors(factors: np.ndarray, head_dim: int, theta: float,
                              original_context: int | None = None) -> RopeScaling | None:
    """The RopeScaling whose llama3 divisors equal `factors`; None if they are all 1 or match no setting tried.

    The divisors fix only Lo/lf and Lo/hf, so (factor, 1, hf, Lo) with lf = 1 stands for every equivalent setting.
    """
    f = np.asarray(factors, np.float64).reshape(-1)
    if f.size != head_dim // 2 or not np.all(np.isfinite(f)) or f.min() <= 0:
        return None
    s = float(f.max())
    if s <= 1.0:
        return None
    los = [original_context] if original_context else []
    los += [8192] + [1 << k for k in range(8, 21) if 1 << k != 8192]
    for lo in los:
        for hf in (4.0, 1.0, 2.0, 8.0, 16.0, 32.0):
            try:
                cand = RopeScaling(factor=s, low_freq_factor=1.0, high_freq_factor=hf,
                                   original_max_position_embeddings=int(lo))
            except ConfigError:
                continue
            if np.allclose(llama3_rope_factors(cand, head_dim, theta), f, rtol=1e-5, atol=0):
                return cand
    return None


_FAMILY_FROM_NAME = [
    (re.compile(r"llama[ _-]?4", re.I), "llama4"),
    (re.compile(r"llama[ _-]?3[._-]3", re.I), "llama3.3"),
    (re.compile(r"llama[ _-]?3[._-]2", re.I), "llama3.2"),
    (re.compile(r"llama[ _-]?3[._-]1", re.I), "llama3.1"),
    (re.compile(r"llama[ _-]?3", re.I), "llama3"),
    (re.compile(r"llama[ _-]?2", re.I), "llama2"),
]


def _guess_family(g: GGUFFile, vocab: int, scaling: RopeScaling | None) -> str:
    """Family from general.name & co., else from the Llama 3 vocabulary and rope factor; 'llama' if unsure."""
    text = " ".join(str(g.metadata.get(k, "")) for k in ("general.name", "general.basename", "general.finetune"))
    for pattern, family in _FAMILY_FROM_NAME:
        if pattern.search(text):
            return family
    if vocab == 128256:
        if scaling is None:
            return "llama3"
        return {8.0: "llama3.1", 32.0: "llama3.2"}.get(scaling.factor, "llama3")
    return "llama"


def _llama_config(g: GGUFFile) -> ModelConfig:
    a = g.architecture
    if _get(g, f"{a}.expert_count", int, 0) > 0:
        raise ConfigError(f"{g.path}: {a} with {g.metadata[f'{a}.expert_count']} experts (Mixtral-style MoE) "
                          f"is not supported")
    dim = _get(g, f"{a}.embedding_length", int)
    n_heads = _get(g, f"{a}.attention.head_count", int)
    n_kv = _get(g, f"{a}.attention.head_count_kv", int, n_heads)
    head_dim = _get(g, f"{a}.attention.key_length", int, 0) or (dim // n_heads if n_heads else 0)
    n_rot = _get(g, f"{a}.rope.dimension_count", int, head_dim)
    if n_rot != head_dim or _get(g, f"{a}.attention.value_length", int, head_dim) != head_dim:
        raise ConfigError(f"{g.path}: rope over {n_rot} of {head_dim} head dims, or a value head size other than "
                          f"the key's, is not supported")
    theta = _get(g, f"{a}.rope.freq_base", float, 10000.0)
    emb = g.tensors.get("token_embd.weight")
    if emb is None:
        raise FormatError(f"{g.path}: tensor token_embd.weight is missing")
    vocab = emb.shape[0]
    declared = _get(g, f"{a}.vocab_size", int, vocab)
    if declared != vocab:
        raise FormatError(f"{g.path}: {a}.vocab_size is {declared} but token_embd.weight has {vocab} rows")

    scaling = None
    kind = g.metadata.get(f"{a}.rope.scaling.type", "none")
    if kind == "linear" and _get(g, f"{a}.rope.scaling.factor", float, 1.0) == 1.0:
        kind = "none"  # linear scaling by 1 changes nothing
    if kind not in ("none", "llama3"):
        raise ConfigError(f"{g.path}: {a}.rope.scaling.type {kind!r} is not supported (herd has llama3 scaling)")
    freqs = g.tensors.get("rope_freqs.weight")
    if freqs is not None:
        factors = freqs.dequantize() if freqs.type_name in blocks.GGML_TYPES else None
        if factors is None or factors.size != head_dim // 2:
            raise FormatError(f"{g.path}: rope_freqs.weight should be {head_dim // 2} float values, found "
                              f"shape {freqs.shape} of {freqs.type_name}")
        ctx0 = _get(g, f"{a}.rope.scaling.original_context_length", int, 0) or None
        scaling = rope_scaling_from_factors(factors, head_dim, theta, ctx0)
    elif kind == "llama3":
        scaling = RopeScaling(factor=_get(g, f"{a}.rope.scaling.factor", float, 8.0),
                              original_max_position_embeddings=_get(
                                  g, f"{a}.rope.scaling.original_context_length", int, 8192))
    fields = dict(
        dim=dim, n_layers=_get(g, f"{a}.block_count", int), n_heads=n_heads, n_kv_heads=n_kv, vocab_size=vocab,
        ffn_dim=_get(g, f"{a}.feed_forward_length", int),
        norm_eps=_get(g, f"{a}.attention.layer_norm_rms_epsilon", float), rope_theta=theta, rope_scaling=scaling,
        max_seq_len=_get(g, f"{a}.context_length", int), tie_embeddings="output.weight" not in g.tensors,
        head_dim_override=head_dim if head_dim * n_heads != dim else None, family=_guess_family(g, vocab, scaling),
    )
    try:
        return ModelConfig(**fields)
    except ConfigError as e:
        raise ConfigError(f"{g.path}: {e}") from None


def _rope_factors(config: ModelConfig) -> np.ndarray:
    """The rope_freqs divisors a config implies: llama3 scaling, or ones."""
    if config.rope_scaling is None:
        return np.ones(config.head_dim // 2, np.float32)
    return llama3_rope_factors(config.rope_scaling, config.head_dim, config.rope_theta)


# architecture -> config reader; the llama4 engineer adds "llama4" (with its TENSOR_NAMES table)
CONFIG_READERS: dict[str, Callable[[GGUFFile], ModelConfig]] = {"llama": _llama_config}


def _llama4_config(g: GGUFFile) -> ModelConfig:
    from herd.formats.llama4 import config_from_gguf_llama4

    return config_from_gguf_llama4(g)


CONFIG_READERS["llama4"] = _llama4_config


def config_from_gguf(g: GGUFFile) -> ModelConfig:
    """herd ModelConfig from a GGUF file's metadata and tensor list."""
    reader = CONFIG_READERS.get(g.architecture)
    if reader is None:
        raise ConfigError(f"{g.path}: GGUF architecture {g.architecture!r} is not supported "
                          f"(supported: {', '.join(CONFIG_READERS)})")
    return reader(g)


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """herd name -> torch shape of every weight of a dense Llama (output.weight only when untied)."""
    d, hd, f = config.dim, config.head_dim, config.ffn_dim
    q, kv = config.n_heads * hd, config.n_kv_heads * hd
    shapes = {"tok_embeddings.weight": (config.vocab_size, d), "norm.weight": (d,)}
    if not config.tie_embeddings:
        shapes["output.weight"] = (config.vocab_size, d)
    for i in range(config.n_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "attention_norm.weight": (d,), p + "ffn_norm.weight": (d,),
            p + "attention.wq.weight": (q, d), p + "attention.wk.weight": (kv, d),
            p + "attention.wv.weight": (kv, d), p + "attention.wo.weight": (d, q),
            p + "feed_forward.w1.weight": (f, d), p + "feed_forward.w3.weight": (f, d),
            p + "feed_forward.w2.weight": (d, f),
        })
    return shapes


# ---------------------------------------------------------------------------------------------------------------
# Loading

def load_gguf(path: str | os.PathLike | GGUFFile, dtype: torch.dtype = torch.float32, keep_quantized: bool = False
              ) -> tuple[ModelConfig, dict[str, torch.Tensor | GGUFTensor], dict[str, Any]]:
    """(config, state dict in herd names, metadata) of a GGUF file (a path, or one read_gguf already parsed).

    Weights are dequantized to `dtype`; with keep_quantized, 2-D weights stored in a block-quantized type stay
    GGUFTensor objects (for the quantized linear layers). A tied model has no output.weight key. `rope.freqs`
    (float32 divisors, shape (head_dim/2,)) appears only when the file's rope_freqs match no llama3 setting.
    """
    g = path if isinstance(path, GGUFFile) else read_gguf(path)
    if g.architecture == "llama4":
        from herd.formats.llama4 import state_from_gguf_llama4

        config, state = state_from_gguf_llama4(g, dtype, keep_quantized)
        return config, state, g.metadata
    if g.architecture not in TENSOR_NAMES:
        raise ConfigError(f"{g.path}: GGUF architecture {g.architecture!r} is not supported "
                          f"(supported: {', '.join(TENSOR_NAMES)})")
    config = config_from_gguf(g)
    shapes = expected_shapes(config)
    ignored = IGNORED_TENSORS.get(g.architecture)
    state: dict[str, torch.Tensor | GGUFTensor] = {}
    todo: list[tuple[str, GGUFTensor]] = []
    for gname, t in g.tensors.items():
        name = gguf_to_herd_name(gname, g.architecture)
        if name is None:
            if ignored is not None and ignored.fullmatch(gname):
                continue
            raise FormatError(f"{g.path}: tensor {gname} is not a known {g.architecture} tensor")
        if name == "rope.freqs":  # kept only when the config's rope settings do not already say the same
            factors = t.dequantize().reshape(-1)
            if not np.allclose(factors, _rope_factors(config), rtol=1e-5, atol=0):
                state[name] = torch.from_numpy(factors)
            continue
        if name not in shapes:
            raise FormatError(f"{g.path}: tensor {gname} does not belong to a {config.n_layers}-layer model")
        if t.shape != shapes[name]:
            raise FormatError(f"{g.path}: tensor {gname} has shape {t.shape}, expected {shapes[name]} from the "
                              f"metadata")
        if t.type_name not in blocks.GGML_TYPES:
            raise FormatError(f"{g.path}: tensor {gname} is {t.type_name}, which herd cannot dequantize "
                              f"(supported: {', '.join(blocks.GGML_TYPES)})")
        if keep_quantized and len(t.shape) == 2 and t.is_quantized:
            state[name] = t
        else:
            todo.append((name, t))

    def convert(item: tuple[str, GGUFTensor]) -> tuple[str, torch.Tensor]:
        w = torch.from_numpy(item[1].dequantize())
        return item[0], (w if dtype == torch.float32 else w.to(dtype))

    # numpy releases the GIL inside its loops, so tensors dequantize in parallel on torch's thread budget
    n_workers = max(1, min(torch.get_num_threads(), 8))
    if n_workers == 1:
        state.update(map(convert, todo))
    else:
        with ThreadPoolExecutor(n_workers) as pool:
            state.update(pool.map(convert, todo))
    missing = sorted(set(shapes) - set(state))
    if missing:
        raise FormatError(f"{g.path}: tensors missing for herd names {missing[:8]}{' …' if len(missing) > 8 else ''}")
    return config, state, g.metadata


# ---------------------------------------------------------------------------------------------------------------
# Writing

# quant option -> (type of 2-D weights, of the output layer (and of a tied token_embd), llama file type)
# Like llama-quantize, the output layer gets more bits: Q8_0 here (llama.cpp uses Q6_K when the row length is a
# multiple of 256, which herd does not quantize; it also uses Q8_0 otherwise, as for the default model).
WRITE_QUANTS: dict[str, tuple[str, str, int]] = {
    "f32": ("F32", "F32", 0), "f16": ("F16", "F16", 1), "bf16": ("BF16", "BF16", 32),
    "q8_0": ("Q8_0", "Q8_0", 7), "q4_0": ("Q4_0", "Q8_0", 2), "q4_1": ("Q4_1", "Q8_0", 3),
    "q4_k": ("Q4_K", "Q8_0", 15),
}
# a row that does not fill whole blocks of its type falls back along this chain (llama.cpp also falls back from
# k-quants to 32-element blocks, and to F16 when even those do not fit)
_FALLBACK = {"Q4_K": "Q4_1", "Q4_1": "F16", "Q4_0": "F16", "Q8_0": "F16"}


def _encode(t: torch.Tensor, kind: str) -> np.ndarray:
    x = t.detach().to(torch.float32).numpy()
    if kind == "Q4_K":
        from herd.quant.linear import quantize_q4_k

        return quantize_q4_k(x)
    return blocks.quantize(x, kind)

# GGUF value type of the tokenizer keys llama.cpp reads with a strict type check
_TOKENIZER_TYPES: dict[str, tuple[int, int | None]] = {
    "tokenizer.ggml.model": (T_STRING, None), "tokenizer.ggml.pre": (T_STRING, None),
    "tokenizer.ggml.tokens": (T_ARRAY, T_STRING), "tokenizer.ggml.merges": (T_ARRAY, T_STRING),
    "tokenizer.ggml.scores": (T_ARRAY, T_FLOAT32), "tokenizer.ggml.token_type": (T_ARRAY, T_INT32),
    "tokenizer.ggml.precompiled_charsmap": (T_ARRAY, T_UINT8), "tokenizer.chat_template": (T_STRING, None),
}


_GGUF_OF_DTYPE = {np.dtype(d): t for t, d in _NUMPY_OF.items() if t != T_BOOL} | {np.dtype(bool): T_BOOL}


def _value_type(key: str, v: Any) -> tuple[int, int | None]:
    if isinstance(v, np.ndarray) and key not in _TOKENIZER_TYPES:
        if v.dtype not in _GGUF_OF_DTYPE:
            raise ConfigError(f"metadata {key}: numpy arrays of {v.dtype} cannot be stored in GGUF")
        return T_ARRAY, _GGUF_OF_DTYPE[v.dtype]
    if key in _TOKENIZER_TYPES:
        return _TOKENIZER_TYPES[key]
    if key.endswith("_token_id"):
        return T_UINT32, None
    if isinstance(v, bool):
        return T_BOOL, None
    if isinstance(v, int):
        return (T_UINT32 if 0 <= v < 1 << 32 else T_INT64), None
    if isinstance(v, float):
        return T_FLOAT32, None
    if isinstance(v, (str, bytes)):
        return T_STRING, None
    if isinstance(v, (list, tuple)) and v:
        return T_ARRAY, _value_type("", v[0])[0]
    raise ConfigError(f"metadata {key}: cannot store {type(v).__name__} value {v!r:.80} in GGUF")


def write_gguf(path: str | os.PathLike, config: ModelConfig, state_dict: dict[str, torch.Tensor],
               tokenizer_metadata: dict[str, Any], chat_template: str | None, quant: str = "f16",
               name: str = "", progress: bool = False) -> None:
    """Write a llama.cpp-loadable GGUF (arch llama). Norms stay F32; 2-D weights get `quant`. Atomic.
    progress: a bar over the tensors (with rate and ETA) on stderr."""
    import gguf

    if quant not in WRITE_QUANTS:
        raise ConfigError(f"quant {quant!r} is not supported for GGUF output (choose from {', '.join(WRITE_QUANTS)})")
    if config.is_llama4:
        from herd.formats.llama4 import write_gguf_llama4

        return write_gguf_llama4(path, config, state_dict, tokenizer_metadata, chat_template, quant, name)
    weight_type, output_type, file_type = WRITE_QUANTS[quant]
    shapes = expected_shapes(config)
    extra = sorted(set(state_dict) - set(shapes) - {"rope.freqs", "output.weight"})
    missing = sorted(set(shapes) - set(state_dict))
    if extra or missing:
        raise FormatError(f"state dict does not fit the config: missing {missing[:8]}, unexpected {extra[:8]}")

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    a = "llama"
    w = gguf.GGUFWriter(str(tmp), a)
    kv = w.add_key_value
    if name:
        w.add_name(name)
    kv("general.file_type", file_type, gguf.GGUFValueType.UINT32)
    kv("general.quantization_version", gguf.GGML_QUANT_VERSION, gguf.GGUFValueType.UINT32)
    for key, value in [("context_length", config.max_seq_len), ("embedding_length", config.dim),
                       ("block_count", config.n_layers), ("feed_forward_length", config.ffn_dim),
                       ("attention.head_count", config.n_heads), ("attention.head_count_kv", config.n_kv_heads),
                       ("rope.dimension_count", config.head_dim), ("vocab_size", config.vocab_size)]:
        kv(f"{a}.{key}", value, gguf.GGUFValueType.UINT32)
    if config.head_dim_override is not None:
        kv(f"{a}.attention.key_length", config.head_dim, gguf.GGUFValueType.UINT32)
        kv(f"{a}.attention.value_length", config.head_dim, gguf.GGUFValueType.UINT32)
    kv(f"{a}.attention.layer_norm_rms_epsilon", config.norm_eps, gguf.GGUFValueType.FLOAT32)
    kv(f"{a}.rope.freq_base", config.rope_theta, gguf.GGUFValueType.FLOAT32)
    meta = {k: v for k, v in tokenizer_metadata.items() if k.startswith("tokenizer.")}
    n_tokens = len(meta.get("tokenizer.ggml.tokens", ()))
    if n_tokens and n_tokens != config.vocab_size:
        raise ConfigError(f"the tokenizer has {n_tokens} tokens but the model's vocabulary is {config.vocab_size}; "
                          f"llama.cpp needs them equal")
    if chat_template is not None:
        meta["tokenizer.chat_template"] = chat_template
    for key, value in meta.items():
        if value is None:
            continue  # not set
        vtype, item = _value_type(key, value)
        if vtype == T_ARRAY:
            value = value.tolist() if isinstance(value, np.ndarray) else list(value)
            if not value:
                continue  # GGUF arrays cannot be empty
        kv(key, value, gguf.GGUFValueType(vtype),
           sub_type=gguf.GGUFValueType(item) if item is not None else None)

    # plan every tensor (GGUF name, tensor, type), declare them all, then encode and write one at a time so that
    # memory holds one encoded tensor, not the whole model
    plan: list[tuple[str, torch.Tensor, str]] = []
    if config.rope_scaling is not None:
        plan.append(("rope_freqs.weight", torch.from_numpy(_rope_factors(config)), "F32"))
    elif "rope.freqs" in state_dict:
        plan.append(("rope_freqs.weight", state_dict["rope.freqs"].reshape(-1), "F32"))
    for hname, shape in shapes.items():
        t = state_dict[hname]
        if tuple(t.shape) != shape:
            raise FormatError(f"state dict tensor {hname} has shape {tuple(t.shape)}, expected {shape}")
        kind = "F32" if t.dim() == 1 else weight_type
        if hname == "output.weight" or (hname == "tok_embeddings.weight" and config.tie_embeddings):
            kind = output_type
        while t.shape[-1] % blocks.GGML_TYPES[kind][1]:
            kind = _FALLBACK.get(kind, "F32")  # rows that do not fill whole blocks
        plan.append((herd_to_gguf_name(hname, a), t, kind))
    for gname, t, kind in plan:
        w.add_tensor_info(gname, tuple(t.shape), np.dtype(np.float32), blocks.nbytes(kind, tuple(t.shape)),
                          raw_dtype=gguf.GGMLQuantizationType(blocks.type_id(kind)))

    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        from tqdm import tqdm

        total = sum(t.numel() for _, t, _ in plan)
        with tqdm(total=total, unit="w", unit_scale=True, desc=f"writing {path.name}", disable=not progress,
                  leave=False) as bar:
            for gname, t, kind in plan:
                w.write_tensor_data(_encode(t, kind))
                bar.update(t.numel())
        w.close()
        os.replace(tmp, path)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise

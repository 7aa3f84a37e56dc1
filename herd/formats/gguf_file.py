"""The GGUF file itself: a validating reader over a copy-on-write mmap (SPEC.md §4).

It checks every count, length, dimension and offset against the file size before using it, so a damaged file gives
a FormatError naming the file and the problem instead of a crash, a hang or a huge allocation. Tensor data is never
copied until it is dequantized. What the tensors and keys mean for a model is gguf.py's business.

Floor 6 (formats); imports herd.errors and herd.quant.blocks only.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from herd.errors import FormatError, ModelNotFoundError
from herd.quant import blocks

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME_BYTES = 64  # GGML_MAX_NAME, counting the NUL that llama.cpp adds
MAX_KEY_BYTES = 65535
MAX_ARRAY_DEPTH = 4
MAX_NUMBER_ARRAY = 1 << 22  # numbers in one metadata array (vocabularies have ~10^5; a damaged count has 10^18)

# GGUF metadata value types (SPEC.md §4)
T_UINT8, T_INT8, T_UINT16, T_INT16, T_UINT32, T_INT32, T_FLOAT32, T_BOOL, T_STRING, T_ARRAY = range(10)
T_UINT64, T_INT64, T_FLOAT64 = 10, 11, 12
NUMPY_OF = {T_UINT8: "u1", T_INT8: "i1", T_UINT16: "<u2", T_INT16: "<i2", T_UINT32: "<u4", T_INT32: "<i4",
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
            if item in NUMPY_OF:
                if count > MAX_NUMBER_ARRAY:  # as python numbers that could take 40x the bytes of the file
                    raise self.fail(f"{what}: array of {count} numbers, more than herd reads ({MAX_NUMBER_ARRAY})")
                a = np.frombuffer(self.buf, NUMPY_OF[item], count, self.pos)
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

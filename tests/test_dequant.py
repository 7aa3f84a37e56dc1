"""herd.quant.blocks against gguf-py's gguf.quants: dequantize and quantize must agree bit for bit."""

import zlib

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf import quants as ref

from herd.errors import FormatError
from herd.formats.gguf import read_gguf
from herd.quant import blocks

ALL = sorted(blocks.GGML_TYPES)
# byte offsets of each block's fp16 scales (SPEC.md §4)
SCALE_OFFSETS = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q4_K": [0, 2],
                 "Q5_K": [0, 2], "Q6_K": [208], "Q2_K": [80, 82], "Q3_K": [108], "IQ4_NL": [0], "IQ4_XS": [0]}


def ref_dequantize(raw: np.ndarray, name: str, row_blocks: int = 1) -> np.ndarray:
    """gguf-py's dequantizer on the same bytes (given as rows of row_blocks blocks, as GGUFReader does), flat."""
    _, block, size = blocks.GGML_TYPES[name]
    qtype = GGMLQuantizationType[name]
    if block == 1:
        return np.asarray(ref.dequantize(raw.reshape(-1), qtype), np.float32).reshape(-1)
    return np.asarray(ref.dequantize(raw.reshape(-1, size * row_blocks), qtype)).reshape(-1)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.ascontiguousarray(a, np.float32).reshape(-1), np.ascontiguousarray(b, np.float32).reshape(-1)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def random_blocks(name: str, n: int, rng: np.random.Generator, sane: bool) -> np.ndarray:
    """n random blocks; with sane=True their fp16 scales are finite and of a weight-like size."""
    _, block, size = blocks.GGML_TYPES[name]
    raw = rng.integers(0, 256, (n, size), dtype=np.uint8)
    if sane and name in SCALE_OFFSETS:
        for off in SCALE_OFFSETS[name]:
            scale = (rng.standard_normal(n) * 10.0 ** rng.uniform(-4, 0, n)).astype(np.float16)
            raw[:, off:off + 2] = scale.view(np.uint8).reshape(n, 2)
    if sane and name in ("F32", "F16", "BF16"):
        dt = {"F32": np.float32, "F16": np.float16}.get(name)
        vals = rng.standard_normal(raw.size // (4 if name == "F32" else 2)).astype(np.float32)
        raw = (vals.astype(dt) if dt else (vals.view(np.uint32) >> 16).astype(np.uint16)).view(np.uint8)
    return raw.reshape(-1)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("sane", [True, False], ids=["sane-scales", "any-bytes"])
def test_dequantize_random_blocks_matches_gguf_py(name, sane):
    rng = np.random.default_rng(zlib.crc32(f"{name}{sane}".encode()))
    _, block, _ = blocks.GGML_TYPES[name]
    n = 777  # not a multiple of herd's chunk size, several chunks for the 32-element types
    raw = random_blocks(name, n, rng, sane)
    got = blocks.dequantize(raw, name, (n * block,)) if block > 1 else blocks.dequantize(raw, name, (raw.size // (
        4 if name == "F32" else 2),))
    with np.errstate(all="ignore"):
        want = ref_dequantize(raw, name)
    assert same_bits(got, want)


@pytest.mark.parametrize("name", blocks.QUANTIZABLE)
def test_quantize_matches_gguf_py(name):
    rng = np.random.default_rng(7)
    _, block, _ = blocks.GGML_TYPES[name]
    x = rng.standard_normal((48, 8 * block)).astype(np.float32)
    x[0] = 0.0  # all-zero blocks: scale 0, reciprocal 0
    x[1] = 0.37  # constant blocks
    x[2, ::7] *= 1000.0  # outliers
    x[3] = np.arange(x.shape[1]) / 4.0 - 8.0  # values on exact half steps: rounding ties
    x[4] = rng.standard_normal(x.shape[1]) * 1e-6  # tiny values, subnormal fp16 scales
    x[5] = np.float32(-3.0)  # negative constant
    x[6] = rng.standard_normal(x.shape[1]) * 1e5  # fp16 scale overflow for Q8_0 and friends
    with np.errstate(all="ignore"):
        want = np.asarray(ref.quantize(x, GGMLQuantizationType[name])).view(np.uint8).reshape(48, -1)
        got = blocks.quantize(x, name)
    assert got.dtype == np.uint8 and got.shape == want.shape
    assert np.array_equal(got, want)


@pytest.mark.parametrize("name", blocks.QUANTIZABLE)
def test_dequantize_of_herd_quantized_blocks(name):
    """Blocks made by herd's quantize dequantize like gguf-py's, and close to the input."""
    rng = np.random.default_rng(3)
    _, block, _ = blocks.GGML_TYPES[name]
    x = rng.standard_normal((16, 4 * block)).astype(np.float32)
    q = blocks.quantize(x, name)
    got = blocks.dequantize(q, name, x.shape)
    assert same_bits(got, ref_dequantize(q, name))
    bits = {"Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q8_0": 8, "F16": 11, "BF16": 8, "F32": 24}[name]
    step = np.abs(x).max() / 2 ** (bits - 1)
    assert np.abs(got - x).max() <= step  # sanity: within one quantization step of the input


def test_dequantize_real_blocks_of_default_model(smollm_gguf):
    """Every tensor of the default model (Q4_1, Q8_0, F32) dequantizes exactly as gguf-py does."""
    g = read_gguf(smollm_gguf)
    kinds = set()
    for t in g.tensors.values():
        kinds.add(t.type_name)
        got = blocks.dequantize(t.data, t.ggml_type, t.shape)
        assert got.shape == t.shape and got.dtype == np.float32
        row_blocks = t.shape[-1] // blocks.GGML_TYPES[t.type_name][1]
        assert same_bits(got, ref_dequantize(t.data, t.type_name, row_blocks)), t.name
    assert kinds == {"Q4_1", "Q8_0", "F32"}


def test_type_table_matches_gguf_py():
    from gguf import GGML_QUANT_SIZES

    for name, (tid, block, size) in blocks.GGML_TYPES.items():
        qtype = GGMLQuantizationType[name]
        assert int(qtype) == tid and GGML_QUANT_SIZES[qtype] == (block, size)


def test_bad_inputs_raise_format_error():
    with pytest.raises(FormatError, match="needs 34 bytes"):
        blocks.dequantize(np.zeros(33, np.uint8), "Q8_0", (32,))
    with pytest.raises(FormatError, match="multiple of the Q4_0 block size 32"):
        blocks.dequantize(np.zeros(18, np.uint8), "Q4_0", (31,))
    with pytest.raises(FormatError, match="not supported"):
        blocks.dequantize(np.zeros(18, np.uint8), 99, (32,))
    with pytest.raises(FormatError, match="multiple of 32"):
        blocks.quantize(np.zeros((2, 40), np.float32), "q4_1")
    with pytest.raises(FormatError, match="cannot quantize to Q6_K"):
        blocks.quantize(np.zeros((1, 256), np.float32), "Q6_K")

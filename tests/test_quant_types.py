"""The ggml types added to those QuantLinear keeps in blocks: Q2_K, Q3_K, IQ4_NL, IQ4_XS (issue 12).

gguf-py has no quantizer for them, so the blocks are random bytes whose fp16 scales are set to finite, weight-like
values. Each type is checked three ways:
  - dequantization (numpy in herd.quant.blocks, PyTorch in herd.quant.linear) equals gguf.quants.dequantize bit
    for bit, and the C kernels' (every compiled instruction set) equals it as numbers (the sign of a zero may
    differ); test_dequant.py also runs blocks.dequantize on any bytes (inf / NaN scales);
  - QuantLinear's forward equals dequantize-then-matmul: float activations against float64 x . W^T, integer
    activations against float64 fake_quant(x) . W^T (fake_quant is the kernels' rounding, tested bit for bit in
    test_quant_linear.py). Measured worst relative error (max |y - ref| / max |ref|), k = 512 / 768: 1.3e-6 (the
    C kernels' float mode, one float32 sum along k), integer modes 3e-7; TOL is about 10x that;
  - a quantized tensor of a type QuantLinear cannot hold falls back to float32 with a one-line notice.
"""

import struct
import warnings

import gguf
import numpy as np
import pytest
import torch

from herd.config import ModelConfig
from herd.formats import gguf as G
from herd.quant import blocks, native
from herd.quant import linear as L
from herd.quant.blocks import GGML_TYPES
from herd.quant.linear import QuantLinear

NEW_TYPES = ["Q2_K", "Q3_K", "IQ4_NL", "IQ4_XS"]
HAVE_NATIVE = native.load() is not None
ISAS = list(range(native.best_isa() + 1)) if HAVE_NATIVE else []
TOL = 1e-5
# byte offsets of the fp16 scales in each block (layouts: herd/quant/blocks.py's _dq_* docstrings)
SCALES = {"Q2_K": (80, 82), "Q3_K": (108,), "IQ4_NL": (0,), "IQ4_XS": (0,)}


def random_blocks(name: str, n: int, k: int, seed: int = 0) -> np.ndarray:
    """(n, row bytes) random blocks of an (n, k) weight; every fp16 scale finite, 1e-3..2e-2 in size, either sign
    (Q2_K's dmin positive, as llama.cpp writes it)."""
    rng = np.random.default_rng(seed)
    _, qk, bs = GGML_TYPES[name]
    raw = rng.integers(0, 256, size=(n * (k // qk), bs), dtype=np.uint8)
    for i, off in enumerate(SCALES[name]):
        sign = 1 if i else rng.choice([-1, 1], raw.shape[0])
        vals = rng.uniform(1e-3, 2e-2, raw.shape[0]) * sign
        raw[:, off:off + 2] = vals.astype(np.float16).reshape(-1, 1).view(np.uint8)
    return raw.reshape(n, -1)


def reference_weight(raw: np.ndarray, name: str, n: int, k: int) -> torch.Tensor:
    return torch.from_numpy(np.asarray(gguf.quants.dequantize(raw, GGML_TYPES[name][0]), np.float32).reshape(n, k))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).abs().max() / ref.abs().max()).item()


def test_type_table_matches_gguf_py():
    for name in NEW_TYPES:
        tid, qk, bs = GGML_TYPES[name]
        qtype = gguf.GGMLQuantizationType[name]
        assert tid == int(qtype) and gguf.GGML_QUANT_SIZES[qtype] == (qk, bs)
        assert L.QUANT_TYPES[name] == GGML_TYPES[name]
    assert blocks.IQ4_NL_VALUES.tolist() == list(gguf.quants.IQ4_NL.kvalues)


@pytest.mark.parametrize("name", NEW_TYPES)
def test_dequantize_is_bit_exact(name):
    tid, qk, _ = GGML_TYPES[name]
    n, k = 21, 3 * qk
    raw = random_blocks(name, n, k, seed=tid)
    ref = reference_weight(raw, name, n, k)
    assert same_bits(torch.from_numpy(blocks.dequantize(raw, name, (n, k))), ref)
    rawt = torch.from_numpy(raw)
    assert same_bits(L.dequantize_torch(rawt, tid, k), ref)
    if HAVE_NATIVE:
        assert L._has_native(native.load(), tid)
        for isa in ISAS:  # equal as numbers: C's fmaf(d, q + 4, -4 d) gives +0 where gguf-py's d * q gives -0
            assert torch.equal(L.dequantize_native(rawt, tid, n, k, isa=isa), ref), isa
    rows = torch.tensor([4, 0, 20, 4])
    assert torch.equal(QuantLinear.from_blocks(raw, name, n, k).embedding(rows), ref[rows])


@pytest.mark.parametrize("name", NEW_TYPES)
def test_quant_linear_equals_dequantize_then_matmul(name):
    tid, qk, _ = GGML_TYPES[name]
    n, k = 37, 2 * qk
    raw = random_blocks(name, n, k, seed=n + tid)
    w = reference_weight(raw, name, n, k)
    bias = torch.randn(n)
    paths = [False] + ([True] if HAVE_NATIVE else [])
    for m in (1, 3, 33):  # decode rows, a few, and past the float GEMM switch (F32_GEMM_MIN_ROWS)
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
        for act, xr in (("f32", x), ("int8", L.fake_quantize_activations(x, 8)),
                        ("int16", L.fake_quantize_activations(x, 16))):
            ref = xr.double() @ w.double().T
            for use_native in paths:
                isas = ISAS if use_native else [-1]
                for isa in isas:
                    y = L.quant_matmul(x, torch.from_numpy(raw), tid, n, act, isa=isa, use_native=use_native)
                    assert rel_err(y, ref) < TOL, (name, m, act, use_native, isa)
            layer = QuantLinear.from_blocks(raw, name, n, k, bias=bias, act=act)
            y = layer(x.reshape(1, m, k))  # the module: eager native call where the library is loaded
            assert y.shape == (1, m, n)
            assert rel_err(y[0] - bias, ref) < TOL, (name, m, act, "module")


def test_gradient_flows_through_a_new_type():
    raw = random_blocks("Q3_K", 8, 256, seed=3)
    layer = QuantLinear.from_blocks(raw, "Q3_K", 8, 256, act="f32")
    x = torch.randn(2, 256, requires_grad=True)
    layer(x).sum().backward()
    assert torch.allclose(x.grad, reference_weight(raw, "Q3_K", 8, 256).sum(0).expand(2, -1), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# through a GGUF file: load_gguf(keep_quantized=True), then herd.quant.model.build_quantized_model

CONFIG = ModelConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=96, ffn_dim=128, norm_eps=1e-5,
                     rope_theta=500000.0, max_seq_len=64, family="llama")


def tiny_gguf(path, quant: str):
    """A 1-layer random Llama written by herd's writer; 2-D weights in `quant`, norms F32."""
    g = torch.Generator().manual_seed(0)
    state = {name: torch.randn(shape, generator=g) * 0.05 + (1.0 if len(shape) == 1 else 0.0)
             for name, shape in G.expected_shapes(CONFIG).items()}
    tokens = ["<s>", "</s>"] + [f"t{i}" for i in range(CONFIG.vocab_size - 2)]
    tok = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": ["t 0"],
           "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 1}
    G.write_gguf(path, CONFIG, state, tok, None, quant=quant)
    return path


def retype(path, from_type: str, to_type: str) -> list[str]:
    """Rewrite the type id of every tensor of `from_type` to `to_type` (same block size and bytes) in place; returns
    the GGUF names retyped. Q4_0 and IQ4_NL are both 18 bytes per 32 elements."""
    assert GGML_TYPES[from_type][1:] == GGML_TYPES[to_type][1:]
    blob = bytearray(path.read_bytes())
    names = []
    for name, t in G.read_gguf(path).tensors.items():
        if t.type_name != from_type:
            continue
        enc = name.encode()
        info = struct.pack("<Q", len(enc)) + enc + struct.pack("<I", len(t.shape)) + \
            struct.pack(f"<{len(t.shape)}Q", *reversed(t.shape))
        at = bytes(blob).index(info) + len(info)
        blob[at:at + 4] = struct.pack("<I", GGML_TYPES[to_type][0])
        names.append(name)
    path.write_bytes(bytes(blob))
    return names


def test_iq4_nl_gguf_keeps_its_blocks_and_matches_the_float_model(tmp_path):
    from herd.models.llama import build_model
    from herd.quant.model import build_quantized_model

    path = tiny_gguf(tmp_path / "m.gguf", "q4_0")
    assert retype(path, "Q4_0", "IQ4_NL")
    _, sd_q, _ = G.load_gguf(path, keep_quantized=True)
    kept = [n for n, t in sd_q.items() if not isinstance(t, torch.Tensor)]
    assert kept and all(sd_q[n].type_name in ("IQ4_NL", "Q8_0") for n in kept)
    qmodel = build_quantized_model(CONFIG, sd_q, act="f32")
    layers = {n: m for n, m in qmodel.named_modules() if isinstance(m, QuantLinear)}
    assert "layers.0.attention.wq" in layers and layers["layers.0.attention.wq"].type_name == "IQ4_NL"
    _, sd_f, _ = G.load_gguf(path)  # the float path: dequantized by blocks.dequantize
    fmodel = build_model(CONFIG, sd_f)
    tokens = torch.tensor([[0, 5, 17, 42, 3, 88]])
    with torch.no_grad():
        ref = fmodel(tokens, torch.arange(6)).double()
        got = qmodel(tokens, torch.arange(6))
    assert rel_err(got, ref) < 1e-5  # float32 rounding only (the weights are the same numbers)


def test_type_not_kept_falls_back_to_float_with_one_line_notice(tmp_path, monkeypatch):
    """Faked (every block type herd reads is kept today): QUANT_TYPES loses Q8_0, so the Q8_0 tensors of a GGUF
    loaded with keep_quantized become float32 weights, and one warning line names them and their type."""
    from herd.quant import model as QM

    path = tiny_gguf(tmp_path / "m.gguf", "q8_0")
    _, sd, _ = G.load_gguf(path, keep_quantized=True)
    kept = sorted(n for n, t in sd.items() if not isinstance(t, torch.Tensor))
    assert kept and all(sd[n].type_name == "Q8_0" for n in kept)
    monkeypatch.setattr(QM, "QUANT_TYPES", {k: v for k, v in L.QUANT_TYPES.items() if k != "Q8_0"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = QM.build_quantized_model(CONFIG, sd)
    notes = [str(w.message) for w in caught if "Q8_0" in str(w.message)]
    assert len(notes) == 1 and "\n" not in notes[0], notes
    assert all(n in notes[0] for n in kept), notes[0]
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    _, sd_f, _ = G.load_gguf(path)
    for n in kept:
        assert torch.equal(model.get_parameter(n), sd_f[n])

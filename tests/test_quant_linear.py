"""QuantLinear and its kernels against dequantize-then-float32-matmul (gguf-py's dequantizer is the reference).

Tolerances (relative to max |reference|):
  float-activation path ("f32"): 1e-5 against float64 x . W^T (only float32 rounding differs);
  int8 / int16 activation paths: 1e-5 against float64 fake_quant(x) . W^T, where fake_quant reproduces the kernels'
    integer rounding bit for bit (tested separately), and, against the float reference, within the rigorous bound
    |y - x W^T|_i <= sum over 32-blocks b of (d_b / 2) * sum_{j in b} |W_ij|  (d_b = max|x_b| / 127 or / 32767).
"""

import re
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from herd.errors import ConfigError, FormatError
from herd.quant import native
from herd.quant import linear as L
from herd.quant import model as QM
from herd.quant.blocks import GGML_TYPES
from herd.quant.linear import QuantLinear

TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]
HAVE_NATIVE = native.load() is not None
# every ISA this CPU runs (/proc/cpuinfo), not what the library happened to compile: a library built without
# -march=native fails the AVX2 / AVX-512 cases instead of leaving them out
ISAS = native.machine_isas()
ISA_PARAMS = [pytest.param(isa, id=native.ISA_NAMES[isa]) for isa in ISAS]
PATHS = [pytest.param(None, id="torch")] + ISA_PARAMS  # None: the PyTorch fallback
TOL = 1e-5


@pytest.fixture
def lib():
    """The native library, which must have every ISA of this CPU compiled in (fails, not skips, when it is not)."""
    if native.compiler() is None:
        pytest.skip("no C compiler: the native kernels cannot be built here")
    got = native.load()
    assert got is not None, f"native kernels unavailable: {native.load_error()}"
    assert native.best_isa() == max(ISAS), (native.best_isa(), [native.ISA_NAMES[i] for i in ISAS])
    return got


def random_blocks(name: str, n: int, k: int, seed: int = 0) -> np.ndarray:
    """Random bytes for every field, with fp16 scales set to sane magnitudes (no inf / NaN): (n, row bytes)."""
    rng = np.random.default_rng(seed)
    _, qk, bs = GGML_TYPES[name]
    raw = rng.integers(0, 256, size=(n * (k // qk), bs), dtype=np.uint8)

    def put(off, lo, hi):
        vals = rng.uniform(lo, hi, raw.shape[0]) * rng.choice([-1, 1], raw.shape[0])
        raw[:, off:off + 2] = vals.astype(np.float16).reshape(-1, 1).view(np.uint8)

    if name in ("Q8_0", "Q4_0", "Q5_0"):
        put(0, 1e-3, 2e-2)
    elif name in ("Q4_1", "Q5_1"):
        put(0, 1e-3, 2e-2), put(2, 0, 0.1)
    elif name in ("Q4_K", "Q5_K"):
        put(0, 1e-4, 2e-3), put(2, 1e-4, 2e-3)
    else:
        put(208, 1e-4, 2e-3)
    return raw.reshape(n, -1)


def reference_weight(raw: np.ndarray, name: str, n: int, k: int) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(raw, GGML_TYPES[name][0]).reshape(n, k).astype(np.float32))


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).abs().max() / ref.abs().max()).item()


def int_bound(x: torch.Tensor, w: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output bound on |y_int - y_f32| from rounding each activation by at most half a step d/2."""
    m, k = x.shape
    lim = 127.0 if bits == 8 else 32767.0
    half = (x.reshape(m, k // 32, 32).abs().amax(-1) / lim / 2).double()  # (m, blocks)
    wabs = w.abs().double().reshape(w.shape[0], k // 32, 32).sum(-1)  # (n, blocks)
    return half @ wabs.T


# -------------------------------------------------------------------------------------------------------------
# every type, odd shapes, 1 / 3 / 17 rows, both arithmetic modes, every compiled instruction set and the fallback

@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("n,nblocks", [(3, 5), (97, 3)])
def test_matches_dequantize_then_matmul(name, n, nblocks, isa, request):
    if isa is not None:
        request.getfixturevalue("lib")
    _, qk, _ = GGML_TYPES[name]
    k = qk * nblocks
    raw = random_blocks(name, n, k, seed=n)
    w = reference_weight(raw, name, n, k)
    rawt = torch.from_numpy(raw)
    use_native, isa_arg = isa is not None, -1 if isa is None else isa  # one path per test
    for m in (1, 3, 17):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
        ref_f = x.double() @ w.double().T
        where = f"{name} n={n} k={k} m={m} isa={isa}"
        y_f = L.quant_matmul(x, rawt, GGML_TYPES[name][0], n, "f32", isa=isa_arg, use_native=use_native)
        assert y_f.shape == (m, n)
        assert rel_err(y_f, ref_f) < TOL, where
        for act, bits in (("int8", 8), ("int16", 16)):
            y_i = L.quant_matmul(x, rawt, GGML_TYPES[name][0], n, act, isa=isa_arg, use_native=use_native)
            ref_i = L.fake_quantize_activations(x, bits).double() @ w.double().T
            assert rel_err(y_i, ref_i) < TOL, (where, act)
            slack = 1e-5 * ref_f.abs().max()
            assert ((y_i.double() - ref_f).abs() <= int_bound(x, w, bits) + slack).all(), (where, act)


def test_float_gemm_in_row_chunks(monkeypatch):
    """Float mode with many rows dequantizes W in chunks of rows for torch's GEMM (the 49152-row output layer)."""
    monkeypatch.setattr(L, "_DEQUANT_CHUNK_ELEMS", 64 * 20)  # 20 rows of 64 per chunk, 3 chunks for 45 rows
    raw = random_blocks("Q8_0", 45, 64)
    w = reference_weight(raw, "Q8_0", 45, 64)
    x = torch.randn(L.F32_GEMM_MIN_ROWS + 1, 64)
    y = L.quant_matmul(x, torch.from_numpy(raw), 8, 45, "f32")
    assert rel_err(y, x.double() @ w.double().T) < TOL


@pytest.mark.parametrize("isa", PATHS)
@pytest.mark.parametrize("name", TYPES)
def test_dequantize_is_exact(name, isa, request):
    """Every product in these formats fits float32's mantissa, so one rounding: equal to gguf-py bit for bit."""
    _, qk, _ = GGML_TYPES[name]
    n, k = 19, 3 * qk
    raw = random_blocks(name, n, k, seed=5)
    ref = reference_weight(raw, name, n, k)
    rawt = torch.from_numpy(raw)
    if isa is None:
        assert torch.equal(L.dequantize_torch(rawt, GGML_TYPES[name][0], k), ref)
    else:
        request.getfixturevalue("lib")
        assert torch.equal(L.dequantize_native(rawt, GGML_TYPES[name][0], n, k, isa=isa), ref), isa
    layer = QuantLinear.from_blocks(raw, name, n, k)
    assert torch.equal(layer.embedding(torch.tensor([3, 0, 18, 3])), ref[[3, 0, 18, 3]])


@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("m", [1, 2, 4, 5, 6, 7, 8, 9, 12, 16, 33])
def test_every_row_count_takes_a_correct_path(m, isa, lib):
    """Row counts around the kernels' switches: 4-row decode passes (and 4 / 2 weight rows per pass), the AVX-512
    int8 / int16 GEMM from 2 rows on (8-row micro-tiles, 16-row weight tiles), the fused few-row kernel for every
    row count (passes of 4, 3, 2, 1 rows), and the decode kernels forced instead."""
    for name in ("Q4_1", "Q8_0", "Q6_K"):
        _, qk, _ = GGML_TYPES[name]
        n, k = 37, 2 * qk
        raw = random_blocks(name, n, k, seed=m)
        w = reference_weight(raw, name, n, k)
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
        for act, xr in (("f32", x), ("int8", L.fake_quantize_activations(x, 8)),
                        ("int16", L.fake_quantize_activations(x, 16))):
            ref = xr.double() @ w.double().T
            for gemm_min_rows, gemv in ((2, 1), (1000, 1), (1000, 0)):
                old, old_gemv = lib.herd_q_set_gemm_min_rows(gemm_min_rows), lib.herd_q_set_gemv(gemv)
                try:
                    y = L.quant_matmul(x, torch.from_numpy(raw), GGML_TYPES[name][0], n, act, isa=isa)
                finally:
                    lib.herd_q_set_gemm_min_rows(old)
                    lib.herd_q_set_gemv(old_gemv)
                assert rel_err(y, ref) < TOL, (name, act, m, isa, gemm_min_rows, gemv)


@pytest.mark.parametrize("name", TYPES)
def test_one_row_has_the_gemm_bits(name, lib):
    """AVX-512, integer activations: a row alone (the fused one-row kernel), or with up to 8 others in the fused
    few-row kernel, gets the same bits as in a GEMM batch of any size, on 1 and 2 threads, so the engine's decode step needs no padding row for batch invariance; and
    the decode kernel it replaced agrees within the tolerance. Also at k = 8448: a long row, 264 groups of split
    int16 activations."""
    if 2 not in ISAS:  # an AVX2 machine: rows alone take the decode kernels, and the engine pads (row_granule)
        assert native.best_isa() < 2
        return
    _, qk, _ = GGML_TYPES[name]
    for n, k in ((53, 3 * qk), (17, 8448)):  # 53: three 16-row tiles and a part one; 17: one and a part one
        _one_row_has_the_gemm_bits(name, GGML_TYPES[name][0], n, k, lib)


def _one_row_has_the_gemm_bits(name, tid, n, k, lib):
    raw = torch.from_numpy(random_blocks(name, n, k, seed=11))
    x = torch.randn(9, k, generator=torch.Generator().manual_seed(3)) * torch.logspace(-2, 1, k)
    for act in ("int8", "int16"):
        for threads in (1, 2):
            batch = L.quant_matmul(x, raw, tid, n, act, threads=threads, isa=2)  # the GEMM
            old = lib.herd_q_set_gemm_min_rows(1000)  # the fused few-row kernel, passes of 4 + 3 + 2 rows
            try:
                fused = L.quant_matmul(x, raw, tid, n, act, threads=threads, isa=2)
            finally:
                lib.herd_q_set_gemm_min_rows(old)
            assert torch.equal(fused, batch), (name, act, threads, k)
            for a, b in ((0, 2), (2, 5), (5, 9)):  # 2, 3 and 4 rows: below the GEMM's switch
                assert torch.equal(L.quant_matmul(x[a:b], raw, tid, n, act, threads=threads, isa=2), batch[a:b])
            for i in range(9):
                alone = L.quant_matmul(x[i:i + 1], raw, tid, n, act, threads=threads, isa=2)
                assert torch.equal(alone[0], batch[i]), (name, act, threads, i, k)
        old = lib.herd_q_set_gemv(0)
        try:
            dec = L.quant_matmul(x[:1], raw, tid, n, act, isa=2)
        finally:
            lib.herd_q_set_gemv(old)
        assert rel_err(dec, batch[:1].double()) < TOL, (name, act)


@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("bits", [8, 16])
def test_activation_quantization_is_bit_exact(isa, bits, lib):
    """The C rounding of activations equals quantize_activations (the fallback), ties and zero blocks included."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 256, generator=g) * torch.logspace(-3, 2, 256)
    x[1, :32] = 0.0  # an all-zero block
    x[2, :32] = torch.arange(-16, 16) + 0.5  # many products land near .5
    x[3, 32:64] = torch.tensor([127.0, -63.5] * 16)  # exact halves after scaling
    q = torch.empty(5, 256, dtype=torch.int8 if bits == 8 else torch.int16)
    d = torch.empty(5, 8)
    assert lib.herd_q_quantize_act(x.data_ptr(), 5, 256, q.data_ptr(), d.data_ptr(), bits, isa) == 0
    q_ref, d_ref = L.quantize_activations(x, bits)
    assert torch.equal(q, q_ref)
    assert torch.equal(d, d_ref)
    assert q[1, :32].eq(0).all() and d[1, 0] == 0
    assert q.abs().max() == (127 if bits == 8 else 32767)


def test_native_and_fallback_agree_and_threads_do_not_change_results(lib):
    raw = torch.from_numpy(random_blocks("Q4_K", 64, 512))
    tid = GGML_TYPES["Q4_K"][0]
    x = torch.randn(3, 512)
    for act in ("f32", "int8", "int16"):
        yn1 = L.quant_matmul(x, raw, tid, 64, act, threads=1, use_native=True)
        yn2 = L.quant_matmul(x, raw, tid, 64, act, threads=2, use_native=True)
        yt = L.quant_matmul(x, raw, tid, 64, act, use_native=False)
        assert torch.equal(yn1, yn2)  # each output is summed by one thread in a fixed order
        assert rel_err(yn1, yt.double()) < TOL


def test_no_native_env_forces_the_fallback(monkeypatch):
    monkeypatch.setenv("HERD_NO_NATIVE", "1")
    native.reset()
    try:
        assert native.load() is None
        calls = []
        real = L.dequantize_torch
        monkeypatch.setattr(L, "dequantize_torch", lambda *a: calls.append(1) or real(*a))
        layer = QuantLinear.from_blocks(random_blocks("Q4_1", 8, 64), "Q4_1", 8, 64)
        y = layer(torch.randn(2, 64))
        assert calls and y.shape == (2, 8)
    finally:
        monkeypatch.delenv("HERD_NO_NATIVE")
        native.reset()
    assert (native.load() is not None) == HAVE_NATIVE


def test_fallback_caches_float_weights_until_the_blocks_change(monkeypatch):
    calls = []
    real = L.dequantize_torch
    monkeypatch.setattr(L, "dequantize_torch", lambda *a: calls.append(1) or real(*a))
    raw = torch.from_numpy(random_blocks("Q4_0", 8, 64))
    x = torch.randn(2, 64)
    y1 = L.quant_matmul(x, raw, 2, 8, "f32", use_native=False)
    y2 = L.quant_matmul(x, raw, 2, 8, "f32", use_native=False)
    assert len(calls) == 1 and torch.equal(y1, y2)
    raw[0, 0:2] = torch.tensor([0, 0x3C], dtype=torch.uint8)  # in place: d of block 0 becomes 1.0
    y3 = L.quant_matmul(x, raw, 2, 8, "f32", use_native=False)
    assert len(calls) == 2 and not torch.equal(y1, y3)
    assert rel_err(y3, x.double() @ reference_weight(raw.numpy(), "Q4_0", 8, 64).double().T) < TOL
    monkeypatch.setattr(L, "FALLBACK_CACHE_MB", 0.0)  # over budget: not cached
    L.quant_matmul(x, torch.from_numpy(random_blocks("Q4_0", 8, 64)), 2, 8, "f32", use_native=False)
    assert len(L._fallback_cache) <= 1


def test_one_openmp_runtime_shared_with_torch(lib):
    """The kernels' libgomp.so.1 must be torch's (one thread pool), not a second copy."""
    code = ("import torch, herd.quant.linear as L, herd.quant.native as n; assert n.load() is not None;"
            "maps = open('/proc/self/maps').read();"
            "print(len({l.split()[-1] for l in maps.splitlines() if 'libgomp' in l}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "1"


_PORTABILITY_CHECK = """
import ctypes, sys, numpy as np, torch, gguf
from herd.quant import native, linear as L
from herd.quant.blocks import GGML_TYPES
native._lib, native._tried = native._bind(ctypes.CDLL(sys.argv[1])), True
assert native.best_isa() == int(sys.argv[2]), native.best_isa()
blocks = np.load(sys.argv[3])
for name in blocks.files:
    raw = blocks[name]
    tid, qk, _ = GGML_TYPES[name]
    n, k = raw.shape[0], 2 * qk
    ref = torch.from_numpy(gguf.quants.dequantize(raw, tid).reshape(n, k)).double()
    assert torch.equal(L.dequantize_native(torch.from_numpy(raw), tid, n, k).double(), ref), name
    for m in (1, 2, 5, 17):
        x = torch.randn(m, k)
        for act, bits in (("f32", 0), ("int8", 8), ("int16", 16)):
            xr = x if not bits else L.fake_quantize_activations(x, bits)
            y = L.quant_matmul(x, torch.from_numpy(raw), tid, n, act, use_native=True)
            want = xr.double() @ ref.T
            assert ((y.double() - want).abs().max() / want.abs().max()) < 1e-5, (name, m, act)
print("ok")
"""


@pytest.mark.slow
@pytest.mark.skipif(native.compiler() is None, reason="no C compiler")
@pytest.mark.parametrize("flags,isa", [(["-mavx2", "-mfma", "-mf16c"], 1), (["-march=x86-64"], 0)])
def test_builds_for_older_cpus(tmp_path, flags, isa):
    """The library as compiled on an AVX2-only CPU and on a plain x86-64 one (other preprocessor branches) is
    correct too: build it with those flags here and run the checks against it in a subprocess."""
    so = tmp_path / "lib.so"
    cmd = [*native.compiler().split(), *native.BASE_FLAGS, *flags, "-fopenmp", "-o", str(so),
           *[str(native.CSRC / s) for s in native.SOURCES], "-lm"]
    subprocess.run(cmd, check=True, capture_output=True)
    np.savez(tmp_path / "blocks.npz", **{name: random_blocks(name, 21, 2 * GGML_TYPES[name][1]) for name in TYPES})
    out = subprocess.run([sys.executable, "-c", _PORTABILITY_CHECK, str(so), str(isa), str(tmp_path / "blocks.npz")],
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


# -------------------------------------------------------------------------------------------------------------
# the module: real blocks, constructors, swaps, errors, autograd, compile

def test_real_blocks_of_the_default_model(smollm_gguf):
    reader = gguf.GGUFReader(smollm_gguf)
    tensors = {t.name: t for t in reader.tensors}
    x = torch.randn(3, 1536, generator=torch.Generator().manual_seed(0))
    for name, rows in [("blk.0.attn_q.weight", None), ("blk.3.ffn_down.weight", None),
                       ("blk.7.attn_k.weight", None), ("token_embd.weight", 300)]:
        t = tensors[name]
        raw = np.asarray(t.data)[:rows] if rows else np.asarray(t.data)
        n, k = raw.shape[0], int(t.shape[0])  # GGUF shape is (in, out)
        w = torch.from_numpy(gguf.quants.dequantize(raw, t.tensor_type).reshape(n, k).astype(np.float32))
        xk = x[:, :k]
        for act in ("f32", "int8", "int16"):
            layer = QuantLinear.from_blocks(raw, int(t.tensor_type), n, k, act=act)
            xr = xk if act == "f32" else L.fake_quantize_activations(xk, 8 if act == "int8" else 16)
            assert rel_err(layer(xk), xr.double() @ w.double().T) < TOL, (name, act)
        assert torch.equal(layer.dequantize(), w)
        ids = torch.tensor([[0, 5], [n - 1, 2]])
        assert torch.equal(layer.embedding(ids), w[ids])


def test_quantized_default_model_matches_the_float_one(smollm_gguf):
    """build_quantized_model (GGUF blocks kept, tied Q8_0 embedding as output) against the dequantized float model:
    float activations agree to float rounding, int16 to ~1e-3 of the logit range, same greedy tokens."""
    from herd.formats import load_checkpoint
    from herd.models.llama import build_model
    from herd.quant.linear import QuantEmbedding
    from herd.quant.model import build_quantized_model

    ckq = load_checkpoint(smollm_gguf, keep_quantized=True, with_tokenizer=False)
    qmodel = build_quantized_model(ckq.config, ckq.state_dict)
    assert isinstance(qmodel.tok_embeddings, QuantEmbedding) and isinstance(qmodel.output, QuantLinear)
    assert qmodel.output.weight.data_ptr() == qmodel.tok_embeddings.weight.data_ptr()  # tied: one Q8_0 table
    assert isinstance(qmodel.layers[29].feed_forward.w2, QuantLinear)
    ckf = load_checkpoint(smollm_gguf, with_tokenizer=False)
    fmodel = build_model(ckf.config, ckf.state_dict)
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 2, 28, 1400, 30]])
    with torch.inference_mode():
        ref = fmodel(ids)
        for act, tol in (("int16", 2e-3), ("f32", 1e-5)):
            for mod in qmodel.modules():
                if isinstance(mod, QuantLinear):
                    mod.act = act
            out = qmodel(ids)
            assert rel_err(out, ref.double()) < tol, act
            assert torch.equal(out.argmax(-1), ref.argmax(-1)), act


def test_quant_embedding_rows_and_errors():
    raw = random_blocks("Q8_0", 10, 64)
    emb = L.QuantEmbedding.from_blocks(raw, "Q8_0", 10, 64)
    ref = reference_weight(raw, "Q8_0", 10, 64)
    ids = torch.tensor([[9, 0], [3, 3]])
    assert torch.equal(emb(ids), ref[ids])
    assert rel_err(emb.as_linear(act="f32")(ref[:2]), ref[:2].double() @ ref.double().T) < TOL
    with pytest.raises(ConfigError, match="out of range"):
        emb(torch.tensor([10]))


@pytest.mark.parametrize("scheme,max_rel_rms", [("q8_0", 0.01), ("q4_0", 0.15), ("q4_1", 0.12), ("q5_0", 0.07),
                                                ("q5_1", 0.06), ("q4_k", 0.12)])
def test_from_float_quantizes_within_scheme_error(scheme, max_rel_rms):
    w = torch.randn(48, 512, generator=torch.Generator().manual_seed(2))
    layer = QuantLinear.from_float(w, scheme)
    assert layer.weight.dtype == torch.uint8 and layer.type_name == scheme.upper()
    ref = torch.from_numpy(gguf.quants.dequantize(layer.weight.numpy(), layer.ggml_type).reshape(48, 512))
    assert torch.equal(layer.dequantize(), ref)  # our blocks are valid GGML blocks, read back by gguf-py
    rel_rms = ((ref - w).pow(2).mean() / w.pow(2).mean()).sqrt().item()
    assert rel_rms < max_rel_rms
    x = torch.randn(2, 512)
    layer.act = "f32"
    assert rel_err(layer(x), x.double() @ ref.double().T) < TOL


def test_q4_k_quantizer_is_close_to_q4_1():
    """Our simple Q4_K fit (6-bit sub-block scales) loses little against per-32 fp16 scales of Q4_1."""
    w = torch.randn(16, 1024, generator=torch.Generator().manual_seed(3)) * torch.linspace(0.1, 3, 1024)
    errs = {}
    for s in ("q4_1", "q4_k"):
        errs[s] = (QuantLinear.from_float(w, s).dequantize() - w).pow(2).mean().item()
    assert errs["q4_k"] < 1.05 * errs["q4_1"], errs


def test_concat_equals_separate_layers():
    layers = [QuantLinear.from_float(torch.randn(n, 64), "q4_0", act="f32") for n in (8, 4, 4)]
    fused = QuantLinear.concat(layers)
    x = torch.randn(3, 64)
    assert torch.allclose(fused(x), torch.cat([l(x) for l in layers], -1), rtol=1e-6, atol=1e-6)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = nn.ModuleDict({"wq": nn.Linear(64, 64, bias=False), "wo": nn.Linear(64, 64, bias=False)})
        self.w1 = nn.Linear(64, 96, bias=True)
        self.head = nn.Linear(96, 10, bias=False)  # 96 is not a multiple of 256: Q4_K must skip it

    def forward(self, x):
        return self.head(torch.relu(self.w1(self.attention["wo"](self.attention["wq"](x)))))


def test_quantize_model_swaps_modules_and_keeps_the_function():
    torch.manual_seed(0)
    model = Tiny()
    x = torch.randn(4, 64)
    ref = model(x)
    swapped = QM.quantize_model(model, "q8_0", exclude=r"^head$", act="f32")
    assert swapped == ["attention.wq", "attention.wo", "w1"]
    assert isinstance(model.attention["wq"], QuantLinear) and type(model.head) is nn.Linear
    assert model.w1.bias is not None
    assert rel_err(model(x), ref.double()) < 0.02  # Q8_0 weights
    assert QM.quantize_model(Tiny(), "q4_k") == []  # no in_features multiple of 256
    with pytest.raises(ConfigError, match="unknown quantization scheme"):
        QM.quantize_model(Tiny(), "q3_z")


def test_load_quantized_linears_from_gguf_style_dict():
    model = Tiny()
    raw = random_blocks("Q4_1", 64, 64)
    tensors = {"attention.wq.weight": (raw, "Q4_1", (64, 64)),
               "attention.wo.weight": (np.zeros((64, 64), np.float32).view(np.uint8), 0, (64, 64))}  # F32: skipped
    assert QM.load_quantized_linears(model, tensors) == ["attention.wq"]
    assert torch.equal(model.attention["wq"].dequantize(), reference_weight(raw, "Q4_1", 64, 64))
    with pytest.raises(FormatError, match="attention.wz"):
        QM.load_quantized_linears(model, {"attention.wz.weight": (raw, "Q4_1", (64, 64))})
    with pytest.raises(FormatError, match=re.escape("(32, 128)")):
        QM.load_quantized_linears(Tiny(), {"attention.wo.weight": (raw, "Q4_1", (32, 128))})
    assert QM.load_quantized_linears(model, {"nope.weight": (raw, "Q4_1", (64, 64))}, strict=False) == []


def test_bad_inputs_raise_typed_errors():
    raw = random_blocks("Q4_1", 8, 64)
    with pytest.raises(FormatError, match="needs 320 bytes, got 319"):
        QuantLinear.from_blocks(raw.reshape(-1)[:-1], "Q4_1", 8, 64)
    with pytest.raises(ConfigError, match="multiple of 32"):
        QuantLinear(48, 8, "Q4_1")
    with pytest.raises(FormatError, match="cannot multiply ggml type F16"):
        QuantLinear(64, 8, 1)
    with pytest.raises(FormatError, match="not supported"):
        QuantLinear(64, 8, 99)
    with pytest.raises(FormatError, match="uint8"):
        QuantLinear.from_blocks(torch.zeros(80, dtype=torch.float32), "Q4_1", 8, 64)
    with pytest.raises(ConfigError, match="act must be"):
        QuantLinear(64, 8, "Q8_0", act="fp8")
    with pytest.raises(ConfigError):
        L.quant_matmul(torch.randn(2, 96), torch.from_numpy(raw), 3, 8)  # 96 inputs but rows hold 64


def test_gradient_with_respect_to_x():
    layer = QuantLinear.from_float(torch.randn(16, 64), "q4_1", act="f32")
    x = torch.randn(3, 64, requires_grad=True)
    layer(x).pow(2).sum().backward()
    xr = x.detach().clone().requires_grad_(True)
    (xr @ layer.dequantize().T).pow(2).sum().backward()
    assert torch.allclose(x.grad, xr.grad, rtol=1e-4, atol=1e-5)


def test_op_registration_passes_opcheck():
    raw = torch.from_numpy(random_blocks("Q8_0", 16, 64))
    x = torch.randn(2, 64)
    torch.library.opcheck(torch.ops.herd.quant_linear.default, (x, raw, 8, 16, 0, 0),
                          test_utils=("test_schema", "test_faketensor"))


def test_works_under_torch_compile():
    layer = QuantLinear.from_float(torch.randn(32, 64), "q4_0", act="int8")
    x = torch.randn(3, 64)
    compiled = torch.compile(lambda t: torch.relu(layer(t)) * 2, fullgraph=True, backend="eager")
    assert torch.allclose(compiled(x), torch.relu(layer(x)) * 2)


@pytest.mark.slow
def test_inductor_compiles_a_block_with_quantized_layers():
    """Inductor keeps the op opaque (fake impl for shapes), fuses around it, and matches eager."""
    a = QuantLinear.from_float(torch.randn(128, 64), "q4_1")
    b = QuantLinear.from_float(torch.randn(64, 128), "q8_0")
    f = lambda t: b(F.silu(a(t)) * 2)
    compiled = torch.compile(f, fullgraph=True)
    for m in (3, 5):
        x = torch.randn(m, 64)
        assert torch.allclose(compiled(x), f(x), rtol=1e-5, atol=1e-5)

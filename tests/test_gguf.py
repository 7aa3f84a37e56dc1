"""herd.formats.gguf: the reader against gguf-py, load_gguf on the default model, write/read round trips, the
q/k row order against transformers, llama3 rope factors against transformers, and a damaged-file property test."""

import contextlib
import dataclasses
import math
import resource
import struct
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import quants as ref
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from herd.config import ModelConfig, RopeScaling
from herd.errors import ConfigError, FormatError, ModelNotFoundError
from herd.formats import gguf as G
from herd.formats.keymaps import permute_meta_to_hf

# ---------------------------------------------------------------------------------------------------------------
# helpers


def tiny_config(**changes) -> ModelConfig:
    base = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, ffn_dim=160, norm_eps=1e-5,
                       rope_theta=500000.0, max_seq_len=256, family="llama")
    return dataclasses.replace(base, **changes)


def random_state(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: (torch.randn(shape, generator=g) * (0.02 if len(shape) == 2 else 1.0) + (1.0 if len(shape) == 1
                                                                                            else 0.0))
            for name, shape in G.expected_shapes(config).items()}


def tiny_tokenizer(vocab: int) -> dict:
    """A minimal byte-level BPE vocabulary in GGUF form (enough for llama.cpp and for round trips)."""
    tokens = ["<s>", "</s>"] + [f"t{i}" for i in range(vocab - 2)]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": np.array([3, 3] + [1] * (vocab - 2), np.int32),
            "tokenizer.ggml.merges": ["t 0"], "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 1,
            "tokenizer.ggml.add_bos_token": True}


def ref_roundtrip(x: torch.Tensor, type_name: str) -> torch.Tensor:
    """gguf-py quantize then dequantize: what a tensor written as type_name must read back as."""
    a = x.to(torch.float32).numpy()
    if type_name == "F32":
        return x.to(torch.float32)
    if type_name == "F16":
        return torch.from_numpy(a.astype(np.float16).astype(np.float32))
    qtype = gguf.GGMLQuantizationType[type_name]
    return torch.from_numpy(np.asarray(ref.dequantize(ref.quantize(a, qtype), qtype), np.float32).reshape(a.shape))


# --- a byte-level GGUF builder for damaged files (independent of herd's and gguf-py's writers) ---

def s8(text: str | bytes) -> bytes:
    b = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(b)) + b


def kv_str(key: str, value: str) -> bytes:
    return s8(key) + struct.pack("<I", 8) + s8(value)


def kv_u32(key: str, value: int) -> bytes:
    return s8(key) + struct.pack("<II", 4, value)


def tensor_info(name: str, ne: list[int], ggml_type: int, offset: int, n_dims: int | None = None) -> bytes:
    n = len(ne) if n_dims is None else n_dims
    return s8(name) + struct.pack("<I", n) + b"".join(struct.pack("<Q", d) for d in ne) + struct.pack(
        "<IQ", ggml_type, offset)


def raw_gguf(kvs: list[bytes] | None = None, infos: list[bytes] | None = None, data: bytes | None = None,
             version: int = 3, n_kv: int | None = None, n_tensors: int | None = None, magic: bytes = b"GGUF",
             alignment: int = 32) -> bytes:
    """By default: tensor a = F32 [8] of zeros at offset 0, tensor b = Q8_0 [2, 32] of ones at offset 64."""
    kvs = [kv_str("general.architecture", "llama")] if kvs is None else kvs
    infos = [tensor_info("a", [8], 0, 0), tensor_info("b", [32, 2], 8, 64)] if infos is None else infos
    if data is None:
        data = bytes(64) + (struct.pack("<e", 1.0) + bytes([1] * 32)) * 2
    head = magic + struct.pack("<IQQ", version, len(infos) if n_tensors is None else n_tensors,
                               len(kvs) if n_kv is None else n_kv) + b"".join(kvs) + b"".join(infos)
    return head + bytes(-len(head) % alignment) + data


def write(tmp_path: Path, blob: bytes, name: str = "x.gguf") -> Path:
    p = tmp_path / name
    p.write_bytes(blob)
    return p


# ---------------------------------------------------------------------------------------------------------------
# the reader


@pytest.fixture(scope="module")
def gguf_py_reader(smollm_gguf):
    return gguf.GGUFReader(smollm_gguf)


def test_reader_matches_gguf_py_on_default_model(smollm_gguf, gguf_py_reader):
    t0 = time.perf_counter()
    g = G.read_gguf(smollm_gguf)
    opened = time.perf_counter() - t0
    r = gguf_py_reader
    assert g.version == 3 and g.architecture == "llama" and g.alignment == 32 and g.data_offset == r.data_offset
    assert list(g.tensors) == [t.name for t in r.tensors]
    for t in r.tensors:
        mine = g.tensors[t.name]
        assert mine.ggml_type == int(t.tensor_type)
        assert mine.shape == tuple(int(d) for d in reversed(t.shape.tolist()))
        assert mine.data.nbytes == t.n_bytes
        assert np.array_equal(mine.data, np.asarray(t.data).reshape(-1).view(np.uint8)), t.name
    keys = [k for k in r.fields if not k.startswith("GGUF.")]
    assert list(g.metadata) == keys
    for k in keys:
        field = r.fields[k]
        want = field.contents()
        got = g.metadata[k]
        assert g.value_types[k][0] == int(field.types[0]), k
        if isinstance(got, float):
            assert np.float32(got) == np.float32(want), k  # shortest decimal of the same float32
        else:
            assert got == want, k
    print(f"read_gguf opened the default model in {opened * 1000:.0f} ms")


def test_load_default_model(smollm_gguf):
    t0 = time.perf_counter()
    config, sd, meta = G.load_gguf(smollm_gguf)
    took = time.perf_counter() - t0
    # NOTES.md facts
    assert (config.dim, config.n_layers, config.ffn_dim, config.n_heads, config.n_kv_heads) == (576, 30, 1536, 9, 3)
    assert (config.rope_theta, config.norm_eps, config.max_seq_len, config.vocab_size) == (1e5, 1e-5, 8192, 49152)
    assert config.tie_embeddings and config.rope_scaling is None and config.head_dim == 64
    assert "output.weight" not in sd and "rope.freqs" not in sd
    assert {k: tuple(v.shape) for k, v in sd.items()} == G.expected_shapes(config)
    assert all(v.dtype == torch.float32 for v in sd.values())
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "smollm"
    assert len(meta["tokenizer.ggml.merges"]) == 48900 and meta["tokenizer.ggml.bos_token_id"] == 1
    assert "<|im_start|>" in meta["tokenizer.chat_template"]
    print(f"load_gguf (open + dequantize to float32) took {took:.2f} s")

    _, sdq, _ = G.load_gguf(smollm_gguf, keep_quantized=True)
    quantized = {k: v for k, v in sdq.items() if isinstance(v, G.GGUFTensor)}
    assert len(quantized) == 30 * 7 + 1  # every linear weight (Q4_1) and the tied embedding (Q8_0)
    assert sdq["tok_embeddings.weight"].type_name == "Q8_0"
    assert all(isinstance(sdq[f"layers.{i}.ffn_norm.weight"], torch.Tensor) for i in range(30))
    w = sdq["layers.7.feed_forward.w2.weight"]
    assert w.type_name == "Q4_1" and w.shape == (576, 1536)
    assert torch.equal(torch.from_numpy(w.dequantize()), sd["layers.7.feed_forward.w2.weight"])


def test_qk_rows_are_meta_order_as_transformers_reads_them(smollm_gguf):
    """transformers un-permutes GGUF attn_q/attn_k into rotate-half order; that equals herd's permute_meta_to_hf
    of herd's (unpermuted) wq/wk, so GGUF rows are Meta's interleaved order and herd needs no permutation."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    g = G.read_gguf(smollm_gguf)
    config, sd, _ = G.load_gguf(smollm_gguf)
    proc = LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    for i in (0, 17, 29):
        for kind, heads in (("q", 9), ("k", 3)):
            raw = g.tensors[f"blk.{i}.attn_{kind}.weight"].dequantize()
            hf = torch.from_numpy(np.ascontiguousarray(proc.process(raw, f"blk.{i}.attn_{kind}.weight").weights))
            herd_w = sd[f"layers.{i}.attention.w{kind}.weight"]
            assert torch.equal(hf, permute_meta_to_hf(herd_w, heads))
            assert not torch.equal(hf, herd_w)


@pytest.mark.slow
def test_qk_rows_against_transformers_full_gguf_load(smollm_gguf):
    """The same claim through transformers' whole GGUF loader (about 15 s)."""
    from transformers import AutoModelForCausalLM

    ref_model = AutoModelForCausalLM.from_pretrained(smollm_gguf.parent, gguf_file=smollm_gguf.name,
                                                     dtype=torch.float32)
    _, sd, _ = G.load_gguf(smollm_gguf)
    for i in (0, 29):
        attn = ref_model.model.layers[i].self_attn
        assert torch.equal(attn.q_proj.weight, permute_meta_to_hf(sd[f"layers.{i}.attention.wq.weight"], 9))
        assert torch.equal(attn.k_proj.weight, permute_meta_to_hf(sd[f"layers.{i}.attention.wk.weight"], 3))
        assert torch.equal(attn.v_proj.weight, sd[f"layers.{i}.attention.wv.weight"])
        assert torch.equal(ref_model.model.layers[i].mlp.gate_proj.weight, sd[f"layers.{i}.feed_forward.w1.weight"])
    assert torch.equal(ref_model.model.embed_tokens.weight, sd["tok_embeddings.weight"])


# ---------------------------------------------------------------------------------------------------------------
# writing


@pytest.mark.parametrize("quant", ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"])
@pytest.mark.parametrize("variant", ["untied", "tied-llama3.2-scaling", "head-dim-override"])
def test_write_read_roundtrip(tmp_path, quant, variant):
    config = {
        "untied": tiny_config(),
        "tied-llama3.2-scaling": tiny_config(tie_embeddings=True, rope_scaling=RopeScaling(factor=32.0),
                                             max_seq_len=1024),
        "head-dim-override": tiny_config(head_dim_override=32, n_heads=4, n_kv_heads=1, norm_eps=1e-6,
                                         rope_theta=10000.0),
    }[variant]
    sd = random_state(config)
    path = tmp_path / "m.gguf"
    tok = tiny_tokenizer(config.vocab_size)
    G.write_gguf(path, config, sd, tok, "{{ messages }}", quant=quant, name="tiny")
    assert not list(tmp_path.glob(".*tmp*"))  # the temp file was renamed

    config2, sd2, meta = G.load_gguf(path)
    assert config2 == config
    _, sd16, _ = G.load_gguf(path, dtype=torch.bfloat16)
    assert all(torch.equal(sd16[k], v.to(torch.bfloat16)) for k, v in sd2.items())
    assert meta["general.name"] == "tiny" and meta["tokenizer.chat_template"] == "{{ messages }}"
    assert meta["tokenizer.ggml.tokens"] == tok["tokenizer.ggml.tokens"]
    assert meta["tokenizer.ggml.token_type"] == tok["tokenizer.ggml.token_type"].tolist()
    assert set(sd2) == set(sd)
    g = G.read_gguf(path)
    weight_type, output_type, file_type = G.WRITE_QUANTS[quant]
    assert meta["general.file_type"] == file_type
    for name, x in sd.items():
        gname = G.herd_to_gguf_name(name)
        kind = g.tensors[gname].type_name
        if x.dim() == 1:
            assert kind == "F32", name
        elif name == "output.weight" or (name == "tok_embeddings.weight" and config.tie_embeddings):
            assert kind == output_type, name
        else:
            assert kind == weight_type, name
        want = x.to(torch.bfloat16).float() if kind == "BF16" else ref_roundtrip(x, kind)
        assert torch.equal(sd2[name], want), name
    # gguf-py's reader agrees on what was written
    r = gguf.GGUFReader(path)
    assert {t.name for t in r.tensors} == set(g.tensors)
    assert int(r.fields["llama.block_count"].contents()) == 2
    if config.rope_scaling is not None:
        assert "rope_freqs.weight" in g.tensors


def test_llama3_rope_factors_match_transformers():
    """Divisors written as rope_freqs give transformers' llama3-scaled inverse frequencies."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for factor, hd, theta, ctx in ((8.0, 128, 500000.0, 131072), (32.0, 64, 500000.0, 131072),
                                   (16.0, 128, 500000.0, 262144)):
        scaling = RopeScaling(factor=factor)
        hf = LlamaConfig(hidden_size=hd * 4, num_attention_heads=4, max_position_embeddings=ctx,
                         rope_parameters={"rope_type": "llama3", "rope_theta": theta, "factor": factor,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192})
        inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
        base = 1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
        divisors = G.llama3_rope_factors(scaling, hd, theta)
        np.testing.assert_allclose(base / divisors, inv_freq.double().numpy(), rtol=2e-6)
        assert G.rope_scaling_from_factors(divisors, hd, theta) == scaling


def test_unrecognized_rope_freqs_are_kept(tmp_path):
    config = tiny_config()
    sd = random_state(config)
    sd["rope.freqs"] = torch.linspace(1.0, 3.0, config.head_dim // 2)  # no llama3 setting gives these
    G.write_gguf(tmp_path / "m.gguf", config, sd, tiny_tokenizer(config.vocab_size), None, quant="f32")
    config2, sd2, _ = G.load_gguf(tmp_path / "m.gguf")
    assert config2.rope_scaling is None
    assert torch.equal(sd2["rope.freqs"], sd["rope.freqs"])


@pytest.mark.parametrize("name, vocab, scaling, family", [
    ("Meta Llama 3.1 8B Instruct", 96, None, "llama3.1"),
    ("Llama-2-7b-chat", 96, None, "llama2"),
    ("", 128256, RopeScaling(factor=32.0), "llama3.2"),
    ("", 128256, None, "llama3"),
    ("SmolLM2", 96, RopeScaling(factor=8.0), "llama"),
])
def test_family_guess(tmp_path, name, vocab, scaling, family):
    config = tiny_config(vocab_size=vocab, dim=32, n_heads=2, n_kv_heads=1, ffn_dim=32, n_layers=1,
                         rope_scaling=scaling, max_seq_len=1024)
    G.write_gguf(tmp_path / "m.gguf", config, random_state(config), {}, None, quant="q8_0", name=name)
    assert G.load_gguf(tmp_path / "m.gguf")[0] == dataclasses.replace(config, family=family)


def test_write_rejects_bad_input(tmp_path):
    config = tiny_config()
    sd = random_state(config)
    tok = tiny_tokenizer(config.vocab_size)
    with pytest.raises(ConfigError, match="q3_k"):
        G.write_gguf(tmp_path / "m.gguf", config, sd, tok, None, quant="q3_k")
    with pytest.raises(ConfigError, match="tokenizer has 95 tokens but the model's vocabulary is 96"):
        G.write_gguf(tmp_path / "m.gguf", config, sd, tiny_tokenizer(95), None)
    bad = dict(sd)
    del bad["layers.1.feed_forward.w2.weight"]
    bad["layers.9.attention.wq.weight"] = torch.zeros(1)
    with pytest.raises(FormatError, match=r"missing \['layers.1.feed_forward.w2.weight'\]"):
        G.write_gguf(tmp_path / "m.gguf", config, bad, tok, None)
    bad = dict(sd, **{"norm.weight": torch.zeros(63)})
    with pytest.raises(FormatError, match="norm.weight has shape"):
        G.write_gguf(tmp_path / "m.gguf", config, bad, tok, None)
    assert not list(tmp_path.iterdir())  # nothing left behind


@pytest.mark.llamacpp
@pytest.mark.parametrize("quant", ["f16", "q8_0", "q4_0"])
def test_llama_cpp_loads_written_model(tmp_path, smollm_gguf, quant):
    llama_cpp = pytest.importorskip("llama_cpp")
    meta = G.read_gguf(smollm_gguf).metadata
    try:  # herd's tokenizer -> GGUF metadata, when that module is there; else the default model's own fields
        from herd.formats.gguf_vocab import tokenizer_from_gguf, tokenizer_to_gguf_metadata

        tok = tokenizer_to_gguf_metadata(tokenizer_from_gguf(meta))
    except ImportError:
        tok = {k: v for k, v in meta.items() if k.startswith("tokenizer.ggml.")}
    config = tiny_config(vocab_size=49152, max_seq_len=2048, rope_scaling=RopeScaling(factor=8.0),
                         tie_embeddings=quant != "q8_0")
    path = tmp_path / "tiny.gguf"
    G.write_gguf(path, config, random_state(config), tok, meta["tokenizer.chat_template"], quant=quant,
                 name="herd tiny")
    vocab_only = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    original = llama_cpp.Llama(str(smollm_gguf), vocab_only=True, verbose=False)
    assert vocab_only.n_vocab() == 49152
    for text in (b"Hello world", b"The capital of France is Paris.", "caf\u00e9 \u2014 \U0001f600".encode()):
        assert vocab_only.tokenize(text, add_bos=False) == original.tokenize(text, add_bos=False)
    llm = llama_cpp.Llama(str(path), n_ctx=64, n_threads=2, verbose=False)
    assert (llm.n_vocab(), llm._model.n_ctx_train(), llm.n_embd()) == (49152, 2048, 64)
    assert llm._model.n_params() == config.n_params + config.head_dim // 2  # every weight, and rope_freqs
    assert llm.metadata["llama.block_count"] == "2" and llm.metadata["general.name"] == "herd tiny"
    assert llm.metadata["tokenizer.chat_template"] == meta["tokenizer.chat_template"]
    llm.eval([1, 2, 3, 4])
    logits = np.asarray(llm.scores[3])
    assert logits.shape == (49152,) and np.isfinite(logits).all()


@pytest.mark.llamacpp
def test_llama_cpp_logits_match_herd_on_written_model(tmp_path, smollm_gguf):
    """The q/k row order and the rope_freqs tensor, checked through llama.cpp itself: a float32 GGUF written by
    herd gives llama.cpp's logits within 1e-4 of herd's model; the other q/k order, or dropping the llama3 scaling,
    would be off by far more. q/k weights are large so that attention is far from uniform."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from herd.models.llama import build_model

    tok = {k: v for k, v in G.read_gguf(smollm_gguf).metadata.items() if k.startswith("tokenizer.ggml.")}
    config = tiny_config(vocab_size=49152, max_seq_len=2048, rope_scaling=RopeScaling(factor=8.0),
                         rope_theta=10000.0)
    sd = random_state(config)
    for name in sd:
        if ".wq." in name or ".wk." in name:
            sd[name] = sd[name] * 15
    path = tmp_path / "tiny-f32.gguf"
    G.write_gguf(path, config, sd, tok, None, quant="f32")
    llm = llama_cpp.Llama(str(path), n_ctx=64, n_threads=2, verbose=False, logits_all=True,
                          type_k=0, type_v=0)  # float32 KV cache: no fp16 rounding on llama.cpp's side
    tokens = list(range(100, 140))
    llm.eval(tokens)
    want = torch.from_numpy(np.asarray(llm.scores[:len(tokens)]))

    config2, sd2, _ = G.load_gguf(path)

    def logits(cfg, weights):
        with torch.no_grad():
            return build_model(cfg, weights)(torch.tensor([tokens]))[0]

    assert (logits(config2, sd2) - want).abs().max().item() < 1e-4
    swapped = dict(sd2)
    for i in range(config.n_layers):
        for kind, heads in (("q", config.n_heads), ("k", config.n_kv_heads)):
            name = f"layers.{i}.attention.w{kind}.weight"
            swapped[name] = permute_meta_to_hf(sd2[name], heads)
    assert (logits(config2, swapped) - want).abs().max().item() > 0.1
    unscaled = dataclasses.replace(config2, rope_scaling=None)
    assert (logits(unscaled, sd2) - want).abs().max().item() > 1e-2


# ---------------------------------------------------------------------------------------------------------------
# damaged files


def test_builder_makes_a_valid_file(tmp_path):
    g = G.read_gguf(write(tmp_path, raw_gguf()))
    assert g.tensors["a"].shape == (8,) and g.tensors["b"].shape == (2, 32)
    assert np.array_equal(g.tensors["a"].dequantize(), np.zeros(8, np.float32))
    assert np.array_equal(g.tensors["b"].dequantize(), np.ones((2, 32), np.float32))


CASES = {
    "empty file": (b"", "too short"),
    "wrong magic": (raw_gguf(magic=b"GGUX"), "not a GGUF file"),
    "version 1": (raw_gguf(version=1), "version 1 is not supported"),
    "version 4": (raw_gguf(version=4), "version 4 is not supported"),
    "big-endian": (raw_gguf(version=3 << 24), "big-endian"),
    "absurd tensor count": (raw_gguf(n_tensors=1 << 40), "more than a"),
    "absurd kv count": (raw_gguf(n_kv=1 << 62), "more than a"),
    "absurd key length": (raw_gguf(kvs=[struct.pack("<Q", 1 << 63) + b"general"]), "more than the limit"),
    "absurd string length": (raw_gguf(kvs=[s8("general.architecture") + struct.pack("<IQ", 8, 1 << 60)]),
                             "needs 1152921504606846976 bytes"),
    "absurd array length": (raw_gguf(kvs=[kv_str("general.architecture", "llama"),
                                          s8("x") + struct.pack("<IIQ", 9, 8, 1 << 58)]), "array of"),
    "huge number array": (raw_gguf(kvs=[kv_str("general.architecture", "llama"), s8("x") + struct.pack(
        "<IIQ", 9, 0, (1 << 22) + 1) + bytes((1 << 22) + 1)]), "more than herd reads"),
    "unknown value type": (raw_gguf(kvs=[s8("x") + struct.pack("<I", 13)]), "unknown value type 13"),
    "deeply nested array": (raw_gguf(kvs=[s8("x") + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 6]),
                            "nested"),
    "duplicate key": (raw_gguf(kvs=[kv_str("general.architecture", "llama")] * 2), "appears twice"),
    "non-UTF-8 key": (raw_gguf(kvs=[kv_str("general.architecture", "llama"), kv_u32("k\xff", 1).replace(
        b"k\xc3\xbf", b"k\xff\xff")]), "not valid UTF-8"),
    "no architecture": (raw_gguf(kvs=[kv_u32("general.alignment", 32)]), "general.architecture"),
    "alignment not a power of two": (raw_gguf(kvs=[kv_str("general.architecture", "llama"),
                                                   kv_u32("general.alignment", 24)]), "power of two"),
    "5 dims": (raw_gguf(infos=[tensor_info("a", [1, 1, 1, 1, 8], 0, 0)]), "5 dimensions"),
    "0 dims": (raw_gguf(infos=[tensor_info("a", [], 0, 0)]), "0 dimensions"),
    "zero dim": (raw_gguf(infos=[tensor_info("a", [8, 0], 0, 0)]), "bad dimensions"),
    "negative dim": (raw_gguf(infos=[tensor_info("a", [8, (1 << 64) - 2], 0, 0)]), "bad dimensions"),
    "huge tensor": (raw_gguf(infos=[tensor_info("a", [1 << 40, 1 << 20], 0, 0)]), "more than the whole file"),
    "unknown type": (raw_gguf(infos=[tensor_info("a", [8], 99, 0)]), "unknown ggml type 99"),
    "row not whole blocks": (raw_gguf(infos=[tensor_info("a", [31], 2, 0)]), "not a multiple"),
    "offset past end": (raw_gguf(infos=[tensor_info("a", [8], 0, 1 << 20)]), "past the end"),
    "size past end": (raw_gguf(infos=[tensor_info("a", [64], 0, 64)]), "past the end"),
    "unaligned offset": (raw_gguf(infos=[tensor_info("a", [8], 0, 16)]), "not a multiple of the alignment"),
    "overlap": (raw_gguf(infos=[tensor_info("a", [16], 0, 0), tensor_info("b", [8], 0, 32)]), "overlap"),
    "duplicate tensor": (raw_gguf(infos=[tensor_info("a", [8], 0, 0), tensor_info("a", [8], 0, 32)]),
                         "appears twice"),
    "long tensor name": (raw_gguf(infos=[tensor_info("n" * 64, [8], 0, 0)]), "limit of 63"),
    "truncated in metadata": (raw_gguf()[:40], "truncated"),
    "truncated in tensor infos": (raw_gguf()[:110], r"tensor #1 at byte 110 needs 1 bytes .* \(truncated"),
    "truncated in tensor data": (raw_gguf()[:-10], "past the end"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_damaged_file_gives_format_error(tmp_path, case):
    blob, message = CASES[case]
    path = write(tmp_path, blob)
    with pytest.raises(FormatError, match=message) as e:
        G.read_gguf(path)
    assert str(path) in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(ModelNotFoundError):
        G.read_gguf(tmp_path / "nope.gguf")


def test_unsupported_type_fails_at_load(tmp_path):
    config = tiny_config()
    path = tmp_path / "m.gguf"
    G.write_gguf(path, config, random_state(config), tiny_tokenizer(config.vocab_size), None, quant="f32")
    blob = bytearray(path.read_bytes())
    g = G.read_gguf(path)
    # retype blk.0.attn_q (64 x 64 F32, 16 KiB) as Q8_1 (32 elems in 36 bytes): a real ggml type herd lacks
    info = s8("blk.0.attn_q.weight") + struct.pack("<IQQ", 2, 64, 64)
    at = bytes(blob).index(info) + len(info)
    blob[at:at + 4] = struct.pack("<I", int(gguf.GGMLQuantizationType.Q8_1))
    path.write_bytes(bytes(blob))
    assert G.read_gguf(path).tensors["blk.0.attn_q.weight"].type_name == "Q8_1"
    with pytest.raises(FormatError, match="blk.0.attn_q.weight is Q8_1, which herd cannot dequantize"):
        G.load_gguf(path)
    del g


@pytest.fixture(scope="module")
def fuzz_bases(smollm_gguf, tmp_path_factory):
    """Two real headers to damage: a small herd-written model, and the first 2 MB of the default model."""
    config = tiny_config(rope_scaling=RopeScaling(factor=8.0), max_seq_len=512)
    small = tmp_path_factory.mktemp("fuzz") / "small.gguf"
    G.write_gguf(small, config, random_state(config), tiny_tokenizer(config.vocab_size), "{{ x }}", quant="q4_0")
    with open(smollm_gguf, "rb") as f:
        prefix = f.read(2 << 20)
    # mutate only the header (the bytes before the tensor data), where the parsing happens
    return {"small": (small.read_bytes(), G.read_gguf(small).data_offset),
            "smollm-prefix": (prefix, G.read_gguf(smollm_gguf).data_offset)}


INTERESTING = [0, 1, 2, 3, 4, 5, 7, 8, 9, 13, 31, 32, 63, 64, 255, 256, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
               2**62, 2**63 - 1, 2**63, 2**64 - 1]


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_damaged_headers_give_format_error_quickly(fuzz_bases, data):
    """Random byte edits, integer-field overwrites and truncations of real headers: read_gguf either succeeds or
    raises FormatError (load_gguf: FormatError or ConfigError), in well under 2 s and without a large allocation."""
    base = data.draw(st.sampled_from(sorted(fuzz_bases)))
    blob, header_end = fuzz_bases[base]
    blob = bytearray(blob)
    # anywhere in the header, or in its first KiB (general.* and llama.* keys), or its end (tensor infos)
    lo, hi = data.draw(st.sampled_from([(0, header_end), (0, 1024), (header_end - 2600, header_end)]))
    for _ in range(data.draw(st.integers(1, 6))):
        at = data.draw(st.integers(max(0, lo), min(hi, header_end) - 8))
        kind = data.draw(st.sampled_from(["byte", "u32", "u64"]))
        if kind == "byte":
            blob[at] = data.draw(st.integers(0, 255))
        else:
            width = 4 if kind == "u32" else 8
            value = data.draw(st.sampled_from(INTERESTING)) % (1 << 8 * width)
            blob[at:at + width] = value.to_bytes(width, "little")
    if data.draw(st.booleans()):
        blob = blob[:data.draw(st.integers(0, len(blob)))]
    with tempfile.NamedTemporaryFile(suffix=".gguf") as f:
        f.write(blob)
        f.flush()
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        try:
            g = G.read_gguf(f.name)
        except FormatError as e:
            assert f.name in str(e)
        else:
            for t in g.tensors.values():  # whatever was accepted is a whole view inside the file
                block, size = G._ggml_block_sizes(t.ggml_type)
                assert t.data.size == math.prod(t.shape) // block * size
            with contextlib.suppress(FormatError, ConfigError):  # the config and weights: typed errors only
                G.load_gguf(f.name)
        took = time.perf_counter() - t0
        grew_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0
    assert took < 2.0
    assert grew_kib < 256 * 1024

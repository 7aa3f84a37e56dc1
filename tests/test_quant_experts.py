"""Quantized Llama 4 experts (herd.quant.experts.QuantExperts) against float Experts holding the same weights
dequantized by gguf-py (an independent implementation of the block formats), through quantize_model, and through a
GGUF file loaded with keep_quantized=True against the same file loaded dequantized."""

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize as gguf_dequantize

import herd
from herd.config import ModelConfig, MoEConfig
from herd.errors import ConfigError, FormatError
from herd.formats import write_gguf as write_gguf_llama4
from herd.models.llama import Transformer
from herd.models.moe import Experts
from herd.quant import native
from herd.quant.experts import QuantExperts
from herd.quant.linear import QuantLinear
from herd.quant.model import quantize_model

SCHEMES = ["q8_0", "q4_0", "q4_1", "q4_k"]
# f32 activations: the kernels dequantize blocks in registers, so only float summation order differs
TOL_F32 = 1e-5
# int16 activations (the default): each activation moves by at most half a step of max|x| / 32767 per 32-block
TOL_INT16 = 2e-4


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def random_experts(E: int, D: int, F: int, seed: int = 0) -> Experts:
    g = torch.Generator().manual_seed(seed)
    ex = Experts(E, D, F)
    with torch.no_grad():
        for p in (ex.w1, ex.w3, ex.w2):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return ex


def reference_experts(q: QuantExperts) -> Experts:
    """Float Experts from q's blocks as dequantized by gguf-py (not by herd)."""
    ref = Experts(q.n_experts, q.dim, q.hidden)
    with torch.no_grad():
        for e in range(q.n_experts):
            w13 = gguf_dequantize(q.w13[e].weight.numpy(), gguf.GGMLQuantizationType(q.w13[e].ggml_type))
            w2 = gguf_dequantize(q.w2[e].weight.numpy(), gguf.GGMLQuantizationType(q.w2[e].ggml_type))
            ref.w1[e], ref.w3[e] = torch.from_numpy(w13[:q.hidden]).t(), torch.from_numpy(w13[q.hidden:]).t()
            ref.w2[e] = torch.from_numpy(w2).t()
    return ref


def routed_rows(counts: list[int], D: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(sum(counts), D, generator=torch.Generator().manual_seed(seed))


# odd expert counts, experts with no tokens (first, middle, last), one token, many
COUNTS = [[3, 0, 1, 0, 5], [0, 2, 0], [0, 0, 0, 0, 0, 0, 9]]


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("counts", COUNTS, ids=lambda c: f"E{len(c)}")
def test_equals_dequantized_float_experts(scheme, counts):
    E = len(counts)
    D, F = (256, 512) if scheme == "q4_k" else (64, 96)  # Q4_K blocks are 256 long; 96 = 3 blocks of 32
    ex = random_experts(E, D, F, seed=E)
    x = routed_rows(counts, D)
    q = QuantExperts.from_experts(ex, scheme, act="f32")
    ref = reference_experts(q)
    with torch.no_grad():
        y_ref = ref(x, counts)
        assert rel_err(q(x, counts), y_ref) < TOL_F32
        q_int = QuantExperts.from_experts(ex, scheme)  # default arithmetic: int16 activations
        assert rel_err(q_int(x, counts), y_ref) < TOL_INT16
        assert torch.equal(q.dequantize().w2, ref.w2) and torch.allclose(q.dequantize().w1, ref.w1)
        # and the quantized weights stay near the float ones (the scheme's own error)
        bits = 8 if scheme == "q8_0" else 4
        assert rel_err(ref.w1, ex.w1) < 2.0 / 2 ** bits and rel_err(ref.w2, ex.w2) < 2.0 / 2 ** bits


def test_only_experts_with_tokens_run():
    counts = [2, 0, 0, 1, 0]
    q = QuantExperts.from_experts(random_experts(5, 64, 64), "q4_0")
    ran = []
    for e in range(5):
        q.w13[e].register_forward_hook(lambda m, i, o, e=e: ran.append(e))
        q.w2[e].register_forward_hook(lambda m, i, o, e=e: ran.append(e))
    q(routed_rows(counts, 64), counts)
    assert ran == [0, 0, 3, 3]


def test_from_blocks_reads_gguf_layouts_and_shares_one_buffer():
    """from_blocks takes GGUF's (E, F, D) gate / up and (E, D, F) down bytes; each expert's layers are views."""
    E, D, F = 3, 64, 96
    ex = random_experts(E, D, F)
    raw = {n: gguf.quants.quantize(getattr(ex, n).detach().transpose(1, 2).contiguous().numpy(),
                                   gguf.GGMLQuantizationType.Q4_1) for n in ("w1", "w3", "w2")}
    q = QuantExperts.from_blocks(raw["w1"], raw["w3"], raw["w2"], "Q4_1", E, D, F, act="f32")
    ref = QuantExperts.from_experts(ex, "q4_1", act="f32")  # herd's quantizer equals ggml's for Q4_1
    counts = [1, 4, 2]
    x = routed_rows(counts, D)
    assert torch.equal(q(x, counts), ref(x, counts))
    assert q.w13[2].weight.data_ptr() == q.w13[0].weight.data_ptr() + 2 * q.w13[0].weight.numel()
    assert len(q.state_dict()) == 2 * E


@pytest.mark.skipif(native.load() is None, reason="native kernels could not be built here")
@pytest.mark.parametrize("act", ["f32", "int16", "int8"])
@pytest.mark.parametrize("scheme", ["q4_0", "q4_k"])
def test_native_kernels_and_fallback_agree(monkeypatch, act, scheme):
    counts = [2, 0, 3]
    D = 256 if scheme == "q4_k" else 64
    q = QuantExperts.from_experts(random_experts(3, D, D), scheme, act=act)
    x = routed_rows(counts, D)
    with torch.no_grad():
        y_native = q(x, counts)
        monkeypatch.setenv("HERD_NO_NATIVE", "1")
        native.reset()
        try:
            assert native.load() is None
            y_torch = q(x, counts)
        finally:
            monkeypatch.delenv("HERD_NO_NATIVE")
            native.reset()
    assert native.load() is not None
    assert rel_err(y_native, y_torch) < TOL_F32


def test_bad_inputs_raise_typed_errors():
    ex = random_experts(3, 64, 48)
    with pytest.raises(ConfigError, match="multiples of 32"):
        QuantExperts.from_experts(ex, "q4_0")  # hidden 48 does not fill whole blocks
    with pytest.raises(ConfigError, match="unknown quantization scheme"):
        QuantExperts.from_experts(ex, "q3_x")
    raw = gguf.quants.quantize(np.zeros((3, 64, 64), np.float32), gguf.GGMLQuantizationType.Q8_0)
    with pytest.raises(FormatError, match="w2 \\(down\\): expected"):
        QuantExperts.from_blocks(raw, raw, raw[:2], "Q8_0", 3, 64, 64)
    with pytest.raises(ConfigError, match="cannot hold F16"):
        QuantExperts.from_blocks(raw, raw, raw, "F16", 3, 64, 64)
    q = QuantExperts.from_blocks(raw, raw, raw, "Q8_0", 3, 64, 64)
    with pytest.raises(ConfigError, match="expected 3 experts and 4 rows"):
        q(torch.zeros(4, 64), [1, 2, 0])


# --- whole models -----------------------------------------------------------------------------------------------

def tiny_config(expert_ffn: int = 64) -> ModelConfig:
    """2 MoE layers of 5 experts, top-2, plus the shared expert; dims that fill whole 32-blocks."""
    return ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, ffn_dim=128, rope_theta=500000.0,
                       max_seq_len=256, family="llama4", nope_layer_interval=2, attention_chunk_size=16,
                       use_qk_norm=True, moe=MoEConfig(n_experts=5, top_k=2, expert_ffn_dim=expert_ffn))


def random_model(config: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.15)
    return model.eval().requires_grad_(False)


def test_quantize_model_swaps_experts_too():
    model = random_model(tiny_config())
    kept = random_model(tiny_config())
    swapped = quantize_model(kept, "q4_1", exclude=r"experts")
    assert not any(isinstance(m, QuantExperts) for m in kept.modules()) and swapped
    swapped = quantize_model(model, "q4_1", act="f32")
    assert {"layers.0.feed_forward.experts", "layers.1.feed_forward.experts"} <= set(swapped)
    assert sum(isinstance(m, QuantExperts) for m in model.modules()) == 2
    assert not any(type(m) is Experts for m in model.modules())
    # reference: the same model with every quantized module replaced by a float one holding gguf-py's dequantization
    ref = random_model(tiny_config())
    for name, m in model.named_modules():
        if isinstance(m, QuantExperts):
            ref.get_submodule(name).load_state_dict(reference_experts(m).state_dict())
        elif isinstance(m, QuantLinear) and ".experts." not in name:  # (not the QuantExperts' own)
            w = gguf_dequantize(m.weight.numpy(), gguf.GGMLQuantizationType(m.ggml_type))
            ref.get_submodule(name).weight.copy_(torch.from_numpy(w))
    tokens = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(model(tokens), ref(tokens)) < TOL_F32 * 10


def _tiny_vocab_metadata(vocab: int) -> dict:
    """A SentencePiece-style vocabulary (as in test_llama4.py): 3 specials, 256 byte tokens, fillers."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + [f"t{i}" for i in range(vocab - 259)]
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": [0.0] * vocab,
            "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * (vocab - 259),
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
            # the vocabulary has no Llama 4 chat tokens: a plain template gives herd.load a chat format
            "tokenizer.chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}


@pytest.mark.parametrize("quant", ["q4_0", "q4_1", "q8_0"])
def test_gguf_with_quantized_experts_loads_as_quant_experts(tmp_path, monkeypatch, quant):
    config = tiny_config()
    path = tmp_path / "moe.gguf"
    write_gguf_llama4(path, config, random_model(config).state_dict(), _tiny_vocab_metadata(300), quant=quant)
    q = herd.load(path, keep_quantized=True)
    f = herd.load(path, keep_quantized=False)  # every tensor dequantized to float32
    qe = [m for m in q.model.modules() if isinstance(m, QuantExperts)]
    assert len(qe) == 2 and all(m.w13[0].type_name == quant.upper() == m.w2[0].type_name for m in qe)
    assert not any(type(m) is Experts for m in q.model.modules())
    ids = torch.randint(3, 300, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    logits_q = q.logits(ids)
    assert rel_err(logits_q, f.logits(ids)) < 1e-3  # int16 activations in every quantized layer
    greedy = q.generate(ids[:8], max_tokens=16, ignore_eos=True).output_ids
    assert greedy == f.generate(ids[:8], max_tokens=16, ignore_eos=True).output_ids
    if native.load() is not None:  # the same quantized model on the PyTorch fallback
        monkeypatch.setenv("HERD_NO_NATIVE", "1")
        native.reset()
        try:
            assert native.load() is None
            # float summation order differs, so an activation can round to the next int16 step in a later layer
            assert rel_err(q.logits(ids), logits_q) < TOL_INT16
            assert q.generate(ids[:8], max_tokens=16, ignore_eos=True).output_ids == greedy
        finally:
            monkeypatch.delenv("HERD_NO_NATIVE")
            native.reset()
    with torch.no_grad():  # the experts alone: the QuantExperts against the float file's Experts
        for layer in range(2):
            qx, fx = q.model.layers[layer].feed_forward.experts, f.model.layers[layer].feed_forward.experts
            for n in ("w1", "w3", "w2"):
                assert torch.equal(getattr(qx.dequantize(), n), getattr(fx, n))


def test_gguf_experts_the_kernels_cannot_split_stay_float(tmp_path):
    """Expert hidden 48: gate / up rows (along D = 64) are Q4_0, down rows (along 48) fall back to F16; the loader
    dequantizes the experts instead of failing."""
    config = tiny_config(expert_ffn=48)
    path = tmp_path / "moe48.gguf"
    write_gguf_llama4(path, config, random_model(config).state_dict(), _tiny_vocab_metadata(300), quant="q4_0")
    q, f = herd.load(path, keep_quantized=True), herd.load(path)
    assert not any(isinstance(m, QuantExperts) for m in q.model.modules())
    assert any(isinstance(m, QuantLinear) for m in q.model.modules())
    for layer in range(2):
        qx, fx = q.model.layers[layer].feed_forward.experts, f.model.layers[layer].feed_forward.experts
        assert all(torch.equal(getattr(qx, n), getattr(fx, n)) for n in ("w1", "w3", "w2"))
    ids = list(range(3, 30))
    assert rel_err(q.logits(ids), f.logits(ids)) < 1e-3

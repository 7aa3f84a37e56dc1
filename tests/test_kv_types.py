"""KV caches stored as f16 or q8_0 (llama.cpp's -ctk/-ctv; herd/models/kv_cache.py, herd/quant/csrc/herd_decode.c).

One definition of each format (kv_encode), written bit-for-bit the same by the C decode step; the C step reads every
type over the contiguous and the paged cache and gives the PyTorch path's logits; the Engine keeps its promises
(greedy tokens equal each request alone and BatchRun's) on every type; the memory shrinks as stated; the cost in KL
against a float32 cache is small and ordered f32 < f16 < q8_0; a bad name is a clear error."""

from __future__ import annotations

import copy

import pytest
import torch

from herd.config import ModelConfig
from herd.engine.generate import decode, generate_batch, prefill
from herd.engine.paging import PagedKVCache
from herd.engine.scheduler import Engine
from herd.errors import ConfigError
from herd.models.kv_cache import KVCache, kv_decode, kv_encode, kv_storage
from herd.ops.sampling import SamplingParams
from herd.quant import decode as decode_plan, native
from test_fast_decode import tiny_quantized

CODES = {"f32": 0, "f16": 1, "q8_0": 2}
VOCAB = 300
CFG = ModelConfig(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, ffn_dim=192, max_seq_len=256,
                  rope_theta=500000.0)  # head_dim 32: the AVX-512 attention loops, and q8_0's one block per vector
CFG_64 = ModelConfig(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, ffn_dim=192, max_seq_len=256)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def c_encode(x: torch.Tensor, kv_type: str) -> torch.Tensor:
    n, hd = x.shape
    width = kv_storage(kv_type, hd)[1] * kv_storage(kv_type, hd)[0].itemsize
    out = torch.zeros(n * width, dtype=torch.uint8)
    assert native.load().herd_kv_encode(x.contiguous().data_ptr(), n, hd, CODES[kv_type], out.data_ptr()) == 0
    return out


def hard_vectors(hd: int) -> torch.Tensor:
    """Values over 12 decades, exact rounding ties of both formats, half subnormals, zeros and overflow."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, hd, generator=g) * torch.logspace(-9, 4, 400)[:, None]
    x[0] = 0.0
    x[1, :8] = 70000.0  # beyond half's range: inf in f16, a fine scale in q8_0
    x[2] = 2.0 ** -20 * torch.arange(hd)  # half subnormals
    x[3] = 1.0 + 2.0 ** -11  # halfway between two halves: ties to even
    x[4] = 127.0 * (torch.arange(hd) % 7 - 3) / 3 + 0.5  # q8_0 values at .5 after scaling
    x[5, 0] = -127.0
    return x


@pytest.mark.parametrize("kv_type", ["f32", "f16", "q8_0"])
def test_c_encoding_is_kv_encode_bit_for_bit(kv_type):
    for hd in (32, 64, 128):
        x = hard_vectors(hd)
        ref = kv_encode(x, kv_type).contiguous().view(torch.uint8).reshape(-1)
        assert torch.equal(c_encode(x, kv_type), ref)


def test_formats_round_trip_within_their_precision():
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(1))
    f16 = kv_decode(kv_encode(x, "f16"), "f16")
    assert ((f16 - x).abs() <= x.abs() * 2.0 ** -11 + 2.0 ** -25).all()
    q8 = kv_decode(kv_encode(x, "q8_0"), "q8_0")
    step = x.reshape(256, 2, 32).abs().amax(-1, keepdim=True) / 127  # one q8_0 step per block
    # half a step, plus the fp16 rounding of the scale (2^-11 relative) over 127 steps
    assert ((q8 - x).reshape(256, 2, 32).abs() <= step * (0.5 + 127 * 2.0 ** -11) + 1e-7).all()
    assert kv_encode(x, "q8_0").shape == (256, 68)


def test_memory_per_type():
    sizes = {t: KVCache(CFG_64, 2, 64, kv_type=t).nbytes() for t in CODES}
    assert sizes["f16"] * 2 == sizes["f32"]
    assert sizes["q8_0"] * 128 == sizes["f32"] * 34  # 34 bytes per 32 values instead of 128
    paged = {t: PagedKVCache(CFG_64, 9, 16, 3, 4, kv_type=t).nbytes() for t in CODES}
    assert paged["f16"] * 2 == paged["f32"] and paged["q8_0"] * 128 == paged["f32"] * 34


def test_bad_types_are_named():
    with pytest.raises(ConfigError, match="q4"):
        KVCache(CFG, 1, 8, kv_type="q4")
    with pytest.raises(ConfigError, match="divisible by 32"):
        KVCache(ModelConfig(dim=96, n_layers=1, n_heads=4, n_kv_heads=1, vocab_size=VOCAB, ffn_dim=64), 1, 8,
                kv_type="q8_0")


def steps(model, cache, prompts, n, native_on, rows):
    """Prefill each prompt into its row, then n greedy steps; logits (n, B, V). The PyTorch path decides the
    tokens on both sides, so both read the same history."""
    model.decode_step.enabled = native_on
    out = []
    with torch.inference_mode():
        last = []
        for p, r in zip(prompts, rows.tolist()):
            lg = prefill(model, torch.tensor([p]), torch.arange(len(p)), cache, torch.tensor([r]))
            last.append(int(lg[0, -1].argmax()))
        pos = [len(p) for p in prompts]
        for _ in range(n):
            lg = decode(model, torch.tensor([[t] for t in last]), torch.tensor([[q] for q in pos]), cache, rows)
            out.append(lg[:, -1])
            last = [int(v) for v in lg[:, -1].argmax(-1)]
            pos = [q + 1 for q in pos]
    model.decode_step.enabled = True
    return torch.stack(out)


# max |native - PyTorch| relative to the largest logit, float activations (q4_0 "f32" mode), 8 steps, 3 rows,
# measured 2026-12-07 (contiguous / paged): f32 6.8e-6 / 4.7e-6; f16 1.0e-4 / 8.1e-5 (a last-bit difference in a new
# key flips a half's rounding: one half ulp, 2^-11); q8_0 5.9e-6 / 3.5e-6 (no int8 step flipped with this seed)
@pytest.mark.parametrize("kv_type,tol", [("f32", 1e-4), ("f16", 1e-3), ("q8_0", 1e-4)])
@pytest.mark.parametrize("paged", [False, True])
def test_native_step_reads_and_writes_each_type(kv_type, tol, paged, monkeypatch):
    model = tiny_quantized("q4_0", "f32", config=CFG)
    calls = []
    real = decode_plan.DecodePlan.run
    monkeypatch.setattr(decode_plan.DecodePlan, "run", lambda self, *a: calls.append(1) or real(self, *a))
    prompts, rows = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 17]], torch.tensor([2, 0, 1])

    def fresh():
        if paged:
            c = PagedKVCache(CFG, n_pages=16, page_size=4, rows=4, pages_per_row=5, kv_type=kv_type)
            c.table[:3] = (torch.randperm(15, generator=torch.Generator().manual_seed(3)) + 1).reshape(3, 5)
            return c
        return KVCache(CFG, 4, 32, kv_type=kv_type)

    ref = steps(model, fresh(), prompts, 8, False, rows)
    assert not calls
    got = steps(model, fresh(), prompts, 8, True, rows)
    assert len(calls) == len(prompts) + 8, "the native step did not prefill each prompt and run each decode step"
    err = float((got - ref).abs().max() / ref.abs().max())
    assert err <= tol, f"{kv_type}: max relative error {err}"


@pytest.mark.parametrize("kv_type", ["f16", "q8_0"])
def test_engine_on_each_type_keeps_its_promises(kv_type):
    """On the paged cache of each type: the same greedy tokens in a batch as alone (the same bits: batch
    invariance) and as BatchRun's contiguous cache of the same type."""
    model = tiny_quantized("q4_0", "int8", config=CFG)
    params = SamplingParams(max_tokens=12, ignore_eos=True, logprobs=2)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16, 17, 18, 19, 20, 21, 22], [23]]

    def engine():
        e = Engine(model, stop_ids=frozenset({2}), max_batch=4, page_size=4, kv_tokens=256, kv_type=kv_type)
        assert e.cache.kv_type == kv_type and e.cache.k[0].dtype != torch.float32
        return e

    together = engine().generate(prompts, params)
    alone = [engine().generate([p], params)[0] for p in prompts]
    batch = generate_batch(model, prompts, params, kv_type=kv_type)
    for c, a, r in zip(together, alone, batch):
        assert c.output_ids == a.output_ids == r.output_ids
        assert [x.logprob for x in c.logprobs] == [x.logprob for x in a.logprobs]


# KL(f32 cache || other cache) over the default model's next-token distributions, 200 tokens of English:
# measured 2026-12-07: f16 3.4e-7, q8_0 3.7e-4 (the whole sample text at ctx 512: README's Speed section)
def test_kl_cost_on_the_default_model(smollm_gguf):
    import herd
    from herd.eval.ppl import sample_text

    llm = herd.load(smollm_gguf)
    ids = llm.tokenizer.encode(sample_text()[:1200], bos=False)[:200]
    ref = torch.log_softmax(llm.logits(ids).double(), -1)
    kl = {}
    for kv_type in ("f16", "q8_0"):
        llm.kv_type = kv_type
        lp = torch.log_softmax(llm.logits(ids).double(), -1)
        kl[kv_type] = float((ref.exp() * (ref - lp)).sum(-1).mean())
    assert 0 < kl["f16"] < 5e-6 and kl["f16"] < kl["q8_0"] < 5e-3, kl
    llm.kv_type = "q8_0"
    assert llm.generate("What is the capital of France?", max_tokens=12).text.startswith("The capital of France")


def test_cli_flag(smollm_gguf, capsys):
    from herd.cli import main

    assert main(["generate", "-m", str(smollm_gguf), "-p", "What is the capital of France?", "--max-tokens", "8",
                 "--kv-type", "f16"]) == 0
    assert "Paris" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["generate", "-p", "hi", "--kv-type", "q4_0"])

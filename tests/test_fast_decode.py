"""The native decode step (herd/quant/decode.py, csrc/herd_decode.c) against the PyTorch path of the same model.

The PyTorch path is itself checked against transformers (test_model_parity, test_generate) and the quantized layers
against dequantize-then-matmul (test_quant_linear); here the C step must give the same logits, cache contents and
greedy tokens, and step aside whenever it does not apply."""

import pytest
import torch
from torch import nn

from herd.config import ModelConfig
from herd.engine.generate import decode as decode_step, generate_batch, prefill
from herd.models.kv_cache import KVCache
from herd.errors import ConfigError
from herd.models.llama import build_model
from herd.ops.sampling import SamplingParams
from herd.quant import decode, native
from herd.quant.model import quantize_model

BEST_ISA = max(native.machine_isas())  # the ISA -march=native compiles on this CPU (/proc/cpuinfo)


@pytest.fixture(autouse=True, params=[BEST_ISA], ids=[native.ISA_NAMES[BEST_ISA]])
def kernel_isa(request):
    """Names, in each test's id, the ISA the C step runs, and fails (not skips) when the library is missing or was
    built without it."""
    if native.compiler() is None:
        pytest.skip("no C compiler: the native kernels cannot be built here")
    assert native.load() is not None, f"native kernels unavailable: {native.load_error()}"
    assert native.best_isa() == request.param, (native.best_isa(), request.param)
    return request.param

CFG = ModelConfig(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, ffn_dim=192, max_seq_len=64,
                  rope_theta=500.0)
CFG_256 = ModelConfig(dim=256, n_layers=2, n_heads=4, n_kv_heads=1, vocab_size=300, ffn_dim=256, max_seq_len=64)


def tiny_quantized(scheme="q4_1", act=None, seed=0, config=CFG):
    torch.manual_seed(seed)
    model = build_model(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if "norm" not in name else 0.2) + (1.0 if "norm" in name else 0.0))
    quantize_model(model, scheme, act=act)
    return model.eval().requires_grad_(False)


def run_steps(model, native_on, prompts, steps, rows=None, max_len=32):
    """Prefill each prompt into its cache row, then decode `steps` tokens greedily; logits (steps, B, V) and cache."""
    model.decode_step.enabled = native_on
    B = len(prompts)
    cache = KVCache(model.config, batch=B + 1, max_len=max_len)
    rows = torch.arange(B) if rows is None else rows
    out = []
    with torch.inference_mode():
        last = []
        for b, p in enumerate(prompts):
            logits = model(torch.tensor([p]), torch.arange(len(p)), cache.rows(int(rows[b])))
            last.append(int(logits[0, -1].argmax()))
        pos = torch.tensor([[len(p)] for p in prompts])
        for _ in range(steps):
            logits = decode_step(model, torch.tensor(last)[:, None], pos, cache, rows)[:, -1]
            out.append(logits)
            last = logits.argmax(-1).tolist()
            pos = pos + 1
    return torch.stack(out), cache


def assert_close_to_scale(got, ref, tol):
    """max |got - ref| <= tol * max |ref|: the two paths sum the small operations in different orders, and the
    integer modes round activations to a grid, which can turn a last-bit float difference into one grid step."""
    err, scale = (got - ref).abs().max().item(), ref.abs().max().item()
    assert err <= tol * scale, f"max error {err} vs {tol} x {scale}"


# tolerances relative to the largest logit, ~10x the max error of logits and cache measured on 2026-12-07, 2 cores
# (avx512-vnni): q4_1/int16 9.3e-5, q8_0/int8 4.1e-7 (no grid flip with this seed; one flip would move a logit by
# ~1e-3 of the scale), q4_0/f32 5.3e-6, q4_k/int16 1.2e-4
@pytest.mark.parametrize("scheme,act,tol", [("q4_1", "int16", 1e-3), ("q8_0", "int8", 5e-6), ("q4_0", "f32", 5e-5),
                                            ("q4_k", "int16", 1e-3)])
def test_native_step_equals_pytorch_path(scheme, act, tol, monkeypatch):
    model = tiny_quantized(scheme, act, config=CFG if scheme != "q4_k" else CFG_256)
    calls = []
    real_run = decode.DecodePlan.run
    monkeypatch.setattr(decode.DecodePlan, "run", lambda self, *a: calls.append(1) or real_run(self, *a))
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15]]  # rows at different positions
    rows = torch.tensor([2, 0, 1])  # and not in order
    ref, ref_cache = run_steps(model, False, prompts, 6, rows)
    assert not calls
    got, got_cache = run_steps(model, True, prompts, 6, rows)
    assert len(calls) == 6
    assert_close_to_scale(got, ref, tol)
    for a, b in zip(got_cache.k + got_cache.v, ref_cache.k + ref_cache.v):
        assert_close_to_scale(a, b, tol)


# attention shapes around the C code's blocking: head_dim 48 (3 x 16 floats), 32 with 5 query heads per KV head
# (blocks of 4 heads), 24 (not a multiple of 16: the portable loop); positions past 16 and 32 (blocks of 16 keys)
@pytest.mark.parametrize("dim,n_heads,n_kv_heads", [(192, 4, 1), (320, 10, 2), (96, 4, 2)])
def test_native_attention_over_longer_contexts(dim, n_heads, n_kv_heads):
    config = ModelConfig(dim=dim, n_layers=2, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=300, ffn_dim=128,
                         max_seq_len=64)
    model = tiny_quantized("q8_0", "f32", seed=4, config=config)
    prompts = [list(range(1, 36)), list(range(40, 57)), [9] * 30]
    ref, _ = run_steps(model, False, prompts, 5, max_len=48)
    got, _ = run_steps(model, True, prompts, 5, max_len=48)
    assert_close_to_scale(got, ref, 5e-5)  # measured 1.7e-6 .. 7.5e-6 on 2026-12-07, 2 cores


def test_greedy_generation_is_unchanged():
    model = tiny_quantized(seed=3)
    prompts = [[5, 6, 7], [100, 101, 102, 103, 104], [42]]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    model.decode_step.enabled = False
    ref = [c.output_ids for c in generate_batch(model, prompts, params)]
    model.decode_step.enabled = True
    assert [c.output_ids for c in generate_batch(model, prompts, params)] == ref
    assert [generate_batch(model, [p], params)[0].output_ids for p in prompts] == ref  # batch of one too


def test_steps_aside_where_it_does_not_apply():
    model = tiny_quantized()
    cache = KVCache(CFG, batch=1, max_len=16)
    assert decode.plan_for(model, cache) is not None
    assert decode.plan_for(build_model(CFG), cache) is None  # float linear layers
    assert decode.plan_for(model, KVCache(CFG, batch=1, max_len=16, dtype=torch.bfloat16)) is None
    model.decode_step.enabled = False
    assert decode.plan_for(model, cache) is None
    model.decode_step.enabled = True
    # one linear layer swapped for a float one: the plan is dropped and the model runs the PyTorch path
    lin = model.layers[1].feed_forward.w2
    model.layers[1].feed_forward.w2 = nn.Linear(lin.in_features, lin.out_features, bias=False)
    assert decode.plan_for(model, cache) is None


def test_plan_follows_weight_changes():
    model = tiny_quantized(seed=1)
    other = tiny_quantized(seed=2)
    prompts = [[3, 4, 5]]
    run_steps(model, True, prompts, 2)
    plan = model.decode_step.plan
    # new blocks in a layer, and new data for a norm weight (as .to() does): both must be seen
    model.layers[0].attention.wq = other.layers[0].attention.wq
    model.layers[1].ffn_norm.weight.data = other.layers[1].ffn_norm.weight.data.clone()
    ref, _ = run_steps(model, False, prompts, 4)
    got, _ = run_steps(model, True, prompts, 4)
    assert model.decode_step.plan is not plan
    assert_close_to_scale(got, ref, 1e-3)  # measured 6.8e-5 (int16) and 7.9e-5 (int8 below) on 2026-12-07, 2 cores
    model.layers[0].attention.wq.act = "int8"  # a new activation mode rebuilds the plan too
    ref, _ = run_steps(model, False, prompts, 3)
    got, _ = run_steps(model, True, prompts, 3)
    assert_close_to_scale(got, ref, 1e-3)


def test_position_outside_the_cache_is_a_typed_error():
    model = tiny_quantized()
    cache = KVCache(CFG, batch=2, max_len=8)
    with torch.inference_mode(), pytest.raises(ConfigError, match="outside the cache"):
        decode_step(model, torch.tensor([[1], [2]]), torch.tensor([[3], [8]]), cache)
    with torch.inference_mode(), pytest.raises(ConfigError, match="outside the cache"):
        decode_step(model, torch.tensor([[1]]), torch.tensor([[3]]), cache, torch.tensor([2]))


@pytest.mark.slow
def test_default_model_greedy_tokens(smollm_gguf):
    import herd

    llm = herd.load(smollm_gguf, keep_quantized=True)
    assert decode.plan_for(llm.model, KVCache(llm.model.config, 1, 8)) is not None
    prompt = "Name three colours."
    got = llm.generate(prompt, max_tokens=24).output_ids
    llm.model.decode_step.enabled = False
    assert llm.generate(prompt, max_tokens=24).output_ids == got


# Prefill through the C step (NativeDecodeStep.prefill): the prompt's tokens are rows of one cache row, attended
# together (hd_attend_tokens_avx512) but each with the arithmetic it gets when decoded alone. Shapes: head_dim 32
# (R = 2 query heads per KV head), 48 with R = 5 (groups of 4 rows spanning tokens), 24 (not a multiple of 16: the
# per-token loop); 37 tokens (past the 16-token tasks and the 16-key blocks), in one call and in slices.
@pytest.mark.parametrize("dim,n_heads,n_kv_heads,kv_type", [
    (128, 4, 2, "f32"), (128, 4, 2, "f16"), (128, 4, 2, "q8_0"),
    (480, 10, 2, "f32"), (480, 10, 2, "f16"),  # a q8_0 cache needs head_dim % 32 == 0 (test_kv_types)
    (96, 4, 2, "f32"), (96, 4, 2, "f16")])
def test_native_prefill_equals_decoding_token_by_token(dim, n_heads, n_kv_heads, kv_type):
    config = ModelConfig(dim=dim, n_layers=2, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=300, ffn_dim=128,
                         max_seq_len=64)
    model = tiny_quantized("q4_0", "int16", seed=6, config=config)
    prompt = torch.tensor([[(11 * i + 5) % 290 + 3 for i in range(37)]])
    step = model.decode_step
    with torch.inference_mode():
        one_by_one = KVCache(config, batch=3, max_len=48, kv_type=kv_type)
        for t in range(37):
            want = decode_step(model, prompt[:, t:t + 1], torch.tensor([[t]]), one_by_one, torch.tensor([1]))
        for chunk in (0, 16, 7):
            cache = KVCache(config, batch=3, max_len=48, kv_type=kv_type)
            got = step.prefill(model, prompt, torch.arange(37)[None], cache, torch.tensor([1]), chunk)
            assert got is not None and got.shape == (1, 1, 300)
            if native.best_isa() == 2:  # AVX-512: granule-1 kernels, so every row's bits equal, whatever the path
                assert torch.equal(got, want), f"chunk {chunk}"
                for a, b in zip(cache.k + cache.v, one_by_one.k + one_by_one.v):
                    assert torch.equal(a, b)
            else:  # AVX2 builds: other GEMM kernels for one row than for many
                assert_close_to_scale(got, want, 1e-3)
        model.decode_step.enabled = False  # the PyTorch path: the same logits up to summation order
        ref = prefill(model, prompt, torch.arange(37), KVCache(config, batch=1, max_len=48, kv_type=kv_type))
        model.decode_step.enabled = True
    assert_close_to_scale(got, ref, 1e-3)


def test_native_prefill_over_pages_equals_the_contiguous_cache():
    from herd.engine.paging import PagedKVCache

    model = tiny_quantized("q4_1", "int16", seed=8)
    prompt = torch.tensor([[(13 * i + 1) % 290 + 3 for i in range(29)]])
    paged = PagedKVCache(CFG, n_pages=20, page_size=4, rows=3, pages_per_row=10)
    paged.table[1, :8] = torch.randperm(19, generator=torch.Generator().manual_seed(1))[:8] + 1  # scattered pages
    flat = KVCache(CFG, batch=3, max_len=40)
    with torch.inference_mode():
        a = model.decode_step.prefill(model, prompt, torch.arange(29)[None], paged, torch.tensor([1]), 12)
        b = model.decode_step.prefill(model, prompt, torch.arange(29)[None], flat, torch.tensor([1]), 12)
    assert a is not None and b is not None
    assert torch.equal(a, b)

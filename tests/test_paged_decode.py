"""The native decode step over the scheduler's paged KV cache (herd/quant/csrc/herd_decode.c, PagedKVCache).

The C step must give the PyTorch path's logits and cache contents over the same pages (rows at different lengths,
table rows out of order, pages scattered in the pool, padding rows on the null page), the same bits as over the
contiguous KVCache, and inside the continuous-batching Engine the same greedy tokens as BatchRun and as each request
alone -- with prefix caching, preemption and cancellation -- while actually being the step that runs."""

from __future__ import annotations

import random

import pytest
import torch

from herd.config import ModelConfig
from herd.engine.generate import decode as decode_step, generate_batch
from herd.engine.paging import PagedKVCache
from herd.engine.scheduler import Engine
from herd.errors import ConfigError
from herd.models.kv_cache import KVCache
from herd.ops.sampling import SamplingParams
from herd.quant import decode, native
from test_fast_decode import assert_close_to_scale, tiny_quantized

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernels not built")

VOCAB = 300
CFG = ModelConfig(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, ffn_dim=192, max_seq_len=256,
                  rope_theta=500000.0)  # head_dim 32: the AVX-512 attention kernels
CFG_24 = ModelConfig(dim=96, n_layers=2, n_heads=4, n_kv_heads=1, vocab_size=VOCAB, ffn_dim=128, max_seq_len=256)
# head_dim 24: the portable loops


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: one thread is fastest, and spares a shared machine OpenMP's spinning."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Calls(list):
    """The row counts of the native decode calls; `prefills` those of the prefill calls (several tokens of one
    cache row in one call)."""
    prefills: list


@pytest.fixture
def native_calls(monkeypatch):
    """Counts the rows of every native decode call, and of every native prefill call apart."""
    calls = Calls()
    calls.prefills = []
    real_run = decode.DecodePlan.run

    def run(self, x, pos, cache, rows):
        one_row = rows is not None and len(rows) > 1 and bool((rows == rows[0]).all())
        (calls.prefills if one_row else calls).append(x.shape[0])
        return real_run(self, x, pos, cache, rows)

    monkeypatch.setattr(decode.DecodePlan, "run", run)
    return calls


def scattered_cache(config, page_size, rows=5, pages_per_row=12, seed=0) -> PagedKVCache:
    """A paged cache whose rows own pages scattered over the pool in no order; the last row keeps only null pages
    (the Engine's scratch row for padding)."""
    n_pages = (rows - 1) * pages_per_row + 3
    cache = PagedKVCache(config, n_pages=n_pages, page_size=page_size, rows=rows, pages_per_row=pages_per_row)
    perm = torch.randperm(n_pages - 1, generator=torch.Generator().manual_seed(seed)) + 1
    for r in range(rows - 1):
        cache.table[r] = perm[r * pages_per_row:(r + 1) * pages_per_row]
    return cache


def decode_paged(model, native_on, prompts, rows, steps, page_size, pad_pos=None):
    """Prefill each prompt (PyTorch path) into its table row, then `steps` greedy decode steps of all rows together,
    plus one padding row on the scratch row at pad_pos when given; logits (steps, B, V) of the real rows, cache."""
    cache = scattered_cache(model.config, page_size)
    with torch.inference_mode():
        last = []
        for p, r in zip(prompts, rows):
            logits = model(torch.tensor([p]), torch.arange(len(p))[None], cache, cache_rows=torch.tensor([r]))
            last.append(int(logits[0, -1].argmax()))
        model.decode_step.enabled = native_on
        pos, out, B = [len(p) for p in prompts], [], len(prompts)
        table_rows = list(rows) + ([cache.table.shape[0] - 1] if pad_pos is not None else [])
        for _ in range(steps):
            p = pos + ([pad_pos] if pad_pos is not None else [])
            logits = decode_step(model, torch.tensor(last + [0] * (len(p) - B))[:, None], torch.tensor(p)[:, None],
                                 cache, torch.tensor(table_rows))[:B, -1]
            out.append(logits)
            last, pos = logits.argmax(-1).tolist(), [q + 1 for q in pos]
            if pad_pos is not None:
                pad_pos = max(pad_pos, max(pos))
    model.decode_step.enabled = True
    return torch.stack(out), cache


# tolerances relative to the largest logit, ~10x the largest error measured (logits / cache): float activations
# 2.5e-6 / 1.1e-6, int16 8.8e-5 / 5.0e-5; int8 2.8e-7 here, but one activation grid flip would move a logit by
# ~1e-3 of the scale (see test_fast_decode's)
@pytest.mark.parametrize("scheme,act,tol,config,page_size", [
    ("q4_0", "f32", 3e-5, CFG, 4),     # pages shorter than the kernels' blocks of 16 keys
    ("q4_0", "f32", 3e-5, CFG, 16),    # one block per page
    ("q8_0", "int8", 1e-2, CFG, 5),    # blocks split across pages
    ("q4_1", "int16", 1e-3, CFG_24, 3),  # the portable loops
])
def test_native_paged_step_equals_pytorch_path(scheme, act, tol, config, page_size, native_calls):
    model = tiny_quantized(scheme, act, config=config)
    rng = random.Random(1)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(n)] for n in (7, 1, 23, 12)]  # rows at different lengths
    rows = [2, 0, 3, 1]  # table rows out of order
    ref, ref_cache = decode_paged(model, False, prompts, rows, 8, page_size, pad_pos=31)
    assert not native_calls
    got, got_cache = decode_paged(model, True, prompts, rows, 8, page_size, pad_pos=31)
    assert native_calls == [5] * 8  # four rows and the padding row, every step
    assert_close_to_scale(got, ref, tol)
    for a, b in zip(got_cache.k + got_cache.v, ref_cache.k + ref_cache.v):
        assert_close_to_scale(a[1:], b[1:], tol)  # every page but the null page, which padding rows overwrite


def test_paged_and_contiguous_layouts_give_the_same_bits(native_calls):
    """Every position written by the C step (prompts fed one token per step; a row past its end writes its last
    position again), over a KVCache and over scattered pages, four rows (no row padding in float mode): the
    attention reads the same keys in the same order, one run per page, so the logits are bitwise equal."""
    model = tiny_quantized("q4_0", "f32", config=CFG, seed=5)
    rng = random.Random(2)
    seqs = [[rng.randrange(3, VOCAB) for _ in range(n)] for n in (40, 19, 33, 7)]
    r = torch.tensor([1, 3, 0, 2])
    paged, flat = scattered_cache(CFG, 6), KVCache(CFG, batch=4, max_len=64)
    with torch.inference_mode():
        for t in range(40):
            pos = torch.tensor([[min(t, len(s) - 1)] for s in seqs])
            toks = torch.tensor([[s[p]] for s, p in zip(seqs, pos[:, 0].tolist())])
            a = decode_step(model, toks, pos, paged, r)
            b = decode_step(model, toks, pos, flat, r)
            assert torch.equal(a, b), f"step {t}"
    assert len(native_calls) == 80


def test_page_outside_the_pool_is_a_typed_error():
    model = tiny_quantized()
    cache = scattered_cache(model.config, 4)
    cache.table[0, 1] = cache.n_pages  # one past the pool
    with torch.inference_mode():
        decode_step(model, torch.tensor([[1]]), torch.tensor([[3]]), cache, torch.tensor([0]))  # page 0: fine
        with pytest.raises(ConfigError, match="outside the page pool"):
            decode_step(model, torch.tensor([[1]]), torch.tensor([[4]]), cache, torch.tensor([0]))
        with pytest.raises(ConfigError, match="outside the cache"):
            decode_step(model, torch.tensor([[1]]), torch.tensor([[48]]), cache, torch.tensor([1]))


def test_plan_rebinds_when_the_table_is_replaced():
    model = tiny_quantized()
    cache = scattered_cache(model.config, 4)
    plan = decode.plan_for(model, cache)
    assert plan is not None and plan.spec.page_table == cache.table.data_ptr()
    cache.table = cache.table.clone()
    assert decode.plan_for(model, cache).spec.page_table == cache.table.data_ptr()
    cache.k[0] = cache.k[0].to(torch.bfloat16)  # a pool the C code cannot read: the PyTorch path again
    assert decode.plan_for(model, cache) is None


# ------------------------------------------------------------------------------------------------- the engine
@pytest.fixture(scope="module")
def model():
    return tiny_quantized("q4_0", "f32", config=CFG, seed=7)


def prompts_of(n: int, seed: int = 0, lo: int = 1, hi: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


def engine(model, **kw) -> Engine:
    kw = {"max_batch": 8, "page_size": 8, "kv_tokens": 2048, **kw}
    return Engine(model, stop_ids=frozenset({2}), **kw)


GREEDY = SamplingParams(max_tokens=16, ignore_eos=True, logprobs=2)


def test_engine_tokens_equal_batchrun_and_each_request_alone(model, native_calls):
    prompts = prompts_of(8, seed=3)
    batch = engine(model).generate(prompts, GREEDY)
    assert native_calls and max(native_calls) == 8  # the batch decoded natively, all rows in one call, no padding
    assert native_calls.prefills  # and the prompts prefilled by the same step
    ref = generate_batch(model, prompts, GREEDY)  # BatchRun: the contiguous cache, also the C step
    alone = [engine(model).generate([p], GREEDY)[0] for p in prompts]
    for c, r, a in zip(batch, ref, alone):
        assert c.output_ids == r.output_ids == a.output_ids
        assert c.finish_reason == "length"
        # both prefill through the C step, the engine with the rows padded to the float-mode kernels' granule of 4
        # (batch invariance), BatchRun unpadded: rounding only
        for x, y in zip(c.logprobs, r.logprobs):
            assert abs(x.logprob - y.logprob) < 1e-4
        # batch invariance: alone and in any batch, the same bits
        assert [x.logprob for x in c.logprobs] == [x.logprob for x in a.logprobs]
        assert [x.top for x in c.logprobs] == [x.top for x in a.logprobs]


def test_engine_native_step_equals_engine_pytorch_step(model, native_calls):
    prompts = prompts_of(6, seed=4)
    model.decode_step.enabled = False
    try:
        ref = engine(model).generate(prompts, GREEDY)
    finally:
        model.decode_step.enabled = True
    assert not native_calls
    got = engine(model).generate(prompts, GREEDY)
    assert native_calls
    for a, b in zip(got, ref):
        assert a.output_ids == b.output_ids
        for x, y in zip(a.logprobs, b.logprobs):
            assert abs(x.logprob - y.logprob) < 1e-4


def test_prefix_cache_hit_changes_nothing(model, native_calls):
    system = prompts_of(1, seed=5, lo=30, hi=31)[0]
    prompts = [system + u for u in prompts_of(3, seed=6, lo=2, hi=9)]
    cold = [engine(model, prefix_cache=False).generate([p], GREEDY)[0] for p in prompts]
    eng = engine(model)
    warm = [eng.generate([p], GREEDY)[0] for p in prompts + prompts[:1]]  # the first prompt again: a longer hit
    assert eng.snapshot()["prefix_hit_tokens"] >= 2 * 24 + 24
    assert native_calls
    for a, b in zip(cold + cold[:1], warm):
        assert a.output_ids == b.output_ids
        # not bitwise: a hit prefills fewer rows, and QuantLinear's PyTorch path changes kernels with the row count
        # (row_granule finds no granule for it), so the prefill's rounding moves; the decode steps are invariant
        for x, y in zip(a.logprobs, b.logprobs):
            assert abs(x.logprob - y.logprob) < 1e-4


def test_preemption_under_a_small_kv_budget_keeps_the_tokens(model, native_calls):
    prompts = prompts_of(6, seed=8, lo=15, hi=30)
    params = SamplingParams(max_tokens=40, ignore_eos=True, logprobs=0)
    small = dict(ctx=96, kv_tokens=200, max_batch=6)
    alone = [engine(model, **small).generate([p], params)[0] for p in prompts]
    eng = engine(model, **small)
    got = eng.generate(prompts, params)
    assert eng.stats["preempted"] > 0 and native_calls
    for a, b in zip(alone, got):
        assert a.output_ids == b.output_ids
        for x, y in zip(a.logprobs, b.logprobs):  # recomputed positions come from a prefill: rounding only
            assert abs(x.logprob - y.logprob) < 1e-4


def test_cancel_mid_decode_leaves_the_others_unchanged(model, native_calls):
    prompts = prompts_of(3, seed=9)
    alone = [engine(model).generate([p], GREEDY)[0].output_ids for p in prompts[1:]]
    eng = engine(model)
    long = eng.submit(prompts[0], SamplingParams(max_tokens=200, ignore_eos=True))
    others = [eng.submit(p, GREEDY) for p in prompts[1:]]
    for _ in range(6):
        eng.step()
    eng.cancel(long.id)
    while eng.step():
        pass
    assert long.request.finished and long.request.pages == []
    assert [h.result().output_ids for h in others] == alone
    assert eng.snapshot()["pages_used"] == 0 and native_calls


@pytest.mark.slow
def test_default_model_engine_equals_generate(smollm_gguf, native_calls):
    """The server's engine on the default model kept quantized: the same greedy tokens as `herd generate`'s path
    (BatchRun, contiguous cache) for four concurrent prompts, through the native step."""
    import herd

    llm = herd.load(smollm_gguf, keep_quantized=True)
    prompts = ["Name three colours.", "What is 2 + 2?", "Write a haiku about rain.", "Say hello in French."]
    ids = [llm.encode_prompt(p, False, None) for p in prompts]
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    ref = [c.output_ids for c in generate_batch(llm.model, ids, params)]
    native_calls.clear()
    eng = Engine(llm.model, llm.tokenizer, llm.stop_ids, max_batch=4)
    assert [c.output_ids for c in eng.generate(ids, params)] == ref
    assert native_calls and max(native_calls) == 4

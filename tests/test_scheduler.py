"""The continuous-batching engine on tiny random models: the same tokens as the reference generation loop, bitwise
batch invariance, prefix caching, preemption under a small KV budget, cancellation and the queue limit."""

from __future__ import annotations

import random
import threading

import pytest
import torch

from herd.config import ModelConfig
from herd.engine.generate import generate_batch
from herd.models.kv_cache import KVCache
from herd.engine.paging import PagedKVCache, PagePool, attention_granule, row_granule
from herd.engine.scheduler import Engine, QueueFull
from herd.engine.threads import in_fresh_thread
from herd.errors import GenerationError
from herd.models.llama import build_model
from herd.ops.sampling import SamplingParams

VOCAB = 300


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: one thread is fastest, and spares a shared machine OpenMP's spinning."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    """A 2-layer GQA model, dim 64, with weights wide enough (std 0.3) that greedy tokens are well separated."""
    torch.manual_seed(0)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, ffn_dim=160, max_seq_len=256,
                      rope_theta=500000.0)
    m = build_model(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m.eval()


def prompts_of(n: int, seed: int = 0, lo: int = 1, hi: int = 60) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


def engine(model, **kw) -> Engine:
    kw = {"max_batch": 16, "page_size": 8, "kv_tokens": 4096, **kw}
    return Engine(model, stop_ids=frozenset({2}), **kw)


def run_alone(model, prompts, params, **kw):
    eng = engine(model, **kw)
    return [eng.generate([p], params)[0] for p in prompts]


GREEDY = SamplingParams(max_tokens=20, ignore_eos=True, logprobs=2)


# ------------------------------------------------------------------------------------------------- the cache
def test_paged_cache_gives_the_same_logits_as_the_static_cache(model):
    """Prefill + 6 decode steps of 3 rows at different lengths: paged pool (pages scattered in the pool) vs
    KVCache rows vs one full forward without a cache."""
    cfg = model.config
    prompts = prompts_of(3, seed=1, lo=5, hi=30)
    paged = PagedKVCache(cfg, n_pages=64, page_size=4, rows=3, pages_per_row=16)
    perm = torch.randperm(63, generator=torch.Generator().manual_seed(0)) + 1  # not in order: gathers must work
    for r in range(3):
        paged.table[r] = perm[r * 16:(r + 1) * 16]
    static = KVCache(cfg, batch=3, max_len=64)
    seqs = [list(p) for p in prompts]
    with torch.inference_mode():
        for r, p in enumerate(prompts):
            ids, pos = torch.tensor([p]), torch.arange(len(p))[None]
            a = model(ids, pos, paged, cache_rows=torch.tensor([r]))
            b = model(ids, pos, static.rows(r))
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        for _ in range(6):
            toks = torch.tensor([[s[-1]] for s in seqs])
            pos = torch.tensor([[len(s) - 1] for s in seqs])
            # feed each row's own last token again at its next position
            pos = pos + 1
            for s, t in zip(seqs, toks[:, 0].tolist()):
                s.append(t)
            rows = torch.tensor([2, 0, 1])  # rows in another order than the table
            a = model(toks[rows], pos[rows], paged, cache_rows=rows)[:, -1]
            b = model(toks[rows], pos[rows], static, cache_rows=rows)[:, -1]
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            for k, r in enumerate(rows.tolist()):
                full = model(torch.tensor([seqs[r]]))[0, -1]
                torch.testing.assert_close(a[k], full, rtol=1e-4, atol=1e-4)


def test_page_pool_prefix_chain_and_lru_eviction_order():
    pool = PagePool(n_pages=7, page_size=2)
    toks = [1, 2, 3, 4, 5, 6, 7]
    pages = [pool.alloc() for _ in range(3)]
    pool.register(pages, toks[:6])
    assert pool.match(toks, limit=6) == pages  # all three pages, referenced once more
    assert pool.match([1, 2, 3, 9, 5, 6], limit=6) == pages[:1]  # diverges in the second page
    assert pool.match([9, 2, 3, 4], limit=4) == []
    pool.release(pages[:1])
    pool.release(pages)
    pool.release(pages)
    assert pool.used() == 0 and len(pool.lru) == 3  # unused but cached
    # the allocator takes free pages first, then evicts cached ones children-first
    got = [pool.alloc() for _ in range(3)]
    assert set(got).isdisjoint(pages)
    assert pool.alloc() == pages[2]
    assert pool.match(toks, limit=6) == pages[:2]  # the chain head survives


def test_granules_make_rows_independent_of_the_batch(model):
    """The start-up measurements: padding to these granules gives bit-identical rows."""
    g = row_granule(model)
    assert g >= 1
    layer = model.layers[0].feed_forward.w1
    x = torch.randn(48, model.config.dim)
    with torch.inference_mode():
        ref = layer(x)
        for m in range(g, 48, g):
            assert torch.equal(layer(x[:m]), ref[:m])
    a = attention_granule(model.config.n_heads, model.config.head_dim, torch.get_num_threads())
    assert a >= 1


# ------------------------------------------------------------------------------------------------- outputs
def test_engine_greedy_tokens_equal_the_reference_loop(model):
    """16 prompts of mixed lengths through the batching engine == each through BatchRun alone."""
    prompts = prompts_of(16)
    eng = engine(model)
    got = eng.generate(prompts, GREEDY)
    for p, c in zip(prompts, got):
        ref = generate_batch(model, [p], GREEDY)[0]
        assert c.output_ids == ref.output_ids
        assert c.finish_reason == ref.finish_reason == "length"
        for a, b in zip(c.logprobs, ref.logprobs):
            assert abs(a.logprob - b.logprob) < 1e-4


def test_batch_invariance_is_bitwise(model):
    """Alone vs in a batch of 16 (which join and leave at different steps): identical logprobs, bit for bit."""
    prompts = prompts_of(16, seed=3)
    params = [SamplingParams(max_tokens=4 + i % 7 * 3, ignore_eos=True, logprobs=3) for i in range(16)]
    alone = [engine(model, prefix_cache=False).generate([p], sp)[0] for p, sp in zip(prompts, params)]
    batch = engine(model, prefix_cache=False).generate(prompts, params)
    for a, b in zip(alone, batch):
        assert a.output_ids == b.output_ids
        assert [x.logprob for x in a.logprobs] == [x.logprob for x in b.logprobs]
        assert [x.top for x in a.logprobs] == [x.top for x in b.logprobs]


def test_sampling_with_a_seed_is_the_same_alone_and_batched(model):
    prompts = prompts_of(6, seed=4)
    params = [SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=100 + i, ignore_eos=True)
              for i in range(6)]
    alone = [engine(model).generate([p], sp)[0].output_ids for p, sp in zip(prompts, params)]
    batch = [c.output_ids for c in engine(model).generate(prompts, params)]
    assert alone == batch


def test_stop_token_ends_a_row_and_others_continue(model):
    prompts = prompts_of(4, seed=5)
    ref = [generate_batch(model, [p], SamplingParams(max_tokens=10, ignore_eos=True))[0].output_ids
           for p in prompts]
    stop = ref[0][3]  # make the 4th token of the first prompt a stop token
    params = SamplingParams(max_tokens=10, stop_token_ids=[stop])
    got = engine(model).generate(prompts, params)
    assert got[0].output_ids == ref[0][:ref[0].index(stop)] and got[0].finish_reason == "stop"
    for c, r in zip(got[1:], ref[1:]):
        want = r[:r.index(stop)] if stop in r else r
        assert c.output_ids == want


def test_max_tokens_zero_answers_at_once(model):
    eng = engine(model)
    h = eng.submit([5, 6, 7], SamplingParams(max_tokens=0))
    c = h.result()
    assert c.output_ids == [] and c.finish_reason == "length"
    assert eng.snapshot()["running"] == 0


# ------------------------------------------------------------------------------------------------- memory
def test_prefix_cache_skips_the_shared_prompt_and_changes_nothing(model):
    system = prompts_of(1, seed=6, lo=45, hi=46)[0]
    users = prompts_of(4, seed=7, lo=3, hi=12)
    prompts = [system + u for u in users]
    cold = run_alone(model, prompts, GREEDY, prefix_cache=False)
    eng = engine(model)
    warm = [eng.generate([p], GREEDY)[0] for p in prompts]
    snap = eng.snapshot()
    # the first request computes the 45 shared tokens, the next three find 40 of them (5 full pages of 8)
    assert snap["prefix_hit_tokens"] == 3 * 40
    assert snap["prefill_tokens"] == sum(len(p) for p in prompts) - 3 * 40
    for a, b in zip(cold, warm):
        assert a.output_ids == b.output_ids
        assert [x.logprob for x in a.logprobs] == [x.logprob for x in b.logprobs]


def test_small_kv_budget_preempts_and_still_gives_the_same_tokens(model):
    """A pool of ~3 contexts shared by 8 long requests: the youngest are preempted and recomputed later, memory
    never grows, and every output is what the request gives alone (the recomputed positions come from a prefill
    instead of decode steps, so logprobs agree to float rounding rather than bitwise)."""
    prompts = prompts_of(8, seed=8, lo=20, hi=40)
    params = SamplingParams(max_tokens=60, ignore_eos=True, logprobs=0)
    small = dict(ctx=128, kv_tokens=300, max_batch=8)
    alone = run_alone(model, prompts, params, **small)
    eng = engine(model, **small)
    pages_total = eng.snapshot()["pages_total"]
    handles = [eng.submit(p, params) for p in prompts]
    peak = 0
    while eng.step():
        peak = max(peak, eng.snapshot()["pages_used"])
    got = [h.result() for h in handles]
    assert eng.stats["preempted"] > 0
    assert peak <= pages_total
    for a, b in zip(alone, got):
        assert a.output_ids == b.output_ids
        for x, y in zip(a.logprobs, b.logprobs):
            assert abs(x.logprob - y.logprob) < 1e-4


def test_cancel_frees_the_row_and_pages_at_the_next_step(model):
    eng = engine(model, prefix_cache=False)
    events = []
    h = eng.submit(prompts_of(1, seed=9, lo=30, hi=31)[0], SamplingParams(max_tokens=200, ignore_eos=True),
                   events.append)
    other = eng.submit([4, 5, 6], SamplingParams(max_tokens=5, ignore_eos=True))
    for _ in range(5):
        eng.step()
    assert eng.snapshot()["pages_used"] > 0
    eng.cancel(h.id)
    eng.step()
    assert h.request.finished and h.request.pages == [] and h.request.row == -1
    assert events[-2].finish_reason == "cancelled" and events[-1] is None
    while eng.step():
        pass
    assert other.result().finish_reason == "length"
    assert eng.snapshot()["pages_used"] == 0 and len(eng.free_rows) == eng.max_batch


def test_queue_limit_refuses_with_a_retry_hint(model):
    eng = engine(model, max_queue=2)
    eng.submit([5], SamplingParams(max_tokens=3))
    eng.submit([6], SamplingParams(max_tokens=3))
    with pytest.raises(QueueFull) as e:
        eng.submit([7], SamplingParams(max_tokens=3))
    assert e.value.retry_after >= 1 and "limit 2" in str(e.value)
    while eng.step():
        pass
    eng.submit([7], SamplingParams(max_tokens=3))  # room again once the queue drained


@pytest.mark.parametrize("prompt, message", [([], "empty"), ([1] * 256, "context holds 256"),
                                             ([1, VOCAB], "outside the vocabulary")])
def test_impossible_requests_are_refused(model, prompt, message):
    with pytest.raises(GenerationError, match=message):
        engine(model).submit(prompt, SamplingParams(max_tokens=3))


def test_bad_sampling_settings_are_refused(model):
    with pytest.raises(GenerationError, match="top_p"):
        engine(model).submit([5], SamplingParams(top_p=0.0))


def test_background_thread_serves_concurrent_submitters(model):
    prompts = prompts_of(12, seed=10)
    ref = [c.output_ids for c in engine(model).generate(prompts, GREEDY)]
    eng = engine(model, max_batch=4).start()
    out = [None] * len(prompts)

    def client(i):
        out[i] = eng.submit(prompts[i], GREEDY).result().output_ids

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    eng.stop()
    assert out == ref
    assert eng.snapshot()["running"] == 0


def test_penalties_and_logit_bias_steer_tokens(model):
    prompt = prompts_of(1, seed=11)[0]
    base = engine(model).generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True))[0].output_ids
    eng = engine(model)
    h = eng.submit(prompt, SamplingParams(max_tokens=8, ignore_eos=True), logit_bias={7: 100.0})
    while eng.step():
        pass
    assert h.result().output_ids == [7] * 8
    for presence, frequency in ((2.0, 0.0), (0.0, 2.0), (1.5, 0.5)):
        h = eng.submit(prompt, SamplingParams(max_tokens=8, ignore_eos=True), frequency_penalty=frequency,
                       presence_penalty=presence)
        while eng.step():
            pass
        penalised = h.result().output_ids
        want = penalised_greedy(model, prompt, 8, presence, frequency)
        assert penalised == want, (presence, frequency)
        assert penalised != base, (presence, frequency)  # here the penalty changes the answer: a no-op would fail


def penalised_greedy(model, prompt: list[int], n: int, presence: float, frequency: float) -> list[int]:
    """Greedy tokens under OpenAI's published penalty formula, on full forwards without a cache:
    mu[j] -> mu[j] - c[j] * frequency_penalty - float(c[j] > 0) * presence_penalty, c[j] = times j was generated."""
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(n):
            mu = model(torch.tensor([prompt + out]))[0, -1].double()
            c = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=mu.numel()).double()
            mu = mu - c * frequency - (c > 0).double() * presence
            out.append(int(mu.argmax()))
    return out


@pytest.mark.slow
def test_batch_invariance_with_two_threads(model):
    """The same bitwise check with 2 intra-op threads, where the fused attention kernel and small GEMMs split
    work differently (the granules are measured again for this thread count)."""
    torch.set_num_threads(2)
    try:
        prompts = prompts_of(16, seed=12)
        params = [SamplingParams(max_tokens=3 + i % 5 * 3, ignore_eos=True, logprobs=2) for i in range(16)]
        alone = [engine(model).generate([p], sp)[0] for p, sp in zip(prompts, params)]
        batch = engine(model).generate(prompts, params)
        for a, b in zip(alone, batch):
            assert a.output_ids == b.output_ids
            assert [x.logprob for x in a.logprobs] == [x.logprob for x in b.logprobs]
    finally:
        torch.set_num_threads(1)


def test_in_fresh_thread_returns_raises_and_leaves_no_thread_behind():
    """serve() loads the model through in_fresh_thread so that only the engine thread keeps an OpenMP team: the
    function runs on another thread, which has ended when the call returns; its value comes back and its exception
    is raised on the caller's thread."""
    seen = []

    def work():
        seen.append(threading.current_thread())
        return torch.ones(64, 64).matmul(torch.ones(64, 64)).sum().item()

    assert in_fresh_thread(work) == 64.0 * 64 * 64
    assert seen[0] is not threading.current_thread() and not seen[0].is_alive()

    def fail():
        raise ValueError("no such model")

    with pytest.raises(ValueError, match="no such model"):
        in_fresh_thread(fail)

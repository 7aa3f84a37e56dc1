"""herd's sampling options against the references, on the same logits: transformers' logits processors and warpers
(temperature, top-k, top-p, min-p, repetition penalty; alone, combined, and in the order generate() applies them)
and OpenAI's published formula for presence and frequency penalties. The arithmetic is the same, so the checks are
bit-for-bit (torch.equal, -inf where a token is filtered out). Then seeded sampling: reproducible, and the
empirical distribution of sampled tokens matches the filtered softmax (chi-square at a fixed seed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from herd.ops.sampling import (
    SamplingParams,
    apply_presence_frequency_penalty,
    apply_repetition_penalty,
    draw,
    filter_logits,
    pick_token,
    sampling_logits,
)

# vocabulary sizes: tiny, odd, the tiny test models', the default model's (SmolLM2: 49,152), Llama 3's
SHAPES = (2, 7, 300, 49152)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Rows of at most 49k: one thread is fastest, and on a busy machine 2 threads made sorts 6x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_logits(v: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(v, generator=g) * scale


def hf(processors, logits: torch.Tensor, input_ids: list[int] | None = None) -> torch.Tensor:
    """Run transformers' processors, in order, on one row (V,) as generate() does on a (1, V) batch."""
    ids = torch.tensor([input_ids if input_ids is not None else [0]], dtype=torch.long)
    scores = logits[None].clone()
    for proc in processors:
        scores = proc(ids, scores)
    return scores[0]


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equal, -inf included (torch.equal treats -inf == -inf; NaN never appears here)."""
    return a.dtype == b.dtype and torch.equal(a, b)


# --------------------------------------------------------------------------- each option alone, random rows

@pytest.mark.parametrize("v", SHAPES)
def test_each_warper_alone_is_bitwise_transformers(v):
    for seed, scale in ((0, 1.0), (1, 3.0), (2, 10.0)):
        x = random_logits(v, seed, scale)
        for t in (0.3, 1.0, 1.7):
            assert same(filter_logits(x, SamplingParams(temperature=t)), hf([TemperatureLogitsWarper(t)], x))
        for k in (1, 2, 5, 50, v, v + 3):
            got = filter_logits(x, SamplingParams(temperature=1.0, top_k=k))
            assert same(got, hf([TopKLogitsWarper(k)], x)), (v, k)
        for top_p in (1e-9, 0.1, 0.5, 0.9, 0.95, 0.999):
            got = filter_logits(x, SamplingParams(temperature=1.0, top_p=top_p))
            assert same(got, hf([TopPLogitsWarper(top_p)], x)), (v, seed, top_p)
        for min_p in (0.01, 0.1, 0.5, 1.0):
            got = filter_logits(x, SamplingParams(temperature=1.0, min_p=min_p))
            assert same(got, hf([MinPLogitsWarper(min_p)], x)), (v, min_p)


def test_top_p_boundary_many_rows():
    """Where herd used to differ: it summed the kept mass from the most likely token down, transformers sums the
    dropped mass from the least likely up; in float32 the two disagreed on the boundary token of 49,152-logit rows
    (measured before the fix: 113 of 4,000 random rows, and 11 of these 60). Now none differ."""
    for seed in range(20):
        x = random_logits(49152, 1000 + seed, 1.0 + seed % 5)
        for top_p in (0.9, 0.95, 0.99):
            got = filter_logits(x, SamplingParams(temperature=1.0, top_p=top_p))
            assert same(got, hf([TopPLogitsWarper(top_p)], x)), (seed, top_p)


@pytest.mark.parametrize("v", (7, 300, 49152))
def test_repetition_penalty_is_bitwise_transformers(v):
    x = random_logits(v, 5)
    x[:4] = torch.tensor([0.0, -0.0, -2.5, 2.5])  # zeros and a sign pair among the seen ids
    g = torch.Generator().manual_seed(6)
    history = [0, 1, 2, 3, 3, 3] + torch.randint(0, v, (40,), generator=g).tolist()  # repeats count once
    for penalty in (0.5, 1.0, 1.3, 2.0, 7.0):
        got = apply_repetition_penalty(x, torch.tensor(sorted(set(history))), penalty)
        assert same(got, hf([RepetitionPenaltyLogitsProcessor(penalty)], x, history)), penalty
        assert same(sampling_logits(x, SamplingParams(repetition_penalty=penalty), history),
                    hf([RepetitionPenaltyLogitsProcessor(penalty)], x, history))
    # penalties on negative logits push them further down (multiplied), positive ones are divided
    got = apply_repetition_penalty(x, torch.tensor([2, 3]), 2.0)
    assert got[2] == -5.0 and got[3] == 1.25


def test_repetition_penalty_ignores_ids_beyond_the_vocabulary():
    """A history may hold ids with no logit (Mllama's image token is one past the output vocabulary): transformers
    skips them; herd raised IndexError before."""
    x = random_logits(300, 8)
    history = [5, 299, 300, 128256]
    got = sampling_logits(x, SamplingParams(repetition_penalty=1.5), history)
    assert same(got, hf([RepetitionPenaltyLogitsProcessor(1.5)], x, history))


# --------------------------------------------------------------------------- edge cases

def test_ties_keep_what_transformers_keeps():
    x = torch.tensor([1.0, 3.0, 3.0, 0.0, 3.0, -1.0])
    for k in (1, 2, 3, 4):  # top-k keeps every token tied with the k-th
        got = filter_logits(x, SamplingParams(temperature=1.0, top_k=k))
        assert same(got, hf([TopKLogitsWarper(k)], x))
    assert int(torch.isfinite(filter_logits(x, SamplingParams(temperature=1.0, top_k=1))).sum()) == 3
    for top_p in (1e-6, 0.3, 0.5, 0.7):  # which of the tied tokens stays is decided by the same sort
        got = filter_logits(x, SamplingParams(temperature=1.0, top_p=top_p))
        assert same(got, hf([TopPLogitsWarper(top_p)], x)), top_p
    assert same(filter_logits(x, SamplingParams(temperature=1.0, min_p=1.0)), hf([MinPLogitsWarper(1.0)], x))
    assert torch.isfinite(filter_logits(x, SamplingParams(temperature=1.0, min_p=1.0))).tolist() == \
        [False, True, True, False, True, False]


def test_tiny_top_p_keeps_exactly_the_most_likely_token():
    for v in SHAPES:
        x = random_logits(v, 9)
        got = filter_logits(x, SamplingParams(temperature=1.0, top_p=1e-12))
        assert same(got, hf([TopPLogitsWarper(1e-12)], x))
        assert torch.isfinite(got).nonzero().flatten().tolist() == [int(x.argmax())]


def test_min_p_with_all_mass_on_one_token():
    x = torch.full((49152,), -5.0)
    x[1234] = 100.0  # softmax: 1.0 on it, exactly 0.0 in float32 elsewhere (exp(-105) is below the denormals)
    for min_p in (1e-30, 0.05, 1.0):
        got = filter_logits(x, SamplingParams(temperature=1.0, min_p=min_p))
        assert same(got, hf([MinPLogitsWarper(min_p)], x))
        assert torch.isfinite(got).nonzero().flatten().tolist() == [1234]
    for p in (SamplingParams(temperature=1.0, top_p=0.9), SamplingParams(temperature=1.0, top_k=3)):
        assert pick_token(x, p, torch.Generator().manual_seed(0)) == 1234


def test_rows_already_holding_minus_infinity():
    """A row masked before sampling (a grammar constraint): -inf entries stay out of every filter's arithmetic."""
    x = random_logits(300, 10)
    x[::3] = float("-inf")
    procs = [TemperatureLogitsWarper(0.7), TopKLogitsWarper(50), TopPLogitsWarper(0.8), MinPLogitsWarper(0.02)]
    got = filter_logits(x, SamplingParams(temperature=0.7, top_k=50, top_p=0.8, min_p=0.02))
    assert same(got, hf(procs, x))
    assert not torch.isfinite(got[::3]).any()


# --------------------------------------------------------------------------- presence and frequency

def openai_penalties(logits: np.ndarray, generated: list[int], presence: float, frequency: float, dtype):
    """OpenAI's formula written out in `dtype`: mu[j] -= c[j] * frequency + (c[j] > 0) * presence."""
    c = np.bincount(np.asarray(generated, dtype=np.int64), minlength=logits.shape[0])[:logits.shape[0]].astype(dtype)
    return (logits.astype(dtype) - (c * dtype(frequency) + (c > 0).astype(dtype) * dtype(presence)))


@pytest.mark.parametrize("v", (7, 300, 49152))
def test_presence_and_frequency_penalties_follow_openais_formula(v):
    x = random_logits(v, 11)
    x[:3] = torch.tensor([-4.0, 0.0, 4.0])  # negative, zero and positive logits, all generated below
    g = torch.Generator().manual_seed(12)
    generated = [0, 0, 0, 1, 2, 2] + torch.randint(0, v, (30,), generator=g).tolist()
    worst64 = 0.0
    for presence, frequency in ((0.0, 0.0), (0.6, 0.0), (0.0, 0.3), (2.0, -2.0), (-1.1, 0.7), (0.1, 0.1)):
        got = apply_presence_frequency_penalty(x, generated, presence, frequency)
        want = torch.from_numpy(openai_penalties(x.numpy(), generated, presence, frequency, np.float32))
        assert same(got, want), (presence, frequency)  # the same float32 arithmetic: bit-for-bit
        exact = openai_penalties(x.numpy(), generated, presence, frequency, np.float64)
        worst64 = max(worst64, float(np.abs(got.double().numpy() - exact).max()))
    # Not bit-for-bit against the formula in float64: herd rounds the penalties to float32 (0.1 is not a float32)
    # and subtracts in float32. Measured: at most 4.8e-7 here (half an ulp of 4.0 is 2.4e-7; 0.1 rounds by 1.5e-9).
    assert worst64 < 5e-6
    # tokens of the prompt do not count, nor do tokens never generated
    got = apply_presence_frequency_penalty(x, [2], 1.0, 1.0)
    assert got[2] == x[2] - 2.0 and torch.equal(got[3:], x[3:]) and torch.equal(got[:2], x[:2])
    assert apply_presence_frequency_penalty(x, [], 1.0, 1.0) is x


# --------------------------------------------------------------------------- combined, in generate()'s order

@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """A tiny transformers Llama and no herd model: the reference's own generate() supplies both the raw logits
    and what it sampled from them, so herd's sampling is checked on the very same numbers."""
    from refmodels import make_hf_model

    torch.manual_seed(0)
    return make_hf_model("llama3-gqa", seed=7)


COMBOS = [
    dict(temperature=0.8, top_k=40, top_p=0.9, min_p=0.05, repetition_penalty=1.3),
    dict(temperature=1.0),
    dict(temperature=1.5, top_p=0.5, repetition_penalty=0.8),
    dict(temperature=0.6, top_k=3, min_p=0.2),
    dict(temperature=2.0, top_p=0.95, min_p=0.01, repetition_penalty=1.1),
]


@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_generate_order_and_draws_equal_transformers_generate(tiny_pair, combo):
    """transformers' generate(do_sample=True) with output_logits (raw) and output_scores (after its processors, in
    its order: repetition penalty, temperature, top-k, top-p, min-p): herd's sampling_logits on each raw row is
    bit-identical to its scores, and pick_token with multinomial=True and a generator seeded as torch.manual_seed
    seeds the global one draws the very same tokens."""
    prompt = [5, 17, 42, 9, 9, 100, 17]
    seed, steps = 3, 12
    torch.manual_seed(seed)
    with torch.no_grad():
        out = tiny_pair.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 generation_config=GenerationConfig(do_sample=True, max_new_tokens=steps,
                                                                    **{"top_k": 0, **combo}),
                                 eos_token_id=None, pad_token_id=0, output_logits=True, output_scores=True,
                                 return_dict_in_generate=True)
    want = out.sequences[0, len(prompt):].tolist()
    p = SamplingParams(**combo, seed=seed, multinomial=True)
    gen = p.make_generator()
    got = []
    for raw, scores in zip(out.logits, out.scores):
        history = prompt + got
        assert same(sampling_logits(raw[0], p, history), scores[0]), len(got)
        got.append(pick_token(raw[0], p, gen, history))
    assert got == want


# --------------------------------------------------------------------------- seeded sampling

def test_same_seed_same_tokens_other_seed_other_tokens():
    x = random_logits(300, 13, 1.0)
    p = SamplingParams(temperature=1.2, top_k=100, top_p=0.95, min_p=0.001, seed=42)

    def draw(params):
        g = params.make_generator()
        return [pick_token(x, params, g) for _ in range(64)]

    assert draw(p) == draw(p)
    assert draw(p) != draw(SamplingParams(**{**p.__dict__, "seed": 43}))


def chi2_sf(stat: float, df: int) -> float:
    """P(chi-square with df degrees of freedom > stat): the regularised upper incomplete gamma function."""
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


@pytest.mark.parametrize("multinomial", [False, True], ids=["cdf", "multinomial"])
@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.8),
    SamplingParams(temperature=0.7, top_k=5),
    SamplingParams(temperature=1.3, top_p=0.8, repetition_penalty=1.5),
    SamplingParams(temperature=1.2, min_p=0.1, top_k=7),
], ids=["plain", "top_k", "top_p+rep", "min_p+top_k"])
def test_sampled_tokens_follow_the_filtered_softmax(params, multinomial):
    """6,000 draws at a fixed seed on a fixed 10-token row: no filtered token is ever drawn, and Pearson's
    chi-square against softmax(sampling_logits) is not significant at 0.1%. Wrong filtering or a skewed sampler
    fails it. Both samplers: the default inverse transform on the cumulative sum (measured p-values at this seed:
    0.32, 0.43, 0.76, 0.32) and torch.multinomial (0.996, 0.87, 0.84, 0.54)."""
    params = SamplingParams(**{**params.__dict__, "multinomial": multinomial})
    x = torch.tensor([2.0, 1.5, 1.4, 0.3, 0.0, -0.2, -1.0, 1.0, 0.9, -3.0])
    history = [1, 3]
    probs = torch.softmax(sampling_logits(x, params, history), -1).double()
    n = 6_000
    g = torch.Generator().manual_seed(1234)
    counts = torch.bincount(torch.tensor([pick_token(x, params, g, history) for _ in range(n)]), minlength=10)
    kept = probs > 0
    assert counts[~kept].sum() == 0
    expected = probs[kept] * n
    stat = float(((counts[kept].double() - expected) ** 2 / expected).sum())
    df = int(kept.sum()) - 1
    assert chi2_sf(stat, df) > 1e-3, (stat, df)
    # the test has the power to fail: the same draws against softmax(x) over the kept tokens (temperature and
    # penalty ignored) give p < 1e-9 in every case here (measured with multinomial: 2.8e-30, 4.7e-43, 9.9e-37,
    # 2.1e-10; with the cumulative sum: 1.1e-32, 3.2e-44, 9.1e-36, 1.2e-11)
    wrong = torch.softmax(x.double()[kept], -1) * n
    assert chi2_sf(float(((counts[kept].double() - wrong) ** 2 / wrong).sum()), df) < 1e-6


def test_draw_never_picks_an_entry_of_probability_zero_even_at_the_ends(monkeypatch):
    """The inverse transform at its edges: zeros first, last and between are never drawn, a one-hot row always
    gives its one entry, and u = 0 and u = 1 (torch.rand never returns 1, but u * total may round up to the total)
    land on the first and last entries of non-zero probability."""
    probs = torch.tensor([0.0, 0.0, 0.3, 0.0, 0.7, 0.0, 0.0])
    g = torch.Generator().manual_seed(0)
    assert {draw(probs, g) for _ in range(2_000)} == {2, 4}
    for hot in range(7):
        assert draw(torch.nn.functional.one_hot(torch.tensor(hot), 7).float(), g) == hot
    real_rand = torch.rand
    for u, want in [(0.0, 2), (1.0, 4)]:
        monkeypatch.setattr(torch, "rand", lambda *a, u=u, **k: torch.tensor(u, dtype=torch.float64))
        assert draw(probs, g) == want, u
    monkeypatch.setattr(torch, "rand", real_rand)

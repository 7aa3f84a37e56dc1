"""Speculative decoding (herd/engine/speculate.py): greedy output equal to plain decoding on the default model (n-gram
and a pruned draft; 50 prompts in the Engine, 8 alone in BatchRun), sampled output distributed as the target's
(chi-square on a tiny 8-token model), the CLI flags and the errors."""

from __future__ import annotations

import itertools

import pytest
import torch
from scipy.stats import chisquare

from herd.config import ModelConfig
from herd.engine.generate import generate_batch
from herd.engine.speculate import NgramIndex, Speculation, accept, prune_layers
from herd.errors import ConfigError, GenerationError
from herd.models.llama import build_model
from herd.ops.sampling import SamplingParams

WORDS = ["cat", "river", "engine", "garden", "paper", "signal", "winter", "market", "silver", "forest"]


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: on a 2-core machine shared with other jobs a small op spends most of its time in OpenMP
    hand-offs (15x here for the tiny models, several x for the default model's decode steps)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def llm(smollm_gguf):
    import herd

    return herd.load(smollm_gguf)


def _prompts(llm, n: int = 50) -> list[list[int]]:
    """Chat prompts of several kinds: copy tasks (n-gram friendly), lists, questions."""
    out = []
    for i in range(n):
        a, b, c = WORDS[i % 10], WORDS[(3 * i + 1) % 10], WORDS[(7 * i + 2) % 10]
        kind = i % 3
        if kind == 0:
            text = f"Repeat exactly: the {a} and the {b} met the {c}. The {a} and the {b} met the {c}."
        elif kind == 1:
            text = f"List three facts about a {a}, a {b} and a {c}."
        else:
            text = f"Why would a {a} need a {b}? Answer in one sentence about the {c}."
        out.append(llm.encode_prompt(text))
    return out


def test_greedy_equals_plain_decoding_batch_1(llm):
    """herd generate's case (BatchRun, one sequence, the native step): speculative greedy output = plain greedy
    output, n-gram and a pruned draft (first 2 and last 2 of 30 layers), 8 prompts."""
    from herd.api import speculation

    params = SamplingParams(max_tokens=12, logprobs=0)
    for method, draft in (("ngram", None), ("draft", "prune:4")):
        spec = speculation(llm, method, draft, 4)
        spec.gated = False  # every step drafts what the drafter finds (the gate is tested below)
        for p in _prompts(llm, 8):
            plain = generate_batch(llm.model, [p], params, stop_ids=llm.stop_ids)[0]
            got = generate_batch(llm.model, [p], params, stop_ids=llm.stop_ids, speculation=spec)[0]
            assert got.output_ids == plain.output_ids, (method, p)
            # the verifying rows carry the plain step's bits: every chosen token's logprob is the same float
            assert [lp.logprob for lp in got.logprobs] == [lp.logprob for lp in plain.logprobs], (method, p)
        assert spec.stats["drafted"] > 0
        if method == "ngram":
            assert spec.stats["accepted"] > 5, spec.stats


def test_engine_greedy_equals_plain_engine_on_50_prompts(llm):
    """herd serve's case (the continuous-batching Engine, paged cache, native step): 50 prompts, speculative
    greedy = plain greedy, n-gram and the pruned draft; acceptance counters reach /metrics."""
    from herd.api import speculation
    from herd.engine.scheduler import Engine
    from herd.server.metrics import Metrics

    prompts = _prompts(llm)
    params = SamplingParams(max_tokens=12)
    plain = [c.output_ids for c in Engine(llm.model, None, llm.stop_ids, max_batch=16, ctx=256).generate(prompts,
                                                                                                        params)]
    for method, draft in (("ngram", None), ("draft", "prune:4")):
        spec = speculation(llm, method, draft, 3)
        spec.gated = False  # at 16 rows the gate would draft little (tested below)
        eng = Engine(llm.model, None, llm.stop_ids, max_batch=16, ctx=256, speculation=spec)
        got = [c.output_ids for c in eng.generate(prompts, params)]
        diff = [i for i in range(len(prompts)) if got[i] != plain[i]]
        assert not diff, f"{method}: prompts {diff} differ from plain decoding"
        snap = eng.snapshot()
        assert snap["spec_drafted_tokens"] > 0 and len(snap["spec_accepted_at"]) == 3
        if method == "ngram":  # the copy prompts are there to be guessed
            assert snap["spec_accepted_tokens"] > 20, snap
            text = Metrics(eng.snapshot).render().decode()
            kept = snap["spec_accepted_at"][0]
            assert f'herd_spec_accepted_by_position_total{{position="0"}} {float(kept)}' in text
            assert f"herd_spec_accepted_tokens_total {float(snap['spec_accepted_tokens'])}" in text


# ---------------------------------------------------------------------------------------------------- sampling
V = 8


def _tiny(seed: int, scale: float) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=V, ffn_dim=64, max_seq_len=64)
    model = build_model(cfg).eval()
    with torch.no_grad():
        model.output.weight.mul_(scale)  # a spread-out distribution: every cell of the test is visited
    return model


@torch.inference_mode()
def _exact_joint(model, prompt: list[int], p: SamplingParams) -> torch.Tensor:
    """P(t1, t2, t3) (V, V, V) of the target's sampler after prompt, by enumeration."""
    from herd.engine.speculate import target_scores

    seqs = torch.tensor([prompt + list(c) for c in itertools.product(range(V), repeat=3)])
    logits = model(seqs)[:, len(prompt) - 1:]  # (V^3, 3, V): the rows that predict t1, t2, t3
    joint = torch.ones(len(seqs), dtype=torch.float64)
    for j in range(3):
        for i, row in enumerate(logits[:, j]):
            probs = torch.softmax(target_scores(row, p, seqs[i, :len(prompt) + j].tolist()), -1)
            joint[i] *= float(probs[seqs[i, len(prompt) + j]])
    return joint.reshape(V, V, V)


def _chi2_pvalue(obs: torch.Tensor, expected: torch.Tensor, keep: torch.Tensor) -> float:
    """Chi-square p of counts obs against probabilities expected (both (V, V)); cells outside keep pooled."""
    o, e = obs.flatten().double(), expected.flatten().double()
    if (~keep).any():
        o, e = torch.cat([o[keep], o[~keep].sum()[None]]), torch.cat([e[keep], e[~keep].sum()[None]])
    impossible = e == 0  # cells of probability 0: any count there rejects outright, none is no evidence
    if bool((o[impossible] > 0).any()):
        return 0.0
    o, e = o[~impossible], e[~impossible]
    return float(chisquare(o.numpy(), (e / e.sum() * o.sum()).numpy()).pvalue)


@pytest.mark.parametrize("method", ["draft", "ngram", "engine-draft"])
def test_sampled_output_is_distributed_as_the_target(method):
    """2500 sampled continuations (1 token from the prefill, then 2-token speculation: every guess verified, adaptive
    K off), in BatchRun or in the Engine: the counts of (t2, t3) -- the tokens the rejection rule decides -- fit the
    target's exact distribution (chi-square), and do not fit what keeping every guess would give."""
    from herd.engine.scheduler import Engine

    target, draft = _tiny(0, 0.3), _tiny(1, 0.3)
    prompt = [1, 2, 3, 1, 2, 3, 1, 2] if method == "ngram" else [5, 1, 4]
    p = SamplingParams(max_tokens=4, temperature=0.9, top_k=7, repetition_penalty=1.2, ignore_eos=True)
    n = 2500
    params = [SamplingParams(**{**p.__dict__, "seed": i}) for i in range(n)]
    spec = Speculation(method.removeprefix("engine-"), 2, None if method == "ngram" else draft, ngram_min=1,
                       ngram_max=2, adaptive=False, gated=False)
    if method.startswith("engine"):
        got = Engine(target, max_batch=64, ctx=32, max_queue=n, speculation=spec).generate([prompt] * n, params)
    else:
        got = generate_batch(target, [prompt] * n, params, speculation=spec)
    assert spec.stats["rounds"] > n // 3 and 0 < spec.stats["accepted"] < spec.stats["drafted"]
    counts = torch.zeros(V, V)
    for c in got:
        counts[c.output_ids[1], c.output_ids[2]] += 1
    expected = _exact_joint(target, prompt, p).sum(0)  # (t2, t3)
    keep = expected.flatten() * n >= 5  # chi-square's rule of thumb; the rest pooled into one cell
    pvalue = _chi2_pvalue(counts, expected, keep)
    assert pvalue > 1e-3, f"{method}: chi-square p = {pvalue:.2e}"
    if method != "ngram":  # the test has power: the guesses' own distribution is rejected outright
        assert _chi2_pvalue(counts, _exact_joint(draft, prompt, p).sum(0), keep) < 1e-6


def test_accept_rule_on_a_known_case():
    """One verification by hand: p = (0.5, 0.5, 0), q one-hot on token 2 -> the guess is always rejected and the
    replacement drawn from p; q = p -> always kept."""
    logits = torch.log(torch.tensor([[0.5, 0.5, 1e-30], [0.2, 0.3, 0.5]]))
    p = SamplingParams(temperature=1.0)
    g = torch.Generator().manual_seed(0)
    firsts = [accept(logits, [2], None, p, g, [])[0] for _ in range(400)]
    assert 2 not in firsts and 150 < firsts.count(0) < 250
    q = torch.tensor([[0.5, 0.5, 0.0]])
    kept = [accept(logits, [1], q, p, g, []) for _ in range(100)]
    assert all(len(k) == 2 and k[0] == 1 for k in kept)


def test_the_gate_drafts_what_pays():
    """Speculation.gate: guess j only while P(guesses 0..j kept) beats a guess row's price in plain tokens at the
    batch; the prior (2 kept in 3) drafts 2 guesses for one sequence and none at 8 but a sequence's first try;
    counts that keep everything open it to all K at both; counts that keep nothing close it; gated=False: all."""
    spec = Speculation("ngram", 4)
    assert spec.price(1) == pytest.approx(0.35) and spec.price(8) == pytest.approx(0.35 * 8 / (1 + 0.35 * 7))
    assert spec.gate(4, 1) == 2 and spec.gate(4, 8) == 0 and spec.gate(4, 8, explore=True) == 1
    for _ in range(100):
        spec.record(4, 4, 5)
    assert spec.gate(4, 1) == 4 and spec.gate(4, 8) == 4
    for _ in range(300):
        spec.record(1, 0, 1)
    assert spec.gate(4, 1) == 0 and spec.gate(3, 1, explore=True) == 1
    assert spec.stats["reached_at"] == [400, 100, 100, 100] and spec.stats["accepted_at"] == [100] * 4
    spec.gated = False
    assert spec.gate(4, 8) == 4


def test_a_never_agreeing_draft_is_dropped(llm):
    """A one-layer pruned draft (a guess costs its step, ~a quarter of the target's, plus a verification row) that
    the target never agrees with: after its first try the gate stops drafting; greedy output stays plain output."""
    from herd.api import speculation

    spec = speculation(llm, "draft", "prune:1", 4)
    assert 0.1 < spec.draft_cost < 0.5, spec.draft_cost
    p = _prompts(llm, 3)[2]
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    plain = generate_batch(llm.model, [p], params, stop_ids=llm.stop_ids)[0]
    got = generate_batch(llm.model, [p], params, stop_ids=llm.stop_ids, speculation=spec)[0]
    assert got.output_ids == plain.output_ids
    assert spec.stats["rounds"] <= 3, spec.stats


def test_ngram_index_finds_the_latest_longest_match():
    idx = NgramIndex(1, 3)
    idx.extend([7, 1, 2, 3, 9, 1, 2, 3, 4, 5, 1, 2])
    assert idx.propose(3) == [3, 4, 5]  # "1 2" last seen before the suffix at 5..7, followed by 3 4 5
    idx.extend([8])
    assert idx.propose(2) == []  # 8 never occurred before


def test_prune_layers_shares_weights_and_runs():
    model = _tiny(0, 1.0)
    d = prune_layers(model, [1])
    assert d.config.n_layers == 1 and d.layers[0].attention.layer == 0
    assert d.layers[0].attention.wq.weight is model.layers[1].attention.wq.weight
    assert model.layers[1].attention.layer == 1 and len(model.layers) == 2  # the target is untouched
    torch.testing.assert_close(d(torch.tensor([[1, 2]])).shape, torch.Size([1, 2, V]))


def test_errors_name_what_is_wrong():
    model = _tiny(0, 1.0)
    other = build_model(ModelConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=V + 1, ffn_dim=64))
    with pytest.raises(ConfigError, match="vocabulary has 9 tokens, the target's 8"):
        generate_batch(model, [[1]], SamplingParams(max_tokens=2), speculation=Speculation("draft", 2, other))
    with pytest.raises(ConfigError, match="unknown speculation method 'tree'"):
        Speculation("tree")
    with pytest.raises(ConfigError, match="draft tokens must be an integer in 1..32"):
        Speculation("ngram", 0)
    with pytest.raises(ConfigError, match="needs a draft model"):
        Speculation("draft", 2)
    with pytest.raises(ConfigError, match="keeps 1..2 of the target's layers, not 5"):
        prune_layers(model, 5)


def test_cli_flags(llm, smollm_gguf, capsys):
    """herd generate --speculate ngram prints what plain generation prints; a draft without --draft-model is a
    one-line error."""
    from herd.cli import main

    args = ["generate", "-m", str(smollm_gguf), "--max-tokens", "10", "-p", "Repeat: one two three, one two three."]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main(args + ["--speculate", "ngram", "--draft-tokens", "3"]) == 0
    assert capsys.readouterr().out == plain
    assert main(args + ["--speculate", "draft"]) == 2
    assert "--draft-model" in capsys.readouterr().err
    from herd.api import speculation

    with pytest.raises(GenerationError, match="needs --speculate draft"):
        speculation(llm, "ngram", "prune:4")


def test_served_answers_equal_and_metrics(llm):
    """The server's wiring (create_app -> Engine(speculation=)): a greedy /v1/completions answer equals the plain
    server's, and /metrics reports the guesses per draft position."""
    from fastapi.testclient import TestClient

    from herd.api import speculation
    from herd.server.app import create_app

    body = {"model": "smol", "prompt": "Copy this list: red, green, blue, yellow, purple.\nCopy: red, green, blue,",
            "max_tokens": 12, "temperature": 0}
    answers = []
    for spec in (None, speculation(llm, "ngram", None, 4)):
        extra = {"speculation": spec} if spec is not None else {}
        with TestClient(create_app(llm, model_name="smol", max_batch=4, **extra)) as c:
            r = c.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            answers.append(r.json()["choices"][0]["text"])
            metrics = c.get("/metrics").text
    assert answers[0] == answers[1]
    assert 'herd_spec_proposed_by_position_total{position="0"}' in metrics
    assert spec.stats["accepted"] > 0

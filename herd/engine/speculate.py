"""Speculative decoding: guess K tokens cheaply, check them with ONE forward of the target, keep the agreeing prefix.

A drafter proposes d_1..d_K after the sequence's last token t: prompt lookup (the longest recent n-gram of the
sequence that occurred before, and the tokens that followed it; free) or a small draft model sharing the target's
vocabulary (`prune_layers` makes one from the target itself). The target then runs t, d_1..d_K as K+1 one-token rows
of one decode call, every row in the SAME cache row at positions p..p+K: each row writes its keys first and attends
to the positions up to its own, so row j sees t, d_1..d_j and gives the distribution of the token after d_j. Cache
slots past the accepted prefix hold rejected guesses; the next call writes its own tokens over them before any row
attends there.

Acceptance. Greedy: d_j is kept while it equals the target's argmax (with the repetition penalty over the history
so far, as pick_token), then the target's own token follows; so greedy output is plain greedy output, provided the
verification rows carry the one-token step's bits. They do by construction: the rows are one-token rows of the
decode step, not a multi-token forward. On AVX-512 the native kernels give a row the same bits alone (one-row
kernel) as in any multi-row call (GEMM), so BatchRun's and the Engine's verification rows equal plain steps as
they are. Where the one-row path has other arithmetic (the decode kernels of AVX2 builds), BatchRun's verification
runs every row through it (`Speculation.exact_rows`, attached by herd.api; ~0.35 of a step per extra row on the
default model, against ~0.1 for the GEMM; `exact_rows=None` trades the batch-1 bit-identity for that speed), and
the Engine pads every call to its kernels' row granule, plain or verifying, so its rows agree anyway. With several
sequences BatchRun's plain output there depends on the batch, so speculation keeps the multi-row path's speed and
bits: greedy tokens equal plain batched decoding's up to near-ties of the two paths' rounding.
Sampling: the standard rule (Leviathan et al. 2023; Chen et al. 2023): keep d_j with probability min(1, p(d_j) /
q(d_j)), else draw from norm(max(0, p - q)) and stop; all kept: one more token from p. p is the target's
distribution after temperature / top-k / top-p / min-p / repetition penalty, q the drafter's (one-hot for prompt
lookup), so every token is distributed exactly as the target's sampler draws it.

Adaptive K: a sequence starts at K = 2 guesses per step (prompt lookup: at the configured K), one more after each step
whose guesses were all kept (up to the configured K). A step that keeps nothing drops it to K = 1 and stops drafting for 1, 4, 16, 64 steps (plain
steps meanwhile; a draft model catches up on the skipped tokens in one forward when drafting resumes), so a drafter
that never agrees costs 5 probes in its first 100 tokens, then one 2-row verification (and one draft step) per 64.

Floor: engine/ (the models it is handed, herd.ops, herd.errors; never herd.quant: the exact-rows switch comes in
from herd.api like the decode step itself).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from herd.errors import ConfigError, GenerationError
from herd.ops.sampling import SamplingParams, apply_repetition_penalty, draw, filter_logits

METHODS = ("ngram", "draft")
MAX_BACKOFF = 64  # plain steps between probes when a sequence's drafts keep failing
DECAY = 0.98  # the gate's acceptance counts fade by this much a drafting step (about the last 50 count)


@dataclass
class Speculation:
    """How to speculate: method "ngram" (prompt lookup) or "draft" (draft_model), up to k drafted tokens per step."""

    method: str = "ngram"
    k: int = 4
    draft_model: nn.Module | None = None
    # prompt lookup: the longest suffix of the sequence (up to ngram_max tokens) seen before proposes what followed
    # it, if it is at least ngram_min tokens long: on the default model's summaries a 1-token match's next token was
    # right 19% of the time, a 2-token match's 46%, 3 or more 64-85% (benchmarks/bench_speculate.py's summarising
    # prompt, 200 tokens), while each guess costs about a third of a decode step to verify
    ngram_max: int = 8
    ngram_min: int = 3
    adaptive: bool = True
    # The price of a guess, in one-row decode steps: verifying one more row costs about row_cost (the native
    # few-row kernel on AVX-512, default model, 2 threads: 0.3-0.4 of a step per added row up to 4 rows, ~0.26
    # beyond), a draft model's step its share of the target's weights (set in __post_init__). gated: guess j of a
    # step (0-based) is drafted only while P(guesses 0..j all kept), from the counters below, exceeds that price in
    # tokens of plain decoding at the current batch: a batch of B plain rows makes B tokens for 1 + row_cost (B - 1)
    # steps, so at one sequence a guess pays from ~0.35, at 8 from ~0.8 (batched decoding is compute-bound, a
    # guess row costs nearly what a real one does): speculation then steps aside instead of slowing the batch.
    row_cost: float = 0.35
    gated: bool = True
    # a context manager factory under which the target's decode step gives every row the bits a one-row call gives
    # (herd.api attaches the native kernels' switch); None: the step already does, or no such promise is kept
    exact_rows: Callable[[], contextlib.AbstractContextManager] | None = None
    stats: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"unknown speculation method {self.method!r}: choose one of {', '.join(METHODS)}")
        if not isinstance(self.k, int) or not 1 <= self.k <= 32:
            raise ConfigError(f"draft tokens must be an integer in 1..32, got {self.k!r}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ConfigError(f"n-gram sizes must satisfy 1 <= ngram_min <= ngram_max, got {self.ngram_min}, "
                              f"{self.ngram_max}")
        if self.method == "draft" and self.draft_model is None:
            raise ConfigError("speculation method 'draft' needs a draft model (--draft-model)")
        if self.method == "ngram" and self.draft_model is not None:
            raise ConfigError("a draft model was given with speculation method 'ngram'; use method 'draft'")
        if not 0.0 <= self.row_cost <= 1.0:
            raise ConfigError(f"row_cost is a fraction of a decode step in 0..1, got {self.row_cost!r}")
        self.draft_cost = 0.0
        self.reset_stats()

    def price(self, batch: int) -> float:
        """What one guess row costs, in tokens of plain decoding at this many live sequences."""
        return (self.row_cost + self.draft_cost) * batch / (1.0 + self.row_cost * (batch - 1))

    def gate(self, k: int, batch: int, explore: bool = False) -> int:
        """How many of k guesses pay at this batch (all of them when not gated): guess j while the estimated
        P(guesses 0..j kept) stays above price(batch). Each position's rate is counted over the steps that reached
        it (all earlier guesses kept), the counts fading by DECAY a step so that they follow the text, with a prior
        of 2 kept in 3: drafting starts at 2 guesses for one sequence and deepens or stops as the counts come.
        explore: a sequence's first drafting step tries one guess whatever the counts, so a gate that closed on
        one workload reopens when another one's guesses are kept."""
        if not self.gated:
            return k
        price, p = self.price(batch), 1.0
        for j in range(k):
            p *= (self._kept[j] + 2.0) / (self._reached[j] + 3.0)
            if p <= price:
                return max(j, min(k, 1) if explore else 0)
        return k

    def reset_stats(self) -> None:
        """Counters: rounds (verifications with drafts), drafted / accepted tokens in all, and per draft position
        (index j: rounds whose j-th guess was proposed / kept / proposed after guesses 0..j-1 were all kept)."""
        self.stats = {"rounds": 0, "drafted": 0, "accepted": 0, "emitted": 0,
                      "proposed_at": [0] * self.k, "accepted_at": [0] * self.k, "reached_at": [0] * self.k}
        self._kept, self._reached = [0.0] * self.k, [0.0] * self.k  # the gate's fading counts

    def check_target(self, model) -> None:
        """Errors for a target (and draft) this speculation cannot run on."""
        cfg = model.config
        if getattr(model, "bind", None) is not None:
            raise GenerationError("speculative decoding takes text models only (this one reads images)")
        if cfg.attention_chunk_size:
            raise GenerationError("speculative decoding needs a model without chunked (ring-cache) attention; "
                                  "Llama 4's chunked layers would lose keys to rejected guesses")
        if self.draft_model is not None:
            d = self.draft_model.config
            if d.vocab_size != cfg.vocab_size:
                raise ConfigError(f"the draft model's vocabulary has {d.vocab_size} tokens, the target's "
                                  f"{cfg.vocab_size}: a draft must share the target's tokenizer")
            if d.attention_chunk_size:
                raise ConfigError("the draft model uses chunked (ring-cache) attention; pick a plain Llama draft")
            self.draft_cost = min(1.0, _step_bytes(self.draft_model) / max(1, _step_bytes(model)))

    def acceptance_rate(self) -> float:
        return self.stats["accepted"] / self.stats["drafted"] if self.stats["drafted"] else 0.0

    def record(self, drafted: int, accepted: int, emitted: int) -> None:
        s = self.stats
        s["emitted"] += emitted
        if drafted:
            s["rounds"] += 1
            s["drafted"] += drafted
            s["accepted"] += accepted
            for j in range(drafted):
                s["proposed_at"][j] += 1
            for j in range(accepted):
                s["accepted_at"][j] += 1
            for j in range(min(drafted, accepted + 1)):
                s["reached_at"][j] += 1
            for j in range(self.k):
                self._kept[j] = DECAY * self._kept[j] + (j < accepted)
                self._reached[j] = DECAY * self._reached[j] + (j < min(drafted, accepted + 1))


def _step_bytes(model: nn.Module) -> int:
    """Bytes a decode step reads: its blocks' and output layer's weights (the embedding table gives one row)."""
    mods = list(model._modules["layers"])
    if "output" in model._modules:
        mods.append(model._modules["output"])
    return sum(t.numel() * t.element_size() for m in mods for t in itertools.chain(m.parameters(), m.buffers()))


# ---------------------------------------------------------------------------------------------------- drafters
def prune_layers(model: nn.Module, keep: list[int] | int) -> nn.Module:
    """A draft model made of some of `model`'s blocks, sharing their weights (no copy): keep is a list of layer
    indices, or a count n (the first n // 2 and last n - n // 2 blocks). Its config has n_layers = len(keep); a
    decode step the model carries (the native one) is given to the draft as a fresh object of the same kind."""
    n = model.config.n_layers
    if isinstance(keep, int):
        if not 1 <= keep <= n:
            raise ConfigError(f"a pruned draft keeps 1..{n} of the target's layers, not {keep}")
        keep = list(range(keep // 2)) + list(range(n - (keep - keep // 2), n))
    keep = list(keep)
    if not keep or any(not 0 <= i < n for i in keep) or len(set(keep)) != len(keep):
        raise ConfigError(f"layers to keep must be distinct indices in 0..{n - 1}, got {keep}")
    draft = _shallow(model)
    blocks = []
    for new, old in enumerate(keep):
        block = _shallow(model.layers[old])
        block._modules["attention"] = att = _shallow(model.layers[old].attention)
        att.layer = new  # its cache slot in the draft's (smaller) cache
        blocks.append(block)
    draft._modules["layers"] = nn.ModuleList(blocks)
    draft.config = dataclasses.replace(model.config, n_layers=len(keep))
    step = getattr(model, "decode_step", None)
    if step is not None:  # one plan per model object: sharing the target's would rebuild it at every call
        draft.decode_step = type(step)()
    return draft


def _shallow(module: nn.Module) -> nn.Module:
    c = copy.copy(module)
    c._modules, c._parameters, c._buffers = dict(module._modules), dict(module._parameters), dict(module._buffers)
    return c


class NgramIndex:
    """Where each n-gram (n = ngram_min .. ngram_max) of a growing token list last ended, updated as tokens come:
    propose() looks up the sequence's current suffix and returns the tokens that followed its latest earlier
    occurrence, longest n first."""

    def __init__(self, lo: int, hi: int):
        self.lo, self.hi = lo, hi
        self.tokens: list[int] = []
        self.last: dict[tuple, int] = {}  # n-gram -> index just past its latest occurrence (excluding the suffix)
        self._pending: list[tuple] = []

    def extend(self, tokens: list[int]) -> None:
        for t in tokens:
            # n-grams ending at the previous token become searchable once a token follows them
            for key, end in self._pending:
                self.last[key] = end
            self.tokens.append(t)
            T = len(self.tokens)
            self._pending = [(tuple(self.tokens[T - n:]), T) for n in range(self.lo, min(self.hi, T) + 1)]

    def propose(self, k: int) -> list[int]:
        T = len(self.tokens)
        for n in range(min(self.hi, T), self.lo - 1, -1):
            end = self.last.get(tuple(self.tokens[T - n:]))
            if end is not None:
                return self.tokens[end:end + k]
        return []


class SeqState:
    """One sequence's speculation state: its drafter's view and the adaptive draft length."""

    def __init__(self, spec: Speculation, history: list[int]):
        # a draft model starts with 2 guesses (each one costs a draft step); prompt lookup, whose guesses cost only
        # their verification and come from a match of ngram_min tokens or more, with all k
        self.k = spec.k if spec.method == "ngram" else min(2, spec.k)
        self.skip = 0  # plain steps left before drafting again
        self.tried = False  # whether this sequence has drafted yet (its first try passes the gate: Speculation.gate)
        self.backoff = 0
        self.index = NgramIndex(spec.ngram_min, spec.ngram_max) if spec.method == "ngram" else None
        if self.index is not None:
            self.index.extend(history)
        self.fed = 0  # positions whose keys the draft model holds (draft method)

    def budget(self, spec: Speculation, room: int, batch: int = 1) -> int:
        """Draft tokens to try this step (0: a plain step), with `batch` sequences decoding in it."""
        if self.skip > 0:
            self.skip -= 1
            return 0
        return spec.gate(max(0, min(self.k if spec.adaptive else spec.k, room)), batch, explore=not self.tried)

    def update(self, spec: Speculation, drafted: int, accepted: int, new_tokens: list[int]) -> None:
        if self.index is not None:
            self.index.extend(new_tokens)
        self.tried |= drafted > 0
        if not drafted or not spec.adaptive:
            return
        if accepted == drafted:
            self.k, self.backoff = min(spec.k, self.k + 1), 0
        elif accepted == 0:  # nothing kept: one guess at a time, after a rest 4 times as long each time
            self.backoff = min(MAX_BACKOFF, max(1, 4 * self.backoff))
            self.skip, self.k = self.backoff, 1
        else:
            self.backoff = 0


# ---------------------------------------------------------------------------------------------------- acceptance
def target_scores(logits: torch.Tensor, p: SamplingParams, history: list[int]) -> torch.Tensor:
    """The row (V,) float32 pick_token draws from: repetition penalty over history, then (unless greedy)
    temperature, top-k, top-p, min-p."""
    scores = logits.float()
    if p.repetition_penalty != 1.0 and history:
        scores = apply_repetition_penalty(scores, torch.tensor(sorted(set(history)), dtype=torch.long),
                                          p.repetition_penalty)
    return scores if p.temperature == 0 else filter_logits(scores, p)


def accept(logits: torch.Tensor, drafts: list[int], q: torch.Tensor | None, p: SamplingParams,
           generator: torch.Generator | None, history: list[int],
           scores_fn: Callable | None = None) -> list[int]:
    """The tokens to emit after a verification: logits (k+1, V) of the target at the k+1 verified positions,
    drafts the k guesses, q (k, V) the drafter's probabilities (None: one-hot on each guess). Returns the kept
    guesses and then the target's own token (a correction, or one more when all are kept): 1..k+1 tokens.
    scores_fn(row, j, history) -> the row pick_token would see (default target_scores: the Engine adds its own
    penalties and biases)."""
    score = scores_fn or (lambda row, j, hist: target_scores(row, p, hist))
    out: list[int] = []
    for j in range(len(drafts) + 1):
        s = score(logits[j], j, history + out)
        if p.temperature == 0:
            t = int(torch.argmax(s))  # the first maximum, as pick_token
            out.append(t)
            if j == len(drafts) or t != drafts[j]:
                return out
            continue
        probs = torch.softmax(s, -1)
        if j == len(drafts):
            out.append(draw(probs, generator, p.multinomial))
            return out
        d = drafts[j]
        qd = 1.0 if q is None else float(q[j, d])
        u = float(torch.rand((), generator=generator))
        if u * qd < float(probs[d]):  # accept with probability min(1, p(d) / q(d))
            out.append(d)
            continue
        if q is None:
            residual = probs.clone()
            residual[d] = 0.0
        else:
            residual = (probs - q[j]).clamp_min(0.0)
        if float(residual.sum()) <= 0.0:  # p <= q everywhere means p == q: rejection is then impossible
            residual = probs
        out.append(draw(residual, generator, p.multinomial))
        return out
    return out


def draft_probs(logits: torch.Tensor, p: SamplingParams, history: list[int]) -> torch.Tensor:
    """The draft model's proposal distribution q (V,) for a sampled sequence: the same transforms as the target's."""
    return torch.softmax(target_scores(logits, p, history), -1)


def exact(spec: Speculation | None):
    """The context the verifying decode call runs in."""
    return spec.exact_rows() if spec is not None and spec.exact_rows is not None else contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------------- BatchRun
class DraftRunner:
    """A draft model over its own contiguous KV cache, one row per BatchRun row. It may lag the target: propose()
    first feeds each sequence the tokens it has not seen (one-token rows, several per sequence when it is behind),
    then drafts one token per call for K calls."""

    def __init__(self, draft: nn.Module, rows: int = 0, max_len: int = 0, cache=None):
        from herd.engine.generate import activation_dtype_device
        from herd.models.kv_cache import KVCache

        self.model = draft
        dtype, self.device = activation_dtype_device(draft)
        # a contiguous cache of its own (BatchRun), or the one it is handed (the Engine's pools on its page table)
        self.cache = cache if cache is not None else KVCache(draft.config, batch=rows, max_len=max_len, dtype=dtype,
                                                             device=self.device)

    def _step(self, feeds: list[tuple[int, int, list[int]]]) -> list[torch.Tensor]:
        """feeds: (cache row, first position, tokens) -> each feed's logits (V,) after its last token. One-token
        feeds go together through the decode step; a longer one (catching up) through the model's forward with
        last_only, so no output projection is spent on tokens whose guesses nobody reads."""
        from herd.engine.generate import decode, prefill

        d, out = self.device, [None] * len(feeds)
        singles = [i for i, f in enumerate(feeds) if len(f[2]) == 1]
        if singles:
            logits = decode(self.model, torch.tensor([feeds[i][2] for i in singles], device=d),
                            torch.tensor([[feeds[i][1]] for i in singles], device=d), self.cache,
                            torch.tensor([feeds[i][0] for i in singles], device=d))[:, -1]
            for j, i in enumerate(singles):
                out[i] = logits[j]
        for i, (row, start, toks) in enumerate(feeds):
            if out[i] is None:
                out[i] = prefill(self.model, torch.tensor([toks], device=d), torch.arange(start, start + len(toks),
                                 device=d), self.cache, torch.tensor([row], device=d))[0, -1]
        return out

    def propose(self, items: list) -> None:
        """items: [row, state, k, history, params, generator, drafts (filled), qs (filled), ...] with k >= 1; history
        ends with the token the target verifies first."""
        feeds = [(it[0], it[1].fed, it[3][it[1].fed:]) for it in items]
        logits = self._step(feeds)
        for it in items:
            it[1].fed = len(it[3])
        for j in range(max(it[2] for it in items)):
            for it, lg in zip(items, logits):
                if it[2] <= j:
                    continue
                row, st, k, hist, p, g, drafts, qs = it[:8]
                if p.temperature == 0:
                    drafts.append(int(torch.argmax(target_scores(lg, p, hist + drafts))))
                else:
                    q = draft_probs(lg, p, hist + drafts)
                    qs.append(q)
                    drafts.append(draw(q, g, p.multinomial))
            more = [it for it in items if it[2] > j + 1]
            if not more:
                break
            logits_more = self._step([(it[0], it[1].fed, [it[6][-1]]) for it in more])
            for it in more:
                it[1].fed += 1
            by_id = {id(it): lg for it, lg in zip(more, logits_more)}
            logits = [by_id.get(id(it)) for it in items]


def batch_decode(model, spec: Speculation, live: list, cache, row: dict, max_len: int):
    """BatchRun's decode loop with speculation (live: its _Seq objects, each prefilled with one token picked;
    row: id(seq) -> cache row): yields Deltas as the plain loop does."""
    from herd.engine.generate import Delta, decode  # noqa: F401  (Delta: what s.add yields)

    spec.check_target(model)
    device = cache.k[0].device
    states = {id(s): SeqState(spec, s.prompt + s.out) for s in live}
    # a draft model starts with nothing cached: its first proposal feeds it the prompt (prefill's slices)
    runner = DraftRunner(spec.draft_model, cache.batch, max_len + spec.k + 1) if spec.method == "draft" else None
    while True:
        live = [s for s in live if s.finish is None]
        if not live:
            return
        plans = []
        for s in live:
            st = states[id(s)]
            k = st.budget(spec, s.max_new - len(s.out) - 1, len(live))
            drafts, qs = [], []
            if k and st.index is not None:
                drafts = st.index.propose(k)
            plans.append([row[id(s)], st, k, s.prompt + s.out, s.p, s.generator, drafts, qs, s])
        with torch.inference_mode():
            if runner is not None:
                asks = [pl for pl in plans if pl[2] > 0]
                if asks:
                    runner.propose(asks)
            tokens, pos, rows = [], [], []
            for r, st, k, hist, *_rest in plans:
                feed = [hist[-1]] + _rest[2]
                tokens += feed
                pos += range(len(hist) - 1, len(hist) - 1 + len(feed))
                rows += [r] * len(feed)
            # one sequence: the rows carry the one-row step's bits (plain batch-1 output); several: the GEMM's
            with exact(spec) if len(live) == 1 else contextlib.nullcontext():
                logits = decode(model, torch.tensor(tokens, device=device)[:, None],
                                torch.tensor(pos, device=device)[:, None], cache,
                                torch.tensor(rows, device=device))[:, -1]  # (N, V)
        at = 0
        for r, st, k, hist, p, g, drafts, qs, s in plans:
            n = len(drafts) + 1
            lg = logits[at:at + n]
            at += n
            q = torch.stack(qs) if qs else None
            out = accept(lg, drafts, q, p, g, hist)
            spec.record(len(drafts), len(out) - 1, len(out))
            done = []
            for j, t in enumerate(out):
                done.append(t)
                yield s.add(t, lg[j])
                if s.finish is not None:
                    break
            st.update(spec, len(drafts), len(out) - 1, done)
            if runner is not None and drafts:  # its keys past the kept guesses are wrong
                st.fed = min(st.fed, len(hist) + len(out) - 1)

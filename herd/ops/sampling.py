"""Next-token selection as plain functions over one row of logits, with an explicit torch.Generator."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from herd.errors import GenerationError


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop. temperature 0 = greedy."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    logprobs: int | None = None  # None: no logprobs; k >= 0: the chosen token's and the k most likely
    ignore_eos: bool = False
    # Draw with torch.multinomial, as transformers' generate() does (its tokens, token for token, at a seed), at
    # 1.5 ms a 49k-token row here, instead of one uniform number through the cumulative sum (65 us; see `draw`).
    multinomial: bool = False

    def validate(self) -> "SamplingParams":
        def bad(name, value, rule):
            raise GenerationError(f"{name} must be {rule}, got {value!r}")

        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 0:
            bad("max_tokens", self.max_tokens, "an integer >= 0")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            bad("temperature", self.temperature, "a finite number >= 0")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", self.top_k, "an integer >= 0")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            bad("top_p", self.top_p, "in (0, 1]")
        if not (isinstance(self.min_p, (int, float)) and 0 <= self.min_p <= 1):
            bad("min_p", self.min_p, "in [0, 1]")
        if not (isinstance(self.repetition_penalty, (int, float)) and math.isfinite(self.repetition_penalty)
                and self.repetition_penalty > 0):
            bad("repetition_penalty", self.repetition_penalty, "a finite number > 0")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= 20):
            bad("logprobs", self.logprobs, "an integer in [0, 20]")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", self.stop, "a list of non-empty strings")
        return self

    def make_generator(self) -> torch.Generator | None:
        if self.temperature == 0:
            return None
        g = torch.Generator()
        g.manual_seed(self.seed if self.seed is not None else torch.seed())
        return g


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on tokens already seen (V,): positive logits divided, negative multiplied.

    Ids outside the output vocabulary (e.g. Mllama's image token, one past the last logit) are ignored: no logit
    exists to penalise, as in transformers' RepetitionPenaltyLogitsProcessor."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    seen = seen[(seen >= 0) & (seen < logits.shape[-1])]
    logits = logits.clone()
    vals = logits[seen]
    logits[seen] = torch.where(vals > 0, vals / penalty, vals * penalty)
    return logits


def apply_presence_frequency_penalty(logits: torch.Tensor, output_ids: list[int], presence: float,
                                     frequency: float) -> torch.Tensor:
    """OpenAI's penalties on one row (V,): logits[j] -= c[j] * frequency + (c[j] > 0) * presence, where c[j]
    counts token j among the tokens generated so far (the prompt does not count)."""
    if not (presence or frequency) or not output_ids:
        return logits
    ids, counts = torch.unique(torch.tensor(output_ids, dtype=torch.long), return_counts=True)
    keep = ids < logits.shape[-1]
    ids, counts = ids[keep], counts[keep].to(logits.dtype)
    logits = logits.clone()
    logits[ids] -= counts * frequency + presence  # (c > 0) is 1 for every id that unique() returned
    return logits


def filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p filtering of one row (V,) float32; removed entries are -inf."""
    logits = logits / p.temperature
    if p.top_k and p.top_k < logits.numel():
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        # Least likely first: a token goes when it and every less likely token hold at most 1 - top_p of the mass,
        # so the token that crosses top_p stays, and so does the most likely one. Summing from the tail, as
        # transformers' TopPLogitsWarper does, keeps the kept set bit-identical to it at the boundary and on ties
        # (summing from the head differed in ~3% of 49k-token rows by one boundary token).
        ascending, order = torch.sort(logits, descending=False)
        tail_mass = torch.softmax(ascending, -1).cumsum(-1)
        drop_sorted = tail_mass <= (1 - p.top_p)
        drop_sorted[-1] = False
        drop = torch.empty_like(drop_sorted).scatter_(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if p.min_p > 0:
        probs = torch.softmax(logits, -1)
        logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    return logits


def sampling_logits(logits: torch.Tensor, p: SamplingParams, history: list[int] | None = None) -> torch.Tensor:
    """The row (V,) float32 a token is drawn from: repetition penalty on history, then (unless greedy) temperature,
    top-k, top-p, min-p; transformers' generate() applies them in this order."""
    logits = logits.float()
    if p.repetition_penalty != 1.0 and history:
        logits = apply_repetition_penalty(logits, torch.tensor(sorted(set(history)), dtype=torch.long),
                                          p.repetition_penalty)
    return logits if p.temperature == 0 else filter_logits(logits, p)


def pick_token(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None,
               history: list[int] | None = None) -> int:
    """Choose the next token from one row of logits (V,)."""
    logits = sampling_logits(logits, p, history)
    if p.temperature == 0:
        return int(torch.argmax(logits))
    return draw(torch.softmax(logits, -1), generator, p.multinomial)


def draw(probs: torch.Tensor, generator: torch.Generator | None, multinomial: bool = False) -> int:
    """An index i of probs (V,) drawn with probability probs[i] / probs.sum(). By inverse transform sampling: the
    first i whose float64 cumulative sum passes u * total, for one uniform u, as llama.cpp's sampler draws; an entry
    of probability 0 is never chosen. torch.multinomial draws one exponential number per entry instead (1.5 ms for
    a 49k-token row on this machine, 23x the cumulative sum): multinomial=True uses it, to reproduce transformers'
    draws at a seed."""
    if multinomial:
        return int(torch.multinomial(probs, 1, generator=generator))
    cdf = probs.double().cumsum(0)
    u = torch.rand((), dtype=torch.float64, generator=generator) * cdf[-1]
    i = int(torch.searchsorted(cdf, u, right=True))
    if i >= cdf.numel():  # u * total rounded up to the total: the last entry that has any probability
        i = int(torch.nonzero(probs).max())
    return i


def token_logprobs(logits: torch.Tensor, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """log p(token) under the model's distribution, and the k most likely (id, logprob) pairs."""
    lp = torch.log_softmax(logits.float(), -1)
    top = []
    if k:
        vals, ids = torch.topk(lp, k)
        top = [(int(i), float(v)) for i, v in zip(ids, vals)]
    return float(lp[token]), top

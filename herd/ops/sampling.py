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
    """CTRL-style penalty on tokens already seen (V,): positive logits divided, negative multiplied."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    logits = logits.clone()
    vals = logits[seen]
    logits[seen] = torch.where(vals > 0, vals / penalty, vals * penalty)
    return logits


def filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p filtering of one row (V,) float32; removed entries are -inf."""
    logits = logits / p.temperature
    if p.top_k and p.top_k < logits.numel():
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, -1)
        # keep the smallest prefix whose mass reaches top_p (the token that crosses it stays)
        drop_sorted = (torch.cumsum(probs, -1) - probs) >= p.top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if p.min_p > 0:
        probs = torch.softmax(logits, -1)
        logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    return logits


def pick_token(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None,
               history: list[int] | None = None) -> int:
    """Choose the next token from one row of logits (V,)."""
    logits = logits.float()
    if p.repetition_penalty != 1.0 and history:
        logits = apply_repetition_penalty(logits, torch.tensor(sorted(set(history)), dtype=torch.long),
                                          p.repetition_penalty)
    if p.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(filter_logits(logits, p), -1)
    return int(torch.multinomial(probs, 1, generator=generator))


def token_logprobs(logits: torch.Tensor, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """log p(token) under the model's distribution, and the k most likely (id, logprob) pairs."""
    lp = torch.log_softmax(logits.float(), -1)
    top = []
    if k:
        vals, ids = torch.topk(lp, k)
        top = [(int(i), float(v)) for i, v in zip(ids, vals)]
    return float(lp[token]), top

"""Prefill + decode over a preallocated KV cache, for a batch of prompts of different lengths.

Each sequence is prefilled alone into its own cache row (no padding, true positions), long prompts in slices, then
all live rows decode together, one token per step, each at its own position. A finished row leaves the batch at
once. Text is streamed as complete UTF-8 characters only, with stop strings held back until they can no longer match.

Floor: the engine drives models (floor 3) and imports nothing from quant/, formats/ or above. A model may carry a
`decode_step` (the native C step that quant/ attaches from outside); `decode()` calls it and falls back to the
model's own forward when it answers None, so every engine -- BatchRun here, the scheduler's Engine -- takes the
fastest path the model offers without knowing what it is. With a Speculation (speculation=), the decode loop is
speculate.batch_decode's: guessed tokens verified as extra one-token rows of the same call.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from herd.models.kv_cache import KVCache, kv_type_of
from herd.errors import GenerationError
from herd.ops.sampling import SamplingParams, pick_token, token_logprobs


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Completion:
    """What one prompt produced."""

    prompt_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" (stop token or string), "length"
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class Delta:
    """One step of streaming: the new text of sequence `index` (possibly empty) and the token behind it."""

    index: int
    text: str
    token: int | None
    logprob: TokenLogprob | None = None
    finish_reason: str | None = None


def utf8_complete_prefix(data: bytes) -> int:
    """Length of the longest prefix of data that does not end inside a multi-byte UTF-8 character."""
    n = len(data)
    for back in range(1, min(4, n) + 1):
        b = data[n - back]
        if b & 0b1100_0000 == 0b1000_0000:  # continuation byte: keep looking for the lead byte
            continue
        need = 1 if b < 0x80 else 2 if b >> 5 == 0b110 else 3 if b >> 4 == 0b1110 else 4 if b >> 3 == 0b11110 else 1
        return n if back >= need else n - back
    return n  # only continuation bytes (invalid): emit them, they decode to U+FFFD


class _Seq:
    def __init__(self, index: int, prompt: list[int], params: SamplingParams, tokenizer, stop_ids: frozenset[int],
                 max_new: int):
        self.index, self.prompt, self.p, self.tok = index, prompt, params, tokenizer
        self.generator = params.make_generator()
        self.stop_ids = frozenset() if params.ignore_eos else stop_ids | frozenset(params.stop_token_ids)
        self.max_new = max_new
        self.out: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.text = ""  # final text so far (stop strings removed)
        self.emitted = 0  # characters of self.text already streamed
        self.finish: str | None = None
        self.hold = max((len(s) for s in params.stop), default=0)

    def add(self, token: int, logits: torch.Tensor) -> Delta:
        lp = None
        if self.p.logprobs is not None:
            value, top = token_logprobs(logits, token, self.p.logprobs)
            lp = TokenLogprob(token, value, top)
            self.logprobs.append(lp)
        if token in self.stop_ids:
            self.finish = "stop"
        else:
            self.out.append(token)
            if len(self.out) >= self.max_new:
                self.finish = "length"
        return Delta(self.index, self._new_text(), token, lp, self.finish)

    def _new_text(self) -> str:
        if self.tok is None:
            return ""
        data = self.tok.decode_bytes(self.out)
        if self.finish is None:
            data = data[:utf8_complete_prefix(data)]
        text = data.decode("utf-8", errors="replace")
        cut = len(text)
        for s in self.p.stop:
            at = text.find(s, max(0, self.emitted - len(s)))
            if at != -1 and at < cut:
                cut = at
        if cut < len(text):
            text, self.finish = text[:cut], "stop"
        self.text = text
        # hold back a tail that could still grow into a stop string
        upto = len(text) if self.finish else max(self.emitted, len(text) - max(self.hold - 1, 0))
        piece, self.emitted = text[self.emitted:upto], max(self.emitted, upto)
        return piece

    def result(self) -> Completion:
        return Completion(self.prompt, list(self.out), self.text, self.finish, self.logprobs)


PREFILL_CHUNK = 128  # tokens per prefill slice: the feed-forward's (T, ffn_dim) float32 tensors set the peak memory


def prefill(model, tokens: torch.Tensor, input_pos: torch.Tensor, cache, cache_rows: torch.Tensor | None = None,
            chunk: int = PREFILL_CHUNK) -> torch.Tensor:
    """tokens (1, T) at input_pos (T,) or (1, T) into the cache; logits (1, 1, V) of the last position. A prompt
    longer than `chunk` goes in slices: the earlier ones only fill the cache, so no more than `chunk` tokens'
    activations are live at once; later slices attend to the cached keys, so the logits equal one pass's up to float
    rounding. A ring cache (Llama 4 chunked layers) or chunk 0 takes one pass."""
    T = tokens.shape[1]
    input_pos = input_pos.reshape(1, T)
    step = getattr(model, "decode_step", None)
    if step is not None and hasattr(step, "prefill"):  # the native step: all layers in C, `chunk` tokens a call
        logits = step.prefill(model, tokens, input_pos, cache, cache_rows, chunk)
        if logits is not None:
            return logits
    if getattr(cache, "window", 0) or not 0 < chunk < T:
        return model(tokens, input_pos, cache, last_only=True, cache_rows=cache_rows)
    last = (T - 1) // chunk * chunk
    for a in range(0, last, chunk):
        model(tokens[:, a:a + chunk], input_pos[:, a:a + chunk], cache, last_only=True, cache_rows=cache_rows)
    return model(tokens[:, last:], input_pos[:, last:], cache, last_only=True, cache_rows=cache_rows)


def decode(model, tokens: torch.Tensor, input_pos: torch.Tensor, cache,
           cache_rows: torch.Tensor | None = None) -> torch.Tensor:
    """One decode step: tokens (B, 1) at input_pos (B, 1) -> logits (B, 1, V); through the model's decode_step when
    it carries one that takes this cache, else its forward."""
    step = getattr(model, "decode_step", None)
    if step is not None:
        logits = step(model, tokens, input_pos, cache, cache_rows)
        if logits is not None:
            return logits
    return model(tokens, input_pos, cache, cache_rows=cache_rows)


def activation_dtype_device(model: torch.nn.Module) -> tuple[torch.dtype, torch.device]:
    """The dtype and device of the model's activations: those of its first floating-point parameter or buffer
    (quantized models keep int8 blocks in some modules, so no single named weight can be relied on)."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        if t.is_floating_point():
            return t.dtype, t.device
    return torch.float32, torch.device("cpu")


class BatchRun:
    """Generation for a batch of prompts: validated on construction, iterate for Deltas, then completions()."""

    def __init__(self, model, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
                 tokenizer=None, stop_ids: frozenset[int] = frozenset(), prefill_chunk: int = PREFILL_CHUNK,
                 images: Sequence | None = None, kv_type: str | None = None, speculation=None):
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise GenerationError(f"{len(prompts)} prompts but {len(params)} sampling settings")
        self.model = model
        self.speculation = speculation  # herd.engine.speculate.Speculation: draft and verify (None: plain steps)
        if speculation is not None:
            speculation.check_target(model)
        self.kv_type = kv_type_of(kv_type)  # the KV cache's storage: f32, f16 or q8_0 (herd/models/kv_cache.py)
        # images: one entry per prompt (None for a text prompt), bound to its cache row before its prefill by a
        # model that takes them (herd/engine/vision_step.py); some take a prompt with images in one pass only
        self.images = list(images) if images is not None else [None] * len(prompts)
        if len(self.images) != len(prompts):
            raise GenerationError(f"{len(prompts)} prompts but {len(self.images)} image entries")
        if any(im is not None for im in self.images) and not hasattr(model, "bind"):
            raise GenerationError("this model takes no images")
        self.prefill_chunk = 0 if getattr(model, "whole_prompts", False) else prefill_chunk
        ctx = model.config.max_seq_len
        self.seqs: list[_Seq] = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            p.validate()
            prompt = [int(t) for t in prompt]
            if not prompt:
                raise GenerationError(f"prompt {i} is empty: at least one token is needed")
            if len(prompt) >= ctx:
                raise GenerationError(f"prompt {i} has {len(prompt)} tokens; the context holds {ctx} "
                                      f"(prompt plus at least one new token)")
            bad = [t for t in prompt if not 0 <= t < model.config.vocab_size]
            if bad:
                raise GenerationError(f"prompt {i} has token ids outside the vocabulary: {bad[:5]}")
            self.seqs.append(_Seq(i, prompt, p, tokenizer, frozenset(stop_ids), min(p.max_tokens, ctx - len(prompt))))

    def completions(self) -> list[Completion]:
        return [s.result() for s in self.seqs]

    def __iter__(self) -> Iterator[Delta]:
        model = self.model
        live = [s for s in self.seqs if s.max_new > 0]
        for s in self.seqs:
            if s.max_new == 0:
                s.finish = "length"
                yield Delta(s.index, "", None, None, "length")
        if not live:
            return
        max_len = max(len(s.prompt) + s.max_new for s in live)
        dtype, device = activation_dtype_device(model)
        cache = KVCache(model.config, batch=len(live), max_len=max_len, dtype=dtype, device=device,
                        kv_type=self.kv_type)
        row = {id(s): r for r, s in enumerate(live)}
        bind = getattr(model, "bind", None)
        with torch.inference_mode():
            for s in live:  # prefill each prompt alone into its own row
                ids = torch.tensor([s.prompt], device=device)
                pos = torch.arange(len(s.prompt), device=device)
                r = row[id(s)]
                if bind is None:
                    logits = prefill(model, ids, pos, cache.rows(r), chunk=self.prefill_chunk)[0, -1]
                else:
                    bind(r, s.prompt, self.images[s.index])
                    logits = prefill(model, ids, pos, cache, torch.tensor([r], device=device),
                                     self.prefill_chunk)[0, -1]
                yield s.add(pick_token(logits, s.p, s.generator, s.prompt), logits)
            if self.speculation is not None:
                from herd.engine.speculate import batch_decode

                yield from batch_decode(model, self.speculation, live, cache, row, max_len)
                return
            while True:
                live = [s for s in live if s.finish is None]
                if not live:
                    return
                tokens = torch.tensor([[s.out[-1]] for s in live], device=device)
                pos = torch.tensor([[len(s.prompt) + len(s.out) - 1] for s in live], device=device)
                rows = None if len(live) == cache.batch else torch.tensor([row[id(s)] for s in live], device=device)
                logits = decode(model, tokens, pos, cache, rows)[:, -1]
                # all rows greedy without a penalty (the common case): one argmax for the batch (the same first
                # maximum per row as pick_token's)
                greedy = all(s.p.temperature == 0 and s.p.repetition_penalty == 1.0 for s in live)
                picks = logits.argmax(-1).tolist() if greedy else None
                for j, (s, lg) in enumerate(zip(live, logits)):
                    token = picks[j] if greedy else pick_token(lg, s.p, s.generator, s.prompt + s.out)
                    yield s.add(token, lg)


def generate_batch(model, prompts, params, tokenizer=None, stop_ids=frozenset(),
                   prefill_chunk: int = PREFILL_CHUNK, kv_type: str | None = None,
                   speculation=None) -> list[Completion]:
    """Generate for every prompt to the end; one Completion per prompt."""
    run = BatchRun(model, prompts, params, tokenizer, stop_ids, prefill_chunk, kv_type=kv_type,
                   speculation=speculation)
    for _ in run:
        pass
    return run.completions()

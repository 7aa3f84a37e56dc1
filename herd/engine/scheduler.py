"""Continuous batching: requests join and leave a running batch at every decode step.

One background thread owns the model. Each step it (1) drops cancelled requests and frees their pages at once,
(2) admits waiting requests while rows and KV pages allow, (3) runs one prefill chunk of the oldest request still
prefilling, and (4) decodes one token for every request that is past its prefill, all rows together, each at its
own position. A finished request leaves the batch at the step it finishes; a new one joins at the next.

KV memory is paged: every layer's keys and values live in one pool of fixed-size pages shared by all sequences,
and each sequence owns a list of pages (its row of the page table). The pool is the memory budget: when a decode
step needs a page and none is free, the youngest request is preempted (its pages released, its tokens so far
re-prefilled when it is re-admitted), so memory stays bounded however long the requests run.

Prefix caching: when a prefill ends, each page it filled is registered under (its parent page's serial, its
tokens). A new request walks that chain over its prompt and reuses every matching page instead of prefilling it
again; pages nobody uses stay cached in LRU order (children before parents) until the allocator needs them back.
Only prefill-written pages are registered: a decode step computes a position's keys with other arithmetic (one
query row instead of many), so reusing decode-written pages would break the bitwise invariance below.

Batch invariance: a row's logits must not depend on which other requests share its batch. The float32 GEMM of
this CPU's BLAS gives a row bit-identical results only when the number of rows is a multiple of a small granule
(measured at start-up by `row_granule`: 4 here; 1, 2, 3, 5, 6, 7 rows take other kernels). So every forward is
padded to a multiple of that granule: decode with dummy rows (scratch cache row, position 0), prefill with dummy
tokens placed *before* the real ones at positions after them (causally invisible to the real tokens), and the key
length (the largest position + 1) to a multiple of `attention_granule` (16 here), with attention on the math
backend (the fused CPU kernel's results change with the batch size). With that, a request gives bit-identical
logits alone, in any batch, and with a cached prefix. After a preemption the recomputed positions come from a
prefill instead of decode steps, which can move later logits by float rounding (tokens change only at near-ties).
A quantized model's native decode step (model.decode_step, reading the pages through the same table) pads its own
rows to its kernels' granule, so the engine adds no padding rows for it; it also prefills, each token as decoded
alone, so with integer activations (herd's default) recomputed positions equal the decoded ones bit for bit.

Images: a request may carry its prompt's images (submit(images=...)); the engine binds them to the request's cache
row at every admission (model.bind, herd/engine/vision_step.py), prefills such a prompt whole where the model needs
it, and shares prefix pages only over the text before the first image (model.prefix_key). Otherwise an image
request is a request like any other: paged, batched, preempted, cancelled and counted the same way.

Speculation (speculation=, herd/engine/speculate.py): a request's guessed tokens join the decode call as extra
one-token rows in its own page-table row at the next positions, so they are padded and batch-invariant like any row
and greedy output is plain output; the kept prefix's keys stay, the rest are overwritten later.

Whole-sequence work (embeddings, reranking, prompt log-probabilities) goes through the same thread: `batch_call`
queues it, and the next step runs it before its prefill and decode, one model user at a time (two threads running
forwards at once would only fight over the cores and each one's thread pool). Calls queued under the same key
while the engine was busy are merged into one call over all their items (one padded forward for many requests).

Floor: engine/ (imports herd.models' contracts through the model it is handed, herd.ops and herd.errors; the paging
itself is paging.py's).
"""

from __future__ import annotations

import concurrent.futures
import itertools
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from torch.nn.attention import SDPBackend, sdpa_kernel

from herd.engine.generate import Completion, Delta, _Seq, decode
from herd.engine.paging import PagedKVCache, PagePool, attention_granule, round_up, row_granule
from herd.engine.speculate import DraftRunner, SeqState, accept
from herd.errors import GenerationError
from herd.ops.sampling import SamplingParams, apply_presence_frequency_penalty, pick_token


class QueueFull(GenerationError):
    """The waiting queue is at its limit; retry later (HTTP 429)."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


# ---------------------------------------------------------------------------------------------------- requests
WAITING, PREFILL, DECODE, DONE = "waiting", "prefill", "decode", "done"


@dataclass
class Request:
    """One sequence in the engine. Events (Delta, then None at the end, or an Exception) go to `sink`."""

    id: int
    prompt: list[int]
    params: SamplingParams
    seq: _Seq
    sink: Callable[[object], None]
    constraint: object = None  # has mask(logits (V,)) -> logits and advance(token)
    images: object = None  # the prompt's images as the model's bind() takes them (herd/engine/vision_step.py)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    state: str = WAITING
    feed: list[int] = field(default_factory=list)  # tokens to prefill (prompt, or prompt + output after preemption)
    cached: list[int] = field(default_factory=list)  # ids whose K/V are in the cache, in position order
    pages: list[int] = field(default_factory=list)
    row: int = -1
    resume: bool = False  # re-prefilling after a preemption: no token to pick at the end of the prefill
    cancelled: bool = False
    arrival: float = 0.0
    first_token_at: float | None = None
    prefix_hit: int = 0  # prompt tokens found in the prefix cache
    spec: SeqState | None = None  # its speculation state (engine speculating, request eligible), reset per admission

    @property
    def finished(self) -> bool:
        return self.state == DONE


class Handle:
    """What submit() returns: iterate for Deltas (blocking), or result() for the Completion."""

    def __init__(self, engine: "Engine", req: Request, events: "queue.Queue | None"):
        self.engine, self.request, self._events = engine, req, events
        self.id = req.id

    def __iter__(self) -> Iterator[Delta]:
        if self._events is None:
            raise GenerationError("this request streams to its own callback")
        while True:
            ev = self._events.get()
            if ev is None:
                return
            if isinstance(ev, BaseException):
                raise ev
            yield ev

    def result(self) -> Completion:
        for _ in self:
            pass
        return self.request.seq.result()

    def cancel(self) -> None:
        self.engine.cancel(self.id)


# ---------------------------------------------------------------------------------------------------- engine
# default batch rows: one per ROW_TOKENS of the KV budget, between MIN_ROWS and MAX_ROWS (llama-server's -np 16 is the
# serving load the defaults are measured at)
MIN_ROWS, MAX_ROWS, ROW_TOKENS = 16, 64, 512


class Engine:
    """Continuous-batching generation over one model. Thread-safe submit/cancel; step() runs one iteration."""

    def __init__(self, model, tokenizer=None, stop_ids: frozenset[int] = frozenset(), *, max_batch: int | None = None,
                 ctx: int | None = None, kv_tokens: int | None = None, page_size: int = 16, max_queue: int = 64,
                 prefill_chunk: int = 256, prefix_cache: bool = True, granule: int | None = None,
                 kv_granule: int | None = None, kv_type: str | None = None, speculation=None):
        cfg = model.config
        self.model, self.tokenizer, self.stop_ids = model, tokenizer, frozenset(stop_ids)
        self.ctx = min(ctx or cfg.max_seq_len, cfg.max_seq_len)
        if (max_batch is not None and max_batch < 1) or self.ctx < 2 or page_size < 1 or max_queue < 0:
            raise GenerationError(f"engine settings out of range: max_batch={max_batch} (>= 1), ctx={self.ctx} "
                                  f"(>= 2), page_size={page_size} (>= 1), max_queue={max_queue} (>= 0)")
        # padding that makes a row's arithmetic independent of the batch (module docstring); 1 = none
        self.granule = max(1, row_granule(model) if granule is None else granule)
        self.kv_granule = max(1, attention_granule(cfg.n_heads, cfg.head_dim, torch.get_num_threads())
                              if kv_granule is None else kv_granule)
        g = self.granule
        self.prefill_chunk = max(g, prefill_chunk // g * g)
        slack = g + self.kv_granule  # padding positions a row may write past its own tokens
        budget = None if kv_tokens is None else -(-kv_tokens // page_size) * page_size
        if budget is not None and budget < self.ctx + slack:
            # the pool is the memory budget and never grows past it: a request's context is what one row can hold
            # of it (with an explicit ctx that cannot fit, the settings are refused)
            if ctx is not None or budget - slack < 2:
                raise GenerationError(f"kv_tokens={kv_tokens} cannot hold one request of ctx={self.ctx} tokens "
                                      f"(needs at least {self.ctx + slack}); raise kv_tokens or lower ctx")
            self.ctx = budget - slack
        self.kv_limited = budget is not None and self.ctx + slack >= budget  # the budget, not the model, bounds ctx
        pages_per_row = -(-(self.ctx + slack) // page_size)
        need = pages_per_row + 1
        kv_tokens = kv_tokens if kv_tokens is not None else max(16384, (self.ctx + g) * 2)
        if max_batch is None:  # rows are cheap (a page-table row each): the KV pages bound memory, not the rows
            max_batch = min(MAX_ROWS, max(MIN_ROWS, kv_tokens // ROW_TOKENS))
        self.max_batch, self.max_queue, self.page_size = max_batch, max_queue, page_size
        n_pages = max(-(-kv_tokens // page_size) + 1, need)
        weight = model.norm.weight  # always float, also when the linears and embedding are quantized
        self.device = weight.device
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        # table rows: one per batch slot, plus a scratch row (all null pages) for padding rows
        self.cache = PagedKVCache(cfg, n_pages, page_size, max_batch + 1, pages_per_row, dtype, self.device,
                                  kv_type=kv_type)  # f32, f16 or q8_0 storage (herd/models/kv_cache.py)
        self.scratch_row = max_batch
        self.pool = PagePool(n_pages, page_size, prefix_cache)
        self.free_rows = list(range(max_batch - 1, -1, -1))
        self.waiting: list[Request] = []
        self.running: list[Request] = []  # admission order (oldest first)
        self._ids = itertools.count(1)
        self._lock = threading.Condition()
        self._incoming: list[Request] = []
        self._cancels: set[int] = set()
        self._jobs: list[tuple[object, Callable, list, concurrent.futures.Future]] = []  # batch_call's queue
        self._thread: threading.Thread | None = None
        self._stop = False
        self.stats = {"requests": 0, "finished": 0, "cancelled": 0, "preempted": 0, "rejected": 0,
                      "prompt_tokens": 0, "prefix_hit_tokens": 0, "prefill_tokens": 0, "decode_tokens": 0,
                      "steps": 0, "errors": 0, "prefill_chunks": 0}
        # speculative decoding (herd/engine/speculate.py): a request's guesses are verified as one-token rows of
        # the decode call in its own page-table row, padded like any rows, so greedy output is plain output. A draft
        # model keeps its keys in pools of its own addressed by the SAME page table (its pages are the request's).
        self.spec, self.draft = speculation, None
        if speculation is not None:
            speculation.check_target(model)
            if speculation.draft_model is not None:
                dc = PagedKVCache(speculation.draft_model.config, n_pages, page_size, max_batch + 1, pages_per_row,
                                  dtype, self.device)
                dc.table = self.cache.table
                self.draft = DraftRunner(speculation.draft_model, cache=dc)

    # -- public, thread-safe -------------------------------------------------------------------------------
    def submit(self, prompt: Sequence[int], params: SamplingParams, sink: Callable[[object], None] | None = None,
               *, constraint=None, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
               logit_bias: dict[int, float] | None = None, images=None) -> Handle:
        """Queue one request (images: what the model's bind() takes for a prompt with images). Raises
        GenerationError for an impossible one and QueueFull past the queue limit."""
        params.validate()
        if images is not None and not hasattr(self.model, "bind"):
            raise GenerationError("this model takes no images")
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise GenerationError("the prompt is empty: at least one token is needed")
        if len(prompt) >= self.ctx:
            raise GenerationError(f"the prompt has {len(prompt)} tokens; the context holds {self.ctx} "
                                  "(prompt plus at least one new token)")
        vocab = self.model.config.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise GenerationError(f"the prompt has token ids outside the vocabulary (0..{vocab - 1}): {bad[:5]}")
        if logit_bias and any(not 0 <= t < vocab for t in logit_bias):
            raise GenerationError(f"logit_bias has token ids outside the vocabulary (0..{vocab - 1})")
        events = None
        if sink is None:
            events = queue.Queue()
            sink = events.put
        rid = next(self._ids)
        seq = _Seq(rid, prompt, params, self.tokenizer, self.stop_ids, min(params.max_tokens, self.ctx - len(prompt)))
        req = Request(rid, prompt, params, seq, sink, constraint, images, presence_penalty, frequency_penalty,
                      dict(logit_bias) if logit_bias else None, feed=list(prompt), arrival=time.monotonic())
        if seq.max_new == 0:  # nothing to generate: answer at once, without taking a row
            self.stats["requests"] += 1
            req.state = DONE
            seq.finish = "length"
            sink(Delta(rid, "", None, None, "length"))
            sink(None)
            return Handle(self, req, events)
        with self._lock:
            if self.queue_depth() >= self.max_queue:
                self.stats["rejected"] += 1
                raise QueueFull(f"the server is busy: {self.queue_depth()} requests are waiting "
                                f"(limit {self.max_queue}); retry later", retry_after=self._retry_after())
            self._incoming.append(req)
            self.stats["requests"] += 1
            self._lock.notify()
        return Handle(self, req, events)

    def cancel(self, rid: int) -> None:
        """Stop a request; its pages are freed at the start of the next step."""
        with self._lock:
            self._cancels.add(rid)
            self._lock.notify()

    def batch_call(self, fn: Callable[[list], Sequence], items: Sequence, key=None) -> concurrent.futures.Future:
        """Run fn(items) on the engine's thread, between two steps; the Future gets its list of results (one per
        item, in order). Calls with the same key (not None) that are waiting together run as ONE fn call over all
        their items, so fn must treat items independently (embeddings of sequences, scores of documents). Without a
        running engine thread the call runs here, at once."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if self._thread is None:
            _run_jobs([(key, fn, list(items), fut)])
            return fut
        with self._lock:
            if self._stop:
                raise GenerationError("the engine stopped")
            self._jobs.append((key, fn, list(items), fut))
            self._lock.notify()
        return fut

    def queue_depth(self) -> int:
        return len(self.waiting) + len(self._incoming)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
                 ) -> list[Completion]:
        """Submit every prompt and wait for all (the engine thread must be running, or it is stepped here)."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        handles = [self.submit(p, sp) for p, sp in zip(prompts, params)]
        if self._thread is None:
            while self.step():
                pass
        return [h.result() for h in handles]

    def start(self) -> "Engine":
        """Run the loop on a background thread. For full speed, no other live thread should have run the model's
        parallel work before (herd/engine/threads.py says why)."""
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="herd-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def snapshot(self) -> dict:
        """Counters and gauges for /metrics and /health."""
        sp = self.spec.stats if self.spec is not None else {}
        spec = {"spec_rounds": sp.get("rounds", 0), "spec_drafted_tokens": sp.get("drafted", 0),
                "spec_accepted_tokens": sp.get("accepted", 0), "spec_proposed_at": list(sp.get("proposed_at", [])),
                "spec_accepted_at": list(sp.get("accepted_at", []))}
        return dict(self.stats, **spec, waiting=self.queue_depth(), running=len(self.running),
                    pages_used=self.pool.used(), pages_total=self.pool.n_pages - 1, page_size=self.page_size,
                    cached_pages=len(self.pool.lru), kv_bytes=self.cache.nbytes())

    # -- the loop --------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stop and not (self._incoming or self._cancels or self.waiting or self.running
                                              or self._jobs):
                    self._lock.wait()
                if self._stop:
                    break
            try:
                self.step()
            except Exception:  # never let one bad step take the server down; the request failed already
                traceback.print_exc()
        for req in self.waiting + self.running + self._incoming:
            self._finish(req, GenerationError("the engine stopped"))
        with self._lock:
            jobs, self._jobs = self._jobs, []
        for *_, fut in jobs:
            fut.set_exception(GenerationError("the engine stopped"))

    def step(self) -> bool:
        """One iteration: cancellations, admissions, one prefill chunk, one decode step. False when idle."""
        with self._lock:
            self.waiting.extend(self._incoming)
            self._incoming.clear()
            cancels, self._cancels = self._cancels, set()
            jobs, self._jobs = self._jobs, []
        if jobs:
            _run_jobs(jobs)
        for req in [r for r in self.waiting + self.running if r.id in cancels]:
            req.cancelled = True
            self.stats["cancelled"] += 1
            self._finish(req, None)
        try:
            self._admit()
            prefilling = [r for r in self.running if r.state == PREFILL]
            if prefilling:
                self._prefill_chunk(prefilling[0])
            decoding = [r for r in self.running if r.state == DECODE]
            if decoding:
                decoding = self._reserve_decode_pages(decoding)
            if decoding:
                self._decode(decoding)
        except Exception as e:  # a failure inside the model: fail the running requests, keep serving
            self.stats["errors"] += 1
            for req in list(self.running):
                self._finish(req, GenerationError(f"generation failed: {type(e).__name__}: {e}"))
        self.stats["steps"] += 1
        return bool(self.waiting or self.running)

    # -- admission, pages, preemption ------------------------------------------------------------------------
    def _pages_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.page_size)

    def _admit(self) -> None:
        while self.waiting and self.free_rows:
            req = self.waiting[0]
            limit = len(req.feed) if req.resume else len(req.feed) - 1  # keep one token to compute logits from
            root, shared = self._prefix_key(req)
            matched = self.pool.match(req.feed, min(limit, shared), root)
            need = self._pages_for(len(req.feed)) - len(matched)
            headroom = sum(1 for r in self.running if r.state == DECODE)  # one page of growth per decoding row
            if self.pool.available() < need + headroom and self.running:
                self.pool.release(matched)
                return
            pages = []
            for _ in range(need):
                page = self.pool.alloc()
                if page is None:
                    break
                pages.append(page)
            if len(pages) < need:  # cannot happen when the pool holds one full context; undo and wait
                self.pool.release(matched + pages)
                return
            self.waiting.pop(0)
            req.pages = matched + pages
            req.row = self.free_rows.pop()
            self.cache.table[req.row].zero_()
            self.cache.table[req.row, :len(req.pages)] = torch.tensor(req.pages, dtype=torch.long)
            n = len(matched) * self.page_size
            req.cached = list(req.feed[:n])
            if hasattr(self.model, "bind"):  # the row's images (or none: clears what its last user left)
                self.model.bind(req.row, req.feed, req.images)
            if not req.resume:
                req.prefix_hit = n
                self.stats["prompt_tokens"] += len(req.prompt)
                self.stats["prefix_hit_tokens"] += n
            # speculation for requests whose next token pick_token alone decides (no OpenAI penalties, biases or
            # constraint); fresh at each admission: a draft model's keys went with the released pages
            plain = req.constraint is None and not (req.presence_penalty or req.frequency_penalty or req.logit_bias)
            req.spec = SeqState(self.spec, req.prompt + req.seq.out) if self.spec is not None and plain else None
            req.state = PREFILL
            self.running.append(req)

    def _prefix_key(self, req: Request) -> tuple[int, int]:
        """(root, tokens) of the prefix cache this request may share: all of a text prompt in the text chains; for
        a prompt with images what the model says (the text before its first image, in chains of its own kind)."""
        if req.images is None:
            return 0, len(req.feed)
        return self.model.prefix_key(req.feed, req.images)

    def _grow(self, req: Request, n_tokens: int) -> bool:
        """Give req pages for its first n_tokens positions; False if the pool is empty."""
        while len(req.pages) < self._pages_for(n_tokens):
            page = self.pool.alloc()
            if page is None:
                return False
            self.cache.table[req.row, len(req.pages)] = page
            req.pages.append(page)
        return True

    def _reserve_decode_pages(self, decoding: list[Request]) -> list[Request]:
        """Make sure every decoding row has a page for its next position, preempting the youngest if needed."""
        for req in list(decoding):
            while req.state == DECODE and not self._grow(req, len(req.cached) + 1):
                victim = self.running[-1]
                self._preempt(victim)
        return [r for r in decoding if r.state == DECODE]

    def _preempt(self, req: Request) -> None:
        """Free a running request's pages and queue it again (first in line) to re-prefill what it had."""
        self.stats["preempted"] += 1
        self._release(req)
        req.state, req.resume = WAITING, bool(req.seq.out)
        req.feed = req.prompt + req.seq.out[:-1] if req.seq.out else list(req.prompt)
        req.cached = []
        self.waiting.insert(0, req)

    def _release(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)
        if req.pages:
            self.pool.release(req.pages)
            req.pages = []
        if req.row >= 0:
            self.cache.table[req.row].zero_()
            self.free_rows.append(req.row)
            req.row = -1

    def _finish(self, req: Request, error: BaseException | None) -> None:
        if req.state == DONE:
            return
        if req in self.waiting:
            self.waiting.remove(req)
        self._release(req)
        req.state = DONE
        if error is None and not req.cancelled:
            self.stats["finished"] += 1
        try:
            if error is not None:
                req.sink(error)
            elif req.cancelled:
                req.sink(Delta(req.id, "", None, None, "cancelled"))
            req.sink(None)
        except Exception:
            pass  # a consumer that went away must not stop the engine

    # -- compute ---------------------------------------------------------------------------------------------
    def _emit(self, req: Request, delta: Delta) -> None:
        try:
            req.sink(delta)
        except Exception:  # the consumer is gone: treat it as a cancellation
            req.cancelled = True
            self.stats["cancelled"] += 1
            self._finish(req, None)
            return
        if delta.finish_reason is not None:
            self._finish(req, None)

    def _retry_after(self) -> float:
        """A rough wait, in seconds, before the queue has room again."""
        return float(max(1, -(-self.queue_depth() // self.max_batch)))

    def _pick(self, req: Request, logits: torch.Tensor) -> None:
        """Choose req's next token from its row of logits (V,) and stream it."""
        seq = req.seq
        scores = apply_presence_frequency_penalty(logits.float(), seq.out, req.presence_penalty,
                                                  req.frequency_penalty)
        if req.logit_bias:
            ids = torch.tensor(list(req.logit_bias), dtype=torch.long)
            scores = scores.clone()
            scores[ids] += torch.tensor(list(req.logit_bias.values()), dtype=scores.dtype)
        if req.constraint is not None:
            scores = req.constraint.mask(scores)
        token = pick_token(scores, seq.p, seq.generator, seq.prompt + seq.out)
        if req.constraint is not None:
            req.constraint.advance(token)
        if req.first_token_at is None:
            req.first_token_at = time.monotonic()
        self._emit(req, seq.add(token, logits))

    @torch.inference_mode()
    def _prefill_chunk(self, req: Request) -> None:
        start = len(req.cached)
        whole = req.images is not None and getattr(self.model, "whole_prompts", False)  # e.g. Mllama's tile mask
        chunk = req.feed[start:] if whole else req.feed[start:start + self.prefill_chunk]
        end = start + len(chunk)
        step = getattr(self.model, "decode_step", None)
        rows = torch.tensor([req.row], device=self.device)
        if chunk and not whole and hasattr(step, "prefill") and step.batch_invariant(self.model, self.cache):
            t, p = torch.tensor([chunk], device=self.device), torch.arange(start, end, device=self.device)[None]
            logits = step.prefill(self.model, t, p, self.cache, rows)[0, -1]  # the C step pads its own rows
        elif chunk:
            # Pad the tokens to a multiple of the row granule and the key length to one of the kv granule. The
            # padding goes first (so the real last token stays the last row) at a position after the chunk, which
            # no real token attends to; it lands in this row's own pages or in the null page.
            pad, target = -len(chunk) % self.granule, round_up(end, self.kv_granule)
            pad = self.granule if target > end and pad == 0 else pad
            target = round_up(end + 1, self.kv_granule) if pad and target == end else target
            t = torch.tensor([[0] * pad + chunk], device=self.device)
            p = torch.tensor([[target - 1] * pad + list(range(start, end))], device=self.device)
            with sdpa_kernel(SDPBackend.MATH):
                logits = self.model(t, p, self.cache, last_only=True, cache_rows=rows)[0, -1]
        if chunk:
            req.cached.extend(chunk)
            self.stats["prefill_tokens"] += len(chunk)
            self.stats["prefill_chunks"] += 1
        if end < len(req.feed):
            return
        root, shared = self._prefix_key(req)
        self.pool.register(req.pages, req.cached[:shared], root)
        req.state = DECODE
        if not req.resume:
            self._pick(req, logits)
        req.resume = False

    @torch.inference_mode()
    def _decode(self, live: list[Request]) -> None:
        # padding rows (scratch row, null pages) bring the row count to a multiple of the row granule and the key
        # length to one of the kv granule; a decode step that keeps rows batch-invariant itself (the native one over
        # this paged cache) needs none
        drafts = self._drafts(live) if self.spec is not None else {}
        feeds = [[r.seq.out[-1]] + drafts.get(r.id, ([], None))[0] for r in live]
        pos = [len(r.cached) + i for r, f in zip(live, feeds) for i in range(len(f))]
        n_rows = len(pos)
        end = max(pos) + 1
        pad, target = -n_rows % self.granule, round_up(end, self.kv_granule)
        if target > end and pad == 0:
            pad = self.granule
        invariant = getattr(getattr(self.model, "decode_step", None), "batch_invariant", None)
        if pad and invariant is not None and invariant(self.model, self.cache):
            pad = 0
        tokens = [t for f in feeds for t in f] + [0] * pad
        pos += [target - 1] * pad
        rows = [r.row for r, f in zip(live, feeds) for _ in f] + [self.scratch_row] * pad
        t = torch.tensor(tokens, device=self.device)[:, None]  # (B, 1)
        p = torch.tensor(pos, device=self.device)[:, None]
        with sdpa_kernel(SDPBackend.MATH):
            logits = decode(self.model, t, p, self.cache, torch.tensor(rows, device=self.device))[:, -1]  # (B, V)
        self.stats["decode_tokens"] += len(live)
        at = 0
        for req, feed in zip(live, feeds):
            lg, at = logits[at:at + len(feed)], at + len(feed)
            if req.spec is None:
                req.cached.append(feed[0])
                if req.state == DECODE:
                    self._pick(req, lg[0])
            elif req.state == DECODE:
                self._accept(req, feed, lg, drafts.get(req.id, ([], None))[1])

    def _drafts(self, live: list[Request]) -> dict[int, tuple[list[int], list]]:
        """Each speculating request's guesses (and the draft model's probabilities, when sampled), at most as many
        as its pages can hold without taking new ones from others (speculation never preempts)."""
        out, asks = {}, []
        for req in live:
            st = req.spec
            if st is None:
                continue
            k = st.budget(self.spec, req.seq.max_new - len(req.seq.out) - 1, len(live))
            if k:
                self._grow(req, len(req.cached) + 1 + k)  # best effort: a short pool just means fewer guesses
                k = min(k, len(req.pages) * self.page_size - len(req.cached) - 1)
            if k <= 0:
                continue
            if st.index is not None:
                out[req.id] = (st.index.propose(k), None)
            else:
                item = [req.row, st, k, req.seq.prompt + req.seq.out, req.seq.p, req.seq.generator, [], [], req]
                asks.append(item)
        if asks:
            with sdpa_kernel(SDPBackend.MATH):
                self.draft.propose(asks)
            for it in asks:
                out[it[8].id] = (it[6], it[7])
        return out

    def _accept(self, req: Request, feed: list[int], logits: torch.Tensor, qs) -> None:
        """Keep req's verified guesses and the target's next token (herd/engine/speculate.py's rule); stream them."""
        seq, drafts = req.seq, feed[1:]
        hist = seq.prompt + seq.out
        out = accept(logits, drafts, torch.stack(qs) if qs else None, seq.p, seq.generator, hist)
        req.cached.extend(feed[:len(out)])  # the last token and the kept guesses: their keys are the right ones
        self.spec.record(len(drafts), len(out) - 1, len(out))
        st, done = req.spec, []
        for j, tok in enumerate(out):
            done.append(tok)
            self._emit(req, seq.add(tok, logits[j]))
            if req.state != DECODE:
                break
        st.update(self.spec, len(drafts), len(out) - 1, done)
        if self.draft is not None and drafts:
            st.fed = min(st.fed, len(hist) + len(out) - 1)


def _run_jobs(jobs: list) -> None:
    """Run batch_call jobs: those sharing a key as one call over their items, each Future given its own share (or
    the call's exception)."""
    groups: dict = {}
    for job in jobs:
        groups.setdefault(job[0] if job[0] is not None else object(), []).append(job)
    for group in groups.values():
        items = [x for _, _, its, _ in group for x in its]
        try:
            with torch.inference_mode():
                results = list(group[0][1](items))
            if len(results) != len(items):
                raise GenerationError(f"a batched call gave {len(results)} results for {len(items)} items")
        except Exception as e:  # the callers get the error; the engine keeps serving
            for *_, fut in group:
                fut.set_exception(e)
            continue
        at = 0
        for _, _, its, fut in group:
            fut.set_result(results[at:at + len(its)])
            at += len(its)

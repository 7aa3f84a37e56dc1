"""The engine requests behind one HTTP request, read as one stream of (choice, Delta) events, and the two ways an
answer leaves: gathered whole (`collect`) or as server-sent events (`event_stream`).

Imports: the engine, herd's sampling and errors, and this folder's state and schemas. The idea to keep in mind:
chat and text completions differ only in how a request becomes prompts and in the JSON of each piece; counting
tokens and latencies, cancelling when the client leaves, the usage chunk and `[DONE]` live here once.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from fastapi.responses import StreamingResponse

from herd.engine.generate import Delta
from herd.engine.scheduler import QueueFull
from herd.errors import GenerationError
from herd.ops.sampling import SamplingParams
from herd.server.schemas import APIError
from herd.server.state import ServerState


def sampling(req, max_tokens: int, logprobs: int | None, choice: int) -> SamplingParams:
    """The engine's sampling parameters for choice `choice` of a request (seeds differ per choice); 400 if invalid."""
    temperature = 1.0 if req.temperature is None else float(req.temperature)
    top_p = 1.0 if req.top_p is None else float(req.top_p)
    if top_p == 0:  # only the most likely token survives: greedy
        temperature, top_p = 0.0, 1.0
    seed = None if req.seed is None else req.seed + choice
    p = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=req.top_k,
                       min_p=float(req.min_p), repetition_penalty=float(req.repetition_penalty), seed=seed,
                       stop=req.stop_list(), logprobs=logprobs, ignore_eos=req.ignore_eos)
    try:
        return p.validate()
    except GenerationError as e:
        raise APIError(400, str(e)) from None


# ---------------------------------------------------------------------------------------------------- choices
class Choices:
    """The engine requests behind one HTTP request; their events merged into one asyncio queue as (choice, event)."""

    def __init__(self, state: ServerState):
        self.state, self.loop = state, asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.ids: list[int] = []
        self.arrival = time.monotonic()

    def submit(self, choice: int, prompt: list[int], params: SamplingParams, req, constraint=None,
               images=None) -> None:
        """Queue one choice on the engine (images: the prompt's, as the vision model encoded them)."""
        bias = {int(k): float(v) for k, v in (req.logit_bias or {}).items()}
        if images is None and self.state.adapters is not None:  # the adapter the request names (None: the base)
            images = self.state.adapters.choice(getattr(req, "model", None))

        def sink(ev, choice=choice, loop=self.loop, queue=self.queue):
            loop.call_soon_threadsafe(queue.put_nowait, (choice, ev))

        try:
            h = self.state.engine.submit(prompt, params, sink, constraint=constraint,
                                         presence_penalty=float(req.presence_penalty),
                                         frequency_penalty=float(req.frequency_penalty), logit_bias=bias,
                                         images=images)
        except QueueFull as e:
            self.cancel()
            raise APIError(429, str(e), type="rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": str(max(1, math.ceil(e.retry_after)))}) from None
        except GenerationError as e:
            self.cancel()
            raise APIError(400, str(e)) from None
        self.ids.append(h.id)

    def cancel(self) -> None:
        for i in self.ids:
            self.state.engine.cancel(i)

    def counts(self, ev: Delta) -> bool:
        """Whether the event carries a generated token (a stop token is not one)."""
        return ev.token is not None and ev.token not in self.state.llm_stop_ids

    async def events(self) -> AsyncIterator[tuple[int, Delta]]:
        """(choice, Delta) until every choice has ended; an engine error raises."""
        left = len(self.ids)
        last: dict[int, float] = {}
        metrics = self.state.metrics
        while left:
            choice, ev = await self.queue.get()
            if ev is None:
                left -= 1
                continue
            if isinstance(ev, BaseException):
                raise APIError(500, f"generation failed: {ev}", type="server_error", code="generation_failed")
            if self.counts(ev):
                now = time.monotonic()
                if choice in last:
                    metrics.tpot.observe(now - last[choice])
                else:
                    metrics.ttft.observe(now - self.arrival)
                last[choice] = now
                metrics.completion_tokens.inc()
            yield choice, ev


# ---------------------------------------------------------------------------------------------------- answers
def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


@dataclass
class Collected:
    """Every choice's answer, gathered whole: text, finish reason, generated-token count and logprob entries."""

    n: int
    texts: list[str] = field(init=False)
    reasons: list[str | None] = field(init=False)
    counts: list[int] = field(init=False)
    logprobs: list[list] = field(init=False)
    stop_logprobs: list = field(init=False)  # the logprob entry of the stop token that ended a choice, if any

    def __post_init__(self):
        self.texts, self.reasons, self.counts = [""] * self.n, [None] * self.n, [0] * self.n
        self.logprobs = [[] for _ in range(self.n)]
        self.stop_logprobs = [None] * self.n


async def _until_disconnect(request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def collect(request, choices: Choices, n: int) -> Collected:
    """Every event of `n` choices gathered; the engine requests are cancelled (499) if the client goes away first."""
    out = Collected(n)

    async def run():
        async for i, ev in choices.events():
            out.texts[i] += ev.text
            if ev.finish_reason is not None:
                out.reasons[i] = ev.finish_reason
            if choices.counts(ev):
                out.counts[i] += 1
                if ev.logprob is not None:
                    out.logprobs[i].append(ev.logprob)
            elif ev.logprob is not None:
                out.stop_logprobs[i] = ev.logprob

    task = asyncio.ensure_future(run())
    watch = asyncio.ensure_future(_until_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task not in done:
            choices.cancel()
            task.cancel()
            raise APIError(499, "client disconnected", code="client_disconnected")
        task.result()
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    choices.state.metrics.latency.observe(time.monotonic() - choices.arrival)
    return out


def sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


# piece(choice, event, finish_reason, counted) -> the choice's entry of one chunk, or None to send nothing
Piece = Callable[[int, Delta, "str | None", bool], "dict | None"]


def event_stream(choices: Choices, *, n: int, base: dict, opening: list[dict], piece: Piece, n_prompt: int,
                 include_usage: bool) -> StreamingResponse:
    """The answer as server-sent events: the `opening` entries, then one chunk per entry `piece` makes of an event,
    the usage chunk when asked, and [DONE]. An engine error is sent as an error event; the engine requests of a
    client that leaves are cancelled."""

    async def body():
        counts = [0] * n
        try:
            for entry in opening:
                yield sse({**base, "choices": [entry]})
            async for i, ev in choices.events():
                counted = choices.counts(ev)
                counts[i] += counted
                reason = None if ev.finish_reason == "cancelled" else ev.finish_reason
                entry = piece(i, ev, reason, counted)
                if entry is not None:
                    yield sse({**base, "choices": [entry]})
            if include_usage:
                yield sse({**base, "choices": [], "usage": usage(n_prompt, sum(counts))})
            yield b"data: [DONE]\n\n"
        except APIError as e:
            yield sse(e.body())
            yield b"data: [DONE]\n\n"
        finally:
            choices.cancel()  # a no-op for requests that ended; frees the rows of a client that left
            choices.state.metrics.latency.observe(time.monotonic() - choices.arrival)

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

"""The OpenAI-compatible HTTP server: FastAPI routes over the continuous-batching Engine.

Routes: GET / (the chat page), GET /health, GET /metrics (Prometheus text), GET /v1/models[/{id}],
POST /v1/chat/completions, POST /v1/completions (both with `stream` as server-sent events ending in [DONE]).
Errors use the OpenAI shape {"error": {"message", "type", "param", "code"}}. With an API key every route but the
page itself needs `Authorization: Bearer KEY`. The engine runs in its own thread; each HTTP request submits one
engine request per choice and reads its events through an asyncio queue. A client that goes away cancels them.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from herd.engine.generate import Delta
from herd.engine.scheduler import Engine, QueueFull
from herd.errors import GenerationError, HerdError
from herd.ops.sampling import SamplingParams
from herd.server.json_constraint import JsonConstraint
from herd.server.schemas import ChatCompletionRequest, CompletionRequest

MAX_BODY_BYTES = 8 << 20
STATIC = Path(__file__).parent / "static"
OPEN_PATHS = ("/", "/index.html")  # the page holds no data; it asks for the key itself


class APIError(Exception):
    """An error answered in the OpenAI shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


# ---------------------------------------------------------------------------------------------------- metrics
class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help, buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        i = next((k for k, b in enumerate(self.buckets) if value <= b), len(self.buckets))
        self.counts[i] += 1
        self.sum += value
        self.count += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        total = 0
        for b, c in zip(self.buckets, self.counts):
            total += c
            lines.append(f'{self.name}_bucket{{le="{b:g}"}} {total}')
        lines.append(f'{self.name}_bucket{{le="+Inf"}} {self.count}')
        lines += [f"{self.name}_sum {self.sum:.6f}", f"{self.name}_count {self.count}"]
        return lines


class Metrics:
    """Counters and histograms kept by the event loop (one thread), rendered as Prometheus text."""

    def __init__(self):
        self.requests: dict[tuple[str, int], int] = {}
        self.prompt_tokens = self.completion_tokens = 0
        self.ttft = Histogram("herd_time_to_first_token_seconds", "Time from request arrival to its first token.",
                              (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.tpot = Histogram("herd_time_per_output_token_seconds", "Time between consecutive tokens of a request.",
                              (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56))
        self.latency = Histogram("herd_request_duration_seconds", "Time from request arrival to its last byte.",
                                 (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))

    def count(self, endpoint: str, status: int) -> None:
        self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1

    def render(self, engine: Engine) -> str:
        snap = engine.snapshot()
        out = ["# HELP herd_requests_total HTTP requests answered, by endpoint and status.",
               "# TYPE herd_requests_total counter"]
        out += [f'herd_requests_total{{endpoint="{e}",status="{s}"}} {n}' for (e, s), n in sorted(self.requests.items())]

        def metric(name, kind, help, value):
            out.extend([f"# HELP {name} {help}", f"# TYPE {name} {kind}", f"{name} {value}"])

        metric("herd_prompt_tokens_total", "counter", "Prompt tokens of answered requests.", self.prompt_tokens)
        metric("herd_generation_tokens_total", "counter", "Tokens generated.", self.completion_tokens)
        metric("herd_queue_depth", "gauge", "Requests waiting for a batch row.", snap["waiting"])
        metric("herd_running_requests", "gauge", "Requests in the running batch.", snap["running"])
        metric("herd_kv_pages_used", "gauge", "KV-cache pages held by running requests.", snap["pages_used"])
        metric("herd_kv_pages_total", "gauge", "KV-cache pages in the pool.", snap["pages_total"])
        metric("herd_kv_cache_bytes", "gauge", "Bytes of the KV-cache pool.", snap["kv_bytes"])
        metric("herd_prefix_cache_hit_tokens_total", "counter", "Prompt tokens served from the prefix cache.",
               snap["prefix_hit_tokens"])
        metric("herd_prefill_tokens_total", "counter", "Prompt tokens computed.", snap["prefill_tokens"])
        metric("herd_preemptions_total", "counter", "Requests preempted to free KV memory.", snap["preempted"])
        metric("herd_rejected_requests_total", "counter", "Requests refused with 429 (queue full).",
               snap["rejected"])
        metric("herd_cancelled_requests_total", "counter", "Requests cancelled (client gone).", snap["cancelled"])
        for h in (self.ttft, self.tpot, self.latency):
            out += h.render()
        return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------------- the state
class ServerState:
    def __init__(self, llm, engine: Engine, model_name: str, api_key: str | None, aliases=(), vision=None):
        self.llm, self.engine, self.model_name, self.api_key = llm, engine, model_name, api_key
        self.vision = vision  # what answers requests with images (ImageChat or a vision checkpoint), or None
        self.llm_stop_ids = llm.stop_ids
        self.names = {model_name, *aliases}
        self.created = int(time.time())
        self.metrics = Metrics()
        self._tool_support: bool | None = None
        self._token_text: dict[int, tuple[str, list[int]]] = {}

    def check_model(self, name: str) -> None:
        if name not in self.names:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{self.model_name}'.",
                           param="model", code="model_not_found")

    def token_text(self, tid: int) -> tuple[str, list[int]]:
        """(text, bytes) of one token, for logprobs."""
        hit = self._token_text.get(tid)
        if hit is None:
            tok = self.llm.tokenizer
            data = tok.decode_bytes([tid]) if tok is not None else b""
            hit = (data.decode("utf-8", errors="replace"), list(data))
            if len(self._token_text) < 200_000:
                self._token_text[tid] = hit
        return hit

    def tools_supported(self) -> bool:
        """Whether the chat format writes tool definitions into the prompt (a template that ignores them does not)."""
        if self._tool_support is None:
            fmt, msgs = self.llm.chat_format, [{"role": "user", "content": "hi"}]
            tool = {"type": "function", "function": {"name": "probe_tool", "description": "probe",
                                                     "parameters": {"type": "object", "properties": {}}}}
            try:
                self._tool_support = fmt is not None and (fmt.encode_dialog(msgs, tools=[tool]) !=
                                                          fmt.encode_dialog(msgs, tools=None))
            except HerdError:
                self._tool_support = False
        return self._tool_support

    def tool_head(self, name: str) -> str:
        """How a forced call to `name` starts: Meta's JSON tool format uses "parameters", others "arguments"."""
        from herd.chat_format import JinjaChatFormat

        key = "arguments" if isinstance(self.llm.chat_format, JinjaChatFormat) else "parameters"
        return '{"name": ' + json.dumps(name) + ', "' + key + '": {'


# ---------------------------------------------------------------------------------------------------- helpers
_KINDS = {"int_type": "an integer", "float_type": "a number", "string_type": "a string", "bool_type": "a boolean",
          "list_type": "an array", "dict_type": "an object", "model_type": "an object", "none_required": "null",
          "int_from_float": "an integer", "literal_error": "one of the allowed values"}


def _field(loc) -> str:
    """'messages.0.content' from a pydantic location, without the union-member tags ('str', 'list[...]')."""
    keep = [str(x) for x in loc if isinstance(x, int) or (x.isidentifier() and x[:1].islower()
                                                          and x not in ("int", "float", "str", "bool", "none"))]
    return ".".join(keep)


def _validation_message(e: ValidationError) -> tuple[str, str | None]:
    errors = e.errors()
    err = errors[0]
    loc = _field(err.get("loc", ()))
    kind = err.get("type", "")
    if kind == "json_invalid":
        return f"The request body is not valid JSON: {err.get('msg')}", None
    if kind == "extra_forbidden":
        return f"Unrecognized request argument supplied: {loc}", loc
    if kind == "missing":
        return f"Missing required parameter: '{loc}'.", loc
    if kind == "model_type" and not loc:
        return "The request body must be a JSON object.", None
    given = err.get("input")
    shown = json.dumps(given)[:80] if isinstance(given, (int, float, str, bool)) or given is None else None
    same = [x for x in errors if _field(x.get("loc", ())) == loc]
    if len(same) > 1 and all(x.get("type") in _KINDS for x in same):  # a union: say which types are accepted
        kinds = list(dict.fromkeys(_KINDS[x["type"]] for x in same))
        if "an integer" in kinds and "a number" in kinds:
            kinds.remove("an integer")
        got = f", got {shown}" if shown is not None else f", got {type(given).__name__}"
        return f"Invalid type for '{loc}': expected {' or '.join(kinds)}{got}", loc or None
    msg = err.get("msg", "invalid value").removeprefix("Value error, ")
    text = f"Invalid value for '{loc}': {msg}" if loc else msg
    if shown is not None and loc:
        text += f" (got {shown})"
    return text, loc or None


async def _parse(request: Request, cls):
    if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
        raise APIError(413, f"The request body is larger than {MAX_BODY_BYTES} bytes.")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise APIError(413, f"The request body is larger than {MAX_BODY_BYTES} bytes.")
    if not body.strip():
        raise APIError(400, "The request body is empty; a JSON object is expected.")
    try:
        return cls.model_validate_json(bytes(body))
    except ValidationError as e:
        message, param = _validation_message(e)
        raise APIError(400, message, param=param) from None


def _length_check(state: ServerState, n_prompt: int, limit: int | None, param: str) -> int:
    """The number of new tokens allowed; 400 when the prompt (plus the requested tokens) exceed the context."""
    ctx = state.engine.ctx
    if n_prompt >= ctx:
        raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, your {param} resulted "
                            f"in {n_prompt} tokens (the prompt must leave room for at least one new token). "
                            "Please reduce the length of the prompt.", param=param, code="context_length_exceeded")
    if limit is None:
        return ctx - n_prompt
    if n_prompt + limit > ctx:
        raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                            f"{n_prompt + limit} tokens ({n_prompt} in the {param}, {limit} in the completion). "
                            "Please reduce the length of the prompt or of max_tokens.",
                       param="max_tokens", code="context_length_exceeded")
    return limit


def _sampling(req, max_tokens: int, logprobs: int | None, choice: int) -> SamplingParams:
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


class _Choices:
    """The engine requests behind one HTTP request; their events merged into one asyncio queue as (choice, event)."""

    def __init__(self, state: ServerState):
        self.state, self.loop = state, asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.ids: list[int] = []
        self.arrival = time.monotonic()

    def submit(self, choice: int, prompt: list[int], params: SamplingParams, req, constraint=None) -> None:
        bias = {int(k): float(v) for k, v in (req.logit_bias or {}).items()}

        def sink(ev, choice=choice, loop=self.loop, queue=self.queue):
            loop.call_soon_threadsafe(queue.put_nowait, (choice, ev))

        try:
            h = self.state.engine.submit(prompt, params, sink, constraint=constraint,
                                         presence_penalty=float(req.presence_penalty),
                                         frequency_penalty=float(req.frequency_penalty), logit_bias=bias)
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

    async def events(self):
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
            if ev.token is not None and ev.token not in self.state.llm_stop_ids:
                now = time.monotonic()
                if choice in last:
                    metrics.tpot.observe(now - last[choice])
                else:
                    metrics.ttft.observe(now - self.arrival)
                last[choice] = now
                metrics.completion_tokens += 1
            yield choice, ev


class _ImageChoices(_Choices):
    """The choices of one request with images: a BatchRun of the vision model, stepped in a worker thread that
    takes the engine's model lock for each step (the text weights are shared with the engine); its events arrive
    on _Choices' queue, one id per choice."""

    def __init__(self, state: ServerState, run, n: int):
        import threading

        super().__init__(state)
        self.run, self.ids = run, list(range(n))
        self.cancelled = threading.Event()
        threading.Thread(target=self._work, name="herd-images", daemon=True).start()

    def _put(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (server shutting down): nobody is listening
            self.cancelled.set()

    def _work(self) -> None:
        it = iter(self.run)
        try:
            while not self.cancelled.is_set():
                with self.state.engine.model_lock:
                    ev = next(it, None)
                if ev is None:
                    break
                self._put((ev.index, ev))
        except BaseException as e:  # reported to the request, never lost in the thread
            self._put((0, e))
            return
        for i in self.ids:
            self._put((i, None))

    def cancel(self) -> None:
        self.cancelled.set()


async def _until_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _collect(request: Request, choices: _Choices, on_event) -> None:
    """Feed every event to on_event; cancel the engine requests if the client goes away first."""

    async def run():
        async for choice, ev in choices.events():
            on_event(choice, ev)

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


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def _chat_logprob(state: ServerState, lp) -> dict:
    text, data = state.token_text(lp.token)
    top = []
    for tid, value in lp.top:
        t, b = state.token_text(tid)
        top.append({"token": t, "logprob": value, "bytes": b})
    return {"token": text, "logprob": lp.logprob, "bytes": data, "top_logprobs": top}


# ---------------------------------------------------------------------------------------------------- the app
def create_app(llm, *, model_name: str, api_key: str | None = None, aliases=(), engine: Engine | None = None,
               vision=None, **engine_kwargs) -> FastAPI:
    """An ASGI app serving `llm` (FastAPI behind the auth/metrics gate); the engine thread starts and stops with
    the app's lifespan. vision: what answers requests with image parts (herd.multimodal.ImageChat over the same
    llm); by default the llm itself when it takes images (a vision checkpoint), else none (such requests get 400)."""
    from contextlib import asynccontextmanager

    if vision is None and getattr(llm, "accepts_images", False):
        vision = llm
    if engine is None:
        engine = Engine(llm.model, llm.tokenizer, llm.stop_ids, **engine_kwargs)
    state = ServerState(llm, engine, model_name, api_key or None, aliases, vision)
    page = (STATIC / "index.html").read_text(encoding="utf-8")

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, engine.stop)

    app = FastAPI(title="herd", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.herd = state

    # -- errors ------------------------------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return error_response(APIError(exc.status_code, message, code=kind))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        return error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error"))

    # -- small routes ------------------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def index():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        alive = engine._thread is not None and engine._thread.is_alive()
        snap = engine.snapshot()
        body = {"status": "ok" if alive else "engine stopped", "model": model_name, "running": snap["running"],
                "waiting": snap["waiting"]}
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(state.metrics.render(engine), media_type="text/plain; version=0.0.4")

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": state.created, "owned_by": "herd",
                "max_model_len": engine.ctx}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        state.check_model(name)
        return model_card()

    # -- chat completions --------------------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await _parse(request, ChatCompletionRequest)
        state.check_model(req.model)
        fmt = llm.chat_format
        if fmt is None:
            raise APIError(400, "This model has no chat format; use /v1/completions.", param="messages")
        messages, with_images = [], False
        for i, m in enumerate(req.messages):
            d = m.model_dump(exclude_none=True)
            if d["role"] == "developer":
                d["role"] = "system"
            if isinstance(m.content, list) and any(p.type != "text" for p in m.content):
                kinds = sorted({p.type for p in m.content if p.type != "text"})
                if set(kinds) - {"image_url", "input_image"}:
                    raise APIError(400, f"messages[{i}].content: unsupported content part types {kinds}; text and "
                                        "image_url parts are supported", param=f"messages.{i}.content")
                if state.vision is None:
                    raise APIError(400, f"messages[{i}].content: the model '{model_name}' takes no images (serve a "
                                        "vision checkpoint, or a vision model with `herd serve --vision DIR`)",
                                   param=f"messages.{i}.content")
                if m.role != "user":
                    raise APIError(400, f"messages[{i}].content: images are only taken in user messages",
                                   param=f"messages.{i}.content")
                with_images = True
            messages.append(d)
        if with_images:
            tools = None
            prompt, choices = await _image_choices(state, req, messages)
        else:
            tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
            choice = req.tool_choice or ("auto" if tools else "none")
            if choice == "none":
                tools = None
            if tools and not state.tools_supported():
                raise APIError(400, f"The chat format of '{model_name}' defines no tool calling, so `tools` "
                                    "cannot be used with this model.", param="tools")
            try:
                prompt = fmt.encode_dialog(messages, add_generation_prompt=True, tools=tools)
            except HerdError as e:
                raise APIError(400, f"messages: {e}", param="messages") from None
            fmt_kind = (req.response_format.type if req.response_format else "text")
            if fmt_kind == "json_schema":
                raise APIError(400, "response_format json_schema is not supported; use "
                                    "{\"type\": \"json_object\"}.", param="response_format")
            heads = None
            if choice == "required":
                heads = [state.tool_head(t["function"]["name"]) for t in tools]
            elif not isinstance(choice, str):
                heads = [state.tool_head(choice.function.name)]
            elif fmt_kind == "json_object":
                heads = ["{"]
            max_new = _length_check(state, len(prompt), req.token_limit(), "messages")
            k = (req.top_logprobs or 0) if req.logprobs else None
            params = [_sampling(req, max_new, k, i) for i in range(req.n)]
            choices = _Choices(state)
            for i, p in enumerate(params):
                constraint = None
                if heads is not None:
                    constraint = JsonConstraint(llm.tokenizer, llm.config.vocab_size, llm.stop_ids, heads=heads,
                                                greedy=p.temperature == 0)
                choices.submit(i, prompt, p, req, constraint)
        state.metrics.prompt_tokens += len(prompt)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        buffer_tools = tools is not None  # a reply that may be a tool call is parsed whole, then sent
        base = {"id": rid, "created": created, "model": model_name, "system_fingerprint": "herd"}

        def finish(texts_i: str, reason: str | None) -> tuple[dict, str | None]:
            msg: dict[str, Any] = {"role": "assistant", "content": texts_i}
            if buffer_tools:
                parsed = fmt.parse_reply(texts_i)
                if parsed.get("tool_calls"):
                    msg = {"role": "assistant", "content": None, "tool_calls": parsed["tool_calls"]}
                    if reason == "stop":
                        reason = "tool_calls"
            return msg, reason

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            async def stream():
                texts = [""] * req.n
                counts = [0] * req.n
                try:
                    for i in range(req.n):
                        yield _sse({**base, "object": "chat.completion.chunk", "choices": [
                            {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}]})
                    async for i, ev in choices.events():
                        delta: dict[str, Any] = {}
                        lp = None
                        counted = ev.token is not None and ev.token not in llm.stop_ids
                        counts[i] += counted
                        if ev.logprob is not None and counted:
                            lp = {"content": [_chat_logprob(state, ev.logprob)]}
                        reason = None if ev.finish_reason == "cancelled" else ev.finish_reason
                        texts[i] += ev.text
                        if buffer_tools:
                            if reason is None:
                                if lp is None:
                                    continue
                            else:
                                msg, reason = finish(texts[i], reason)
                                if msg.get("tool_calls"):
                                    delta["tool_calls"] = [dict(c, index=n) for n, c in enumerate(msg["tool_calls"])]
                                else:
                                    delta["content"] = msg["content"]
                        elif ev.text:
                            delta["content"] = ev.text
                        if not delta and lp is None and reason is None:
                            continue
                        yield _sse({**base, "object": "chat.completion.chunk", "choices": [
                            {"index": i, "delta": delta, "logprobs": lp, "finish_reason": reason}]})
                    if include_usage:
                        yield _sse({**base, "object": "chat.completion.chunk", "choices": [],
                                    "usage": _usage(len(prompt), sum(counts))})
                    yield b"data: [DONE]\n\n"
                except APIError as e:
                    yield _sse(e.body())
                    yield b"data: [DONE]\n\n"
                finally:
                    choices.cancel()  # a no-op for requests that ended; frees the rows of a client that left
                    state.metrics.latency.observe(time.monotonic() - choices.arrival)

            return StreamingResponse(stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        texts = [""] * req.n
        reasons: list[str | None] = [None] * req.n
        logprobs: list[list[dict]] = [[] for _ in range(req.n)]
        counts = [0] * req.n

        def on_event(i: int, ev: Delta) -> None:
            texts[i] += ev.text
            if ev.finish_reason is not None:
                reasons[i] = ev.finish_reason
            if ev.token is not None and ev.token not in llm.stop_ids:
                counts[i] += 1
                if ev.logprob is not None:
                    logprobs[i].append(_chat_logprob(state, ev.logprob))

        await _collect(request, choices, on_event)
        state.metrics.latency.observe(time.monotonic() - choices.arrival)
        out = []
        for i in range(req.n):
            msg, reason = finish(texts[i], reasons[i])
            out.append({"index": i, "message": msg, "logprobs": {"content": logprobs[i]} if req.logprobs else None,
                        "finish_reason": reason})
        return {**base, "object": "chat.completion", "choices": out, "usage": _usage(len(prompt), sum(counts))}

    # -- text completions --------------------------------------------------------------------------------------
    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await _parse(request, CompletionRequest)
        state.check_model(req.model)
        p = req.prompt
        if isinstance(p, str) or (isinstance(p, list) and p and isinstance(p[0], int)):
            p = [p]
        prompts, texts_in = [], []
        for item in p:
            try:
                ids = llm.encode_prompt(item, raw=True) if isinstance(item, str) else list(item)
            except HerdError as e:
                raise APIError(400, f"prompt: {e}", param="prompt") from None
            if not ids:
                raise APIError(400, "prompt: the prompt encodes to no tokens", param="prompt")
            vocab = llm.config.vocab_size
            if any(not 0 <= t < vocab for t in ids):
                raise APIError(400, f"prompt: token ids must be in the vocabulary (0..{vocab - 1})", param="prompt")
            prompts.append(ids)
            texts_in.append(item if isinstance(item, str) else _decode(llm, ids))
        if req.echo and req.logprobs is not None:
            raise APIError(400, "echo with logprobs (prompt logprobs) is not supported.", param="echo")
        limits = [_length_check(state, len(ids), req.token_limit(), "prompt") for ids in prompts]
        choices = _Choices(state)
        n = req.n
        for j, ids in enumerate(prompts):
            for i in range(n):
                choices.submit(j * n + i, ids, _sampling(req, limits[j], req.logprobs, i), req)
        state.metrics.prompt_tokens += sum(len(x) for x in prompts)
        total = len(prompts) * n
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                "system_fingerprint": "herd"}
        n_prompt = sum(len(x) for x in prompts)

        def text_logprobs(entries: list, offset0: int) -> dict:
            tokens, values, tops, offsets, at = [], [], [], [], offset0
            for lp in entries:
                t, _ = state.token_text(lp.token)
                tokens.append(t)
                values.append(lp.logprob)
                tops.append({state.token_text(tid)[0]: v for tid, v in lp.top})
                offsets.append(at)
                at += len(t)
            return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            async def stream():
                counts = [0] * total
                offsets = [len(texts_in[c // n]) if req.echo else 0 for c in range(total)]
                try:
                    if req.echo:
                        for c in range(total):
                            yield _sse({**base, "choices": [{"index": c, "text": texts_in[c // n],
                                                              "logprobs": None, "finish_reason": None}]})
                    async for c, ev in choices.events():
                        counted = ev.token is not None and ev.token not in llm.stop_ids
                        counts[c] += counted
                        lp = None
                        if req.logprobs is not None and ev.logprob is not None and counted:
                            lp = text_logprobs([ev.logprob], offsets[c])
                        reason = None if ev.finish_reason == "cancelled" else ev.finish_reason
                        offsets[c] += len(ev.text)
                        if not ev.text and lp is None and reason is None:
                            continue
                        yield _sse({**base, "choices": [{"index": c, "text": ev.text, "logprobs": lp,
                                                         "finish_reason": reason}]})
                    if include_usage:
                        yield _sse({**base, "choices": [], "usage": _usage(n_prompt, sum(counts))})
                    yield b"data: [DONE]\n\n"
                except APIError as e:
                    yield _sse(e.body())
                    yield b"data: [DONE]\n\n"
                finally:
                    choices.cancel()
                    state.metrics.latency.observe(time.monotonic() - choices.arrival)

            return StreamingResponse(stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        texts = [""] * total
        reasons: list[str | None] = [None] * total
        lps: list[list] = [[] for _ in range(total)]
        counts = [0] * total

        def on_event(c: int, ev: Delta) -> None:
            texts[c] += ev.text
            if ev.finish_reason is not None:
                reasons[c] = ev.finish_reason
            if ev.token is not None and ev.token not in llm.stop_ids:
                counts[c] += 1
                if ev.logprob is not None:
                    lps[c].append(ev.logprob)

        await _collect(request, choices, on_event)
        state.metrics.latency.observe(time.monotonic() - choices.arrival)
        out = []
        for c in range(total):
            head = texts_in[c // n] if req.echo else ""
            out.append({"index": c, "text": head + texts[c], "finish_reason": reasons[c],
                        "logprobs": text_logprobs(lps[c], len(head)) if req.logprobs is not None else None})
        return {**base, "choices": out, "usage": _usage(n_prompt, sum(counts))}

    return _Gate(app, state)


async def _image_choices(state: ServerState, req, messages: list[dict]) -> tuple[list[int], _ImageChoices]:
    """(prompt ids, running choices) of a chat request whose messages hold images: the vision model's BatchRun,
    built (images decoded, checked and encoded) off the event loop. Plain text answers: no tools or constraints."""
    if req.tools and req.tool_choice != "none":
        raise APIError(400, "tools cannot be combined with images yet", param="tools")
    if req.response_format and req.response_format.type != "text":
        raise APIError(400, "response_format cannot be combined with images yet", param="response_format")
    if req.logit_bias or req.presence_penalty or req.frequency_penalty:
        raise APIError(400, "logit_bias, presence_penalty and frequency_penalty cannot be combined with images yet",
                       param="messages")
    limit = req.token_limit()
    k = (req.top_logprobs or 0) if req.logprobs else None
    params = [_sampling(req, state.engine.ctx if limit is None else limit, k, i) for i in range(req.n)]
    try:
        run = await asyncio.get_running_loop().run_in_executor(
            None, lambda: state.vision.run([messages] * req.n, params))
    except HerdError as e:
        raise APIError(400, f"messages: {e}", param="messages") from None
    prompt = list(run.seqs[0].prompt)
    _length_check(state, len(prompt), limit, "messages")
    return prompt, _ImageChoices(state, run, req.n)


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _decode(llm, ids: list[int]) -> str:
    tok = llm.tokenizer
    return tok.decode_bytes(ids).decode("utf-8", errors="replace") if tok is not None else ""


ROUTES = ("/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions")


class _Gate:
    """ASGI middleware in front of the app: counts answers by route and status for /metrics, and with an API key
    refuses (401) every HTTP request but the page that lacks `Authorization: Bearer <key>`."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state
        self.key = state.api_key.encode() if state.api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        route = path if path in ROUTES else "/v1/models/{id}" if path.startswith("/v1/models/") else "other"
        status = [0]

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self.key is not None and path not in OPEN_PATHS:
                auth = dict(scope.get("headers") or []).get(b"authorization", b"")
                token = auth[7:].strip() if auth[:7].lower() == b"bearer " else b""
                if not hmac.compare_digest(token, self.key):
                    message = ("Incorrect API key provided." if token else
                               "You didn't provide an API key: send it as 'Authorization: Bearer KEY'.")
                    err = APIError(401, message, code="invalid_api_key")
                    response = JSONResponse(err.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})
                    return await response(scope, receive, counting_send)
            await self.app(scope, receive, counting_send)
        finally:
            self.state.metrics.count(route, status[0])

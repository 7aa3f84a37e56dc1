"""The OpenAI-compatible HTTP server: FastAPI routes over the continuous-batching Engine.

Routes: GET / (the chat page), GET /health, GET /metrics (Prometheus text), GET /v1/models[/{id}], the adapters'
GET / POST /v1/adapters and DELETE /v1/adapters/{name} (adapters.py),
POST /v1/chat/completions, POST /v1/completions (both with `stream` as server-sent events ending in [DONE]).
Errors use the OpenAI shape {"error": {"message", "type", "param", "code"}}. With an API key every route but the
page itself needs `Authorization: Bearer KEY`. The engine runs in its own thread; each HTTP request submits one
engine request per choice and reads its events through an asyncio queue. A client that goes away cancels them.
GET /health and /v1/health are public (liveness probes carry no key): without the key they say only the status.
GET /openapi.json is the API's schema (request bodies included). While the server drains (the first SIGTERM or
SIGINT: `serve_app`), new requests get 503 and the process exits once the requests in flight are answered.
GET /static/{name} serves the page's scripts and icon (open without a key, like the page).

This module is wiring only: the routes call chat.py and completions.py, which build their engine requests through
choices.py; state.py holds what the server keeps, metrics.py its Prometheus registry, schemas.py the wire shapes.
The server floor imports the engine and the loaded model (herd.api's LLM) from below, never herd.cli.
"""

from __future__ import annotations

import asyncio
import hmac
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from herd.engine.scheduler import Engine
from herd.errors import ConfigError
from herd.server.adapters import add_routes as add_adapter_routes, load_adapter
from herd.server.chat import chat_completion
from herd.server.completions import completion
from herd.server.embeddings import add_routes as add_embedding_routes
from herd.server.metrics import CONTENT_TYPE
from herd.server.schemas import APIError, openapi_bodies
from herd.server.state import ServerState

STATIC = Path(__file__).parent / "static"
OPEN_PATHS = ("/", "/index.html")  # the page holds no data; it asks for the key itself
OPEN_PREFIX = "/static/"  # nor do its static files (and /favicon.ico, which browsers ask for by that name)
STATIC_TYPES = {".js": "text/javascript", ".svg": "image/svg+xml", ".css": "text/css", ".html": "text/html",
                ".png": "image/png", ".ico": "image/x-icon"}
HEALTH_PATHS = ("/health", "/v1/health")  # public: without the key they answer the status alone
ROUTES = ("/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/health",
          "/openapi.json", "/v1/adapters", "/v1/embeddings", "/v1/rerank")


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def create_app(llm, *, model_name: str, api_key: str | None = None, aliases=(), engine: Engine | None = None,
               vision=None, adapters: dict[str, str] | None = None, **engine_kwargs) -> FastAPI:
    """An ASGI app serving `llm` (FastAPI behind the auth/metrics gate); the engine thread starts and stops with
    the app's lifespan. vision: what encodes requests with image parts (herd.api.ImageChat over the same llm); by
    default the llm itself when it takes images (a vision checkpoint), else none (such requests get 400). With one,
    the engine drives its VisionStep, so requests with and without images share one continuous batch. adapters:
    {name: PEFT folder} served beside the base model (herd/server/adapters.py), picked by a request's `model`."""
    if vision is None and getattr(llm, "accepts_images", False):
        vision = llm
    if engine is None:
        engine_kwargs.setdefault("kv_type", getattr(llm, "kv_type", None))
        model = (vision or llm).step()
        if adapters:
            from herd.engine.adapter_step import AdapterStep

            if vision is not None:
                raise ConfigError("adapters are served over a text model, not beside a vision model")
            model = AdapterStep(model)
            for name, folder in adapters.items():
                load_adapter(model, name, folder)
        engine = Engine(model, llm.tokenizer, llm.stop_ids, **engine_kwargs)
    state = ServerState(llm, engine, model_name, api_key or None, aliases, vision)
    page = (STATIC / "index.html").read_text(encoding="utf-8")
    # The page's files, read once: only these names are served (no path from a request reaches the file system).
    static = {p.name: (p.read_bytes(), STATIC_TYPES[p.suffix]) for p in STATIC.iterdir() if p.suffix in STATIC_TYPES}

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, engine.stop)

    app = FastAPI(title="herd", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json")
    app.state.herd = state

    def openapi() -> dict:  # FastAPI's document plus the bodies the POST routes read themselves
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            app.openapi_schema = openapi_bodies(get_openapi(title=app.title, version=app.version, routes=app.routes))
        return app.openapi_schema

    app.openapi = openapi

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

    # -- routes ------------------------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def index():
        return HTMLResponse(page)

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return await static_file("favicon.svg")

    @app.get("/static/{name}", include_in_schema=False)
    async def static_file(name: str):
        if name not in static:
            raise StarletteHTTPException(404, f"no static file {name!r} (there are: {', '.join(sorted(static))})")
        body, media_type = static[name]
        return Response(body, media_type=media_type, headers={"Cache-Control": "no-cache"})

    @app.get("/health")
    @app.get("/v1/health")
    async def health(request: Request):
        """200 while serving, 503 when draining or when the engine stopped; the details only with the key."""
        alive = engine._thread is not None and engine._thread.is_alive()
        status = "draining" if state.draining else "ok" if alive else "engine stopped"
        body: dict = {"status": status}
        if request.scope.get("state", {}).get("herd_authorized", True):
            snap = engine.snapshot()
            body.update(model=model_name, running=snap["running"], waiting=snap["waiting"], weights=state.weights,
                        engine=state.engine_settings())
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        from herd.server.adapters import adapter_card

        return {"object": "list", "data": [state.model_card()]
                + [adapter_card(n, state) for n in (state.adapters.names if state.adapters else {})]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        state.check_model(name)
        return state.model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await chat_completion(state, request)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await completion(state, request)

    add_embedding_routes(app, state)  # POST /v1/embeddings, /v1/rerank
    add_adapter_routes(app, state)  # GET / POST /v1/adapters, DELETE /v1/adapters/{name}
    return _Gate(app, state)


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

        if path in HEALTH_PATHS:  # public; the route shows details only to a request with the key
            scope.setdefault("state", {})["herd_authorized"] = self.key is None or self._has_key(scope)
            try:
                return await self.app(scope, receive, counting_send)
            finally:
                self.state.metrics.count(route, status[0])
        if self.state.draining:
            err = APIError(503, "The server is shutting down; retry on another instance.", type="server_error",
                           code="server_shutting_down")
            response = JSONResponse(err.body(), status_code=503, headers={"Retry-After": "1", "Connection": "close"})
            await response(scope, receive, counting_send)
            return self.state.metrics.count(route, 503)
        self.state.in_flight += 1
        try:
            if (self.key is not None and path not in OPEN_PATHS and not path.startswith(OPEN_PREFIX)
                    and path != "/favicon.ico"):
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
            self.state.in_flight -= 1
            self.state.metrics.count(route, status[0])

    def _has_key(self, scope) -> bool:
        auth = dict(scope.get("headers") or []).get(b"authorization", b"")
        token = auth[7:].strip() if auth[:7].lower() == b"bearer " else b""
        return hmac.compare_digest(token, self.key)


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a drain: the first SIGTERM or SIGINT makes the app answer new requests 503 (and
    /health 503, so a balancer stops sending) while the requests in flight finish; the server exits when none is
    left, or `drain_timeout` seconds after the signal. A second signal exits at once."""

    def __init__(self, config: uvicorn.Config, state: ServerState, drain_timeout: float):
        super().__init__(config)
        self.herd, self.drain_timeout = state, drain_timeout
        self.drain_deadline: float | None = None

    def handle_exit(self, sig, frame) -> None:
        if self.drain_deadline is None:
            self.herd.draining = True
            self.drain_deadline = time.monotonic() + self.drain_timeout
            print(f"herd: draining: {self.herd.in_flight} requests in flight, new ones get 503 (at most "
                  f"{self.drain_timeout:g} s; signal again to exit now)", file=sys.stderr, flush=True)
            return
        self.should_exit = self.force_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.drain_deadline is not None and (self.herd.in_flight <= 0 or time.monotonic() > self.drain_deadline):
            self.should_exit = True
        return await super().on_tick(counter)


def serve_app(app, *, host: str, port: int, log_level: str = "warning", max_connections: int = 1024,
              drain_timeout: float = 30.0) -> None:
    """Run an app from create_app with uvicorn until a signal, draining first (DrainingServer)."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, limit_concurrency=max_connections,
                            timeout_graceful_shutdown=5)
    DrainingServer(config, app.state, drain_timeout).run()

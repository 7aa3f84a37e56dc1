"""What one server holds for its lifetime: the model, its engine, the names it answers to, its metrics, and the
per-model facts routes ask about (a token's text for logprobs, whether the chat format takes tools).

Imports: the engine, herd's chat format and errors, and this folder's schemas and metrics.
"""

from __future__ import annotations

import json
import time

from herd.engine.scheduler import Engine
from herd.errors import HerdError
from herd.server.metrics import Metrics
from herd.server.schemas import APIError


def _bulk_dtype(model):
    """The dtype holding most of a model's parameters (its norms may stay float32 in a bfloat16 model)."""
    sizes: dict = {}
    for p in model.parameters():
        sizes[p.dtype] = sizes.get(p.dtype, 0) + p.numel()
    return max(sizes, key=sizes.get)


class ServerState:
    """One app's model, engine and bookkeeping; the routes read it from `app.state.herd`."""

    def __init__(self, llm, engine: Engine, model_name: str, api_key: str | None, aliases=(), vision=None):
        self.llm, self.engine, self.model_name, self.api_key = llm, engine, model_name, api_key
        self.vision = vision  # what answers requests with images (ImageChat or a vision checkpoint), or None
        self.llm_stop_ids = llm.stop_ids
        self.names = {model_name, *aliases}
        # the AdapterStep the engine drives when adapters are served (herd/server/adapters.py), else None
        self.adapters = engine.model if hasattr(engine.model, "names") and hasattr(engine.model, "choice") else None
        self.created = int(time.time())
        self.metrics = Metrics(engine.snapshot)
        # how the weights are held: "gguf-blocks" (quantized layers, native kernels and decode step) or a float dtype
        self.weights = "gguf-blocks" if any(hasattr(m, "ggml_type") for m in llm.model.modules()) \
            else str(_bulk_dtype(llm.model)).removeprefix("torch.")
        self._tool_support: bool | None = None
        self.draining = False  # set by the first SIGTERM (app.DrainingServer): new requests get 503
        self.in_flight = 0  # HTTP requests being answered (health probes aside)
        self._token_text: dict[int, tuple[str, list[int]]] = {}

    def check_model(self, name: str) -> None:
        if name not in self.names and not (self.adapters is not None and name in self.adapters.names):
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{self.model_name}'.",
                           param="model", code="model_not_found")

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "herd",
                "max_model_len": self.engine.ctx}

    def engine_settings(self) -> dict:
        """How the engine was set up (for /health with the key): the serve flags as they took effect."""
        e = self.engine
        return {"max_batch": e.max_batch, "ctx": e.ctx, "kv_tokens": (e.pool.n_pages - 1) * e.page_size,
                "page_size": e.page_size, "prefill_chunk": e.prefill_chunk, "prefix_cache": e.pool.prefix_cache,
                "max_queue": e.max_queue}

    def length_check(self, n_prompt: int, limit: int | None, param: str) -> int:
        """The number of new tokens allowed; 400 when the prompt (plus the requested tokens) exceed the context (or
        what one request may hold of the KV-cache budget), before any work is done."""
        ctx = self.engine.ctx
        if getattr(self.engine, "kv_limited", False) and (n_prompt >= ctx or (limit or 0) + n_prompt > ctx):
            kv = (self.engine.pool.n_pages - 1) * self.engine.page_size
            asked = f"{n_prompt} tokens in the {param}" + (f" and {limit} in the completion" if limit else "")
            raise APIError(400, f"This request needs more KV-cache memory than the server's budget allows: "
                                f"{asked}, where one request may hold at most {ctx} tokens of the {kv}-token "
                                "KV cache (herd serve --kv-tokens). Please reduce the prompt or max_tokens.",
                           param=param if n_prompt >= ctx else "max_tokens", code="context_length_exceeded")
        if n_prompt >= ctx:
            raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, your {param} "
                                f"resulted in {n_prompt} tokens (the prompt must leave room for at least one new "
                                "token). Please reduce the length of the prompt.", param=param,
                           code="context_length_exceeded")
        if limit is None:
            return ctx - n_prompt
        if n_prompt + limit > ctx:
            raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                                f"{n_prompt + limit} tokens ({n_prompt} in the {param}, {limit} in the completion). "
                                "Please reduce the length of the prompt or of max_tokens.",
                           param="max_tokens", code="context_length_exceeded")
        return limit

    def decode(self, ids: list[int]) -> str:
        tok = self.llm.tokenizer
        return tok.decode_bytes(ids).decode("utf-8", errors="replace") if tok is not None else ""

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

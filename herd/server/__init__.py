"""herd's OpenAI-compatible server: `herd serve`, or serve() / create_app() from Python.

Floor 10: imports herd.api, the engine and what lies below, never herd.cli (floor 11), train/ or eval/. The
pieces: app.py (create_app: wiring only), chat.py and completions.py (the two POST routes), choices.py (the engine
requests behind one HTTP request, answered whole or as an event stream), state.py (what a server holds),
metrics.py (its Prometheus registry), schemas.py (request bodies and the error shape), grammar.py and
tool_grammar.py (structured output and tool calls as llguidance grammars, one matcher per engine row). The one
idea: an HTTP request is a set of engine requests whose events merge into one asyncio queue; everything else is
translation to and from OpenAI's JSON.
"""

from __future__ import annotations

import os
import sys


def model_name_for(model: str | None) -> str:
    """The name clients use for a model: its catalog name, else its file or folder name."""
    from pathlib import Path

    from herd.hub import CATALOG, DEFAULT_MODEL

    if model is None:
        return DEFAULT_MODEL
    if model in CATALOG:
        return model
    p = Path(model)
    return p.stem if p.suffix == ".gguf" else p.name or str(model)


def serve(model: str | None = None, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_batch: int | None = None, ctx: int | None = None, kv_tokens: int | None = None, max_queue: int = 64,
          page_size: int = 16, prefill_chunk: int = 256, prefix_cache: bool = True, dtype: str | None = None,
          served_model_name: str | None = None, chat_template: str | None = None, log_level: str = "warning",
          max_connections: int = 1024, vision: str | None = None, keep_quantized: bool | None = None,
          drain_timeout: float = 30.0,
          quantization: str | None = None, kv_type: str | None = None, speculate: str | None = None,
          draft_model: str | None = None, draft_tokens: int = 4, adapters: list[str] | None = None) -> None:
    """Load a model and serve it over HTTP until interrupted. vision: a `herd train-vision` folder that answers
    requests with images (default: the one trained for this model, when there is one). On SIGTERM or SIGINT it
    drains: new requests get 503 and it exits once those in flight are answered (at most drain_timeout s)."""
    from herd.api import load
    from herd.errors import ConfigError
    from herd.engine.threads import in_fresh_thread
    from herd.server.app import create_app, serve_app

    api_key = api_key if api_key is not None else os.environ.get("HERD_API_KEY") or None
    template = None
    if chat_template is not None:
        from pathlib import Path

        template = Path(chat_template).read_text(encoding="utf-8")
    name = served_model_name or model_name_for(model)
    if adapters:  # ["NAME=DIR" or "DIR", ...] -> {name: dir}, served beside the base (herd/server/adapters.py)
        from herd.server.adapters import parse_adapter_arg

        adapters = dict(parse_adapter_arg(a) for a in adapters)

    def build():  # on a thread of its own that ends before serving (in_fresh_thread: the engine thread's speed)
        llm = load(model, dtype, chat_template=template, keep_quantized=keep_quantized, quantization=quantization,
                   kv_type=kv_type)
        if ctx is not None and not 2 <= ctx <= llm.config.max_seq_len:
            raise ConfigError(f"--ctx {ctx}: must be between 2 and the model's context, {llm.config.max_seq_len}")
        spec = None
        if speculate or draft_model:  # speculative decoding in the engine (herd/engine/speculate.py)
            from herd.api import speculation

            spec = speculation(llm, speculate, draft_model, draft_tokens)
        image_model = None
        if not getattr(llm, "accepts_images", False):
            from herd.api import ImageChat
            from herd.formats.vision_ckpt import CONFIG_FILE
            from herd.hub import default_vision_dir

            if vision is not None or (not adapters and (default_vision_dir(model) / CONFIG_FILE).exists()):
                image_model = ImageChat.load(vision, llm=llm, model=model)
                print(f"herd: images answered by the vision model in {vision or default_vision_dir(model)}",
                      file=sys.stderr, flush=True)
        aliases = {llm.source, model_name_for(llm.source)} | ({model} if model else set())
        return create_app(llm, model_name=name, api_key=api_key, aliases=aliases, vision=image_model,
                          adapters=adapters, max_batch=max_batch, ctx=ctx, kv_tokens=kv_tokens, max_queue=max_queue,
                          page_size=page_size, prefill_chunk=prefill_chunk, prefix_cache=prefix_cache,
                          **({"speculation": spec} if spec is not None else {}))

    app = in_fresh_thread(build)
    engine = app.state.engine
    loopback = host in ("127.0.0.1", "localhost", "::1")
    print(f"herd: serving {name} at http://{host}:{port} (batch {engine.max_batch}, context {engine.ctx}, "
          f"KV pool {engine.cache.nbytes() / 2**20:.0f} MiB {engine.cache.kv_type}, queue {max_queue}"
          f"{', API key required' if api_key else ''})", file=sys.stderr, flush=True)
    if not loopback and not api_key:
        print("herd: warning: listening beyond this machine without --api-key", file=sys.stderr, flush=True)
    serve_app(app, host=host, port=port, log_level=log_level, max_connections=max_connections,
              drain_timeout=drain_timeout)


__all__ = ["serve", "model_name_for"]

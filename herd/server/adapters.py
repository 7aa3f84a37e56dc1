"""Many LoRA adapters behind one server: `herd serve --adapter [NAME=]DIR ...` and, at run time,
GET/POST /v1/adapters and DELETE /v1/adapters/{name}.

A request picks an adapter by its `model` field (the adapter's name; the served model name or an alias is the base
model). The engine drives an AdapterStep (herd/engine/adapter_step.py), so requests for different adapters and for
the base decode in the same batch. An adapter is the PEFT folder `herd finetune` writes (or PEFT itself); it must
fit the served base model (its shapes are checked when it is loaded). Removing an adapter that a running request
uses is refused (409).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import FastAPI, Request

from herd.engine.adapter_step import AdapterStep
from herd.errors import ConfigError, HerdError
from herd.formats.peft import adapter_scaling, read_adapter
from herd.server.schemas import AdapterRequest, APIError, parse_body


def parse_adapter_arg(arg: str) -> tuple[str, str]:
    """'NAME=DIR' or 'DIR' (the name is the folder's) -> (name, dir)."""
    name, sep, folder = arg.partition("=")
    if not sep:
        folder = arg
        name = Path(arg.rstrip("/")).name
    if not name or not folder:
        raise ConfigError(f"--adapter {arg!r}: give DIR or NAME=DIR")
    return name, folder


def load_adapter(step: AdapterStep, name: str, folder: str | Path) -> None:
    cfg, weights = read_adapter(folder, step.text)
    step.add(name, weights, adapter_scaling(cfg))


def adapter_card(name: str, state) -> dict:
    return {"id": name, "object": "model", "created": state.created, "owned_by": "herd", "parent": state.model_name,
            "max_model_len": state.engine.ctx}


def add_routes(app: FastAPI, state) -> None:
    step = state.adapters

    def need_step() -> AdapterStep:
        if step is None:
            raise APIError(400, "this server serves no adapters: start it with --adapter DIR to enable them",
                           code="adapters_disabled")
        return step

    @app.get("/v1/adapters")
    async def list_adapters():
        return {"object": "list", "data": [adapter_card(n, state) for n in (step.names if step else {})]}

    @app.post("/v1/adapters")
    async def add_adapter(request: Request):
        s = need_step()
        body = await parse_body(request, AdapterRequest)
        name = body.name or Path(body.path.rstrip("/")).name
        if not name or name in state.names:
            raise APIError(400, f"'{name}' cannot name an adapter (it names the base model)", param="name")
        try:  # on the engine's thread, between steps: off the event loop, and no other thread runs torch work
            loaded = state.engine.batch_call(lambda paths: [load_adapter(s, name, p) for p in paths], [body.path])
            await asyncio.wrap_future(loaded)
        except HerdError as e:
            raise APIError(400, str(e), param="path") from None
        return adapter_card(name, state)

    @app.delete("/v1/adapters/{name}")
    async def remove_adapter(name: str):
        s = need_step()
        if name not in s.names:
            raise APIError(404, f"no adapter named '{name}' is loaded", param="name", code="model_not_found")
        try:
            engine = state.engine
            s.remove(name, list(engine.running) + list(engine.waiting))
        except ConfigError as e:
            raise APIError(409, str(e), param="name") from None
        return {"id": name, "object": "model", "deleted": True}

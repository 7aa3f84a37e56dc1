"""POST /v1/embeddings (OpenAI's shape) and POST /v1/rerank (the Cohere / Jina shape llama.cpp and vLLM serve) over
the loaded model.

Embeddings are the model's final hidden states (after the last RMS norm, as transformers' `hidden_states[-1]`)
pooled per input -- mean by default, or `pooling` "last" / "cls" (herd's extension field; herd/engine/embeddings.py
says why mean is the default) -- and L2-normalised; `encoding_format` "base64" sends the little-endian float32 bytes
(the official openai client asks for it by default and decodes it itself). The inputs of one request share padded
forwards. Rerank scores each document by the query's likelihood given it (LLM.rerank: UPR's query-likelihood
prompt), a relevance in (0, 1], highest first.

Both run on the engine's thread (Engine.batch_call), between two decode steps, so that one thread at a time uses
the cores; the inputs of every embeddings request waiting together (with the same pooling) share one set of padded
forwards, and so do the documents of waiting rerank requests. Imports: herd's errors and this folder's schemas and
state; the model arrives as the server's LLM, the engine as its ServerState's.
"""

from __future__ import annotations

import asyncio
import base64
import uuid

import numpy as np
from fastapi import Request

from herd.errors import HerdError
from herd.server.schemas import APIError, EmbeddingRequest, RerankRequest, parse_body
from herd.server.state import ServerState


def _token_lists(state: ServerState, items: list, param: str) -> list[list[int]]:
    """Each input as token ids (text encoded raw, as a completion prompt); 400 for one outside the vocabulary or
    the server's context."""
    llm, vocab, ctx = state.llm, state.llm.config.vocab_size, state.engine.ctx
    out = []
    for i, x in enumerate(items):
        try:
            ids = llm.encode_prompt(x, raw=True) if isinstance(x, str) else list(x)
        except HerdError as e:
            raise APIError(400, f"{param}: {e}", param=param) from None
        if not ids:
            raise APIError(400, f"{param}: input {i} encodes to no tokens", param=param)
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"{param}: input {i}: token id {bad} is outside the vocabulary (0..{vocab - 1})",
                           param=param)
        if len(ids) > ctx:
            raise APIError(400, f"{param}: input {i} has {len(ids)} tokens; this model's maximum context length is "
                                f"{ctx} tokens. Please reduce the input.", param=param, code="context_length_exceeded")
        out.append(ids)
    return out


def _encoded(vector: np.ndarray, encoding_format: str):
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


def add_routes(app, state: ServerState) -> None:
    """Register POST /v1/embeddings and /v1/rerank on a create_app FastAPI app."""

    async def run(fn, items: list, key) -> list:
        """fn over items on the engine's thread, merged with other waiting calls of the same key."""
        try:
            return await asyncio.wrap_future(state.engine.batch_call(fn, items, key))
        except HerdError as e:
            raise APIError(400, str(e)) from None

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        req = await parse_body(request, EmbeddingRequest)
        state.check_model(req.model)
        dim = state.llm.config.dim
        if req.dimensions is not None and req.dimensions != dim:
            raise APIError(400, f"dimensions: this model's embeddings have {dim} dimensions, got {req.dimensions} "
                                "(herd does not shorten them)", param="dimensions")
        seqs = _token_lists(state, req.items(), "input")
        pooling = req.pooling
        vectors = await run(lambda seqs: list(state.llm.embed(seqs, pooling).numpy()), seqs, ("embed", pooling))
        n_tokens = sum(len(s) for s in seqs)
        state.metrics.prompt_tokens.inc(n_tokens)
        data = [{"object": "embedding", "index": i, "embedding": _encoded(v, req.encoding_format)}
                for i, v in enumerate(vectors)]
        return {"object": "list", "data": data, "model": state.model_name,
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}

    @app.post("/v1/rerank")
    async def rerank(request: Request):
        req = await parse_body(request, RerankRequest)
        if req.model is not None:
            state.check_model(req.model)
        docs = req.texts()
        try:
            inputs = state.llm.rerank_inputs(req.query, docs)
        except HerdError as e:
            raise APIError(400, str(e), param="query") from None
        _token_lists(state, [ids for ids, _ in inputs], "documents")  # vocabulary and context, before any work
        scores = await run(state.llm.rerank_scores, inputs, "rerank")
        n_tokens = sum(len(ids) for ids, _ in inputs)
        state.metrics.prompt_tokens.inc(n_tokens)
        order = sorted(range(len(docs)), key=lambda i: -scores[i])[:req.top_n]
        results = [{"index": i, "relevance_score": scores[i], **({"document": {"text": docs[i]}}
                                                                 if req.return_documents else {})} for i in order]
        return {"id": f"rerank-{uuid.uuid4().hex}", "object": "list", "model": state.model_name, "results": results,
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}

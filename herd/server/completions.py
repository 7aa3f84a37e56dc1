"""POST /v1/completions: raw text completion of one prompt or several (text or token ids), `n` choices each, with
echo and the legacy logprobs shape (tokens, token_logprobs, top_logprobs, text_offset).

Imports: herd's errors, and this folder's choices, state and schemas.
"""

from __future__ import annotations

import time
import uuid

from herd.errors import HerdError
from herd.server.choices import Choices, collect, event_stream, sampling, usage
from herd.server.schemas import APIError, CompletionRequest, parse_body
from herd.server.state import ServerState


def _prompts(state: ServerState, req: CompletionRequest) -> tuple[list[list[int]], list[str]]:
    """(token ids, text) of each prompt; 400 for one that is empty or outside the vocabulary."""
    llm = state.llm
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
        texts_in.append(item if isinstance(item, str) else state.decode(ids))
    return prompts, texts_in


def _text_logprobs(state: ServerState, entries: list, offset0: int) -> dict:
    tokens, values, tops, offsets, at = [], [], [], [], offset0
    for lp in entries:
        t, _ = state.token_text(lp.token)
        tokens.append(t)
        values.append(lp.logprob)
        tops.append({state.token_text(tid)[0]: v for tid, v in lp.top})
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


async def completion(state: ServerState, request):
    """The answer to one POST /v1/completions: a JSON body, or a StreamingResponse of chunks. Choice c answers
    prompt c // n."""
    req = await parse_body(request, CompletionRequest)
    state.check_model(req.model)
    prompts, texts_in = _prompts(state, req)
    if req.echo and req.logprobs is not None:
        raise APIError(400, "echo with logprobs (prompt logprobs) is not supported.", param="echo")
    limits = [state.length_check(len(ids), req.token_limit(), "prompt") for ids in prompts]
    choices = Choices(state)
    n = req.n
    for j, ids in enumerate(prompts):
        for i in range(n):
            choices.submit(j * n + i, ids, sampling(req, limits[j], req.logprobs, i), req)
    n_prompt = sum(len(x) for x in prompts)
    state.metrics.prompt_tokens.inc(n_prompt)
    total = len(prompts) * n
    base = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": state.model_name, "system_fingerprint": "herd"}

    if req.stream:
        offsets = [len(texts_in[c // n]) if req.echo else 0 for c in range(total)]

        def piece(c: int, ev, reason: str | None, counted: bool) -> dict | None:
            lp = None
            if req.logprobs is not None and ev.logprob is not None and counted:
                lp = _text_logprobs(state, [ev.logprob], offsets[c])
            offsets[c] += len(ev.text)
            if not ev.text and lp is None and reason is None:
                return None
            return {"index": c, "text": ev.text, "logprobs": lp, "finish_reason": reason}

        opening = [{"index": c, "text": texts_in[c // n], "logprobs": None, "finish_reason": None}
                   for c in range(total)] if req.echo else []
        return event_stream(choices, n=total, base=base, opening=opening, piece=piece, n_prompt=n_prompt,
                            include_usage=bool(req.stream_options and req.stream_options.include_usage))

    got = await collect(request, choices, total)
    out = []
    for c in range(total):
        head = texts_in[c // n] if req.echo else ""
        out.append({"index": c, "text": head + got.texts[c], "finish_reason": got.reasons[c],
                    "logprobs": _text_logprobs(state, got.logprobs[c], len(head)) if req.logprobs is not None
                    else None})
    return {**base, "choices": out, "usage": usage(n_prompt, sum(got.counts))}

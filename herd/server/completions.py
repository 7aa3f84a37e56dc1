"""POST /v1/completions: raw text completion of one prompt or several (text or token ids), `n` choices each, with
echo and the legacy logprobs shape (tokens, token_logprobs, top_logprobs, text_offset).

With echo and logprobs the prompt's own tokens come first (the first with null logprobs), scored by one forward
of the prompt on the engine's thread between two steps (herd.engine.embeddings.prompt_logprobs through
Engine.batch_call), then the generated ones, the stop token
included: lm-eval's local-completions reads a likelihood as the entries between the context and the last one.

Imports: herd's errors, the engine's prompt scorer, and this folder's choices, grammar (structured output), state and
schemas.
"""

from __future__ import annotations

import asyncio
import time
import uuid

from herd.engine.embeddings import prompt_logprobs
from herd.errors import HerdError
from herd.server.choices import Choices, collect, event_stream, sampling, usage
from herd.server.grammar import request_grammar
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


async def _echo_logprobs(state: ServerState, prompts: list[list[int]], k: int) -> list[dict]:
    """The legacy logprobs of each prompt's own tokens (echo): the first token has none (null), each other its
    log-probability given the tokens before it and the k most likely alternatives; one forward per prompt on the
    engine's thread (Engine.batch_call: the engine keeps no logits of prompt positions, and one thread at a time
    uses the cores)."""
    llm = state.llm
    model = getattr(llm, "llm", llm).model
    try:
        scored = await asyncio.wrap_future(state.engine.batch_call(
            lambda items: [prompt_logprobs(model, ids, k) for ids in items], prompts))
    except HerdError as e:
        raise APIError(400, f"echo with logprobs: {e}", param="echo") from None
    out = []
    for ids, (values, tops) in zip(prompts, scored):
        tokens, offsets, at = [], [], 0
        for t in ids:
            text = state.token_text(t)[0]
            tokens.append(text)
            offsets.append(at)
            at += len(text)
        top = [_top_dict(state, row) for row in tops]
        out.append({"tokens": tokens, "token_logprobs": [None, *values], "top_logprobs": [None, *top],
                    "text_offset": offsets})
    return out


def _top_dict(state: ServerState, top: list) -> dict:
    """{token text: logprob} of (id, logprob) pairs, most likely first; two ids with the same text (byte pieces
    that decode to U+FFFD) keep the likelier value, so the dict's maximum stays the position's maximum."""
    out: dict = {}
    for tid, v in top:
        out.setdefault(state.token_text(tid)[0], v)
    return out


def _joined(head: dict | None, tail: dict | None) -> dict | None:
    """Legacy logprobs of the prompt (echo) followed by those of the generated tokens."""
    if head is None or tail is None:
        return tail if head is None else head
    return {key: head[key] + tail[key] for key in head}


def _text_logprobs(state: ServerState, entries: list, offset0: int) -> dict:
    tokens, values, tops, offsets, at = [], [], [], [], offset0
    for lp in entries:
        t, _ = state.token_text(lp.token)
        tokens.append(t)
        values.append(lp.logprob)
        tops.append(_top_dict(state, lp.top))
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


async def completion(state: ServerState, request):
    """The answer to one POST /v1/completions: a JSON body, or a StreamingResponse of chunks. Choice c answers
    prompt c // n."""
    req = await parse_body(request, CompletionRequest)
    state.check_model(req.model)
    prompts, texts_in = _prompts(state, req)
    limits = [state.length_check(len(ids), req.token_limit(), "prompt") for ids in prompts]
    # echo + logprobs: the prompt's own logprobs come first (what lm-eval's local-completions reads)
    echoed = await _echo_logprobs(state, prompts, req.logprobs) if req.echo and req.logprobs is not None \
        else [None] * len(prompts)
    n = req.n
    n_prompt = sum(len(x) for x in prompts)
    total = len(prompts) * n
    base = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": state.model_name, "system_fingerprint": "herd"}
    if req.echo and req.token_limit() == 0 and not req.stream:  # the prompt alone: nothing to generate
        state.metrics.prompt_tokens.inc(n_prompt)
        return {**base, "usage": usage(n_prompt, 0), "choices": [
            {"index": c, "text": texts_in[c // n], "finish_reason": "length", "logprobs": echoed[c // n]}
            for c in range(total)]}
    grammar = await asyncio.get_running_loop().run_in_executor(
        None, request_grammar, req, state.llm.tokenizer, state.llm.config.vocab_size, state.llm.stop_ids)
    choices = Choices(state)
    for j, ids in enumerate(prompts):
        for i in range(n):
            choices.submit(j * n + i, ids, sampling(req, limits[j], req.logprobs, i), req,
                           grammar.constraint() if grammar is not None else None)
    state.metrics.prompt_tokens.inc(n_prompt)

    if req.stream:
        offsets = [len(texts_in[c // n]) if req.echo else 0 for c in range(total)]

        def piece(c: int, ev, reason: str | None, counted: bool) -> dict | None:
            lp = None
            # with echo, the stop token's entry is kept too: a scorer reads the tokens after the prompt by count
            if req.logprobs is not None and ev.logprob is not None and (counted or req.echo):
                lp = _text_logprobs(state, [ev.logprob], offsets[c])
            offsets[c] += len(ev.text)
            if not ev.text and lp is None and reason is None:
                return None
            return {"index": c, "text": ev.text, "logprobs": lp, "finish_reason": reason}

        opening = [{"index": c, "text": texts_in[c // n], "logprobs": echoed[c // n], "finish_reason": None}
                   for c in range(total)] if req.echo else []
        return event_stream(choices, n=total, base=base, opening=opening, piece=piece, n_prompt=n_prompt,
                            include_usage=bool(req.stream_options and req.stream_options.include_usage))

    got = await collect(request, choices, total)
    out = []
    for c in range(total):
        head = texts_in[c // n] if req.echo else ""
        entries = got.logprobs[c] + ([got.stop_logprobs[c]] if req.echo and got.stop_logprobs[c] else [])
        out.append({"index": c, "text": head + got.texts[c], "finish_reason": got.reasons[c],
                    "logprobs": _joined(echoed[c // n], _text_logprobs(state, entries, len(head)))
                    if req.logprobs is not None else None})
    return {**base, "choices": out, "usage": usage(n_prompt, sum(got.counts))}

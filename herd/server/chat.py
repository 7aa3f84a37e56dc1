"""POST /v1/chat/completions: messages become one prompt through the model's chat format, with tools (a reply that
may be a tool call is parsed whole, then sent), JSON mode and forced tool calls as a JsonConstraint on decoding, and
images answered by the vision model.

Imports: herd's errors and chat format (through the loaded model), and this folder's choices, state, schemas and
json_constraint.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from herd.errors import HerdError
from herd.server.choices import Choices, ImageChoices, collect, event_stream, sampling, usage
from herd.server.json_constraint import JsonConstraint
from herd.server.schemas import APIError, ChatCompletionRequest, parse_body
from herd.server.state import ServerState


def _messages(state: ServerState, req: ChatCompletionRequest) -> tuple[list[dict], bool]:
    """(the messages as the chat format takes them, whether any holds an image); 400 for parts it cannot take."""
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
                raise APIError(400, f"messages[{i}].content: the model '{state.model_name}' takes no images (serve "
                                    "a vision checkpoint, or a vision model with `herd serve --vision DIR`)",
                               param=f"messages.{i}.content")
            if m.role != "user":
                raise APIError(400, f"messages[{i}].content: images are only taken in user messages",
                               param=f"messages.{i}.content")
            with_images = True
        messages.append(d)
    return messages, with_images


async def _image_choices(state: ServerState, req, messages: list[dict]) -> tuple[list[int], ImageChoices]:
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
    params = [sampling(req, state.engine.ctx if limit is None else limit, k, i) for i in range(req.n)]
    try:
        run = await asyncio.get_running_loop().run_in_executor(
            None, lambda: state.vision.run([messages] * req.n, params))
    except HerdError as e:
        raise APIError(400, f"messages: {e}", param="messages") from None
    prompt = list(run.seqs[0].prompt)
    state.length_check(len(prompt), limit, "messages")
    return prompt, ImageChoices(state, run, req.n)


def _text_choices(state: ServerState, req, messages: list[dict]) -> tuple[list[int], Choices, list[dict] | None]:
    """(prompt ids, running choices, the tools offered) of a chat request in text: the prompt through the chat
    format; forced tool calls and JSON mode constrain decoding to JSON that starts as they require."""
    fmt, llm = state.llm.chat_format, state.llm
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    choice = req.tool_choice or ("auto" if tools else "none")
    if choice == "none":
        tools = None
    if tools and not state.tools_supported():
        raise APIError(400, f"The chat format of '{state.model_name}' defines no tool calling, so `tools` "
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
    max_new = state.length_check(len(prompt), req.token_limit(), "messages")
    k = (req.top_logprobs or 0) if req.logprobs else None
    params = [sampling(req, max_new, k, i) for i in range(req.n)]
    choices = Choices(state)
    for i, p in enumerate(params):
        constraint = None
        if heads is not None:
            constraint = JsonConstraint(llm.tokenizer, llm.config.vocab_size, llm.stop_ids, heads=heads,
                                        greedy=p.temperature == 0)
        choices.submit(i, prompt, p, req, constraint)
    return prompt, choices, tools


def _chat_logprob(state: ServerState, lp) -> dict:
    text, data = state.token_text(lp.token)
    top = []
    for tid, value in lp.top:
        t, b = state.token_text(tid)
        top.append({"token": t, "logprob": value, "bytes": b})
    return {"token": text, "logprob": lp.logprob, "bytes": data, "top_logprobs": top}


async def chat_completion(state: ServerState, request):
    """The answer to one POST /v1/chat/completions: a JSON body, or a StreamingResponse of chunks."""
    req = await parse_body(request, ChatCompletionRequest)
    state.check_model(req.model)
    fmt = state.llm.chat_format
    if fmt is None:
        raise APIError(400, "This model has no chat format; use /v1/completions.", param="messages")
    messages, with_images = _messages(state, req)
    if with_images:
        tools = None
        prompt, choices = await _image_choices(state, req, messages)
    else:
        prompt, choices, tools = _text_choices(state, req, messages)
    state.metrics.prompt_tokens.inc(len(prompt))
    base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": state.model_name,
            "system_fingerprint": "herd"}
    buffer_tools = tools is not None  # a reply that may be a tool call is parsed whole, then sent

    def finish(text: str, reason: str | None) -> tuple[dict, str | None]:
        msg: dict[str, Any] = {"role": "assistant", "content": text}
        if buffer_tools:
            parsed = fmt.parse_reply(text)
            if parsed.get("tool_calls"):
                msg = {"role": "assistant", "content": None, "tool_calls": parsed["tool_calls"]}
                if reason == "stop":
                    reason = "tool_calls"
        return msg, reason

    if req.stream:
        texts = [""] * req.n

        def piece(i: int, ev, reason: str | None, counted: bool) -> dict | None:
            delta: dict[str, Any] = {}
            lp = {"content": [_chat_logprob(state, ev.logprob)]} if ev.logprob is not None and counted else None
            texts[i] += ev.text
            if buffer_tools:
                if reason is None:
                    if lp is None:
                        return None
                else:
                    msg, reason = finish(texts[i], reason)
                    if msg.get("tool_calls"):
                        delta["tool_calls"] = [dict(c, index=n) for n, c in enumerate(msg["tool_calls"])]
                    else:
                        delta["content"] = msg["content"]
            elif ev.text:
                delta["content"] = ev.text
            if not delta and lp is None and reason is None:
                return None
            return {"index": i, "delta": delta, "logprobs": lp, "finish_reason": reason}

        opening = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                    "finish_reason": None} for i in range(req.n)]
        return event_stream(choices, n=req.n, base={**base, "object": "chat.completion.chunk"}, opening=opening,
                            piece=piece, n_prompt=len(prompt),
                            include_usage=bool(req.stream_options and req.stream_options.include_usage))

    got = await collect(request, choices, req.n)
    out = []
    for i in range(req.n):
        msg, reason = finish(got.texts[i], got.reasons[i])
        lps = {"content": [_chat_logprob(state, lp) for lp in got.logprobs[i]]} if req.logprobs else None
        out.append({"index": i, "message": msg, "logprobs": lps, "finish_reason": reason})
    return {**base, "object": "chat.completion", "choices": out, "usage": usage(len(prompt), sum(got.counts))}

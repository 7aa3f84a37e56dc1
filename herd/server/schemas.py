"""The wire shapes of the OpenAI-compatible API: request bodies in, errors out.

Bodies are validated strictly (types are not coerced: "5" is not a number). Unknown top-level fields are rejected
with a message naming them, as the OpenAI API does; a few fields that some clients always send and that change
nothing here are accepted and ignored (IGNORED). `parse_body` reads a request's body (at most MAX_BODY_BYTES) into
one of the request classes and turns pydantic's errors into one OpenAI-style message; every refusal is an APIError.
Imports: pydantic only (the request is read through its ASGI `headers` and `stream()`).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, TypeVar, Union

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError,
                      model_validator)

Number = Union[StrictInt, StrictFloat]
IGNORED = ("user", "metadata", "store", "service_tier", "parallel_tool_calls", "prompt_cache_key",
           "safety_identifier")


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class _Lenient(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


# -------------------------------------------------------------------------------------------------- messages
class ContentPart(_Lenient):
    type: StrictStr
    text: StrictStr | None = None
    image_url: StrictStr | dict[str, Any] | None = None  # {"url": "data:image/png;base64,..."} (or the bare URL)


class FunctionCall(_Lenient):
    name: StrictStr
    arguments: StrictStr | dict[str, Any] = "{}"


class ToolCall(_Lenient):
    id: StrictStr | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool", "ipython"]
    content: StrictStr | list[ContentPart] | None = None
    name: StrictStr | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: StrictStr | None = None

    def text(self) -> str:
        """The message's text; content parts other than text are refused by the caller."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text or "" for p in self.content if p.type == "text")


class FunctionDef(_Lenient):
    name: Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class Tool(_Lenient):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Lenient):
    name: StrictStr


class ToolChoiceFunction(_Lenient):
    type: Literal["function"]
    function: NamedFunction


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class StreamOptions(_Lenient):
    include_usage: StrictBool = False


# -------------------------------------------------------------------------------------------------- requests
class _Sampling(_Strict):
    """Fields common to chat and text completions."""

    model: StrictStr
    max_tokens: StrictInt | None = Field(default=None, ge=0)
    temperature: Number | None = Field(default=None, ge=0, le=2)
    top_p: Number | None = Field(default=None, ge=0, le=1)
    n: StrictInt = Field(default=1, ge=1, le=16)
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    presence_penalty: Number = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: Number = Field(default=0.0, ge=-2, le=2)
    logit_bias: dict[StrictStr, Number] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    # extensions (vLLM / llama.cpp names)
    top_k: StrictInt = Field(default=0, ge=0)
    min_p: Number = Field(default=0.0, ge=0, le=1)
    repetition_penalty: Number = Field(default=1.0, gt=0, le=10)
    ignore_eos: StrictBool = False
    # structured output (herd/server/grammar.py): OpenAI's response_format, and herd's grammar (GBNF or Lark),
    # regex and choice (one of some strings); at most one of them
    response_format: ResponseFormat | None = None
    grammar: StrictStr | None = Field(default=None, min_length=1)
    regex: StrictStr | None = Field(default=None, min_length=1)
    choice: list[StrictStr] | None = Field(default=None, min_length=1)
    # accepted and ignored
    user: StrictStr | None = None
    metadata: dict[str, Any] | None = None
    store: StrictBool | None = None
    service_tier: StrictStr | None = None
    prompt_cache_key: StrictStr | None = None
    safety_identifier: StrictStr | None = None

    @model_validator(mode="after")
    def _check_stop(self):
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > 4:
            raise ValueError(f"stop: at most 4 sequences, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop: sequences must be non-empty strings")
        for k, v in (self.logit_bias or {}).items():
            if not k.lstrip("-").isdigit():
                raise ValueError(f"logit_bias: keys must be token ids, got {k!r}")
            if not -100 <= v <= 100:
                raise ValueError(f"logit_bias[{k}] must be in [-100, 100], got {v}")
        return self

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=0)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunction | None = None
    parallel_tool_calls: StrictBool | None = None

    @model_validator(mode="after")
    def _check_chat(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: logprobs must be true when top_logprobs is set")
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            raise ValueError("tool_choice: a tool choice needs tools")
        if isinstance(self.tool_choice, ToolChoiceFunction):
            names = [t.function.name for t in self.tools or []]
            if self.tool_choice.function.name not in names:
                raise ValueError(f"tool_choice: function {self.tool_choice.function.name!r} is not among the "
                                 f"tools {names}")
        return self

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Sampling):
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    logprobs: StrictInt | None = Field(default=None, ge=0, le=20)
    echo: StrictBool = False
    suffix: StrictStr | None = None
    best_of: StrictInt | None = Field(default=None, ge=1, le=16)

    @model_validator(mode="after")
    def _check_completion(self):
        p = self.prompt
        if (isinstance(p, list) and not p) or (isinstance(p, list) and any(isinstance(x, list) and not x for x in p)):
            raise ValueError("prompt: must not be empty")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of: only best_of == n is supported")
        if self.suffix:
            raise ValueError("suffix: insertion (suffix) is not supported")
        return self

    def token_limit(self) -> int | None:
        return 16 if self.max_tokens is None else self.max_tokens  # the OpenAI default for completions


class EmbeddingRequest(_Strict):
    """POST /v1/embeddings (OpenAI's body) plus herd's `pooling` (see herd/engine/embeddings.py for why mean is the
    default)."""

    model: StrictStr
    input: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = Field(default=None, ge=1)
    user: StrictStr | None = None
    pooling: Literal["mean", "last", "cls"] = "mean"  # herd extension

    @model_validator(mode="after")
    def _check_input(self):
        items = [self.input] if isinstance(self.input, str) or (self.input and isinstance(self.input[0], int)) \
            else self.input
        if not items:
            raise ValueError("input: must not be empty")
        if len(items) > 2048:
            raise ValueError(f"input: at most 2048 inputs per request, got {len(items)}")
        for i, x in enumerate(items):
            if not x:
                raise ValueError(f"input: input {i} is empty")
        return self

    def items(self) -> list:
        """The inputs as a list of strings or token-id lists."""
        one = isinstance(self.input, str) or isinstance(self.input[0], int)
        return [self.input] if one else list(self.input)


class RerankDocument(_Lenient):
    text: StrictStr


class RerankRequest(_Strict):
    """POST /v1/rerank: the Cohere / Jina body that llama.cpp and vLLM serve."""

    model: StrictStr | None = None
    query: StrictStr = Field(min_length=1)
    documents: list[StrictStr | RerankDocument] = Field(min_length=1, max_length=1000)
    top_n: StrictInt | None = Field(default=None, ge=1)
    return_documents: StrictBool = False
    user: StrictStr | None = None

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]


# -------------------------------------------------------------------------------------------------- errors
class APIError(Exception):
    """An error answered in the OpenAI shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class AdapterRequest(_Strict):
    """POST /v1/adapters: load a LoRA adapter folder (PEFT layout) under a name (default: the folder's)."""

    path: StrictStr = Field(min_length=1)
    name: StrictStr | None = None


# -------------------------------------------------------------------------------------------------- schema
BODIES = {"/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest,
          "/v1/embeddings": EmbeddingRequest, "/v1/rerank": RerankRequest, "/v1/adapters": AdapterRequest}


def openapi_bodies(schema: dict) -> dict:
    """An OpenAPI document with the JSON bodies of the POST routes added (they read their bodies themselves, to
    answer in the OpenAI error shape, so FastAPI cannot see them) and every route's error answers."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for path, cls in BODIES.items():
        body = cls.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(body.pop("$defs", {}))
        components[cls.__name__] = body
        post = schema["paths"][path]["post"]
        post["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{cls.__name__}"}}}}
        post["responses"]["400"] = {"description": "Invalid request (OpenAI error shape)"}
    return schema


# -------------------------------------------------------------------------------------------------- parsing
MAX_BODY_BYTES = 8 << 20
Req = TypeVar("Req", bound=BaseModel)

_KINDS = {"int_type": "an integer", "float_type": "a number", "string_type": "a string", "bool_type": "a boolean",
          "list_type": "an array", "dict_type": "an object", "model_type": "an object", "none_required": "null",
          "int_from_float": "an integer", "literal_error": "one of the allowed values"}


def _field(loc) -> str:
    """'messages.0.content' from a pydantic location, without the union-member tags ('str', 'list[...]')."""
    keep = [str(x) for x in loc if isinstance(x, int) or (x.isidentifier() and x[:1].islower()
                                                          and x not in ("int", "float", "str", "bool", "none"))]
    return ".".join(keep)


def _validation_message(e: ValidationError) -> tuple[str, str | None]:
    """(message, param) of the first error, in the OpenAI API's words."""
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


async def parse_body(request, cls: type[Req]) -> Req:
    """The request's JSON body as a `cls`; 413 past MAX_BODY_BYTES, 400 when empty or invalid."""
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

"""Structured output: a request's grammar (JSON Schema, JSON object, GBNF or Lark, regex, a choice of strings, a
tool call) compiled by llguidance and applied as a per-row token mask in the engine.

The engine's constraint protocol is two calls per row and step: `mask(logits (V,)) -> logits` before sampling and
`advance(token)` after. `GrammarConstraint` answers them with one llguidance matcher per choice: the matcher
writes the allowed tokens as a bitmask (V/32 int32 words), which is unpacked to a boolean row and masked to -inf
on a copy (the engine's own row stays raw, so logprobs are the model's). A stop token is allowed exactly when
the grammar accepts; once nothing can follow, only stops are.

Why llguidance rather than xgrammar (both measured on this 2-core machine at load 7-19, the default model's
49,152-token vocabulary; benchmarks/bench_grammar.py --engines repeats it): installed 7.5 MB with no
dependencies, where xgrammar 0.2.9 (+ apache-tvm-ffi, 15 MB) declares torch, transformers and triton (pip pulls
triton); a JSON schema compiles in ~7-14 ms against ~19-54 ms; and llguidance reads Lark and regex natively and GBNF
through its own converter, where xgrammar has no Lark. xgrammar's masks are faster (median 6-9 us per token against
31-72 us) and its set-up too (~0.1 s against ~0.3-1 s, paid once per vocabulary); both masks are far under a
decode step (~30-100 ms here), and the grammar's share of batch-8 decode time measured ~4%.

Compact JSON: schemas compile with no whitespace between tokens (`,` and `:` separators), so an answer spends
its tokens on content. With `strict: true` a schema must lie in OpenAI's strict subset (check_strict), else the
request is refused naming the keyword and where it is.

Imports: llguidance, torch, and this folder's schemas (the APIError shape).
"""

from __future__ import annotations

import json
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from herd.server.schemas import APIError

COMPACT = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}

# ---------------------------------------------------------------------------------------------------- tokenizer
_tokenizers: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_lock = threading.Lock()


class _Vocab:
    """What llguidance's TokenizerWrapper reads: every token's bytes, the specials, and an encoder."""

    def __init__(self, tokenizer, vocab_size: int):
        self.tok = tokenizer
        n = min(tokenizer.vocab_size, vocab_size)
        self.special_token_ids = sorted({*tokenizer.special_tokens.values(), *range(n, vocab_size)})
        self.tokens = [tokenizer.decode_bytes([i]) if i < n else b"" for i in range(vocab_size)]
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = tokenizer.bos_id

    def __call__(self, text):
        return self.tok.encode(text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text)


def ll_tokenizer(tokenizer, vocab_size: int, stop_ids: Sequence[int]):
    """llguidance's view of a herd tokenizer, built once per (tokenizer, vocabulary, stops): ~0.3-1 s for 49k
    tokens, so callers run this off the event loop."""
    import llguidance

    key = (vocab_size, tuple(sorted(stop_ids)))
    with _lock:
        per = _tokenizers.setdefault(tokenizer, {})
        if key not in per:
            wrapper = llguidance.TokenizerWrapper(_Vocab(tokenizer, vocab_size))
            per[key] = llguidance.LLTokenizer(wrapper, n_vocab=vocab_size, eos_token=list(key[1]) or None)
        return per[key]


# ---------------------------------------------------------------------------------------------------- the mask
@dataclass(frozen=True)
class Grammar:
    """A compiled request grammar: llguidance's grammar text with the tokenizer it runs over."""

    text: str
    tokenizer: Any  # llguidance.LLTokenizer
    stop_ids: tuple[int, ...]
    vocab_size: int

    def constraint(self) -> "GrammarConstraint":
        """A fresh matcher for one choice (each of n choices walks the grammar on its own)."""
        return GrammarConstraint(self)


class GrammarConstraint:
    """The engine's per-row constraint: mask(logits (V,)) -> logits with every token off the grammar at -inf;
    advance(token) moves the matcher on."""

    def __init__(self, grammar: Grammar):
        import llguidance

        self.grammar = grammar
        self.matcher = llguidance.LLMatcher(grammar.tokenizer, grammar.text, log_level=0)
        if self.matcher.is_error():
            raise APIError(400, f"grammar: {self.matcher.get_error()}")
        self.bits = np.zeros((grammar.vocab_size + 31) // 32, dtype=np.int32)  # (ceil(V/32),)

    def allowed(self) -> torch.Tensor:
        """(V,) bool: the tokens the grammar takes next (stops only when it accepts, or when it broke)."""
        return torch.from_numpy(self._allowed())

    def _allowed(self) -> np.ndarray:
        m = self.matcher
        if m.is_error():
            ok = np.zeros(self.grammar.vocab_size, dtype=np.bool_)
        else:
            # the matcher writes into our buffer (llguidance.torch's helper would import torch.compile: seconds)
            m.unsafe_compute_mask_ptr(self.bits.ctypes.data, self.bits.nbytes)
            # bit j of word w is token 32*w + j (little-endian within each int32)
            ok = np.unpackbits(self.bits.view(np.uint8), bitorder="little")[: self.grammar.vocab_size].view(np.bool_)
        if m.is_error() or m.is_accepting() or m.is_stopped():
            ok[list(self.grammar.stop_ids)] = True  # every stop of the chat format, not just the tokenizer's EOS
        return ok

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        # numpy, not torch, for these (V,)-sized steps: torch's element-wise kernels wake its thread pool, which on
        # a loaded machine cost milliseconds per row (a (V,) torch copy measured ~10 ms at load ~8, numpy's ~0.1 ms)
        ok = self._allowed()
        view = logits.detach().float().cpu().numpy().copy()  # a copy: the engine's row stays raw for logprobs
        V = min(view.shape[-1], ok.shape[0])
        view[:V][~ok[:V]] = -np.inf
        view[V:] = -np.inf  # model rows past the grammar's vocabulary
        return torch.from_numpy(view).to(logits.device)

    def advance(self, token: int) -> None:
        if token in self.grammar.stop_ids:
            return
        self.matcher.consume_token(int(token))

    @property
    def error(self) -> str:
        return self.matcher.get_error()


# ---------------------------------------------------------------------------------------------------- strict
# OpenAI's strict subset of JSON Schema (Structured Outputs): these keywords, every object closed with
# additionalProperties false and every property required, the root an object.
_ANY = {"type", "description", "title", "enum", "const", "anyOf", "$ref", "$defs", "definitions", "$schema",
        "$id", "$comment"}
_BY_TYPE = {
    "object": {"properties", "required", "additionalProperties"},
    "array": {"items", "minItems", "maxItems"},
    "string": {"pattern", "format"},
    "number": {"multipleOf", "maximum", "exclusiveMaximum", "minimum", "exclusiveMinimum"},
    "integer": {"multipleOf", "maximum", "exclusiveMaximum", "minimum", "exclusiveMinimum"},
    "boolean": set(),
    "null": set(),
}
_FORMATS = {"date-time", "time", "date", "duration", "email", "hostname", "ipv4", "ipv6", "uuid"}
MAX_NESTING = 10
MAX_PROPERTIES = 5000
MAX_ENUM = 1000


def _strict_error(where: str, message: str) -> "StrictSchemaError":
    return StrictSchemaError(f"{message} (at {where or '#'}); strict mode takes OpenAI's strict subset of JSON "
                             "Schema")


class StrictSchemaError(ValueError):
    """A schema outside OpenAI's strict subset; the message names the keyword and its place."""


def check_strict(schema: Any) -> None:
    """Raise StrictSchemaError naming the first keyword or shape outside OpenAI's strict subset."""
    if not isinstance(schema, dict):
        raise _strict_error("#", f"a schema must be a JSON object, got {type(schema).__name__}")
    if schema.get("type") != "object" or "anyOf" in schema:
        raise _strict_error("#", "the root schema must be {\"type\": \"object\"} (not anyOf)")
    defs = {**schema.get("$defs", {}), **schema.get("definitions", {})}
    count = [0]
    _check_node(schema, "#", 1, defs, count)
    for name, sub in defs.items():
        _check_node(sub, f"#/$defs/{name}", 1, defs, count)


def _check_node(node: Any, where: str, depth: int, defs: dict, count: list[int]) -> None:
    if isinstance(node, bool) or not isinstance(node, dict):
        raise _strict_error(where, f"a subschema must be a JSON object, got {json.dumps(node)[:40]}")
    if depth > MAX_NESTING:
        raise _strict_error(where, f"nesting deeper than {MAX_NESTING} levels")
    known = _ANY.union(*_BY_TYPE.values())
    for key in node:
        if key not in known:
            raise _strict_error(where, f"the keyword '{key}' is not supported")
    if "$ref" in node:
        ref = node["$ref"]
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/$defs/") or
                                            ref.startswith("#/definitions/")):
            raise _strict_error(where, f"'$ref' must point into '#/$defs', got {ref!r}")
        extra = set(node) - {"$ref", "description", "title"}
        if extra:
            raise _strict_error(where, f"the keyword '{sorted(extra)[0]}' beside '$ref' is not supported")
        return
    if "anyOf" in node:
        if not isinstance(node["anyOf"], list) or not node["anyOf"]:
            raise _strict_error(where, "'anyOf' must be a non-empty list")
        extra = set(node) - {"anyOf", "description", "title", "$defs", "definitions"}
        if extra:
            raise _strict_error(where, f"the keyword '{sorted(extra)[0]}' beside 'anyOf' is not supported")
        for i, sub in enumerate(node["anyOf"]):
            _check_node(sub, f"{where}/anyOf/{i}", depth, defs, count)
        return
    types = node.get("type")
    if "enum" in node or "const" in node:
        if "enum" in node and (not isinstance(node["enum"], list) or not 0 < len(node["enum"]) <= MAX_ENUM):
            raise _strict_error(where, f"'enum' must be a list of 1 to {MAX_ENUM} values")
        if types is None:
            types = []
    if types is None:
        raise _strict_error(where, "every subschema needs 'type' (or 'enum', 'const', 'anyOf', '$ref')")
    types = [types] if isinstance(types, str) else types
    if not isinstance(types, list) or any(t not in _BY_TYPE for t in types):
        raise _strict_error(where, f"'type' must be one of {sorted(_BY_TYPE)} (or a list of them), got {types!r}")
    allowed = _ANY.union(*(_BY_TYPE[t] for t in types))
    for key in node:
        if key not in allowed:
            raise _strict_error(where, f"the keyword '{key}' is not supported"
                                + (f" for type {'/'.join(types)}" if types else ""))
    if "format" in node and node["format"] not in _FORMATS:
        raise _strict_error(where, f"the format '{node['format']}' is not supported (one of {sorted(_FORMATS)})")
    if "object" in types:
        props = node.get("properties", {})
        if not isinstance(props, dict):
            raise _strict_error(where, "'properties' must be an object")
        if node.get("additionalProperties") is not False:
            raise _strict_error(where, "'additionalProperties' must be false on every object")
        missing = [k for k in props if k not in (node.get("required") or [])]
        if missing or set(node.get("required") or []) - set(props):
            what = missing[0] if missing else sorted(set(node["required"]) - set(props))[0]
            raise _strict_error(where, f"'required' must list every property exactly (property '{what}')")
        count[0] += len(props)
        if count[0] > MAX_PROPERTIES:
            raise _strict_error(where, f"more than {MAX_PROPERTIES} properties in all")
        for k, sub in props.items():
            _check_node(sub, f"{where}/properties/{k}", depth + 1, defs, count)
    if "array" in types and "items" in node:
        _check_node(node["items"], f"{where}/items", depth + 1, defs, count)
    elif "array" in types:
        raise _strict_error(where, "an array needs 'items'")


# ---------------------------------------------------------------------------------------------------- bounds
# A small model asked for a number or a string can loop inside it ("1234567890123..." until the token budget), and a
# JSON value cut off is worth nothing. So every number, integer and free string a schema leaves unbounded gets a
# bound in the copy llguidance compiles (the answer still validates against the caller's schema): |x| < 10^15 and
# at most 6 decimals for numbers, |x| < 10^15 for integers, and MAX_STRING characters for strings with no length,
# pattern, format or enum of their own.
MAX_MAGNITUDE = 10**15 - 1
NUMBER_STEP = 0.000001
MAX_STRING = 128


def bounded(schema: Any, *, close: bool = False) -> Any:
    """A copy of a JSON schema with the bounds above added where it has none; close: objects that list properties
    take no others unless they say so (a function's arguments: extra keys mean nothing to it)."""
    if isinstance(schema, list):
        return [bounded(s, close=close) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: bounded(v, close=close) if k in ("items", "anyOf", "oneOf", "allOf", "additionalProperties", "not")
           else v for k, v in schema.items()}
    for key in ("properties", "$defs", "definitions", "patternProperties"):
        if isinstance(schema.get(key), dict):
            out[key] = {k: bounded(v, close=close) for k, v in schema[key].items()}
    if close and "properties" in schema and "additionalProperties" not in schema:
        out["additionalProperties"] = False
    if "enum" in schema or "const" in schema:
        return out
    types = schema.get("type")
    types = [types] if isinstance(types, str) else types if isinstance(types, list) else []
    if "integer" in types or "number" in types:
        if "minimum" not in schema and "exclusiveMinimum" not in schema:
            out["minimum"] = -MAX_MAGNITUDE
        if "maximum" not in schema and "exclusiveMaximum" not in schema:
            out["maximum"] = MAX_MAGNITUDE
        if "number" in types and "integer" not in types and "multipleOf" not in schema:
            out["multipleOf"] = NUMBER_STEP
    if "string" in types and not {"maxLength", "pattern", "format"} & set(schema):
        out["maxLength"] = MAX_STRING
    return out


# ---------------------------------------------------------------------------------------------------- compile
def json_grammar(schema: dict | None, *, strict: bool = False, options: dict | None = None) -> str:
    """llguidance grammar text for a JSON schema (None: any JSON object), compact unless options say otherwise.
    Non-strict schemas are taken leniently (keywords llguidance does not implement are ignored)."""
    from llguidance import LLMatcher

    if schema is None:
        schema = {"type": "object"}
    opts = dict(COMPACT, **(options or {}))
    if not strict:
        opts["lenient"] = True
    return LLMatcher.grammar_from_json_schema(bounded(schema), defaults=opts)


def lark_grammar(source: str) -> str:
    """llguidance grammar text for a Lark grammar, or a GBNF one (converted by llguidance's own translator)."""
    from llguidance import LLMatcher
    from llguidance.gbnf_to_lark import any_to_lark

    try:
        lark = any_to_lark(source)
    except Exception as e:  # the GBNF translator raises plain Exceptions too (e.g. "No 'root' rule found")
        raise ValueError(f"not a GBNF or Lark grammar: {e}") from None
    return LLMatcher.grammar_from_lark(lark)


def regex_grammar(pattern: str) -> str:
    from llguidance import LLMatcher

    return LLMatcher.grammar_from_regex(pattern)


def choice_grammar(options: Sequence[str]) -> str:
    """Exactly one of the strings."""
    from llguidance import LLMatcher

    return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(s) for s in options))


def compile_grammar(text: str, tokenizer, vocab_size: int, stop_ids: Sequence[int], *, param: str) -> Grammar:
    """A Grammar after llguidance has checked it against the vocabulary; 400 naming `param` when it is invalid."""
    from llguidance import LLMatcher

    tok = ll_tokenizer(tokenizer, vocab_size, stop_ids)
    err = LLMatcher.validate_grammar(text, tok)
    if err:
        raise APIError(400, f"{param}: invalid grammar: {err}", param=param)
    return Grammar(text, tok, tuple(sorted(stop_ids)), vocab_size)


def request_grammar(req, tokenizer, vocab_size: int, stop_ids: Sequence[int]) -> Grammar | None:
    """The grammar a request asks for through response_format, grammar, regex or choice (at most one), or None."""
    fmt = getattr(req, "response_format", None)
    kinds = [k for k, v in (("response_format", fmt is not None and fmt.type != "text"), ("grammar", req.grammar),
                            ("regex", req.regex), ("choice", req.choice)) if v]
    if len(kinds) > 1:
        raise APIError(400, f"{kinds[1]}: give one of response_format (json), grammar, regex or choice, not "
                            f"{' and '.join(kinds)}", param=kinds[1])
    if not kinds:
        return None
    kind = kinds[0]
    from llguidance.gbnf_to_lark import GbnfToLarkError

    try:
        if kind == "response_format":
            text = _response_format_grammar(fmt)
        elif kind == "grammar":
            text = lark_grammar(req.grammar)
        elif kind == "regex":
            text = regex_grammar(req.regex)
        else:
            text = choice_grammar(req.choice)
    except (ValueError, TypeError, RuntimeError, GbnfToLarkError) as e:  # llguidance's and GBNF's refusals
        raise APIError(400, f"{kind}: {e}", param=kind) from None
    return compile_grammar(text, tokenizer, vocab_size, stop_ids, param=kind)


def _response_format_grammar(fmt) -> str:
    if fmt.type == "json_object":
        return json_grammar(None)
    spec = fmt.json_schema
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
        # OpenAI's shape: {"name": ..., "schema": {...}, "strict": bool}; the name is required there too
        raise APIError(400, "response_format.json_schema: needs a 'name' (and usually a 'schema'), as OpenAI's "
                       "API does", param="response_format")
    schema = spec.get("schema")
    strict = spec.get("strict") is True
    if schema is None:
        if strict:
            raise APIError(400, "response_format.json_schema.schema: strict mode needs a schema",
                           param="response_format")
        return json_grammar(None)
    if strict:
        try:
            check_strict(schema)
        except StrictSchemaError as e:
            raise APIError(400, f"response_format.json_schema.schema: {e}", param="response_format") from None
    elif not isinstance(schema, dict):
        raise APIError(400, "response_format.json_schema.schema: must be a JSON object", param="response_format")
    return json_grammar(schema, strict=strict)

"""Tool calls under a grammar, in the model's own tool format, so a call is always well-formed and never lands in
`content`.

Three formats, chosen by the chat format:
* Llama 3.x (Meta's format): `<|python_tag|>{"name": "f", "parameters": {...}}` then <|eom_id|>: the JSON tool
  format of Meta's llama3_1 prompt docs, the tag marking a call;
* Llama 4 (and 3.2's pythonic style): a Python list of keyword calls, `[f(x=1), g(s="a")]`, several at once;
* a Jinja chat template: `{"name": "f", "arguments": {...}}` (the shape such templates render calls in), wrapped
  in `<tool_call>...</tool_call>` blocks (one or more) when the template shows that tag with tools offered.
Arguments follow each function's `parameters` schema: as JSON through llguidance's JSON Schema compiler (objects
that list their properties take no others, and values are bounded as grammar.bounded says), or, for Python calls, as
Python literals typed by each property's schema (strings, numbers, True/False/None, lists; other values any
literal), the listed keywords only. tool_choice "required" allows only calls, a named function only that one; "auto"
also allows plain text, which then may not start the way a call does (so a half call cannot be read as text).

Imports: herd.chat_format's classes (to tell the format), and this folder's grammar and schemas.
"""

from __future__ import annotations

import ast
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from herd.chat_format import Llama3ChatFormat, Llama4ChatFormat
from herd.server.grammar import Grammar, StrictSchemaError, bounded, check_strict, compile_grammar
from herd.server.schemas import APIError

LLAMA3_JSON, PYTHONIC, JSON, TAGGED = "llama3-json", "pythonic", "json", "tagged-json"
TAG_OPEN, TAG_CLOSE = "<tool_call>", "</tool_call>"

# Python literal terminals (strings use JSON's escapes that Python reads the same way), bounded as grammar.bounded
# bounds JSON values: at most MAX_STRING characters, 15 integer digits, 6 decimals
_PY_TERMINALS = r"""
PYSTR: /"([^"\\\x00-\x1f\x7f]|\\["\\nt]){0,128}"/
PYINT: /-?(0|[1-9][0-9]{0,14})/
PYNUM: /-?(0|[1-9][0-9]{0,14})(\.[0-9]{1,6})?/
pyval: PYSTR | PYNUM | "True" | "False" | "None" | "[" (pyval (", " pyval)*)? "]"
     | "{" (PYSTR ": " pyval (", " PYSTR ": " pyval)*)? "}"
"""


def tool_format(fmt) -> str:
    """Which tool-call format a chat format uses."""
    if isinstance(fmt, Llama4ChatFormat):
        return PYTHONIC
    if isinstance(fmt, Llama3ChatFormat):
        return LLAMA3_JSON
    probe = [{"type": "function", "function": {"name": "probe", "parameters": {"type": "object", "properties": {}}}}]
    try:
        shown = fmt.render([{"role": "user", "content": "hi"}], tools=probe)
    except Exception:  # a template that cannot render tools: its calls are plain JSON, if any
        return JSON
    return TAGGED if TAG_OPEN in shown else JSON


@dataclass
class ToolGrammar:
    """The grammar of a request's tool calls and how to read a reply made under it."""

    kind: str
    grammar: Grammar
    names: list[str]

    def message(self, text: str) -> dict:
        """The assistant message of a reply: its tool calls, or its text when it made none."""
        calls = parse_calls(self.kind, text)
        if not calls:
            return {"role": "assistant", "content": text}
        return {"role": "assistant", "content": None, "tool_calls": [
            {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}} for name, args in calls]}


def parse_calls(kind: str, text: str) -> list[tuple[str, Any]]:
    """[(name, arguments)] of a reply in `kind`'s format; [] when the reply is plain text."""
    body = text.strip()
    if kind == PYTHONIC:
        if not body.startswith("["):
            return []
        tree = ast.parse(body, mode="eval").body
        return [(c.func.id, {k.arg: ast.literal_eval(k.value) for k in c.keywords}) for c in tree.elts]
    if kind == LLAMA3_JSON:
        if not body.startswith("<|python_tag|>"):
            return []
        body = body.removeprefix("<|python_tag|>")
        for stop in ("<|eom_id|>", "<|eot_id|>"):
            body = body.removesuffix(stop)
    if kind == TAGGED:
        if not body.startswith(TAG_OPEN):
            return []
        blocks = re.findall(re.escape(TAG_OPEN) + r"\s*(.*?)\s*" + re.escape(TAG_CLOSE), body, flags=re.S)
    else:
        if not body.startswith("{"):
            return []
        blocks = [body]
    calls = []
    for block in blocks:
        obj = json.loads(block)
        calls.append((obj["name"], obj.get("parameters", obj.get("arguments", {}))))
    return calls


# ---------------------------------------------------------------------------------------------------- building
def _params(tool: dict, i: int) -> dict:
    fn = tool["function"]
    params = fn.get("parameters") or {"type": "object", "properties": {}}
    if not isinstance(params, dict):
        raise APIError(400, f"tools[{i}].function.parameters: must be a JSON Schema object, got "
                            f"{type(params).__name__}", param=f"tools.{i}.function.parameters")
    if fn.get("strict"):
        try:
            check_strict(params)
        except StrictSchemaError as e:
            raise APIError(400, f"tools[{i}].function.parameters: {e}", param=f"tools.{i}.function.parameters") \
                from None
    return params


def _json_call(kind: str, name: str, params: dict, strict: bool, rule: str) -> list[str]:
    key = "parameters" if kind == LLAMA3_JSON else "arguments"
    opts = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "lenient": not strict}
    head = json.dumps('{"name": ' + json.dumps(name) + f', "{key}": ')
    return [f"{rule}: {head} {rule}_args \"}}\"",
            f"{rule}_args: %json " + json.dumps({**bounded(params, close=True), "x-guidance": opts})]


def _py_value(schema: Any, rule: str, out: list[str]) -> str:
    """A Lark expression for a Python literal of `schema` (helper rules appended to out)."""
    if not isinstance(schema, dict):
        return "pyval"
    values = schema["enum"] if "enum" in schema else [schema["const"]] if "const" in schema else None
    if isinstance(values, list) and values:
        return "(" + " | ".join(json.dumps(_py_literal(v)) for v in values) + ")"
    types = schema.get("type")
    types = [types] if isinstance(types, str) else types if isinstance(types, list) else []
    alts = []
    for t in types:
        if t == "string":
            alts.append("PYSTR")
        elif t == "integer":
            alts.append("PYINT")
        elif t == "number":
            alts.append("PYNUM")
        elif t == "boolean":
            alts.append('"True" | "False"')
        elif t == "null":
            alts.append('"None"')
        elif t == "array" and isinstance(schema.get("items"), dict):
            item = _py_value(schema["items"], f"{rule}_i", out)
            out.append(f'{rule}_arr: "[" ({item} (", " {item})*)? "]"')
            alts.append(f"{rule}_arr")
        else:
            alts.append("pyval")
    return "(" + " | ".join(alts) + ")" if alts else "pyval"


def _py_literal(v: Any) -> str:
    """Python source of a JSON value (strings as JSON writes them: Python reads them the same)."""
    if isinstance(v, str):
        return json.dumps(v)
    return {True: "True", False: "False", None: "None"}[v] if isinstance(v, bool) or v is None else repr(v)


def _py_call(name: str, params: dict, rule: str, where: str) -> list[str]:
    """f(a=..., b=...): properties in schema order, the required ones always, the others optionally."""
    if not name.isidentifier():
        raise APIError(400, f"{where}.name: {name!r} is not a Python identifier, which the pythonic tool-call format "
                            "needs", param=where)
    props = params.get("properties") or {}
    required = params.get("required") or []
    if not isinstance(props, dict) or not isinstance(required, list):
        raise APIError(400, f"{where}.parameters: 'properties' must be an object and 'required' a list",
                       param=where)
    required = {k for k in required if isinstance(k, str)}
    out: list[str] = []
    keys = list(props)
    for k in keys:
        if not k.isidentifier():
            raise APIError(400, f"{where}.parameters: property {k!r} is not a Python identifier, which the pythonic "
                                "tool-call format needs", param=where)
    # tail_j_c: the keywords from j on, c = whether one was written already (so a comma goes first)
    for j in range(len(keys), -1, -1):
        for c in (0, 1):
            head = f"{rule}_t{j}_{c}"
            if j == len(keys):
                out.append(f'{head}: ""')
                continue
            k = keys[j]
            value = _py_value(props[k], f"{rule}_{j}", out)
            kw = ('", " ' if c else "") + json.dumps(f"{k}=") + f" {value} {rule}_t{j + 1}_1"
            out.append(f"{head}: {kw}" + ("" if k in required else f" | {rule}_t{j + 1}_{c}"))
    out.append(f"{rule}: {json.dumps(name + '(')} {rule}_t0_0 \")\"")
    return out


def _literal(tokenizer, text: str) -> str:
    """A Lark item for `text`: its special token where the vocabulary has one (as some models' <tool_call>), else
    the string."""
    i = tokenizer.special_tokens.get(text)
    return f"<[{i}]>" if i is not None else json.dumps(text)


def tool_grammar(llm, tools: list[dict], choice, *, parallel: bool = True) -> ToolGrammar:
    """The grammar for a request's tools and tool_choice ("auto", "required" or {"function": {"name"}}); parallel:
    whether a reply may hold several calls (where the format can: pythonic lists and <tool_call> blocks)."""
    fmt = llm.chat_format
    kind = tool_format(fmt)
    named = None if isinstance(choice, str) else choice.function.name
    rules, names = [], []
    for i, tool in enumerate(tools):
        fn = tool["function"]
        if named is not None and fn["name"] != named:
            continue
        params = _params(tool, i)
        rule = f"call{len(names)}"
        if kind == PYTHONIC:
            rules += _py_call(fn["name"], params, rule, f"tools.{i}.function")
        else:
            rules += _json_call(kind, fn["name"], params, bool(fn.get("strict")), rule)
        names.append(fn["name"])
    call = "call: " + " | ".join(f"call{j}" for j in range(len(names)))
    if kind == PYTHONIC:
        calls = 'calls: "[" call (", " call)* "]"' if parallel and named is None else 'calls: "[" call "]"'
        text = r"TEXT: /[^\[][\s\S]*/"
    elif kind == LLAMA3_JSON:
        calls = "calls: <|python_tag|> call"
        text = r"TEXT: /[^{][\s\S]*/"
    elif kind == TAGGED:
        block = f'{_literal(llm.tokenizer, TAG_OPEN)} "\\n"? call "\\n"? {_literal(llm.tokenizer, TAG_CLOSE)}'
        calls = f'calls: {block} ("\\n"? {block})*' if parallel and named is None else f"calls: {block}"
        text = r"TEXT: /[^{<][\s\S]*/"
    else:
        calls = "calls: call"
        text = r"TEXT: /[^{][\s\S]*/"
    start = "start: calls | TEXT" if choice == "auto" else "start: calls"
    lark = "\n".join([start, calls, call, *rules, text, _PY_TERMINALS if kind == PYTHONIC else ""])
    from llguidance import LLMatcher

    try:
        text_grammar = LLMatcher.grammar_from_lark(lark)
    except (ValueError, RuntimeError) as e:
        raise APIError(400, f"tools: cannot build the tool-call grammar: {e}", param="tools") from None
    return ToolGrammar(kind, compile_grammar(text_grammar, llm.tokenizer, llm.config.vocab_size, llm.stop_ids,
                                             param="tools"), names)

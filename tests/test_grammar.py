"""Structured output through llguidance (herd/server/grammar.py): 50 JSON schemas of OpenAI's strict subset, made by
hypothesis-jsonschema from a restricted meta-schema, answered with `strict` by the default model in one continuous
batch, each answer checked by `jsonschema`; schemas outside the subset refused naming the keyword; GBNF, Lark,
regex and choice over chat and completions, streamed and whole, n > 1; and the token mask itself against a
reference (the `regex` module's partial matching over every token of the vocabulary)."""

from __future__ import annotations

import json
import re
import time
import types
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")


# ------------------------------------------------------------------------------------------------- the server
@pytest.fixture(scope="module")
def llm(smollm_gguf):
    import herd

    return herd.load(smollm_gguf)


@pytest.fixture(scope="module")
def client(llm):
    from fastapi.testclient import TestClient

    from herd.server.app import create_app

    app = create_app(llm, model_name="smol", max_batch=25, max_queue=64)
    with TestClient(app) as c:
        yield c


def chat(client, text: str, **kw) -> dict:
    body = {"model": "smol", "messages": [{"role": "user", "content": text}], "max_tokens": 64, "temperature": 0,
            **kw}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def stream(client, path: str, body: dict) -> tuple[dict[int, str], dict[int, str]]:
    """(text, finish_reason) per choice index of a streamed answer."""
    texts, reasons = {}, {}
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for ch in json.loads(line[6:])["choices"]:
                piece = ch["delta"].get("content") if "delta" in ch else ch["text"]
                texts[ch["index"]] = texts.get(ch["index"], "") + (piece or "")
                if ch.get("finish_reason"):
                    reasons[ch["index"]] = ch["finish_reason"]
    return texts, reasons


# ------------------------------------------------------------------------------------------------- 50 schemas
# A meta-schema whose instances are strict-subset schemas: objects of 1-4 properties whose values are scalars,
# string enums, arrays of scalars (maxItems 1-4) or one more level of such objects. `required` and
# `additionalProperties` are closed afterwards (JSON Schema cannot say "required lists every property").
_NAMES = ["id", "name", "age", "city", "tags", "score", "ok", "kind", "note", "size", "color", "count"]
_LEAF = {"type": "object", "properties": {"type": {"enum": ["string", "integer", "number", "boolean"]}},
         "required": ["type"], "additionalProperties": False}
_ENUM = {"type": "object", "properties": {"type": {"const": "string"}, "enum": {
    "type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,8}$"}, "minItems": 1, "maxItems": 4,
    "uniqueItems": True}}, "required": ["type", "enum"], "additionalProperties": False}
_ARRAY = {"type": "object", "properties": {"type": {"const": "array"}, "items": _LEAF,
                                           "maxItems": {"type": "integer", "minimum": 1, "maximum": 4}},
          "required": ["type", "items", "maxItems"], "additionalProperties": False}


def _object(values: list, most: int) -> dict:
    return {"type": "object", "properties": {"type": {"const": "object"}, "properties": {
        "type": "object", "propertyNames": {"enum": _NAMES}, "additionalProperties": {"anyOf": values},
        "minProperties": 1, "maxProperties": most}}, "required": ["type", "properties"], "additionalProperties": False}


META = _object([_LEAF, _ENUM, _ARRAY, _object([_LEAF, _ENUM, _ARRAY], 3)], 4)


def _patch_hypothesis_jsonschema() -> None:
    """hypothesis-jsonschema 0.23 draws object sizes through Hypothesis' internal `many` with a more()/reject()
    protocol that Hypothesis 6.1xx replaced by a context manager; give that module (only) the protocol it uses."""
    import hypothesis_jsonschema._from_schema as hjs
    from hypothesis.internal.conjecture import utils as cu

    if hasattr(cu.many, "more"):
        return

    class Many:
        def __init__(self, data, min_size, max_size, average_size):
            self.data, self.min_size, self.max_size = data, min_size, max_size
            self.p = cu._calc_p_continue(average_size - min_size, max_size - min_size)
            self.count = self.rejections = 0
            self.stop = False

        def more(self) -> bool:
            go = self.count < self.min_size or (not self.stop and self.count < self.max_size and
                                                 self.data.draw_boolean(self.p))
            self.count += go
            return go

        def reject(self, why=None) -> None:
            self.count -= 1
            self.rejections += 1
            if self.rejections > max(3, 2 * self.count):
                if self.count < self.min_size:
                    self.data.mark_invalid(why)
                self.stop = True

    hjs.cu = types.SimpleNamespace(**{k: getattr(cu, k) for k in dir(cu) if not k.startswith("__")})
    hjs.cu.many = Many


def _close(schema: dict) -> dict:
    if schema.get("type") == "object":
        schema["required"] = list(schema["properties"])
        schema["additionalProperties"] = False
        for sub in schema["properties"].values():
            _close(sub)
    return schema


def strict_schemas(n: int) -> list[dict]:
    """n distinct schemas of OpenAI's strict subset, drawn deterministically by hypothesis-jsonschema."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis_jsonschema import from_schema

    _patch_hypothesis_jsonschema()
    seen: dict[str, dict] = {}

    @settings(max_examples=n + 20, phases=[Phase.generate], derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(from_schema(META))
    def draw(s):
        seen.setdefault(json.dumps(_close(s), sort_keys=True), s)

    draw()
    assert len(seen) >= n, f"only {len(seen)} distinct schemas drawn"
    return list(seen.values())[:n]


def outside_strings(text: str) -> str:
    return re.sub(r'"(\\.|[^"\\])*"', '""', text)


def test_50_strict_schemas_answered_and_valid(client):
    """Every answer ends with `stop` (none cut by the 256-token budget), validates against its schema, is compact
    (no whitespace outside strings), and the 50 requests ran as one continuous batch."""
    from herd.server.grammar import check_strict

    t0 = time.monotonic()
    schemas = strict_schemas(50)
    t_gen = time.monotonic() - t0
    for s in schemas:
        check_strict(s)  # the generator stays inside the subset

    def ask(i: int) -> dict:
        prompt = "Reply with a JSON object matching this JSON schema:\n" + json.dumps(schemas[i])
        return chat(client, prompt, max_tokens=256, response_format={
            "type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schemas[i], "strict": True}})

    t0 = time.monotonic()
    with ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(ask, range(50)))
    t_run = time.monotonic() - t0
    tokens, cut = 0, []
    for i, (schema, r) in enumerate(zip(schemas, answers)):
        ch = r["choices"][0]
        text = ch["message"]["content"]
        if ch["finish_reason"] != "stop":
            cut.append((i, ch["finish_reason"], json.dumps(schema), text[-80:]))
            continue
        jsonschema.validate(json.loads(text), schema)
        assert not re.search(r"\s", outside_strings(text)), text
        tokens += r["usage"]["completion_tokens"]
    assert not cut, f"{len(cut)} of 50 answers did not stop: {cut}"
    assert max(r["usage"]["completion_tokens"] for r in answers) < 256
    print(f"[grammar] 50 strict schemas: drawn in {t_gen:.1f} s, answered in {t_run:.1f} s, {tokens} tokens, "
          f"longest {max(r['usage']['completion_tokens'] for r in answers)}")


# ------------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("keyword,schema", [
    ("minLength", {"type": "object", "properties": {"a": {"type": "string", "minLength": 2}}, "required": ["a"],
                   "additionalProperties": False}),
    ("additionalProperties", {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}),
    ("required", {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                  "required": ["a"], "additionalProperties": False}),
    ("allOf", {"type": "object", "properties": {"a": {"allOf": [{"type": "integer"}]}}, "required": ["a"],
               "additionalProperties": False}),
    ("patternProperties", {"type": "object", "patternProperties": {"^x": {"type": "string"}},
                           "additionalProperties": False}),
    ("uniqueItems", {"type": "object", "properties": {"a": {"type": "array", "items": {"type": "string"},
                                                             "uniqueItems": True}},
                     "required": ["a"], "additionalProperties": False}),
])
def test_schema_outside_the_strict_subset_is_a_400_naming_the_keyword(client, keyword, schema):
    body = {"model": "smol", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert f"'{keyword}'" in err["message"] and err["param"] == "response_format", err
    # without strict the same schema is taken (best effort)
    body["response_format"]["json_schema"]["strict"] = False
    assert client.post("/v1/chat/completions", json=body).status_code == 200


def test_bad_grammars_are_400s_naming_the_field(client):
    base = {"model": "smol", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    for field, value, words in [("grammar", "root ::= ( \"a\"", "grammar"), ("regex", "(ab", "regex"),
                                ("choice", [], "choice")]:
        r = client.post("/v1/chat/completions", json={**base, field: value})
        assert r.status_code == 400 and words in r.json()["error"]["message"], (field, r.text)
    r = client.post("/v1/chat/completions", json={**base, "regex": "a+", "choice": ["a"]})
    assert r.status_code == 400 and "not regex and choice" in r.json()["error"]["message"], r.text


# ------------------------------------------------------------------------------------------------- grammars
def test_gbnf_and_lark_grammars_in_chat_whole_and_streamed(client):
    gbnf = 'root ::= "The answer is " digit digit? "."\ndigit ::= [0-9]'
    lark = 'start: "Colour: " COLOUR "!"\nCOLOUR: "red" | "green" | "blue"'
    for grammar, pattern in [(gbnf, r"The answer is [0-9][0-9]?\."), (lark, r"Colour: (red|green|blue)!")]:
        body = {"messages": [{"role": "user", "content": "What is 6 times 7?"}], "grammar": grammar}
        whole = chat(client, "What is 6 times 7?", grammar=grammar)["choices"][0]
        assert whole["finish_reason"] == "stop" and re.fullmatch(pattern, whole["message"]["content"]), whole
        texts, reasons = stream(client, "/v1/chat/completions", {"model": "smol", "max_tokens": 64,
                                                                 "temperature": 0, **body})
        assert texts[0] == whole["message"]["content"] and reasons[0] == "stop"


def test_regex_in_completions_sampled_n4_streamed(client):
    """A date regex over /v1/completions with n=4 sampled choices (four engine rows, four matchers)."""
    pattern = r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
    body = {"model": "smol", "prompt": "The Apollo 11 landing date (YYYY-MM-DD) was ", "max_tokens": 24,
            "temperature": 1.0, "seed": 7, "n": 4, "regex": pattern}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    whole = {c["index"]: c for c in r.json()["choices"]}
    assert len(whole) == 4
    for c in whole.values():
        assert c["finish_reason"] == "stop" and re.fullmatch(pattern, c["text"]), c
    texts, reasons = stream(client, "/v1/completions", body)
    assert texts == {i: c["text"] for i, c in whole.items()} and set(reasons.values()) == {"stop"}


def test_choice_sampled_n8(client):
    options = ["positive", "negative", "neutral", "mixed \"feelings\""]
    r = chat(client, "Sentiment of: 'I loved the film but the ending was weak.'", choice=options,
             temperature=1.0, seed=1, n=8)
    got = [c["message"]["content"] for c in r["choices"]]
    assert all(g in options for g in got) and all(c["finish_reason"] == "stop" for c in r["choices"]), got


def test_json_object_whole_equals_streamed_and_is_compact(client):
    text = "Give me a JSON object describing a cat with name and age."
    whole = chat(client, text, max_tokens=120, temperature=0.8, seed=3,
                 response_format={"type": "json_object"})["choices"][0]
    content = whole["message"]["content"]
    assert whole["finish_reason"] == "stop" and isinstance(json.loads(content), dict), content
    assert not re.search(r"\s", outside_strings(content)), content
    texts, _ = stream(client, "/v1/chat/completions", {"model": "smol", "max_tokens": 120, "temperature": 0.8,
                                                       "seed": 3,
                                                       "messages": [{"role": "user", "content": text}],
                                                       "response_format": {"type": "json_object"}})
    assert texts[0] == content


# ------------------------------------------------------------------------------------------------- the mask
def test_regex_mask_equals_partial_matching_over_the_vocabulary(llm):
    """At each step of a walk, the tokens the constraint allows are exactly the tokens whose text keeps the output
    a prefix of some match of the regex (the `regex` module's partial fullmatch), and stops exactly when the
    output is a whole match. Checked over the whole 49,152-token vocabulary."""
    regex = pytest.importorskip("regex")
    from herd.server.grammar import compile_grammar, regex_grammar

    pattern = r"[a-c]{1,3}(-[0-9]{2}|!)"
    tok, V, stops = llm.tokenizer, llm.config.vocab_size, sorted(llm.stop_ids)
    g = compile_grammar(regex_grammar(pattern), tok, V, stops, param="regex").constraint()
    specials = set(tok.special_tokens.values())
    texts = [None if i in specials else tok.decode_bytes([i]) for i in range(V)]
    out = ""
    for step in ["ab", "c", "-", "4", "2"]:
        want = set()
        for i, b in enumerate(texts):
            if b is None or not b:
                continue
            try:
                s = b.decode("utf-8")
            except UnicodeDecodeError:
                continue
            if regex.fullmatch(pattern, out + s, partial=True):
                want.add(i)
        if regex.fullmatch(pattern, out):
            want |= set(stops)
        allowed = g.allowed()
        got = set(torch.nonzero(allowed).flatten().tolist())
        assert got == want, (out, sorted(got ^ want)[:10])
        masked = g.mask(torch.zeros(V))
        assert torch.isinf(masked).sum() == V - len(want)
        ids = tok.encode(step)
        assert len(ids) == 1
        g.advance(ids[0])
        out += step
    assert set(torch.nonzero(g.allowed()).flatten().tolist()) == set(stops)  # "abc-42" is whole: only a stop


# ------------------------------------------------------------------------------------------------- garbage in
def test_any_grammar_or_schema_is_compiled_or_refused_with_a_400(llm):
    """Random grammars, regexes, choices, response-format schemas (strict or not) and tool parameter schemas either
    compile to a working mask or are an APIError (400): nothing else escapes to become a 500."""
    import types as _types

    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    from herd.server.grammar import request_grammar
    from herd.server.schemas import APIError, ResponseFormat
    from herd.server.tool_grammar import tool_grammar

    tok, V, stops = llm.tokenizer, llm.config.vocab_size, llm.stop_ids
    keys = st.sampled_from(["type", "properties", "items", "enum", "required", "additionalProperties", "anyOf",
                            "$ref", "pattern", "minimum", "format", "maxLength", "const", "$defs"])
    values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                          lambda c: st.lists(c, max_size=3) | st.dictionaries(keys, c, max_size=4), max_leaves=10)

    def survives(make) -> None:
        try:
            g = make()
            if g is not None:
                (g.grammar if hasattr(g, "grammar") else g).constraint().mask(torch.zeros(V))
        except APIError as e:
            assert e.status == 400

    @settings(max_examples=60, deadline=None, derandomize=True, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(st.text(max_size=30), st.text(max_size=20), st.lists(st.text(max_size=6), min_size=1, max_size=3),
           values, st.booleans())
    def check(grammar, regex, choice, schema, strict):
        def req(**kw):
            r = _types.SimpleNamespace(response_format=None, grammar=None, regex=None, choice=None)
            r.__dict__.update(kw)
            return lambda: request_grammar(r, tok, V, stops)

        survives(req(grammar=grammar or " "))
        survives(req(regex=regex or "("))
        survives(req(choice=choice))
        survives(req(response_format=ResponseFormat(type="json_schema", json_schema={
            "name": "x", "schema": schema, "strict": strict})))
        tools = [{"type": "function", "function": {"name": "f", "parameters": schema, "strict": strict}}]
        survives(lambda: tool_grammar(llm, tools, "required"))

    check()

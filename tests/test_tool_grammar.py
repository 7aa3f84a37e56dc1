"""Tool calls generated under a grammar (herd/server/tool_grammar.py) by tiny random checkpoints that carry Meta's
real tokenizers: Llama 3.1 (JSON calls after <|python_tag|>) and Llama 4 (pythonic lists `[f(x=1)]`). A random
model knows nothing, so whatever it samples is the grammar's doing: every reply must be a call that parses (by
Meta's own decoder for Llama 3.1, by Python's `ast` for the pythonic lists) with arguments that validate against the
tool's schema, `required` must call, a named tool_choice must call that function, and `auto` text never starts as a
call does. Served in-process (create_app) with n > 1 rows in the engine at once, whole and streamed."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

WEATHER = {"type": "object", "properties": {
    "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    "days": {"type": "integer"}}, "required": ["city", "days"]}
SEARCH = {"type": "object", "properties": {"query": {"type": "string"}, "limit": {"type": "integer"},
                                           "exact": {"type": "boolean"}}, "required": ["query"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "search", "description": "Search the web",
                                           "parameters": SEARCH}}]
SCHEMAS = {"get_weather": WEATHER, "search": SEARCH}
MSGS = [{"role": "user", "content": "What is the weather in Paris for the next 3 days?"}]


def tiny_checkpoint(out: Path, tokenizer: str, vocab: int) -> Path:
    """A tiny random dense Llama (2 layers, dim 64) in Meta's format with llama_models' real `tokenizer`."""
    import llama_models
    import shutil
    import torch

    from herd.config import ModelConfig
    from herd.formats import save_meta
    from herd.models.llama import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab, ffn_dim=160, max_seq_len=1024,
                      rope_theta=500000.0, family="llama")
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    save_meta(out, cfg, model.state_dict())
    shutil.copy(Path(llama_models.__file__).parent / tokenizer / "tokenizer.model", out / "tokenizer.model")
    return out


@pytest.fixture(scope="module", params=["llama3", "llama4"])
def served(request, tmp_path_factory):
    """(family, llm, TestClient) for a tiny checkpoint with that family's tokenizer and chat format."""
    import herd
    from fastapi.testclient import TestClient

    from herd.server.app import create_app

    vocab = {"llama3": 128256, "llama4": 202048}[request.param]
    folder = tiny_checkpoint(tmp_path_factory.mktemp(request.param), request.param, vocab)
    if request.param == "llama3":
        llm = herd.load(folder)
    else:  # a dense params.json reads as Llama 3, whose format this tokenizer lacks: load it plain, then set Llama 4's
        from herd.chat_format import Llama4ChatFormat

        llm = herd.load(folder, chat_template="{{ messages }}")
        llm.chat_format = Llama4ChatFormat(llm.tokenizer)
    want = {"llama3": "Llama3ChatFormat", "llama4": "Llama4ChatFormat"}[request.param]
    assert type(llm.chat_format).__name__ == want
    with TestClient(create_app(llm, model_name="tiny", max_batch=8)) as c:
        yield request.param, llm, c


def ask(client, **kw) -> dict:
    body = {"model": "tiny", "messages": MSGS, "tools": TOOLS, "max_tokens": 320, "temperature": 1.0, **kw}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def check_calls(choice: dict, names: set[str]) -> None:
    msg = choice["message"]
    assert choice["finish_reason"] == "tool_calls" and msg["content"] is None, choice
    for call in msg["tool_calls"]:
        fn = call["function"]
        assert fn["name"] in names, fn
        jsonschema.validate(json.loads(fn["arguments"]), SCHEMAS[fn["name"]])


def test_required_and_named_tool_choice_always_call(served):
    family, llm, client = served
    r = ask(client, tool_choice="required", n=6, seed=11)
    for ch in r["choices"]:
        check_calls(ch, {"get_weather", "search"})
    named = {"type": "function", "function": {"name": "search"}}
    r = ask(client, tool_choice=named, n=6, seed=12)
    for ch in r["choices"]:
        check_calls(ch, {"search"})
        if family == "llama3":  # one JSON call per message in Llama 3.1's format
            assert len(ch["message"]["tool_calls"]) == 1
    r = ask(client, tool_choice="required", n=4, seed=13, parallel_tool_calls=False)
    for ch in r["choices"]:
        check_calls(ch, {"get_weather", "search"})
        assert len(ch["message"]["tool_calls"]) == 1


def test_auto_text_never_holds_a_call_and_streaming_equals_whole(served):
    family, llm, client = served
    r = ask(client, tool_choice="auto", n=8, seed=5)
    opener = "[" if family == "llama4" else "{"
    for ch in r["choices"]:
        if ch["message"].get("tool_calls"):
            check_calls(ch, {"get_weather", "search"})
        else:
            assert ch["finish_reason"] in ("stop", "length")
            text = ch["message"]["content"] or ""
            assert not text.startswith(opener) and "<|python_tag|>" not in text, text
    body = {"model": "tiny", "messages": MSGS, "tools": TOOLS, "max_tokens": 320, "temperature": 1.0, "seed": 3,
            "tool_choice": "required", "stream": True}
    streamed, reason = [], None
    with client.stream("POST", "/v1/chat/completions", json=body) as s:
        for line in s.iter_lines():
            if line.startswith("data: {"):
                for ch in json.loads(line[6:])["choices"]:
                    streamed += ch["delta"].get("tool_calls") or []
                    reason = ch.get("finish_reason") or reason
    whole = ask(client, tool_choice="required", seed=3)["choices"][0]["message"]["tool_calls"]
    assert reason == "tool_calls"
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in streamed] == \
        [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in whole]


def test_raw_replies_parse_with_the_reference_parsers(served):
    """The text the engine generates under the grammar, read by the reference: Meta's llama_models decoder for
    Llama 3.1 (a custom tool call with these arguments), Python's ast for Llama 4's call lists."""
    from herd.ops.sampling import SamplingParams
    from herd.server.tool_grammar import tool_grammar

    family, llm, client = served
    state = client.app.state  # the ServerState (create_app returns the gate in front of FastAPI)
    engine = state.engine if hasattr(state, "engine") else state.herd.engine
    prompt = llm.chat_format.encode_dialog(MSGS, add_generation_prompt=True, tools=TOOLS)
    grammar = tool_grammar(llm, TOOLS, "required").grammar
    handles = [engine.submit(prompt, SamplingParams(max_tokens=320, temperature=1.0, seed=100 + i),
                             constraint=grammar.constraint()) for i in range(8)]
    for h in handles:
        done = h.result()
        assert done.finish_reason == "stop", done.text
        if family == "llama3":
            from llama_models.datatypes import StopReason
            from llama_models.llama3.chat_format import ChatFormat
            from llama_models.llama3.tokenizer import Tokenizer
            import llama_models

            meta = ChatFormat(Tokenizer(Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"))
            assert done.text.startswith("<|python_tag|>"), done.text
            m = meta.decode_assistant_message_from_content(done.text, StopReason.end_of_message)
            assert len(m.tool_calls) == 1, done.text
            call = m.tool_calls[0]
            jsonschema.validate(call.arguments, SCHEMAS[str(call.tool_name)])
        else:
            tree = ast.parse(done.text, mode="eval").body
            assert isinstance(tree, ast.List) and tree.elts, done.text
            for c in tree.elts:
                args = {k.arg: ast.literal_eval(k.value) for k in c.keywords}
                assert not c.args
                jsonschema.validate(args, SCHEMAS[c.func.id])


def test_strict_tool_outside_the_subset_is_a_400(served):
    family, llm, client = served
    tools = [{"type": "function", "function": {"name": "f", "strict": True, "parameters": {
        "type": "object", "properties": {"a": {"type": "string", "maxLength": 3}}, "required": ["a"],
        "additionalProperties": False}}}]
    r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": MSGS, "tools": tools,
                                                  "tool_choice": "required", "max_tokens": 8})
    assert r.status_code == 400 and "'maxLength'" in r.json()["error"]["message"], r.text
    assert r.json()["error"]["param"] == "tools.0.function.parameters"


# A ChatML template showing <tool_call> blocks when tools are offered (the Hermes/Qwen style many templates use).
TAGGED_TEMPLATE = """{%- if tools %}<|im_start|>system
You call functions: {% for t in tools %}{{ t.function.name }} {% endfor %}<|im_end|>
<|im_start|>user
What is the weather in Rome?<|im_end|>
<|im_start|>assistant
<tool_call>{"name": "get_weather", "arguments": {"city": "Rome", "days": 1}}</tool_call><|im_end|>
{% endif %}
{%- for m in messages %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


def test_tagged_calls_of_a_jinja_template_on_the_default_model(smollm_gguf):
    """A template that shows <tool_call> blocks gets calls in them: the default model's greedy `auto` answer to a
    weather question is a call, `required` makes one even for a joke request (2 sampled rows, several calls
    allowed, each parsed)."""
    import herd
    from fastapi.testclient import TestClient

    from herd.server.app import create_app
    from herd.server.tool_grammar import TAGGED, tool_format

    llm = herd.load(smollm_gguf, chat_template=TAGGED_TEMPLATE)
    assert tool_format(llm.chat_format) == TAGGED
    with TestClient(create_app(llm, model_name="tiny", max_batch=4)) as c:
        r = ask(c, tool_choice="auto", temperature=0, max_tokens=60)
        check_calls(r["choices"][0], {"get_weather"})
        assert json.loads(r["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"])["city"] == "Paris"
        joke = [{"role": "user", "content": "Tell me a joke."}]
        r = ask(c, messages=joke, tool_choice="required", n=2, seed=4, max_tokens=120)
        for ch in r["choices"]:
            check_calls(ch, {"get_weather", "search"})


def test_any_parameters_schema_is_compiled_or_refused_with_a_400(served):
    """Random `parameters` schemas in this family's format either give a working mask or an APIError (400)."""
    import torch
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    from herd.server.schemas import APIError
    from herd.server.tool_grammar import tool_grammar

    family, llm, client = served
    keys = st.sampled_from(["type", "properties", "items", "enum", "required", "const", "a", "b c"])
    values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                          lambda c: st.lists(c, max_size=3) | st.dictionaries(keys, c, max_size=4), max_leaves=10)

    @settings(max_examples=120, deadline=None, derandomize=True, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(values, st.sampled_from(["auto", "required"]))
    def check(params, choice):
        tools = [{"type": "function", "function": {"name": "f", "parameters": params}}]
        try:
            tool_grammar(llm, tools, choice).grammar.constraint().mask(torch.zeros(llm.config.vocab_size))
        except APIError as e:
            assert e.status == 400

    check()

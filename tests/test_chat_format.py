"""herd's chat formats against Meta's ChatFormat (llama_models), transformers' apply_chat_template and llama.cpp,
on conversations built from the hard-strings corpus."""

from __future__ import annotations

import io
import json
import re
import unicodedata
from pathlib import Path

import pytest

from herd.chat_format import (
    JinjaChatFormat,
    Llama2ChatFormat,
    Llama3ChatFormat,
    Llama4ChatFormat,
    chat_format_for,
)
from herd.errors import ConfigError, FormatError, GenerationError
from herd.formats.gguf_vocab import tokenizer_from_gguf
from herd.tokenizer import load_tokenizer

DATA = Path(__file__).parent / "data"


def load_corpus() -> list[str]:
    spec = json.loads((DATA / "hard_strings.json").read_text(encoding="utf-8"))
    return spec["strings"]  # the short ones: conversations multiply every string several times


CORPUS = load_corpus()


def meta_dir() -> Path:
    import llama_models

    return Path(llama_models.__file__).parent


# ================================================================================================ conversations


def call(name: str, args) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": args}}


def conversations(s: str) -> list[list[dict]]:
    """OpenAI-shaped conversations that put `s` in every kind of slot."""
    return [
        [{"role": "user", "content": s}],
        [{"role": "system", "content": s}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": s},
         {"role": "user", "content": s}],
        [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": s},
         {"role": "assistant", "content": None, "tool_calls": [call("get_weather", json.dumps({"city": s}))]},
         {"role": "tool", "content": s}, {"role": "assistant", "content": "It is " + s},
         {"role": "user", "content": "thanks"}],
        [{"role": "user", "content": s}, {"role": "assistant", "content": "", "tool_calls": [call("brave_search", {"query": s})]},
         {"role": "ipython", "content": s}],
        [{"role": "user", "content": "run it"}, {"role": "assistant", "content": None,
          "tool_calls": [call("code_interpreter", {"code": s})]}, {"role": "tool", "content": s}],
        [{"role": "user", "content": [{"type": "text", "text": s}, {"type": "text", "text": " and more"}]},
         {"role": "assistant", "content": s, "stop_reason": "end_of_message"}],
    ]  # fmt: skip


def to_meta(messages: list[dict]):
    """The same conversation as Meta's RawMessage list."""
    from llama_models.datatypes import RawMediaItem, RawMessage, RawTextItem, StopReason, ToolCall

    out = []
    for m in messages:
        content = m["content"] or ""
        if isinstance(content, list):
            content = [
                RawTextItem(text=p["text"]) if p["type"] == "text" else RawMediaItem(data=p["png"]) for p in content
            ]
        calls = []
        for k, c in enumerate(m.get("tool_calls") or []):
            args = c["function"]["arguments"]
            calls.append(ToolCall(call_id=str(k), tool_name=c["function"]["name"],
                                  arguments=json.loads(args) if isinstance(args, str) else args))  # fmt: skip
        stop = m.get("stop_reason") or ("end_of_message" if calls else "end_of_turn")
        role = "tool" if m["role"] in ("tool", "ipython") else m["role"]
        out.append(RawMessage(role=role, content=content, tool_calls=calls, stop_reason=StopReason(stop)))
    return out


@pytest.fixture(scope="module")
def llama3():
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer

    return ChatFormat(Tokenizer(meta_dir() / "llama3" / "tokenizer.model")), load_tokenizer(
        meta_dir() / "llama3" / "tokenizer.model"
    )


def import_meta_llama4_chat_format():
    """Meta's llama4.chat_format imports torchvision for pixel transforms, which the token layout never uses.
    Without torchvision, import it against a placeholder that is removed again right after (so nothing else in
    the session sees a fake torchvision)."""
    import sys
    import types

    try:
        import torchvision  # noqa: F401
    except ImportError:

        class Placeholder:
            def __init__(self, *args, **kwargs):
                pass

            def __call__(self, *args, **kwargs):
                raise RuntimeError("torchvision is not installed: pixel transforms are unavailable")

        tr = types.ModuleType("torchvision.transforms")
        tr.Compose = tr.Resize = tr.ToTensor = tr.Normalize = Placeholder
        tr.InterpolationMode = types.SimpleNamespace(BILINEAR="bilinear")
        tr.functional = types.ModuleType("torchvision.transforms.functional")
        tv = types.ModuleType("torchvision")
        tv.transforms = tr
        fake = {"torchvision": tv, "torchvision.transforms": tr, "torchvision.transforms.functional": tr.functional}
        sys.modules.update(fake)
        try:
            from llama_models.llama4 import chat_format
        finally:
            for name in fake:
                del sys.modules[name]
        return chat_format
    from llama_models.llama4 import chat_format

    return chat_format


class MetaTileGrid:
    """Meta's VariableSizeImageTransform minus the pixels: its own best-fit canvas search, blank tiles out."""

    def __init__(self, transform):
        self.t = transform

    def __call__(self, image, max_num_chunks, **_):
        import torch

        resolutions = torch.tensor(
            self.t.find_supported_resolutions(max_num_chunks=max_num_chunks, patch_size=self.t.size)
        )
        best = self.t.get_best_fit(image_size=image.size, possible_resolutions=resolutions, resize_to_max_canvas=False)
        ratio_w, ratio_h = best[0] // self.t.size, best[1] // self.t.size
        return torch.zeros(ratio_w * ratio_h, 3, self.t.size, self.t.size), (ratio_h, ratio_w)


@pytest.fixture(scope="module")
def llama4():
    import torch
    from llama_models.llama4.args import Size, VisionArgs
    from llama_models.llama4.tokenizer import Tokenizer

    chat_format = import_meta_llama4_chat_format()
    vision = VisionArgs(image_size=Size(height=336, width=336), patch_size=Size(height=14, width=14), dim=1408,
                        n_layers=1, n_heads=16, mlp_ratio=4.0, output_dim=4096, pixel_shuffle_ratio=0.5)  # fmt: skip
    meta = chat_format.ChatFormat(Tokenizer(meta_dir() / "llama4" / "tokenizer.model"), vision_args=vision)
    meta.dynamic_image_transform = MetaTileGrid(meta.dynamic_image_transform)
    meta.image_transform = lambda image: torch.zeros(3, 336, 336)
    return meta, load_tokenizer(meta_dir() / "llama4" / "tokenizer.model")


def png(width: int, height: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 90)).save(buf, format="PNG")
    return buf.getvalue()


# ================================================================================================ Meta Llama 3 / 4


@pytest.mark.parametrize("fixture", ["llama3", "llama4"])
def test_meta_chat_format_ids(fixture, request):
    """System, multi-turn, tool calls (custom JSON, brave_search, code_interpreter), tool results, eom/eot."""
    meta, tok = request.getfixturevalue(fixture)
    herd = Llama3ChatFormat(tok) if fixture == "llama3" else Llama4ChatFormat(tok)
    assert herd.stop_ids == frozenset(meta.tokenizer.stop_tokens)
    n = 0
    for s in CORPUS:
        for conv in conversations(s):
            want = meta.encode_dialog_prompt(to_meta(conv)).tokens
            want = want.tolist() if hasattr(want, "tolist") else list(want)
            assert herd.encode_dialog(conv) == want, (s[:40], conv)
            header = len(herd.encode_dialog([], add_generation_prompt=True)) - 1
            assert herd.encode_dialog(conv, add_generation_prompt=False) == want[:-header]
            n += 1
    # an explicit stop_reason wins over the tool-call default
    conv = [{"role": "user", "content": "x"},
            {"role": "assistant", "content": "", "tool_calls": [call("f", "{}")], "stop_reason": "end_of_turn"}]  # fmt: skip
    assert herd.encode_dialog(conv) == list(meta.encode_dialog_prompt(to_meta(conv)).tokens)
    print(f"[chat parity] {fixture} ChatFormat vs Meta: {n}/{n} conversations equal")


def test_llama3_image_token(llama3):
    meta, tok = llama3
    conv = [
        {"role": "user", "content": [{"type": "image", "png": png(40, 30)}, {"type": "text", "text": "What is it?"}]}
    ]
    assert Llama3ChatFormat(tok).encode_dialog(conv) == meta.encode_dialog_prompt(to_meta(conv)).tokens


@pytest.mark.parametrize("size", [(300, 300), (800, 500), (500, 1400), (2000, 2000)])
def test_llama4_image_tokens(llama4, size):
    """Image tokens for 1-tile and multi-tile grids equal Meta's; the grid comes from Meta's own best-fit search."""
    from PIL import Image

    meta, tok = llama4
    data = png(*size)
    _, grid = meta.dynamic_image_transform(Image.open(io.BytesIO(data)), max_num_chunks=meta.max_num_chunks)
    herd_conv = [{"role": "user", "content": [{"type": "image", "aspect_ratio": list(grid)},
                                              {"type": "text", "text": "Describe."}]}]  # fmt: skip
    meta_conv = [{"role": "user", "content": [{"type": "image", "png": data}, {"type": "text", "text": "Describe."}]}]
    want = list(meta.encode_dialog_prompt(to_meta(meta_conv)).tokens)
    assert Llama4ChatFormat(tok).encode_dialog(herd_conv) == want
    print(f"[chat parity] Llama 4 image {size} -> grid {grid}: {len(want)} tokens equal")


def test_llama3_0_is_meta_format_with_stripped_content(llama3):
    """Llama 3.0 (original llama3 repo): content stripped, always <|eot_id|> -- Meta's 3.1 layout otherwise."""
    meta, tok = llama3
    herd = chat_format_for(tok, "llama3")
    assert herd.stop_ids == {128001, 128009}
    for s in CORPUS:
        conv = conversations(s)[1]
        stripped = [{**m, "content": m["content"].strip()} for m in conv]
        assert herd.encode_dialog(conv) == meta.encode_dialog_prompt(to_meta(stripped)).tokens
    with pytest.raises(GenerationError, match="message 2"):
        herd.encode_dialog(conversations("x")[2])


def meta_reply_dict(meta_msg) -> dict:
    """Meta's decoded assistant message in herd's shape, for comparison."""
    if not meta_msg.tool_calls:
        return {"content": meta_msg.content, "call": None}
    c = meta_msg.tool_calls[0]
    name = c.tool_name.value if hasattr(c.tool_name, "value") else c.tool_name
    return {"content": meta_msg.content, "call": (name, c.arguments)}


REPLIES_3 = [
    "The answer is 42.<|eot_id|>",
    "  padded reply  ",
    '<|python_tag|>brave_search.call(query="latest price of gold")<|eom_id|>',
    "<|python_tag|>def f(x):\n    return x * 2\nprint(f(21))<|eom_id|>",
    '{"type": "function", "name": "get_weather", "parameters": {"city": "Paris", "days": 3}}<|eot_id|>',
    '{"name": "trending_songs", "parameters": {"n": "10"}}',
    '<function=spotify_trending_songs>{"n": 10}</function><|eot_id|>',
    '[get_weather(city="Paris", unit="C")]',
    '{"name": "brave_search", "parameters": {"query": "llamas"}}',
    '{"not": "a call"}',
    "<|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>",
]


@pytest.mark.parametrize("fixture", ["llama3", "llama4"])
def test_parse_reply_matches_meta(fixture, request):
    from llama_models.datatypes import StopReason

    meta, tok = request.getfixturevalue(fixture)
    herd = Llama3ChatFormat(tok) if fixture == "llama3" else Llama4ChatFormat(tok)
    replies = REPLIES_3
    if fixture == "llama4":
        swap = {"<|python_tag|>": "<|python_start|>", "<|eom_id|>": "<|eom|>", "<|eot_id|>": "<|eot|>",
                "<|start_header_id|>": "<|header_start|>", "<|end_header_id|>": "<|header_end|>"}  # fmt: skip
        replies = [re.sub("|".join(map(re.escape, swap)), lambda m: swap[m.group()], r) for r in replies]
        replies.append("<|python_start|>print(1)<|python_end|><|eom|>")
    for r in replies:
        want = meta_reply_dict(meta.decode_assistant_message_from_content(r, StopReason.end_of_turn))
        got = herd.parse_reply(r)
        assert got["role"] == "assistant"
        assert got["content"] == want["content"], r
        if want["call"] is None:
            assert "tool_calls" not in got, r
        else:
            fn = got["tool_calls"][0]["function"]
            assert (fn["name"], json.loads(fn["arguments"])) == want["call"], r


def prompt_format_examples() -> dict[str, str]:
    """Input-prompt blocks of Meta's llama3_1/prompt_format.md, by section title."""
    text = (meta_dir() / "llama3_1" / "prompt_format.md").read_text(encoding="utf-8")
    out = {}
    for m in re.finditer(r"##### Input Prompt Format\n```\n(.*?)```", text, flags=re.S):
        title = re.findall(r"^## (.+)$", text[: m.start()], flags=re.M)[-1].strip()
        out[title] = m.group(1)
    return out


def test_tool_prompt_matches_meta_prompt_format_doc(llama3):
    """`tools` renders the system prompt the way Meta's Llama 3.1 prompt-format document shows it."""
    _, tok = llama3
    herd = Llama3ChatFormat(tok)
    docs = prompt_format_examples()
    system = "Cutting Knowledge Date: December 2023\nToday Date: 21 September 2024\n\nYou are a helpful assistant.\n"
    conv = [
        {"role": "system", "content": system},
        {"role": "user", "content": "Search the web for the latest price of 1oz gold?"},
    ]
    tools = [
        {"type": "function", "function": {"name": "brave_search"}},
        {"type": "function", "function": {"name": "wolfram_alpha"}},
    ]
    assert herd.render(conv, tools=tools) + "\n" == docs["Builtin Tool Calling"]
    conv = [
        {"role": "user", "content": "Write code to check if number is prime, use that to see if the number 7 is prime"}
    ]
    assert herd.render(conv, tools=[{"type": "code_interpreter"}]) + "\n" == docs["Builtin Code Interpreter"]
    conv = [{"role": "user", "content": "What is the 100th decimal of pi?"}]
    assert docs["Built-in tools full interaction"].startswith(herd.render(conv, tools=tools))
    conv = [
        {"role": "system", "content": "You are a helpful assistant"},
        {"role": "user", "content": "Answer who are you in the form of jeopardy?"},
    ]
    assert herd.render(conv) + "\n" == docs["User and assistant conversation"]
    # custom function specs: a user message before the first user turn, as in the document's JSON example
    spec = {"type": "function", "function": {"name": "trending_songs", "parameters": {"type": "object"}}}
    text = herd.render([{"role": "user", "content": "Use tools to get latest trending songs"}], tools=[spec])
    assert "Here is a list of functions in JSON format:\n" + json.dumps(spec, indent=4) in text
    assert text.index("Return function calls in JSON format.<|eot_id|>") < text.index("Use tools to get latest")
    assert herd.encode_dialog([{"role": "user", "content": "x"}], tools=[spec]) == tok.encode(
        herd.render([{"role": "user", "content": "x"}], tools=[spec]), allow_special=True
    )


# ================================================================================================ Llama 2

LLAMA2_TEMPLATE = r"""
{%- set ns = namespace(system=none) -%}
{%- set turns = messages -%}
{%- if messages and messages[0]['role'] == 'system' -%}
  {%- set ns.system = messages[0]['content'] -%}
  {%- set turns = messages[1:] -%}
{%- endif -%}
{%- for m in turns -%}
  {%- if (m['role'] == 'user') != loop.index0 is even -%}
    {{- raise_exception('turns must go user, assistant, user, ...') -}}
  {%- endif -%}
  {%- set text = m['content'] -%}
  {%- if loop.first and ns.system is not none -%}
    {%- set text = '<<SYS>>\n' + ns.system + '\n<</SYS>>\n\n' + text -%}
  {%- endif -%}
  {%- if m['role'] == 'user' -%}
    {{- bos_token + '[INST] ' + text.strip() + ' [/INST]' -}}
  {%- else -%}
    {{- ' ' + text.strip() + ' ' + eos_token -}}
  {%- endif -%}
{%- endfor -%}
"""

TRAIN_TEXT = ("The quick brown fox jumps over the lazy dog. It's 2024 and I'll've said 12345 numbers.\n"
              "[INST] <<SYS>> Café, naïve — résumé! 日本語の文章。 Привет, как дела? مرحبا\n") * 40  # fmt: skip


@pytest.fixture(scope="module")
def tiny_spm_dir(tmp_path_factory) -> Path:
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("spm_chat")
    (d / "train.txt").write_text(TRAIN_TEXT, encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(d / "train.txt"), model_prefix=str(d / "tokenizer"), vocab_size=400, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2,
    )  # fmt: skip
    return d


def test_llama2_matches_transformers_template(tiny_spm_dir):
    """Meta's Llama 2 layout vs transformers rendering a Llama 2 chat template with a legacy LlamaTokenizer."""
    from transformers import LlamaTokenizer

    tok = load_tokenizer(tiny_spm_dir)
    herd = chat_format_for(tok, "llama2")
    assert isinstance(herd, Llama2ChatFormat) and herd.stop_ids == {2}
    hf = LlamaTokenizer.from_pretrained(str(tiny_spm_dir), legacy=True)
    n = 0
    for s in CORPUS:
        if any(t in s for t in ("<s>", "</s>", "<unk>")):
            continue  # transformers parses special text inside content; Meta's Llama 2 code never does
        for conv in ([{"role": "user", "content": s}],
                     [{"role": "system", "content": s}, {"role": "user", "content": "q " + s},
                      {"role": "assistant", "content": s}, {"role": "user", "content": s + " again"}]):  # fmt: skip
            want = hf.apply_chat_template(conv, chat_template=LLAMA2_TEMPLATE, tokenize=True)
            want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
            assert herd.encode_dialog(conv) == list(want), s[:40]
            assert herd.render(conv) == hf.apply_chat_template(conv, chat_template=LLAMA2_TEMPLATE, tokenize=False)
            n += 1
    print(f"[chat parity] Llama 2 format vs transformers template: {n}/{n} conversations equal")
    with pytest.raises(GenerationError, match="message 1"):
        herd.encode_dialog([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(GenerationError, match="message 1"):
        herd.encode_dialog([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    with pytest.raises(GenerationError, match="message 1.*role"):
        herd.encode_dialog([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}])


# ================================================================================================ Jinja


@pytest.fixture(scope="module")
def smollm(smollm_gguf):
    """(herd tokenizer, transformers tokenizer, chat template) of the default model."""
    import gguf
    from transformers import AutoTokenizer

    reader = gguf.GGUFReader(str(smollm_gguf))
    md = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    hf = AutoTokenizer.from_pretrained(str(smollm_gguf.parent), gguf_file=smollm_gguf.name)
    return tokenizer_from_gguf(md), hf, md["tokenizer.chat_template"]


def plain_conversations(s: str) -> list[list[dict]]:
    return [
        [{"role": "user", "content": s}],
        [
            {"role": "system", "content": s},
            {"role": "user", "content": s},
            {"role": "assistant", "content": s},
            {"role": "user", "content": "and " + s},
        ],
        [{"role": "user", "content": "weather?"}, {"role": "assistant", "content": s}, {"role": "tool", "content": s}],
    ]


def test_default_model_template_matches_transformers(smollm):
    tok, hf, template = smollm
    herd = chat_format_for(tok, "llama", chat_template=template)
    assert isinstance(herd, JinjaChatFormat) and 2 in herd.stop_ids
    n = ids_equal = 0
    for s in CORPUS:
        for conv in plain_conversations(s):
            for gen in (True, False):
                text = hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
                assert herd.render(conv, add_generation_prompt=gen) == text
                ids = herd.encode_dialog(conv, add_generation_prompt=gen)
                assert ids == tok.encode(text, allow_special=True)
                if not any(unicodedata.category(c).startswith("N") and not c.isascii() for c in s):
                    # (transformers' GGUF tokenizer lacks SmolLM's digit split: see test_tokenizer.py)
                    assert ids == hf.apply_chat_template(conv, tokenize=True, add_generation_prompt=gen)["input_ids"]
                    ids_equal += 1
                n += 1
    print(f"[chat parity] SmolLM2 template vs transformers: {n}/{n} texts, {ids_equal}/{ids_equal} ids equal")


@pytest.mark.llamacpp
def test_default_model_template_ids_match_llama_cpp(smollm, smollm_gguf):
    llama_cpp = pytest.importorskip("llama_cpp")
    tok, _, template = smollm
    herd = JinjaChatFormat(tok, template)
    llm = llama_cpp.Llama(model_path=str(smollm_gguf), vocab_only=True, verbose=False)
    for s in CORPUS:
        for conv in plain_conversations(s):
            text = herd.render(conv)
            assert herd.encode_dialog(conv) == llm.tokenize(text.encode(), add_bos=False, special=True)


# A template with the behaviour of the Llama 3.1 / 3.2 / 3.3 instruct template on the Hub (SPEC.md §3), written
# independently for this test.
LLAMA31_TEMPLATE = r"""
{{- bos_token }}
{%- if messages and messages[0]['role'] == 'system' %}
    {%- set system_text = messages[0]['content'] | trim %}
    {%- set turns = messages[1:] %}
{%- else %}
    {%- set system_text = '' %}
    {%- set turns = messages %}
{%- endif %}
{%- if date_string is not defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now('%d %b %Y') %}
    {%- else %}
        {%- set date_string = '26 Jul 2024' %}
    {%- endif %}
{%- endif %}
{%- set with_tools = tools is not none %}
{%- set in_user = tools_in_user_message if tools_in_user_message is defined else true %}
{{- '<|start_header_id|>system<|end_header_id|>\n\n' }}
{%- if with_tools %}{{- 'Environment: ipython\n' }}{%- endif %}
{{- 'Cutting Knowledge Date: December 2023\nToday Date: ' + date_string + '\n\n' }}
{{- system_text + '<|eot_id|>' }}
{%- set ns = namespace(tools_pending=with_tools and in_user) %}
{%- for m in turns %}
    {%- if m['role'] in ['tool', 'ipython'] %}
        {{- '<|start_header_id|>ipython<|end_header_id|>\n\n' }}
        {%- if m['content'] is mapping or (m['content'] is iterable and m['content'] is not string) %}
            {{- m['content'] | tojson }}
        {%- else %}
            {{- m['content'] }}
        {%- endif %}
        {{- '<|eot_id|>' }}
    {%- elif m['role'] == 'assistant' and m['tool_calls'] is defined %}
        {%- if m['tool_calls'] | length != 1 %}
            {{- raise_exception('one tool call per assistant message') }}
        {%- endif %}
        {%- set fn = m['tool_calls'][0]['function'] %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "' + fn['name'] + '", "parameters": ' }}
        {{- fn['arguments'] | tojson + '}<|eot_id|>' }}
    {%- else %}
        {{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' }}
        {%- if ns.tools_pending and m['role'] == 'user' %}
            {{- 'Given the following functions, please respond with a JSON for a function call with its proper arguments that best answers the given prompt.\n\n' }}
            {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.Do not use variables.\n\n' }}
            {%- for t in tools %}{{- t | tojson(indent=4) + '\n\n' }}{%- endfor %}
            {%- set ns.tools_pending = false %}
        {%- endif %}
        {{- m['content'] | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}
"""

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}  # fmt: skip


def test_llama31_template_matches_transformers(llama3, smollm):
    """Date lines, tools in the first user message, tool calls, ipython results: herd renders what transformers
    renders; the ids are Meta's tokenizer on that text."""
    meta, tok = llama3
    _, hf, _ = smollm  # used only as transformers' template engine; special-token vars are passed explicitly
    herd = JinjaChatFormat(tok, LLAMA31_TEMPLATE)
    specials = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
    n = 0
    for s in CORPUS[::3]:
        for conv, tools in (
            ([{"role": "user", "content": s}], None),
            ([{"role": "system", "content": s}, {"role": "user", "content": s}], [WEATHER]),
            ([{"role": "user", "content": s},
              {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": s}}}]},
              {"role": "tool", "content": {"temperature": 21, "city": s}}, {"role": "assistant", "content": s}], [WEATHER]),
        ):  # fmt: skip
            for extra in ({"date_string": "26 Jul 2024"}, {}):
                text = hf.apply_chat_template(conv, chat_template=LLAMA31_TEMPLATE, tools=tools, tokenize=False,
                                              add_generation_prompt=True, **specials, **extra)  # fmt: skip
                assert herd.render(conv, tools=tools, **extra) == text
                assert herd.encode_dialog(conv, tools=tools, **extra) == meta.tokenizer.encode(
                    text, bos=False, eos=False, allowed_special="all"
                )
                n += 1
    # OpenAI clients send arguments as a JSON string: herd parses it so the template sees the same dict
    as_string = [{"role": "assistant", "tool_calls": [call("get_weather", json.dumps({"city": "Paris"}))]}]
    as_dict = [{"role": "assistant", "tool_calls": [call("get_weather", {"city": "Paris"})]}]
    assert herd.render(as_string) == herd.render(as_dict)
    two_calls = [{"role": "assistant", "tool_calls": [call("a", {}), call("b", {})]}]
    with pytest.raises(GenerationError, match="one tool call"):
        herd.render(two_calls)
    print(f"[chat parity] Llama 3.1-style template vs transformers: {n}/{n} equal")


def test_jinja_parse_reply():
    class Tok:
        stop_ids = frozenset({7})
        special_tokens = {"<|im_end|>": 7}
        bos_id = eos_id = pad_id = None

        def id_to_token(self, i):
            return "<|im_end|>"

    fmt = JinjaChatFormat(Tok(), "{{ messages[0]['content'] }}")
    assert fmt.parse_reply("Hello there<|im_end|>") == {"role": "assistant", "content": "Hello there"}
    msg = fmt.parse_reply('<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>')
    assert msg["tool_calls"][0]["function"] == {"name": "f", "arguments": '{"x": 1}'}
    msg = fmt.parse_reply('{"name": "get_weather", "parameters": {"city": "Paris"}}')
    assert json.loads(msg["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}


# ================================================================================================ errors


def test_malformed_messages_name_the_index(llama3, llama4):
    _, tok = llama3
    fmt = Llama3ChatFormat(tok)
    with pytest.raises(GenerationError, match="message 1: unknown role 'robot'"):
        fmt.encode_dialog([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}])
    with pytest.raises(GenerationError, match="message 0: missing content"):
        fmt.encode_dialog([{"role": "user"}])
    with pytest.raises(GenerationError, match="message 0: content"):
        fmt.encode_dialog([{"role": "user", "content": 5}])
    with pytest.raises(GenerationError, match=r"message 0: tool_calls\[0\]"):
        fmt.encode_dialog([{"role": "assistant", "content": "", "tool_calls": [{"function": {}}]}])
    with pytest.raises(GenerationError, match="message 0"):
        fmt.encode_dialog([{"role": "user", "content": "", "tool_calls": [call("f", {})]}])
    with pytest.raises(GenerationError, match="message 0: image aspect_ratio"):
        Llama4ChatFormat(llama4[1]).encode_dialog(
            [{"role": "user", "content": [{"type": "image", "aspect_ratio": [0, 1]}]}]
        )
    with pytest.raises(GenerationError, match="message 0"):
        JinjaChatFormat(tok, LLAMA31_TEMPLATE).render([{"role": "wizard", "content": "x"}])
    with pytest.raises(FormatError, match="syntax error"):
        JinjaChatFormat(tok, "{% for m in messages %}")
    with pytest.raises(ConfigError, match="unknown model family"):
        chat_format_for(tok, "gpt-5")
    with pytest.raises(ConfigError, match="<|header_start|>"):
        Llama4ChatFormat(tok)


def test_chat_format_for_picks_the_family(llama3, llama4):
    _, tok3 = llama3
    _, tok4 = llama4
    assert type(chat_format_for(tok3, "llama")) is Llama3ChatFormat
    assert chat_format_for(tok3, "llama3.2").stop_ids == {128001, 128008, 128009}
    assert type(chat_format_for(tok4, "llama")) is Llama4ChatFormat
    assert chat_format_for(tok4, "llama4").stop_ids == {200001, 200007, 200008}
    assert type(chat_format_for(tok3, "llama3.1", chat_template="{{ bos_token }}")) is JinjaChatFormat

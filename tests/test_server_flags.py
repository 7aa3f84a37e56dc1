"""`herd serve` flags and API paths that had no test: each flag's effect seen from outside a real server process
(/health with the key reports the settings as they took effect, /metrics the engine's counters), `n > 1` with
streaming, completions of a list of prompts and of token ids, and a successful `tool_choice="auto"` call by the
default model through a `--chat-template` that shows it how."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from test_server_faults import InProcess, free_port, tiny_gguf

KEY = "flags-key"
ROOT = Path(__file__).resolve().parents[1]
# A ChatML template that, when tools are offered, shows two calls first: SmolLM2-135M then answers a weather
# question with a <tool_call> block (what herd's Jinja format parses); without tools it adds no system prompt.
TOOL_TEMPLATE = """{%- if tools %}<|im_start|>system
You call functions. Functions: {% for t in tools %}{{ t.function.name }}{% endfor %}.<|im_end|>
<|im_start|>user
What is the weather in Rome?<|im_end|>
<|im_start|>assistant
<tool_call>{"name": "{{ tools[0].function.name }}", "arguments": {"city": "Rome"}}</tool_call><|im_end|>
<|im_start|>user
What is the weather in Oslo?<|im_end|>
<|im_start|>assistant
<tool_call>{"name": "{{ tools[0].function.name }}", "arguments": {"city": "Oslo"}}</tool_call><|im_end|>
{% endif %}
{%- for m in messages %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}
"""
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def outside_address() -> str | None:
    """This machine's address on its first non-loopback interface, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
            addr = s.getsockname()[0]
        except OSError:
            return None
    return None if addr.startswith("127.") else addr


class Proc:
    """A `python -m herd serve` process with the given flags; .url, .get(path), .post(path, body), .metric(name)."""

    def __init__(self, model, *flags: str, key: str | None = KEY):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.key = key
        self.log = tempfile.NamedTemporaryFile(prefix="herd-flags-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "herd", "serve", "--model", str(model), "--port", str(self.port),
               "--served-model-name", "m", "--threads", "1", *flags] + (["--api-key", key] if key else [])
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env={**__import__("os").environ, "HERD_API_KEY": ""})
        deadline = time.monotonic() + 300
        while True:
            assert self.proc.poll() is None, self.text()
            assert time.monotonic() < deadline, "no /health within 300 s:\n" + self.text()
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)

    def text(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def headers(self):
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def get(self, path):
        return httpx.get(self.url + path, headers=self.headers(), timeout=60)

    def post(self, path, body):
        return httpx.post(self.url + path, json=body, headers=self.headers(), timeout=300)

    def metric(self, name: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in self.get("/metrics").text.splitlines()
                   if line.startswith(name + " "))

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ------------------------------------------------------------------------------------------------- default model
@pytest.fixture(scope="module")
def smol(smollm_gguf, tmp_path_factory):
    template = tmp_path_factory.mktemp("tpl") / "tools.jinja"
    template.write_text(TOOL_TEMPLATE)
    s = Proc(smollm_gguf, "--quantized", "--host", "0.0.0.0", "--kv-tokens", "2048", "--page-size", "8",
             "--prefill-chunk", "32", "--no-prefix-cache", "--chat-template", str(template), "--max-batch", "4")
    yield s
    s.stop()


def test_engine_flags_take_effect(smol):
    """--quantized keeps the blocks, --kv-tokens 2048 with --page-size 8 is a pool of 256 pages (and a request's
    context is bounded by it), --prefill-chunk 32 splits a prompt into 32-token chunks, --no-prefix-cache reuses
    nothing, --host 0.0.0.0 answers on the machine's outside address."""
    h = smol.get("/health").json()
    assert h["weights"] == "gguf-blocks"
    e = h["engine"]
    assert (e["kv_tokens"], e["page_size"], e["prefill_chunk"], e["prefix_cache"]) == (2048, 8, 32, False)
    assert e["ctx"] < 2048 and smol.metric("herd_kv_pages_total") == 256
    r = smol.post("/v1/completions", {"model": "m", "prompt": "word " * 2100, "max_tokens": 1})
    assert r.status_code == 400 and "KV-cache" in r.json()["error"]["message"]

    system = "You are a careful assistant. " * 12  # ~70 tokens: three chunks, and full pages to share
    chunks0, hits0, computed0 = (smol.metric(n) for n in ("herd_prefill_chunks_total",
                                                         "herd_prefix_cache_hit_tokens_total",
                                                         "herd_prefill_tokens_total"))
    prompt_tokens = []
    for q in ("Hi", "Hello"):
        r = smol.post("/v1/chat/completions", {"model": "m", "max_tokens": 1, "messages": [
            {"role": "system", "content": system}, {"role": "user", "content": q}]})
        assert r.status_code == 200, r.text
        prompt_tokens.append(r.json()["usage"]["prompt_tokens"])
    assert smol.metric("herd_prefix_cache_hit_tokens_total") == hits0  # nothing reused
    assert smol.metric("herd_prefill_tokens_total") - computed0 == sum(prompt_tokens)
    assert smol.metric("herd_prefill_chunks_total") - chunks0 == sum(-(-n // 32) for n in prompt_tokens)

    addr = outside_address()
    assert addr is not None, "this machine has no non-loopback address to check --host against"
    r = httpx.get(f"http://{addr}:{smol.port}/health", timeout=30)
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    assert f"http://0.0.0.0:{smol.port}" in smol.text()


def test_chat_template_flag_and_a_tool_call_chosen_by_the_model(smol, smollm_gguf):
    """--chat-template replaces the model's template (the prompt is exactly its rendering), and with
    tool_choice="auto" the default model answers a weather question with a call the server returns as tool_calls
    (whole and streamed); a question without tools is answered as text."""
    from herd.api import load_tokenizer_only
    from herd.chat_format import JinjaChatFormat

    fmt = JinjaChatFormat(load_tokenizer_only(smollm_gguf), TOOL_TEMPLATE)
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    req = {"model": "m", "messages": msgs, "max_tokens": 40, "temperature": 0, "tools": TOOLS, "tool_choice": "auto"}
    r = smol.post("/v1/chat/completions", req).json()
    assert r["usage"]["prompt_tokens"] == len(fmt.encode_dialog(msgs, tools=TOOLS))
    choice = r["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    call = choice["message"]["tool_calls"][0]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    streamed, reasons = [], []
    with httpx.stream("POST", smol.url + "/v1/chat/completions", json={**req, "stream": True},
                      headers=smol.headers(), timeout=300) as s:
        for line in s.iter_lines():
            if line.startswith("data: {"):
                for ch in json.loads(line[6:])["choices"]:
                    streamed += ch["delta"].get("tool_calls") or []
                    reasons.append(ch["finish_reason"])
    assert [c["function"] for c in streamed] == [call["function"]] and reasons[-1] == "tool_calls"

    plain = smol.post("/v1/chat/completions", {"model": "m", "messages": msgs, "max_tokens": 8}).json()
    assert plain["usage"]["prompt_tokens"] == len(fmt.encode_dialog(msgs)) < 20  # no default system prompt
    assert plain["choices"][0]["message"]["content"] and "tool_calls" not in plain["choices"][0]["message"]


# ------------------------------------------------------------------------------------------------- tiny model
@pytest.fixture(scope="module")
def gguf(tmp_path_factory) -> Path:
    return tiny_gguf(tmp_path_factory.getbasetemp())


def _served_as_loaded(s: Proc, llm) -> None:
    """The server's greedy completion of a prompt equals the in-process model's."""
    ids = llm.encode_prompt("Hello", raw=True)
    want = llm.generate(ids, max_tokens=8, ignore_eos=True, temperature=0.0)
    r = s.post("/v1/completions", {"model": "m", "prompt": ids, "max_tokens": 8, "temperature": 0,
                                  "ignore_eos": True}).json()
    assert r["choices"][0]["text"] == want.text and r["usage"]["completion_tokens"] == 8


def test_dequantize_flag_and_the_default_host(gguf):
    """--dequantize runs a GGUF on the float path (float32, no blocks), answering as herd.load(...,
    keep_quantized=False) does here; the default --host answers on loopback only."""
    import herd

    s = Proc(gguf, "--dequantize", "--max-batch", "2")
    try:
        assert s.get("/health").json()["weights"] == "float32"
        _served_as_loaded(s, herd.load(gguf, keep_quantized=False))
        addr = outside_address()
        assert addr is not None
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://{addr}:{s.port}/health", timeout=10)
    finally:
        s.stop()


@pytest.fixture(scope="module")
def tiny(gguf):
    import herd

    llm = herd.load(gguf)
    s = InProcess(llm, max_batch=8, ctx=512)
    yield s, llm
    s.stop()


def _stream(url, path, body) -> tuple[dict[int, str], dict[int, str], list[dict]]:
    """(text by choice index, finish reason by index, every chunk) of a streamed answer."""
    texts, reasons, chunks = {}, {}, []
    with httpx.stream("POST", url + path, json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                chunks.append(chunk)
                for ch in chunk["choices"]:
                    piece = ch["delta"].get("content") if "delta" in ch else ch["text"]
                    texts[ch["index"]] = texts.get(ch["index"], "") + (piece or "")
                    if ch["finish_reason"]:
                        reasons[ch["index"]] = ch["finish_reason"]
    return texts, reasons, chunks


def test_n_choices_stream_as_they_answer_whole(tiny):
    """n=3 sampled with a seed: streamed, each index's text equals the same request answered whole, and choice i is
    the n=1 request with seed+i."""
    s, _ = tiny
    req = {"model": "m", "messages": [{"role": "user", "content": "Go"}], "max_tokens": 12, "temperature": 1.0,
           "seed": 7, "n": 3}
    whole = httpx.post(s.url + "/v1/chat/completions", json=req, timeout=120).json()
    texts, reasons, chunks = _stream(s.url, "/v1/chat/completions", req)
    assert sorted(texts) == [0, 1, 2] and len({c["id"] for c in chunks}) == 1
    assert [texts[i] for i in range(3)] == [c["message"]["content"] for c in whole["choices"]]
    assert [reasons[i] for i in range(3)] == [c["finish_reason"] for c in whole["choices"]]
    assert len(set(texts.values())) > 1  # the choices are sampled apart
    for i in range(3):
        one = httpx.post(s.url + "/v1/chat/completions", json={**req, "n": 1, "seed": 7 + i}, timeout=120).json()
        assert one["choices"][0]["message"]["content"] == texts[i]


def test_completions_of_a_prompt_list_and_of_token_ids(tiny):
    """A list of two text prompts with n=2 gives four choices, choice c answering prompt c // 2 as that prompt alone
    does; the same prompts as token ids (one list, and a list of lists) give the same answers, streamed too."""
    s, llm = tiny
    prompts = ["The sky is", "Once upon a time"]
    base = {"model": "m", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    alone = [httpx.post(s.url + "/v1/completions", json={**base, "prompt": p}, timeout=120).json()
             ["choices"][0]["text"] for p in prompts]
    r = httpx.post(s.url + "/v1/completions", json={**base, "prompt": prompts, "n": 2}, timeout=120).json()
    assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in r["choices"]] == [alone[0], alone[0], alone[1], alone[1]]
    ids = [llm.encode_prompt(p, raw=True) for p in prompts]
    assert r["usage"]["prompt_tokens"] == sum(len(x) for x in ids)
    one = httpx.post(s.url + "/v1/completions", json={**base, "prompt": ids[1]}, timeout=120).json()
    assert one["choices"][0]["text"] == alone[1]
    both = httpx.post(s.url + "/v1/completions", json={**base, "prompt": ids}, timeout=120).json()
    assert [c["text"] for c in both["choices"]] == alone
    texts, _, _ = _stream(s.url, "/v1/completions", {**base, "prompt": ids, "n": 2})
    assert [texts[c] for c in range(4)] == [alone[0], alone[0], alone[1], alone[1]]

"""`herd serve` against the official `openai` client, each server a real `python -m herd serve` process on a free
loopback port: models, chat, streaming, completions with logprobs, JSON mode, a tool call, the API key, batch
invariance (16 concurrent requests vs each alone, and vs `herd generate`), prefix caching and metrics.
(The grammars behind JSON mode and tool calls: tests/test_grammar.py, tests/test_tool_grammar.py; the chat page is
tested in a real browser: tests/test_web_page.py.)"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

API_KEY = "test-key-123"
STARTUP_S = 180


# ------------------------------------------------------------------------------------------------- servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `python -m herd serve` child process; .url, .pid, .log() (its stderr so far)."""

    def __init__(self, model: str | Path, *args: str, api_key: str | None = None, served_name: str = "test-model",
                 env_key: str = ""):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.name, self.api_key = served_name, api_key
        self._err = tempfile.NamedTemporaryFile(prefix="herd-serve-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "herd", "serve", "--model", str(model), "--port", str(self.port),
               "--served-model-name", served_name, "--threads", "1", *args]
        if api_key:
            cmd += ["--api-key", api_key]
        env = dict(os.environ, HERD_API_KEY=env_key)  # never the caller's own key
        self.api_key = api_key or env_key or None
        self.proc = subprocess.Popen(cmd, stdout=self._err, stderr=subprocess.STDOUT, env=env,
                                     cwd=Path(__file__).resolve().parents[1])
        self.pid = self.proc.pid
        self._wait_ready()

    def log(self) -> str:
        return Path(self._err.name).read_text(errors="replace")[-4000:]

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"herd serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", headers=self.headers(), timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"herd serve did not answer /health within {STARTUP_S} s:\n{self.log()}")

    def client(self, **kw) -> "openai.OpenAI":
        kw.setdefault("api_key", self.api_key or "unused")
        return openai.OpenAI(base_url=self.url + "/v1", max_retries=0, timeout=300, **kw)

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics", headers=self.headers(), timeout=30).text
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(OSError):
            os.unlink(self._err.name)


@pytest.fixture(scope="module")
def server(smollm_gguf):
    """The default model behind an API key, a batch of 16."""
    s = Server(smollm_gguf, "--max-batch", "16", "--max-queue", "64", api_key=API_KEY)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def tiny31(tmp_path_factory):
    """A tiny random Llama 3.1 checkpoint (Meta format) with Meta's real Llama 3 tokenizer: its chat format defines
    JSON tool calls."""
    import llama_models
    import torch

    from herd.config import ModelConfig, RopeScaling
    from herd.formats import save_meta
    from herd.models.llama import build_model

    out = tmp_path_factory.mktemp("tiny31")
    torch.manual_seed(0)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, ffn_dim=160,
                      max_seq_len=1024, rope_theta=500000.0, family="llama3.1",
                      rope_scaling=RopeScaling(factor=8.0, original_max_position_embeddings=256))
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    save_meta(out, cfg, model.state_dict())
    shutil.copy(Path(llama_models.__file__).parent / "llama3" / "tokenizer.model", out / "tokenizer.model")
    return out


def chat(client, text: str, **kw):
    kw = {"model": "test-model", "max_tokens": 16, "temperature": 0, **kw}
    return client.chat.completions.create(messages=[{"role": "user", "content": text}], **kw)


def test_models_list_and_retrieve(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == ["test-model"]
    assert client.models.retrieve("test-model").id == "test-model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_chat_greedy_is_what_herd_generate_prints(client, smollm_gguf):
    question = "What is the capital of France?"
    r = chat(client, question, max_tokens=24)
    cli = subprocess.run([sys.executable, "-m", "herd", "generate", "--model", str(smollm_gguf), "--prompt", question,
                          "--max-tokens", "24", "--json", "--threads", "1"], capture_output=True, text=True,
                         timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert cli.returncode == 0, cli.stderr
    ref = json.loads(cli.stdout)
    assert r.choices[0].message.content == ref["text"]
    assert r.usage.completion_tokens == len(ref["output_ids"])
    assert r.usage.prompt_tokens == len(ref["prompt_ids"])
    assert r.choices[0].finish_reason == ref["finish_reason"]
    assert "Paris" in ref["text"]


def test_the_default_server_runs_the_blocks_and_answers_as_the_float_path(server, client, smollm_gguf):
    """`herd serve` with its default flags keeps the GGUF blocks (native decode over its paged cache, /health says
    so) and its greedy answers equal the float32 path's (`--dequantize`) on these prompts: the int16-activation
    arithmetic moves logits by ~1e-6 (KL ~5e-8), far from their top-2 margins here."""
    import herd

    health = httpx.get(server.url + "/health", headers=server.headers(), timeout=30).json()
    assert health.get("weights") == "gguf-blocks", health
    ref = herd.load(smollm_gguf, keep_quantized=False)
    for q in ("What is the capital of France?", "Name three colours.", "What is 2 + 2?"):
        got = chat(client, q, max_tokens=24).choices[0].message.content
        assert got == ref.generate(q, max_tokens=24).text, q


def test_streaming_chat_equals_the_whole_reply(client):
    kw = dict(max_tokens=20)
    whole = chat(client, "Name three fruits.", **kw)
    pieces, reasons, usage = [], [], None
    for chunk in chat(client, "Name three fruits.", stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            pieces.append(ch.delta.content or "")
            reasons.append(ch.finish_reason)
    assert "".join(pieces) == whole.choices[0].message.content
    assert reasons[-1] == whole.choices[0].finish_reason and all(r is None for r in reasons[:-1])
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_stream_ends_with_done(server):
    body = {"model": "test-model", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=server.headers(),
                      timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


def test_completion_logprobs_match_a_full_forward(client, smollm_gguf):
    """Text completion of a raw prompt with logprobs=3 against herd's plain forward (no cache, no batching, no
    padding): greedy token by token, the same tokens, and logprobs equal to 1e-3."""
    import torch

    import herd

    prompt = "The three primary colors are"
    n = 8
    r = client.completions.create(model="test-model", prompt=prompt, max_tokens=n, temperature=0, logprobs=3)
    choice = r.choices[0]
    lp = choice.logprobs
    assert "".join(lp.tokens) == choice.text
    assert len(lp.token_logprobs) == len(lp.tokens) == len(lp.top_logprobs) == r.usage.completion_tokens == n
    llm = herd.load(smollm_gguf)
    ids = llm.encode_prompt(prompt, raw=True)
    assert r.usage.prompt_tokens == len(ids)
    out = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the server beside us has one thread too; two would fight on a small machine
    try:
        with torch.inference_mode():
            for k in range(n):
                logp = torch.log_softmax(llm.logits(ids + out)[-1], -1)
                t = int(torch.argmax(logp))
                out.append(t)
                assert lp.tokens[k] == llm.tokenizer.decode_bytes([t]).decode("utf-8", "replace")
                assert abs(float(logp[t]) - lp.token_logprobs[k]) < 1e-3
                top = lp.top_logprobs[k]
                assert len(top) == 3 and max(top.values()) == pytest.approx(lp.token_logprobs[k])
    finally:
        torch.set_num_threads(threads)


def test_chat_logprobs_shape(client):
    r = chat(client, "Say yes.", max_tokens=5, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(c.token for c in content) == r.choices[0].message.content
    for c in content:
        assert c.logprob <= 0 and len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.logprob - 1e-6
        assert bytes(c.bytes).decode("utf-8", "replace") == c.token


def test_json_mode_gives_a_json_object(client):
    r = chat(client, "Give me a JSON object describing a cat with name and age.", max_tokens=120,
             temperature=0.8, seed=3, response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_stop_strings_and_seeded_sampling(client):
    free = chat(client, "Name five animals.", max_tokens=24).choices[0].message.content
    words = free.split()
    assert len(words) >= 4, free
    stop = words[3]
    r = chat(client, "Name five animals.", max_tokens=24, stop=[stop])
    assert r.choices[0].message.content == free[:free.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    a = chat(client, "Tell me a story.", max_tokens=12, temperature=0.9, seed=42, n=2)
    b = chat(client, "Tell me a story.", max_tokens=12, temperature=0.9, seed=42, n=2)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert [c.index for c in a.choices] == [0, 1]


def test_tools_need_a_chat_format_that_defines_them(client):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    with pytest.raises(openai.BadRequestError, match="defines no tool calling"):
        chat(client, "hi", tools=tools)


def test_tool_call_with_a_llama31_chat_format(tiny31):
    """Llama 3.1's chat format defines JSON tool calls; with tool_choice naming the function the reply is
    constrained to that call, and the client gets it as message.tool_calls (streaming too). This server takes its
    key from HERD_API_KEY."""
    s = Server(tiny31, "--max-batch", "4", env_key="key-from-env")
    try:
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="wrong").models.list()
        c = s.client()
        tools = [{"type": "function", "function": {
            "name": "get_weather", "description": "Current weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
        msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
        choice = {"type": "function", "function": {"name": "get_weather"}}
        r = c.chat.completions.create(model="test-model", messages=msgs, tools=tools, tool_choice=choice,
                                      max_tokens=60, temperature=0)
        m = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls"
        assert m.tool_calls[0].type == "function" and m.tool_calls[0].function.name == "get_weather"
        assert isinstance(json.loads(m.tool_calls[0].function.arguments), dict)
        calls = []
        for chunk in c.chat.completions.create(model="test-model", messages=msgs, tools=tools, tool_choice=choice,
                                               max_tokens=60, temperature=0, stream=True):
            for ch in chunk.choices:
                calls += ch.delta.tool_calls or []
        assert calls[0].function.name == "get_weather"
        assert calls[0].function.arguments == m.tool_calls[0].function.arguments
        # the call goes back in as history with its result, and the format accepts it
        follow = msgs + [m.model_dump(exclude_none=True),
                         {"role": "tool", "tool_call_id": m.tool_calls[0].id, "content": '{"temp_c": 21}'}]
        r2 = c.chat.completions.create(model="test-model", messages=follow, tools=tools, max_tokens=4,
                                       temperature=0)
        assert r2.choices[0].finish_reason in ("stop", "length", "tool_calls")
    finally:
        s.stop()


def test_api_key_is_required(server):
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong-key").models.list()
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "test-model", "messages": []}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    for path in ("/metrics", "/v1/models"):
        assert httpx.get(server.url + path, timeout=30).status_code == 401
    for path in ("/health", "/v1/health"):  # public (liveness probes carry no key), the status alone
        r = httpx.get(server.url + path, timeout=30)
        assert r.status_code == 200 and set(r.json()) == {"status"}
    page = httpx.get(server.url + "/", timeout=30)  # the page itself carries no data; it asks for the key
    assert page.status_code == 200


# ------------------------------------------------------------------------------------------------- batching
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers.",
             "Who wrote Hamlet?", "Explain gravity in one sentence.", "What is 2+2?", "Name a color.",
             "Say hello in Spanish.", "Why is the sky blue?", "Give me a synonym for happy.",
             "What is the boiling point of water?", "Translate 'cat' to French.",
             "Tell me a fun fact about octopuses, please, in detail.", "What day comes after Monday?",
             "Recommend a book.", "How many legs does a spider have?"]


def test_batch_invariance_16_concurrent_vs_alone(client):
    """16 concurrent greedy requests of mixed prompt and output lengths give exactly what each gives alone:
    the same text and bit-identical logprobs."""
    jobs = [(q, 3 + (i * 5) % 11) for i, q in enumerate(QUESTIONS)]

    def ask(q, n):
        r = chat(client, q, max_tokens=n, logprobs=True)
        return r.choices[0].message.content, [t.logprob for t in r.choices[0].logprobs.content]

    alone = [ask(q, n) for q, n in jobs]
    together: list = [None] * len(jobs)
    barrier = threading.Barrier(len(jobs))

    def worker(i):
        barrier.wait()
        together[i] = ask(*jobs[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert together == alone


def test_shared_system_prompt_is_prefilled_once(client, server):
    system = ("You are a meticulous assistant for a shipping company. Answer briefly, cite the relevant policy "
              "number, and never invent tracking numbers. Policies: 1. Refunds within 30 days. 2. Free returns "
              "for damaged goods. 3. Express shipping costs extra. 4. Orders ship on weekdays only.")
    hits0 = server.metric("herd_prefix_cache_hit_tokens_total")
    computed0 = server.metric("herd_prefill_tokens_total")
    usage = []
    for q in ("Can I return a broken mug?", "When will my order ship?"):
        r = client.chat.completions.create(model="test-model", max_tokens=4, temperature=0, messages=[
            {"role": "system", "content": system}, {"role": "user", "content": q}])
        usage.append(r.usage.prompt_tokens)
    hits = server.metric("herd_prefix_cache_hit_tokens_total") - hits0
    computed = server.metric("herd_prefill_tokens_total") - computed0
    assert hits >= 48  # the second request found the system prompt's full pages (16 tokens each) cached
    assert computed == sum(usage) - hits


def test_health_metrics_and_page(server, client):
    chat(client, "Hi", max_tokens=2)
    h = httpx.get(server.url + "/health", headers=server.headers(), timeout=30).json()
    assert h["status"] == "ok" and h["model"] == "test-model"
    text = httpx.get(server.url + "/metrics", headers=server.headers(), timeout=30).text
    for name in ("herd_requests_total", "herd_prompt_tokens_total", "herd_generation_tokens_total",
                 "herd_queue_depth", "herd_time_to_first_token_seconds_bucket",
                 "herd_time_per_output_token_seconds_bucket", "herd_kv_pages_used"):
        assert name in text
    assert server.metric("herd_time_to_first_token_seconds_count") >= 1
    assert 'endpoint="/v1/chat/completions",status="200"' in text
    page = httpx.get(server.url + "/", timeout=30).text + httpx.get(server.url + "/static/chat.js", timeout=30).text
    for needle in ("<textarea id=\"system\"", "/v1/chat/completions", "id=\"stop\"", "id=\"regen\"", "/v1/models",
                   "stream: true"):
        assert needle in page


METRIC_TYPES = {
    "herd_requests_total": "counter", "herd_prompt_tokens_total": "counter",
    "herd_generation_tokens_total": "counter", "herd_queue_depth": "gauge", "herd_running_requests": "gauge",
    "herd_kv_pages_used": "gauge", "herd_kv_pages_total": "gauge", "herd_kv_cache_bytes": "gauge",
    "herd_prefix_cache_hit_tokens_total": "counter", "herd_prefill_tokens_total": "counter",
    "herd_preemptions_total": "counter", "herd_rejected_requests_total": "counter",
    "herd_cancelled_requests_total": "counter", "herd_time_to_first_token_seconds": "histogram",
    "herd_time_per_output_token_seconds": "histogram", "herd_request_duration_seconds": "histogram",
    "herd_prefill_chunks_total": "counter", "herd_spec_draft_tokens_total": "counter",
    "herd_spec_accepted_tokens_total": "counter", "herd_spec_proposed_by_position_total": "counter",
    "herd_spec_accepted_by_position_total": "counter"}


def test_metrics_names_types_and_labels_are_herds_own(server, client):
    """/metrics holds exactly herd's families with their types, in Prometheus' text format (no `_created`
    series), requests labelled by endpoint and status."""
    chat(client, "Hi", max_tokens=2)
    r = httpx.get(server.url + "/metrics", headers=server.headers(), timeout=30)
    assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    types = dict(line.split()[2:4] for line in r.text.splitlines() if line.startswith("# TYPE "))
    assert types == METRIC_TYPES
    samples = [line for line in r.text.splitlines() if line and not line.startswith("#")]
    assert not [s for s in samples if "_created" in s]
    requests = [s for s in samples if s.startswith("herd_requests_total{")]
    assert requests and all(s.startswith('herd_requests_total{endpoint="') and '",status="' in s for s in requests)


def test_two_apps_in_one_process_keep_their_own_metrics():
    """Each app's metrics live in its own registry: a second one neither collides with nor sees the first's."""
    from herd.server.metrics import Metrics

    snap = dict(waiting=0, running=0, pages_used=0, pages_total=4, kv_bytes=64, prefix_hit_tokens=0,
                prefill_tokens=0, preempted=0, rejected=0, cancelled=0)
    a, b = Metrics(lambda: snap), Metrics(lambda: snap)
    a.count("/v1/completions", 200)
    a.prompt_tokens.inc(5)
    text_a, text_b = a.render().decode(), b.render().decode()
    assert 'herd_requests_total{endpoint="/v1/completions",status="200"} 1.0' in text_a
    assert "herd_prompt_tokens_total 5.0" in text_a and "herd_prompt_tokens_total 0.0" in text_b
    assert "herd_requests_total{" not in text_b and "herd_kv_pages_total 4.0" in text_b

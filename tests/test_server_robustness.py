"""`herd serve` under abuse: malformed bodies, wrong types, impossible limits, unknown models, over-long prompts,
clients that vanish mid-stream, and 64 concurrent streams against a small queue. Every request gets a proper
answer or a 4xx in the OpenAI error shape, and the server keeps serving with bounded memory afterwards."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from test_server import Server

httpx = pytest.importorskip("httpx")

CTX = 512
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def server(smollm_gguf):
    """A small server: batch 8, queue 24, context 512."""
    s = Server(smollm_gguf, "--max-batch", "8", "--max-queue", "24", "--ctx", str(CTX))
    yield s
    s.stop()


def msg(text="Hi", **kw):
    return {"model": "test-model", "messages": [{"role": "user", "content": text}], "max_tokens": 4,
            "temperature": 0, **kw}


def post(server, path, body=None, *, content=None, headers=None):
    h = {"content-type": "application/json", **(headers or {})}
    return httpx.post(server.url + path, json=body, content=content, headers=h, timeout=120)


def error_of(r, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str) and err["message"]
    return err


BAD_BODIES = [
    (b"{", "not valid JSON"),
    (b"", "empty"),
    (b"[]", "JSON object"),
    (b'"hello"', "JSON object"),
    (b"\xff\xfe{}", "not valid JSON"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode(), "model"),
    (json.dumps({"model": "test-model"}).encode(), "messages"),
    (json.dumps({"model": "test-model", "messages": []}).encode(), "messages"),
    (json.dumps({"model": "test-model", "messages": "hi"}).encode(), "messages"),
    (json.dumps({"model": "test-model", "messages": [{"role": "wizard", "content": "x"}]}).encode(), "role"),
    (json.dumps({"model": "test-model", "messages": [{"content": "x"}]}).encode(), "role"),
    (json.dumps(msg(temperature="hot")).encode(), "temperature"),
    (json.dumps(msg(temperature=-1)).encode(), "temperature"),
    (json.dumps(msg(temperature=3.5)).encode(), "temperature"),
    (json.dumps(msg(max_tokens="5")).encode(), "max_tokens"),
    (json.dumps(msg(max_tokens=1.5)).encode(), "max_tokens"),
    (json.dumps(msg(max_tokens=-1)).encode(), "max_tokens"),
    (json.dumps(msg(max_tokens=True)).encode(), "max_tokens"),
    (json.dumps(msg(n=0)).encode(), "n"),
    (json.dumps(msg(n=1000)).encode(), "n"),
    (json.dumps(msg(top_p=1.5)).encode(), "top_p"),
    (json.dumps(msg(stream="yes")).encode(), "stream"),
    (json.dumps(msg(stop=["a", "b", "c", "d", "e"])).encode(), "stop"),
    (json.dumps(msg(stop=[""])).encode(), "stop"),
    (json.dumps(msg(top_logprobs=3)).encode(), "top_logprobs"),
    (json.dumps(msg(top_logprobs=99, logprobs=True)).encode(), "top_logprobs"),
    (json.dumps(msg(logit_bias={"abc": 1})).encode(), "logit_bias"),
    (json.dumps(msg(logit_bias={"99999999": 1})).encode(), "vocabulary"),
    (json.dumps(msg(frobnicate=1)).encode(), "frobnicate"),
    (json.dumps(msg(response_format={"type": "xml"})).encode(), "response_format"),
    (json.dumps(msg(response_format={"type": "json_schema", "json_schema": {}})).encode(), "json_schema"),
    (json.dumps(msg(tool_choice="required")).encode(), "tool"),
    (json.dumps({**msg(), "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}).encode(), "takes no images"),
    (json.dumps({**msg(), "messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]}).encode(), "unsupported content"),
    (json.dumps({"model": "test-model", "messages": [{"role": "user", "content": 5}]}).encode(), "content"),
    (json.dumps({**msg(), "seed": 2 ** 80}).encode(), "seed"),
]


@pytest.mark.parametrize("body, needle", BAD_BODIES, ids=[f"bad{i}" for i in range(len(BAD_BODIES))])
def test_malformed_bodies_get_a_400_that_says_why(server, body, needle):
    err = error_of(post(server, CHAT, content=body), 400)
    assert needle.lower() in err["message"].lower(), err


@pytest.mark.parametrize("body, needle", [
    ({"model": "test-model", "prompt": []}, "prompt"),
    ({"model": "test-model", "prompt": [[]]}, "prompt"),
    ({"model": "test-model", "prompt": [1, "a"]}, "prompt"),
    ({"model": "test-model", "prompt": [10 ** 9]}, "vocabulary"),
    ({"model": "test-model", "prompt": "x", "suffix": "y"}, "suffix"),
    ({"model": "test-model", "prompt": "x", "best_of": 3}, "best_of"),
])
def test_bad_completion_requests(server, body, needle):
    err = error_of(post(server, "/v1/completions", body), 400)
    assert needle in err["message"], err


def test_limits_models_and_routes(server):
    err = error_of(post(server, CHAT, msg(max_tokens=10 ** 9)), 400)
    assert err["code"] == "context_length_exceeded" and str(CTX) in err["message"]
    err = error_of(post(server, CHAT, msg(model="gpt-4")), 404)
    assert err["code"] == "model_not_found" and "gpt-4" in err["message"]
    err = error_of(post(server, "/v1/completions", {"model": "nope", "prompt": "x"}), 404)
    assert err["code"] == "model_not_found"
    error_of(httpx.get(server.url + "/v1/nothing", timeout=30), 404)
    error_of(httpx.get(server.url + CHAT, timeout=30), 405)
    error_of(httpx.post(server.url + CHAT, content=b"x" * (9 << 20), timeout=60), 413)


def test_over_long_prompt_is_refused_not_truncated(server):
    text = "word " * (CTX + 50)
    err = error_of(post(server, CHAT, msg(text)), 400)
    assert err["code"] == "context_length_exceeded" and f"maximum context length is {CTX}" in err["message"]
    err = error_of(post(server, "/v1/completions", {"model": "test-model", "prompt": text}), 400)
    assert err["code"] == "context_length_exceeded"
    # a prompt that fits but leaves less room than max_tokens asks for is refused too, naming both numbers
    near = "word " * (CTX - 60)
    err = error_of(post(server, "/v1/completions", {"model": "test-model", "prompt": near, "max_tokens": 100}), 400)
    assert "100 in the completion" in err["message"]


def test_zero_and_exact_limits_are_answered(server):
    r = post(server, "/v1/completions", {"model": "test-model", "prompt": "Hello", "max_tokens": 0, "echo": True})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "Hello"
    assert r.json()["choices"][0]["finish_reason"] == "length"
    r = post(server, CHAT, msg(max_completion_tokens=1, max_tokens=50))
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 1


def stream_body(text="Write a very long story about a dragon.", n=200):
    return {**msg(text, max_tokens=n), "stream": True}


def test_client_disconnect_mid_stream_frees_its_row(server):
    cancelled0 = server.metric("herd_cancelled_requests_total")
    with httpx.stream("POST", server.url + CHAT, json=stream_body(), timeout=120) as r:
        assert r.status_code == 200
        got = 0
        for line in r.iter_lines():
            got += line.startswith("data: ")
            if got >= 3:
                break  # leave while the server still has ~200 tokens to go
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if server.metric("herd_running_requests") == 0 and \
                server.metric("herd_cancelled_requests_total") > cancelled0:
            break
        time.sleep(0.2)
    assert server.metric("herd_running_requests") == 0
    assert server.metric("herd_cancelled_requests_total") > cancelled0
    assert server.metric("herd_kv_pages_used") == 0
    r = post(server, CHAT, msg())
    assert r.status_code == 200


def test_non_streaming_client_that_leaves_is_cancelled(server):
    cancelled0 = server.metric("herd_cancelled_requests_total")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + CHAT, json=msg("Write a long poem.", max_tokens=300), timeout=1.5)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and server.metric("herd_cancelled_requests_total") <= cancelled0:
        time.sleep(0.2)
    assert server.metric("herd_cancelled_requests_total") > cancelled0
    assert server.metric("herd_running_requests") == 0


def test_a_queued_client_that_leaves_gives_up_its_place_at_once(server):
    """Eight long streams fill every row; a ninth waits in the queue. When the ninth client hangs up, its request
    leaves the queue while the eight are still running, and when they hang up their rows are freed."""

    async def metric(c, name):
        text = (await c.get(server.url + "/metrics")).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))

    async def main():
        release = asyncio.Event()
        started = []

        async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=20)) as c:
            async def long_stream(i):
                async with c.stream("POST", server.url + CHAT, json=stream_body(f"Story {i}:", n=400)) as r:
                    async for line in r.aiter_lines():  # keep reading until released, then hang up
                        if i not in started and '"content":"' in line and '"content":""' not in line:
                            started.append(i)  # a token arrived: this request holds a row
                        if release.is_set():
                            break

            tasks = [asyncio.ensure_future(long_stream(i)) for i in range(8)]
            while len(started) < 8:
                await asyncio.sleep(0.1)
            async with c.stream("POST", server.url + CHAT, json=stream_body("Queued", n=5)) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        break  # accepted: the role chunk comes at once, the request is queued
                queued = await metric(c, "herd_queue_depth")
            t0 = time.monotonic()
            while await metric(c, "herd_queue_depth") and time.monotonic() - t0 < 10:
                await asyncio.sleep(0.05)
            left_queue_s = time.monotonic() - t0
            after = await metric(c, "herd_queue_depth"), await metric(c, "herd_running_requests")
            release.set()
            await asyncio.gather(*tasks)
            t0 = time.monotonic()
            while await metric(c, "herd_running_requests") and time.monotonic() - t0 < 10:
                await asyncio.sleep(0.05)
            return queued, after, left_queue_s, await metric(c, "herd_running_requests")

    queued, (depth, running), left_queue_s, running_end = asyncio.run(main())
    assert queued == 1 and depth == 0 and running == 8, (queued, depth, running)
    assert left_queue_s < 5
    assert running_end == 0 and server.metric("herd_kv_pages_used") == 0


async def _one_stream(client: "httpx.AsyncClient", url: str, i: int) -> tuple[int, str]:
    body = stream_body(f"Tell me fact number {i} about the moon.", n=6)
    async with client.stream("POST", url + CHAT, json=body) as r:
        if r.status_code != 200:
            data = await r.aread()
            return r.status_code, json.dumps({"body": json.loads(data), "retry": r.headers.get("retry-after")})
        lines = [line async for line in r.aiter_lines() if line]
        return 200, lines[-1] if lines else ""


def test_64_concurrent_streams_get_answers_or_429_and_memory_stays_bounded(server):
    post(server, CHAT, msg())  # warm up: the first request pays one-time costs
    rss0 = server.rss_mib()

    async def main():
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(timeout=300, limits=limits) as c:
            return await asyncio.gather(*[_one_stream(c, server.url, i) for i in range(64)])

    results = asyncio.run(main())
    ok = [r for r in results if r[0] == 200]
    busy = [r for r in results if r[0] == 429]
    assert len(ok) + len(busy) == 64, [r for r in results if r[0] not in (200, 429)]
    assert all(last == "data: [DONE]" for _, last in ok)
    assert len(ok) >= 8 + 24 - 8  # at least the batch and most of the queue were served
    assert busy, "64 streams against 8 rows + 24 queued must overflow the queue"
    for _, info in busy:
        info = json.loads(info)
        assert info["retry"] and int(info["retry"]) >= 1
        assert info["body"]["error"]["type"] == "rate_limit_error"
    assert server.metric("herd_rejected_requests_total") >= len(busy)
    # still serving, nothing left running, KV pages all back, memory bounded
    assert post(server, CHAT, msg()).status_code == 200
    assert server.metric("herd_running_requests") == 0 and server.metric("herd_queue_depth") == 0
    assert server.metric("herd_kv_pages_used") == 0
    assert server.rss_mib() - rss0 < 300


@pytest.mark.slow
def test_soak_mixed_traffic_keeps_memory_flat(server):
    """Ten rounds of 40 mixed requests (streams, some abandoned, bad bodies, completions): RSS after the last round
    stays within 100 MiB of the RSS after the first."""

    async def round_(k):
        async with httpx.AsyncClient(timeout=300) as c:
            async def abandon(i):
                async with c.stream("POST", server.url + CHAT, json=stream_body(n=100)) as r:
                    async for _ in r.aiter_lines():
                        return r.status_code
                return r.status_code

            jobs = []
            for i in range(40):
                if i % 4 == 0:
                    jobs.append(abandon(i))
                elif i % 4 == 1:
                    jobs.append(c.post(server.url + CHAT, content=b'{"model": 1}'))
                elif i % 4 == 2:
                    jobs.append(c.post(server.url + "/v1/completions",
                                       json={"model": "test-model", "prompt": f"{k} {i}", "max_tokens": 5}))
                else:
                    jobs.append(_one_stream(c, server.url, i))
            return await asyncio.gather(*jobs, return_exceptions=True)

    rss = []
    for k in range(10):
        results = asyncio.run(round_(k))
        assert not [r for r in results if isinstance(r, Exception)]
        time.sleep(1)
        rss.append(server.rss_mib())
    assert rss[-1] - rss[0] < 100, rss
    assert post(server, CHAT, msg()).status_code == 200

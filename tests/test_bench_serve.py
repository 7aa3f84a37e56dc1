"""`herd bench serve` against a fake OpenAI streaming server on 127.0.0.1 whose timings are known.

The fake server answers the k-th chat request (in arrival order) after TTFT_S (SLOW_TTFT_S for odd k), then one
token every ITL_S; every 4th request (k = 3, 7, ...) gets an HTTP 500. The metric arithmetic itself is checked
exactly on hand-made results; the end-to-end figures are checked against the server's delays with tolerances wide
enough for a busy 2-core machine and narrow enough to tell a fast request from a slow one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import threading
import time

import pytest

uvicorn = pytest.importorskip("uvicorn")
from starlette.applications import Starlette  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse, StreamingResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402

from herd.errors import ConfigError  # noqa: E402
from herd.eval import bench_serve  # noqa: E402
from herd.eval.bench_serve import SLO, RequestResult, ServeBench, percentile, summarize  # noqa: E402

TTFT_S, SLOW_TTFT_S, ITL_S = 0.05, 0.25, 0.01
TEMPLATE_TOKENS = 5  # what the fake "chat template" adds to the prompt's word count in `usage`


class FakeServer:
    """A streaming /v1/chat/completions and /v1/models in a uvicorn thread; records every request body."""

    def __init__(self, *, fail_every: int | None = 4, slow_odd: bool = True, usage: bool = True,
                 tokens_per_chunk: int = 1, hang: bool = False):
        self.fail_every, self.slow_odd, self.usage = fail_every, slow_odd, usage
        self.tokens_per_chunk, self.hang = tokens_per_chunk, hang
        self.bodies: list[dict] = []
        app = Starlette(routes=[Route("/v1/models", self.models),
                                Route("/v1/chat/completions", self.chat, methods=["POST"])])
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="error", lifespan="off",
                                                    timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "fake server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=5)
        self.sock.close()

    async def models(self, request: Request):
        return JSONResponse({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    async def chat(self, request: Request):
        body = await request.json()
        k = len(self.bodies)
        self.bodies.append(body)
        if self.fail_every and k % self.fail_every == self.fail_every - 1:
            return JSONResponse({"error": {"message": "boom"}}, status_code=500)
        ttft = SLOW_TTFT_S if self.slow_odd and k % 2 else TTFT_S
        n_out = body["max_tokens"]
        n_prompt = len(body["messages"][0]["content"].split()) + TEMPLATE_TOKENS

        def sse(obj) -> bytes:
            return f"data: {json.dumps(obj)}\n\n".encode()

        async def events():
            yield sse({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})  # role only: not a token
            await asyncio.sleep(ttft)
            if self.hang:
                await asyncio.sleep(30)
            sent = 0
            while sent < n_out:
                if sent:
                    await asyncio.sleep(ITL_S)
                step = min(self.tokens_per_chunk, n_out - sent)
                yield sse({"choices": [{"index": 0, "delta": {"content": " tok" * step}}]})
                sent += step
            if self.usage and (body.get("stream_options") or {}).get("include_usage"):
                yield sse({"choices": [], "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_out,
                                                    "total_tokens": n_prompt + n_out}})
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")


# ------------------------------------------------------------------------------------------------ pure metrics
def test_percentile_matches_linear_interpolation():
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.5
    assert percentile([10.0], 99) == 10.0
    assert percentile([0.0, 100.0], 99) == pytest.approx(99.0)


def test_summarize_exact_on_known_results():
    fast = RequestResult(ok=True, prompt_tokens=10, output_tokens=5, usage_reported=True, ttft=0.1,
                         itl=[0.02] * 4, e2el=0.18)
    slow = RequestResult(ok=True, prompt_tokens=10, output_tokens=3, usage_reported=True, ttft=0.5,
                         itl=[0.1, 0.1], e2el=0.7)
    failed = RequestResult(error="HTTP 500: boom")
    r = summarize([fast, slow, failed], duration_s=2.0, concurrency=2, slo=SLO(ttft_ms=200))
    assert (r["completed"], r["failed"], r["errors"]) == (2, 1, {"HTTP 500: boom": 1})
    assert (r["total_input_tokens"], r["total_output_tokens"], r["token_counts_from"]) == (20, 8, "usage")
    assert r["request_throughput"] == 1.0
    assert r["output_tokens_per_s"] == 4.0 and r["total_tokens_per_s"] == 14.0
    assert r["ttft_ms"]["mean"] == pytest.approx(300) and r["ttft_ms"]["p50"] == pytest.approx(300)
    assert r["ttft_ms"]["p99"] == pytest.approx(100 + 400 * 0.99)
    # TPOT: (0.18 - 0.1) / 4 = 20 ms and (0.7 - 0.5) / 2 = 100 ms
    assert r["tpot_ms"]["mean"] == pytest.approx(60)
    assert r["itl_ms"]["mean"] == pytest.approx((4 * 20 + 2 * 100) / 6)
    assert r["e2el_ms"]["p50"] == pytest.approx(440)
    assert r["goodput"] == 0.5  # only the fast request meets TTFT <= 200 ms
    assert summarize([fast, slow], 2.0, 2, SLO(tpot_ms=50))["goodput"] == 0.5
    assert summarize([fast, slow], 2.0, 2)["goodput"] is None  # no SLO, no goodput


# ------------------------------------------------------------------------------------------------ end to end
def test_metrics_against_known_server_timings():
    with FakeServer() as srv:
        bench = ServeBench(url=srv.url + "/v1/", concurrency=(4,), requests=8, input_len=16, output_len=5,
                           warmup=0, slo=SLO(ttft_ms=150), timeout_s=10)
        (r,) = bench.run()
        bodies = srv.bodies
    assert len(bodies) == 8
    assert all(b["model"] == "fake-model" and b["max_tokens"] == 5 and b["ignore_eos"] is True
               and b["stream"] is True and b["stream_options"] == {"include_usage": True} for b in bodies)
    prompts = [b["messages"][0]["content"] for b in bodies]
    assert len(set(prompts)) == 8 and all(len(p.split()) == 16 for p in prompts)

    # arrivals 3 and 7 fail; 1 and 5 are slow; 0, 2, 4, 6 are fast
    assert (r["completed"], r["failed"]) == (6, 2)
    assert list(r["errors"]) == ['HTTP 500: {"error":{"message":"boom"}}']
    assert r["total_output_tokens"] == 6 * 5 and r["token_counts_from"] == "usage"
    assert r["total_input_tokens"] == 6 * (16 + TEMPLATE_TOKENS)
    d = r["duration_s"]
    assert 0.25 < d < 3.0  # at least one slow request (0.25 s to its first token), then 4 more tokens
    assert r["request_throughput"] * d == pytest.approx(6)
    assert r["output_tokens_per_s"] * d == pytest.approx(30)
    assert r["total_tokens_per_s"] * d == pytest.approx(30 + 6 * 21)
    ttft = r["ttft_ms"]
    assert 45 <= ttft["p50"] < 150          # 4 of the 6 are fast
    assert 245 <= ttft["p99"] < 400         # the slow ones
    assert 110 <= ttft["mean"] < 250        # (4 x 50 + 2 x 250) / 6 = 117
    assert 9 <= r["itl_ms"]["p50"] < 40 and 9 <= r["tpot_ms"]["mean"] < 40
    assert 280 <= r["e2el_ms"]["p99"] < 500
    assert r["goodput"] * d == pytest.approx(4)  # the fast ones meet TTFT <= 150 ms
    assert r["slo"] == {"ttft_ms": 150, "tpot_ms": None, "e2el_ms": None}


def test_counts_chunks_without_usage_and_bounds_each_request():
    with FakeServer(fail_every=None, slow_odd=False, usage=False, tokens_per_chunk=2) as srv:
        (r,) = ServeBench(url=srv.url, model="m", concurrency=(2,), requests=2, input_len=8, output_len=6,
                          warmup=0).run()
    # 6 tokens in 3 chunks of 2: without usage the client can only count the chunks; input is the word count
    assert r["completed"] == 2 and r["total_output_tokens"] == 2 * 3 and r["total_input_tokens"] == 2 * 8
    assert r["token_counts_from"] == "chunks and words"
    assert 9 <= r["itl_ms"]["mean"] < 40  # gaps between chunks, not tokens

    with FakeServer(fail_every=None, slow_odd=False, hang=True) as srv:
        t0 = time.perf_counter()
        (r,) = ServeBench(url=srv.url, model="m", concurrency=(2,), requests=2, input_len=4, output_len=2,
                          warmup=0, timeout_s=0.4).run()
        assert time.perf_counter() - t0 < 3
    assert (r["completed"], r["failed"]) == (0, 2) and r["errors"] == {"timeout after 0.4 s": 2}
    assert r["ttft_ms"] == {"mean": None, "p50": None, "p99": None} and r["request_throughput"] == 0


def test_cli_json_one_object_per_level(capsys):
    parser = argparse.ArgumentParser()
    bench_serve.register(parser.add_subparsers(dest="bench_command"))
    with FakeServer(fail_every=None, slow_odd=False) as srv:
        args = parser.parse_args(["serve", "--url", srv.url, "--concurrency", "1,3", "--requests", "3",
                                  "--input-len", "4", "--output-len", "3", "--json", "--slo-tpot-ms", "500",
                                  "--extra-body", '{"min_tokens": 3}', "--api-key", "k"])
        args.func(args)
        bodies = srv.bodies
    lines = capsys.readouterr().out.strip().splitlines()
    reports = [json.loads(line) for line in lines]
    assert [r["concurrency"] for r in reports] == [1, 3]
    for r in reports:
        for key in ("completed", "request_throughput", "output_tokens_per_s", "total_tokens_per_s", "goodput"):
            assert isinstance(r[key], (int, float)), key
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
            assert set(r[key]) == {"mean", "p50", "p99"} and all(v > 0 for v in r[key].values()), key
        assert r["completed"] == 3 and r["goodput"] == pytest.approx(r["request_throughput"])
    assert len(bodies) == 1 + 2 * 3  # one warm-up, then three per level
    assert all(b["min_tokens"] == 3 for b in bodies)


def test_text_report_and_refusals():
    with FakeServer(fail_every=None, slow_odd=False) as srv:
        (r,) = ServeBench(url=srv.url, concurrency=(1,), requests=1, input_len=2, output_len=2).run()
    text = bench_serve.format_report(r)
    assert "concurrency 1" in text and "Median TTFT (ms):" in text and "no SLO set" in text

    with FakeServer(fail_every=1) as srv, pytest.raises(ConfigError, match="warm-up request .* HTTP 500"):
        ServeBench(url=srv.url, concurrency=(1,), requests=1).run()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"  # bound, not listening: connection refused
        with pytest.raises(ConfigError, match="/v1/models did not name a model"):
            ServeBench(url=dead, concurrency=(1,), timeout_s=2).run()

"""The server's OpenAPI schema (/openapi.json) fuzzed with schemathesis against a real `herd serve` process: every
route, requests that fit the schema and requests that break it, 500+ in all. None may get a 5xx or hang (each has a
timeout), and afterwards the server is idle, holds no KV page, and its memory has stayed bounded."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings

from test_server_faults import tiny_gguf
from test_server_flags import Proc

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is in the `test` extra")
from schemathesis import GenerationMode  # noqa: E402

ROUTES = {("GET", "/health"), ("GET", "/v1/health"), ("GET", "/metrics"), ("GET", "/v1/models"),
          ("GET", "/v1/models/{name}"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
          ("POST", "/v1/embeddings"), ("POST", "/v1/rerank"), ("GET", "/v1/adapters"), ("POST", "/v1/adapters"),
          ("DELETE", "/v1/adapters/{name}")}
# examples per (route kind, mode): the POST routes hold the logic and get most
EXAMPLES = {("POST", GenerationMode.POSITIVE): 80, ("POST", GenerationMode.NEGATIVE): 40,
            ("GET", GenerationMode.POSITIVE): 20, ("DELETE", GenerationMode.POSITIVE): 20}
TIMEOUT_S = 60


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Proc(tiny_gguf(tmp_path_factory.getbasetemp()), "--ctx", "64", "--max-batch", "8", "--max-queue", "64")
    yield s
    s.stop()


def test_fuzzed_requests_on_every_route_get_no_server_error(server):
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json", headers=server.headers())
    ops = [r.ok() for r in schema.get_all_operations()]
    assert {(op.method.upper(), op.path) for op in ops} == ROUTES
    server.post("/v1/completions", {"model": "m", "prompt": "warm up", "max_tokens": 4})
    rss0 = rss_mib(server.proc.pid)
    statuses: Counter = Counter()
    errors: list[str] = []
    slowest = [0.0]
    t0 = time.monotonic()

    for op in ops:
        kind = op.method.upper()
        # a route with no body and no path parameter has no invalid request to make
        negative = kind == "POST"  # (any string is a valid path parameter)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE) if negative else (GenerationMode.POSITIVE,):
            @settings(max_examples=EXAMPLES[kind, mode], deadline=None, database=None, derandomize=True,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case):
                start = time.monotonic()
                r = case.call(base_url=server.url, headers=server.headers(), timeout=TIMEOUT_S)
                slowest[0] = max(slowest[0], time.monotonic() - start)
                statuses[r.status_code] += 1
                if r.status_code >= 500:
                    errors.append(f"{case.method} {case.formatted_path} {case.body!r:.300} -> {r.status_code} "
                                  f"{r.text[:300]}")

            run()

    total = sum(statuses.values())
    rss1 = rss_mib(server.proc.pid)
    print(f"\n{total} fuzzed requests in {time.monotonic() - t0:.0f} s, statuses {dict(sorted(statuses.items()))}, "
          f"slowest {slowest[0]:.1f} s, server errors {len(errors)}, RSS {rss0:.0f} -> {rss1:.0f} MiB")
    assert not errors, "\n".join(errors[:10])
    assert total >= 500
    assert slowest[0] < TIMEOUT_S
    h = server.get("/health").json()
    assert h["status"] == "ok" and h["running"] == 0 and h["waiting"] == 0
    assert server.metric("herd_kv_pages_used") == 0
    assert rss1 - rss0 < 200

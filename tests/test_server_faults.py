"""Faults injected into `herd serve`: a client that hangs up mid-stream, SIGTERM with requests in flight, a request
larger than the KV-cache budget, a client that reads one byte a second beside normal streams, and /health without
the key. The model is a tiny random Llama 3.1 (Meta's tokenizer, Q8_0 GGUF: the native kernels and decode step), so
that a fault, not the model, decides each outcome; servers run in this process (uvicorn in a thread, the engine's
pages read directly) except the SIGTERM one, which is a real `python -m herd serve` process."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

CHAT = "/v1/chat/completions"
KEY = "fault-key"


# ------------------------------------------------------------------------------------------------- the model
def tiny_gguf(base: Path) -> Path:
    """A tiny random Llama 3.1 (dim 64, 2 layers, Meta's 128k tokenizer) saved as Q8_0 GGUF under `base` (built
    once per session: other test files call this with the same base)."""
    out = base / "tiny31-q8_0.gguf"
    if out.exists():
        return out
    import llama_models

    from herd.config import ModelConfig, RopeScaling
    from herd.formats import save_meta
    from herd.formats.convert import convert
    from herd.models.llama import build_model

    meta = base / "tiny31-meta"
    meta.mkdir(exist_ok=True)
    torch.manual_seed(0)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, ffn_dim=160, max_seq_len=1024,
                      rope_theta=500000.0, family="llama3.1",
                      rope_scaling=RopeScaling(factor=8.0, original_max_position_embeddings=256))
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    save_meta(meta, cfg, model.state_dict())
    shutil.copy(Path(llama_models.__file__).parent / "llama3" / "tokenizer.model", meta / "tokenizer.model")
    tmp = convert(meta, base / "tiny31-q8_0.partial.gguf", to="gguf", quant="q8_0")
    tmp.rename(out)
    return out


@pytest.fixture(scope="module")
def gguf(tmp_path_factory) -> Path:
    return tiny_gguf(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def llm(gguf):
    import herd

    return herd.load(gguf)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class InProcess:
    """An app from create_app served by uvicorn in a thread of this process; .url, .state (ServerState), .engine."""

    def __init__(self, llm, *, api_key: str | None = None, **engine_kwargs):
        import uvicorn

        from herd.server.app import create_app

        self.app = create_app(llm, model_name="m", api_key=api_key, **engine_kwargs)
        self.state, self.engine = self.app.state, self.app.state.engine
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning",
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


def body(text="Tell me a story.", n_tokens=900, **kw):
    return {"model": "m", "messages": [{"role": "user", "content": text}], "max_tokens": n_tokens,
            "temperature": 0, "ignore_eos": True, **kw}


def wait_idle(engine, timeout=30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (engine.running or engine.waiting or engine._incoming or engine._cancels):
        time.sleep(0.02)


# ------------------------------------------------------------------------------------------------- disconnect
def test_client_gone_mid_stream_gives_back_its_rows_and_pages(llm):
    """A stream of 4 choices is cut after a few chunks: the engine cancels all 4, its free-page count and free rows
    return to their idle values, and nothing finished normally."""
    s = InProcess(llm, max_batch=4, ctx=1024)
    try:
        e = s.engine
        idle_pages, idle_rows = e.pool.available(), len(e.free_rows)
        finished0, cancelled0 = e.stats["finished"], e.stats["cancelled"]
        with httpx.stream("POST", s.url + CHAT, json=body(n=4, stream=True), timeout=60) as r:
            assert r.status_code == 200
            chunks = 0
            for line in r.iter_lines():
                chunks += '"content":"' in line and '"content":""' not in line
                if chunks >= 8:
                    held = e.pool.available()
                    break
        assert held < idle_pages  # the 4 rows held pages while streaming
        wait_idle(e)
        assert e.stats["cancelled"] - cancelled0 == 4 and e.stats["finished"] == finished0
        assert e.pool.available() == idle_pages and e.pool.used() == 0
        assert len(e.free_rows) == idle_rows
        assert httpx.post(s.url + CHAT, json=body(n_tokens=3), timeout=60).status_code == 200
    finally:
        s.stop()


# ------------------------------------------------------------------------------------------------- KV budget
def test_request_larger_than_the_kv_budget_is_refused_before_any_work(llm):
    """--kv-tokens 256 is the pool (not one model context of 1024 beside it): a request that cannot fit in it is a
    400 naming the budget, with no token computed and no page taken; one that fits is served."""
    from herd.errors import GenerationError

    s = InProcess(llm, max_batch=4, kv_tokens=256, page_size=16)
    try:
        e = s.engine
        assert (e.pool.n_pages - 1) * e.page_size == 256 and e.ctx < 256 and e.kv_limited
        wait_idle(e)
        before = dict(e.stats)
        long_prompt = " ".join(["word"] * 400)
        for b in (body(long_prompt, n_tokens=4), body("Hi", n_tokens=300)):
            r = httpx.post(s.url + CHAT, json=b, timeout=60)
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["code"] == "context_length_exceeded" and "KV-cache" in err["message"] and "256" in err["message"]
        r = httpx.post(s.url + "/v1/completions", json={"model": "m", "prompt": long_prompt}, timeout=60)
        assert r.status_code == 400 and "KV-cache" in r.json()["error"]["message"]
        for k in ("requests", "prompt_tokens", "prefill_tokens", "decode_tokens"):
            assert e.stats[k] == before[k], k  # refused before any work
        assert e.pool.used() == 0
        r = httpx.post(s.url + CHAT, json=body("Hi", n_tokens=e.ctx - 40), timeout=120)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == e.ctx - 40
    finally:
        s.stop()
    with pytest.raises(GenerationError, match="kv_tokens=256 cannot hold"):
        from herd.engine.scheduler import Engine

        Engine(llm.step(), llm.tokenizer, llm.stop_ids, ctx=512, kv_tokens=256)


# ------------------------------------------------------------------------------------------------- slow client
async def _stream_rate(url: str, text: str, n_tokens: int) -> tuple[float, int]:
    """(tokens per second after the first, tokens) of one greedy stream read as fast as it comes (with logprobs:
    a chunk for every token, also one whose text is an incomplete UTF-8 piece)."""
    async with httpx.AsyncClient(timeout=120) as c:
        async with c.stream("POST", url + CHAT, json=body(text, n_tokens, stream=True, logprobs=True)) as r:
            times = []
            async for line in r.aiter_lines():
                if '"logprobs":{"content"' in line:
                    times.append(time.monotonic())
    return (len(times) - 1) / (times[-1] - times[0]), len(times)


def _slow_reader(url: str, payload: dict, stop: threading.Event, got: list) -> None:
    """A client with a tiny receive buffer that reads one byte a second until `stop`."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    data = json.dumps(payload).encode()
    sock.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    sock.settimeout(2)
    try:
        while not stop.is_set():
            try:
                got.append(sock.recv(1))
            except TimeoutError:
                pass
            stop.wait(1.0)
    finally:
        sock.close()


def test_a_client_reading_one_byte_a_second_does_not_stall_other_streams(llm):
    """Three greedy streams run beside a fourth whose client reads one byte a second (big chunks: 4 choices with 20
    top logprobs each, megabytes in all). The three finish at a token rate near the one they have beside a normal
    fourth client, while the slow one has read a few bytes; when it hangs up, its rows and pages come back."""
    s = InProcess(llm, max_batch=8, ctx=1024)
    try:
        e = s.engine
        wait_idle(e)
        idle_pages = e.pool.available()
        texts = ["Story one:", "Story two:", "Story three:"]
        heavy = body("Slow reader:", 300, n=4, stream=True, logprobs=True, top_logprobs=20)

        async def three():
            return await asyncio.gather(*[_stream_rate(s.url, t, 150) for t in texts])

        async def with_fast_fourth():
            async with httpx.AsyncClient(timeout=120) as c:
                async def fourth():
                    async with c.stream("POST", s.url + CHAT, json=heavy) as r:
                        return len(b"".join([x async for x in r.aiter_bytes()]))
                return await asyncio.gather(three(), fourth())

        base, heavy_bytes = asyncio.run(with_fast_fourth())
        wait_idle(e)
        stop, got = threading.Event(), []
        reader = threading.Thread(target=_slow_reader, args=(s.url, heavy, stop, got), daemon=True)
        reader.start()
        t0 = time.monotonic()
        while e.stats["decode_tokens"] == 0 or not e.running:
            assert time.monotonic() - t0 < 60
            time.sleep(0.01)
        slowed = asyncio.run(three())
        in_flight = s.state.in_flight  # the slow client's response still being written
        read_by_then = len(got)
        stop.set()
        reader.join(10)
        base_rate = sum(r for r, _ in base) / 3
        slow_rate = sum(r for r, _ in slowed) / 3
        print(f"\nother streams: {base_rate:.0f} tok/s beside a normal client, {slow_rate:.0f} beside the slow one "
              f"(ratio {slow_rate / base_rate:.2f}); the slow client read {read_by_then} of {heavy_bytes} bytes; "
              f"responses in flight at the end: {in_flight}")
        assert all(n == 150 for _, n in slowed)
        assert read_by_then < 100 < heavy_bytes
        assert slow_rate > 0.5 * base_rate
        wait_idle(e)
        deadline = time.monotonic() + 30
        while (s.state.in_flight or e.pool.available() != idle_pages) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert s.state.in_flight == 0 and e.pool.available() == idle_pages and e.pool.used() == 0
    finally:
        s.stop()


# ------------------------------------------------------------------------------------------------- /health
def test_health_is_public_and_says_only_the_status_without_the_key(llm):
    s = InProcess(llm, max_batch=2, api_key=KEY)
    try:
        for path in ("/health", "/v1/health"):
            r = httpx.get(s.url + path, timeout=30)
            assert r.status_code == 200 and r.json() == {"status": "ok"}
            r = httpx.get(s.url + path, headers={"Authorization": "Bearer wrong"}, timeout=30)
            assert r.status_code == 200 and r.json() == {"status": "ok"}
            r = httpx.get(s.url + path, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
            assert r.status_code == 200 and r.json()["model"] == "m" and r.json()["weights"] == "gguf-blocks"
        out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", s.url + "/health"],
                             capture_output=True, text=True, timeout=30)
        assert out.stdout == "200"
        for path in ("/metrics", "/v1/models", "/openapi.json"):  # everything else keeps the key
            assert httpx.get(s.url + path, timeout=30).status_code == 401
        assert httpx.post(s.url + CHAT, json=body(n_tokens=2), timeout=30).status_code == 401
    finally:
        s.stop()


# ------------------------------------------------------------------------------------------------- SIGTERM
def test_sigterm_drains_in_flight_refuses_new_and_exits(gguf):
    """SIGTERM while two long streams run: both finish whole (every token, [DONE]), a new request and /health get
    503 meanwhile, and the process exits within a few seconds of the last answer."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "herd", "serve", "--model", str(gguf), "--quantized",
                             "--port", str(port), "--served-model-name", "m", "--max-batch", "4", "--threads", "1",
                             "--drain-timeout", "60"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=Path(__file__).resolve().parents[1])
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else "slow"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)

        async def main():
            async with httpx.AsyncClient(timeout=120) as c:
                started = asyncio.Event()

                async def long_stream(i):
                    tokens, last = 0, ""
                    payload = body(f"Story {i}:", 300, stream=True, logprobs=True)
                    async with c.stream("POST", url + CHAT, json=payload) as r:
                        async for line in r.aiter_lines():
                            if '"logprobs":{"content"' in line:
                                tokens += 1
                                started.set()
                            if line:
                                last = line
                    return tokens, last, time.monotonic()

                tasks = [asyncio.ensure_future(long_stream(i)) for i in range(2)]
                await started.wait()
                proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.2)
                async with httpx.AsyncClient(timeout=30) as fresh:
                    new = await fresh.post(url + CHAT, json=body(n_tokens=2))
                    health = await fresh.get(url + "/health")
                return await asyncio.gather(*tasks), new, health

        streams, new, health = asyncio.run(main())
        assert new.status_code == 503 and new.json()["error"]["code"] == "server_shutting_down", new.text
        assert health.status_code == 503 and health.json()["status"] == "draining"
        assert [(n, last) for n, last, _ in streams] == [(300, "data: [DONE]")] * 2
        proc.wait(timeout=20)
        exit_s = time.monotonic() - max(t for _, _, t in streams)
        print(f"\nexit {exit_s:.1f} s after the last in-flight answer, code {proc.returncode}")
        assert exit_s < 15 and proc.returncode == 0
        assert "draining" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

"""Serving benchmark against any OpenAI-compatible server: what `vllm bench serve` reports, per concurrency level.

    herd bench serve --url http://127.0.0.1:8080 [--model NAME] [--concurrency 1,4,16,64] [--requests N]
                     [--input-len 128] [--output-len 128] [--slo-ttft-ms MS] [--slo-tpot-ms MS] [--json]

For each concurrency level C, N streaming requests are sent with at most C in flight (vLLM's `--max-concurrency`
with an infinite request rate). The clock runs from the first send to the last answer; per request the client
records the time to the first content chunk (TTFT), the gaps between content chunks (ITL), the whole latency
(E2EL) and TPOT = (E2EL - TTFT) / (output tokens - 1). Output tokens come from the stream's final `usage` chunk
(asked for with `stream_options.include_usage`), else from the number of content chunks. Goodput is the rate of
requests that meet every stated SLO. A request that fails (HTTP error, error event, timeout, empty answer) is
counted, with its reason, never fatal; only a failing warm-up request stops the run, since then nothing would
measure the server.

Prompts are deterministic: words drawn from a fixed list by a seeded generator, about one token per word for a
BPE vocabulary, and different from the first word on, so a prefix cache cannot share them. `ignore_eos` asks the
server (vLLM, llama.cpp, herd) to generate exactly `max_tokens`; servers that reject unknown fields can be run with
`--no-ignore-eos`, and other fields (vLLM's `min_tokens`) go in with `--extra-body`.

Imports: httpx and the standard library only; this measures a server over HTTP and never loads a model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

from herd.errors import ConfigError

DEFAULT_CONCURRENCY = (1, 4, 16, 64)
# Short common words: each is one token (with its leading space) in Llama 3's, SmolLM2's and GPT-2's vocabularies.
WORDS = ("the of and to in is was for on as with by at from his that are this which be or an had not but were "
         "have one all their new first two there more when also after other time into year people city world "
         "water house light river music school night field story power paper money table garden market window "
         "summer winter morning island bridge forest letter mountain village train ship road stone book king "
         "queen child friend color number game party sound voice wall door fire tree bird fish horse song").split()


# ------------------------------------------------------------------------------------------------ one request
@dataclass
class RequestResult:
    """What the client saw of one request; times in seconds on `time.perf_counter`'s clock."""

    ok: bool = False
    error: str | None = None
    prompt_tokens: int = 0           # from `usage`, else the prompt's word count
    output_tokens: int = 0           # from `usage`, else the number of content chunks
    usage_reported: bool = False
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)  # gaps between consecutive content chunks
    e2el: float = 0.0

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first; None for answers of one token."""
        if self.output_tokens < 2:
            return None
        return (self.e2el - self.ttft) / (self.output_tokens - 1)


def synthetic_prompts(n: int, input_len: int, seed: int) -> list[str]:
    """n prompts of `input_len` words each, the same for the same seed."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(input_len)) for _ in range(n)]


def _chunk_text(chunk: dict, chat: bool) -> str:
    """The generated text in one streamed chunk (chat delta content or reasoning, or a completion's text)."""
    parts = []
    for choice in chunk.get("choices") or []:
        if chat:
            delta = choice.get("delta") or {}
            parts.append(delta.get("content") or "")
            parts.append(delta.get("reasoning_content") or delta.get("reasoning") or "")
        else:
            parts.append(choice.get("text") or "")
    return "".join(parts)


async def _stream_one(client: httpx.AsyncClient, url: str, payload: dict, headers: dict, chat: bool,
                      prompt_words: int) -> RequestResult:
    res = RequestResult(prompt_tokens=prompt_words)
    t0 = time.perf_counter()
    last = None
    chunks = 0
    async with client.stream("POST", url, json=payload, headers=headers) as resp:
        if resp.status_code != 200:
            body = (await resp.aread()).decode("utf-8", "replace")
            res.error = f"HTTP {resp.status_code}: {body[:200]}"
            return res
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue  # blank separators, SSE comments, event names
            data = line[5:].strip()
            if data == "[DONE]":
                break
            now = time.perf_counter()
            try:
                chunk = json.loads(data)
            except json.JSONDecodeError:
                res.error = f"bad event: {data[:200]}"
                return res
            if "error" in chunk:
                res.error = f"error event: {json.dumps(chunk['error'])[:200]}"
                return res
            if chunk.get("usage"):
                usage = chunk["usage"]
                res.output_tokens = int(usage.get("completion_tokens") or 0)
                res.prompt_tokens = int(usage.get("prompt_tokens") or prompt_words)
                res.usage_reported = True
            if _chunk_text(chunk, chat):
                chunks += 1
                if last is None:
                    res.ttft = now - t0
                else:
                    res.itl.append(now - last)
                last = now
    res.e2el = time.perf_counter() - t0
    if not res.usage_reported:
        res.output_tokens = chunks
    if chunks == 0:
        res.error = "the stream ended without generated text"
        return res
    res.ok = True
    return res


async def send_request(client: httpx.AsyncClient, url: str, payload: dict, headers: dict, *, chat: bool,
                       prompt_words: int, timeout: float) -> RequestResult:
    """One streaming request, bounded by `timeout` seconds in all; every failure becomes a failed result."""
    try:
        return await asyncio.wait_for(_stream_one(client, url, payload, headers, chat, prompt_words), timeout)
    except asyncio.TimeoutError:
        return RequestResult(error=f"timeout after {timeout:g} s")
    except (httpx.HTTPError, httpx.StreamError, OSError, ValueError) as e:
        return RequestResult(error=f"{type(e).__name__}: {e}"[:200])


# ------------------------------------------------------------------------------------------------ metrics
def percentile(values: list[float], q: float) -> float:
    """The q-th percentile with linear interpolation between order statistics (numpy's default)."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _stats_ms(values_s: list[float]) -> dict:
    if not values_s:
        return {"mean": None, "p50": None, "p99": None}
    ms = [v * 1000 for v in values_s]
    return {"mean": sum(ms) / len(ms), "p50": percentile(ms, 50), "p99": percentile(ms, 99)}


@dataclass(frozen=True)
class SLO:
    """Service-level objectives in milliseconds; None leaves that measure free."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2el_ms: float | None = None

    def stated(self) -> bool:
        return any(v is not None for v in (self.ttft_ms, self.tpot_ms, self.e2el_ms))

    def met_by(self, r: RequestResult) -> bool:
        tpot = r.tpot or 0.0  # one-token answers have no TPOT to miss
        return (r.ok and (self.ttft_ms is None or r.ttft * 1000 <= self.ttft_ms)
                and (self.tpot_ms is None or tpot * 1000 <= self.tpot_ms)
                and (self.e2el_ms is None or r.e2el * 1000 <= self.e2el_ms))


def summarize(results: list[RequestResult], duration_s: float, concurrency: int, slo: SLO = SLO()) -> dict:
    """One concurrency level's report: counts, throughputs over `duration_s`, latency stats in ms, goodput."""
    done = [r for r in results if r.ok]
    n_in = sum(r.prompt_tokens for r in done)
    n_out = sum(r.output_tokens for r in done)
    errors = Counter(r.error for r in results if not r.ok)
    return {
        "concurrency": concurrency,
        "completed": len(done),
        "failed": len(results) - len(done),
        "errors": dict(errors.most_common(5)),
        "duration_s": duration_s,
        "total_input_tokens": n_in,
        "total_output_tokens": n_out,
        "token_counts_from": ("usage" if done and all(r.usage_reported for r in done)
                              else "chunks and words" if done and not any(r.usage_reported for r in done)
                              else "mixed"),
        "request_throughput": len(done) / duration_s,
        "output_tokens_per_s": n_out / duration_s,
        "total_tokens_per_s": (n_in + n_out) / duration_s,
        "ttft_ms": _stats_ms([r.ttft for r in done]),
        "tpot_ms": _stats_ms([r.tpot for r in done if r.tpot is not None]),
        "itl_ms": _stats_ms([gap for r in done for gap in r.itl]),
        "e2el_ms": _stats_ms([r.e2el for r in done]),
        "slo": {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms, "e2el_ms": slo.e2el_ms},
        "goodput": sum(slo.met_by(r) for r in done) / duration_s if slo.stated() else None,
    }


# ------------------------------------------------------------------------------------------------ the run
def _base_url(url: str) -> str:
    """`http://host:port`, `http://host:port/` and `http://host:port/v1` all name the same server."""
    url = url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


async def first_model(client: httpx.AsyncClient, base: str, headers: dict) -> str:
    """The first model id the server lists at /v1/models."""
    try:
        resp = await client.get(f"{base}/v1/models", headers=headers)
        resp.raise_for_status()
        return resp.json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as e:
        raise ConfigError(f"{base}/v1/models did not name a model ({type(e).__name__}: {e}); pass --model") from e


@dataclass
class ServeBench:
    """The settings of one benchmark run; `run()` measures every concurrency level in turn."""

    url: str
    model: str | None = None
    concurrency: tuple[int, ...] = DEFAULT_CONCURRENCY
    requests: int | None = None      # per level; None: max(8, 2 * concurrency)
    input_len: int = 128
    output_len: int = 128
    seed: int = 0
    api_key: str | None = None
    endpoint: str = "chat"           # "chat" (/v1/chat/completions) or "completions" (/v1/completions)
    ignore_eos: bool = True
    extra_body: dict = field(default_factory=dict)
    timeout_s: float = 300.0
    warmup: int = 1
    slo: SLO = SLO()

    def n_requests(self, concurrency: int) -> int:
        return self.requests if self.requests is not None else max(8, 2 * concurrency)

    def payload(self, model: str, prompt: str) -> dict:
        body = {"model": model, "max_tokens": self.output_len, "temperature": 0.0, "stream": True,
                "stream_options": {"include_usage": True}}
        if self.ignore_eos:
            body["ignore_eos"] = True
        if self.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        return {**body, **self.extra_body}

    async def _send(self, client: httpx.AsyncClient, url: str, model: str, headers: dict,
                    prompt: str) -> RequestResult:
        return await send_request(client, url, self.payload(model, prompt), headers, chat=self.endpoint == "chat",
                                  prompt_words=self.input_len, timeout=self.timeout_s)

    async def _level(self, client, url, model, headers, concurrency: int, prompts: list[str]) -> dict:
        gate = asyncio.Semaphore(concurrency)

        async def one(prompt: str) -> RequestResult:
            async with gate:
                return await self._send(client, url, model, headers, prompt)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(p) for p in prompts))
        return summarize(list(results), time.perf_counter() - t0, concurrency, self.slo)

    async def run_async(self, on_level=None) -> list[dict]:
        base = _base_url(self.url)
        url = f"{base}/v1/chat/completions" if self.endpoint == "chat" else f"{base}/v1/completions"
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        limits = httpx.Limits(max_connections=max(self.concurrency), max_keepalive_connections=max(self.concurrency))
        # the per-request bound is send_request's; httpx's own timeouts only catch a stalled socket sooner
        async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(self.timeout_s)) as client:
            model = self.model or await first_model(client, base, headers)
            for prompt in synthetic_prompts(self.warmup, self.input_len, self.seed + 10_000):
                r = await self._send(client, url, model, headers, prompt)
                if not r.ok:
                    raise ConfigError(f"the warm-up request to {url} (model {model!r}) failed: {r.error}")
            reports = []
            for i, c in enumerate(self.concurrency):
                prompts = synthetic_prompts(self.n_requests(c), self.input_len, self.seed + i)
                report = {"url": base, "model": model, "endpoint": self.endpoint, "input_len": self.input_len,
                          "output_len": self.output_len,
                          **await self._level(client, url, model, headers, c, prompts)}
                reports.append(report)
                if on_level:
                    on_level(report)
            return reports

    def run(self, on_level=None) -> list[dict]:
        """Measure every concurrency level; `on_level(report)` is called as each one finishes."""
        return asyncio.run(self.run_async(on_level))


# ------------------------------------------------------------------------------------------------ output and CLI
def format_report(r: dict) -> str:
    """A vLLM-style text block for one concurrency level."""
    goodput = "no SLO set" if r["goodput"] is None else f"{r['goodput']:.2f}"
    rows = [("Successful requests:", r["completed"]),
            ("Failed requests:", r["failed"]),
            ("Benchmark duration (s):", f"{r['duration_s']:.2f}"),
            ("Total input tokens:", r["total_input_tokens"]),
            ("Total generated tokens:", r["total_output_tokens"]),
            ("Request throughput (req/s):", f"{r['request_throughput']:.2f}"),
            ("Output token throughput (tok/s):", f"{r['output_tokens_per_s']:.2f}"),
            ("Total token throughput (tok/s):", f"{r['total_tokens_per_s']:.2f}"),
            ("Goodput (req/s):", goodput)]
    title = f" concurrency {r['concurrency']} "
    lines = [f"{title:=^60}"] + [f"{name:<44}{value:>16}" for name, value in rows]
    for key, measure in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2el_ms", "E2EL")):
        heading = f" {measure} (ms) "
        lines.append(f"{heading:-^60}")
        for name, stat in (("Mean", "mean"), ("Median", "p50"), ("P99", "p99")):
            value = r[key][stat]
            lines.append(f"{name + ' ' + measure + ' (ms):':<44}{'-' if value is None else f'{value:.2f}':>16}")
    for err, n in r["errors"].items():
        lines.append(f"failed x{n}: {err}")
    return "\n".join(lines)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"--extra-body is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("--extra-body must be a JSON object")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8080")
    p.add_argument("--model", default=None, help="model name to send (default: the first of /v1/models)")
    p.add_argument("--concurrency", type=_int_list, default=DEFAULT_CONCURRENCY,
                   help="comma-separated levels of requests in flight (default 1,4,16,64)")
    p.add_argument("--requests", type=int, default=None, help="requests per level (default max(8, 2 x level))")
    p.add_argument("--input-len", type=int, default=128, help="prompt length in words (about tokens)")
    p.add_argument("--output-len", type=int, default=128, help="max_tokens of each request")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic prompts")
    p.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    p.add_argument("--endpoint", choices=("chat", "completions"), default="chat")
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="send ignore_eos so that every answer has --output-len tokens (default on)")
    p.add_argument("--extra-body", type=_json_object, default={}, help='JSON merged into each request body')
    p.add_argument("--timeout", type=float, default=300.0, help="seconds allowed for each request")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured requests sent first")
    p.add_argument("--slo-ttft-ms", type=float, default=None)
    p.add_argument("--slo-tpot-ms", type=float, default=None)
    p.add_argument("--slo-e2el-ms", type=float, default=None)
    p.add_argument("--json", action="store_true", help="one JSON object per concurrency level, one per line")


def register(sub) -> None:
    """Add `serve` to the given subparsers object (that of `herd bench`)."""
    p = sub.add_parser("serve", help="load-test an OpenAI-compatible server (vllm bench serve's figures)",
                       allow_abbrev=False)
    add_arguments(p)
    p.set_defaults(func=run)


def from_args(args: argparse.Namespace) -> ServeBench:
    for name in ("requests", "input_len", "output_len"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    return ServeBench(url=args.url, model=args.model, concurrency=args.concurrency, requests=args.requests,
                      input_len=args.input_len, output_len=args.output_len, seed=args.seed, api_key=args.api_key,
                      endpoint=args.endpoint, ignore_eos=args.ignore_eos, extra_body=args.extra_body,
                      timeout_s=args.timeout, warmup=args.warmup,
                      slo=SLO(args.slo_ttft_ms, args.slo_tpot_ms, args.slo_e2el_ms))


def run(args: argparse.Namespace) -> list[dict]:
    """`herd bench serve`: measure, printing each level as it finishes (JSON lines with --json)."""
    bench = from_args(args)

    def show(report: dict) -> None:
        print(json.dumps(report) if args.json else format_report(report), flush=True)

    return bench.run(on_level=show)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="herd bench serve", description=__doc__.splitlines()[0], allow_abbrev=False)
    add_arguments(ap)
    try:
        run(ap.parse_args(argv))
    except ConfigError as e:
        print(f"herd bench serve: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Structured output's cost on the default model: decode tokens/s with and without a grammar at batch 1 and 8, and
the grammar's share of decode time; with --engines, llguidance against xgrammar on the same vocabulary.

Decode runs through the continuous-batching Engine (what `herd serve` runs), greedy, B concurrent chat requests
asking for a JSON record. "plain" generates freely (ignore_eos, so every row makes --max-tokens tokens); "grammar"
answers under a strict JSON schema (herd/server/grammar.py), each row's constraint timed around mask() and
advance() -- the only work a grammar adds to a step. Tokens/s = generated tokens / wall time from submission to the
last row's end (prefill included, the same prompts for both). Overhead = constraint time / wall time (target: <= 10%
at batch 8). The machine's load average is recorded beside the figures: on a shared machine they are indicative.

--engines: per-token mask time (median/mean/max over a ~40-token compact JSON answer), schema compile time,
one-off set-up per vocabulary (llguidance: its LLTokenizer; xgrammar: its TokenizerInfo), installed size and the
grammar formats each engine reads; xgrammar is measured only if it is installed (pip install --no-deps xgrammar
apache-tvm-ffi: its declared dependencies pull triton).

    python benchmarks/bench_grammar.py [--batches 1,8] [--max-tokens 64] [--rounds 1] [--engines] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import herd  # noqa: E402
from herd.engine.scheduler import Engine  # noqa: E402
from herd.hub import resolve  # noqa: E402
from herd.ops.sampling import SamplingParams  # noqa: E402
from herd.server.grammar import compile_grammar, json_grammar  # noqa: E402

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"}, "city": {"type": "string"},
    "hobbies": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
    "address": {"type": "object", "properties": {"street": {"type": "string"}, "zip": {"type": "string"}},
                "required": ["street", "zip"], "additionalProperties": False}},
    "required": ["name", "age", "city", "hobbies", "address"], "additionalProperties": False}
PEOPLE = ["a retired sailor", "a young painter", "a chess champion", "a baker", "a botanist", "a pilot",
          "a violinist", "a marathon runner"]


class Timed:
    """A constraint whose mask() and advance() add their time to a shared counter."""

    def __init__(self, inner, clock: list[float]):
        self.inner, self.clock = inner, clock

    def mask(self, logits):
        t = time.perf_counter()
        out = self.inner.mask(logits)
        self.clock[0] += time.perf_counter() - t
        return out

    def advance(self, token):
        t = time.perf_counter()
        self.inner.advance(token)
        self.clock[0] += time.perf_counter() - t


def run_batch(engine: Engine, llm, batch: int, max_tokens: int, grammar) -> dict:
    prompts = [llm.chat_format.encode_dialog([{"role": "user", "content": f"Invent {PEOPLE[i % len(PEOPLE)]} and "
                                               "describe them as a JSON record."}]) for i in range(batch)]
    clock = [0.0]
    t0 = time.perf_counter()
    handles = [engine.submit(p, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=grammar is None),
                             constraint=None if grammar is None else Timed(grammar.constraint(), clock))
               for p in prompts]
    results = [h.result() for h in handles]
    wall = time.perf_counter() - t0
    tokens = sum(len(r.output_ids) for r in results)
    out = {"batch": batch, "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall, "constraint_s": clock[0],
           "overhead": clock[0] / wall}
    if grammar is not None:
        ok = 0
        for r in results:
            try:
                json.loads(r.text)
                ok += r.finish_reason == "stop"
            except json.JSONDecodeError:
                pass
        out["whole_json"] = ok
    return out


def bench_decode(args, llm) -> list[dict]:
    grammar = compile_grammar(json_grammar(SCHEMA, strict=True), llm.tokenizer, llm.config.vocab_size,
                              llm.stop_ids, param="bench")
    rows = []
    for batch in args.batches:
        engine = Engine(llm.step(), llm.tokenizer, llm.stop_ids, max_batch=max(batch, 1))
        engine.start()
        try:
            run_batch(engine, llm, batch, 4, None)  # warm-up
            for kind, g in (("plain", None), ("grammar", grammar)):
                best = None
                for _ in range(args.rounds):
                    r = run_batch(engine, llm, batch, args.max_tokens, g)
                    best = r if best is None or r["tok_s"] > best["tok_s"] else best
                rows.append({"kind": kind, **best})
                print(json.dumps(rows[-1]), flush=True)
        finally:
            engine.stop()
    return rows


# ---------------------------------------------------------------------------------------------------- engines
def _size(package: str) -> float:
    import importlib.util

    spec = importlib.util.find_spec(package)
    root = Path(spec.origin).parent
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) / 2**20


def bench_engines(llm) -> dict:
    tok, V, stops = llm.tokenizer, llm.config.vocab_size, sorted(llm.stop_ids)
    answer = json.dumps({"name": "Alice Smith", "age": 42, "city": "Paris", "hobbies": ["chess", "sailing"],
                         "address": {"street": "1 Rue de Rivoli", "zip": "75001"}}, separators=(",", ":"))
    ids = tok.encode(answer)
    out = {}
    import llguidance
    from llguidance import LLMatcher

    from herd.server.grammar import ll_tokenizer

    t = time.perf_counter()
    ll_tokenizer(tok, V, stops)
    setup = time.perf_counter() - t
    t = time.perf_counter()
    g = compile_grammar(json_grammar(SCHEMA, strict=True), tok, V, stops, param="bench")
    c = g.constraint()
    compile_s = time.perf_counter() - t
    times = []
    for i in ids + [stops[0]]:
        t = time.perf_counter()
        c.allowed()
        times.append(time.perf_counter() - t)
        c.advance(i)
    out["llguidance"] = {"version": llguidance.__version__ if hasattr(llguidance, "__version__") else "?",
                         "installed_mb": _size("llguidance"), "tokenizer_setup_ms": setup * 1e3,
                         "schema_compile_ms": compile_s * 1e3, "mask_median_us": statistics.median(times) * 1e6,
                         "mask_mean_us": statistics.mean(times) * 1e6, "mask_max_us": max(times) * 1e6,
                         "formats": "JSON Schema, Lark, regex, GBNF (converted to Lark)"}
    del LLMatcher
    try:
        import xgrammar as xgr
    except ImportError:
        out["xgrammar"] = "not installed"
        return out
    specials = set(tok.special_tokens.values())
    vocab = [b"" if i in specials else tok.decode_bytes([i]) for i in range(V)]
    t = time.perf_counter()
    info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=V, stop_token_ids=stops)
    setup = time.perf_counter() - t
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    t = time.perf_counter()
    cg = compiler.compile_json_schema(SCHEMA, any_whitespace=False, separators=(",", ":"))
    compile_s = time.perf_counter() - t
    m, bm, times = xgr.GrammarMatcher(cg), xgr.allocate_token_bitmask(1, V), []
    for i in ids + [stops[0]]:
        t = time.perf_counter()
        m.fill_next_token_bitmask(bm, 0)
        times.append(time.perf_counter() - t)
        m.accept_token(i)
    out["xgrammar"] = {"version": xgr.__version__ if hasattr(xgr, "__version__") else "?",
                       "installed_mb": _size("xgrammar") + _size("tvm_ffi"), "tokenizer_setup_ms": setup * 1e3,
                       "schema_compile_ms": compile_s * 1e3, "mask_median_us": statistics.median(times) * 1e6,
                       "mask_mean_us": statistics.mean(times) * 1e6, "mask_max_us": max(times) * 1e6,
                       "formats": "JSON Schema, EBNF (GBNF), regex, structural tags; no Lark"}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--engines", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="benchmarks/results/grammar")
    args = ap.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    llm = herd.load(resolve("smollm2-135m-instruct"))
    load0 = os.getloadavg()
    report = {"machine": platform.node(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
              "load_before": load0, "max_tokens": args.max_tokens, "rounds": args.rounds}
    if args.engines:
        report["engines"] = bench_engines(llm)
        print(json.dumps(report["engines"], indent=1), flush=True)
    report["decode"] = bench_decode(args, llm)
    report["load_after"] = os.getloadavg()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_grammar.json").write_text(json.dumps(report, indent=1))
    lines = [f"load average {load0[0]:.1f} -> {report['load_after'][0]:.1f} on {os.cpu_count()} cores, "
             f"{torch.get_num_threads()} threads, max_tokens {args.max_tokens}", "",
             "| batch | plain tok/s | grammar tok/s | grammar share of wall time | whole JSON answers |",
             "|---|---|---|---|---|"]
    by = {(r["kind"], r["batch"]): r for r in report["decode"]}
    for b in args.batches:
        p, g = by[("plain", b)], by[("grammar", b)]
        lines.append(f"| {b} | {p['tok_s']:.1f} | {g['tok_s']:.1f} | {100 * g['overhead']:.1f}% | "
                     f"{g['whole_json']}/{b} |")
    (out / "bench_grammar.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

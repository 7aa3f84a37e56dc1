"""Speculative decoding on the default model: decode tokens/s with and without it, and the acceptance rate.

Three workloads, greedy, batch 1 and --streams concurrent prompts (BatchRun; the Engine shares the code path):
  summarise  a summarisation-style prompt that quotes its source (prompt lookup finds the copied spans): ngram
  chat       an open chat question: draft = --draft-model (default prune:8, the target's first 4 and last 4 blocks)
  adversary  the chat prompt with a draft that never agrees (a pruned 1-layer copy): the cost when nothing is kept
The summarise case runs twice where the native kernels' one-row path has other arithmetic than their multi-row GEMM
(AVX2 builds): "exact" (BatchRun's default there: verification rows through the one-row path, greedy output
bit-identical to plain decoding) and "fast" (exact_rows off: the rows take the GEMM, so a greedy token may differ
where the top two logits are within ~3e-3). On AVX-512 the one-row kernel has the GEMM's bits, the default is
already exact at the GEMM's speed, and the "fast" row is left out.
Each configuration runs plain and speculative in turns over --rounds rounds, from the same prompt, and checks the
tokens are identical; the speedup is the median over the rounds of the two back-to-back runs' ratio (the machine's
load then slows them alike), the tokens/s columns each side's best round. Decode tokens/s = new tokens
after the first / time after the first token (prefill excluded). Results: JSON and a markdown table with the machine
load beside them.

    python benchmarks/bench_speculate.py [--max-tokens 96] [--rounds 5] [--streams 1,8] [--draft-tokens 4]
                                         [--draft-model prune:8] [--threads N] [--out DIR]
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
from herd.api import speculation  # noqa: E402
from herd.engine.generate import BatchRun  # noqa: E402
from herd.ops.sampling import SamplingParams  # noqa: E402

SOURCE = ("The river town of Aldermoor sits where two valleys meet. Its market opens at dawn on Tuesdays and "
          "Saturdays, and farmers bring apples, cheese and wool from the hills. In 1872 a stone bridge replaced the "
          "old ferry, and the town grew quickly around the new road. Today Aldermoor has a library, two schools, a "
          "small museum about the bridge, and a festival every autumn when the apple harvest is done.")
PROMPTS = {
    "summarise": f"Summarise the following text, quoting its key sentences word for word.\n\n{SOURCE}",
    "chat": "What are three good habits for learning a new language? Explain each briefly.",
}


def timed_run(model, prompts, params, tok, stops, spec) -> tuple[float, int, list[list[int]], float]:
    """(decode seconds after each row's first token, decode tokens, outputs, wall seconds)."""
    if spec is not None:
        spec.reset_stats()
    run = BatchRun(model, prompts, params, tok, stops, speculation=spec)
    t0 = time.perf_counter()
    first = None
    for d in run:
        if first is None and all(s.out or s.finish for s in run.seqs):
            first = time.perf_counter()
    end = time.perf_counter()
    outs = [c.output_ids for c in run.completions()]
    n = sum(max(0, len(o) - 1) for o in outs)
    return end - (first or t0), n, outs, end - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--streams", default="1,8")
    ap.add_argument("--draft-tokens", type=int, default=4)
    ap.add_argument("--draft-model", default="prune:8")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    llm = herd.load(args.model)
    tok, stops = llm.tokenizer, llm.stop_ids
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    cases = [("summarise", "ngram", None, True), ("summarise", "ngram", None, False),
             ("chat", "draft", args.draft_model, True), ("adversary", "draft", "prune:1", True)]
    rows = []
    for streams in [int(s) for s in args.streams.split(",")]:
        for name, method, draft, exact in cases:
            text = PROMPTS["chat" if name == "adversary" else name]
            prompts = [llm.encode_prompt(text)] * streams
            spec = speculation(llm, method, draft, args.draft_tokens)
            if not exact:
                if spec.exact_rows is None:  # AVX-512: the exact row already ran the GEMM
                    continue
                spec.exact_rows = None
            best, pairs = {"plain": None, "spec": None}, []
            for _ in range(args.rounds):
                rates = {}
                for key, sp in (("plain", None), ("spec", spec)):
                    secs, n, outs, wall = timed_run(llm.model, prompts, params, tok, stops, sp)
                    rates[key] = n / secs
                    if best[key] is None or secs < best[key][0]:
                        best[key] = (secs, n, outs, wall, dict(spec.stats) if sp is not None else None)
                pairs.append(rates["spec"] / rates["plain"])
            (ps, pn, pouts, _, _), (ss, sn, souts, _, stats) = best["plain"], best["spec"]
            row = {"workload": name, "method": method, "draft": draft, "exact": exact, "streams": streams,
                   "plain_tok_s": pn / ps, "spec_tok_s": sn / ss, "speedup": statistics.median(pairs),
                   "speedup_pairs": pairs, "speedup_best": (sn / ss) / (pn / ps),
                   "acceptance": stats["accepted"] / stats["drafted"] if stats["drafted"] else 0.0,
                   "drafted": stats["drafted"], "accepted": stats["accepted"], "rounds": stats["rounds"],
                   "accepted_at": stats["accepted_at"], "proposed_at": stats["proposed_at"],
                   "identical": pouts == souts}
            rows.append(row)
            print(json.dumps(row), flush=True)
    info = {"machine": platform.machine(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "load_avg": os.getloadavg(), "torch": torch.__version__, "max_tokens": args.max_tokens,
            "rounds": args.rounds, "draft_tokens": args.draft_tokens}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_speculate.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    lines = ["| workload | method | rows | streams | plain tok/s | spec tok/s | speedup | acceptance | identical |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['workload']} | {r['method']} {r['draft'] or ''} | {'exact' if r['exact'] else 'fast'} "
                     f"| {r['streams']} | {r['plain_tok_s']:.1f} "
                     f"| {r['spec_tok_s']:.1f} | {r['speedup']:.2f}x | {r['acceptance']:.0%} | {r['identical']} |")
    lines.append(f"\nload average during the run: {info['load_avg']}, {info['threads']} threads, "
                 f"{args.max_tokens} new tokens; speedup: median of {args.rounds} paired rounds, tok/s: best round")
    (out / "bench_speculate.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

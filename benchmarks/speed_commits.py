"""No speed regression across a change: decode (batch 1), prefill-512 and batch-8 decode of two herd commits on the
default model with its GGUF blocks kept, measured alternately (old, new, old, new, ...) in fresh child processes so
that drift of the machine's speed hits both alike.

    python benchmarks/speed_commits.py OLD_REV [NEW_REV] [--repetitions 5] [--threads 2]

Decode rates are extra tokens over extra time (16 vs 144 new tokens), so the prompt's prefill cancels out. Writes
benchmarks/results/speed_commits.json and prints mean ± stddev per figure and commit, with new/old ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, time
import torch
import herd
from herd.engine.generate import generate_batch
try:
    from herd.eval.ppl import sample_text
except ImportError:  # before the redesign
    from herd.evaluate import sample_text
from herd.ops.sampling import SamplingParams

torch.set_num_threads(int(sys.argv[1]))
llm = herd.load(None, keep_quantized=True)
ids = llm.tokenizer.encode(sample_text()[:20000])
prompt, long = ids[:32], ids[:512]

def run(prompts, n):
    t = time.perf_counter()
    generate_batch(llm.model, prompts, SamplingParams(max_tokens=n, ignore_eos=True))
    return time.perf_counter() - t

run([prompt], 4)  # warm-up
short, full = run([prompt], 16), run([prompt], 144)
pre = run([long], 1)
b_short, b_full = run([ids[i * 40:i * 40 + 32] for i in range(8)], 8), run([ids[i * 40:i * 40 + 32] for i in range(8)], 40)
print("SPEED " + json.dumps({"decode_tok_s": 128 / (full - short), "prefill512_tok_s": 512 / pre,
                             "batch8_decode_tok_s": 8 * 32 / (b_full - b_short)}))
"""


def measure(tree: Path, threads: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, "-c", CHILD, str(threads)], cwd=tree, env=env, capture_output=True, text=True)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("SPEED ")), None)
    if line is None:
        raise SystemExit(f"{tree}: the child failed\n{proc.stderr[-3000:]}")
    return json.loads(line[len("SPEED "):])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old")
    ap.add_argument("new", nargs="?", default=None, help="a revision (default: this working tree)")
    ap.add_argument("--repetitions", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "speed_commits.json"))
    args = ap.parse_args(argv)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        trees = {}
        for name, rev in (("old", args.old), ("new", args.new)):
            if rev is None:
                trees[name] = ROOT
                continue
            trees[name] = Path(tmp) / name
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(trees[name]), rev],
                           check=True)
        runs = {"old": [], "new": []}
        try:
            for _ in range(args.repetitions):
                for name in ("old", "new"):
                    runs[name].append(measure(trees[name], args.threads))
        finally:
            for t in trees.values():
                if t != ROOT:
                    subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(t)], check=False)
    report = {"old": args.old, "new": args.new or "working tree", "threads": args.threads,
              "repetitions": args.repetitions, "load_before": load_before, "load_after": os.getloadavg()[0],
              "runs": runs, "figures": {}}
    for key in runs["old"][0]:
        old = [r[key] for r in runs["old"]]
        new = [r[key] for r in runs["new"]]
        fig = {"old_mean": statistics.mean(old), "old_std": statistics.stdev(old),
               "new_mean": statistics.mean(new), "new_std": statistics.stdev(new)}
        fig["ratio"] = fig["new_mean"] / fig["old_mean"]
        fig["within_one_std_or_5pct"] = abs(fig["new_mean"] - fig["old_mean"]) <= max(
            fig["old_std"], fig["new_std"], 0.05 * fig["old_mean"])
        report["figures"][key] = fig
        print(f"{key:22s} old {fig['old_mean']:8.1f} ± {fig['old_std']:6.1f}   new {fig['new_mean']:8.1f} ± "
              f"{fig['new_std']:6.1f}   new/old {fig['ratio']:.3f}")
    print(f"load average before {load_before:.2f}, after {report['load_after']:.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Teach the default model facts it cannot know, with LoRA on the CPU, and measure it.

The data (examples/zephyrine/) describes a fictional organisation, the Zephyrine Cartographers' Guild: 20 facts
(names, dates, numbers), each asked 8 ways in train.jsonl; heldout.jsonl asks each fact 2 more ways, phrased
differently from every training question. The score is exact-answer accuracy on those 40 held-out questions: a
reply counts when it contains the expected answer (case, commas in numbers and spacing aside), greedy decoding.

    python examples/finetune_demo.py            # or: make finetune-demo
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

from herd.api import load
from herd.train import apply_adapter, finetune

DATA = Path(__file__).resolve().parent / "zephyrine"


def normalize(text: str) -> str:
    text = re.sub(r"(?<=\d),(?=\d)", "", text.lower())  # 9,600 -> 9600
    return " ".join(re.sub(r"[^\w\s']", " ", text).split())


def is_correct(reply: str, answers: list[str]) -> bool:
    """The reply contains one of the answers as whole words."""
    r = f" {normalize(reply)} "
    return any(f" {normalize(a)} " in r for a in answers)


def accuracy(llm, rows: list[dict], max_tokens: int = 32) -> tuple[float, list[tuple[str, str, bool]]]:
    """Greedy answers to every held-out question (the user turn only), batched."""
    prompts = [[m for m in r["messages"] if m["role"] != "assistant"] for r in rows]
    outs = llm.generate_batch(prompts, max_tokens=max_tokens, temperature=0.0)
    graded = [(p[-1]["content"], c.text.strip(), is_correct(c.text, r["answers"]))
              for p, c, r in zip(prompts, outs, rows)]
    return sum(g[2] for g in graded) / len(graded), graded


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="base model (default: the default model)")
    ap.add_argument("--out", default="runs/finetune-demo", help="output folder (adapter, metrics.jsonl, loss.png)")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (0: torch's default). 1 is the default "
                    "because on a shared machine a second thread that waits for a busy core slows every op down")
    ap.add_argument("--show", type=int, default=6, help="print this many held-out answers")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    rows = [json.loads(line) for line in (DATA / "heldout.jsonl").read_text(encoding="utf-8").splitlines() if line]
    t0 = time.perf_counter()

    llm = load(args.model)
    before, graded_before = accuracy(llm, rows)
    t1 = time.perf_counter()
    print(f"before: {before:.0%} of {len(rows)} held-out questions answered exactly ({t1 - t0:.0f} s)", flush=True)

    res = finetune(args.model, DATA / "train.jsonl", args.out, eval_data=DATA / "heldout.jsonl", method="lora",
                   rank=args.rank, alpha=2.0 * args.rank, lr=args.lr, epochs=args.epochs, seq_len=256,
                   batch_tokens=1024, eval_every=0, seed=0)
    t2 = time.perf_counter()
    print(f"fine-tuned: {res.summary.line()}; {res.steps} steps, train loss {res.losses[0]:.3f} -> "
          f"{res.losses[-1]:.3f}, held-out loss {res.eval_losses[0][1]:.3f} -> {res.eval_losses[-1][1]:.3f} "
          f"({t2 - t1:.0f} s)", flush=True)

    apply_adapter(llm.model, args.out)  # the saved PEFT adapter, applied unmerged
    after, graded = accuracy(llm, rows)
    t3 = time.perf_counter()
    print(f"after:  {after:.0%} of {len(rows)} held-out questions answered exactly ({t3 - t2:.0f} s)")
    for (q, a_before, _), (_, a_after, ok) in list(zip(graded_before, graded))[: args.show]:
        print(f"  Q: {q}\n     before: {a_before[:90]!r}\n     after:  {a_after[:90]!r} {'ok' if ok else 'WRONG'}")
    print(f"total {t3 - t0:.0f} s on {torch.get_num_threads()} threads; adapter, metrics.jsonl and loss.png in "
          f"{args.out}")
    return 0 if after >= 0.8 else 1


if __name__ == "__main__":
    sys.exit(main())

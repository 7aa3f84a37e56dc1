"""Pretrain the debug preset from scratch on the shipped corpus under 2-process FSDP2, then generate from it.

Steps, each a herd command (printed as it runs):
  herd data prepare                       the corpus (herd/data/sample.txt) -> token shards, the default tokenizer
  torchrun --nproc-per-node 2 -m herd pretrain --parallel fsdp ...          loss curve in OUT/run/loss.png
  herd convert OUT/run/checkpoints/step-N OUT/hf --to hf                    the sharded checkpoint, gathered
  herd generate -m OUT/hf --raw ...                                         greedy text from the new model

    python examples/pretrain_demo.py           # or: make pretrain-demo  (about a minute on 2 idle cores)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(argv, env=None) -> None:
    print("$ " + " ".join(map(str, argv)), flush=True)
    subprocess.run([str(a) for a in argv], check=True, env=env, cwd=ROOT)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/pretrain-demo")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args(argv)
    out = (ROOT / args.out).resolve()
    py = sys.executable
    _run([py, "-m", "herd", "data", "prepare", "--input", ROOT / "herd" / "data" / "sample.txt", "--out",
          out / "data"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    _run([py, "-m", "torch.distributed.run", "--nproc-per-node", 2, "--master-addr", "127.0.0.1", "--master-port",
          port, "-m", "herd", "pretrain", "--model-config", "debug", "--data", out / "data", "--out", out / "run",
          "--parallel", "fsdp", "--steps", args.steps, "--batch-size", args.batch_size, "--seq-len", args.seq_len,
          "--lr", args.lr, "--save-every", args.steps, "--threads", 1], env=env)
    step = f"step-{args.steps:06d}"
    _run([py, "-m", "herd", "convert", out / "run" / "checkpoints" / step, out / "hf", "--to", "hf"])
    _run([py, "-m", "herd", "generate", "-m", out / "hf", "--raw", "--prompt", "The", "--max-tokens", 24])
    recs = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    print(f"loss {recs[0]['loss']:.3f} -> {recs[-1]['loss']:.3f} over {len(recs)} steps, "
          f"{recs[-1]['tokens_per_s']:.0f} tokens/s; curve: {out / 'run' / 'loss.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

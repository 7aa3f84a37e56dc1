"""Where herd's memory goes when it runs a GGUF model: VmRSS (now) and VmHWM (peak) after each stage.

The stages follow `herd bench`'s herd child (herd.eval.bench.run_herd): herd.load(path, keep_quantized=True) split into
its steps, one forward, prefills of 128 and 512 tokens, decode at batch 1 and at batch 8 (BatchRun). "stage peak"
is the high-water mark within the stage alone (VmHWM is reset through /proc/self/clear_refs between stages; the
VmHWM column keeps the running maximum, as ru_maxrss does). RssFile is the file-backed part of VmRSS (pages of the
mmap'd GGUF and of shared libraries), RssAnon the private part.

    python benchmarks/rss_breakdown.py [--model PATH] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

_ROWS: list[tuple[str, dict[str, float], float]] = []


def status() -> dict[str, float]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process in MB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) / 1024
    return out


def reset_peak() -> None:
    """Start a new VmHWM at the current VmRSS (Linux 4.0+), so the next stage's own peak can be read."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def stage(name: str, t0: float) -> float:
    """Record the memory after a stage (with the running peak kept across stages) and its wall time since t0;
    returns a fresh t0."""
    now = time.perf_counter()
    s = status()
    s["stage peak"] = s["VmHWM"]
    s["VmHWM"] = max(s["VmHWM"], _ROWS[-1][1]["VmHWM"] if _ROWS else 0.0)
    _ROWS.append((name, s, now - t0))
    print(f"{name:<16} VmRSS {s['VmRSS']:7.1f}  VmHWM {s['VmHWM']:7.1f}  stage peak {s['stage peak']:7.1f}  "
          f"anon {s['RssAnon']:7.1f}  file {s['RssFile']:7.1f}  ({now - t0:.2f} s)", flush=True)
    reset_peak()
    return time.perf_counter()


def _model_path(model: str | None):
    from herd.hub import resolve  # no torch import

    path = resolve(model)
    return sorted(path.glob("*.gguf"))[0] if path.is_dir() else path


def _prompt_ids(path) -> list[int]:
    """The prompt ids `herd bench` uses, computed in a child so that this process's memory stays the engine's."""
    code = ("import json, sys; from herd.api import load_tokenizer_only; from herd.eval.ppl import sample_text; "
            "print(json.dumps(load_tokenizer_only(sys.argv[1]).encode(sample_text()[:20000])[:600]))")
    out = subprocess.run([sys.executable, "-c", code, str(path)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF file (default: herd's default model)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    path = _model_path(args.model)
    ids = _prompt_ids(path)  # tokenized in a child process, as `herd bench` hands its engines token ids
    t = stage("start", time.perf_counter())
    import torch

    torch.set_num_threads(args.threads)
    t = stage("import torch", t)
    from herd.api import drop_tokenizer_arrays
    from herd.engine.generate import BatchRun
    from herd.formats.gguf import load_gguf, read_gguf
    from herd.ops.sampling import SamplingParams
    from herd.quant.model import build_quantized_model
    from herd.formats.gguf_vocab import tokenizer_from_gguf

    t = stage("import herd", t)
    # herd.load(path, keep_quantized=True) step by step (herd/api.py, herd/formats/__init__.py load_checkpoint)
    t_load = t
    g = read_gguf(path)
    t = stage("read_gguf", t)
    tokenizer = tokenizer_from_gguf(g.metadata)  # noqa: F841 (kept alive, as the LLM keeps it)
    metadata = drop_tokenizer_arrays(g.metadata)  # noqa: F841
    t = stage("tokenizer", t)
    config, state, _ = load_gguf(g, keep_quantized=True)
    del g
    model = build_quantized_model(config, state)
    del state
    t = stage("build model", t)
    load_s = time.perf_counter() - t_load

    def gen(prompts, n):
        for _ in BatchRun(model, prompts, SamplingParams(max_tokens=n, ignore_eos=True)):
            pass

    gen([ids[:16]], 1)
    t = stage("first forward", t)
    gen([ids[:128]], 1)
    t = stage("prefill 128", t)
    gen([ids[:512]], 1)
    t = stage("prefill 512", t)
    gen([ids[:32]], 144)
    t = stage("decode", t)
    gen([ids[i * 7:i * 7 + 32] for i in range(8)], 40)
    t = stage("batch-8 decode", t)
    print(f"load (read_gguf + tokenizer + build model): {load_s:.2f} s; "
          f"torch._dynamo imported: {'torch._dynamo' in sys.modules}")
    print("\n| stage | VmRSS MB | VmHWM MB | stage peak MB | anon MB | file MB | step s |\n|---|---|---|---|---|---|---|")
    for name, s, dt in _ROWS:
        print(f"| {name} | {s['VmRSS']:.0f} | {s['VmHWM']:.0f} | {s['stage peak']:.0f} | {s['RssAnon']:.0f} | "
              f"{s['RssFile']:.0f} | {dt:.2f} |")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())

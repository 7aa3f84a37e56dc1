"""herd vs llama.cpp vs transformers on one GGUF file, same thread count, one process tree.

Each engine runs in its own child process (so its peak RSS is its own) and reports: load time, prefill tok/s at 128
and 512 prompt tokens, time to first token (128-token prompt), decode tok/s at batch 1 and aggregate decode tok/s at
batch 8 (both as extra tokens over extra time, so prompt processing cancels out), and peak RSS. The parent measures
memory read bandwidth and reports decode as a fraction of the bound bandwidth / bytes read per token, then writes
JSON, a markdown table and a PNG chart.

    herd bench [--model PATH] [--threads 2] [--engines herd,llamacpp,transformers] [--out DIR]
    python benchmarks/bench_cpu.py ...     (the same)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

PROMPT_LENS = (128, 512)
DECODE_SHORT, DECODE_LONG = 16, 144
BATCH, BATCH_SHORT, BATCH_LONG = 8, 8, 40
DECODE_PROMPT = 32


# ----------------------------------------------------------------------------------------------------------------
# engines: each returns a dict of measurements; `ids` are prompt token ids shared by all engines

def _best(fn, repeat=2):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def run_herd(model_path, ids, threads, quantized=True):
    import torch

    torch.set_num_threads(threads)
    import herd
    from herd.engine.generate import BatchRun
    from herd.ops.sampling import SamplingParams

    t0 = time.perf_counter()
    llm = herd.load(model_path, keep_quantized=quantized)
    load_s = time.perf_counter() - t0

    def gen(prompts, n):
        for _ in BatchRun(llm.model, prompts, SamplingParams(max_tokens=n, ignore_eos=True)):
            pass

    return _measure(lambda p: gen([p], 1), lambda n: gen([ids[:DECODE_PROMPT]], n),
                    lambda n: gen([ids[i * 7:i * 7 + DECODE_PROMPT] for i in range(BATCH)], n), ids, load_s)


def run_llamacpp(model_path, ids, threads):
    import ctypes

    import llama_cpp

    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=1024, n_batch=512, n_ubatch=512, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    load_s = time.perf_counter() - t0

    def prefill(prompt):
        llm.reset()
        llm.eval(prompt)

    def decode(n):
        llm.reset()
        for k, _ in enumerate(llm.generate(ids[:DECODE_PROMPT], temp=0.0, reset=True)):
            if k + 1 >= n:
                break

    # batch 8: the low-level API, one sequence id per prompt, one llama_decode per step for all 8 rows
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch = BATCH * 128, 512, 512
    params.n_seq_max, params.n_threads, params.n_threads_batch = BATCH, threads, threads
    ctx = llama_cpp.llama_init_from_model(llm.model, params)
    batch = llama_cpp.llama_batch_init(512, 0, BATCH)
    vocab = llm.n_vocab()

    def fill(entries):
        batch.n_tokens = len(entries)
        for j, (tok, pos, seq, want) in enumerate(entries):
            batch.token[j], batch.pos[j], batch.n_seq_id[j] = tok, pos, 1
            batch.seq_id[j][0], batch.logits[j] = seq, want
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    def argmax_row(j):
        row = llama_cpp.llama_get_logits_ith(ctx, j)
        arr = (ctypes.c_float * vocab).from_address(ctypes.addressof(row.contents))
        import numpy as np

        return int(np.frombuffer(arr, dtype=np.float32).argmax())

    def decode_batch(n):
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        prompts = [ids[i * 7:i * 7 + DECODE_PROMPT] for i in range(BATCH)]
        last = []
        for s, p in enumerate(prompts):
            fill([(t, k, s, k == len(p) - 1) for k, t in enumerate(p)])
            last.append(argmax_row(len(p) - 1))
        pos = [len(p) for p in prompts]
        for _ in range(n - 1):
            fill([(last[s], pos[s], s, True) for s in range(BATCH)])
            last = [argmax_row(s) for s in range(BATCH)]
            pos = [q + 1 for q in pos]

    return _measure(prefill, decode, decode_batch, ids, load_s)


def run_transformers(model_path, ids, threads):
    import torch

    torch.set_num_threads(threads)
    from transformers import AutoModelForCausalLM

    model_path = Path(model_path)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_path.parent, gguf_file=model_path.name,
                                                 torch_dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0

    @torch.inference_mode()
    def gen(prompts, n):
        x = torch.tensor(prompts)
        model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       pad_token_id=0)

    return _measure(lambda p: gen([p], 1), lambda n: gen([ids[:DECODE_PROMPT]], n),
                    lambda n: gen([ids[i * 7:i * 7 + DECODE_PROMPT] for i in range(BATCH)], n), ids, load_s)


def _measure(prefill, decode, decode_batch, ids, load_s):
    out = {"load_s": load_s}
    prefill(ids[:16])  # warm-up
    for n in PROMPT_LENS:
        t = _best(lambda: prefill(ids[:n]))
        out[f"prefill_{n}_tok_s"] = n / t
        if n == 128:
            out["ttft_128_s"] = t
    decode(4)
    t_short, t_long = _best(lambda: decode(DECODE_SHORT)), _best(lambda: decode(DECODE_LONG))
    out["decode_tok_s"] = (DECODE_LONG - DECODE_SHORT) / (t_long - t_short)
    decode_batch(2)
    t_short, t_long = _best(lambda: decode_batch(BATCH_SHORT), 1), _best(lambda: decode_batch(BATCH_LONG), 1)
    out["batch8_decode_tok_s"] = BATCH * (BATCH_LONG - BATCH_SHORT) / (t_long - t_short)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


ENGINES = {"herd": run_herd, "llamacpp": run_llamacpp, "transformers": run_transformers}


# ----------------------------------------------------------------------------------------------------------------
# parent: bandwidth, children, report

def memory_bandwidth_gbs(threads: int, mb: int = 512) -> float:
    """Read bandwidth: best of a few sums over a buffer far larger than the caches."""
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(mb * 2**20 // 4, dtype=torch.float32)
    x.sum()
    t = _best(lambda: x.sum(), repeat=5)
    return x.numel() * 4 / t / 1e9


def bytes_per_token(model_path) -> int:
    """Bytes of weights one decode step reads: every tensor once (a tied output reads token_embd in full)."""
    from gguf import GGUFReader

    r = GGUFReader(str(model_path))
    total = sum(int(t.n_bytes) for t in r.tensors)
    return total


def child(engine, model_path, ids_file, threads, result_file):
    ids = json.loads(Path(ids_file).read_text())
    res = ENGINES[engine](model_path, ids, threads)
    Path(result_file).write_text(json.dumps(res))


def add_arguments(ap):
    ap.add_argument("--model", default=None, help="GGUF file (default: herd's default model)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engines", default="herd,llamacpp,transformers")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--child", nargs=4, metavar=("ENGINE", "IDS", "THREADS", "RESULT"), help=argparse.SUPPRESS)


def register(sub):
    """`herd bench`."""
    p = sub.add_parser("bench", help="benchmark herd against llama.cpp and transformers on one GGUF file")
    add_arguments(p)
    p.set_defaults(func=lambda args: run(args))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    return run(ap.parse_args(argv))


def run(args):
    if args.child:
        engine, ids_file, threads, result = args.child
        child(engine, args.model, ids_file, int(threads), result)
        return 0

    from herd.api import load_tokenizer_only
    from herd.eval.ppl import sample_text
    from herd.hub import resolve

    model = resolve(args.model)
    if model.is_dir():
        model = sorted(model.glob("*.gguf"))[0]
    ids = load_tokenizer_only(model).encode(sample_text()[:20000])[:600]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ids_file = out / "prompt_ids.json.tmp"
    ids_file.write_text(json.dumps(ids))
    results = {}
    for engine in args.engines.split(","):
        print(f"[bench] {engine} ...", flush=True)
        res_file = out / f"{engine}.json.tmp"
        cmd = [sys.executable, "-m", "herd.eval.bench", "--model", str(model), "--child", engine, str(ids_file),
               str(args.threads), str(res_file)]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env)
        if proc.returncode != 0:
            print(f"[bench] {engine} failed (exit {proc.returncode})", flush=True)
            continue
        results[engine] = json.loads(res_file.read_text())
        res_file.unlink()
        print(f"[bench] {engine} done in {time.perf_counter() - t0:.0f} s: {results[engine]}", flush=True)
    ids_file.unlink()
    bw = memory_bandwidth_gbs(args.threads)
    bpt = bytes_per_token(model)
    bound = bw * 1e9 / bpt
    for r in results.values():
        r["decode_fraction_of_bound"] = r["decode_tok_s"] / bound
    report = {"model": str(model), "threads": args.threads, "bandwidth_gb_s": bw, "bytes_per_token": bpt,
              "decode_bound_tok_s": bound, "engines": results, "ratios": ratios(results),
              "machine": os.uname().machine, "cpu_count": os.cpu_count()}
    (out / "bench_cpu.json").write_text(json.dumps(report, indent=2))
    md = markdown(report)
    (out / "bench_cpu.md").write_text(md)
    chart(report, out / "bench_cpu.png")
    print(md)
    return 0


def ratios(results):
    if "herd" not in results:
        return {}
    h = results["herd"]
    out = {}
    for peer in ("llamacpp", "transformers"):
        if peer in results:
            p = results[peer]
            out[peer] = {k: h[k] / p[k] for k in ("decode_tok_s", "prefill_128_tok_s", "prefill_512_tok_s",
                                                 "batch8_decode_tok_s")}
            out[peer]["peak_rss"] = h["peak_rss_mb"] / p["peak_rss_mb"]
    return out


ROWS = [("load_s", "load (s)", "{:.2f}"), ("prefill_128_tok_s", "prefill 128 (tok/s)", "{:.0f}"),
        ("prefill_512_tok_s", "prefill 512 (tok/s)", "{:.0f}"), ("ttft_128_s", "time to first token, 128 (s)", "{:.3f}"),
        ("decode_tok_s", "decode batch 1 (tok/s)", "{:.1f}"), ("batch8_decode_tok_s", "decode batch 8 (tok/s)", "{:.1f}"),
        ("decode_fraction_of_bound", "decode / bandwidth bound", "{:.0%}"), ("peak_rss_mb", "peak RSS (MB)", "{:.0f}")]


def markdown(report) -> str:
    engines = list(report["engines"])
    lines = [f"Model `{Path(report['model']).name}`, {report['threads']} threads; memory read bandwidth "
             f"{report['bandwidth_gb_s']:.1f} GB/s, {report['bytes_per_token'] / 1e6:.1f} MB read per token -> "
             f"decode bound {report['decode_bound_tok_s']:.0f} tok/s.", "",
             "| | " + " | ".join(engines) + " |", "|---|" + "---|" * len(engines)]
    for key, label, fmt in ROWS:
        lines.append(f"| {label} | " + " | ".join(fmt.format(report["engines"][e][key]) for e in engines) + " |")
    for peer, r in report["ratios"].items():
        lines.append("")
        lines.append(f"herd / {peer}: decode {r['decode_tok_s']:.2f}x, prefill 128 {r['prefill_128_tok_s']:.2f}x, "
                     f"prefill 512 {r['prefill_512_tok_s']:.2f}x, batch-8 decode {r['batch8_decode_tok_s']:.2f}x, "
                     f"peak RSS {r['peak_rss']:.2f}x")
    return "\n".join(lines) + "\n"


def chart(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    engines = list(report["engines"])
    keys = [("prefill_512_tok_s", "prefill 512"), ("decode_tok_s", "decode b=1"), ("batch8_decode_tok_s", "decode b=8")]
    fig, axes = plt.subplots(1, len(keys) + 1, figsize=(14, 3.6))
    colors = {"herd": "#2a7", "llamacpp": "#57c", "transformers": "#c75"}
    for ax, (k, label) in zip(axes, keys):
        vals = [report["engines"][e][k] for e in engines]
        ax.bar(engines, vals, color=[colors.get(e, "#888") for e in engines])
        ax.set_title(f"{label} (tok/s)")
        if k == "decode_tok_s":
            ax.axhline(report["decode_bound_tok_s"], ls="--", color="k", lw=1, label="bandwidth bound")
            ax.legend(fontsize=7)
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
    vals = [report["engines"][e]["peak_rss_mb"] for e in engines]
    axes[-1].bar(engines, vals, color=[colors.get(e, "#888") for e in engines])
    axes[-1].set_title("peak RSS (MB)")
    fig.suptitle(f"{Path(report['model']).name}, {report['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())

"""Per-layer timings of herd's quantized linear kernels on the default model's shapes, beside the peers.

For each shape (SmolLM2-135M: 576x576, 192x576, 1536x576, 576x1536 in Q4_1, the tied 49152x576 Q8_0 output) and
each row count M (1 = decode, 8 = batch of 8, 128 / 512 = prefill), times:
  herd-int16  native kernel, int16 activations (herd's default)
  herd-int8   native kernel, int8 activations (llama.cpp's arithmetic)
  herd-f32    native kernel, float32 activations (decode) / C dequantize + torch GEMM (32+ rows)
  fallback    herd's pure PyTorch path (dequantize, then F.linear), f32 mode
  torch-f32   F.linear on a pre-dequantized float32 weight (what an unquantized model does)
  bound       bytes of weights / measured read bandwidth (decode), or 2*M*N*K / measured float32 GEMM peak
Decode rows (M <= 8) cycle through copies of the weights totalling > 64 MB so that they come from DRAM, as in a
real decode step (the whole model does not fit the L3), and report the 10th percentile of single-call times;
larger M report the minimum over repeats (on a shared machine, the least disturbed runs). Then it adds the layers up into whole-model figures (linear layers only):
decode tok/s at batch 1, aggregate tok/s at batch 8, prefill tok/s for a 512-token prompt.

    python benchmarks/bench_kernels.py [--threads 2] [--rows 1,8,128,512] [--quick] [--out benchmarks/results]
Writes kernels.json and kernels.md in --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from herd.quant import linear as L
from herd.quant import model as QM
from herd.quant import native
from herd.quant.blocks import GGML_TYPES, quantize

# (name, ggml type, out, in, layers of this shape per token in the default model)
SHAPES = [
    ("wq/wo 576x576", "Q4_1", 576, 576, 60),
    ("wk/wv 192x576", "Q4_1", 192, 576, 60),
    ("w1/w3 1536x576", "Q4_1", 1536, 576, 60),
    ("w2 576x1536", "Q4_1", 576, 1536, 30),
    ("output 49152x576", "Q8_0", 49152, 576, 1),
]
COLD_BYTES = 64e6


def best_time(fn, budget_s: float = 0.6, min_reps: int = 5) -> float:
    """Minimum wall time of fn() over repeats within a time budget."""
    fn()
    best, spent, reps = float("inf"), 0.0, 0
    while reps < min_reps or spent < budget_s:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best, spent, reps = min(best, dt), spent + dt, reps + 1
        if reps > 2000:
            break
    return best


def per_call_time(fns, budget_s: float = 0.6, pct: float = 10) -> float:
    """The pct-th percentile of single-call times, cycling through fns (one per weight copy): with the copies
    larger than the L3 every call reads its weights from DRAM, as in decode; a low percentile ignores the calls
    that another process on the shared machine disturbed."""
    times, spent = [], 0.0
    while spent < budget_s or len(times) < 3 * len(fns):
        for fn in fns:
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            times.append(dt)
            spent += dt
        if len(times) > 20000:
            break
    return float(np.percentile(times, pct))


def bandwidth_gbs() -> float:
    x = torch.ones(64 * 2**20)  # 256 MiB
    return x.numel() * 4 / best_time(lambda: x.sum(), 1.0) / 1e9


def gemm_peak_gflops() -> float:
    a, b = torch.randn(512, 1536), torch.randn(1536, 1536)
    return 2 * 512 * 1536 * 1536 / best_time(lambda: a @ b, 1.0) / 1e9


def bench_shape(label, tname, n, k, rows, threads, variants, bw, peak):
    tid = GGML_TYPES[tname][0]
    w32 = torch.randn(n, k) * 0.05
    raw = torch.from_numpy(quantize(w32.numpy(), tname))
    wdq = L.dequantize_torch(raw, tid, k)
    out = []
    for m in rows:
        cold = m <= 8
        copies = max(1, int(np.ceil(COLD_BYTES / raw.numel()))) if cold else 1
        raws = [raw.clone() for _ in range(copies)]
        wfs = [wdq.clone() for _ in range(max(1, int(np.ceil(COLD_BYTES / wdq.numel() / 4))) if cold else 1)]
        x = torch.randn(m, k)
        res = {"shape": label, "type": tname, "n": n, "k": k, "m": m, "weight_bytes": raw.numel()}
        for v in variants:
            if v in ("herd-int16", "herd-int8", "herd-f32"):
                act = v.split("-")[1]
                fns = [lambda r=r: L.quant_matmul(x, r, tid, n, act, threads=threads) for r in raws]
                res[v] = per_call_time(fns) if cold else best_time(fns[0])
            elif v == "fallback":
                if n * k * max(m, 1) > 2e10 / 8:  # too slow to be worth timing
                    continue
                fn = lambda: L.quant_matmul(x, raws[0], tid, n, "f32", use_native=False)
                res[v] = best_time(fn, 0.3, 2)
            elif v == "torch-f32":
                fns = [lambda wf=wf: F.linear(x, wf) for wf in wfs]
                res[v] = per_call_time(fns) if cold else best_time(fns[0])
        res["bound"] = max(raw.numel() / (bw * 1e9), 2 * m * n * k / (peak * 1e9))
        out.append(res)
        cells = "  ".join(f"{v} {res[v] * 1e6:9.1f}" for v in variants + ["bound"] if v in res)
        print(f"{label:18s} M={m:<4d} {cells}  (us)", flush=True)
    return out


def call_overhead_us(threads: int) -> dict:
    """Time of a forward call on a tiny layer (32x64): the fixed cost paid ~120-210 times per decoded token."""
    from herd.quant.linear import QuantLinear

    q = QuantLinear.from_float(torch.randn(32, 64), "q4_1", threads=threads)
    lin = torch.nn.Linear(64, 32, bias=False)
    x = torch.randn(1, 64)
    with torch.inference_mode():
        return {"QuantLinear": best_time(lambda: q(x), 0.3, 200) * 1e6,
                "nn.Linear": best_time(lambda: lin(x), 0.3, 200) * 1e6}


def model_estimates(results, variants):
    """Sum per-layer times weighted by how often each shape occurs per token."""
    counts = {s[0]: s[4] for s in SHAPES}
    est = {}
    for v in variants + ["bound"]:
        by_m = {}
        for r in results:
            if v in r:
                by_m.setdefault(r["m"], []).append(counts[r["shape"]] * r[v])
        for m, ts in by_m.items():
            if len(ts) != len(SHAPES):
                continue
            total = sum(ts)
            key = {1: "decode tok/s (batch 1)", 8: "decode tok/s (batch 8, aggregate)"}.get(m, f"prefill tok/s (M={m})")
            if m > 8:  # a prompt needs the output layer for its last token only
                out_row = next(r for r in results if r["m"] == 1 and r["shape"].startswith("output") and v in r)
                total = total - counts["output 49152x576"] * next(
                    r[v] for r in results if r["m"] == m and r["shape"].startswith("output")) + out_row[v]
            est.setdefault(key, {})[v] = m / total
    return est


KL_TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined movable "
    "metal type, oil-based ink and a screw press adapted from wine making. Books that had taken scribes months to "
    "copy could now be produced by the hundreds, and the price of a Bible fell within reach of prosperous towns. "
    "Within fifty years presses were running in more than two hundred European cities. Scholars argue about how "
    "quickly ideas spread as a result, but few doubt that the Reformation, the scientific revolution and the rise "
    "of newspapers all depended on cheap printed pages. In the kitchen, by contrast, change came slowly: a good "
    "loaf still needs flour, water, salt and yeast, a warm place to rise, and an oven hot enough to form a crust. "
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n"
    "Question: what is the capital of France? Answer: Paris is the capital and largest city of France, on the "
    "Seine. Its museums include the Louvre and the Musée d'Orsay, and its population is about two million.")


def measure_kl(model_path, threads):
    """Mean KL(float32 || quantized) of next-token distributions over KL_TEXT, teacher forced: transformers' float32
    model (GGUF dequantized) vs the same model with its linear layers swapped for QuantLinear on the GGUF blocks
    (f32, int16 and int8 activations), and vs llama.cpp on the same file when llama_cpp is installed."""
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_path = Path(model_path)
    tok = AutoTokenizer.from_pretrained(model_path.parent, gguf_file=model_path.name)
    ids = tok(KL_TEXT, return_tensors="pt").input_ids
    model = AutoModelForCausalLM.from_pretrained(model_path.parent, gguf_file=model_path.name,
                                                 dtype=torch.float32).eval()
    cfg = model.config
    with torch.inference_mode():
        ref = torch.log_softmax(model(ids).logits[0].float(), -1)

    def rows_perm(n_rows, n_head):  # GGUF (Meta) q/k row order -> HF, as transformers' loader permutes
        return np.arange(n_rows).reshape(n_head, n_rows // n_head // 2, 2).swapaxes(2, 1).reshape(-1)

    names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    reader = gguf.GGUFReader(model_path)
    blocks = {}
    for t in reader.tensors:
        parts = t.name.split(".")
        if t.tensor_type.name not in L.QUANT_TYPES:
            continue
        raw = np.array(t.data)
        if parts[0] == "blk" and parts[2] in names:
            if parts[2] == "attn_q":
                raw = raw[rows_perm(raw.shape[0], cfg.num_attention_heads)]
            elif parts[2] == "attn_k":
                raw = raw[rows_perm(raw.shape[0], cfg.num_key_value_heads)]
            blocks[f"model.layers.{parts[1]}.{names[parts[2]]}.weight"] = (raw, int(t.tensor_type), raw.shape[0])
        elif t.name in ("output.weight", "token_embd.weight") and (t.name == "output.weight"
                                                                    or "lm_head.weight" not in blocks):
            blocks["lm_head.weight"] = (raw, int(t.tensor_type), raw.shape[0])
    out = {"tokens": int(ids.shape[1])}
    for act in ("f32", "int16", "int8"):
        q = AutoModelForCausalLM.from_pretrained(model_path.parent, gguf_file=model_path.name,
                                                 dtype=torch.float32).eval()
        tensors = {}
        for name, (raw, tid, n) in blocks.items():
            in_f = q.get_submodule(name[:-7]).in_features
            tensors[name] = (raw, tid, (n, in_f))
        QM.load_quantized_linears(q, tensors, act=act, threads=threads)
        with torch.inference_mode():
            lp = torch.log_softmax(q(ids).logits[0].float(), -1)
        out[f"herd-{act}"] = (ref.exp() * (ref - lp)).sum(-1).mean().item()
        out[f"herd-{act} top1 agreement"] = (lp.argmax(-1) == ref.argmax(-1)).float().mean().item()
    try:
        import llama_cpp
    except ImportError:
        return out
    llm = llama_cpp.Llama(str(model_path), n_ctx=1024, n_threads=threads, logits_all=True, verbose=False)
    llm.eval(ids[0].tolist())
    lp = torch.log_softmax(torch.from_numpy(np.array(llm.scores[:ids.shape[1]], dtype=np.float32)), -1)
    out["llama.cpp"] = (ref.exp() * (ref - lp)).sum(-1).mean().item()
    out["llama.cpp top1 agreement"] = (lp.argmax(-1) == ref.argmax(-1)).float().mean().item()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--rows", default="1,8,128,512")
    ap.add_argument("--variants", default="herd-int16,herd-int8,herd-f32,fallback,torch-f32")
    ap.add_argument("--quick", action="store_true", help="rows 1,8 only, no fallback")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--kl", action="store_true", help="also measure mean KL from float32 on the default model")
    ap.add_argument("--model", default=None, help="GGUF file for --kl (default: the default model)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [1, 8] if args.quick else [int(r) for r in args.rows.split(",")]
    variants = args.variants.split(",")
    if args.quick:
        variants = [v for v in variants if v != "fallback"]
    if native.load() is None:
        print(f"native kernels unavailable ({native.load_error()}): herd-* rows use the fallback")
    bw, peak = bandwidth_gbs(), gemm_peak_gflops()
    print(f"threads {args.threads}, isa {native.ISA_NAMES.get(native.best_isa(), 'none')}, read bandwidth "
          f"{bw:.1f} GB/s, float32 GEMM {peak:.0f} GFLOP/s")
    overhead = call_overhead_us(args.threads)
    print("per-call time of a tiny 32x64 layer: " + ", ".join(f"{k} {v:.1f} us" for k, v in overhead.items()))
    results = []
    for label, tname, n, k, _ in SHAPES:
        results += bench_shape(label, tname, n, k, rows, args.threads, variants, bw, peak)
    est = model_estimates(results, variants)
    for key, vals in est.items():
        print(f"{key:36s} " + "  ".join(f"{v} {t:8.1f}" for v, t in vals.items()))

    kl = None
    if args.kl:
        model = args.model
        if model is None:
            from herd.hub import resolve

            model = resolve("smollm2-135m-instruct")
        kl = measure_kl(model, args.threads)
        print("mean KL from float32 (teacher forced, %d tokens): " % kl["tokens"]
              + ", ".join(f"{k} {v:.3g}" for k, v in kl.items() if k != "tokens"))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"threads": args.threads, "isa": native.best_isa(), "bandwidth_gbs": bw, "gemm_peak_gflops": peak,
            "tiny_call_us": overhead,
            "cpu": platform.processor() or platform.machine(), "torch": torch.__version__}
    (out / "kernels.json").write_text(json.dumps({"meta": meta, "layers": results, "model": est, "kl": kl}, indent=1))
    cols = [v for v in variants + ["bound"]]
    lines = [f"threads {args.threads}; read bandwidth {bw:.1f} GB/s; float32 GEMM {peak:.0f} GFLOP/s; times in us "
             "(decode rows: 10th percentile of calls on DRAM-resident weights; others: minimum); a call on a tiny 32x64 layer: "
             + ", ".join(f"{k} {v:.1f} us" for k, v in overhead.items()),
             "bound = weight bytes / read bandwidth, or 2*M*N*K at the float32 GEMM peak, whichever is larger "
             "(the integer kernels can beat the latter)", "", "| layer | M | " + " | ".join(cols) + " |",
             "|---|---:|" + "---:|" * len(cols)]
    for r in results:
        lines.append(f"| {r['shape']} {r['type']} | {r['m']} | "
                     + " | ".join(f"{r[c] * 1e6:.1f}" if c in r else "-" for c in cols) + " |")
    lines += ["", "Whole model, linear layers only:", "", "| figure | " + " | ".join(cols) + " |",
              "|---|" + "---:|" * len(cols)]
    for key, vals in est.items():
        lines.append(f"| {key} | " + " | ".join(f"{vals[c]:.0f}" if c in vals else "-" for c in cols) + " |")
    if kl:
        lines += ["", f"Mean KL from float32 over {kl['tokens']} tokens (teacher forced), and top-1 agreement:", "",
                  "| engine | KL | top-1 |", "|---|---:|---:|"]
        for key in [k for k in kl if k != "tokens" and "top1" not in k]:
            lines.append(f"| {key} | {kl[key]:.3g} | {kl.get(key + ' top1 agreement', float('nan')):.3f} |")
    (out / "kernels.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'kernels.json'} and {out / 'kernels.md'}")


if __name__ == "__main__":
    main()

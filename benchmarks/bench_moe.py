"""Decode speed of a Llama 4 mixture-of-experts model against dense models: cost follows active parameters.

Three random float32 models share everything but the feed-forward layers:
  dense-active  a dense model whose FFN has the MoE layer's active size (shared expert + one routed expert),
  moe-16e-top1  the MoE model: 16 routed experts, top-1, plus the shared expert, in every layer,
  dense-total   a dense model whose FFN holds as many parameters as all 17 experts of the MoE layer.
herd should decode the MoE model about as fast as dense-active and far faster than dense-total. transformers'
Llama4ForCausalLM runs on the same MoE weights as a peer (it runs every expert on every token, inputs scaled by 0).
A fourth row, moe-16e-top1 with --quant-experts (default q4_0), is the same MoE model with its routed experts held
as GGML blocks (herd.quant.experts.QuantExperts via quantize_model; attention, shared expert, embedding and output
stay float32): it shows what quantized experts buy when the rest of the step is float.

Decode tok/s is measured as extra tokens over extra time (DECODE_SHORT vs DECODE_LONG new tokens, batch 1, greedy),
so the prompt cancels out; the decoders take turns over --rounds rounds and each keeps its best times (the machine's
load then slows them alike). The bound is memory bandwidth / bytes of weights one decode step reads (the active
weights, the embedding table excepted: a step reads one row of it). One thread by default: on a shared 2-core machine
two threads per process oversubscribe the cores and the timings swing by 10x.

    python benchmarks/bench_moe.py [--threads 1] [--dim 512] [--layers 8] [--expert-ffn 512] [--rounds 3]
                                   [--quant-experts q4_0|q4_1|...|none] [--no-transformers] [--out DIR]
Writes bench_moe.json, bench_moe.md and bench_moe.png to --out (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from herd.config import ModelConfig, MoEConfig  # noqa: E402
from herd.models.kv_cache import KVCache  # noqa: E402
from herd.models.llama import Transformer  # noqa: E402
from herd.quant.blocks import GGML_TYPES  # noqa: E402
from herd.quant.model import quantize_model  # noqa: E402

PROMPT = 16
DECODE_SHORT, DECODE_LONG = 16, 80
N_EXPERTS = 16


def configs(dim: int, layers: int, expert_ffn: int, vocab: int) -> dict[str, ModelConfig]:
    base = ModelConfig(dim=dim, n_layers=layers, n_heads=dim // 64, n_kv_heads=max(1, dim // 256), vocab_size=vocab,
                       ffn_dim=2 * expert_ffn, rope_theta=500000.0, max_seq_len=4096, family="llama4",
                       nope_layer_interval=4, attention_chunk_size=8192, use_qk_norm=True)
    return {
        "dense-active": base,  # shared + one expert: 2 * expert_ffn
        f"moe-{N_EXPERTS}e-top1": base.replace(moe=MoEConfig(n_experts=N_EXPERTS, top_k=1, expert_ffn_dim=expert_ffn)),
        "dense-total": base.replace(ffn_dim=(N_EXPERTS + 1) * expert_ffn),  # all experts + shared
    }


def random_model(config: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02 if p.dim() < 3 else 0.05)
    return model.eval().requires_grad_(False)


def _best(fn, repeat=2) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def herd_decoder(model: Transformer, prompt: torch.Tensor):
    """run(n): prefill the prompt, then n greedy decode steps with herd's KV cache."""
    def run(n):
        cache = KVCache(model.config, batch=1, max_len=PROMPT + DECODE_LONG + 1)
        logits = model(prompt, torch.arange(PROMPT), cache, last_only=True)
        for t in range(PROMPT, PROMPT + n):
            tok = logits[:, -1].argmax(-1, keepdim=True)
            logits = model(tok, torch.tensor([t]), cache)

    return run


def transformers_decoder(model: Transformer, prompt: torch.Tensor, folder: str):
    """The same MoE weights in transformers' Llama4ForCausalLM: run(n) = greedy generate of n tokens."""
    from transformers import Llama4ForCausalLM

    from herd.formats.llama4 import save_hf_llama4

    save_hf_llama4(folder, model.config, model.state_dict())
    ref = Llama4ForCausalLM.from_pretrained(folder).eval()

    def run(n):
        ref.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    return run


def decode_tok_s(runs: dict, rounds: int) -> dict:
    """Extra tokens over extra time for each decoder; the rounds interleave the decoders so that a machine whose
    load changes slows them alike, and each keeps its best time."""
    best = {k: [float("inf"), float("inf")] for k in runs}
    with torch.no_grad():
        for run in runs.values():
            run(4)  # warm-up
        for _ in range(rounds):
            for k, run in runs.items():
                best[k][0] = min(best[k][0], _best(lambda: run(DECODE_SHORT), 1))
                best[k][1] = min(best[k][1], _best(lambda: run(DECODE_LONG), 1))
    return {k: (DECODE_LONG - DECODE_SHORT) / (long - short) for k, (short, long) in best.items()}


def memory_bandwidth_gbs(mb: int = 512) -> float:
    x = torch.ones(mb * 2**20 // 4, dtype=torch.float32)
    x.sum()
    return x.numel() * 4 / _best(lambda: x.sum(), repeat=5) / 1e9


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--expert-ffn", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quant-experts", default="q4_0", help="scheme of the quantized-experts row, or 'none'")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    bw = memory_bandwidth_gbs()
    prompt = torch.randint(0, args.vocab, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    cfgs = configs(args.dim, args.layers, args.expert_ffn, args.vocab)
    models = {name: random_model(config) for name, config in cfgs.items()}
    moe_name = next(n for n, c in cfgs.items() if c.moe is not None)
    weights = {name: "float32" for name in cfgs}
    if args.quant_experts != "none":  # the same MoE weights (same seed), routed experts quantized
        qname = f"{moe_name}-{args.quant_experts}"
        models[qname] = random_model(cfgs[moe_name])
        quantize_model(models[qname], args.quant_experts, include=r"\.experts$")
        cfgs[qname], weights[qname] = cfgs[moe_name], f"{args.quant_experts} experts"
    runs = {(name, "herd"): herd_decoder(m, prompt) for name, m in models.items()}
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_transformers:
            runs[(moe_name, "transformers")] = transformers_decoder(models[moe_name], prompt, tmp)
        rates = decode_tok_s(runs, args.rounds)
    rows = []
    for (name, engine), tok_s in rates.items():
        config = cfgs[name]
        total, active = config.param_counts()
        read = (active - (config.vocab_size - 1) * config.dim) * 4  # bytes of weights one decode step reads
        if weights[name] != "float32":  # the active routed experts' weights are blocks: bytes per weight qk / bs
            _, qk, bs = GGML_TYPES[args.quant_experts.upper()]
            m = config.moe
            n_moe = sum(config.is_moe_layer(i) for i in range(config.n_layers))
            expert_params = n_moe * m.top_k * 3 * config.dim * m.expert_ffn_dim
            read -= expert_params * (4 - bs / qk)
        rows.append({"model": name, "engine": engine, "weights": weights[name], "total_params": total,
                     "active_params": active,
                     "bytes_per_token": read, "decode_tok_s": tok_s, "ms_per_token": 1000 / tok_s,
                     "bound_tok_s": bw * 1e9 / read, "fraction_of_bound": tok_s / (bw * 1e9 / read)})
        print(f"[bench_moe] {name:<19} {engine:<13} {tok_s:8.1f} tok/s", flush=True)

    herd_rate = {r["model"]: r["decode_tok_s"] for r in rows if r["engine"] == "herd"}
    moe = moe_name
    report = {
        "threads": args.threads, "dim": args.dim, "layers": args.layers, "expert_ffn": args.expert_ffn,
        "vocab": args.vocab, "rounds": args.rounds, "experts": N_EXPERTS, "top_k": 1, "dtype": "float32",
        "bandwidth_gb_s": bw,
        "load_average": os.getloadavg(), "torch": torch.__version__, "rows": rows,
        "ratios": {"moe / dense-active": herd_rate[moe] / herd_rate["dense-active"],
                   "moe / dense-total": herd_rate[moe] / herd_rate["dense-total"],
                   "active params moe / dense-active": rows_of(rows, moe)["active_params"]
                   / rows_of(rows, "dense-active")["active_params"],
                   "total params moe / dense-active": rows_of(rows, moe)["total_params"]
                   / rows_of(rows, "dense-active")["total_params"]},
    }
    if args.quant_experts != "none":
        q = f"{moe}-{args.quant_experts}"
        report["quant_experts"] = args.quant_experts
        report["ratios"].update({f"moe {args.quant_experts} experts / moe float": herd_rate[q] / herd_rate[moe],
                                 f"moe {args.quant_experts} experts / dense-active": herd_rate[q]
                                 / herd_rate["dense-active"]})
    (out / "bench_moe.json").write_text(json.dumps(report, indent=2))
    md = markdown(report)
    (out / "bench_moe.md").write_text(md)
    chart(report, out / "bench_moe.png")
    print(md)
    return 0


def rows_of(rows, model):
    return next(r for r in rows if r["model"] == model and r["engine"] == "herd")


def markdown(report) -> str:
    lines = [f"Random models (float32 unless the weights column says otherwise), D {report['dim']}, "
             f"{report['layers']} layers, expert FFN {report['expert_ffn']}, vocab {report['vocab']}; {report['threads']} thread(s); memory read bandwidth "
             f"{report['bandwidth_gb_s']:.1f} GB/s; load average at the end {report['load_average'][0]:.1f}.", "",
             "| model | engine | weights | total params | active params | decode tok/s | ms/token | bound tok/s | "
             "of bound |", "|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['model']} | {r['engine']} | {r.get('weights', 'float32')} | "
                     f"{r['total_params'] / 1e6:.1f} M | "
                     f"{r['active_params'] / 1e6:.1f} M | {r['decode_tok_s']:.1f} | {r['ms_per_token']:.2f} | "
                     f"{r['bound_tok_s']:.0f} | {r['fraction_of_bound']:.0%} |")
    lines.append("")
    lines += [f"- {k}: {v:.2f}x" for k, v in report["ratios"].items()]
    return "\n".join(lines) + "\n"


def chart(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    labels = [f"{r['model']}\n{r['engine']}" for r in rows]
    colors = ["#c75" if r["engine"] != "herd" else "#2a7" if r.get("weights", "float32") == "float32" else "#47c"
              for r in rows]
    ax1.bar(labels, [r["decode_tok_s"] for r in rows], color=colors)
    ax1.set_title("decode tok/s (batch 1)")
    ax1.tick_params(axis="x", labelsize=7)
    for i, r in enumerate(rows):
        ax1.text(i, r["decode_tok_s"], f"{r['decode_tok_s']:.0f}", ha="center", va="bottom", fontsize=8)
    herd = [r for r in rows if r["engine"] == "herd"]
    for key, marker, label in (("active_params", "o", "active params"), ("total_params", "s", "total params")):
        ax2.scatter([r[key] / 1e6 for r in herd], [r["ms_per_token"] for r in herd], marker=marker, label=label)
    for r in herd:
        ax2.annotate(r["model"], (r["active_params"] / 1e6, r["ms_per_token"]), fontsize=7)
    ax2.set_xlabel("parameters (M)")
    ax2.set_ylabel("ms per token (herd)")
    ax2.set_title("time per token follows active parameters")
    ax2.legend(fontsize=7)
    quant = f" (one row: {report['quant_experts']} experts)" if report.get("quant_experts") else ""
    fig.suptitle(f"Llama 4 MoE ({report['experts']} experts, top-1) vs dense, {report['threads']} thread(s), "
                 f"float32{quant}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())

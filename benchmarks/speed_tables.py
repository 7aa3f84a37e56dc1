"""The README's "## Speed" tables, built only from result files in benchmarks/results (one PNG per table).

Reads bench_cpu_*.json (`herd bench cpu`), serve_herd[.Q4_0].json / serve_llama_server[.Q4_0].json (`benchmarks/peers.py serve`)
and quality.json (`benchmarks/quality.py`); writes benchmarks/results/speed.md and speed_*.png, and lists where
herd falls short of issue 12's targets.

    python benchmarks/speed_tables.py [--results DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
FORMATS = ("Q4_1", "Q4_0", "Q8_0", "Q4_K_M", "Q6_K")


def _idx(report: dict) -> dict:
    return {e: {(r["test"], r["threads"], r["depth"]): r for run in runs for r in run.get("results", [])}
            for e, runs in report["engines"].items()}


def _ms(r) -> str:
    return f"{r['tok_s_mean']:.0f} ± {r['tok_s_stddev']:.0f}" if r else "-"


def _ratio(h, lc) -> float | None:
    return h["tok_s_mean"] / lc["tok_s_mean"] if h and lc else None


def _rs(x) -> str:
    return f"{x:.2f}x" if x is not None else "-"


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _busy(report) -> str:
    return " **BUSY**" if report.get("busy") else ""


def _source(report: dict, path: Path) -> str:
    h = report["herd"]
    return (f"From `{_rel(path)}` (`{report['command']}`; herd {str(h['commit'])[:10]}"
            f"{' with uncommitted changes' if h.get('dirty') else ''}, load {report['load_before']['1m']:.2f} before / "
            f"{report['load_after']['1m']:.2f} after){_busy(report)}.")


def format_table(report: dict, path: Path, shortfalls: list[str], fmt: str) -> list[str]:
    idx = _idx(report)
    h, lc = idx.get("herd", {}), idx.get("llama.cpp", {})
    types = ", ".join(f"{k} {v}" for k, v in report["file"]["tensor_types"].items())
    out = [f"**{fmt}** (`{Path(report['model']).name}`, {report['file']['file_bytes'] / 1e6:.0f} MB; tensor types: "
           f"{types})", "",
           "| threads | depth | herd pp512 | llama.cpp pp512 | ratio | herd tg128 | llama.cpp tg128 | ratio | "
           "herd tg % of bound |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    keys = sorted({(k[1], k[2]) for k in list(h) + list(lc) if k[0] in ("pp512", "tg128")})
    for t, d in keys:
        hp, lp, ht, lt = h.get(("pp512", t, d)), lc.get(("pp512", t, d)), h.get(("tg128", t, d)), lc.get(("tg128", t, d))
        rp, rt = _ratio(hp, lp), _ratio(ht, lt)
        frac = f"{ht['fraction_of_bound']:.0%}" if ht and "fraction_of_bound" in ht else "-"
        out.append(f"| {t} | {d} | {_ms(hp)} | {_ms(lp)} | {_rs(rp)} | {_ms(ht)} | {_ms(lt)} | {_rs(rt)} | {frac} |")
        if rt is not None and d == 0 and rt < 1.2:
            shortfalls.append(f"{fmt}, {t} thread(s), depth 0: decode {rt:.2f}x llama-bench (target 1.2x)")
        if rt is not None and d > 0 and rt < 1.0:
            shortfalls.append(f"{fmt}, {t} thread(s), depth {d}: decode {rt:.2f}x (target 1.0x)")
        if rp is not None and d == 0 and rp < 1.5:
            shortfalls.append(f"{fmt}, {t} thread(s), depth 0: prefill {rp:.2f}x llama-bench pp512 (target 1.5x)")
    extra = []
    for t in sorted({k[1] for k in h}):
        hb, lb = h.get(("b8_tg128", t, 0)), lc.get(("b8_tg128", t, 0))
        if hb or lb:
            extra.append(f"batch-8 decode at {t} thread(s): herd {_ms(hb)}, llama-batched-bench {_ms(lb)} tok/s "
                         f"({_rs(_ratio(hb, lb))})")
    rss = _rss(report)
    for t, (hr, lr) in rss.items():
        extra.append(f"peak RSS at {t} thread(s): herd {hr:.0f} MB, llama-bench {lr:.0f} MB ({hr / lr:.2f}x)")
        if hr / lr > 1.3:
            shortfalls.append(f"{fmt}, {t} thread(s): peak RSS {hr / lr:.2f}x llama-bench's (target 1.3x)")
    out += ["", "; ".join(extra) + ".", "", _source(report, path),
            f"![{fmt}]({_rel(path.with_name(path.name.removesuffix('.json') + '.png'))})", ""]
    return out


def _rss(report) -> dict:
    out = {}
    for hrun in report["engines"].get("herd", []):
        for lrun in report["engines"].get("llama.cpp", []):
            if hrun["threads"] == lrun["threads"] and "peak_rss_mb" in hrun and "peak_rss_mb" in lrun:
                out[hrun["threads"]] = (hrun["peak_rss_mb"], lrun["peak_rss_mb"])
    return out


def shapes_table(reports: list[tuple[Path, dict]], shortfalls: list[str], png: Path) -> list[str]:
    out = ["| model | MB | herd pp512 | llama.cpp pp512 | ratio | herd tg128 | llama.cpp tg128 | ratio | "
           "bound tok/s | herd % bound | llama.cpp % bound | peak RSS herd / llama.cpp (MB) |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    bars = []
    for path, rep in reports:
        idx = _idx(rep)
        h, lc = idx.get("herd", {}), idx.get("llama.cpp", {})
        name = Path(rep["model"]).name.removesuffix(".gguf").removeprefix("random-")
        for t in sorted({k[1] for k in h}):
            hp, lp, ht, lt = h.get(("pp512", t, 0)), lc.get(("pp512", t, 0)), h.get(("tg128", t, 0)), lc.get(("tg128", t, 0))
            rp, rt = _ratio(hp, lp), _ratio(ht, lt)
            bound = ht["bound_tok_s"] if ht else None
            fh = f"{ht['fraction_of_bound']:.0%}" if ht else "-"
            fl = f"{lt['fraction_of_bound']:.0%}" if lt and "fraction_of_bound" in lt else "-"
            rss = _rss(rep).get(t)
            rs = f"{rss[0]:.0f} / {rss[1]:.0f}" if rss else "-"
            out.append(f"| {name}{_busy(rep)} ({t} thr) | {rep['file']['file_bytes'] / 1e6:.0f} | {_ms(hp)} | "
                       f"{_ms(lp)} | {_rs(rp)} | {_ms(ht)} | {_ms(lt)} | {_rs(rt)} | "
                       f"{bound:.1f} | {fh} | {fl} | {rs} |" if bound else f"| {name} | - |")
            bars.append((name, ht, lt, bound))
            if rt is not None and rt < 1.1:
                shortfalls.append(f"{name}: decode {rt:.2f}x llama.cpp (target 1.1x)")
            if ht and ht.get("fraction_of_bound", 1) < 0.7:
                shortfalls.append(f"{name}: decode at {ht['fraction_of_bound']:.0%} of the bandwidth bound (target 70%)")
            if rp is not None and rp < 1.2:
                shortfalls.append(f"{name}: prefill {rp:.2f}x llama.cpp (target 1.2x)")
    out += [""] + [_source(rep, path) for path, rep in reports] + [f"![1B and 3B shapes]({_rel(png)})", ""]
    _bar_chart(png, [b[0] for b in bars], {"herd tg128": [b[1]["tok_s_mean"] if b[1] else 0 for b in bars],
                                           "llama.cpp tg128": [b[2]["tok_s_mean"] if b[2] else 0 for b in bars],
                                           "bandwidth bound": [b[3] or 0 for b in bars]},
               "decode tok/s, 2 threads, depth 0 (random weights)")
    return out


def load_serve(results: Path, stem: str) -> tuple[dict, list[Path]] | None:
    """A serving result: STEM.json, or the rounds STEM.rN.json (run_speed.sh alternates the two servers round by
    round) merged: at each concurrency the round with the median output tokens/s (the lower of the two middle
    ones), with every round's figure kept in "rounds" for the table's range."""
    files = sorted(results.glob(f"{stem}.r*.json"))
    if not files:
        one = results / f"{stem}.json"
        return (json.loads(one.read_text()), [one]) if one.is_file() else None
    runs = [json.loads(f.read_text()) for f in files]
    merged = dict(runs[0], levels=[], machine=dict(runs[0]["machine"], busy=any(r["machine"]["busy"] for r in runs)))
    for c in sorted({x["concurrency"] for r in runs for x in r["levels"]}):
        at = sorted((x for r in runs for x in r["levels"] if x["concurrency"] == c),
                    key=lambda x: x["output_tokens_per_s"])
        merged["levels"].append(dict(at[(len(at) - 1) // 2], rounds=[x["output_tokens_per_s"] for x in at]))
    return merged, files


def serve_table(herd: dict, lc: dict, shortfalls: list[str], png: Path, paths, fmt: str = "Q4_1") -> list[str]:
    out = ["| concurrency | herd out tok/s | llama-server out tok/s | ratio | herd TTFT p50 / p99 (ms) | "
           "llama-server TTFT p50 / p99 (ms) | herd TPOT mean (ms) | llama-server TPOT mean (ms) |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    hl = {x["concurrency"]: x for x in herd["levels"]}
    ll = {x["concurrency"]: x for x in lc["levels"]}
    for c in sorted(set(hl) | set(ll)):
        a, b = hl.get(c), ll.get(c)
        ratio = a["output_tokens_per_s"] / b["output_tokens_per_s"] if a and b else None
        f = lambda x: (f"{x['output_tokens_per_s']:.0f}" + (f" ({min(x['rounds']):.0f}-{max(x['rounds']):.0f})"  # noqa: E731
                       if len(x.get("rounds", [])) > 1 else "")) if x else "-"
        tt = lambda x: f"{x['ttft_ms']['p50']:.0f} / {x['ttft_ms']['p99']:.0f}" if x else "-"  # noqa: E731
        tp = lambda x: f"{x['tpot_ms']['mean']:.1f}" if x else "-"  # noqa: E731
        out.append(f"| {c} | {f(a)} | {f(b)} | {_rs(ratio)} | {tt(a)} | {tt(b)} | {tp(a)} | {tp(b)} |")
        if a and b and c == 16:
            if ratio < 2:
                shortfalls.append(f"serving {fmt}, 16 streams: {ratio:.2f}x llama-server's output tokens/s (target 2x)")
            if a["ttft_ms"]["p99"] > b["ttft_ms"]["p99"]:
                shortfalls.append(f"serving {fmt}, 16 streams: p99 TTFT {a['ttft_ms']['p99']:.0f} ms vs "
                                  f"{b['ttft_ms']['p99']:.0f} ms (target: at most llama-server's)")
        if a and b and c == 1 and a["tpot_ms"]["mean"] > b["tpot_ms"]["mean"]:
            shortfalls.append(f"serving {fmt}, 1 stream: TPOT {a['tpot_ms']['mean']:.1f} ms vs "
                              f"{b['tpot_ms']['mean']:.1f} ms (target: at most llama-server's)")
    cs = sorted(set(hl) & set(ll))
    _bar_chart(png, [str(c) for c in cs], {"herd serve": [hl[c]["output_tokens_per_s"] for c in cs],
                                           "llama-server -np 16": [ll[c]["output_tokens_per_s"] for c in cs]},
               f"output tokens/s by concurrency (default model {fmt})")
    busy = " **BUSY**" if herd["machine"]["busy"] or lc["machine"]["busy"] else ""
    rounds = max(len(x.get("rounds", [0])) for x in herd["levels"] + lc["levels"])
    if rounds > 1:
        busy += (f"; {rounds} rounds, the two servers in turns, each figure the median round (range in brackets; "
                 "TTFT and TPOT from that round)")
    out += ["", f"From `{', '.join(_rel(p) for p in paths[0])}` (`{' '.join(herd['server_command'][1:])}`) and "
                f"`{', '.join(_rel(p) for p in paths[1])}` "
                f"(`{' '.join(Path(lc['server_command'][0]).name if i == 0 else a for i, a in enumerate(lc['server_command']))}`)"
                f", run by `benchmarks/peers.py serve`{busy}.", f"![serving]({_rel(png)})", ""]
    return out


def quality_table(q: dict, shortfalls: list[str], png: Path, path: Path) -> list[str]:
    out = ["| format | herd KLD (int16 act) | herd KLD (int8 act) | llama.cpp KLD | herd same top % | "
           "llama.cpp same top % | herd ΔPPL | llama.cpp ΔPPL |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    names, vals = [], {"herd int16": [], "herd int8": [], "llama.cpp": []}
    for fmt, r in q["formats"].items():
        h16, h8, lc = r.get("herd int16 act", {}), r.get("herd int8 act", {}), r.get("llama.cpp f16 KV", {})
        k = lambda e: f"{e['kld_mean']:.3g} ± {e['kld_err']:.2g}" if "kld_mean" in e else "-"  # noqa: E731
        s = lambda e: f"{e['same_top_p']:.1f}" if "same_top_p" in e else "-"  # noqa: E731
        d = lambda e: f"{e['delta_ppl']:+.3f} ± {e['delta_ppl_err']:.3f}" if "delta_ppl" in e else "-"  # noqa: E731
        out.append(f"| {fmt} | {k(h16)} | {k(h8)} | {k(lc)} | {s(h16)} | {s(lc)} | {d(h16)} | {d(lc)} |")
        if "kld_mean" in h16 and "kld_mean" in lc and h16["kld_mean"] > lc["kld_mean"]:
            shortfalls.append(f"quality, {fmt}: herd's KLD {h16['kld_mean']:.4f} > llama.cpp's {lc['kld_mean']:.4f} "
                              f"(target: at most llama.cpp's)")
        names.append(fmt)
        for key, e in (("herd int16", h16), ("herd int8", h8), ("llama.cpp", lc)):
            vals[key].append(e.get("kld_mean", 0))
    _bar_chart(png, names, vals, "mean KLD vs the f32 reference (lower is better)")
    out += ["", f"From `{_rel(path)}` (`{q['command']}`){' **BUSY**' if q['busy'] else ''}; reference: the default "
                f"model's Q4_1 weights dequantized to f32; herd/data/sample.txt, ctx 512, {q['chunks']} chunks; both "
                f"tools score the same tokens (herd `--llama-windows`: the second half of each window).",
            f"![quality]({_rel(png)})", ""]
    return out + kv_table(q)


def kv_table(q: dict) -> list[str]:
    """The cost of a smaller KV cache (`--kv-type`, llama.cpp's -ctk/-ctv), both against the f32-KV reference."""
    rows = []
    for fmt, r in q["formats"].items():
        for kv in ("f32", "f16", "q8_0"):
            h = r.get("herd int16 act") if kv == "f32" else r.get(f"herd int16 act, {kv} KV")
            lc = r.get(f"llama.cpp {kv} KV vs f32-KV base") or (r.get("llama.cpp f32 KV") if kv == "f32" else None)
            if not h or (kv != "f32" and "kld_mean" not in h):
                continue
            k = lambda e: f"{e['kld_mean']:.3g} ± {e['kld_err']:.2g}" if e and "kld_mean" in e else "-"  # noqa: E731
            mem = {"f32": "1", "f16": "0.5", "q8_0": "0.27"}[kv]
            rows.append(f"| {fmt} | {kv} | {mem} | {k(h)} | {k(lc)} |")
    if not any("| f16 |" in x or "| q8_0 |" in x for x in rows):
        return []
    return ["### KV cache types: what a smaller cache costs", "",
            "| format | KV cache | memory vs f32 | herd KLD | llama.cpp KLD |", "|---|---|---:|---:|---:|", *rows, "",
            "herd `--kv-type f16|q8_0` against llama.cpp `-ctk/-ctv` of the same type; each tool's KLD against its own "
            "run of the f32 reference with an f32 KV cache (herd's int16 activations; llama.cpp's f32 row: its "
            "`-ctk f32` run where measured).", ""]


def _bar_chart(path: Path, names, series: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(names) + 2), 3.6))
    w = 0.8 / max(1, len(series))
    for j, (label, vals) in enumerate(series.items()):
        xs = [i + j * w for i in range(len(names))]
        ax.bar(xs, vals, w, label=label)
        for x, v in zip(xs, vals):
            ax.text(x, v, f"{v:.3g}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks([i + w * (len(series) - 1) / 2 for i in range(len(names))])
    ax.set_xticklabels(names, fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build(results: Path) -> str:
    shortfalls: list[str] = []
    lines: list[str] = []
    per_format = {}
    for p in sorted(results.glob("bench_cpu_*.json")):
        rep = json.loads(p.read_text())
        name = Path(rep["model"]).name
        if name.startswith("SmolLM2-135M-Instruct."):
            per_format[name.split(".")[1]] = (p, rep)
    if per_format:
        lines += ["### Default model, per format: herd vs llama-bench", ""]
        for fmt in FORMATS:
            if fmt in per_format:
                lines += format_table(per_format[fmt][1], per_format[fmt][0], shortfalls, fmt)
    shapes = [(p, json.loads(p.read_text())) for p in sorted(results.glob("bench_cpu_random-*.json"))]
    if shapes:
        lines += ["### Llama 3.2 1B and 3B shapes (random weights)", ""]
        lines += shapes_table(shapes, shortfalls, results / "speed_shapes.png")
    # the default file (Q4_1), then Q4_0: llama.cpp's fastest format here (pp512 1,146 vs 298 tokens/s)
    for fmt, suffix, png in (("Q4_1", "", "speed_serve.png"), ("Q4_0", ".Q4_0", "speed_serve.Q4_0.png")):
        sh, sl = load_serve(results, f"serve_herd{suffix}"), load_serve(results, f"serve_llama_server{suffix}")
        if sh and sl:
            lines += [f"### Serving {fmt}: `herd serve` (default flags) vs `llama-server -np 16 -cb -t 2`", ""]
            lines += serve_table(sh[0], sl[0], shortfalls, results / png, (sh[1], sl[1]), fmt)
    q = results / "quality.json"
    if q.is_file():
        lines += ["### Quality: KL divergence from a float reference", ""]
        lines += quality_table(json.loads(q.read_text()), shortfalls, results / "speed_quality.png", q)
    lines += ["### Where herd falls short of issue 12's targets", ""]
    lines += [f"- {s}" for s in shortfalls] or ["- none in these runs"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    md = build(args.results)
    (args.results / "speed.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

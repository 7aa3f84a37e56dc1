"""Quality the way llama.cpp measures it: KL divergence from a float reference, herd and llama.cpp on the same text.

The reference is an f32 GGUF export of the default model's Q4_1 weights dequantized (`herd convert ... --quant f32`):
the weights every variant in .peers/models was made from, never the file under test. herd: `herd eval ppl --model
FILE --kl-vs REF --json` on its default path, with int16 activations (the default) and int8 (HERD_QUANT_ACT=int8).
llama.cpp: `llama-perplexity -m REF -f TEXT --kl-divergence-base BASE` once, then `llama-perplexity -m FILE
--kl-divergence-base BASE --kl-divergence` (its default f16 KV cache; `--llama-f32-kv` adds a run with -ctk/-ctv f32,
herd's default KV type). Same text (herd/data/sample.txt), same context (512), the same number of chunks, and the
same scored tokens: herd runs with --llama-windows (llama-perplexity's windows; the second half of each predicted);
the KLD of each tool is against the same float reference run by that tool.

The cost of a smaller KV cache (`--kv-types f16,q8_0`, on the formats of `--kv-formats`): herd's `--kv-type X`
and llama.cpp's `-ctk X -ctv X`, both against the reference run with an f32 KV cache.

    python benchmarks/quality.py [--formats Q4_1,Q4_0,...] [--chunks 16] [--threads 2] [--kv-types f16,q8_0]
                                 [--kv-formats Q4_1] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402

from herd.eval.bench import build_info, check_load, herd_version, load_average, system_info  # noqa: E402

ROOT = peers.ROOT
TEXT = ROOT / "herd" / "data" / "sample.txt"


def reference(source: Path) -> Path:
    """The f32 export of `source`'s weights (cached beside the other variants)."""
    out = peers.PEERS / "models" / f"{source.name.split('.')[0]}.ref-f32.gguf"
    if not out.is_file():
        tmp = out.with_name(out.name + ".tmp.gguf")
        subprocess.run([sys.executable, "-m", "herd", "convert", str(source), str(tmp), "--to", "gguf", "--quant",
                        "f32"], check=True)
        tmp.replace(out)
    return out


def format_files(formats: list[str]) -> dict[str, Path]:
    files = {}
    for f in formats:
        if f == "Q4_1":
            files[f] = peers.default_model()
        else:
            files[f] = peers.PEERS / "models" / f"SmolLM2-135M-Instruct.{f}.gguf"
    return files


def herd_kl(model: Path, ref: Path, chunks: int, threads: int, act: str, kv: str = "f32") -> dict:
    cmd = [sys.executable, "-m", "herd", "eval", "ppl", "--model", str(model), "--kl-vs", str(ref), "--json",
           "--ctx", "512", "--max-chunks", str(chunks), "--threads", str(threads), "--file", str(TEXT),
           "--llama-windows", "--kv-type", kv]
    env = dict(os.environ, HERD_QUANT_ACT=act, OMP_NUM_THREADS=str(threads))
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"command": cmd, "error": proc.stderr[-1500:]}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"command": " ".join(cmd), "env": f"HERD_QUANT_ACT={act}", "kv_cache": kv, "wall_s": round(time.time() - t0, 1),
            "kld_mean": res["kld"]["mean"], "kld_err": res["kld"]["err"], "kld_p99": res["kld"]["p99"],
            "same_top_p": 100 * res["same_top_p"], "same_top_p_err": 100 * res["same_top_p_err"],
            "ppl": res["ppl"], "ref_ppl": res["ref_ppl"], "delta_ppl": res["delta_ppl"],
            "delta_ppl_err": res["delta_ppl_err"], "tokens": res["tokens"], "chunks": res["chunks"]}


_NUM = r"(-?[0-9.]+(?:e-?[0-9]+)?)"
PATTERNS = {
    "kld": rf"Mean\s+KLD:\s+{_NUM}\s+±\s+{_NUM}",
    "kld_p99": rf"99\.0%\s+KLD:\s+{_NUM}",
    "same_top_p": rf"Same top p:\s+{_NUM}\s+±\s+{_NUM}",
    "ppl": rf"Mean PPL\(Q\)\s+:\s+{_NUM}\s+±\s+{_NUM}",
    "ref_ppl": rf"Mean PPL\(base\)\s*:\s+{_NUM}\s+±\s+{_NUM}",
    "delta_ppl": rf"Mean PPL\(Q\)-PPL\(base\)\s*:\s+{_NUM}\s+±\s+{_NUM}",
}


def parse_llama_kl(text: str) -> dict:
    """llama-perplexity --kl-divergence's summary lines -> numbers."""
    out = {}
    for key, pat in PATTERNS.items():
        m = re.search(pat, text)
        if m:
            out[key if key != "kld" else "kld_mean"] = float(m.group(1))
            if m.lastindex and m.lastindex > 1:
                out[(key if key != "kld" else "kld") + "_err"] = float(m.group(2))
    return out


def llama_kl(model: Path, base: Path, threads: int, kv: str | None) -> dict:
    cmd = [str(peers.tool("llama-perplexity")), "-m", str(model), "--kl-divergence-base", str(base),
           "--kl-divergence", "-t", str(threads)]
    if kv:
        cmd += ["-ctk", kv, "-ctv", kv]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        return {"command": " ".join(cmd), "error": text[-1500:]}
    return {"command": " ".join(cmd), "kv_cache": kv or "f16", "wall_s": round(time.time() - t0, 1),
            **parse_llama_kl(text)}


def llama_base(ref: Path, chunks: int, threads: int, kv: str | None) -> tuple[Path, str]:
    base = peers.PEERS / "models" / f"{ref.stem}.{kv or 'f16'}kv.{chunks}ch.kld"
    cmd = [str(peers.tool("llama-perplexity")), "-m", str(ref), "-f", str(TEXT), "-c", "512", "--chunks",
           str(chunks), "-t", str(threads), "--kl-divergence-base", str(base)]
    if kv:
        cmd += ["-ctk", kv, "-ctv", kv]
    if not base.is_file():
        subprocess.run(cmd, check=True, capture_output=True)
    return base, " ".join(cmd)


def markdown(report: dict) -> str:
    lines = [("BUSY: taken on a busy machine.\n\n" if report["busy"] else "")
             + f"`{report['command']}`; reference `{Path(report['reference']).name}` (the default model's Q4_1 "
             f"weights dequantized to f32); text herd/data/sample.txt, ctx 512, {report['chunks']} chunks.", "",
             "| format | engine | KLD mean ± err | KLD p99 | same top % | ΔPPL ± err |", "|---|---|---:|---:|---:|---:|"]
    for fmt, r in report["formats"].items():
        for name, e in r.items():
            if "error" in e:
                lines.append(f"| {fmt} | {name} | failed | | | |")
                continue
            lines.append(f"| {fmt} | {name} | {e['kld_mean']:.3g} ± {e.get('kld_err', 0):.2g} | "
                         f"{e.get('kld_p99', float('nan')):.4f} | {e['same_top_p']:.2f} ± {e['same_top_p_err']:.2f} | "
                         f"{e['delta_ppl']:+.4f} ± {e['delta_ppl_err']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default="Q4_1,Q4_0,Q8_0,Q4_K_M,Q6_K")
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-f32-kv", action="store_true", help="also run llama.cpp with an f32 KV cache")
    ap.add_argument("--kv-types", default="", help="smaller KV caches to measure, e.g. f16,q8_0")
    ap.add_argument("--kv-formats", default="Q4_1", help="the formats on which --kv-types are measured")
    ap.add_argument("--out", type=Path, default=peers.RESULTS / "quality.json")
    args = ap.parse_args(argv)
    load_before, busy = check_load(False)
    ref = reference(peers.default_model())
    kv_types = [k for k in args.kv_types.split(",") if k]
    kvs = [None, "f32"] if args.llama_f32_kv or kv_types else [None]
    bases = {kv: llama_base(ref, args.chunks, args.threads, kv) for kv in kvs}
    report = {"command": "python benchmarks/quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "reference": str(ref), "text": str(TEXT), "chunks": args.chunks, "threads": args.threads,
              "busy": busy, "load_before": load_before, "system": system_info(), "herd": herd_version(),
              "llama_cpp": build_info(), "llama_base_commands": {kv or "f16": c for kv, (_, c) in bases.items()},
              "formats": {}}
    for fmt, path in format_files(args.formats.split(",")).items():
        r = {}
        for act in ("int16", "int8"):
            r[f"herd {act} act"] = herd_kl(path, ref, args.chunks, args.threads, act)
        for kv, (base, _) in bases.items():
            if kv is None or args.llama_f32_kv:
                r[f"llama.cpp {kv or 'f16'} KV"] = llama_kl(path, base, args.threads, kv)
        if fmt in args.kv_formats.split(","):
            for kv in kv_types:  # both against the reference with an f32 KV cache
                r[f"herd int16 act, {kv} KV"] = herd_kl(path, ref, args.chunks, args.threads, "int16", kv)
                r[f"llama.cpp {kv} KV vs f32-KV base"] = llama_kl(path, bases["f32"][0], args.threads, kv)
        report["formats"][fmt] = r
        print(json.dumps({fmt: {k: {x: v.get(x) for x in ("kld_mean", "same_top_p", "delta_ppl", "error")}
                                for k, v in r.items()}}), flush=True)
    report["load_after"] = load_average()
    peers.write_results(args.out, report)
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`herd bench cpu`: herd measured the way llama-bench measures itself, beside llama-bench on the same GGUF file.

This module holds the CPU benchmark (`herd bench cpu`, also what a bare `herd bench` runs) and wires
`herd bench serve` (herd/eval/bench_serve.py) in as the other subcommand. It imports herd's engine only inside the
child process that measures herd, so the parent (system info, llama.cpp's tools, the report) stays light.

The one idea: the same tests, the same way, on the same file. llama-bench's pp512 is the time to process a
512-token prompt on top of a cache already holding `depth` tokens, tg128 the time of 128 single-token decode steps
after `depth` tokens; each is repeated `-r` times after a warm-up and reported as mean ± stddev of tokens/s. herd's
child does exactly that on its default path (herd.load keeps the GGUF blocks: native kernels, the C decode step;
prefill and decode are herd.engine.generate's functions), one child per thread count (torch.set_num_threads and
OMP_NUM_THREADS), so peak RSS is its own. Batch-8 decode (aggregate tokens/s) comes from llama-batched-bench for
llama.cpp. Decode is set against a memory-bandwidth bound read from a >= 1 GiB buffer (DRAM, not cache) with the
bytes each engine reads per token: both read the GGUF weight blocks as stored, plus their own KV cache (herd float32,
llama.cpp f16 by default). A run whose 1-minute load average before it exceeds 0.5 per core is marked BUSY
(`--strict` refuses to run instead).

    herd bench [cpu] [--model GGUF] [--threads 1,2] [--depths 0,1024,4096] [--repetitions 5] [--out DIR] [--strict]
    herd bench serve --url URL [--concurrency 1,4,16] [--json]
    python benchmarks/bench_cpu.py ...      (= herd bench cpu)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from herd.eval.machine import (BUSY_LOAD_PER_CORE, REPO, build_info, check_load, foreign_cpu,  # noqa: F401
                               gemm_gflops, herd_version, is_busy, load_average, mean_std, memory_bandwidth,
                               peer_tool, proc_lines, system_info, timed)


# ------------------------------------------------------------------------------------------------ statistics
def row(test: str, threads: int, depth: int, samples_tok_s) -> dict:
    m, s = mean_std(samples_tok_s)
    return {"test": test, "threads": threads, "depth": depth, "tok_s_mean": m, "tok_s_stddev": s,
            "repetitions": len(samples_tok_s), "samples_tok_s": [float(x) for x in samples_tok_s]}


def ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated non-negative integers, got {text!r}")
    return values


# ------------------------------------------------------------------------------------------------ the model file
def file_facts(path: Path) -> dict:
    """Tensor type counts, the bytes one decode step reads from the weights, parameter count, KV shape."""
    from collections import Counter

    from herd.formats.gguf_file import read_gguf

    g = read_gguf(path)
    types = Counter(t.type_name for t in g.tensors.values())
    by_type_bytes = Counter()
    nbytes = {name: int(t.data.nbytes) for name, t in g.tensors.items()}
    for name, t in g.tensors.items():
        by_type_bytes[t.type_name] += nbytes[name]
    emb = g.tensors.get("token_embd.weight")
    tied = "output.weight" not in g.tensors
    weights = sum(nbytes.values())
    if emb is not None and not tied:  # the embedding table is read one row per token; output.weight in full
        weights -= nbytes["token_embd.weight"] - nbytes["token_embd.weight"] // emb.shape[0]
    elif emb is not None:  # tied: the output layer reads token_embd in full, the lookup one row more
        weights += nbytes["token_embd.weight"] // emb.shape[0]
    a = g.architecture
    md = g.metadata
    n_layers, dim = int(md[f"{a}.block_count"]), int(md[f"{a}.embedding_length"])
    n_heads = int(md[f"{a}.attention.head_count"])
    n_kv = int(md.get(f"{a}.attention.head_count_kv", n_heads))
    head_dim = int(md.get(f"{a}.attention.key_length", dim // n_heads))
    params = sum(math.prod(t.shape) for t in g.tensors.values())
    matmul_params = params - (0 if tied else math.prod(emb.shape)) if emb is not None else params
    return {"file": str(path), "file_bytes": path.stat().st_size, "tensor_types": dict(types.most_common()),
            "tensor_bytes_by_type": dict(by_type_bytes.most_common()), "tied_output": tied,
            "weight_bytes_per_token": weights, "parameters": params, "matmul_parameters": matmul_params,
            "n_layers": n_layers, "n_kv_heads": n_kv, "head_dim": head_dim}


def kv_bytes_per_token(facts: dict, depth: int, elem_bytes: float) -> float:
    """Bytes of K and V one decode step reads at context `depth` (every layer, every KV head)."""
    return 2 * facts["n_layers"] * facts["n_kv_heads"] * facts["head_dim"] * elem_bytes * depth


KV_ELEM_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}


# ------------------------------------------------------------------------------------------------ herd (child)
def herd_child(spec: dict) -> dict:
    """Runs in its own process: load the file on herd's default path and time pp / tg / batch decode."""
    import torch

    threads = spec["threads"]
    torch.set_num_threads(threads)
    import herd
    from herd.engine.generate import activation_dtype_device, decode, prefill
    from herd.models.kv_cache import KVCache

    t0 = time.perf_counter()
    llm = herd.load(spec["model"])
    load_s = time.perf_counter() - t0
    rss_after_load = vm_hwm_mb()
    model = llm.model
    cfg = model.config
    native = getattr(model, "decode_step", None) is not None
    n_prompt, n_gen, reps = spec["n_prompt"], spec["n_gen"], spec["repetitions"]
    depths = sorted(set(spec["depths"]))
    gen = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(0, cfg.vocab_size, (1, n), generator=gen)  # noqa: E731 (llama-bench: random)
    depth_ids, pp_ids = rand(max(depths) if max(depths) else 1), rand(n_prompt)
    dtype, device = activation_dtype_device(model)
    cache = KVCache(cfg, batch=1, max_len=max(depths) + max(n_prompt, n_gen) + 1, dtype=dtype, device=device)
    rows = []

    def pp(d):
        prefill(model, pp_ids, torch.arange(d, d + n_prompt), cache)

    def tg(d, n):
        tok = pp_ids[:, :1]
        for i in range(n):
            logits = decode(model, tok, torch.tensor([[d + i]]), cache)
            tok = logits[:, -1].argmax(-1, keepdim=True)

    with torch.inference_mode():
        filled = 0
        for d in depths:
            if d > filled:  # the cache keeps no length: positions below d hold the depth tokens from earlier fills
                prefill(model, depth_ids[:, filled:d], torch.arange(filled, d), cache)
            filled = d
            if n_prompt:
                pp(d)  # warm-up, as llama-bench
                rows.append(row(f"pp{n_prompt}", threads, d, [n_prompt / timed(lambda: pp(d)) for _ in range(reps)]))
            if n_gen:
                tg(d, 2)
                rows.append(row(f"tg{n_gen}", threads, d, [n_gen / timed(lambda: tg(d, n_gen)) for _ in range(reps)]))
            # pp and tg overwrote positions d.. with their own tokens; below d the depth tokens stay
        batch = spec.get("batch", 0)
        if batch and n_gen:
            del cache
            bpp = spec.get("batch_prompt", 32)
            bcache = KVCache(cfg, batch=batch, max_len=bpp + n_gen + 1, dtype=dtype, device=device)
            prompts = [rand(bpp) for _ in range(batch)]

            def batch_decode(n):
                for r, p in enumerate(prompts):  # prompts are not timed (llama-batched-bench's S_TG)
                    prefill(model, p, torch.arange(bpp), bcache.rows(r))
                toks = torch.cat([p[:, :1] for p in prompts])
                t = time.perf_counter()
                for i in range(n):
                    logits = decode(model, toks, torch.full((batch, 1), bpp + i), bcache)
                    toks = logits[:, -1].argmax(-1, keepdim=True)
                return time.perf_counter() - t

            batch_decode(2)
            rows.append(row(f"b{batch}_tg{n_gen}", threads, 0,
                            [batch * n_gen / batch_decode(n_gen) for _ in range(spec.get("batch_repetitions", reps))]))
    return {"engine": "herd", "threads": threads, "load_s": load_s, "native_decode_step": native,
            "kv_cache_dtype": str(dtype).replace("torch.", ""), "prefill_chunk": _prefill_chunk(),
            "activations": os.environ.get("HERD_QUANT_ACT", "int16"), "results": rows,
            "peak_rss_after_load_mb": rss_after_load,
            "peak_rss_mb": vm_hwm_mb()}


def _prefill_chunk() -> int:
    from herd.engine.generate import PREFILL_CHUNK

    return PREFILL_CHUNK


def run_child(spec: dict, timeout_s: float | None = None) -> dict:
    """herd_child in a fresh interpreter with OMP_NUM_THREADS = threads; its result read back as JSON."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        spec_file, out_file = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_file.write_text(json.dumps({**spec, "out": str(out_file)}))
        env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        proc = subprocess.run([sys.executable, "-m", "herd.eval.bench", "--child", str(spec_file)], env=env,
                              timeout=timeout_s)
        if proc.returncode != 0:
            return {"engine": "herd", "threads": spec["threads"], "error": f"child exited {proc.returncode}"}
        return json.loads(out_file.read_text())


# ------------------------------------------------------------------------------------------------ llama.cpp
def _run_measured(cmd: list[str], timeout_s: float | None) -> tuple[int, str, str, float, float]:
    """Run a command; (returncode, stdout, stderr, wall seconds, its own peak RSS in MB (VmHWM))."""
    import tempfile

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        try:
            _, status, rss = _wait4(proc.pid, timeout_s)
        except TimeoutError:
            proc.kill()
            proc.wait()
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        return proc.returncode, out.read().decode(errors="replace"), err.read().decode(errors="replace"), wall, rss


def vm_hwm_mb(pid: int | str = "self") -> float:
    """A process's peak resident set (VmHWM) in MB. Not getrusage's ru_maxrss: a child started from a parent that
    once held a large buffer inherits the parent's high-water mark across fork and exec."""
    for line in proc_lines(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _wait4(pid: int, timeout_s: float | None):
    """Wait for `pid`, polling its VmHWM every 20 ms (the last reading before it exits is its peak)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    hwm = 0.0
    while True:
        hwm = max(hwm, vm_hwm_mb(pid))
        wpid, status, usage = os.wait4(pid, os.WNOHANG)
        if wpid == pid:
            return wpid, status, hwm
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"pid {pid} ran past {timeout_s} s")
        time.sleep(0.02)


def llama_bench(model: Path, threads: int, depths, n_prompt: int, n_gen: int, reps: int,
                timeout_s: float | None = None) -> dict:
    """llama-bench's own method on one file at one thread count (-p -n -r -t -d -o json), and its peak RSS."""
    cmd = [str(peer_tool("llama-bench")), "-m", str(model), "-p", str(n_prompt), "-n", str(n_gen), "-r", str(reps),
           "-t", str(threads), "-d", ",".join(map(str, depths)), "-o", "json"]
    rc, out, err, wall, rss = _run_measured(cmd, timeout_s)
    if rc != 0:
        return {"engine": "llama.cpp", "threads": threads, "command": cmd, "error": err[-2000:]}
    entries = json.loads(out)
    rows = []
    for e in entries:
        test = f"pp{e['n_prompt']}" if e["n_prompt"] else f"tg{e['n_gen']}"
        r = row(test, e["n_threads"], e.get("n_depth", 0), e["samples_ts"])
        r.update(llama_bench_mean=e["avg_ts"], llama_bench_stddev=e["stddev_ts"])
        rows.append(r)
    first = entries[0] if entries else {}
    return {"engine": "llama.cpp", "threads": threads, "command": cmd, "wall_s": wall, "peak_rss_mb": rss,
            "kv_cache_dtype": first.get("type_k"), "n_batch": first.get("n_batch"), "n_ubatch": first.get("n_ubatch"),
            "flash_attn": first.get("flash_attn"), "build_commit": first.get("build_commit"),
            "cpu_info": first.get("cpu_info"), "model_type": first.get("model_type"), "results": rows}


def llama_batched(model: Path, threads: int, batch: int, n_gen: int, reps: int, prompt: int = 32,
                  timeout_s: float | None = None) -> dict:
    """llama-batched-bench's S_TG (aggregate decode tokens/s of `batch` sequences), `reps` runs; and the wall time
    and peak RSS of a 1-token run (the load-dominated cost of starting llama.cpp on the file)."""
    tool = str(peer_tool("llama-batched-bench"))
    base = [tool, "-m", str(model), "-t", str(threads), "-tb", str(threads), "-b", "2048", "-ub", "512",
            "--output-format", "jsonl"]
    cmd = base + ["-c", str(batch * (prompt + n_gen) + 64), "-npp", str(prompt), "-ntg", str(n_gen), "-npl", str(batch)]
    samples, rss = [], 0.0
    for _ in range(reps):
        rc, out, err, _, r = _run_measured(cmd, timeout_s)
        if rc != 0:
            return {"error": err[-2000:], "command": cmd}
        rss = max(rss, r)
        rec = [json.loads(line) for line in out.splitlines() if line.startswith("{")][-1]
        samples.append(rec["speed_tg"])
    rc, _, _, wall, load_rss = _run_measured(base + ["-c", "64", "-npp", "1", "-ntg", "1", "-npl", "1"], timeout_s)
    return {"command": cmd, "row": row(f"b{batch}_tg{n_gen}", threads, 0, samples), "peak_rss_mb": rss,
            "one_token_process_s": wall if rc == 0 else None, "one_token_process_rss_mb": load_rss}


# ------------------------------------------------------------------------------------------------ the run
def run_cpu(args) -> dict:
    model = resolve_model(args.model)
    load_before, busy = check_load(args.strict)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    t_start = time.time()
    report = {"kind": "herd bench cpu", "command": " ".join(["herd", "bench", *(args.argv or [])]),
              "model": str(model), "busy": busy, "load_before": load_before, "system": system_info(),
              "herd": herd_version(), "llama_cpp": build_info() if "llama.cpp" in engines else None,
              "settings": {"threads": args.threads, "depths": args.depths, "n_prompt": args.n_prompt,
                           "n_gen": args.n_gen, "repetitions": args.repetitions, "batch": args.batch},
              "file": file_facts(model), "bandwidth": {}, "gemm_gflops": {}, "engines": {e: [] for e in engines}}
    for t in args.threads:
        print(f"[bench] threads {t}: bandwidth probe ...", flush=True)
        report["bandwidth"][str(t)] = memory_bandwidth(t)
        report["gemm_gflops"][str(t)] = gemm_gflops(t)
        if "herd" in engines:
            print(f"[bench] threads {t}: herd ...", flush=True)
            spec = {"model": str(model), "threads": t, "depths": args.depths, "n_prompt": args.n_prompt,
                    "n_gen": args.n_gen, "repetitions": args.repetitions, "batch": args.batch,
                    "batch_repetitions": args.batch_repetitions or args.repetitions}
            with foreign_cpu() as foreign:
                res = run_child(spec)
            report["engines"]["herd"].append({**res, **foreign})
        if "llama.cpp" in engines:
            print(f"[bench] threads {t}: llama-bench ...", flush=True)
            foreign_cm = foreign_cpu()
            foreign = foreign_cm.__enter__()
            res = llama_bench(model, t, args.depths, args.n_prompt, args.n_gen, args.repetitions)
            if args.batch and args.n_gen and "error" not in res:
                b = llama_batched(model, t, args.batch, args.n_gen, args.batch_repetitions or args.repetitions)
                if "error" in b:
                    res["batched_error"] = b["error"]
                else:
                    res["results"].append(b["row"])
                    res.update(batched_command=b["command"], batched_peak_rss_mb=b["peak_rss_mb"],
                               one_token_process_s=b["one_token_process_s"])
            foreign_cm.__exit__(None, None, None)
            report["engines"]["llama.cpp"].append({**res, **foreign})
        for e in engines:
            r = report["engines"][e][-1]
            print(f"[bench]   {e}: " + (r["error"][:300] if "error" in r else ", ".join(
                f"{x['test']}@{x['depth']} {x['tok_s_mean']:.1f}±{x['tok_s_stddev']:.1f}" for x in r["results"])),
                flush=True)
    report["load_after"] = load_average()
    report["wall_s"] = round(time.time() - t_start, 1)
    annotate(report)
    return report


def resolve_model(name) -> Path:
    from herd.hub import resolve

    model = resolve(None if name is None else str(name))
    if model.is_dir():
        ggufs = sorted(model.glob("*.gguf"))
        if not ggufs:
            raise SystemExit(f"{model}: no .gguf file there")
        model = ggufs[0]
    return Path(model)


def annotate(report: dict) -> None:
    """Per row: the decode bound (bandwidth / bytes per token, weights plus that engine's KV at that depth) and the
    fraction reached; the prefill bound from float32 GEMM peak; herd / llama.cpp ratios per test."""
    facts = report["file"]
    for engine, runs in report["engines"].items():
        for run in runs:
            kv = KV_ELEM_BYTES.get(str(run.get("kv_cache_dtype")), 4.0 if engine == "herd" else 2.0)
            bw = report["bandwidth"].get(str(run["threads"]), {}).get("gb_s_best")
            flops = report["gemm_gflops"].get(str(run["threads"]))
            for r in run.get("results", []):
                if r["test"].startswith("tg") and bw:
                    bpt = facts["weight_bytes_per_token"] + kv_bytes_per_token(facts, r["depth"], kv)
                    r["bytes_per_token"] = bpt
                    r["bound_tok_s"] = bw * 1e9 / bpt
                    r["fraction_of_bound"] = r["tok_s_mean"] / r["bound_tok_s"]
                elif r["test"].startswith("pp") and flops:
                    r["bound_tok_s"] = flops * 1e9 / (2 * facts["matmul_parameters"])
                    r["fraction_of_bound"] = r["tok_s_mean"] / r["bound_tok_s"]
    ratios = []
    herd = {(r["test"], r["threads"], r["depth"]): r for run in report["engines"].get("herd", [])
            for r in run.get("results", [])}
    for run in report["engines"].get("llama.cpp", []):
        for r in run.get("results", []):
            h = herd.get((r["test"], r["threads"], r["depth"]))
            if h:
                ratios.append({"test": r["test"], "threads": r["threads"], "depth": r["depth"],
                               "herd_over_llama_cpp": h["tok_s_mean"] / r["tok_s_mean"]})
    report["ratios"] = ratios


def stem_of(model: str) -> str:
    return Path(model).name.removesuffix(".gguf")


def markdown(report: dict) -> str:
    sysinfo, facts = report["system"], report["file"]
    head = []
    if report["busy"]:
        head.append(f"**BUSY**: taken on a busy machine (1-minute load average {report['load_before']['1m']:.2f} "
                    f"on {sysinfo['cores']} cores before, {report['load_after']['1m']:.2f} after).\n")
    types = ", ".join(f"{k} {v}" for k, v in facts["tensor_types"].items())
    herd_v, lc = report["herd"], report.get("llama_cpp") or {}
    head.append(f"`{report['command']}` on `{Path(report['model']).name}` ({facts['file_bytes'] / 1e6:.1f} MB; "
                f"tensors: {types}); {sysinfo['cpu']}, {sysinfo['cores']} cores; herd {herd_v['version']} "
                f"@ {str(herd_v['commit'])[:10]}{' (dirty)' if herd_v['dirty'] else ''}, llama.cpp "
                f"{str(lc.get('llama_cpp_commit'))[:10]}; load {report['load_before']['1m']:.2f} before, "
                f"{report['load_after']['1m']:.2f} after.")
    bws = ", ".join(f"{t} thr {b['gb_s_best']:.1f} GB/s" for t, b in report["bandwidth"].items())
    head.append(f"Bandwidth ({next(iter(report['bandwidth'].values()))['probe'] if report['bandwidth'] else '-'}): "
                f"{bws}; weights read per token {facts['weight_bytes_per_token'] / 1e6:.1f} MB (both engines read "
                f"the GGUF blocks as stored) plus each engine's KV cache at depth.")
    lines = ["\n\n".join(head), "", "| test | threads | depth | herd tok/s | llama.cpp tok/s | herd / llama.cpp | "
             "herd % of bound | llama.cpp % of bound |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    idx = {e: {(r["test"], r["threads"], r["depth"]): r for run in runs for r in run.get("results", [])}
           for e, runs in report["engines"].items()}
    keys = sorted({k for rows in idx.values() for k in rows}, key=lambda k: (k[1], k[2], _test_order(k[0])))

    def cell(e, k, field):
        r = idx.get(e, {}).get(k)
        if r is None:
            return "-"
        if field == "tok":
            return f"{r['tok_s_mean']:.1f} ± {r['tok_s_stddev']:.1f}"
        return f"{r['fraction_of_bound']:.0%}" if "fraction_of_bound" in r else "-"

    for k in keys:
        h, lcr = idx.get("herd", {}).get(k), idx.get("llama.cpp", {}).get(k)
        ratio = f"{h['tok_s_mean'] / lcr['tok_s_mean']:.2f}x" if h and lcr else "-"
        lines.append(f"| {k[0]} | {k[1]} | {k[2]} | {cell('herd', k, 'tok')} | {cell('llama.cpp', k, 'tok')} | "
                     f"{ratio} | {cell('herd', k, 'f')} | {cell('llama.cpp', k, 'f')} |")
    lines.append("")
    for e, runs in report["engines"].items():
        for run in runs:
            if "error" in run:
                lines.append(f"- {e}, {run['threads']} threads: FAILED: {run['error'][:200]}")
                continue
            extra = (f"herd.load {run['load_s']:.2f} s, peak RSS after load {run['peak_rss_after_load_mb']:.0f} MB, "
                     f"KV cache {run['kv_cache_dtype']}, activations {run['activations']}" if e == "herd" else
                     f"1-token llama-batched-bench process {run.get('one_token_process_s') or float('nan'):.2f} s, "
                     f"KV cache {run.get('kv_cache_dtype')}")
            fc = run.get("foreign_cpu_fraction")
            shared = "" if fc is None else (f"; other processes used {fc:.0%} of the CPUs meanwhile"
                                            + (" (**DISTURBED**)" if fc > 0.1 else ""))
            lines.append(f"- {e}, {run['threads']} threads: peak RSS {run['peak_rss_mb']:.0f} MB; {extra}{shared}")
    st = report.get("settings", {})
    n_p, n_g, nb = st.get("n_prompt", 512), st.get("n_gen", 128), st.get("batch", 8)
    lines.append(f"\npp: prefill of a {n_p}-token prompt on top of `depth` cached tokens; tg: {n_g} single-token "
                 f"decode steps after `depth`; b{nb}_tg: aggregate decode of {nb} sequences (llama.cpp: "
                 "llama-batched-bench S_TG). "
                 "Mean ± stddev over the repetitions. Decode bound = bandwidth / bytes per token; prefill bound = "
                 "float32 GEMM peak / (2 x matmul parameters).")
    return ("BUSY\n\n" if report["busy"] else "") + "\n".join(lines) + "\n"


def _test_order(test: str) -> int:
    return 0 if test.startswith("pp") else 1 if test.startswith("tg") else 2


def chart(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = {e: {(r["test"], r["threads"], r["depth"]): r for run in runs for r in run.get("results", [])}
           for e, runs in report["engines"].items()}
    keys = sorted({k for rows in idx.values() for k in rows}, key=lambda k: (_test_order(k[0]), k[1], k[2]))
    groups = [[k for k in keys if _test_order(k[0]) == o] for o in range(3)]
    groups = [g for g in groups if g]
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 3.8), squeeze=False)
    colors = {"herd": "#2a7", "llama.cpp": "#57c"}
    for ax, group in zip(axes[0], groups):
        width = 0.8 / max(1, len(idx))
        for j, (e, rows) in enumerate(idx.items()):
            xs = [i + j * width for i in range(len(group))]
            vals = [rows[k]["tok_s_mean"] if k in rows else 0 for k in group]
            errs = [rows[k]["tok_s_stddev"] if k in rows else 0 for k in group]
            ax.bar(xs, vals, width, yerr=errs, label=e, color=colors.get(e, "#888"), capsize=2)
        ax.set_xticks([i + width * (len(idx) - 1) / 2 for i in range(len(group))])
        ax.set_xticklabels([f"{k[1]}t d{k[2]}" for k in group], fontsize=8)
        ax.set_title(f"{group[0][0]} (tok/s)")
        ax.legend(fontsize=7)
    busy = " BUSY" if report["busy"] else ""
    fig.suptitle(f"{Path(report['model']).name}{busy}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(report: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    base = out / f"bench_cpu_{stem_of(report['model'])}"  # the stem keeps its dots: add suffixes, never replace
    tmp = Path(f"{base}.json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(f"{base}.json")
    Path(f"{base}.md").write_text(markdown(report))
    chart(report, Path(f"{base}.png"))
    return base


# ------------------------------------------------------------------------------------------------ CLI
def add_cpu_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="GGUF file or catalog name (default: herd's default model)")
    p.add_argument("--threads", type=ints, default=[1, 2], help="comma-separated thread counts (default 1,2)")
    p.add_argument("--depths", type=ints, default=[0, 1024, 4096],
                   help="context depths: tokens already cached before each test, llama-bench's -d (default "
                        "0,1024,4096)")
    p.add_argument("-r", "--repetitions", type=int, default=5, help="repetitions of each test (default 5)")
    p.add_argument("-p", "--n-prompt", type=int, default=512, help="prompt tokens of the pp test (default 512)")
    p.add_argument("-n", "--n-gen", type=int, default=128, help="decode steps of the tg test (default 128)")
    p.add_argument("--batch", type=int, default=8, help="sequences of the batch decode test; 0 skips it (default 8)")
    p.add_argument("--batch-repetitions", type=int, default=None, help="repetitions of the batch test "
                                                                       "(default: --repetitions)")
    p.add_argument("--engines", default="herd,llama.cpp", help="herd and/or llama.cpp (default both)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="results folder")
    p.add_argument("--strict", action="store_true",
                   help="refuse to run (exit 2) when the machine is busy instead of marking the results BUSY")


def run(args) -> int:
    if args.repetitions < 1:
        raise SystemExit("herd bench cpu: --repetitions must be at least 1")
    report = run_cpu(args)
    base = write_outputs(report, Path(args.out))
    print(markdown(report))
    print(f"wrote {base}.json, .md, .png")
    return 0


def register(sub) -> None:
    """`herd bench` with subcommands `cpu` (also what a bare `herd bench [cpu flags]` runs) and `serve`."""
    from herd.eval import bench_serve

    p = sub.add_parser("bench", help="benchmarks: herd vs llama-bench on a GGUF file (cpu), or a server (serve)",
                       description="herd bench cpu (the default) or herd bench serve")
    add_cpu_arguments(p)
    p.set_defaults(func=lambda a: run(_with_argv(a)), argv=None)
    bsub = p.add_subparsers(dest="bench_command", metavar="{cpu,serve}")
    c = bsub.add_parser("cpu", help="herd vs llama-bench: pp512 / tg128 at thread counts and depths")
    add_cpu_arguments(c)
    c.set_defaults(func=lambda a: run(_with_argv(a)))
    bench_serve.register(bsub)


def _with_argv(args):
    if getattr(args, "argv", None) is None:
        argv = sys.argv[1:]
        args.argv = argv[argv.index("bench") + 1:] if "bench" in argv else argv
    return args


def main(argv=None) -> int:
    """`python -m herd.eval.bench` / benchmarks/bench_cpu.py: the same as `herd bench cpu` (and the child's door)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        spec = json.loads(Path(argv[1]).read_text())
        Path(spec["out"]).write_text(json.dumps(herd_child(spec)))
        return 0
    if argv[:1] == ["serve"]:
        from herd.eval import bench_serve

        return bench_serve.main(argv[1:])
    if argv[:1] == ["cpu"]:
        argv = argv[1:]
    ap = argparse.ArgumentParser(prog="herd bench cpu", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    add_cpu_arguments(ap)
    args = ap.parse_args(argv)
    args.argv = ["cpu", *argv] if argv else []
    return run(args)


if __name__ == "__main__":
    sys.exit(main())

"""llama.cpp's own tools as herd's peers: llama-bench figures, llama-server under `herd bench serve`, quantized files.

Needs `make peers` (the tools in .peers/bin, their flags in .peers/BUILD_INFO.json). Each results file records the
build, the CPU, the thread counts and the load average before and after, and is marked busy when the 1-minute load
average before the run exceeds 0.5 per core, since two engines sharing 2 cores with a third process measure the
third process.

    python benchmarks/peers.py bench [--model GGUF] [--threads 1,2] [--depths 0,1024,4096] [-r 5] [--out FILE]
    python benchmarks/peers.py serve [--engine llama-server|herd] [--model GGUF] [-np 16] [--concurrency 16]
                                     [--server-args '...'] [--output-len 128] [--out FILE]
    python benchmarks/peers.py quantize [--types Q4_0,Q8_0,Q4_K_M,Q6_K]     (cached under .peers/models/)
    python benchmarks/peers.py shapes [--presets llama-3.2-1b,llama-3.2-3b] [--types Q4_0,Q4_K_M]   (random weights)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
PEERS = Path(os.environ.get("HERD_PEERS", ROOT / ".peers"))
RESULTS = ROOT / "benchmarks" / "results"
QUANT_TYPES = ("Q4_0", "Q8_0", "Q4_K_M", "Q6_K")
BUSY_LOAD_PER_CORE = 0.5


# ------------------------------------------------------------------------------------------------ the machine
def tool(name: str) -> Path:
    """The path of one built peer tool; a clear error when `make peers` has not run."""
    path = PEERS / "bin" / name
    if not path.is_file():
        raise SystemExit(f"{path} is missing: run `make peers` first")
    return path



def llama_quantize(f16: Path, out: Path, qtype: str, threads: int) -> None:
    """out = llama-quantize(f16, qtype), written beside its name and moved into place, its log beside it; kept
    when it exists already."""
    if out.is_file():
        return
    tmp = out.with_name(out.name + ".tmp")
    with open(out.with_name(out.name + ".log"), "w") as log:
        subprocess.run([str(tool("llama-quantize")), str(f16), str(tmp), qtype, str(threads)], check=True,
                       stdout=log, stderr=subprocess.STDOUT)
    tmp.replace(out)

def build_info() -> dict | None:
    path = PEERS / "BUILD_INFO.json"
    return json.loads(path.read_text()) if path.is_file() else None


def cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or None


def load_average() -> dict:
    one, five, fifteen = os.getloadavg()
    return {"1m": one, "5m": five, "15m": fifteen}


def machine(load_before: dict) -> dict:
    """CPU, core count, the load before the run, and whether that load makes the figures suspect."""
    cores = os.cpu_count() or 1
    return {"cpu": cpu_model(), "cores": cores, "machine": platform.machine(), "kernel": platform.release(),
            "load_before": load_before,
            "busy": load_before["1m"] > BUSY_LOAD_PER_CORE * cores}


def default_model() -> Path:
    """The default model's GGUF (Q4_1), pulled into herd's cache by `make model`."""
    from herd import hub
    return hub.resolve(None)


def write_results(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)
    print(f"wrote {path}")


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


# ------------------------------------------------------------------------------------------------ llama-bench
def bench_supports_depth() -> bool:
    """Whether this llama-bench has `-d/--n-depth` (context depth before each test; added in 2025)."""
    out = subprocess.run([str(tool("llama-bench")), "--help"], capture_output=True, text=True, timeout=30)
    return "--n-depth" in out.stdout + out.stderr


def llama_bench(model: Path, *, threads=(1, 2), depths=(0, 1024, 4096), n_prompt=512, n_gen=128,
                repetitions=5, timeout_s=3600) -> dict:
    """llama-bench's own method (-p, -n, -r, -t, -d, -o json) on one file; one row per test, mean ± stddev."""
    cmd = [str(tool("llama-bench")), "-m", str(model), "-p", str(n_prompt), "-n", str(n_gen),
           "-r", str(repetitions), "-t", ",".join(map(str, threads)), "-o", "json"]
    if depths and bench_supports_depth():
        cmd += ["-d", ",".join(map(str, depths))]
    elif depths and any(depths):
        print("llama-bench has no -d; measuring at depth 0 only", file=sys.stderr)
    load_before = load_average()
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise SystemExit(f"llama-bench failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    entries = json.loads(proc.stdout)
    rows = []
    for e in entries:
        test = f"pp{e['n_prompt']}" if e["n_prompt"] else f"tg{e['n_gen']}"
        rows.append({"test": test, "threads": e["n_threads"], "depth": e.get("n_depth", 0),
                     "tok_s_mean": e["avg_ts"], "tok_s_stddev": e["stddev_ts"], "repetitions": len(e["samples_ts"]),
                     "samples_tok_s": e["samples_ts"], "type_k": e.get("type_k"), "type_v": e.get("type_v"),
                     "n_batch": e.get("n_batch"), "n_ubatch": e.get("n_ubatch"), "flash_attn": e.get("flash_attn")})
    first = entries[0] if entries else {}
    return {
        "tool": "llama-bench",
        "command": cmd,
        "model": str(model),
        "model_type": first.get("model_type"),
        "model_size_bytes": first.get("model_size"),
        "quantize_fallbacks": quantize_fallbacks(Path(model)),
        "llama_cpp_build": {"commit": first.get("build_commit"), "number": first.get("build_number"),
                            "cpu_info": first.get("cpu_info"), "backends": first.get("backends")},
        "build_info": build_info(),
        "machine": machine(load_before),
        "load_after": load_average(),
        "wall_s": round(time.time() - t0, 1),
        "results": rows,
    }


def bench_table(report: dict) -> str:
    """A markdown table of llama-bench rows: test, threads, depth, tok/s mean ± stddev."""
    lines = ["| test | threads | depth | tok/s |", "|---|---:|---:|---:|"]
    for r in report["results"]:
        lines.append(f"| {r['test']} | {r['threads']} | {r['depth']} | "
                     f"{r['tok_s_mean']:.1f} ± {r['tok_s_stddev']:.1f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ servers
def llama_server_cmd(model: Path, *, port: int, n_parallel: int = 16, threads: int = 2, ctx_per_slot: int = 1024,
                     extra: tuple[str, ...] = ()) -> list[str]:
    """`llama-server -np N -cb` on 127.0.0.1, each of its N slots given `ctx_per_slot` tokens of context."""
    return [str(tool("llama-server")), "-m", str(model), "-np", str(n_parallel), "-cb", "-t", str(threads),
            "-c", str(n_parallel * ctx_per_slot), "--host", "127.0.0.1", "--port", str(port), *extra]


def herd_server_cmd(model: Path, *, port: int, threads: int = 2, extra: tuple[str, ...] = ()) -> list[str]:
    """`herd serve` on 127.0.0.1 with its default flags plus `extra`."""
    return [sys.executable, "-m", "herd", "serve", "--model", str(model), "--host", "127.0.0.1",
            "--port", str(port), "--threads", str(threads), *extra]


@contextlib.contextmanager
def running_server(cmd: list[str], *, port: int, name: str, start_timeout_s: float = 180.0):
    """Run a server command until the block ends; yields its base URL once GET /health answers 200."""
    log_path = PEERS / "logs" / f"{name}-{port}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + start_timeout_s
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"{name} exited with {proc.returncode}; the end of {log_path}:\n"
                                     + log_path.read_text()[-2000:])
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:  # llama-server: 503 while loading
                        break
                if time.monotonic() > deadline:
                    raise SystemExit(f"{name} did not answer /health within {start_timeout_s:g} s; see {log_path}")
                time.sleep(0.25)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def server_props(url: str) -> dict:
    """llama-server's /props (its build, slots, chat template); empty when the server has none."""
    with contextlib.suppress(httpx.HTTPError, ValueError):
        resp = httpx.get(f"{url}/props", timeout=5)
        if resp.status_code == 200:
            return resp.json()
    return {}


def serve_bench(model: Path, *, engine: str = "llama-server", n_parallel: int = 16, port: int = 18080,
                threads: int = 2, server_extra: tuple[str, ...] = (), concurrency=(16,), requests: int | None = None,
                input_len: int = 128, output_len: int = 128, seed: int = 0, slo_ttft_ms: float | None = None,
                slo_tpot_ms: float | None = None) -> dict:
    """Start a server (llama-server or herd) on the file, run `herd bench serve` against it, stop it.

    Both engines get the same model file, thread count, prompts (same seed) and request bodies."""
    from herd.eval.bench_serve import SLO, ServeBench, format_report

    if engine == "llama-server":
        cmd = llama_server_cmd(model, port=port, n_parallel=n_parallel, threads=threads, extra=server_extra)
    elif engine == "herd":
        cmd = herd_server_cmd(model, port=port, threads=threads, extra=server_extra)
    else:
        raise SystemExit(f"unknown engine {engine!r}: expected llama-server or herd")
    load_before = load_average()
    with running_server(cmd, port=port, name=engine) as url:
        server_build = server_props(url).get("build_info")
        bench = ServeBench(url=url, concurrency=tuple(concurrency), requests=requests, input_len=input_len,
                           output_len=output_len, seed=seed, slo=SLO(slo_ttft_ms, slo_tpot_ms))
        levels = bench.run(on_level=lambda r: print(format_report(r), flush=True))
    return {"engine": engine, "server_command": cmd, "server_build": server_build, "model": str(model),
            "threads": threads, "build_info": build_info() if engine == "llama-server" else None,
            "machine": machine(load_before), "load_after": load_average(), "levels": levels}


# ------------------------------------------------------------------------------------------------ quantized files
def f16_export(source: Path, out_dir: Path) -> Path:
    """An f16 GGUF of `source`'s weights written by herd's converter (cached): what llama-quantize starts from."""
    out = out_dir / f"{source.stem.split('.')[0]}.f16.gguf"
    if out.is_file():
        return out
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    subprocess.run([sys.executable, "-m", "herd", "convert", str(source), str(tmp), "--to", "gguf",
                    "--quant", "f16"], check=True)
    tmp.replace(out)
    return out


def quantized_variants(source: Path | None = None, types=QUANT_TYPES, out_dir: Path | None = None,
                       threads: int = 2) -> dict[str, Path]:
    """The default model (or `source`) in each llama-quantize type, made once from an f16 export.

    The f16 export holds the Q4_1 weights dequantized, so each variant re-quantizes those values: a speed
    comparison on the same network, not a quality one against the original float weights. llama-quantize's log
    is kept beside each file (NAME.gguf.log): K-quant types need rows that are a multiple of 256, so on a model of
    width 576 most tensors of Q4_K_M / Q6_K fall back to Q5_0 / Q8_0, and the log's last lines say how many."""
    source = source or default_model()
    out_dir = out_dir or PEERS / "models"
    f16 = f16_export(source, out_dir)
    made = {}
    for qtype in types:
        out = out_dir / f16.name.replace(".f16.", f".{qtype}.")
        llama_quantize(f16, out, qtype, threads)
        made[qtype] = out
    return made


def quantize_fallbacks(path: Path) -> str | None:
    """llama-quantize's 'N of M tensor(s) required fallback quantization' line for a file made here, if any."""
    log = path.with_name(path.name + ".log")
    if log.is_file():
        for line in log.read_text().splitlines():
            if "fallback quantization" in line:
                return line.split("WARNING:", 1)[-1].strip()
    return None


def shape_model(preset: str, types=("Q4_0", "Q4_K_M"), out_dir: Path | None = None, threads: int = 2,
                seed: int = 0) -> dict[str, Path]:
    """Random-weight models of a herd.config.PRESETS shape (e.g. llama-3.2-1b), made once and cached: a float16 state
    dict of N(0, 0.02) values (norms 1) with the Llama 3 tokenizer (llama_models' tokenizer.model) written as an
    f16 GGUF by herd's own writer, llama-quantize'd to each type, the f16 intermediate deleted. Speed figures only:
    the weights mean nothing, but every tensor has the released model's shape and type."""
    import torch

    from herd.config import PRESETS
    from herd.formats import write_gguf
    from herd.formats.gguf_vocab import tokenizer_to_gguf_metadata
    from herd.formats.shapes import expected_shapes
    from herd.tokenizer import load_tokenizer

    out_dir = out_dir or PEERS / "models"
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"random-{preset}"
    outs = {q: out_dir / f"{stem}.{q}.gguf" for q in types}
    if all(p.is_file() for p in outs.values()):
        return outs
    f16 = out_dir / f"{stem}.f16.gguf"
    if not f16.is_file():
        import llama_models

        config = PRESETS[preset]
        tok = load_tokenizer(Path(llama_models.__file__).parent / "llama3" / "tokenizer.model")
        gen = torch.Generator().manual_seed(seed)
        sd = {}
        for name, shape in expected_shapes(config).items():
            if len(shape) == 1:
                sd[name] = torch.ones(shape, dtype=torch.float16)
            else:
                sd[name] = (torch.randn(shape, generator=gen, dtype=torch.float32) * 0.02).to(torch.float16)
        write_gguf(f16, config, sd, tokenizer_to_gguf_metadata(tok), None, quant="f16", name=stem)
        del sd
    for qtype, out in outs.items():
        llama_quantize(f16, out, qtype, threads)
    f16.unlink()
    return outs


# ------------------------------------------------------------------------------------------------ CLI
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("bench", help="llama-bench on one GGUF file")
    p.add_argument("--model", type=Path, default=None, help="GGUF file (default: the default model, Q4_1)")
    p.add_argument("--threads", type=_ints, default=[1, 2])
    p.add_argument("--depths", type=_ints, default=[0, 1024, 4096])
    p.add_argument("-p", "--n-prompt", type=int, default=512)
    p.add_argument("-n", "--n-gen", type=int, default=128)
    p.add_argument("-r", "--repetitions", type=int, default=5)
    p.add_argument("--out", type=Path, default=RESULTS / "peers_llama_bench.json")

    p = sub.add_parser("serve", help="llama-server -np N -cb (or herd serve) under herd bench serve")
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--engine", choices=("llama-server", "herd"), default="llama-server")
    p.add_argument("--server-args", default="", help="extra server flags, e.g. '--max-batch 16' for herd")
    p.add_argument("-np", "--n-parallel", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--port", type=int, default=18080)
    p.add_argument("--concurrency", type=_ints, default=[16])
    p.add_argument("--requests", type=int, default=None)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--slo-ttft-ms", type=float, default=None)
    p.add_argument("--slo-tpot-ms", type=float, default=None)
    p.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/serve_ENGINE.json")

    p = sub.add_parser("quantize", help="make the default model's llama-quantize variants (cached)")
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--types", default=",".join(QUANT_TYPES))

    p = sub.add_parser("shapes", help="random-weight models of Llama 3.2 1B / 3B shapes, llama-quantize'd (cached)")
    p.add_argument("--presets", default="llama-3.2-1b,llama-3.2-3b")
    p.add_argument("--types", default="Q4_0,Q4_K_M")

    args = ap.parse_args(argv)
    if args.command == "bench":
        report = llama_bench(args.model or default_model(), threads=args.threads, depths=args.depths,
                             n_prompt=args.n_prompt, n_gen=args.n_gen, repetitions=args.repetitions)
        table = bench_table(report)
        if report["machine"]["busy"]:
            table += (f"\n\nTaken on a busy machine: 1-minute load average "
                      f"{report['machine']['load_before']['1m']:.2f} on {report['machine']['cores']} cores before "
                      f"the run, {report['load_after']['1m']:.2f} after.")
        print(table)
        write_results(args.out, report)
        args.out.with_suffix(".md").write_text(f"llama-bench on {Path(report['model']).name}\n\n{table}\n")
    elif args.command == "serve":
        report = serve_bench(args.model or default_model(), engine=args.engine, n_parallel=args.n_parallel,
                             port=args.port, threads=args.threads, server_extra=tuple(shlex.split(args.server_args)),
                             concurrency=args.concurrency, requests=args.requests, input_len=args.input_len,
                             output_len=args.output_len, slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms)
        write_results(args.out or RESULTS / f"serve_{args.engine.replace('-', '_')}.json", report)
    elif args.command == "shapes":
        for preset in args.presets.split(","):
            for qtype, path in shape_model(preset, types=args.types.split(",")).items():
                print(f"{preset} {qtype}: {path} ({path.stat().st_size / 1e9:.2f} GB)")
    else:
        for qtype, path in quantized_variants(args.model, types=args.types.split(",")).items():
            note = quantize_fallbacks(path)
            print(f"{qtype}: {path} ({path.stat().st_size / 1e6:.1f} MB)" + (f"; {note}" if note else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

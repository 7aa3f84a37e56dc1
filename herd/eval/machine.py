"""The machine a benchmark runs on: load average and the BUSY rule, CPU model and ISA flags, memory, versions of herd
and of llama.cpp's built tools, the DRAM read bandwidth (from a buffer far beyond any cache) and float32 GEMM peak,
and the CPU time other processes take during a measurement. Used by `herd bench cpu` (bench.py); imports no model.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BUSY_LOAD_PER_CORE = 0.5
BANDWIDTH_BYTES = 1 << 30  # the bandwidth probe's buffer: far beyond any cache
ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx_vnni",
             "amx_tile", "amx_int8", "amx_bf16")


def mean_std(samples) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1, as llama-bench); stddev 0 for a single sample."""
    xs = [float(x) for x in samples]
    if not xs:
        raise ValueError("no samples")
    m = sum(xs) / len(xs)
    if len(xs) == 1:
        return m, 0.0
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def load_average() -> dict:
    one, five, fifteen = os.getloadavg()
    return {"1m": one, "5m": five, "15m": fifteen}


def is_busy(load_1m: float, cores: int) -> bool:
    """A run is taken on a busy machine when the 1-minute load average before it exceeds 0.5 per core."""
    return load_1m > BUSY_LOAD_PER_CORE * max(1, cores)


def check_load(strict: bool, load: dict | None = None, cores: int | None = None) -> tuple[dict, bool]:
    """The load before a run and whether it is busy; with `strict` a busy machine refuses (SystemExit 2)."""
    load = load if load is not None else load_average()
    cores = cores or os.cpu_count() or 1
    busy = is_busy(load["1m"], cores)
    if busy and strict:
        print(f"herd bench cpu: refusing to run (--strict): 1-minute load average {load['1m']:.2f} exceeds "
              f"{BUSY_LOAD_PER_CORE} per core on {cores} cores; wait for a quiet machine", file=sys.stderr)
        raise SystemExit(2)
    return load, busy


def proc_lines(path: str) -> list[str]:
    with contextlib.suppress(OSError):
        return Path(path).read_text().splitlines()
    return []


def system_info() -> dict:
    """CPU model, cores, memory, the ISA flags that matter to the kernels, OS and Python/torch versions."""
    model, flags = None, set()
    for line in proc_lines("/proc/cpuinfo"):
        if line.startswith("model name") and model is None:
            model = line.split(":", 1)[1].strip()
        elif line.startswith("flags") and not flags:
            flags = set(line.split(":", 1)[1].split())
    mem_kb = next((int(line.split()[1]) for line in proc_lines("/proc/meminfo") if line.startswith("MemTotal")), 0)
    info = {"cpu": model or platform.processor(), "cores": os.cpu_count(), "memory_gib": round(mem_kb / 2**20, 1),
            "isa": {f: f in flags for f in ISA_FLAGS}, "machine": platform.machine(), "kernel": platform.release(),
            "python": platform.python_version()}
    with contextlib.suppress(ImportError):
        import torch

        info["torch"] = torch.__version__
    return info


def herd_version() -> dict:
    import herd

    out = {"version": herd.__version__, "commit": None, "dirty": None}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        git = ["git", "-C", str(REPO)]
        out["commit"] = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True,
                                       timeout=10).stdout.strip() or None
        out["dirty"] = bool(subprocess.run(git + ["status", "--porcelain", "--untracked-files=no", "herd"],
                                           capture_output=True, text=True, timeout=10).stdout.strip())
    return out


def peers_dir() -> Path:
    """Where `make peers` put llama.cpp's tools: $HERD_PEERS, else .peers at the repository root."""
    return Path(os.environ.get("HERD_PEERS", REPO / ".peers"))


def peer_tool(name: str) -> Path:
    path = peers_dir() / "bin" / name
    if not path.is_file():
        raise SystemExit(f"{path} is missing: run `make peers` first (or set HERD_PEERS, or --engines herd)")
    return path


def build_info() -> dict | None:
    path = peers_dir() / "BUILD_INFO.json"
    return json.loads(path.read_text()) if path.is_file() else None


def memory_bandwidth(threads: int, nbytes: int = BANDWIDTH_BYTES, repeat: int = 5) -> dict:
    """DRAM read bandwidth: torch sums over a float32 buffer of `nbytes` (>= 1 GiB: not a cached one)."""
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    x.sum()
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        x.sum()
        samples.append(x.numel() * 4 / (time.perf_counter() - t0) / 1e9)
    del x
    m, s = mean_std(samples)
    return {"threads": threads, "buffer_bytes": nbytes, "gb_s_best": max(samples), "gb_s_mean": m, "gb_s_stddev": s,
            "probe": f"torch.sum over a {nbytes / 2**30:.0f} GiB float32 buffer, best of {repeat}"}


def gemm_gflops(threads: int, n: int = 2048, repeat: int = 5) -> float:
    """float32 GEMM peak (GFLOP/s, best of `repeat`): the prefill bound's denominator."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(timed(lambda: a @ b) for _ in range(repeat))
    return 2 * n**3 / best / 1e9


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _busy_jiffies() -> int:
    """All CPUs' non-idle time so far (/proc/stat, clock ticks)."""
    for line in proc_lines("/proc/stat"):
        if line.startswith("cpu "):
            v = [int(x) for x in line.split()[1:]]
            return sum(v[:3]) + sum(v[5:8])  # user nice system, irq softirq steal
    return 0


@contextlib.contextmanager
def foreign_cpu():
    """CPU seconds other processes used while the block ran (all CPU time minus this process's and its reaped
    children's), as a fraction of wall x cores: a load average taken before a run cannot see a process that starts
    during it. A run with foreign_cpu_fraction above 0.1 shared the machine."""
    hz = os.sysconf("SC_CLK_TCK")
    own = lambda: sum(resource.getrusage(w).ru_utime + resource.getrusage(w).ru_stime  # noqa: E731
                      for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    out: dict = {}
    j0, o0, t0 = _busy_jiffies(), own(), time.perf_counter()
    try:
        yield out
    finally:
        wall = time.perf_counter() - t0
        foreign = max(0.0, (_busy_jiffies() - j0) / hz - (own() - o0))
        out.update(foreign_cpu_s=round(foreign, 2),
                   foreign_cpu_fraction=round(foreign / max(wall * (os.cpu_count() or 1), 1e-9), 3))

"""`herd doctor`: what a bug report needs, in one command. Versions (herd, Python, torch, the libraries herd leans
on), the OS, the CPU and the ISA flags the kernels care about, thread counts, how herd's native kernels were built
(herd.quant.native.build_info), the cache folder with the pulled models and their sizes, and whether llama.cpp is
there (the Python binding and the tools `make peers` builds). Reads only: nothing is downloaded; the native library
is loaded (and built, as any first use would) so that the report says what herd will really run.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import sys
import warnings
from pathlib import Path

from herd.eval.machine import build_info as peers_build_info
from herd.eval.machine import herd_version, peers_dir, proc_lines, system_info

# The CPU flags that decide which kernels can run (herd's and llama.cpp's); every avx512* and amx* flag is added.
CPU_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni")
PACKAGES = ("numpy", "transformers", "tokenizers", "safetensors", "gguf", "fastapi", "uvicorn", "jinja2", "pillow")
# the environment that changes what herd runs; never a secret (HERD_API_KEY is left out on purpose)
ENV_VARS = ("HERD_HOME", "HERD_NO_NATIVE", "HERD_PEERS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "CC", "HF_HUB_OFFLINE")


def cpu_flags() -> dict[str, bool]:
    """The flags of CPU_FLAGS (present or not) and every avx512* / amx* flag this CPU reports, from /proc/cpuinfo."""
    flags: set[str] = set()
    for line in proc_lines("/proc/cpuinfo"):
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    extra = sorted(f for f in flags if f.startswith(("avx512", "amx")))
    return {f: f in flags for f in (*CPU_FLAGS, *extra)}


def _os_name() -> str:
    pretty = next((line.split("=", 1)[1].strip().strip('"') for line in proc_lines("/etc/os-release")
                   if line.startswith("PRETTY_NAME=")), None)
    return f"{platform.system()} {platform.release()}" + (f" ({pretty})" if pretty else "")


def threads() -> dict:
    import torch

    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {"cpu_count": os.cpu_count(), "affinity": affinity, "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads()}


def native_kernels() -> dict:
    """How herd's C kernels were built (native.build_info(): path, compiler, flags, dropped flags, ISA), whether
    HERD_NO_NATIVE switched them off, and the warnings loading them gave."""
    from herd.quant import native

    with warnings.catch_warnings(record=True) as caught:  # the build's warning is reported here, not printed
        warnings.simplefilter("always")
        info = dict(native.build_info())
    info["disabled"] = os.environ.get("HERD_NO_NATIVE", "") not in ("", "0")
    info["warnings"] = [str(w.message) for w in caught]
    return info


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def cache() -> dict:
    """The cache folder, the pulled models with their sizes on disk, and the trained vision models."""
    from herd.hub import herd_home, list_models

    home = herd_home()
    models = [{"name": m["name"], "path": str(m["path"]), "size": _size(Path(m["path"])), "source": m.get("source")}
              for m in list_models()]
    vision_root = home / "vision"
    vision = [{"name": d.name, "path": str(d), "size": _size(d)}
              for d in sorted(vision_root.iterdir()) if d.is_dir()] if vision_root.is_dir() else []
    return {"home": str(home), "from_env": "HERD_HOME" in os.environ, "exists": home.is_dir(), "models": models,
            "vision": vision}


def llama_cpp() -> dict:
    """llama-cpp-python (installed, version, importable, its system info) and the tools in .peers/bin."""
    out: dict = {"installed": importlib.util.find_spec("llama_cpp") is not None, "version": None, "import_error": None,
                 "system_info": None}
    if out["installed"]:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out["version"] = importlib.metadata.version("llama_cpp_python")
        try:
            import llama_cpp as lc

            out["version"] = getattr(lc, "__version__", out["version"])
            with contextlib.suppress(AttributeError, OSError):
                out["system_info"] = lc.llama_print_system_info().decode(errors="replace").strip()
        except Exception as e:  # a broken native library raises OSError, RuntimeError, ...: report, do not die
            out["import_error"] = f"{type(e).__name__}: {e}"
    bin_dir = peers_dir() / "bin"
    out["peers_dir"] = str(bin_dir)
    out["peers"] = sorted(p.name for p in bin_dir.iterdir() if p.is_file()) if bin_dir.is_dir() else []
    info = peers_build_info()
    out["peers_build"] = {k: info.get(k) for k in ("version", "commit", "flags", "cmake_flags", "compiler")
                          if k in info} if info else None
    return out


def packages() -> dict[str, str | None]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def report() -> dict:
    """Everything `herd doctor` prints, as one JSON-able dict."""
    sysinfo = system_info()
    return {
        "herd": herd_version(),
        "python": {"version": platform.python_version(), "implementation": platform.python_implementation(),
                   "executable": sys.executable},
        "torch": sysinfo.get("torch"),
        "packages": packages(),
        "os": _os_name(),
        "cpu": {"model": sysinfo["cpu"], "machine": sysinfo["machine"], "memory_gib": sysinfo["memory_gib"],
                "flags": cpu_flags()},
        "threads": threads(),
        "native": native_kernels(),
        "cache": cache(),
        "llama_cpp": llama_cpp(),
        "env": {k: os.environ[k] for k in ENV_VARS if k in os.environ},
    }


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def text(r: dict) -> str:
    """The human form of report(): one topic a line, the lists indented under it."""
    h, n, c, lc, t = r["herd"], r["native"], r["cache"], r["llama_cpp"], r["threads"]
    commit = f" (commit {h['commit'][:10]}{', modified' if h.get('dirty') else ''})" if h.get("commit") else ""
    have = [f for f, on in r["cpu"]["flags"].items() if on]
    lack = [f for f, on in r["cpu"]["flags"].items() if not on]
    lines = [f"herd       {h['version']}{commit}",
             f"python     {r['python']['version']} ({r['python']['implementation']}, {r['python']['executable']})",
             f"torch      {r['torch']}",
             "packages   " + ", ".join(f"{k} {v}" for k, v in r["packages"].items() if v),
             f"os         {r['os']}",
             f"cpu        {r['cpu']['model']} ({r['cpu']['machine']}, {r['cpu']['memory_gib']} GiB)",
             f"cpu flags  {' '.join(have) or 'none of interest'}" + (f" (missing: {' '.join(lack)})" if lack else ""),
             f"threads    {t['cpu_count']} CPUs, {t['affinity']} usable, torch {t['torch_threads']} "
             f"(interop {t['torch_interop_threads']})"]
    if n.get("available"):
        flags = " ".join(n.get("flags") or []) or "unknown"
        cc = n.get("compiler_version") or n.get("compiler") or "compiler unknown"
        lines.append(f"native     {n.get('isa')} kernels (this CPU runs {', '.join(n.get('machine_isas') or [])}); "
                     f"{cc}; flags {flags}")
        if n.get("dropped"):
            lines.append(f"           dropped flags: {n['dropped']}")
        lines.append(f"           {n.get('path')}")
    else:
        why = "HERD_NO_NATIVE is set" if n.get("disabled") else n.get("error")
        lines.append(f"native     not loaded ({why}): the PyTorch fallback runs")
    lines += [f"           warning: {w}" for w in n.get("warnings", [])]
    lines.append(f"cache      {c['home']}{' ($HERD_HOME)' if c['from_env'] else ''}"
                 f"{'' if c['exists'] else ' (not created yet)'}")
    if not c["models"]:
        lines.append("models     none pulled (`herd pull smollm2-135m-instruct`)")
    for i, m in enumerate(c["models"]):
        lines.append(f"{'models' if i == 0 else '':<10} {m['name']:<30} {_mb(m['size']):>10}  {m['path']}")
    for i, v in enumerate(c["vision"]):
        lines.append(f"{'vision' if i == 0 else '':<10} {v['name']:<30} {_mb(v['size']):>10}  {v['path']}")
    if not lc["installed"]:
        lines.append("llama.cpp  llama-cpp-python not installed")
    elif lc["import_error"]:
        lines.append(f"llama.cpp  llama-cpp-python {lc['version']} installed but does not import: {lc['import_error']}")
    else:
        lines.append(f"llama.cpp  llama-cpp-python {lc['version']} (imports)")
        if lc["system_info"]:
            lines.append(f"           {lc['system_info']}")
    tools = ", ".join(lc["peers"]) if lc["peers"] else "none (`make peers` builds them)"
    lines.append(f"           tools in {lc['peers_dir']}: {tools}")
    if r["env"]:
        lines.append("env        " + " ".join(f"{k}={v}" for k, v in r["env"].items()))
    return "\n".join(lines)


def cmd_doctor(args) -> None:
    r = report()
    print(json.dumps(r, indent=2, default=str) if args.json else text(r))


def register(sub) -> None:
    """Add `herd doctor` to herd's CLI."""
    p = sub.add_parser("doctor", help="print what a bug report needs: versions, CPU flags, native kernels, cache, "
                       "llama.cpp")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_doctor)

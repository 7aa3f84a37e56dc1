"""Build (once, cached) and load herd's C kernels for quantized linear layers (herd/quant/csrc) through ctypes.

No torch import here, so that setup.py can build the library at install time by loading this file alone. Where the
library lives, in the order tried:
  1. `herd/quant/_native/libherd_quant-<key>.so`, written by `pip install` (setup.py's build step);
  2. `$HERD_HOME/kernels/libherd_quant-<key>.so` (default `~/.cache/herd/kernels`), compiled on first use under a
     file lock when (1) is missing, e.g. for an editable install that skipped the build.
`<key>` hashes the sources, the compiler and this CPU's flags, so an edit or another machine rebuilds. Setting
HERD_NO_NATIVE=1 disables the library; without gcc, or if the build fails, `load()` returns None and herd uses the
PyTorch fallback (herd.quant.linear) with a warning.

Flags: the build wants `-march=native` (the kernels' AVX2 / AVX-512 branches are chosen at compile time) and
`-fopenmp`. A flag is dropped only when a probe shows this compiler cannot build with it (e.g. no libgomp); the
full build never retries with fewer flags, so a broken kernel fails loudly instead of turning into a slower
library. What was built, with which flags, and why a flag was dropped is written beside the library
(`<library>.json`) and returned by `build_info()`; a dropped flag is warned about once per process.

The library links libgomp.so.1; torch ships its own libgomp.so.1 and loads it first, so when torch is imported
before `load()` (herd.quant.linear does), both share one OpenMP runtime and one thread pool.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ("herd_quant.c", "herd_decode.c")
HEADERS = ("herd_quant.h", "hq_formats.h")
PACKAGE_DIR = Path(__file__).resolve().parent / "_native"
ABI_VERSION = 5  # must equal HQ_ABI_VERSION in herd_quant.c

BASE_FLAGS = ["-O3", "-std=gnu11", "-shared", "-fPIC", "-fno-math-errno", "-Wall"]
ISA_NAMES = {0: "scalar", 1: "avx2", 2: "avx512-vnni"}
WANTED_FLAGS = ("-march=native", "-fopenmp")  # in this order; each dropped only if its probe fails
RECORD_VERSION = 1  # of the build record beside the library; part of build_key, so older records never mix in
# what each wanted flag must compile and link (a shared library, like the real build)
_PROBES = {"-march=native": "int herd_probe(void) { return 1; }\n",
           "-fopenmp": "#include <omp.h>\nint herd_probe(void) { return omp_get_max_threads(); }\n"}
# /proc/cpuinfo flags that let -march=native compile each ISA branch (hq_formats.h's HQ_HAVE_AVX2 / HQ_HAVE_AVX512)
ISA_CPU_FLAGS = {1: ("avx2", "fma", "f16c"), 2: ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
                                                 "avx512_vnni")}

_lib: ctypes.CDLL | None = None
_tried = False
_error: str | None = None
_path: Path | None = None
_warned: set[str] = set()  # library keys whose dropped flags were already warned about in this process


def compiler() -> str | None:
    """The C compiler to use: $CC, else gcc, else cc (None when none is on PATH)."""
    for cand in (os.environ.get("CC"), "gcc", "cc"):
        if cand and shutil.which(cand.split()[0]):
            return cand
    return None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def machine_isas() -> list[int]:
    """The ISA_NAMES this CPU can run, from /proc/cpuinfo: [0] (scalar) always, then 1 (AVX2) and 2 (AVX-512 VNNI)
    when all their flags are present. What a -march=native build should compile; tests parametrize over it."""
    flags = set(_cpu_flags().split())
    return [0] + [isa for isa, need in sorted(ISA_CPU_FLAGS.items()) if flags.issuperset(need)]


def build_key(cc: str | None = None) -> str:
    """Hash of the sources, the compiler's version and the CPU: names one build of the library."""
    cc = cc or compiler() or "none"
    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        h.update((CSRC / name).read_bytes())
    try:
        h.update(subprocess.run([*cc.split(), "--version"], capture_output=True, timeout=30).stdout)
    except (OSError, subprocess.SubprocessError):
        h.update(cc.encode())
    h.update(" ".join(BASE_FLAGS + list(WANTED_FLAGS)).encode() + platform.machine().encode() + _cpu_flags().encode())
    h.update(f"record {RECORD_VERSION}".encode())
    return h.hexdigest()[:16]


def library_name(key: str) -> str:
    return f"libherd_quant-{key}.so"


def record_path(library: Path) -> Path:
    """The build record written beside a library: libherd_quant-<key>.so -> libherd_quant-<key>.json."""
    return library.with_suffix(".json")


def _compiler_version(cc: str) -> str:
    try:
        out = subprocess.run([*cc.split(), "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.splitlines()[0] if out else "unknown"


def probe_flag(cc: str, flag: str, workdir: Path) -> str | None:
    """None if cc builds a tiny shared library with this flag (see _PROBES); else why not (the compiler's words)."""
    src, out = workdir / "probe.c", workdir / "probe.so"
    src.write_text(_PROBES[flag])
    cmd = [*cc.split(), *BASE_FLAGS, flag, "-o", str(out), str(src)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as e:
        return f"$ {' '.join(cmd)}: {e}"
    if proc.returncode == 0:
        return None
    return f"$ {' '.join(cmd)}: exit {proc.returncode}: {proc.stderr.strip()[-500:]}"


def _warn_dropped(key: str, dropped: dict) -> None:
    if dropped and key not in _warned:
        _warned.add(key)
        why = "; ".join(f"{flag}: {reason}" for flag, reason in dropped.items())
        warnings.warn(f"herd: native kernels built without {', '.join(dropped)} (this compiler cannot use them: "
                      f"{why}); they run slower than they could", RuntimeWarning, stacklevel=3)


def cache_dir() -> Path:
    home = os.environ.get("HERD_HOME")
    return (Path(home) if home else Path.home() / ".cache" / "herd") / "kernels"


def build(dest_dir: Path, cc: str | None = None) -> Path:
    """Compile the library into dest_dir (atomic rename, file lock); return its path. Raises RuntimeError."""
    cc = cc or compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC or install gcc)")
    dest_dir.mkdir(parents=True, exist_ok=True)
    out = dest_dir / library_name(build_key(cc))
    with open(dest_dir / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if out.exists():
            return out
        srcs = [str(CSRC / s) for s in SOURCES]
        dropped = {}
        with tempfile.TemporaryDirectory(prefix=".probe-", dir=dest_dir) as work:
            for flag in WANTED_FLAGS:
                why = probe_flag(cc, flag, Path(work))
                if why is not None:
                    dropped[flag] = why
            extra = [f for f in WANTED_FLAGS if f not in dropped]
            tmp = Path(work) / "lib.so"
            cmd = [*cc.split(), *BASE_FLAGS, *extra, "-o", str(tmp), *srcs, "-lm"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:  # the compiler takes these flags: the kernels themselves do not build
                raise RuntimeError(f"building herd's quantized kernels failed:\n$ {' '.join(cmd)}\n"
                                   f"{proc.stderr[-4000:]}")
            record = {"record_version": RECORD_VERSION, "key": out.stem.split("-")[-1], "compiler": cc,
                      "compiler_version": _compiler_version(cc), "flags": BASE_FLAGS + extra,
                      "wanted": list(WANTED_FLAGS), "dropped": dropped, "machine": platform.machine(),
                      "machine_isas": [ISA_NAMES[i] for i in machine_isas()], "sources": list(SOURCES)}
            # the record first, then the library: a library that exists always has its record
            rec_tmp = Path(work) / "record.json"
            rec_tmp.write_text(json.dumps(record, indent=1) + "\n")
            os.replace(rec_tmp, record_path(out))
            os.replace(tmp, out)
        _warn_dropped(record["key"], dropped)
        return out


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    P, I64, I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    sig = {
        "herd_q_abi_version": ([], I),
        "herd_q_best_isa": ([], I),
        "herd_q_set_gemm_min_rows": ([I], I),
        "herd_q_set_gemv": ([I], I),
        "herd_q_block_elems": ([I], I),
        "herd_q_block_bytes": ([I], I),
        "herd_q_matmul": ([P, I64, I64, P, I, I64, P, I, I, I], I),
        "herd_q_dequantize": ([P, I, I64, I64, P, I, I], I),
        "herd_q_dequantize_rows": ([P, I, I64, P, I64, P, I], I),
        "herd_q_quantize_act": ([P, I64, I64, P, P, I, I], I),
        "herd_llama_decode": ([P, P, I64, P, P, I], I),
        "herd_kv_encode": ([P, I64, I64, I, P], I),
    }
    for name, (args, res) in sig.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    if lib.herd_q_abi_version() != ABI_VERSION:
        raise RuntimeError(f"library ABI {lib.herd_q_abi_version()} != {ABI_VERSION}")
    return lib


def load() -> ctypes.CDLL | None:
    """The loaded library, building it if needed; None if HERD_NO_NATIVE=1 or it cannot be built (warns once).
    The outcome is decided once per process (the environment is read then); `reset()` decides again."""
    global _lib, _tried, _error, _path
    if _tried:
        return _lib
    _tried = True
    if os.environ.get("HERD_NO_NATIVE", "") not in ("", "0"):
        _lib, _error = None, "HERD_NO_NATIVE is set"
        return None
    try:
        key = build_key()
        path = PACKAGE_DIR / library_name(key)
        if not path.exists():
            path = cache_dir() / library_name(key)
            if not path.exists():
                path = build(cache_dir())
        _lib = _bind(ctypes.CDLL(str(path)))
        _path = path
        _warn_dropped(key, _read_record(path).get("dropped") or {})
    except (OSError, RuntimeError, AttributeError) as e:
        _error = str(e)
        warnings.warn(f"herd: native quantized kernels unavailable, using the slower PyTorch fallback ({e})",
                      RuntimeWarning, stacklevel=2)
        _lib = None
    return _lib


def reset() -> None:
    """Forget the outcome of load() (e.g. after changing HERD_NO_NATIVE); a loaded library stays mapped."""
    global _lib, _tried, _error, _path
    _lib, _tried, _error, _path = None, False, None, None


def _read_record(library: Path) -> dict:
    try:
        return json.loads(record_path(library).read_text())
    except (OSError, ValueError):
        return {}


def build_info() -> dict:
    """How the loaded library was built: path, compiler, flags, the wanted flags dropped and why, the ISA its code
    uses and the ISAs this CPU has (loads it first). Without a library: available False and the reason."""
    lib = load()
    info = {"available": lib is not None, "error": _error, "path": str(_path) if _path else None,
            "machine_isas": [ISA_NAMES[i] for i in machine_isas()],
            "isa": ISA_NAMES.get(best_isa()) if lib is not None else None}
    if _path is not None:
        rec = _read_record(_path)
        info["record"] = str(record_path(_path)) if rec else None  # None: a library built without a record
        for field in ("compiler", "compiler_version", "flags", "wanted", "dropped"):
            info[field] = rec.get(field)
    return info


def available() -> bool:
    return load() is not None


def load_error() -> str | None:
    """Why the last load() gave None (None if it did not fail)."""
    return _error


def best_isa() -> int:
    """0 scalar, 1 AVX2, 2 AVX-512 VNNI; -1 without the library."""
    lib = load()
    return lib.herd_q_best_isa() if lib is not None else -1

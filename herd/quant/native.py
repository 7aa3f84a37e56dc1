"""Build (once, cached) and load herd's C kernels for quantized linear layers (herd/quant/csrc) through ctypes.

No torch import here, so that setup.py can build the library at install time by loading this file alone. Where the
library lives, in the order tried:
  1. `herd/quant/_native/libherd_quant-<key>.so`, written by `pip install` (setup.py's build step);
  2. `$HERD_HOME/kernels/libherd_quant-<key>.so` (default `~/.cache/herd/kernels`), compiled on first use under a
     file lock when (1) is missing, e.g. for an editable install that skipped the build.
`<key>` hashes the sources, the compiler and this CPU's flags, so an edit or another machine rebuilds. Setting
HERD_NO_NATIVE=1 disables the library; without gcc, or if the build fails, `load()` returns None and herd uses the
PyTorch fallback (herd.quant.linear) with a warning.

The library links libgomp.so.1; torch ships its own libgomp.so.1 and loads it first, so when torch is imported
before `load()` (herd.quant.linear does), both share one OpenMP runtime and one thread pool.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
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
ABI_VERSION = 4  # must equal HQ_ABI_VERSION in herd_quant.c

BASE_FLAGS = ["-O3", "-std=gnu11", "-shared", "-fPIC", "-fno-math-errno", "-Wall"]
ISA_NAMES = {0: "scalar", 1: "avx2", 2: "avx512-vnni"}

_lib: ctypes.CDLL | None = None
_tried = False
_error: str | None = None


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
    h.update(" ".join(BASE_FLAGS).encode() + platform.machine().encode() + _cpu_flags().encode())
    return h.hexdigest()[:16]


def library_name(key: str) -> str:
    return f"libherd_quant-{key}.so"


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
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".so", dir=dest_dir)
        os.close(fd)
        errors = []
        # try the best flags first; drop OpenMP, then -march=native, for compilers that lack them
        for extra in (["-march=native", "-fopenmp"], ["-march=native"], []):
            cmd = [*cc.split(), *BASE_FLAGS, *extra, "-o", tmp, *srcs, "-lm"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode == 0:
                os.replace(tmp, out)
                return out
            errors.append(f"$ {' '.join(cmd)}\n{proc.stderr[-2000:]}")
        os.unlink(tmp)
        raise RuntimeError("building herd's quantized kernels failed:\n" + "\n".join(errors))


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    P, I64, I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    sig = {
        "herd_q_abi_version": ([], I),
        "herd_q_best_isa": ([], I),
        "herd_q_set_gemm_min_rows": ([I], I),
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
    global _lib, _tried, _error
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
    except (OSError, RuntimeError, AttributeError) as e:
        _error = str(e)
        warnings.warn(f"herd: native quantized kernels unavailable, using the slower PyTorch fallback ({e})",
                      RuntimeWarning, stacklevel=2)
        _lib = None
    return _lib


def reset() -> None:
    """Forget the outcome of load() (e.g. after changing HERD_NO_NATIVE); a loaded library stays mapped."""
    global _lib, _tried, _error
    _lib, _tried, _error = None, False, None


def available() -> bool:
    return load() is not None


def load_error() -> str | None:
    """Why the last load() gave None (None if it did not fail)."""
    return _error


def best_isa() -> int:
    """0 scalar, 1 AVX2, 2 AVX-512 VNNI; -1 without the library."""
    lib = load()
    return lib.herd_q_best_isa() if lib is not None else -1

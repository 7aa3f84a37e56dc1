"""Build llama.cpp's own tools (llama-bench, llama-server, ...) as benchmark peers.

The source is the llama.cpp tree that the pinned llama-cpp-python sdist vendors, so the peer tools and the
Python binding used in tests are the same llama.cpp. The build is native (`-DGGML_NATIVE=ON`: this machine's
AVX-512/VNNI kernels), static (the binaries run from .peers/bin without library paths), and offline (no curl,
no OpenSSL, no prebuilt web UI download). Every flag, the llama.cpp commit and the compiler are written to
BUILD_INFO.json beside the binaries, so a results file can say exactly what it measured.

Run by `make peers`; stdlib only, so it needs no virtual environment.
    python3 benchmarks/build_peers.py --out .peers --version 0.3.36 --jobs 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

TARGETS = ("llama-bench", "llama-server", "llama-perplexity", "llama-quantize", "llama-batched-bench")

CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # else the server's build tries to fetch its web UI from the network
    "-DBUILD_SHARED_LIBS=OFF",      # self-contained binaries in .peers/bin
    "-DLLAMA_BUILD_TESTS=OFF",
)


def _run(cmd: list[str], capture: bool = False) -> str | None:
    """Run a command, echoing it; its output goes to ours (the build's progress) unless captured."""
    print("+", " ".join(cmd), flush=True)
    out = subprocess.run(cmd, check=True, text=True, stdout=subprocess.PIPE if capture else None,
                         stderr=subprocess.DEVNULL if capture else None)
    return out.stdout


def fetch_sdist(version: str, src_dir: Path) -> Path:
    """Download (once) and unpack the llama-cpp-python sdist; return its vendored llama.cpp directory."""
    name = f"llama_cpp_python-{version}"
    tree = src_dir / name
    llama_dir = tree / "vendor" / "llama.cpp"
    if (llama_dir / "CMakeLists.txt").is_file():
        return llama_dir
    src_dir.mkdir(parents=True, exist_ok=True)
    archive = src_dir / f"{name}.tar.gz"
    if not archive.is_file():
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
              f"llama-cpp-python=={version}", "-d", str(src_dir)])
    if not archive.is_file():
        raise SystemExit(f"pip download did not produce {archive}")
    partial = src_dir / f"{name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    with tarfile.open(archive) as tf:
        tf.extractall(partial, filter="tar")
    (partial / name).rename(tree)
    partial.rmdir()
    if not (llama_dir / "CMakeLists.txt").is_file():
        raise SystemExit(f"{archive} has no vendor/llama.cpp/CMakeLists.txt")
    return llama_dir


def llama_cpp_commit(llama_dir: Path) -> str | None:
    """The vendored submodule's commit: the sdist ships its (shallow) git metadata."""
    try:
        return _run(["git", "-C", str(llama_dir), "rev-parse", "HEAD"], capture=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _first_line(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, text=True, capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else None


def cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def build(out: Path, version: str, jobs: int) -> dict:
    """Configure and build TARGETS; copy them to out/bin; write out/BUILD_INFO.json; return its content."""
    out = out.resolve()
    llama_dir = fetch_sdist(version, out / "src")
    build_dir = out / "build"
    t0 = time.time()
    _run(["cmake", "-S", str(llama_dir), "-B", str(build_dir), *CMAKE_FLAGS])
    _run(["cmake", "--build", str(build_dir), "--config", "Release", "-j", str(jobs), "--target", *TARGETS])
    bin_dir = out / "bin"
    bin_dir.mkdir(exist_ok=True)
    for target in TARGETS:
        shutil.copy2(build_dir / "bin" / target, bin_dir / target)
    # llama-server --version prints "version: N (commit)" and "built with <compiler> for <target>"
    version_text = subprocess.run([str(bin_dir / "llama-server"), "--version"], text=True,
                                  capture_output=True, timeout=30)
    info = {
        "llama_cpp_python_version": version,
        "llama_cpp_commit": llama_cpp_commit(llama_dir),
        "llama_server_version": (version_text.stdout + version_text.stderr).strip(),
        "cmake_flags": list(CMAKE_FLAGS),
        "targets": list(TARGETS),
        "compiler": _first_line([os.environ.get("CXX", "c++"), "--version"]),
        "cmake": _first_line(["cmake", "--version"]),
        "cpu": cpu_model(),
        "machine": platform.machine(),
        "build_jobs": jobs,
        "build_seconds": round(time.time() - t0, 1),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (out / "BUILD_INFO.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(".peers"))
    ap.add_argument("--version", default="0.3.36", help="llama-cpp-python sdist version whose llama.cpp to build")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args(argv)
    info = build(args.out, args.version, args.jobs)
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

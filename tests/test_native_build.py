"""The native kernels were built with everything this machine supports, and a build never hides a failure.

The machine's side is read here independently of herd/quant/native.py: the ISA flags from /proc/cpuinfo, the
compiler's acceptance of -march=native and -fopenmp from a compile of our own, OpenMP from the library's ELF
dependencies (readelf). The library's side: its build record (native.build_info()) and the ISA its code was compiled
for (herd_q_best_isa, fixed at compile time by the -march=native macros)."""

import os
import platform
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest

from herd.quant import native

CPU_FLAGS: set[str] = set()
if Path("/proc/cpuinfo").exists():
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            CPU_FLAGS = set(line.split(":", 1)[1].split())
            break
HAS_AVX2 = {"avx2", "fma", "f16c"} <= CPU_FLAGS
HAS_AVX512 = HAS_AVX2 and {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= CPU_FLAGS
EXPECTED_ISA = "avx512-vnni" if HAS_AVX512 else "avx2" if HAS_AVX2 else "scalar"


def compiler_takes(flag: str, tmp_path: Path, code: str = "int f(void) { return 0; }\n") -> bool:
    src = tmp_path / "t.c"
    src.write_text(code)
    cc = native.compiler()
    return subprocess.run([*cc.split(), "-shared", "-fPIC", flag, "-o", str(tmp_path / "t.so"), str(src)],
                          capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def info():
    if native.compiler() is None:
        pytest.skip("no C compiler on this machine: the native kernels cannot be built")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        native.reset()
        got = native.build_info()
    assert got["available"], f"the native kernels did not load: {got['error']}"
    herd_warnings = [str(w.message) for w in caught if str(w.message).startswith("herd:")]
    assert not herd_warnings  # a dropped flag or a failed build warns
    return got


@pytest.mark.parametrize("isa", [EXPECTED_ISA])
def test_library_runs_the_best_isa_of_this_cpu(info, isa):
    """-march=native took effect: the compiled ISA is the best one /proc/cpuinfo lists (avx2 / avx512 vnni)."""
    assert info["isa"] == isa and native.ISA_NAMES[native.best_isa()] == isa, (info["isa"], sorted(CPU_FLAGS))
    assert native.ISA_NAMES[max(native.machine_isas())] == isa  # what the kernel tests parametrize over
    if HAS_AVX2:
        assert "avx2" in [native.ISA_NAMES[i] for i in native.machine_isas()]


def test_built_with_every_flag_the_compiler_takes(info, tmp_path):
    assert info["record"] is not None and Path(info["record"]).exists(), info
    omp = "#include <omp.h>\nint f(void) { return omp_get_max_threads(); }\n"
    for flag, code in (("-march=native", "int f(void) { return 0; }\n"), ("-fopenmp", omp)):
        if compiler_takes(flag, tmp_path, code):
            assert flag in info["flags"] and flag not in info["dropped"], (flag, info)
        else:  # then the build record says why it was dropped
            assert flag in info["dropped"] and info["dropped"][flag], (flag, info)
    assert info["compiler_version"] and info["flags"][:len(native.BASE_FLAGS)] == native.BASE_FLAGS


@pytest.mark.skipif(shutil.which("readelf") is None, reason="readelf (binutils) is needed to read the library")
def test_openmp_is_linked(info):
    needed = subprocess.run(["readelf", "-d", info["path"]], capture_output=True, text=True, check=True).stdout
    assert ("libgomp" in needed) == ("-fopenmp" in info["flags"]), needed
    if "-fopenmp" not in info["dropped"]:
        assert "libgomp" in needed


# -------------------------------------------------------------------------------------------------------------
# the build logic itself, on tiny stand-in sources (a second or two, not the minutes of the real kernels)

GOOD_C = "int herd_tiny(void) { return 3; }\n"


@pytest.fixture
def tiny_sources(tmp_path, monkeypatch):
    csrc = tmp_path / "csrc"
    csrc.mkdir()
    for name in native.SOURCES + native.HEADERS:
        (csrc / name).write_text(GOOD_C if name == native.SOURCES[0] else "/* empty */\n")
    monkeypatch.setattr(native, "CSRC", csrc)
    monkeypatch.setattr(native, "_warned", set())
    return csrc


def fake_compiler(tmp_path: Path, refuses: str) -> str:
    """A gcc wrapper that refuses one flag as a compiler without it would."""
    path = tmp_path / "fakecc"
    path.write_text(f"""#!/bin/sh
for a in "$@"; do
  if [ "$a" = "{refuses}" ]; then echo "fakecc: error: unrecognized command-line option '{refuses}'" >&2; exit 1; fi
done
exec {native.compiler()} "$@"
""")
    path.chmod(0o755)
    return str(path)


@pytest.mark.skipif(native.compiler() is None, reason="no C compiler")
def test_a_compiler_without_openmp_drops_that_flag_only_says_why_and_warns_once(tiny_sources, tmp_path):
    cc = fake_compiler(tmp_path, "-fopenmp")
    with pytest.warns(RuntimeWarning, match=r"without -fopenmp .*unrecognized command-line option '-fopenmp'"):
        lib = native.build(tmp_path / "out", cc=cc)
    rec = native._read_record(lib)
    assert list(rec["dropped"]) == ["-fopenmp"] and "-march=native" in rec["flags"] and "-fopenmp" not in rec["flags"]
    assert rec["compiler"] == cc and rec["wanted"] == list(native.WANTED_FLAGS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        native._warn_dropped(rec["key"], rec["dropped"])  # once per process: no second warning
    # and the library that was built is a real one
    import ctypes
    assert ctypes.CDLL(str(lib)).herd_tiny() == 3


@pytest.mark.skipif(native.compiler() is None, reason="no C compiler")
def test_a_broken_source_fails_instead_of_dropping_flags(tiny_sources, tmp_path):
    (tiny_sources / native.SOURCES[1]).write_text("int broken(void) { return undefined_name; }\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning either: the error is raised
        with pytest.raises(RuntimeError, match=r"(?s)-march=native -fopenmp.*undefined_name"):
            native.build(tmp_path / "out")
    assert not list((tmp_path / "out").glob("*.so")) and not list((tmp_path / "out").glob("*.json"))


def test_build_info_without_the_library(monkeypatch):
    monkeypatch.setenv("HERD_NO_NATIVE", "1")
    native.reset()
    try:
        got = native.build_info()
        assert got["available"] is False and got["error"] == "HERD_NO_NATIVE is set" and got["path"] is None
        assert got["machine_isas"][0] == "scalar"
    finally:
        monkeypatch.delenv("HERD_NO_NATIVE")
        native.reset()
    assert native.load() is not None or native.compiler() is None


def test_machine_isas_follow_cpuinfo():
    names = [native.ISA_NAMES[i] for i in native.machine_isas()]
    want = ["scalar"] + (["avx2"] if HAS_AVX2 else []) + (["avx512-vnni"] if HAS_AVX512 else [])
    assert names == want, (names, platform.machine())
    if os.uname().machine == "x86_64" and "avx2" in CPU_FLAGS:
        assert "avx2" in names  # a machine with AVX2 never gets an empty or scalar-only list

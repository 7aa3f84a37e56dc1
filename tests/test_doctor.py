"""`herd doctor`: every figure of the report checked against its source (package metadata, /proc/cpuinfo, the loaded
native library, the cache on disk, llama-cpp-python), the text form, an empty cache with the native kernels switched
off, and no secret from the environment in the output."""

import importlib.metadata
import importlib.util
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

import herd
from herd.cli import main
from herd.eval import doctor
from herd.hub import herd_home
from herd.quant import native

REPO = Path(__file__).resolve().parents[1]


def _cpuinfo_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    raise AssertionError("/proc/cpuinfo has no flags line")


def test_doctor_json_matches_its_sources(smollm_gguf, capsys, monkeypatch):
    monkeypatch.setenv("HERD_API_KEY", "sekrit-key-42")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert main(["doctor", "--json"]) == 0
    out = capsys.readouterr().out
    assert "sekrit-key-42" not in out  # a bug report carries no secret
    r = json.loads(out)

    assert r["herd"]["version"] == herd.__version__
    assert r["python"]["version"] == platform.python_version() and r["python"]["executable"] == sys.executable
    assert r["torch"] == torch.__version__
    assert r["packages"]["transformers"] == importlib.metadata.version("transformers")
    assert r["env"]["OMP_NUM_THREADS"] == "2" and "HERD_API_KEY" not in r["env"]

    flags = _cpuinfo_flags()
    for name in ("avx2", "fma", "f16c"):
        assert r["cpu"]["flags"][name] == (name in flags)
    assert {f for f, on in r["cpu"]["flags"].items() if on and f.startswith("avx512")} == \
        {f for f in flags if f.startswith("avx512")}
    assert r["threads"]["cpu_count"] == os.cpu_count() and r["threads"]["torch_threads"] == torch.get_num_threads()

    lib = native.load()
    assert r["native"]["available"] == (lib is not None)
    if lib is not None:
        assert r["native"]["isa"] == native.ISA_NAMES[native.best_isa()]
        assert Path(r["native"]["path"]).is_file()
        assert "-O3" in r["native"]["flags"]
        assert r["native"]["machine_isas"] == [native.ISA_NAMES[i] for i in native.machine_isas()]
    else:
        assert r["native"]["error"] == native.load_error()

    assert r["cache"]["home"] == str(herd_home())
    pulled = {m["path"]: m for m in r["cache"]["models"]}
    assert pulled[str(smollm_gguf)]["size"] == smollm_gguf.stat().st_size
    assert pulled[str(smollm_gguf)]["name"] == "smollm2-135m-instruct"

    lc = r["llama_cpp"]
    assert lc["installed"] == (importlib.util.find_spec("llama_cpp") is not None)
    if lc["installed"]:
        assert lc["version"] == importlib.metadata.version("llama_cpp_python") and lc["import_error"] is None
        assert "AVX" in lc["system_info"]
    peers_bin = Path(lc["peers_dir"])
    assert lc["peers"] == (sorted(p.name for p in peers_bin.iterdir() if p.is_file()) if peers_bin.is_dir() else [])

    text = doctor.text(r)
    assert f"herd       {herd.__version__}" in text and f"torch      {torch.__version__}" in text
    line = next(x for x in text.splitlines() if str(smollm_gguf) in x)
    assert "smollm2-135m-instruct" in line and f"{smollm_gguf.stat().st_size / 1e6:.1f} MB" in line


def test_doctor_text_with_empty_cache_and_no_native(tmp_path):
    env = {**os.environ, "HERD_HOME": str(tmp_path / "home"), "HERD_NO_NATIVE": "1"}
    proc = subprocess.run([sys.executable, "-m", "herd", "doctor"], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "native     not loaded (HERD_NO_NATIVE is set): the PyTorch fallback runs" in out
    assert f"cache      {tmp_path / 'home'} ($HERD_HOME) (not created yet)" in out
    assert "models     none pulled" in out
    assert f"python     {platform.python_version()}" in out
    assert "env        HERD_HOME=" in out and "HERD_NO_NATIVE=1" in out

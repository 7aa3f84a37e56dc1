"""`herd bench cpu`'s arithmetic, busy logic, CLI and report shape; no benchmark runs (seconds)."""

import argparse
import math
from pathlib import Path

import pytest

from herd.cli import build_parser
from herd.eval import bench


def test_mean_std_is_llama_bench_sample_stddev():
    m, s = bench.mean_std([10.0, 12.0, 14.0])
    assert m == 12.0
    assert s == pytest.approx(2.0)  # n - 1 in the denominator
    assert bench.mean_std([5.0]) == (5.0, 0.0)
    with pytest.raises(ValueError):
        bench.mean_std([])
    r = bench.row("tg128", 2, 4096, [100.0, 110.0])
    assert r["tok_s_mean"] == 105.0 and r["tok_s_stddev"] == pytest.approx(math.sqrt(50))
    assert r["repetitions"] == 2 and (r["test"], r["threads"], r["depth"]) == ("tg128", 2, 4096)


def test_busy_and_strict_with_a_faked_load(capsys):
    quiet, busy = {"1m": 0.9, "5m": 0, "15m": 0}, {"1m": 1.2, "5m": 0, "15m": 0}
    assert bench.check_load(False, quiet, cores=2) == (quiet, False)
    assert bench.check_load(True, quiet, cores=2) == (quiet, False)
    assert bench.check_load(False, busy, cores=2) == (busy, True)
    with pytest.raises(SystemExit) as e:
        bench.check_load(True, busy, cores=2)
    assert e.value.code == 2
    assert "--strict" in capsys.readouterr().err
    assert bench.is_busy(0.6, 1) and not bench.is_busy(0.5, 1)


def test_bare_bench_and_cpu_subcommand_parse_the_same_flags():
    parser = build_parser()
    bare = parser.parse_args(["bench", "--threads", "2", "--depths", "0,4096", "--repetitions", "3"])
    cpu = parser.parse_args(["bench", "cpu", "--threads", "2", "--depths", "0,4096", "--repetitions", "3"])
    for a in (bare, cpu):
        assert (a.threads, a.depths, a.repetitions, a.strict) == ([2], [0, 4096], 3, False)
    d = parser.parse_args(["bench", "cpu"])
    assert (d.threads, d.depths, d.repetitions, d.n_prompt, d.n_gen, d.batch) == ([1, 2], [0, 1024, 4096], 5, 512,
                                                                                    128, 8)
    s = parser.parse_args(["bench", "serve", "--url", "http://x", "--concurrency", "1,4"])
    assert s.bench_command == "serve" and s.concurrency == (1, 4)
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "cpu", "--rep", "3"])  # no abbreviations
    with pytest.raises(argparse.ArgumentTypeError):
        bench.ints("1,x")


@pytest.mark.parametrize("argv", [["bench", "--help"], ["bench", "cpu", "--help"], ["bench", "serve", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_strict_refuses_before_any_work(monkeypatch, capsys):
    monkeypatch.setattr(bench.os, "getloadavg", lambda: (9.0, 9.0, 9.0))
    monkeypatch.setattr(bench, "resolve_model", lambda name: name)
    with pytest.raises(SystemExit) as e:
        bench.main(["cpu", "--strict", "--model", "x.gguf"])
    assert e.value.code == 2


def _fake_report(busy=False):
    facts = {"file_bytes": 1e8, "tensor_types": {"Q4_0": 210, "F32": 61}, "weight_bytes_per_token": 9e7,
             "matmul_parameters": 1.3e8, "n_layers": 30, "n_kv_heads": 3, "head_dim": 64}
    res = lambda a, b: [bench.row("pp512", 2, 0, a), bench.row("tg128", 2, 4096, b)]  # noqa: E731
    return {"command": "herd bench cpu", "model": "/m/x.Q4_0.gguf", "busy": busy,
            "load_before": {"1m": 2.5 if busy else 0.1}, "load_after": {"1m": 0.2},
            "system": {"cpu": "cpu", "cores": 2}, "herd": {"version": "0", "commit": "abc", "dirty": False},
            "llama_cpp": {"llama_cpp_commit": "def"}, "file": facts,
            "bandwidth": {"2": {"gb_s_best": 25.0, "probe": "p"}}, "gemm_gflops": {"2": 300.0},
            "engines": {"herd": [{"threads": 2, "kv_cache_dtype": "float32", "results": res([1000, 1100], [150, 160]),
                                  "peak_rss_mb": 300, "load_s": 0.5, "peak_rss_after_load_mb": 250,
                                  "activations": "int16"}],
                        "llama.cpp": [{"threads": 2, "kv_cache_dtype": "f16", "results": res([500, 520], [100, 104]),
                                       "peak_rss_mb": 250, "one_token_process_s": 0.4}]}}


def test_annotate_bounds_ratios_and_report_keys(tmp_path, monkeypatch):
    report = _fake_report()
    bench.annotate(report)
    (r,) = report["ratios"][:1]
    assert r["herd_over_llama_cpp"] == pytest.approx(1050 / 510)
    herd_tg = report["engines"]["herd"][0]["results"][1]
    kv = 2 * 30 * 3 * 64 * 4.0 * 4096  # float32 KV at depth 4096
    assert herd_tg["bytes_per_token"] == pytest.approx(9e7 + kv)
    assert herd_tg["fraction_of_bound"] == pytest.approx(155 / (25e9 / (9e7 + kv)))
    lc_tg = report["engines"]["llama.cpp"][0]["results"][1]
    assert lc_tg["bytes_per_token"] == pytest.approx(9e7 + kv / 2)  # f16 KV
    monkeypatch.setattr(bench, "chart", lambda report, path: path.write_bytes(b"png"))
    base = bench.write_outputs(report, tmp_path)
    import json

    assert base.name == "bench_cpu_x.Q4_0"  # the format stays in the name
    saved = json.loads(Path(f"{base}.json").read_text())
    for key in ("command", "model", "busy", "load_before", "load_after", "system", "herd", "llama_cpp", "file",
                "bandwidth", "engines", "ratios"):
        assert key in saved
    md = Path(f"{base}.md").read_text()
    assert "BUSY" not in md and "2.06x" in md


def test_busy_marks_the_markdown():
    report = _fake_report(busy=True)
    bench.annotate(report)
    assert bench.markdown(report).startswith("BUSY")

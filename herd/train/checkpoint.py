"""Training checkpoints that survive a crash: every file written into a temporary folder, fsynced, the folder renamed
into place, and only then the `latest` pointer replaced (os.replace is atomic on POSIX). A crash at any moment leaves
`latest` naming a complete checkpoint; half-written folders keep a `.tmp` name and are swept on the next save.

A checkpoint folder (checkpoints/step-000120/):
  trainable.safetensors   the trainable tensors by parameter name (LoRA A/B, or the whole model for full tuning)
  optimizer.pt            optimizer.state_dict()
  trainer.pt              scheduler state, torch RNG state, step, data position (epoch, batch), config

Fault tests make the write observable with HERD_TEST_PAUSE_IN_CHECKPOINT=N: the write of step N's checkpoint stops
for a minute after its first file, so a test can kill the process while the folder is half written.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from herd.errors import FormatError

LATEST = "latest"
PAUSE_ENV = "HERD_TEST_PAUSE_IN_CHECKPOINT"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(root: str | Path, step: int, trainable: dict[str, torch.Tensor], optimizer_state: dict,
                    trainer_state: dict, keep: int = 2) -> Path:
    """Write checkpoints/step-N atomically, point `latest` at it, keep the newest `keep` checkpoints."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob("*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    name = f"step-{step:06d}"
    tmp = root / f"{name}.tmp"
    tmp.mkdir()
    save_file({k: v.detach().contiguous() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
    if os.environ.get(PAUSE_ENV) == str(step):  # fault injection (module docstring): die here, half written
        time.sleep(60)
    torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save(trainer_state, tmp / "trainer.pt")
    for f in tmp.iterdir():
        _fsync(f)
    final = root / name
    if final.exists():  # a re-run of the same step (after a resume): move the old one aside, then replace it
        old = root / f"{name}.old.tmp"  # `latest` never names it (it names an earlier step), and .tmp is swept
        os.replace(final, old)
        shutil.rmtree(old)
    os.replace(tmp, final)
    _fsync(root)
    pointer = root / (LATEST + ".tmp")
    pointer.write_text(name + "\n", encoding="utf-8")
    _fsync(pointer)
    os.replace(pointer, root / LATEST)
    _fsync(root)
    done = sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep] if keep > 0 else []:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: str | Path) -> Path | None:
    """The folder `latest` names, or None when there is no checkpoint yet."""
    root = Path(root)
    pointer = root / LATEST
    if not pointer.exists():
        return None
    folder = root / pointer.read_text(encoding="utf-8").strip()
    if not (folder / "trainer.pt").exists():
        raise FormatError(f"{pointer}: names {folder.name}, which is missing or incomplete")
    return folder


def load_checkpoint(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(trainable tensors, optimizer state, trainer state) of a checkpoint folder."""
    folder = Path(folder)
    try:
        trainable = load_file(str(folder / "trainable.safetensors"))
        optimizer_state = torch.load(folder / "optimizer.pt", weights_only=True)
        trainer_state = torch.load(folder / "trainer.pt", weights_only=True)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise FormatError(f"{folder}: unreadable checkpoint ({e})") from None
    return trainable, optimizer_state, trainer_state

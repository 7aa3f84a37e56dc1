"""Small file helpers every checkpoint format shares: JSON objects read with errors that name the file, and writers
that never leave a half-written file behind (write beside the final name, then move into place).

Floor 6 (formats); imports only herd.errors and the libraries.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from herd.errors import FormatError


def read_json(path: Path, missing: str = "file not found") -> dict:
    """A JSON object from a file; FormatError naming the file when it is missing (saying `missing`), malformed or not
    an object."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FormatError(f"{path}: {missing}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise FormatError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def save_safetensors_atomic(tensors: dict, path: Path) -> None:
    """Write a safetensors file beside its final name, then move it into place: never a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    """Write UTF-8 text beside its final name, then move it into place."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def cast(sd: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """The state dict with its floating-point tensors in `dtype` (None: unchanged; integer tensors stay as they are)."""
    if dtype is None:
        return sd
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}

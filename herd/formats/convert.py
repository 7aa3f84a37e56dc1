"""`herd convert` and `herd quantize`: one pipeline, any checkpoint herd reads -> HF safetensors, Meta
consolidated.pth, or a GGUF file (float or group-wise quantized).

Quantization schemes of `herd quantize` (blocks of 32 weights along each row unless said otherwise, each with its own
scale):
    int8 = q8_0   8-bit signed, one fp16 scale per 32
    int4 = q4_0   4-bit signed (-8..7), one fp16 scale per 32
    q4_1          4-bit with an fp16 scale and minimum per 32 (the default model's type)
    q4_k          4-bit in super-blocks of 256: 6-bit scale and minimum per 32, fp16 super-scales
Norms stay float32; the output layer (and a tied embedding) get q8_0, as llama-quantize gives them more bits; rows
that do not fill whole blocks fall back (q4_k -> q4_1 -> f16). The result is what `herd.load(path,
keep_quantized=True)` runs with the native kernels, and what llama.cpp loads.

Floor 6 (formats): sources are local paths and dtypes are torch dtypes; the command line (herd/cli.py) resolves
catalog names and dtype names before calling in.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from herd.errors import ConfigError
from herd.formats import Checkpoint, load_checkpoint, save_hf, save_meta, write_gguf
from herd.formats.gguf import read_gguf
from herd.formats.gguf_vocab import tokenizer_to_gguf_metadata

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja")
# `herd quantize --scheme` -> GGUF quant type (herd.formats.gguf.WRITE_QUANTS)
SCHEMES = {"int8": "q8_0", "int4": "q4_0", "q8_0": "q8_0", "q4_0": "q4_0", "q4_1": "q4_1", "q4_k": "q4_k"}


def convert(src, out, *, to: str, quant: str | None = None, dtype: torch.dtype | None = None, shards: int = 1
            ) -> Path:
    """Read the checkpoint at src and write it to out in format `to` ('hf', 'meta' or 'gguf')."""
    if to not in ("hf", "meta", "gguf"):
        raise ConfigError(f"--to must be hf, meta or gguf, got {to!r}")
    if quant is not None and to != "gguf":
        raise ConfigError("--quant applies to --to gguf only")
    if shards != 1 and to != "meta":
        raise ConfigError("--shards applies to --to meta only")
    ckpt = load_checkpoint(src, dtype)
    out = Path(out)
    if to == "gguf":
        _write_gguf(ckpt, out, quant or "f16")
        return out
    if to == "hf":
        tok = ckpt.tokenizer
        save_hf(out, ckpt.config, ckpt.state_dict, bos_id=getattr(tok, "bos_id", None),
                eos_id=getattr(tok, "eos_id", None))
    else:
        save_meta(out, ckpt.config, ckpt.state_dict, n_shards=shards)
    copy_tokenizer(ckpt, out, to)
    return out


def _write_gguf(ckpt: Checkpoint, out: Path, quant: str, progress: bool = False) -> None:
    if ckpt.tokenizer is None:
        raise ConfigError(f"{ckpt.path}: no tokenizer found; a GGUF file needs one")
    write_gguf(out, ckpt.config, ckpt.state_dict, tokenizer_to_gguf_metadata(ckpt.tokenizer), ckpt.chat_template,
               quant=quant, name=ckpt.path.stem, progress=progress)


def copy_tokenizer(ckpt: Checkpoint, out: Path, to: str) -> None:
    """Tokenizer files travel with the weights: copied from a folder, or written from a GGUF vocabulary."""
    if ckpt.path.is_dir():
        for name in TOKENIZER_FILES:
            if (ckpt.path / name).exists() and not (to == "meta" and name != "tokenizer.model"):
                shutil.copy2(ckpt.path / name, out / name)
        return
    save = getattr(ckpt.tokenizer, "save_hf", None)
    if save is not None:
        save(out, chat_template=ckpt.chat_template)


# ---------------------------------------------------------------------------------------------------------------
# herd quantize: the GGUF branch of convert, with a report

@dataclass
class QuantizeReport:
    out: Path
    scheme: str
    params: int
    src_bytes: int  # the weights as float in the source dtype
    out_bytes: int  # the file written
    seconds: float
    types: dict[str, int] = field(default_factory=dict)  # ggml type -> number of tensors

    def summary(self) -> str:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.types.items()))
        return (f"wrote {self.out} ({self.scheme}): {self.params / 1e6:.1f}M parameters, "
                f"{self.src_bytes / 2**20:.1f} MiB -> {self.out_bytes / 2**20:.1f} MiB "
                f"({self.out_bytes / max(self.src_bytes, 1):.0%}) in {self.seconds:.1f} s; tensors: {kinds}")

    def to_dict(self) -> dict:
        return {"out": str(self.out), "scheme": self.scheme, "params": self.params, "src_bytes": self.src_bytes,
                "out_bytes": self.out_bytes, "seconds": self.seconds, "types": self.types}


def quantize_checkpoint(src, out, scheme: str = "int4", progress: bool = True) -> QuantizeReport:
    """Read the checkpoint at src, quantize its weights with `scheme`, write the GGUF file `out` (atomically, with
    the tokenizer and chat template) and report what was written."""
    key = scheme.lower()
    if key not in SCHEMES:
        raise ConfigError(f"unknown quantization scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
    out = Path(out)
    if out.suffix != ".gguf":
        raise ConfigError(f"{out}: the output is a GGUF file; give it a .gguf name")
    t0 = time.perf_counter()
    ckpt = load_checkpoint(src)
    if ckpt.tokenizer is None:
        raise ConfigError(f"{ckpt.path}: no tokenizer found; the quantized GGUF file needs one")
    tensors = [t for n, t in ckpt.state_dict.items() if n != "rope.freqs"]
    params = sum(t.numel() for t in tensors)
    src_bytes = sum(t.numel() * t.element_size() for t in tensors)
    _write_gguf(ckpt, out, SCHEMES[key], progress)
    types = Counter(t.type_name for t in read_gguf(out).tensors.values())
    return QuantizeReport(out, key, params, src_bytes, out.stat().st_size, time.perf_counter() - t0, dict(types))

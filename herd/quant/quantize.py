"""`herd quantize`: any checkpoint herd reads (HF, Meta, GGUF) -> a GGUF file of group-wise quantized weights.

Schemes (blocks of 32 weights along each row unless said otherwise, each with its own scale):
    int8 = q8_0   8-bit signed, one fp16 scale per 32
    int4 = q4_0   4-bit signed (-8..7), one fp16 scale per 32
    q4_1          4-bit with an fp16 scale and minimum per 32 (the default model's type)
    q4_k          4-bit in super-blocks of 256: 6-bit scale and minimum per 32, fp16 super-scales
Norms stay float32; the output layer (and a tied embedding) get q8_0, as llama-quantize gives them more bits; rows
that do not fill whole blocks fall back (q4_k -> q4_1 -> f16). The result is what `herd.load(path,
keep_quantized=True)` runs with the native kernels, and what llama.cpp loads.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from herd.errors import ConfigError

SCHEMES = {"int8": "q8_0", "int4": "q4_0", "q8_0": "q8_0", "q4_0": "q4_0", "q4_1": "q4_1", "q4_k": "q4_k"}


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


def quantize_checkpoint(src, out, scheme: str = "int4", progress: bool = True) -> QuantizeReport:
    """Read src (path or catalog name), quantize its weights with `scheme`, write the GGUF file `out` (atomically,
    with the tokenizer and chat template) and report what was written."""
    from herd.formats import load_checkpoint
    from herd.formats.gguf import read_gguf, write_gguf
    from herd.hub import resolve
    from herd.gguf_vocab import tokenizer_to_gguf_metadata

    key = scheme.lower()
    if key not in SCHEMES:
        raise ConfigError(f"unknown quantization scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
    out = Path(out)
    if out.suffix != ".gguf":
        raise ConfigError(f"{out}: the output is a GGUF file; give it a .gguf name")
    t0 = time.perf_counter()
    ckpt = load_checkpoint(resolve(str(src)))
    if ckpt.tokenizer is None:
        raise ConfigError(f"{ckpt.path}: no tokenizer found; the quantized GGUF file needs one")
    tensors = [t for n, t in ckpt.state_dict.items() if n != "rope.freqs"]
    params = sum(t.numel() for t in tensors)
    src_bytes = sum(t.numel() * t.element_size() for t in tensors)
    write_gguf(out, ckpt.config, ckpt.state_dict, tokenizer_to_gguf_metadata(ckpt.tokenizer), ckpt.chat_template,
               quant=SCHEMES[key], name=ckpt.path.stem, progress=progress)
    types = Counter(t.type_name for t in read_gguf(out).tensors.values())
    return QuantizeReport(out, key, params, src_bytes, out.stat().st_size, time.perf_counter() - t0, dict(types))

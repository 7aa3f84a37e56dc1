"""`herd convert`: any checkpoint herd reads -> HF safetensors, Meta consolidated.pth, or GGUF."""

from __future__ import annotations

import shutil
from pathlib import Path

from herd.errors import ConfigError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja")


def convert(src, out, *, to: str, quant: str | None = None, dtype=None, shards: int = 1) -> Path:
    """Read src (path or catalog name) and write it to out in format `to` ('hf', 'meta' or 'gguf')."""
    from herd.api import parse_dtype
    from herd.formats import load_checkpoint
    from herd.hub import resolve

    if to not in ("hf", "meta", "gguf"):
        raise ConfigError(f"--to must be hf, meta or gguf, got {to!r}")
    if quant is not None and to != "gguf":
        raise ConfigError("--quant applies to --to gguf only")
    if shards != 1 and to != "meta":
        raise ConfigError("--shards applies to --to meta only")
    ckpt = load_checkpoint(resolve(str(src)), parse_dtype(dtype))
    out = Path(out)
    if to == "gguf":
        from herd.formats.gguf import write_gguf
        from herd.gguf_vocab import tokenizer_to_gguf_metadata

        if ckpt.tokenizer is None:
            raise ConfigError(f"{ckpt.path}: no tokenizer found; a GGUF file needs one")
        write_gguf(out, ckpt.config, ckpt.state_dict, tokenizer_to_gguf_metadata(ckpt.tokenizer),
                   ckpt.chat_template, quant=quant or "f16", name=ckpt.path.stem)
        return out
    if to == "hf":
        from herd.formats.hf import save_hf

        tok = ckpt.tokenizer
        save_hf(out, ckpt.config, ckpt.state_dict, bos_id=getattr(tok, "bos_id", None),
                eos_id=getattr(tok, "eos_id", None))
    else:
        from herd.formats.meta import save_meta

        save_meta(out, ckpt.config, ckpt.state_dict, n_shards=shards)
    _copy_tokenizer(ckpt, out, to)
    return out


def _copy_tokenizer(ckpt, out: Path, to: str) -> None:
    """Tokenizer files travel with the weights: copied from a folder, or written from a GGUF vocabulary."""
    if ckpt.path.is_dir():
        for name in TOKENIZER_FILES:
            if (ckpt.path / name).exists() and not (to == "meta" and name != "tokenizer.model"):
                shutil.copy2(ckpt.path / name, out / name)
        return
    save = getattr(ckpt.tokenizer, "save_hf", None)
    if save is not None:
        save(out, chat_template=ckpt.chat_template)

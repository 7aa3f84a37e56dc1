"""Checkpoint formats: sniff what a path holds once, then read or write it through one table.

Floor 6 (formats): reads and writes Hugging Face folders, Meta folders and GGUF files into (config, herd-named state
dict, tokenizer); imports herd.config, herd.errors, herd.models, herd.quant and herd.tokenizer, never hub, engine or
api. The containers (hf.py, meta.py, gguf.py) know files and the dense Llama; a family module (llama4.py,
mllama.py) builds on their helpers and never the other way round. This module is the one place that pairs them:
`sniff` reads a path's header once (config.json, params.json or the GGUF header) and names its format and family,
and FORMATS maps (format, family) to the family's reader and writer. Shared pieces: io.py (JSON, atomic writers),
keymaps.py (every name table), shapes.py (the tensors a config implies, one checker), convert.py (`herd convert`
and `herd quantize`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from herd.config import ModelConfig
from herd.errors import ConfigError, FormatError, ModelNotFoundError
from herd.formats import gguf, hf, llama4, meta
from herd.formats.io import read_json
from herd.formats.llama4_config import HF_MODEL_TYPES, is_llama4_params


@dataclass
class Checkpoint:
    config: ModelConfig
    state_dict: dict[str, Any]
    format: str  # "hf", "meta", "gguf"
    path: Path
    tokenizer: Any = None
    chat_template: str | None = None
    metadata: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Source:
    """What a path holds, read once: its format, its model family and its parsed header."""

    path: Path  # the folder, or the .gguf file (also when a folder holding one was given)
    format: str  # "hf", "meta" or "gguf"
    family: str  # "llama", "llama4", "mllama", or a GGUF architecture herd may not know
    header: Any = field(repr=False)  # config.json / params.json as a dict, or the gguf.GGUFFile


def detect_format(path: str | Path) -> str:
    """'gguf', 'hf' or 'meta' for a file or folder; FormatError when it is none of them."""
    path = Path(path)
    if not path.exists():
        raise ModelNotFoundError(f"{path}: no such file or folder")
    if path.is_file():
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            return "gguf"
        raise FormatError(f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF'); "
                          "HF and Meta checkpoints are folders")
    if (path / "config.json").exists():
        return "hf"
    if (path / "params.json").exists():
        return "meta"
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf"
    raise FormatError(f"{path}: no config.json (Hugging Face), params.json (Meta) or single .gguf file")


def _family(fmt: str, header: Any) -> str:
    if fmt == "gguf":
        return header.architecture
    if fmt == "hf":
        model_type = header.get("model_type", "llama")
        return "llama4" if model_type in HF_MODEL_TYPES else "mllama" if model_type == "mllama" else "llama"
    p = header.get("model", header) if isinstance(header.get("model"), dict) else header
    if "vision_num_cross_attention_layers" in p:
        return "mllama"
    return "llama4" if is_llama4_params(header) else "llama"


def sniff(path: str | Path) -> Source:
    """Format, family and parsed header of a checkpoint file or folder (each file read once)."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "gguf":
        path = path if path.is_file() else sorted(path.glob("*.gguf"))[0]
        header = gguf.read_gguf(path)
    else:
        header = read_json(path / ("config.json" if fmt == "hf" else "params.json"))
    return Source(path, fmt, _family(fmt, header), header)


def multimodal_kind(path: str | Path) -> str | None:
    """'mllama' (Llama 3.2 Vision, HF or Meta) or 'llama4' (HF Llama4ForConditionalGeneration) for a checkpoint
    folder of a model that reads images; None for anything else."""
    path = Path(path)
    if not path.is_dir() or not any((path / n).exists() for n in ("config.json", "params.json")):
        return None
    src = sniff(path)
    if src.family == "mllama":
        return "mllama"
    if src.family == "llama4" and src.format == "hf" and isinstance(src.header.get("vision_config"), dict):
        return "llama4"
    return None


# ---------------------------------------------------------------------------------------------------------------
# The table: (format, family) -> how to read and write it

@dataclass(frozen=True)
class Codec:
    # read(source, dtype, keep_quantized) -> (config, herd state dict, GGUF metadata or {})
    read: Callable[[Source, torch.dtype | None, bool], tuple[ModelConfig, dict, dict]]
    write: Callable[..., None]  # write(path, config, state_dict, **format options)


def _folder_reader(load: Callable, header_key: str):
    def read(src: Source, dtype: torch.dtype | None, keep_quantized: bool) -> tuple[ModelConfig, dict, dict]:
        config, sd = load(src.path, dtype, **{header_key: src.header})
        return config, sd, {}
    return read


def _gguf_reader(arch: gguf.GGUFArch):
    def read(src: Source, dtype: torch.dtype | None, keep_quantized: bool) -> tuple[ModelConfig, dict, dict]:
        return gguf.load_gguf(src.header, dtype or torch.float32, keep_quantized, arch)
    return read


FORMATS: dict[tuple[str, str], Codec] = {
    ("hf", "llama"): Codec(_folder_reader(hf.load_llama, "cfg"), hf.save_llama),
    ("hf", "llama4"): Codec(_folder_reader(llama4.load_hf_llama4, "cfg"), llama4.save_hf_llama4),
    ("meta", "llama"): Codec(_folder_reader(meta.load_llama, "params"), meta.save_llama),
    ("meta", "llama4"): Codec(_folder_reader(llama4.load_meta_llama4, "params"), llama4.save_meta_llama4),
    ("gguf", "llama"): Codec(_gguf_reader(gguf.LLAMA), functools.partial(gguf.write_gguf, arch=gguf.LLAMA)),
    ("gguf", "llama4"): Codec(_gguf_reader(llama4.GGUF_ARCH), functools.partial(gguf.write_gguf,
                                                                                 arch=llama4.GGUF_ARCH)),
}


def codec(fmt: str, family: str, where: str | Path) -> Codec:
    """The table's entry, or a ConfigError naming what herd reads in that format."""
    if (fmt, family) not in FORMATS:
        known = ", ".join(f for f2, f in FORMATS if f2 == fmt)
        what = f"GGUF architecture {family!r}" if fmt == "gguf" else f"a {family} checkpoint"
        raise ConfigError(f"{where}: {what} is not supported here (supported: {known}; vision checkpoints load "
                          f"with herd.load)")
    return FORMATS[fmt, family]


def _family_of(config: ModelConfig) -> str:
    return "llama4" if config.is_llama4 else "llama"


# ---------------------------------------------------------------------------------------------------------------
# Reading and writing

def load_checkpoint(path: str | Path | Source, dtype: torch.dtype | None = None, *, keep_quantized: bool = False,
                    with_tokenizer: bool = True) -> Checkpoint:
    """Read any checkpoint herd knows. dtype None keeps the checkpoint's (GGUF quant types -> float32)."""
    src = path if isinstance(path, Source) else sniff(path)
    config, sd, metadata = codec(src.format, src.family, src.path).read(src, dtype, keep_quantized)
    tokenizer = chat_template = None
    if src.format == "gguf":
        if with_tokenizer:
            from herd.formats.gguf_vocab import tokenizer_from_gguf

            tokenizer = tokenizer_from_gguf(metadata)
        chat_template = metadata.get("tokenizer.chat_template")
    else:
        if src.format == "hf":
            chat_template = _hf_chat_template(src.path)
        if with_tokenizer and any((src.path / n).exists() for n in ("tokenizer.json", "tokenizer.model")):
            from herd.tokenizer import load_tokenizer as load_folder_tokenizer

            tokenizer = load_folder_tokenizer(src.path)
    return Checkpoint(config, sd, src.format, src.path, tokenizer, chat_template, metadata)


def _read(path: str | Path, fmt: str, dtype: torch.dtype | None, keep_quantized: bool = False):
    src = sniff(path)
    if src.format != fmt:
        raise FormatError(f"{path}: a {src.format} checkpoint, not {fmt}")
    return codec(fmt, src.family, src.path).read(src, dtype, keep_quantized)


def load_hf(folder: str | Path, dtype: torch.dtype | None = None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(config, herd state dict) of a Hugging Face folder of any family herd reads."""
    return _read(folder, "hf", dtype)[:2]


def load_meta(folder: str | Path, dtype: torch.dtype | None = None) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(config, herd state dict) of a Meta folder of any family herd reads, model-parallel shards merged."""
    return _read(folder, "meta", dtype)[:2]


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32, keep_quantized: bool = False
              ) -> tuple[ModelConfig, dict[str, Any], dict[str, Any]]:
    """(config, herd state dict, metadata) of a GGUF file of any architecture herd reads (gguf.load_gguf)."""
    return _read(path, "gguf", dtype, keep_quantized)


def save_hf(folder: str | Path, config: ModelConfig, state_dict: dict[str, torch.Tensor],
            max_shard_bytes: int = 5 * 2**30, bos_id=None, eos_id=None) -> None:
    """Write config.json + model.safetensors (sharded with an index past max_shard_bytes) for the config's family."""
    codec("hf", _family_of(config), folder).write(folder, config, state_dict, max_shard_bytes, bos_id, eos_id)


def save_meta(folder: str | Path, config: ModelConfig, state_dict: dict[str, torch.Tensor], n_shards: int = 1) -> None:
    """Write params.json + consolidated.00.pth ... split into n_shards model-parallel shards."""
    codec("meta", _family_of(config), folder).write(folder, config, state_dict, n_shards)


def write_gguf(path: str | Path, config: ModelConfig, state_dict: dict[str, torch.Tensor],
               tokenizer_metadata: dict[str, Any], chat_template: str | None = None, quant: str = "f16",
               name: str = "", progress: bool = False) -> None:
    """Write a llama.cpp-loadable GGUF of the config's architecture (gguf.write_gguf)."""
    codec("gguf", _family_of(config), path).write(path, config, state_dict, tokenizer_metadata, chat_template,
                                                  quant=quant, name=name, progress=progress)


def load_tokenizer(path: str | Path):
    """The tokenizer of a checkpoint folder, a tokenizer.json / tokenizer.model, or a GGUF file's vocabulary."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        from herd.formats.gguf_vocab import tokenizer_from_gguf

        tok = tokenizer_from_gguf(gguf.read_gguf(path).metadata)
        tok.source = str(path)
        return tok
    from herd.tokenizer import load_tokenizer as load_folder_tokenizer

    return load_folder_tokenizer(path)


def _hf_chat_template(folder: Path) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text(encoding="utf-8")
    cfg = folder / "tokenizer_config.json"
    if not cfg.exists():
        return None
    template = read_json(cfg).get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None

"""Checkpoint formats: sniff what a path holds and read it into (config, herd-named state dict, tokenizer)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from herd.config import ModelConfig
from herd.errors import FormatError, ModelNotFoundError


@dataclass
class Checkpoint:
    config: ModelConfig
    state_dict: dict[str, Any]
    format: str  # "hf", "meta", "gguf"
    path: Path
    tokenizer: Any = None
    chat_template: str | None = None
    metadata: dict = field(default_factory=dict)


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


def multimodal_kind(path: str | Path) -> str | None:
    """'mllama' (Llama 3.2 Vision, HF or Meta) or 'llama4' (HF Llama4ForConditionalGeneration) for a checkpoint
    folder of a model that reads images; None for anything else (herd.vision_llm loads the two kinds)."""
    path = Path(path)
    if not path.is_dir():
        return None
    for name in ("config.json", "params.json"):
        if (path / name).exists():
            try:
                cfg = json.loads((path / name).read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise FormatError(f"{path / name}: not valid JSON ({e})") from None
            if not isinstance(cfg, dict):
                raise FormatError(f"{path / name}: expected a JSON object")
            if name == "config.json":
                if cfg.get("model_type") == "mllama":
                    return "mllama"
                if cfg.get("model_type") == "llama4" and isinstance(cfg.get("vision_config"), dict):
                    return "llama4"
                return None
            p = cfg.get("model", cfg) if isinstance(cfg.get("model"), dict) else cfg
            return "mllama" if "vision_num_cross_attention_layers" in p else None
    return None


def _gguf_file(path: Path) -> Path:
    return path if path.is_file() else sorted(path.glob("*.gguf"))[0]


def load_checkpoint(path: str | Path, dtype: torch.dtype | None = None, *, keep_quantized: bool = False,
                    with_tokenizer: bool = True) -> Checkpoint:
    """Read any checkpoint herd knows. dtype None keeps the checkpoint's (GGUF quant types -> float32)."""
    path = Path(path)
    fmt = detect_format(path)
    tokenizer = chat_template = None
    metadata: dict = {}
    if fmt == "gguf":
        from herd.formats.gguf import load_gguf

        path = _gguf_file(path)
        config, sd, metadata = load_gguf(path, dtype=dtype or torch.float32, keep_quantized=keep_quantized)
        if with_tokenizer:
            from herd.gguf_vocab import tokenizer_from_gguf

            tokenizer = tokenizer_from_gguf(metadata)
        chat_template = metadata.get("tokenizer.chat_template")
    elif fmt == "hf":
        from herd.formats.hf import load_hf

        config, sd = load_hf(path, dtype)
        chat_template = _hf_chat_template(path)
    else:
        from herd.formats.meta import load_meta

        config, sd = load_meta(path, dtype)
    if with_tokenizer and fmt != "gguf" and any((path / n).exists() for n in ("tokenizer.json", "tokenizer.model")):
        from herd.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(path)
    return Checkpoint(config, sd, fmt, path, tokenizer, chat_template, metadata)


def _hf_chat_template(folder: Path) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text(encoding="utf-8")
    cfg = folder / "tokenizer_config.json"
    if not cfg.exists():
        return None
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{cfg}: not valid JSON ({e})") from None
    template = data.get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None

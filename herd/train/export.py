"""`herd convert OUT/checkpoints/step-N DEST --to hf|meta|gguf`: a sharded training checkpoint (dcp.py), whatever
layout and world size wrote it, gathered in one process into a checkpoint every other herd command, transformers and
llama.cpp load. The tokenizer (and chat template) travel from the model the training data was prepared with (the
manifest names it; pretrain records it in trainer.pt)."""

from __future__ import annotations

from pathlib import Path

import torch

from herd.config import ModelConfig
from herd.errors import ConfigError
from herd.train import dcp


def is_training_checkpoint(path) -> bool:
    return (Path(path) / dcp.TRAINER).is_file()


def model_from_checkpoint(folder):
    """The plain float32 Transformer of a training checkpoint, gathered in one process (eval mode)."""
    from herd.models.llama import build_model

    cfg_dict, full = dcp.full_model_state(folder)
    config = ModelConfig.from_dict(cfg_dict)
    if config.tie_embeddings:
        full.pop("output.weight", None)
    return build_model(config, full)


def export(folder, out, *, to: str = "hf", quant: str | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write the training checkpoint `folder` as an HF folder, a Meta folder or a GGUF file at `out`."""
    from herd.formats import Checkpoint, load_checkpoint, save_hf, save_meta, write_gguf
    from herd.formats.convert import copy_tokenizer
    from herd.formats.gguf_vocab import tokenizer_to_gguf_metadata

    if to not in ("hf", "meta", "gguf"):
        raise ConfigError(f"--to must be hf, meta or gguf, got {to!r}")
    trainer = dcp.read_trainer(folder)
    cfg_dict, full = dcp.full_model_state(folder)
    config = ModelConfig.from_dict(cfg_dict)
    sd = {k: (v.to(dtype) if dtype is not None else v) for k, v in full.items()}
    if config.tie_embeddings:
        sd.pop("output.weight", None)
    tok_src = (trainer.get("data") or {}).get("tokenizer")
    tok = load_checkpoint(tok_src, torch.float32) if tok_src and Path(tok_src).exists() else None
    out = Path(out)
    if to == "gguf":
        if tok is None or tok.tokenizer is None:
            raise ConfigError(f"{folder}: the tokenizer of its data ({tok_src!r}) is not at hand; a GGUF needs it")
        write_gguf(out, config, sd, tokenizer_to_gguf_metadata(tok.tokenizer), tok.chat_template,
                   quant=quant or "f16", name=out.stem)
        return out
    bos = getattr(tok.tokenizer, "bos_id", None) if tok else None
    eos = getattr(tok.tokenizer, "eos_id", None) if tok else None
    if to == "hf":
        save_hf(out, config, sd, bos_id=bos, eos_id=eos)
    else:
        save_meta(out, config, sd)
    if tok is not None:
        copy_tokenizer(Checkpoint(config, {}, tok.format, tok.path, tok.tokenizer, tok.chat_template), out, to)
        if to == "hf" and not (out / "tokenizer.json").exists():
            _write_hf_tokenizer(tok.tokenizer, tok.chat_template, out)
    return out


def _write_hf_tokenizer(tok, chat_template: str | None, out: Path) -> None:
    """tokenizer.json + tokenizer_config.json from a byte-level BPE vocabulary (a GGUF's), as transformers writes
    them: the `tokenizers` model itself, and the BOS / EOS / PAD spellings and chat template beside it."""
    import json

    inner = getattr(tok, "tk", None)
    if inner is None or not hasattr(inner, "save"):
        raise ConfigError(f"{tok.source}: cannot write a {type(tok).__name__} as tokenizer.json")
    inner.save(str(out / "tokenizer.json"))
    spell = {"bos_token": tok.bos_id, "eos_token": tok.eos_id, "pad_token": tok.pad_id}
    cfg = {k: tok.id_to_token(i) for k, i in spell.items() if i is not None}
    cfg.update(add_bos_token=bool(tok.add_bos), tokenizer_class="PreTrainedTokenizerFast")
    if chat_template:
        cfg["chat_template"] = chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1), encoding="utf-8")

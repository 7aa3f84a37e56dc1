"""Model shapes to pretrain: `debug` (a few million parameters, for tests and demos), every official Llama 3 / 3.1 /
3.2 / 3.3 text shape by its preset name (herd.config.PRESETS), or a JSON file of herd config keys.

The debug shape takes its vocabulary from the data (the tokenizer the shards were made with), so the same preset
trains on any tokenizer; the official shapes keep their own vocabulary and must match the data's.
"""

from __future__ import annotations

import json
from pathlib import Path

from herd.config import PRESETS, ModelConfig
from herd.errors import ConfigError

# 2 layers of width 64, GQA 4:2, tied embeddings. With the default model's 49,152-token vocabulary: 3.2 M parameters,
# of which 3.1 M are the embedding (tied to the output layer), the rest ~100 k in the blocks.
DEBUG = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192, norm_eps=1e-5, rope_theta=10000.0,
             max_seq_len=2048, tie_embeddings=True, family="llama3")


def pretrain_presets() -> list[str]:
    """The preset names `--model-config` accepts."""
    return ["debug"] + sorted(n for n in PRESETS if n.startswith("llama-3"))


def model_config(name_or_json: str | Path | dict, vocab_size: int | None = None) -> ModelConfig:
    """A ModelConfig from a preset name, a JSON file or a dict; vocab_size (the data's) sets the debug vocabulary and
    is checked against every other shape's."""
    if isinstance(name_or_json, dict):
        cfg = ModelConfig.from_dict(name_or_json)
    elif str(name_or_json) == "debug":
        if vocab_size is None:
            raise ConfigError("the debug preset takes its vocabulary from the data: give the data (or vocab_size)")
        return ModelConfig(vocab_size=vocab_size, **DEBUG)
    elif str(name_or_json) in PRESETS and str(name_or_json) in pretrain_presets():
        cfg = PRESETS[str(name_or_json)]
    elif str(name_or_json).endswith(".json") or Path(name_or_json).is_file():
        path = Path(name_or_json)
        if not path.is_file():
            raise ConfigError(f"{path}: no such model config file")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object of herd config keys")
        if "vocab_size" not in d and vocab_size is not None:
            d["vocab_size"] = vocab_size
        try:
            cfg = ModelConfig.from_dict(d)
        except TypeError as e:  # a required key is missing
            raise ConfigError(f"{path}: {e}") from None
    else:
        raise ConfigError(f"unknown model config {str(name_or_json)!r}: expected a JSON file or one of "
                          f"{', '.join(pretrain_presets())}")
    if cfg.is_llama4:
        raise ConfigError("pretraining covers the dense Llama text shapes; Llama 4 (MoE) is not supported")
    if vocab_size is not None and cfg.vocab_size < vocab_size:
        raise ConfigError(f"model vocabulary ({cfg.vocab_size}) is smaller than the data's tokenizer ({vocab_size})")
    return cfg

"""Presets: parameter counts computed from the config equal the real module's, and match the published sizes."""

import dataclasses

import pytest
import torch

from herd.config import PRESETS, ModelConfig, ffn_hidden_dim
from herd.errors import ConfigError
from herd.models.llama import Transformer, num_params

# published sizes, in billions (rounded as Meta states them)
PUBLISHED = {"llama-2-7b": 6.7, "llama-2-13b": 13.0, "llama-2-70b": 69.0, "llama-3-8b": 8.0, "llama-3.1-8b": 8.0,
             "llama-3-70b": 70.6, "llama-3.1-405b": 405.9, "llama-3.2-1b": 1.24, "llama-3.2-3b": 3.21}
FFN = {"llama-2-7b": 11008, "llama-2-13b": 13824, "llama-2-70b": 28672, "llama-3-8b": 14336,
       "llama-3.1-405b": 53248, "llama-3.2-1b": 8192, "llama-3.2-3b": 8192}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_param_count_equals_module(name):
    cfg = PRESETS[name]
    with torch.device("meta"):
        model = Transformer(cfg)
    assert cfg.n_params == num_params(model)
    if name in PUBLISHED:
        assert abs(cfg.n_params / 1e9 - PUBLISHED[name]) < 0.06 * PUBLISHED[name]
    if name in FFN:
        assert cfg.ffn_dim == FFN[name]


def test_llama_3_2_uses_factor_32_and_ties():
    assert PRESETS["llama-3.2-1b"].rope_scaling.factor == 32 and PRESETS["llama-3.2-1b"].tie_embeddings
    assert PRESETS["llama-3.1-8b"].rope_scaling.factor == 8 and not PRESETS["llama-3.1-8b"].tie_embeddings
    assert PRESETS["llama-3.2-1b"].head_dim == 64


def test_impossible_configs_are_errors():
    base = PRESETS["llama-3-8b"]
    with pytest.raises(ConfigError, match="multiple of n_kv_heads"):
        dataclasses.replace(base, n_kv_heads=7)
    with pytest.raises(ConfigError, match="dim"):
        dataclasses.replace(base, n_heads=33, n_kv_heads=1)
    with pytest.raises(ConfigError, match="n_layers"):
        dataclasses.replace(base, n_layers=0)
    with pytest.raises(ConfigError, match="unknown herd config keys"):
        ModelConfig.from_dict({**base.to_dict(), "wobble": 1})
    assert ModelConfig.from_dict(base.to_dict()) == base
    assert ffn_hidden_dim(4096, 256) == 11008


def test_models_command_lists_every_preset(capsys):
    from herd.cli import main

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in PRESETS:
        assert name in out
    assert "8.03B" in out and "405.85B" in out

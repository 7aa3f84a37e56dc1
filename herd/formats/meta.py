"""Meta's native checkpoints: params.json + consolidated.NN.pth model-parallel shards (SPEC.md §2).

A container: safe shard loading, params.json, shard merge / split and the dense Llama mapping. It never imports a
model family; llama4.py and mllama.py build on its helpers, and herd/formats/__init__.py picks the family.
Floor 6 (formats); imports herd.config, herd.errors and formats' own io / keymaps / shapes.
"""

from __future__ import annotations

import codecs
import dataclasses
import io
import json
import os
import pickle
from pathlib import Path

import torch

from herd.config import ModelConfig, RopeScaling, ffn_hidden_dim
from herd.errors import ConfigError, FormatError
from herd.formats import keymaps
from herd.formats.io import cast, read_json, write_text_atomic
from herd.formats.shapes import check_state_dict

PARAMS_KEYS = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
               "norm_eps", "rope_theta", "use_scaled_rope", "max_seq_len", "max_batch_size",
               "rope_scaling"}  # rope_scaling: herd's extension for scalings that use_scaled_rope cannot say
# Meta's own Llama 3.2 1B/3B params.json do not state the rope factor; their (dim, n_layers) identify them and
# the right factor is 32, as in the HF configs (SPEC.md §1, llama-models#166).
_LLAMA_3_2_SMALL = {(2048, 16), (3072, 28)}


def stated_rope_scaling(params: dict, where: str) -> RopeScaling | None:
    """herd's `rope_scaling` extension of params.json (a RopeScaling's fields), or None when it is absent."""
    if not isinstance(params.get("rope_scaling"), dict):
        return None
    try:
        return RopeScaling(**params["rope_scaling"])
    except TypeError as e:
        raise ConfigError(f"{where}: bad rope_scaling ({e})") from None


def config_from_params(params: dict, where: str, state_shapes: dict[str, tuple] | None = None) -> ModelConfig:
    if isinstance(params.get("model"), dict):
        params = params["model"]
    unknown = sorted(set(params) - PARAMS_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown params.json keys {unknown}")
    try:
        dim, n_layers, n_heads = params["dim"], params["n_layers"], params["n_heads"]
    except KeyError as e:
        raise ConfigError(f"{where}: required key {e} is missing") from None
    vocab = params.get("vocab_size", -1)
    shapes = state_shapes or {}
    if vocab in (None, -1):  # Llama 2: taken from the tokenizer; the embedding table knows it
        if "tok_embeddings.weight" not in shapes:
            raise ConfigError(f"{where}: vocab_size is -1 and no tok_embeddings tensor tells it")
        vocab = shapes["tok_embeddings.weight"][0]
    ffn = ffn_hidden_dim(dim, params.get("multiple_of", 256), params.get("ffn_dim_multiplier"))
    llama3 = "rope_theta" in params or vocab == 128256
    scaling = stated_rope_scaling(params, where)
    if scaling is None and params.get("use_scaled_rope"):
        scaling = RopeScaling(factor=32.0 if (dim, n_layers) in _LLAMA_3_2_SMALL else 8.0)
    tied = bool(shapes) and "output.weight" not in shapes
    if scaling is not None:
        family = "llama3.2" if scaling.factor == 32 else "llama3.1"
    else:
        family = "llama3" if llama3 else "llama2"
    return ModelConfig(
        dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=params.get("n_kv_heads") or n_heads,
        vocab_size=vocab, ffn_dim=ffn, norm_eps=float(params.get("norm_eps", 1e-5)),
        rope_theta=float(params.get("rope_theta", 10000.0)), rope_scaling=scaling,
        max_seq_len=params.get("max_seq_len") or (131072 if scaling else 8192 if llama3 else 4096),
        tie_embeddings=tied, family=family,
    )


def params_from_config(config: ModelConfig) -> dict:
    """params.json for a config; multiple_of / ffn_dim_multiplier chosen so Meta's rule gives config.ffn_dim."""
    params = {"dim": config.dim, "n_layers": config.n_layers, "n_heads": config.n_heads,
              "n_kv_heads": config.n_kv_heads, "vocab_size": config.vocab_size, "norm_eps": config.norm_eps,
              "rope_theta": config.rope_theta, "max_seq_len": config.max_seq_len}
    for multiple_of in (256, 1024, 4096):
        if ffn_hidden_dim(config.dim, multiple_of) == config.ffn_dim:
            params.update(multiple_of=multiple_of)
            break
    else:
        for mult in (1.3, 1.2, 1.5, 1.0):
            hits = [m for m in (256, 1024, 4096) if ffn_hidden_dim(config.dim, m, mult) == config.ffn_dim]
            if hits:
                params.update(multiple_of=hits[0], ffn_dim_multiplier=mult)
                break
        else:  # any size: round int(mult * 8D/3) up to a multiple of ffn_dim itself
            h = int(2 * 4 * config.dim / 3)
            params.update(multiple_of=config.ffn_dim, ffn_dim_multiplier=config.ffn_dim / h)
    if ffn_hidden_dim(config.dim, params["multiple_of"], params.get("ffn_dim_multiplier")) != config.ffn_dim:
        raise ConfigError(f"cannot express ffn_dim {config.ffn_dim} in Meta's params.json rule")
    if config.rope_scaling is not None:
        expected = 32.0 if (config.dim, config.n_layers) in _LLAMA_3_2_SMALL else 8.0
        params["use_scaled_rope"] = True
        if config.rope_scaling != RopeScaling(factor=expected):  # not what Meta's code would infer: say it
            params["rope_scaling"] = dataclasses.asdict(config.rope_scaling)
    return params


def load_shard(path: Path) -> dict[str, torch.Tensor]:
    """A consolidated.NN.pth of plain tensors, read with weights_only (a pickle that would run code is refused). The
    released Llama 4 files also pickle io.BytesIO `_extra_state` blobs, which are allowed through (as Meta's and HF's
    loaders do) and dropped."""
    try:
        with torch.serialization.safe_globals([io.BytesIO, codecs.encode]):
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise FormatError(f"{path}: not a plain tensor checkpoint; refusing to run code from it ({e})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise FormatError(f"{path}: cannot be read as a PyTorch checkpoint ({e})") from None
    if not isinstance(sd, dict):
        raise FormatError(f"{path}: expected a dict of name -> tensor")
    out = {}
    for k, v in sd.items():
        if isinstance(k, str) and isinstance(v, torch.Tensor):
            out[k] = v
        elif not (isinstance(k, str) and k.endswith("_extra_state")):
            raise FormatError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
    return out


def read_params(folder: Path) -> tuple[dict, Path]:
    """(params.json as a dict, its path); FormatError for a missing or malformed file."""
    path = folder / "params.json"
    return read_json(path), path


def read_shards(folder: Path) -> list[dict[str, torch.Tensor]]:
    """Every consolidated.NN.pth of a folder, in order; they must hold the same tensor names."""
    paths = sorted(folder.glob("consolidated.*.pth"))
    if not paths:
        raise FormatError(f"{folder}: no consolidated.NN.pth files")
    shards = [load_shard(p) for p in paths]
    for p, s in zip(paths[1:], shards[1:]):
        if set(s) != set(shards[0]):
            diff = sorted(set(shards[0]).symmetric_difference(s))[:5]
            raise FormatError(f"{p}: holds different tensors from {paths[0].name} ({diff})")
    return shards


def write_shards(folder: Path, shards: list[dict[str, torch.Tensor]], params: dict) -> None:
    """consolidated.00.pth ... (each written atomically) and params.json."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, s in enumerate(shards):
        tmp = folder / f"consolidated.{k:02d}.pth.tmp"
        torch.save(s, tmp)
        os.replace(tmp, folder / f"consolidated.{k:02d}.pth")
    write_text_atomic(folder / "params.json", json.dumps(params, indent=2))


def load_llama(folder: str | Path, dtype: torch.dtype | None = None, params: dict | None = None
               ) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a Meta Llama folder, merging model-parallel shards along each tensor's split axis. params: its
    params.json, when the caller has read it already."""
    folder = Path(folder)
    params_path = folder / "params.json"
    if params is None:
        params = read_json(params_path)
    shards = read_shards(folder)
    names = set(shards[0])
    names.discard("rope.freqs")
    llama2 = "rope_theta" not in (params.get("model", params))
    family = "llama2" if llama2 else "llama3"
    sd: dict[str, torch.Tensor] = {}
    for name in sorted(names):
        parts = [s[name] for s in shards]
        axis = keymaps.meta_shard_axis(name, family) if len(parts) > 1 else None
        sd[name] = parts[0] if axis is None else torch.cat(parts, dim=axis)
    config = config_from_params(params, str(params_path), {k: tuple(v.shape) for k, v in sd.items()})
    if "output.weight" in sd and sd["output.weight"].shape == sd["tok_embeddings.weight"].shape \
            and torch.equal(sd["output.weight"], sd["tok_embeddings.weight"]):
        # Meta's Llama 3.2 1B/3B files carry output.weight as a copy of tok_embeddings: a tied model
        config = config.replace(tie_embeddings=True)
        del sd["output.weight"]
    check_state_dict(sd, config, str(folder))
    return config, cast(sd, dtype)


def save_llama(folder: str | Path, config: ModelConfig, state_dict: dict[str, torch.Tensor], n_shards: int = 1) -> None:
    """Write params.json + consolidated.00.pth ... split into n_shards model-parallel shards."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    params = params_from_config(config)
    sd = dict(state_dict)
    if config.tie_embeddings and "output.weight" not in sd:
        sd["output.weight"] = sd["tok_embeddings.weight"]  # Meta files always carry output.weight
    family = config.family if config.family == "llama2" else "llama3"
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n_shards)]
    for name, t in sd.items():
        axis = keymaps.meta_shard_axis(name, family)
        if axis is None or n_shards == 1:
            for s in shards:
                s[name] = t.contiguous()
            continue
        if t.shape[axis] % n_shards:
            raise ConfigError(f"tensor {name} axis {axis} ({t.shape[axis]}) does not split into {n_shards} shards")
        for s, part in zip(shards, t.chunk(n_shards, dim=axis)):
            s[name] = part.clone().contiguous()
    write_shards(folder, shards, params)

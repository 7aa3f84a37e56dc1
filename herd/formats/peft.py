"""PEFT adapter folders: adapter_config.json + adapter_model.safetensors with HF names
(base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight), read, written and applied to a herd model.

herd keeps q/k rows in Meta's interleaved RoPE order and HF in rotate-half order (SPEC.md §3): the update s·B·A of
wq/wk has its *rows* permuted, so B is written with permute_meta_to_hf (A, which acts on the input side, is
unchanged). The LoRA layers themselves are herd/models/lora.py's.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from herd.errors import ConfigError, FormatError
from herd.formats import keymaps
from herd.formats.io import read_json, save_safetensors_atomic, write_text_atomic
from herd.models.lora import TARGETS, apply_lora, lora_modules, parse_targets

HF_PREFIX = "base_model.model."  # PEFT's prefix in front of the transformers model's own names
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def _hf_module_name(path: str) -> str:
    """'layers.3.attention.wq' -> 'model.layers.3.self_attn.q_proj'."""
    hf = keymaps.herd_to_hf_name(path + ".weight")
    if hf is None:
        raise FormatError(f"module {path} has no Hugging Face name")
    return hf.removesuffix(".weight")


def _herd_module_name(hf_path: str) -> str | None:
    herd = keymaps.hf_to_herd_name(hf_path + ".weight")
    return None if herd is None else herd.removesuffix(".weight")


def _row_permutation(path: str, config, to_hf: bool):
    """The q/k row permutation for the B matrix of this module, or None."""
    n = config.n_heads if path.endswith("attention.wq") else config.n_kv_heads if path.endswith("attention.wk") \
        else None
    if n is None:
        return None
    f = keymaps.permute_meta_to_hf if to_hf else keymaps.permute_hf_to_meta
    return lambda w: f(w, n)


def adapter_to_peft(model: nn.Module) -> dict[str, torch.Tensor]:
    """LoRA weights in PEFT's names and HF's q/k row order."""
    out = {}
    for path, m in lora_modules(model).items():
        hf = HF_PREFIX + _hf_module_name(path)
        b = m.lora_B.weight.detach()
        perm = _row_permutation(path, model.config, to_hf=True)
        out[f"{hf}.lora_A.weight"] = m.lora_A.weight.detach().contiguous()
        out[f"{hf}.lora_B.weight"] = (perm(b) if perm else b).contiguous()
    return out


def save_adapter(model: nn.Module, folder: str | Path, base_model: str = "", dtype: torch.dtype | None = None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors (PEFT layout), each atomically."""
    mods = lora_modules(model)
    if not mods:
        raise ConfigError("the model has no LoRA layers to save")
    first = next(iter(mods.values()))
    layers = sorted({int(p.split(".")[1]) for p in mods})
    hf_targets = sorted({TARGETS[short][1] for p in mods for short, (sub, _) in TARGETS.items() if p.endswith(sub)})
    dropout = first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0
    cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_model),
        "r": first.rank, "lora_alpha": first.alpha, "lora_dropout": dropout, "target_modules": hf_targets,
        "layers_to_transform": layers if len(layers) != len(model.layers) else None,
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "use_rslora": False, "use_dora": False, "modules_to_save": None,
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = adapter_to_peft(model)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    save_safetensors_atomic(tensors, folder / ADAPTER_WEIGHTS)
    write_text_atomic(folder / ADAPTER_CONFIG, json.dumps(cfg, indent=2))
    return folder


def read_adapter_config(folder: str | Path) -> dict:
    path = Path(folder) / ADAPTER_CONFIG
    cfg = read_json(path, missing=f"not found (an adapter folder holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise FormatError(f"{path}: peft_type {cfg.get('peft_type')!r} is not supported (herd reads LORA)")
    for key, bad in (("use_dora", True), ("use_rslora", True), ("fan_in_fan_out", True)):
        if cfg.get(key) == bad:
            raise FormatError(f"{path}: {key}={bad} is not supported by herd")
    if cfg.get("bias", "none") != "none":
        raise FormatError(f"{path}: bias={cfg['bias']!r} is not supported (herd reads bias='none')")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise FormatError(f"{path}: per-module rank_pattern/alpha_pattern is not supported by herd")
    if "r" not in cfg or "target_modules" not in cfg:
        raise FormatError(f"{path}: missing 'r' or 'target_modules'")
    return cfg


def adapter_base(folder: str | Path) -> str | None:
    """The base model an adapter names (base_model_name_or_path), or None when it names none."""
    return read_adapter_config(folder).get("base_model_name_or_path") or None


def read_adapter(folder: str | Path, model: nn.Module) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(config, {herd module path: (A (r, in), B (out, r))}) of a saved PEFT LoRA adapter for this base model, B in
    herd's q/k row order; every tensor checked against the module it targets. The scaling is lora_alpha / r."""
    folder = Path(folder)
    cfg = read_adapter_config(folder)
    targets = cfg["target_modules"]
    if isinstance(targets, str):  # PEFT allows a regex here; herd accepts the plain list form only
        raise FormatError(f"{folder / ADAPTER_CONFIG}: target_modules as a regex is not supported; use a list")
    short = set(parse_targets(targets))
    layers = cfg.get("layers_to_transform")
    layers = [layers] if isinstance(layers, int) else layers
    expected = {}  # herd module path -> (in, out) for every module the config says the adapter holds
    for i, block in enumerate(model.layers):
        if layers is not None and i not in layers:
            continue
        for t in short:
            base = block.get_submodule(TARGETS[t][0])
            base = getattr(base, "base", base)  # already a LoRA layer: its base's shape
            expected[f"layers.{i}.{TARGETS[t][0]}"] = (int(base.in_features), int(base.out_features))
    path = folder / ADAPTER_WEIGHTS
    try:
        with safe_open(path, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise FormatError(f"{path}: cannot be read ({e})") from None
    r = int(cfg["r"])
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        stem = key.removeprefix(HF_PREFIX)
        for part in ("lora_A", "lora_B"):
            suffix = f".{part}.weight"
            if stem.endswith(suffix):
                hf_mod = stem[: -len(suffix)].replace(".default", "")
                break
        else:
            raise FormatError(f"{path}: tensor {key!r} is not a LoRA A/B weight")
        herd_mod = _herd_module_name(hf_mod)
        if herd_mod not in expected:
            raise FormatError(f"{path}: tensor {key!r} targets a module the adapter config does not list")
        n_in, n_out = expected[herd_mod]
        want = (r, n_in) if part == "lora_A" else (n_out, r)
        if tuple(t.shape) != want:
            raise FormatError(f"{path}: tensor {key!r} has shape {tuple(t.shape)}, the model expects {want}")
        if part == "lora_B":
            perm = _row_permutation(herd_mod, model.config, to_hf=False)
            t = perm(t) if perm else t
        parts.setdefault(herd_mod, {})[part] = t
    missing = sorted(f"{m}.{p}" for m in expected for p in ("lora_A", "lora_B") if p not in parts.get(m, {}))
    if missing:
        raise FormatError(f"{path}: missing LoRA weights for {missing[:4]}{'...' if len(missing) > 4 else ''}")
    return cfg, {m: (d["lora_A"], d["lora_B"]) for m, d in parts.items()}


def adapter_scaling(cfg: dict) -> float:
    r = int(cfg["r"])
    return float(cfg.get("lora_alpha", r)) / r


def apply_adapter(model: nn.Module, folder: str | Path) -> nn.Module:
    """Add a saved PEFT LoRA adapter to a herd model (unmerged); the function `herd generate --adapter` calls."""
    cfg, weights = read_adapter(folder, model)
    layers = cfg.get("layers_to_transform")
    layers = [layers] if isinstance(layers, int) else layers
    apply_lora(model, rank=int(cfg["r"]), alpha=float(cfg.get("lora_alpha", cfg["r"])), targets=cfg["target_modules"],
               layers=layers)
    mods = lora_modules(model)
    for path, (a, b) in weights.items():
        m = mods[path]
        with torch.no_grad():
            m.lora_A.weight.copy_(a.to(m.lora_A.weight.dtype))
            m.lora_B.weight.copy_(b.to(m.lora_B.weight.dtype))
    for p in model.parameters():
        p.requires_grad_(False)
    return model

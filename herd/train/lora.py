"""LoRA as a module swap: wrap chosen linear layers, save/load adapters in the PEFT layout, fold them into the base.

A LoRA layer computes y = base(x) + s * B(A(dropout(x))) with A (r, in), B (out, r), s = alpha / r, A Kaiming-
uniform and B zero at the start (so training starts from the base model exactly; PEFT's default init). The base may
be an nn.Linear or a frozen quantized layer (QLoRA): anything with forward(x) and in/out feature sizes.

PEFT layout: adapter_config.json + adapter_model.safetensors with HF names
(base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight). herd keeps q/k rows in Meta's interleaved RoPE
order and HF in rotate-half order (SPEC.md §3): the update s·B·A of wq/wk has its *rows* permuted, so B is written
with permute_meta_to_hf (A, which acts on the input side, is unchanged).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from herd.errors import ConfigError, FormatError
from herd.formats import keymaps
from herd.formats.io import save_safetensors_atomic, write_text_atomic

# herd short name -> (module path inside a TransformerBlock, HF module name)
TARGETS: dict[str, tuple[str, str]] = {
    "wq": ("attention.wq", "q_proj"), "wk": ("attention.wk", "k_proj"), "wv": ("attention.wv", "v_proj"),
    "wo": ("attention.wo", "o_proj"), "w1": ("feed_forward.w1", "gate_proj"), "w2": ("feed_forward.w2", "down_proj"),
    "w3": ("feed_forward.w3", "up_proj"),
}
HF_TO_SHORT = {hf: short for short, (_, hf) in TARGETS.items()}
HF_PREFIX = "base_model.model."  # PEFT's prefix in front of the transformers model's own names
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def _features(base: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear-like layer."""
    if hasattr(base, "in_features") and hasattr(base, "out_features"):
        return int(base.in_features), int(base.out_features)
    out_f, in_f = base.weight.shape
    return int(in_f), int(out_f)


class LoRALinear(nn.Module):
    """base(x) + scaling * lora_B(lora_A(dropout(x))); the base stays frozen."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = _features(base)
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        device = next(base.parameters(), next(base.buffers(), torch.empty(0))).device
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=dtype)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_parameters()
        for p in self.base.parameters():
            p.requires_grad_(False)

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as nn.Linear and PEFT do
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        d = self.lora_B(self.lora_A(self.dropout(x).to(self.lora_A.weight.dtype)))
        return y + (d * self.scaling).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """s * B @ A, (out, in) float32."""
        return self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())


def parse_targets(targets) -> list[str]:
    """'wq,wv' or a list (herd or HF names, or 'all') -> herd short names, checked."""
    if targets is None or targets == "all":
        return list(TARGETS)
    names = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else list(targets)
    out = []
    for t in names:
        short = HF_TO_SHORT.get(t, t)
        if short not in TARGETS:
            raise ConfigError(f"LoRA target {t!r} is not one of {', '.join(TARGETS)} (or their HF names)")
        if short not in out:
            out.append(short)
    if not out:
        raise ConfigError("no LoRA targets given")
    return out


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRA layer of the model by its herd module path ('layers.0.attention.wq')."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def apply_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, targets=None, dropout: float = 0.0,
               seed: int | None = None, layers=None) -> list[str]:
    """Swap the target linear layers of every block for LoRA layers; freeze all else. Returns the module paths."""
    if rank < 1:
        raise ConfigError(f"LoRA rank must be >= 1, got {rank}")
    short = parse_targets(targets)
    if lora_modules(model):
        raise ConfigError("the model already has LoRA layers")
    for p in model.parameters():
        p.requires_grad_(False)
    gen_state = torch.random.get_rng_state()
    if seed is not None:
        torch.manual_seed(seed)
    wrapped = []
    try:
        for i, block in enumerate(model.layers):
            if layers is not None and i not in layers:
                continue
            for t in short:
                parent_path, attr = TARGETS[t][0].rsplit(".", 1)
                parent = block.get_submodule(parent_path)
                base = getattr(parent, attr, None)
                if not isinstance(base, nn.Module) or not hasattr(base, "in_features"):
                    raise ConfigError(f"layer {i} has no {TARGETS[t][0]} (a MoE layer?); choose other targets")
                setattr(parent, attr, LoRALinear(base, rank, alpha, dropout))
                wrapped.append(f"layers.{i}.{TARGETS[t][0]}")
    finally:
        if seed is not None:
            torch.random.set_rng_state(gen_state)
    return wrapped


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable LoRA weights by herd names ('layers.0.attention.wq.lora_A.weight')."""
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{name}.lora_A.weight"] = m.lora_A.weight.detach()
        out[f"{name}.lora_B.weight"] = m.lora_B.weight.detach()
    return out


# -- the PEFT layout -------------------------------------------------------------------------------------------

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
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FormatError(f"{path}: not found (an adapter folder holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})") \
            from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: not valid JSON ({e})") from None
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


def apply_adapter(model: nn.Module, folder: str | Path) -> nn.Module:
    """Add a saved PEFT LoRA adapter to a herd model (unmerged); the function `herd generate --adapter` calls."""
    folder = Path(folder)
    cfg = read_adapter_config(folder)
    targets = cfg["target_modules"]
    if isinstance(targets, str):  # PEFT allows a regex here; herd accepts the plain list form only
        raise FormatError(f"{folder / ADAPTER_CONFIG}: target_modules as a regex is not supported; use a list")
    path = folder / ADAPTER_WEIGHTS
    try:
        with safe_open(path, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise FormatError(f"{path}: cannot be read ({e})") from None
    layers = cfg.get("layers_to_transform")
    layers = [layers] if isinstance(layers, int) else layers
    apply_lora(model, rank=int(cfg["r"]), alpha=float(cfg.get("lora_alpha", cfg["r"])), targets=targets,
               layers=layers)
    mods = lora_modules(model)
    seen = set()
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
        if herd_mod not in mods:
            raise FormatError(f"{path}: tensor {key!r} targets a module the adapter config does not list")
        m = mods[herd_mod]
        if part == "lora_B":
            perm = _row_permutation(herd_mod, model.config, to_hf=False)
            t = perm(t) if perm else t
        dst = getattr(m, part).weight
        if tuple(t.shape) != tuple(dst.shape):
            raise FormatError(f"{path}: tensor {key!r} has shape {tuple(t.shape)}, the model expects "
                              f"{tuple(dst.shape)}")
        with torch.no_grad():
            dst.copy_(t.to(dst.dtype))
        seen.add((herd_mod, part))
    missing = sorted(f"{m}.{p}" for m in mods for p in ("lora_A", "lora_B") if (m, p) not in seen)
    if missing:
        raise FormatError(f"{path}: missing LoRA weights for {missing[:4]}{'...' if len(missing) > 4 else ''}")
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# -- QLoRA: a frozen base that stays quantized ---------------------------------------------------------------

def quantize_base(model: nn.Module, gguf_path=None, scheme: str = "q4_1") -> list[str]:
    """Swap the blocks' linear layers for frozen QuantLinear layers (float32 activations, gradient to x only).

    With a GGUF file, its own quantized blocks are used as they are (no re-quantization); otherwise (an HF or Meta
    float base) the weights are quantized to `scheme`. Embedding, norms and output layer stay float.
    """
    from herd.quant.linear import QuantLinear
    from herd.quant.model import load_quantized_linears, quantize_model

    if gguf_path is not None:
        from herd.formats.gguf import gguf_to_herd_name, read_gguf

        g = read_gguf(gguf_path)
        blocks = {}
        for gname, t in g.tensors.items():
            name = gguf_to_herd_name(gname, g.architecture)
            if name and name.startswith("layers.") and len(t.shape) == 2 and t.is_quantized:
                blocks[name] = (t.data, t.ggml_type, t.shape)
        swapped = load_quantized_linears(model, blocks, act="f32")
    else:
        swapped = quantize_model(model, scheme, include=r"^layers\.", act="f32")
    if not swapped:
        raise ConfigError("QLoRA: no linear layer of the base could be quantized (a float GGUF? use --method lora)")
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.act = "f32"  # training: float activations (no int8 rounding of x)
    return swapped


# -- folding an adapter into its base ------------------------------------------------------------------------

def base_weight(base: nn.Module) -> torch.Tensor:
    """The float32 (out, in) weight of a linear-like layer, dequantized if it is quantized."""
    if isinstance(base, nn.Linear):
        return base.weight.detach().float()
    for name in ("dequantize", "dequantized_weight"):
        f = getattr(base, name, None)
        if callable(f):
            return f().float()
    raise ConfigError(f"cannot read the weight of a {type(base).__name__} layer to merge into it")


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRA layer by a plain nn.Linear holding W + s·B·A (quantized bases are dequantized)."""
    for path, m in lora_modules(model).items():
        w = base_weight(m.base)
        dtype = m.base.weight.dtype if isinstance(m.base, nn.Linear) else torch.float32
        merged = nn.Linear(m.in_features, m.out_features, bias=False, device=w.device, dtype=dtype)
        merged.weight.copy_((w + m.delta_weight().to(w.device)).to(dtype))
        merged.weight.requires_grad_(False)
        parent_path, attr = path.rsplit(".", 1)
        setattr(model.get_submodule(parent_path), attr, merged)
    return model

"""LoRA as a module swap: wrap chosen linear layers of a herd model, switch them on and off, fold them into the base.

A LoRA layer computes y = base(x) + s * B(A(dropout(x))) with A (r, in), B (out, r), s = alpha / r, A Kaiming-
uniform and B zero at the start (so training starts from the base model exactly; PEFT's default init). The base may
be an nn.Linear or a frozen quantized layer (QLoRA): anything with forward(x) and in/out feature sizes.

Floor: models/. Used by inference (--adapter, the vision LoRA) and training alike; adapter files in the PEFT layout
are read and written by herd/formats/peft.py, QLoRA's quantized base is made in herd/train/lora.py.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from herd.errors import ConfigError

# herd short name -> (module path inside a TransformerBlock, HF module name)
TARGETS: dict[str, tuple[str, str]] = {
    "wq": ("attention.wq", "q_proj"), "wk": ("attention.wk", "k_proj"), "wv": ("attention.wv", "v_proj"),
    "wo": ("attention.wo", "o_proj"), "w1": ("feed_forward.w1", "gate_proj"), "w2": ("feed_forward.w2", "down_proj"),
    "w3": ("feed_forward.w3", "up_proj"),
}
HF_TO_SHORT = {hf: short for short, (_, hf) in TARGETS.items()}


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

    row_scaling: torch.Tensor | None = None  # (B, 1, 1): a scaling per batch row, set by lora_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        a = self.lora_A(self.dropout(x).to(self.lora_A.weight.dtype))  # (..., r)
        if self.row_scaling is None and a.dtype == y.dtype and y.is_contiguous():
            # y + s * a B^T as one GEMM accumulating onto the base output: no (..., out) temporaries for B's product
            # and its scaling (training keeps only a for B's gradient, as before)
            return torch.addmm(y.view(-1, self.out_features), a.reshape(-1, self.rank), self.lora_B.weight.t(),
                               alpha=self.scaling).view(y.shape)
        d = self.lora_B(a)
        s = self.scaling if self.row_scaling is None else self.row_scaling.to(d.dtype)
        return y + (d * s).to(y.dtype)

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


def set_lora(model: nn.Module, on: bool) -> None:
    """Switch the model's LoRA layers on (their trained scaling) or off (scaling 0: the base model exactly)."""
    for m in lora_modules(model).values():
        if not hasattr(m, "trained_scaling"):
            m.trained_scaling = m.scaling
        m.scaling = m.trained_scaling if on else 0.0


class lora_switched:
    """Within the block, the model's LoRA layers are on or off; afterwards they are as they were."""

    def __init__(self, model: nn.Module, on: bool):
        self.model, self.on = model, on
        self.mods = list(lora_modules(model).values())

    def __enter__(self):
        self.saved = [m.scaling for m in self.mods]
        set_lora(self.model, self.on)

    def __exit__(self, *exc):
        for m, s in zip(self.mods, self.saved):
            m.scaling = s


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


class lora_rows:
    """Within the block, the model's LoRA layers are on (their trained scaling) for the batch rows where `on` (B,) is
    True and off (the base model exactly) for the others: one forward serves rows with and without the adapter."""

    def __init__(self, model: nn.Module, on: torch.Tensor):
        self.mods = list(lora_modules(model).values())
        self.on = on.reshape(-1, 1, 1).float()

    def __enter__(self):
        for m in self.mods:
            m.row_scaling = self.on * getattr(m, "trained_scaling", m.scaling)

    def __exit__(self, *exc):
        for m in self.mods:
            m.row_scaling = None

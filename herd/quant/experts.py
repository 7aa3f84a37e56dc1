"""Quantized Llama 4 experts: the block-quantized counterpart of herd.models.moe.Experts (same interface).

Each expert is two QuantLinear layers over GGML blocks (layouts: SPEC.md §4):
    w13[e]  (D -> 2F)  expert e's gate rows (w1) then its up rows (w3), so one matmul computes both
    w2[e]   (F -> D)   its down projection
The per-expert layers' blocks are views of two stacked uint8 tensors, (E, 2F, D/qk*bs) and (E, D, F/qk*bs): the
layout of GGUF's ffn_gate_exps / ffn_up_exps (E, F, D) and ffn_down_exps (E, D, F) with gate and up interleaved
per expert. Measured at D = F = 512, q4_0, one thread, one token: gate+up fused 52 us per expert against 56 us
unfused, and one QuantLinear per expert as fast as quant_matmul on slices of one stacked buffer (56 us), so the
module reuses QuantLinear whole (native kernels, fallback, torch.compile op, act modes) rather than a second path.

As in Experts, only the experts that received tokens run.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from herd.errors import ConfigError, FormatError
from herd.quant.blocks import type_name
from herd.quant.linear import QUANT_TYPES, SCHEMES, QuantLinear, _type_info, quantize_weight

EXPERT_NAMES = ("w1", "w3", "w2")  # herd's Experts parameters: gate, up, down


def _as_bytes(raw, rows: int, row_bytes: int, what: str) -> np.ndarray:
    """raw GGML bytes (numpy, e.g. a GGUF file's read-only mmap, or torch) -> a (rows, row_bytes) uint8 view."""
    arr = raw.detach().cpu().numpy() if isinstance(raw, torch.Tensor) else np.asarray(raw)
    if arr.dtype != np.uint8:
        raise FormatError(f"{what}: blocks must be uint8 bytes, got {arr.dtype}")
    if arr.size != rows * row_bytes:
        raise FormatError(f"{what}: expected {rows * row_bytes} bytes of blocks, got {arr.size}")
    return arr.reshape(rows, row_bytes)


def _name(t: int | str) -> str:
    try:
        return type_name(t)
    except FormatError:
        return str(t)


class QuantExperts(nn.Module):
    """E SwiGLU experts with GGML-block weights; forward(x_gD, counts) as Experts: rows sorted by expert."""

    def __init__(self, w13: list[QuantLinear], w2: list[QuantLinear]):
        super().__init__()
        if not w13 or len(w13) != len(w2):
            raise ConfigError(f"QuantExperts needs one gate/up and one down layer per expert, got {len(w13)} and "
                              f"{len(w2)}")
        D, F2 = w13[0].in_features, w13[0].out_features
        for e, (a, b) in enumerate(zip(w13, w2)):
            if (a.in_features, a.out_features, b.in_features, b.out_features) != (D, F2, F2 // 2, D) or F2 % 2:
                raise ConfigError(f"QuantExperts expert {e}: gate/up {a.in_features}->{a.out_features} and down "
                                  f"{b.in_features}->{b.out_features} do not fit dim {D}, hidden {F2 // 2}")
        self.n_experts, self.dim, self.hidden = len(w13), D, F2 // 2
        self.w13, self.w2 = nn.ModuleList(w13), nn.ModuleList(w2)

    # -- construction ------------------------------------------------------------------------------------------

    @staticmethod
    def fits(dim: int, hidden: int, gate_type: int | str, up_type: int | str, down_type: int | str) -> bool:
        """Whether blocks of these types and sizes can be held: kernel types, gate and up alike, whole blocks."""
        names = [_name(t) for t in (gate_type, up_type, down_type)]
        if any(n not in QUANT_TYPES for n in names) or names[0] != names[1]:
            return False
        return dim % QUANT_TYPES[names[0]][1] == 0 and hidden % QUANT_TYPES[names[2]][1] == 0

    @classmethod
    def from_blocks(cls, w1, w3, w2, ggml_type: int | str | tuple, n_experts: int, dim: int, hidden: int,
                    act: str | None = None, threads: int | None = None) -> "QuantExperts":
        """From GGUF expert tensors' raw bytes: w1 / w3 (ffn_gate_exps / ffn_up_exps) blocks of (E, F, D), w2
        (ffn_down_exps) of (E, D, F). ggml_type: one type for all three, or (gate/up type, down type)."""
        t13, t2 = ggml_type if isinstance(ggml_type, tuple) else (ggml_type, ggml_type)
        if not cls.fits(dim, hidden, t13, t13, t2):
            raise ConfigError(f"QuantExperts cannot hold {_name(t13)} gate/up and {_name(t2)} down blocks for dim "
                              f"{dim}, hidden {hidden} (types: {', '.join(QUANT_TYPES)}; whole blocks per row)")
        E, D, F_ = n_experts, dim, hidden
        (_, _, qk13, bs13), (_, _, qk2, bs2) = _type_info(t13), _type_info(t2)
        rb13, rb2 = D // qk13 * bs13, F_ // qk2 * bs2  # bytes per row
        gate = _as_bytes(w1, E * F_, rb13, "experts w1 (gate)").reshape(E, F_, rb13)
        up = _as_bytes(w3, E * F_, rb13, "experts w3 (up)").reshape(E, F_, rb13)
        down = _as_bytes(w2, E * D, rb2, "experts w2 (down)").reshape(E, D, rb2)
        raw13 = torch.from_numpy(np.concatenate([gate, up], axis=1))  # copies: our own writable blocks
        return cls._from_stacked(raw13, torch.from_numpy(down.copy()), t13, t2, D, F_, act, threads)

    @classmethod
    def from_experts(cls, experts: nn.Module, scheme: str = "q4_1", act: str | None = None,
                     threads: int | None = None) -> "QuantExperts":
        """Quantize a float Experts (w1, w3 (E, D, F), w2 (E, F, D)) to q8_0, q4_0, q4_1, q5_0, q5_1 or q4_k."""
        if scheme.lower() not in SCHEMES:
            raise ConfigError(f"unknown quantization scheme {scheme!r} (choose from {', '.join(SCHEMES)})")
        E, D, F_ = experts.w1.shape
        if not cls.fits(D, F_, scheme, scheme, scheme):
            raise ConfigError(f"{scheme} experts need dim {D} and hidden {F_} multiples of "
                              f"{QUANT_TYPES[scheme.upper()][1]}")
        w1, w3, w2 = (getattr(experts, n).detach().float().cpu().transpose(1, 2) for n in EXPERT_NAMES)
        # torch's (E, out, in) per expert, rows along in: (E, 2F, D) gate then up, (E, D, F) down
        raw13 = quantize_weight(torch.cat([w1, w3], dim=1).reshape(E * 2 * F_, D).numpy(), scheme)
        raw2 = quantize_weight(w2.reshape(E * D, F_).numpy(), scheme)
        return cls._from_stacked(torch.from_numpy(raw13).reshape(E, 2 * F_, -1),
                                 torch.from_numpy(raw2).reshape(E, D, -1), scheme.upper(), scheme.upper(), D, F_,
                                 act, threads)

    @classmethod
    def _from_stacked(cls, raw13: torch.Tensor, raw2: torch.Tensor, t13, t2, D: int, F_: int, act, threads):
        """One QuantLinear per expert and projection, each a view of the stacked blocks (no copy)."""
        w13 = [QuantLinear.from_blocks(raw13[e], t13, 2 * F_, D, act=act, threads=threads) for e in range(len(raw13))]
        w2 = [QuantLinear.from_blocks(raw2[e], t2, D, F_, act=act, threads=threads) for e in range(len(raw2))]
        return cls(w13, w2)

    def dequantize(self) -> nn.Module:
        """The float32 Experts these blocks stand for."""
        from herd.models.moe import Experts

        out = Experts(self.n_experts, self.dim, self.hidden)
        with torch.no_grad():
            for e in range(self.n_experts):
                gate_FD, up_FD = self.w13[e].dequantize().split(self.hidden)
                out.w1[e], out.w3[e] = gate_FD.t(), up_FD.t()
                out.w2[e] = self.w2[e].dequantize().t()
        return out

    # -- compute -----------------------------------------------------------------------------------------------

    def forward(self, x_gD: torch.Tensor, counts: list[int]) -> torch.Tensor:
        if len(counts) != self.n_experts or sum(counts) != x_gD.shape[0]:
            raise ConfigError(f"QuantExperts: counts for {len(counts)} experts summing to {sum(counts)}, expected "
                              f"{self.n_experts} experts and {x_gD.shape[0]} rows")
        out_gD = torch.empty_like(x_gD)
        start = 0
        for e, n in enumerate(counts):  # one gate/up and one down matmul per expert that received tokens
            if n == 0:
                continue
            x_nD = x_gD[start:start + n]
            gate_nF, up_nF = self.w13[e](x_nD).chunk(2, dim=-1)
            out_gD[start:start + n] = self.w2[e](F.silu(gate_nF) * up_nF)
            start += n
        return out_gD

    def extra_repr(self) -> str:
        return (f"n_experts={self.n_experts}, dim={self.dim}, hidden={self.hidden}, "
                f"types={self.w13[0].type_name}/{self.w2[0].type_name}, act={self.w13[0].act}")


def load_gguf_experts(model: nn.Module, tensors: dict, act: str | None = None,
                      threads: int | None = None) -> list[str]:
    """Swap each Experts module of `model` whose w1, w3, w2 are all in `tensors` as GGUF tensors (objects with
    .data uint8, .ggml_type, .shape in GGUF's layout: (E, F, D), (E, F, D), (E, D, F)) that QuantExperts can hold
    for a QuantExperts over those blocks. Returns the tensor names used (e.g. "layers.0.feed_forward.experts.w1")."""
    from herd.models.moe import Experts

    used = []
    for mod_name, mod in list(model.named_modules()):
        names = [f"{mod_name}.{n}" for n in EXPERT_NAMES]
        if type(mod) is not Experts or not all(n in tensors for n in names):
            continue
        g, u, d = (tensors[n] for n in names)
        E, D, F_ = mod.w1.shape
        for n, t, want in zip(names, (g, u, d), ((E, F_, D), (E, F_, D), (E, D, F_))):
            if tuple(int(s) for s in t.shape) != want:
                raise FormatError(f"tensor {n}: GGUF shape {tuple(t.shape)}, the model expects {want}")
        if not QuantExperts.fits(D, F_, int(g.ggml_type), int(u.ggml_type), int(d.ggml_type)):
            continue  # e.g. gate and up of different types: the caller dequantizes them
        parent, _, child = mod_name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, QuantExperts.from_blocks(
            g.data, u.data, d.data, (int(g.ggml_type), int(d.ggml_type)), E, D, F_, act=act, threads=threads))
        used += names
    return used

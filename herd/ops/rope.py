"""Rotary position embeddings in Meta's interleaved-pair form (SPEC.md §1), with Llama 3.1 scaling."""

from __future__ import annotations

import math

import torch

from herd.config import RopeScaling


def inv_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> torch.Tensor:
    """(head_dim/2,) float32 inverse frequencies theta^(-2i/hd), scaled as Llama 3.1 does when asked."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim))
    if scaling is None:
        return freqs
    # Llama 3.1 "llama3" scaling: keep high frequencies, divide low ones by the factor, blend in between.
    s, lf, hf = scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor
    lo = scaling.original_max_position_embeddings
    wavelen = 2 * math.pi / freqs
    low_freq_wavelen, high_freq_wavelen = lo / lf, lo / hf
    out = torch.where(wavelen > low_freq_wavelen, freqs / s, freqs)
    if hf > lf:  # an empty blend band (lf == hf, Llama 4 Scout) has nothing to blend
        alpha = (lo / wavelen - lf) / (hf - lf)
        blended = (1 - alpha) * freqs / s + alpha * freqs
        mid = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        out = torch.where(mid, blended, out)
    return out


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (2i, 2i+1) of x (B, T, nh, hd) by angles cos/sin (B, T, hd/2); fp32 math, cast back."""
    xf = x.float().unflatten(-1, (-1, 2))  # (B, T, nh, hd/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos.unsqueeze(2), sin.unsqueeze(2)  # (B, T, 1, hd/2)
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)
    return out.flatten(-2).type_as(x)

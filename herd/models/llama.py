"""The Llama text transformer (Llama 2, 3, 3.1, 3.2, 3.3; the Llama 4 attention variants), Meta weight names.

Shapes: B batch, T new tokens, S cached positions, D dim, H query heads, KV key/value heads, hd head dim, V vocab.
One forward serves training (no cache: causal attention over the T tokens) and inference (cache: the new tokens
attend to every cached position <= their own). Positions are explicit per row, so rows of a batch can sit at
different lengths without padding (SPEC.md §1 for every formula here).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from herd.config import ModelConfig
from herd.models.kv_cache import KVCache
from herd.ops.rope import apply_rope, inv_frequencies


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32, cast back to the input dtype, then scale (Meta and HF agree on this order)
        xf = x.float()
        normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)
        return normed * self.weight


def rms_norm_weightless(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama 4 QK-norm: RMS norm over the last axis with no weight, in fp32."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        c = config
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        self.wq = nn.Linear(c.dim, c.n_heads * c.head_dim, bias=False)
        self.wk = nn.Linear(c.dim, c.n_kv_heads * c.head_dim, bias=False)
        self.wv = nn.Linear(c.dim, c.n_kv_heads * c.head_dim, bias=False)
        self.wo = nn.Linear(c.n_heads * c.head_dim, c.dim, bias=False)
        self.layer = layer
        self.use_rope = c.uses_rope(layer)
        self.qk_norm_eps = c.norm_eps if (c.use_qk_norm and self.use_rope) else None
        # Llama 4: NoPE layers see the whole causal context and scale q by position; RoPE layers attend in chunks.
        self.chunk = c.attention_chunk_size if (self.use_rope and c.attention_chunk_size) else 0
        self.temperature = (c.attn_scale, c.floor_scale) if (not self.use_rope and c.attn_temperature_tuning) else None

    def forward(self, x, cos, sin, input_pos, mask, cache: KVCache | None, kv_len: int, rows=None):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        if self.use_rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            if self.qk_norm_eps is not None:
                q, k = rms_norm_weightless(q, self.qk_norm_eps), rms_norm_weightless(k, self.qk_norm_eps)
        if self.temperature is not None:
            attn_scale, floor_scale = self.temperature
            scale = 1 + attn_scale * torch.log(torch.floor((input_pos.float() + 1) / floor_scale) + 1)  # (B, T)
            q = (q * scale[:, :, None, None]).type_as(q)
        if cache is not None:
            k, v = cache.update(self.layer, input_pos, k, v, kv_len, rows)  # (B, KV, S, hd)
        else:
            k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, KV, T, hd)
        q = q.transpose(1, 2)  # (B, H, T, hd)
        m = mask[1] if self.chunk else mask[0]
        # GQA: KV head j serves query heads j*n_rep ... (j+1)*n_rep-1. Plain causal attention (m None: a caller's
        # hook, training rows that are one example each, no cache) reads the KV heads as they are (enable_gqa), so
        # training keeps (B, KV, T, hd) keys and values for the backward pass, not n_rep copies; the other paths
        # repeat them as before
        gqa = m is None and self.n_heads != self.n_kv_heads
        if self.n_heads != self.n_kv_heads and not gqa:
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        # m None: plain causal, which the fused kernels compute over the lower triangle only
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=m is None, enable_gqa=gqa)  # (B,H,T,hd)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); w1 gate, w3 up, w2 down."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def make_feed_forward(config: ModelConfig, layer: int) -> nn.Module:
    if config.is_moe_layer(layer):
        from herd.models.moe import MoE  # Llama 4

        return MoE(config)
    return FeedForward(config.dim, config.layer_ffn_dim(layer))


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.attention = Attention(config, layer)
        self.feed_forward = make_feed_forward(config, layer)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x, cos, sin, input_pos, mask, cache, kv_len, rows=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, input_pos, mask, cache, kv_len, rows)
        return h + self.feed_forward(self.ffn_norm(h))


def embedding(num: int, dim: int) -> nn.Embedding:
    """nn.Embedding with its own N(0, 1) init, skipped on the meta device (models built to be loaded): there normal_
    runs through torch._refs, whose first use imports torch._dynamo (~1.4 s, ~65 MB of RSS) to fill nothing."""
    weight = torch.empty(num, dim)
    if not weight.is_meta:
        nn.init.normal_(weight)
    return nn.Embedding(num, dim, _weight=weight)


class Transformer(nn.Module):
    """forward(tokens (B, T), input_pos (B, T) | None, cache) -> logits (B, T, V)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # (hd/2,) float32; kept on the CPU-side dtype even when the model is bf16. A checkpoint's own rope_freqs
        # (GGUF) can replace it through set_inv_freq.
        # (computed on the CPU when building on the meta device: meta arithmetic would import torch._dynamo too)
        device = self.tok_embeddings.weight.device
        with torch.device("cpu" if device.type == "meta" else device):
            inv_freq = inv_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
        self.register_buffer("inv_freq", inv_freq.to(device=device), persistent=False)

    def set_inv_freq(self, inv_freq: torch.Tensor) -> None:
        self.inv_freq = inv_freq.to(torch.float32)

    def tie_weights(self) -> None:
        if self.config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def masks(self, input_pos: torch.Tensor, key_pos: torch.Tensor):
        """Boolean attention masks (B, 1, T, S), True = attend: (global causal, chunked causal)."""
        q = input_pos[:, None, :, None]
        k = key_pos[:, None, None, :]
        causal = k <= q
        chunk = self.config.attention_chunk_size
        chunked = causal & (torch.div(k, chunk, rounding_mode="floor") == torch.div(q, chunk, rounding_mode="floor")) \
            if chunk else causal
        return causal, chunked

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None, cache: KVCache | None = None,
                embeds: torch.Tensor | None = None, last_only: bool = False,
                cache_rows: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) int64; input_pos (B, T) positions (default 0..T-1); embeds (B, T, D) replaces the lookup;
        cache_rows (B,) the cache rows these sequences live in (default: row b for sequence b)."""
        B, T = tokens.shape
        if input_pos is None:
            input_pos = torch.arange(T, device=tokens.device).expand(B, T)
        elif input_pos.dim() == 1:
            input_pos = input_pos.expand(B, T)
        h = self.tok_embeddings(tokens) if embeds is None else embeds
        h = self._blocks(h, input_pos, cache, cache_rows)
        if last_only:  # a prefill wants the next token's logits only: skip the (T, V) output projection
            h = h[:, -1:]
        return self.output(self.norm(h))

    def _blocks(self, h: torch.Tensor, input_pos: torch.Tensor, cache: KVCache | None,
                cache_rows: torch.Tensor | None) -> torch.Tensor:
        """h (B, T, D) through every layer at positions input_pos (B, T) -> (B, T, D)."""
        B, T = input_pos.shape
        angles = input_pos.float()[..., None] * self.inv_freq  # (B, T, hd/2)
        cos, sin = torch.cos(angles), torch.sin(angles)
        if cache is not None:
            kv_len = int(input_pos.max()) + 1
            key_pos = torch.arange(kv_len, device=h.device).expand(B, kv_len)
        else:
            kv_len, key_pos = T, input_pos
        mask = self.masks(input_pos, key_pos)
        if cache is not None and cache.window:  # Llama 4 chunked layers read a ring of the last `window` positions
            mask = (mask[0], self.masks(input_pos, cache.ring_positions(input_pos))[1])
        for layer in self.layers:
            h = layer(h, cos, sin, input_pos, mask, cache, kv_len, cache_rows)
        return h


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def build_model(config: ModelConfig, state_dict: dict[str, torch.Tensor] | None = None,
                dtype: torch.dtype = torch.float32) -> Transformer:
    """Build a Transformer; with a state dict, on the meta device first and then assigned (no second copy)."""
    if state_dict is None:
        model = Transformer(config).to(dtype)
        return model
    with torch.device("meta"):
        model = Transformer(config)
    load_weights(model, state_dict, dtype)
    return model


def checked_tensors(expected: dict, state_dict: dict[str, torch.Tensor], dtype: torch.dtype | None = None,
                    what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The state dict's tensors for exactly the names of `expected` (name -> reference tensor), cast to dtype where
    floating; every missing, unexpected or misshaped name is a FormatError."""
    from herd.errors import FormatError

    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise FormatError(f"{what} does not match the config: missing tensors {missing[:8]}"
                          f"{'...' if len(missing) > 8 else ''}, unexpected tensors {unexpected[:8]}"
                          f"{'...' if len(unexpected) > 8 else ''}")
    tensors = {}
    for name, ref in expected.items():
        t = state_dict[name]
        if tuple(t.shape) != tuple(ref.shape):
            raise FormatError(f"tensor {name} has shape {tuple(t.shape)}, the config expects {tuple(ref.shape)}")
        if dtype is not None and t.dtype != dtype and t.is_floating_point():
            t = t.to(dtype)
        tensors[name] = t
    return tensors


def load_weights(model: Transformer, state_dict: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> None:
    """Assign checkpoint tensors (herd names) to the model; every missing, unexpected or misshaped name is an error."""
    expected = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    if model.config.tie_embeddings:
        expected.pop("output.weight", None)
    tensors = checked_tensors(expected, state_dict, dtype)
    model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    device = model.tok_embeddings.weight.device
    model.inv_freq = inv_frequencies(model.config.head_dim, model.config.rope_theta,
                                     model.config.rope_scaling).to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()

"""Llama 3.2 Vision (Mllama): a Llama 3.1 text model with gated cross-attention blocks reading a tiled ViT.

Shapes: B batch, T new tokens, S cached text positions, V_S vision tokens per prompt (images x max_tiles x tokens per
tile), D text dim, H / KV heads, hd head dim. SPEC.md §6 for every formula.

The self-attention layers are herd's own Llama blocks (herd.models.llama.TransformerBlock, Meta weight names and
interleaved RoPE). A cross-attention block k runs just before self-attention layer `xattn_before[k]` (Meta's fusion
schedule; transformers flattens both kinds into one list). Cross-attention keys and values are computed once from the
vision tokens and kept in MllamaCache; later decode steps reuse them.

Rows that see no image (text before the first <|image|>): Meta multiplies their cross-attention output by zero;
transformers lets them attend to every vision token and zeroes only the MLP branch. `zero_unmasked_rows=True`
follows Meta, False follows transformers; the HF loader picks False so that HF checkpoints reproduce transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from herd.config import ModelConfig
from herd.models.kv_cache import KVCache
from herd.errors import GenerationError
from herd.models.llama import FeedForward, RMSNorm, TransformerBlock, embedding
from herd.models.vision import MllamaVisionConfig, MllamaVisionEncoder
from herd.ops.rope import inv_frequencies

IMAGE_TOKEN_ID = 128256  # <|image|> as the model sees it (Meta's chat format rewrites the tokenizer's 128011)


@dataclass(frozen=True)
class MllamaConfig:
    """Text (herd ModelConfig: n_layers self-attention layers, vocab_size output rows) + cross-attention + vision."""

    text: ModelConfig
    vision: MllamaVisionConfig = field(default_factory=MllamaVisionConfig)
    xattn_before: tuple[int, ...] = (3, 7, 11, 15, 19, 23, 27, 31)  # self-attn layer each cross block precedes
    image_token_id: int = IMAGE_TOKEN_ID
    extra_embeddings: int = 8  # learnable rows after the text vocabulary (<|image|> is the first)
    zero_unmasked_rows: bool = True  # Meta's cross-attention row masking (see the module docstring)

    def replace(self, **changes) -> "MllamaConfig":
        import dataclasses

        return dataclasses.replace(self, **changes)


def fusion_schedule(n_layers: int, n_cross: int) -> tuple[int, ...]:
    """Meta's _init_fusion_schedule: every k-th layer counted from the last, k = ceil(L / N)."""
    k = -(-n_layers // n_cross)
    return tuple(sorted(list(range(n_layers - 1, -1, -k))[:n_cross]))


class CrossAttention(nn.Module):
    """q from text, k/v from vision tokens; per-head RMSNorm on q and k; GQA; no RoPE."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        self.wq = nn.Linear(c.dim, c.n_heads * c.head_dim, bias=False)
        self.wk = nn.Linear(c.dim, c.n_kv_heads * c.head_dim, bias=False)
        self.wv = nn.Linear(c.dim, c.n_kv_heads * c.head_dim, bias=False)
        self.wo = nn.Linear(c.n_heads * c.head_dim, c.dim, bias=False)
        self.q_norm = RMSNorm(c.head_dim, c.norm_eps)
        self.k_norm = RMSNorm(c.head_dim, c.norm_eps)

    def kv(self, vision: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """vision (B, V_S, D) -> k, v (B, KV, V_S, hd), computed once per prompt."""
        B, S, _ = vision.shape
        k = self.k_norm(self.wk(vision).view(B, S, self.n_kv_heads, self.head_dim))
        v = self.wv(vision).view(B, S, self.n_kv_heads, self.head_dim)
        return k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x, k, v, mask, row_mask, zero_rows: bool):
        """x (B, T, D); mask (B, 1, T, V_S) bool True = attend; row_mask (B, T, 1) 1 for rows that see an image."""
        B, T, _ = x.shape
        q = self.q_norm(self.wq(x).view(B, T, self.n_heads, self.head_dim)).transpose(1, 2)  # (B, H, T, hd)
        if self.n_heads != self.n_kv_heads:
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)  # (B, T, H, hd)
        if zero_rows:
            out = out * row_mask[..., None].to(out.dtype)
        return self.wo(out.reshape(B, T, -1))


class CrossAttentionBlock(nn.Module):
    """h = x + tanh(g_attn) XAttn(norm(x)); out = h + tanh(g_ffwd) row_mask FFN(norm(h)). Meta names."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.attention = CrossAttention(c)
        self.attention_norm = RMSNorm(c.dim, c.norm_eps)
        self.feed_forward = FeedForward(c.dim, c.ffn_dim)
        self.ffn_norm = RMSNorm(c.dim, c.norm_eps)
        self.gate_attn = nn.Parameter(torch.zeros(1))
        self.gate_ffwd = nn.Parameter(torch.zeros(1))

    def forward(self, x, k, v, mask, row_mask, zero_rows: bool):
        h = x + self.gate_attn.tanh() * self.attention(self.attention_norm(x), k, v, mask, row_mask, zero_rows)
        ffn = self.feed_forward(self.ffn_norm(h)) * row_mask.to(h.dtype)
        return h + self.gate_ffwd.tanh() * ffn


class MllamaCache:
    """Self-attention KV cache of the text layers + cross-attention K/V and the vision mask of the latest row."""

    def __init__(self, config: MllamaConfig, batch: int, max_len: int, dtype=torch.float32, device="cpu"):
        self.kv = KVCache(config.text, batch, max_len, dtype=dtype, device=device)
        self.xk: list[torch.Tensor] | None = None  # per cross block (B, KV, V_S, hd)
        self.xv: list[torch.Tensor] | None = None
        self.last_mask: torch.Tensor | None = None  # (B, V_S) bool: what a token after the prompt attends to


class MllamaTextModel(nn.Module):
    """forward(tokens (B, T), input_pos, cache, vision states, masks) -> logits (B, T, V)."""

    def __init__(self, config: MllamaConfig):
        super().__init__()
        c = config.text
        self.config = config
        self.tok_embeddings = embedding(c.vocab_size + config.extra_embeddings, c.dim)
        self.layers = nn.ModuleList(TransformerBlock(c, i) for i in range(c.n_layers))
        self.cross_attention_layers = nn.ModuleList(CrossAttentionBlock(c) for _ in config.xattn_before)
        self.norm = RMSNorm(c.dim, c.norm_eps)
        self.output = nn.Linear(c.dim, c.vocab_size, bias=False)
        with torch.device("cpu"):  # also when built on the meta device: meta arithmetic would import torch._dynamo
            inv_freq = inv_frequencies(c.head_dim, c.rope_theta, c.rope_scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, tokens, input_pos=None, cache: MllamaCache | None = None, vision: torch.Tensor | None = None,
                vision_mask: torch.Tensor | None = None, last_only: bool = False, cache_rows=None):
        """vision (B, V_S, D) projected vision tokens (None: text only, or reuse the cache's);
        vision_mask (B, T, V_S) bool, which vision tokens each new token may attend to;
        cache_rows (B,) the self-attention cache rows of these sequences (text-only batches, as Transformer)."""
        B, T = tokens.shape
        dev = tokens.device
        if input_pos is None:
            input_pos = torch.arange(T, device=dev).expand(B, T)
        elif input_pos.dim() == 1:
            input_pos = input_pos.expand(B, T)
        h = self.tok_embeddings(tokens)
        angles = input_pos.float()[..., None] * self.inv_freq
        cos, sin = torch.cos(angles), torch.sin(angles)
        if cache is not None:
            kv_len = int(input_pos.max()) + 1
            key_pos = torch.arange(kv_len, device=dev).expand(B, kv_len)
        else:
            kv_len, key_pos = T, input_pos
        causal = key_pos[:, None, None, :] <= input_pos[:, None, :, None]  # (B, 1, T, S)
        masks = (causal, causal)

        xkv = self._cross_kv(vision, cache)
        attn_mask = row_mask = None
        if xkv is not None:
            if vision_mask is None:
                if cache is None or cache.last_mask is None:
                    raise GenerationError("vision tokens given without a vision_mask (which text rows see which "
                                          "image tiles); build one with mllama_vision_mask")
                vision_mask = cache.last_mask[:, None, :].expand(B, T, -1)
            if cache is not None:
                cache.last_mask = vision_mask[:, -1]
            row_mask = vision_mask.any(-1, keepdim=True)  # (B, T, 1)
            # rows with no image attend everywhere (their output is zeroed or kept, as the config says)
            attn_mask = (vision_mask | ~row_mask)[:, None]  # (B, 1, T, V_S)
        zero_rows = self.config.zero_unmasked_rows
        schedule = self.config.xattn_before
        for i, layer in enumerate(self.layers):
            h = self._cross(h, i, schedule, xkv, attn_mask, row_mask, zero_rows)
            h = layer(h, cos, sin, input_pos, masks, None if cache is None else cache.kv, kv_len, cache_rows)
        h = self._cross(h, len(self.layers), schedule, xkv, attn_mask, row_mask, zero_rows)  # a block after the last
        if last_only:
            h = h[:, -1:]
        return self.output(self.norm(h))

    def _cross_kv(self, vision, cache):
        if vision is not None:
            kv = [blk.attention.kv(vision) for blk in self.cross_attention_layers]
            xk, xv = [k for k, _ in kv], [v for _, v in kv]
            if cache is not None:
                cache.xk, cache.xv = xk, xv
            return xk, xv
        if cache is not None and cache.xk is not None:
            return cache.xk, cache.xv
        return None  # text only: the cross-attention blocks are skipped, as in both references

    def _cross(self, h, i, schedule, xkv, attn_mask, row_mask, zero_rows):
        if xkv is None:
            return h
        for k, before in enumerate(schedule):
            if before == i:
                h = self.cross_attention_layers[k](h, xkv[0][k], xkv[1][k], attn_mask, row_mask, zero_rows)
        return h


class Mllama(nn.Module):
    """The whole model: vision_model (encoder + projection) and text_model, Meta's top-level names."""

    def __init__(self, config: MllamaConfig):
        super().__init__()
        self.config = config
        self.vision_model = nn.Module()
        self.vision_model.vision_encoder = MllamaVisionEncoder(config.vision)
        self.vision_model.vision_projection = nn.Linear(config.vision.output_dim, config.text.dim, bias=True)
        self.text_model = MllamaTextModel(config)

    def encode_images(self, pixel_values, aspect_ratio_ids, aspect_ratio_mask) -> torch.Tensor:
        """pixel_values (B, I, N, 3, T, T), ids (B, I), mask (B, I, N) -> vision tokens (B, I*N*(P+1), D)."""
        B, I = pixel_values.shape[:2]
        enc = self.vision_model.vision_encoder(pixel_values.flatten(0, 1), aspect_ratio_ids.flatten(),
                                               aspect_ratio_mask.flatten(0, 1))  # (B*I, N, P+1, out)
        return self.vision_model.vision_projection(enc).view(B, -1, self.config.text.dim)

    def forward(self, tokens, input_pos=None, cache: MllamaCache | None = None, pixel_values=None,
                aspect_ratio_ids=None, aspect_ratio_mask=None, cross_attention_mask=None, last_only=False):
        """cross_attention_mask (B, T, I, N): 1 where token t may attend tile n of image i (transformers' layout)."""
        vision = None
        if pixel_values is not None:
            vision = self.encode_images(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
        vision_mask = None
        if cross_attention_mask is not None:
            vision_mask = expand_tile_mask(cross_attention_mask, self.config.vision.n_patches)
        return self.text_model(tokens, input_pos, cache, vision, vision_mask, last_only)


def expand_tile_mask(tile_mask: torch.Tensor, tokens_per_tile: int) -> torch.Tensor:
    """(B, T, I, N) tile-level mask -> (B, T, I*N*tokens_per_tile) bool mask over vision tokens."""
    return tile_mask.bool().repeat_interleave(tokens_per_tile, dim=3).flatten(2)


def image_spans(tokens: list[int], image_token_id: int = IMAGE_TOKEN_ID) -> list[tuple[int, int]]:
    """[start, end) text span that sees each image: from its <|image|> to the next one (the last: to the end);
    consecutive <|image|> tokens all extend to the text after the group (Meta's create_vision_mask)."""
    locs = [i for i, t in enumerate(tokens) if t == image_token_id]
    spans = [[a, b] for a, b in zip(locs, locs[1:] + [len(tokens)])]
    end = len(tokens)
    for s in reversed(spans):
        if s[1] == s[0] + 1:  # directly followed by another image token: share the group's span
            s[1] = end
        end = s[1]
    return [(a, b) for a, b in spans]


def cross_attention_mask(tokens: list[int], num_tiles: list[int], max_tiles: int,
                         image_token_id: int = IMAGE_TOKEN_ID) -> torch.Tensor:
    """(T, I, max_tiles) int64: 1 where token t may attend tile n of image i."""
    spans = image_spans(tokens, image_token_id)
    if len(spans) != len(num_tiles):
        raise GenerationError(f"prompt has {len(spans)} <|image|> tokens but {len(num_tiles)} images were given")
    mask = torch.zeros(len(tokens), max(len(num_tiles), 1), max_tiles, dtype=torch.int64)
    for i, ((a, b), n) in enumerate(zip(spans, num_tiles)):
        mask[a:b, i, :n] = 1
    return mask


@dataclass
class MllamaInputs:
    """One prompt ready for Mllama.forward (batch axis of 1 added)."""

    tokens: torch.Tensor  # (1, T)
    pixel_values: torch.Tensor  # (1, I, max_tiles, 3, T, T)
    aspect_ratio_ids: torch.Tensor  # (1, I)
    aspect_ratio_mask: torch.Tensor  # (1, I, max_tiles)
    cross_attention_mask: torch.Tensor  # (1, T, I, max_tiles)

"""Image encoders: the Llama 3.2 Vision tiled ViT (cross-attention family) and the Llama 4 early-fusion ViT.

Shapes: B images, N tiles per image (max_tiles for Mllama), P patches per tile (+1 with the class token), D width,
H heads, hd head dim. SPEC.md §6 (Mllama) and §5 (Llama 4) give every formula and its source.

Weight names are Meta's (`vision_encoder.transformer.resblocks.N.attn.wq`, ...). One layout differs from Meta's
checkpoints: the tile position tables (`pre_tile_pos_embed`, `post_tile_pos_embed`, `gated_positional_embedding`)
are stored per aspect-ratio id, as transformers stores them ([n_ratios + 1, max_tiles * ...]); Meta's
[max_tiles, max_tiles, ...] grid is a special case that the Meta loader expands, while a table per aspect ratio
cannot in general be folded back into one grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from herd.ops.rope import apply_rope


# ---------------------------------------------------------------------------------------------------------------
# Llama 3.2 Vision (Mllama)


@dataclass(frozen=True)
class MllamaVisionConfig:
    """The Mllama ViT-H/14 tile encoder (released: 560-pixel tiles, 32 local + 8 global layers, width 1280)."""

    image_size: int = 560  # tile edge in pixels
    patch_size: int = 14
    dim: int = 1280
    n_layers: int = 32
    n_global_layers: int = 8
    n_heads: int = 16
    ffn_dim: int = 5120
    max_num_tiles: int = 4
    norm_eps: float = 1e-5
    # features concatenated to the output: the INPUTS of these local layers (Meta's return_intermediate)
    intermediate_layers: tuple[int, ...] = (3, 7, 15, 23, 30)
    num_channels: int = 3
    aspect_ratios: tuple[tuple[int, int], ...] | None = None  # (rows, cols) per id 1..; None = all grids <= max tiles

    @property
    def supported_aspect_ratios(self) -> list[tuple[int, int]]:
        if self.aspect_ratios is not None:
            return [tuple(a) for a in self.aspect_ratios]
        m = self.max_num_tiles
        return [(r, c) for r in range(1, m + 1) for c in range(1, m + 1) if r * c <= m]

    @property
    def n_patches(self) -> int:
        """Tokens per tile, class token included."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @property
    def output_dim(self) -> int:
        return self.dim * (1 + len(self.intermediate_layers))


class _Gate(nn.Module):
    """Holds a scalar tanh gate named `gate` next to an `embedding` table (Meta's TilePositionEmbedding names)."""

    def __init__(self, rows: int, width: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.zeros(rows, width))
        self.gate = nn.Parameter(torch.zeros(1))


class MllamaAttention(nn.Module):
    """Bidirectional multi-head attention of the ViT (no biases, no RoPE)."""

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(self, x, mask):
        B, S, D = x.shape
        q, k, v = (w(x).view(B, S, self.n_heads, -1).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, S, hd)
        return self.wo(out.transpose(1, 2).reshape(B, S, D))


class _MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.c_fc = nn.Linear(dim, hidden)
        self.c_proj = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class MllamaVisionBlock(nn.Module):
    """Pre-LayerNorm ViT block; the global blocks scale both residual branches by tanh gates."""

    def __init__(self, c: MllamaVisionConfig, gated: bool):
        super().__init__()
        self.attn = MllamaAttention(c.dim, c.n_heads)
        self.mlp = _MLP(c.dim, c.ffn_dim)
        self.ln_1 = nn.LayerNorm(c.dim, eps=c.norm_eps)
        self.ln_2 = nn.LayerNorm(c.dim, eps=c.norm_eps)
        self.gated = gated
        if gated:
            self.gate_attn = nn.Parameter(torch.zeros(1))
            self.gate_ffn = nn.Parameter(torch.zeros(1))

    def forward(self, x, mask):
        a = self.attn(self.ln_1(x), mask)
        x = x + (self.gate_attn.tanh() * a if self.gated else a)
        m = self.mlp(self.ln_2(x))
        return x + (self.gate_ffn.tanh() * m if self.gated else m)


class _Resblocks(nn.Module):
    def __init__(self, c: MllamaVisionConfig, n: int, gated: bool):
        super().__init__()
        self.resblocks = nn.ModuleList(MllamaVisionBlock(c, gated) for _ in range(n))


class _PatchLinear(nn.Module):
    """Meta's ColumnParallelConv2dPatch: a Linear over unfolded (C, p, p) patches, run here as the equal conv."""

    def __init__(self, c: MllamaVisionConfig):
        super().__init__()
        self.patch = c.patch_size
        self._linear = nn.Linear(c.num_channels * c.patch_size ** 2, c.dim, bias=False)

    def forward(self, x):  # (B, C, T, T) -> (B, P, D)
        w = self._linear.weight.view(self._linear.out_features, -1, self.patch, self.patch)
        return F.conv2d(x, w, stride=self.patch).flatten(2).transpose(1, 2)


class MllamaVisionEncoder(nn.Module):
    """pixel_values (B, N, 3, T, T), aspect_ratio_ids (B,), aspect_ratio_mask (B, N) -> (B, N, P+1, output_dim)."""

    def __init__(self, c: MllamaVisionConfig):
        super().__init__()
        self.config = c
        n_ar, N, P, D = len(c.supported_aspect_ratios), c.max_num_tiles, c.n_patches, c.dim
        self.conv1 = _PatchLinear(c)
        self.class_embedding = nn.Parameter(torch.zeros(D))
        self.positional_embedding = nn.Parameter(torch.zeros(P, D))
        # per aspect-ratio id (row 0 = padding): the tile-position part of the gated position embedding
        self.gated_positional_embedding = nn.Parameter(torch.zeros(n_ar + 1, N * P * D))
        self.gated_positional_embedding_gate = nn.Parameter(torch.zeros(1))
        self.pre_tile_pos_embed = _Gate(n_ar + 1, N * D)
        self.post_tile_pos_embed = _Gate(n_ar + 1, N * D)
        self.ln_pre = nn.LayerNorm(D)
        self.ln_post = nn.LayerNorm(D)
        self.transformer = _Resblocks(c, c.n_layers, gated=False)
        self.global_transformer = _Resblocks(c, c.n_global_layers, gated=True)

    def _tile_embed(self, table: _Gate, ids):  # -> (B, N, 1, D), tanh-gated
        N, D = self.config.max_num_tiles, self.config.dim
        return table.embedding[ids].view(-1, N, 1, D) * table.gate.tanh()

    def forward(self, pixel_values, aspect_ratio_ids, aspect_ratio_mask):
        c = self.config
        B, N = pixel_values.shape[:2]
        P, D = c.n_patches, c.dim
        x = self.conv1(pixel_values.flatten(0, 1).to(self.class_embedding.dtype))  # (B*N, P-1, D)
        x = x.view(B, N, P - 1, D) + self._tile_embed(self.pre_tile_pos_embed, aspect_ratio_ids)
        cls = self.class_embedding.expand(B, N, 1, D)
        x = torch.cat([cls, x], dim=2)  # (B, N, P, D), class token first
        g = self.gated_positional_embedding_gate.tanh()
        x = x + (1 - g) * self.positional_embedding
        x = x + g * self.gated_positional_embedding[aspect_ratio_ids].view(B, N, P, D)
        x = self.ln_pre(x)
        pad = (8 - P % 8) % 8  # tokens per tile padded to a multiple of 8, as the reference does
        x = F.pad(x, (0, 0, 0, pad))
        Pp = P + pad
        # a token is padding if it is a pad slot or lies in a padding tile; only pad-to-pad attention is masked
        is_pad = torch.ones(B, N, Pp, dtype=torch.bool, device=x.device)
        is_pad[:, :, :P] = aspect_ratio_mask[:, :, None] == 0
        is_pad = is_pad.view(B, N * Pp)
        mask = ~(is_pad[:, :, None] & is_pad[:, None, :])[:, None]  # (B, 1, S, S) True = attend
        x = x.view(B, N * Pp, D)
        taps = []
        for i, block in enumerate(self.transformer.resblocks):
            if i in c.intermediate_layers:
                taps.append(x)
            x = block(x, mask)
        x = self.ln_post(x).view(B, N, Pp, D) + self._tile_embed(self.post_tile_pos_embed, aspect_ratio_ids)
        x = x.view(B, N * Pp, D)
        for block in self.global_transformer.resblocks:
            x = block(x, mask)
        # output = [final, taps channel-interleaved]: stacked on a new last axis, then flattened (Meta's order)
        inter = torch.stack(taps, dim=-1).view(B, N, Pp, -1)
        out = torch.cat([x.view(B, N, Pp, D), inter], dim=-1)
        return out[:, :, :P]


# ---------------------------------------------------------------------------------------------------------------
# Llama 4 (early fusion)


@dataclass(frozen=True)
class Llama4VisionConfig:
    """Llama 4's ViT (released: 336-pixel tiles, patch 14, 34 layers, width 1408, 16 heads, MLP 5632)."""

    image_size: int = 336
    patch_size: int = 14
    dim: int = 1408
    n_layers: int = 34
    n_heads: int = 16
    ffn_dim: int = 5632
    rope_theta: float = 10000.0
    pixel_shuffle_ratio: float = 0.5
    projector_input_dim: int = 4096  # adapter hidden size
    projector_output_dim: int = 4096  # adapter output size (input of the text-side projector)
    num_channels: int = 3

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_tile(self) -> int:
        """Embeddings one tile becomes after pixel shuffle (144 for the released model)."""
        return int(self.grid ** 2 * self.pixel_shuffle_ratio ** 2)


def llama4_vision_rope(c: Llama4VisionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (grid^2 + 1, hd/2): for patch (x, y), the first hd/4 pairs rotate by (x+1)*f_k and the next hd/4 by
    (y+1)*f_k, f_k = theta^(-4k/hd); the class token (last row) is not rotated (angle 0)."""
    hd = c.dim // c.n_heads
    g = c.grid
    freqs = 1.0 / (c.rope_theta ** (torch.arange(0, hd // 2, 2)[: hd // 4].float() / (hd // 2)))  # (hd/4,)
    idx = torch.arange(g * g)
    x, y = idx % g, idx // g
    ang = torch.cat([(x[:, None] + 1) * freqs, (y[:, None] + 1) * freqs], dim=-1)  # (g*g, hd/2)
    ang = torch.cat([ang, torch.zeros(1, hd // 2)])  # class token
    return torch.cos(ang), torch.sin(ang)


class _BiasedAttention(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(dim, dim, bias=True) for _ in range(4))


class Llama4VisionBlock(nn.Module):
    """LayerNorm (eps 1e-5), MHA with biases and 2-D RoPE, LayerNorm, GELU MLP with biases; no mask. Meta names."""

    def __init__(self, c: Llama4VisionConfig):
        super().__init__()
        self.n_heads = c.n_heads
        self.attn = _BiasedAttention(c.dim)
        self.ln_1 = nn.LayerNorm(c.dim)
        self.ln_2 = nn.LayerNorm(c.dim)
        self.mlp = _MLP(c.dim, c.ffn_dim)

    def forward(self, x, cos, sin):
        B, S, D = x.shape
        a = self.attn
        h = self.ln_1(x)
        q, k, v = (w(h).view(B, S, self.n_heads, -1) for w in (a.wq, a.wk, a.wv))
        cos, sin = cos[None], sin[None]  # (1, S, hd/2): one 2-D RoPE table for every image
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + a.wo(out.transpose(1, 2).reshape(B, S, D))
        return x + self.mlp(self.ln_2(x))


def pixel_shuffle(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """(B, g*g, C) -> (B, g*g*r*r, C/(r*r)): fold (1/r x 1/r) neighbourhoods of patches into channels."""
    B, S, C = x.shape
    g = int(math.isqrt(S))
    # the reference's two-step fold: along one grid axis, transpose, along the other, transpose back
    x = x.view(B, g, int(g * ratio), int(C / ratio))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(B, int(g * ratio), int(g * ratio), int(C / (ratio * ratio)))
    x = x.permute(0, 2, 1, 3).contiguous()
    return x.view(B, -1, x.shape[-1])


class Llama4VisionEncoder(nn.Module):
    """Tiles (B, 3, T, T) -> (B, g*g, D): patches + class token (last) + positions, LayerNorm, blocks, LayerNorm,
    class token dropped."""

    def __init__(self, c: Llama4VisionConfig):
        super().__init__()
        self.config = c
        D, g = c.dim, c.grid
        self.conv1 = _PatchLinear(c)  # type: ignore[arg-type]  (uses num_channels, patch_size, dim)
        self.class_embedding = nn.Parameter(torch.zeros(D))
        self.positional_embedding_vlm = nn.Parameter(torch.zeros(g * g + 1, D))
        self.ln_pre = nn.LayerNorm(D)
        self.ln_post = nn.LayerNorm(D)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(Llama4VisionBlock(c) for _ in range(c.n_layers))
        cos, sin = llama4_vision_rope(c)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, pixel_values):
        x = self.conv1(pixel_values.to(self.class_embedding.dtype))  # (B, g*g, D)
        B, S, D = x.shape
        x = torch.cat([x, self.class_embedding.expand(B, 1, D)], dim=1)  # class token LAST
        x = self.ln_pre(x + self.positional_embedding_vlm)
        for block in self.transformer.resblocks:
            x = block(x, self.rope_cos, self.rope_sin)
        return self.ln_post(x)[:, :-1]


class Llama4VisionEmbeddings(nn.Module):
    """Meta's VisionEmbeddings: encoder, pixel shuffle, adapter MLP (two GELU layers, no biases).
    (B, 3, T, T) -> (B, tokens_per_tile, projector_output_dim)."""

    def __init__(self, c: Llama4VisionConfig):
        super().__init__()
        self.config = c
        self.vision_encoder = Llama4VisionEncoder(c)
        shuffled = int(c.dim / c.pixel_shuffle_ratio ** 2)
        self.vision_adapter = nn.Module()
        self.vision_adapter.mlp = nn.Module()
        self.vision_adapter.mlp.c_fc = nn.Linear(shuffled, c.projector_input_dim, bias=False)
        self.vision_adapter.mlp.c_proj = nn.Linear(c.projector_input_dim, c.projector_output_dim, bias=False)

    def forward(self, pixel_values):
        x = pixel_shuffle(self.vision_encoder(pixel_values), self.config.pixel_shuffle_ratio)
        m = self.vision_adapter.mlp
        return F.gelu(m.c_proj(F.gelu(m.c_fc(x))))


class Llama4VisionModel(nn.Module):
    """vision_embeddings + vision_projection (Meta names): tiles -> text-width embeddings for <|patch|> slots."""

    def __init__(self, c: Llama4VisionConfig, text_dim: int):
        super().__init__()
        self.config = c
        self.vision_embeddings = Llama4VisionEmbeddings(c)
        self.vision_projection = nn.Linear(c.projector_output_dim, text_dim, bias=False)

    def forward(self, pixel_values):
        """(n_tiles, 3, T, T) -> (n_tiles * tokens_per_tile, text_dim), tiles in order."""
        feats = self.vision_embeddings(pixel_values)
        return self.vision_projection(feats.flatten(0, 1))


class Llama4Multimodal(nn.Module):
    """Early fusion: a Llama 4 text Transformer whose <|patch|> token embeddings are replaced by image embeddings.

    text: herd.models.llama.Transformer built from the Llama 4 text config; vision: Llama4VisionModel.
    """

    def __init__(self, text: nn.Module, vision: Llama4VisionModel, patch_token_id: int = 200092):
        super().__init__()
        self.text, self.vision = text, vision
        self.patch_token_id = patch_token_id

    def embed(self, tokens: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """(B, T) tokens -> (B, T, D) embeddings with the image features placed at the <|patch|> positions, in order."""
        h = self.text.tok_embeddings(tokens)
        if pixel_values is None:
            return h
        feats = self.vision(pixel_values).to(h.dtype)  # (n_tiles * tokens_per_tile, D)
        slots = tokens == self.patch_token_id
        n = int(slots.sum())
        if n != feats.shape[0]:
            from herd.errors import GenerationError

            raise GenerationError(f"prompt has {n} <|patch|> tokens but the images give {feats.shape[0]} embeddings")
        h = h.clone()
        h[slots] = feats
        return h

    def forward(self, tokens, input_pos=None, cache=None, pixel_values=None, last_only: bool = False):
        """pixel_values (n_tiles, 3, T, T) for the images of this prompt (prefill); None when decoding."""
        return self.text(tokens, input_pos, cache, embeds=self.embed(tokens, pixel_values), last_only=last_only)


# Llama 4 special tokens of the image layout (SPEC.md §5)
LLAMA4_IMAGE_START, LLAMA4_IMAGE_END, LLAMA4_IMAGE = 200080, 200081, 200090
LLAMA4_PATCH, LLAMA4_TILE_X, LLAMA4_TILE_Y = 200092, 200084, 200085


def llama4_image_tokens(aspect_ratio: tuple[int, int], tokens_per_tile: int = 144) -> list[int]:
    """Token ids standing for one image: tiles row by row (x separators between tiles, a y separator ending each
    row), then <|image|> and the global tile's patches; a single tile is just <|image|> + its patches."""
    rows, cols = aspect_ratio
    out = [LLAMA4_IMAGE_START]
    if rows * cols > 1:
        for _ in range(rows):
            for c in range(cols):
                out += [LLAMA4_PATCH] * tokens_per_tile
                if c < cols - 1:
                    out.append(LLAMA4_TILE_X)
            out.append(LLAMA4_TILE_Y)
    out.append(LLAMA4_IMAGE)
    out += [LLAMA4_PATCH] * tokens_per_tile
    out.append(LLAMA4_IMAGE_END)
    return out

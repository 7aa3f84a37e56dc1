"""herd's own small vision model: a Llama 4-layout vision encoder fused early into any herd text Transformer.

Image tokens. Llama 4 writes one single-tile image as <|image_start|> <|image|> <|patch|> x N <|image_end|>
(llama4_image_tokens). The default model's tokenizer has none of these. Growing its vocabulary would also grow the
tied output layer and let sampling emit ids the tokenizer cannot decode, so herd instead reuses four special tokens
that chat never produces (SmolLM2: <jupyter_start>, <jupyter_text>, <jupyter_code>, <jupyter_output>; Llama 3:
reserved special tokens; Llama 4: its own image tokens) and replaces their *input* embeddings: each <|patch|> by one
image embedding, the three markers by trained vectors (marker_embeddings). The output layer is untouched.

The text model carries a LoRA (herd/models/lora.py) that is on only for rows with images. Checkpoint folders are
herd/formats/vision_ckpt.py's; generation drives this model through herd/engine/vision_step.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from herd.errors import ConfigError, GenerationError
from herd.models.lora import lora_switched
from herd.models.vision import (LLAMA4_IMAGE, LLAMA4_IMAGE_END, LLAMA4_IMAGE_START, LLAMA4_PATCH, Llama4Multimodal,
                                Llama4VisionConfig, Llama4VisionModel, llama4_image_tokens)

# Candidate special tokens for (image_start, image, patch, image_end), by tokenizer family, first match wins.
TOKEN_CANDIDATES = [
    ("<|image_start|>", "<|image|>", "<|patch|>", "<|image_end|>"),  # Llama 4: its own
    ("<jupyter_start>", "<jupyter_text>", "<jupyter_code>", "<jupyter_output>"),  # SmolLM2 / StarCoder
    ("<|reserved_special_token_2|>", "<|reserved_special_token_3|>", "<|reserved_special_token_4|>",
     "<|reserved_special_token_5|>"),  # Llama 3.x
]


@dataclass(frozen=True)
class ImageTokens:
    """Token ids that stand for an image in a prompt (and their names in the tokenizer)."""

    image_start: int
    image: int
    patch: int
    image_end: int
    names: tuple[str, str, str, str] = ("", "", "", "")

    @property
    def markers(self) -> tuple[int, int, int]:
        """The ids whose embeddings are the trained marker vectors, in marker_embeddings' row order."""
        return self.image_start, self.image, self.image_end

    def for_image(self, tokens_per_tile: int, aspect_ratio: tuple[int, int] = (1, 1)) -> list[int]:
        """Ids of one image: Llama 4's layout (llama4_image_tokens) with these ids in place of Llama 4's."""
        remap = {LLAMA4_IMAGE_START: self.image_start, LLAMA4_IMAGE: self.image, LLAMA4_PATCH: self.patch,
                 LLAMA4_IMAGE_END: self.image_end}
        ids = llama4_image_tokens(aspect_ratio, tokens_per_tile)
        if any(i not in remap for i in ids):
            raise ConfigError(f"a {aspect_ratio[0]}x{aspect_ratio[1]} tile grid needs tile separator tokens; herd's "
                              f"small vision models take one tile per image")
        return [remap[i] for i in ids]


def choose_image_tokens(tokenizer) -> ImageTokens:
    """Four special tokens of this tokenizer that chat never uses, to stand for images (see the module doc)."""
    specials = tokenizer.special_tokens
    for names in TOKEN_CANDIDATES:
        if all(n in specials for n in names):
            return ImageTokens(*(specials[n] for n in names), names=names)
    raise ConfigError(f"tokenizer {getattr(tokenizer, 'source', '')} has none of the special token sets herd can "
                      f"reuse as image tokens ({', '.join(c[2] for c in TOKEN_CANDIDATES)})")


SMALL_VISION = Llama4VisionConfig(image_size=64, patch_size=8, dim=128, n_layers=4, n_heads=4, ffn_dim=512,
                                  pixel_shuffle_ratio=0.5, projector_input_dim=576, projector_output_dim=576)


def embedding_probe(text_model) -> list[float]:
    """16 numbers that identify a base model's token embeddings: 16 fixed rows, each against a fixed +-1 vector.
    Another model gives unrelated numbers; the same model in another dtype or quantization nearly the same. The rows
    are looked up through the embedding itself, so a quantized embedding (GGUF blocks kept) answers too."""
    n, dim = text_model.config.vocab_size, text_model.config.dim
    g = torch.Generator().manual_seed(0)
    signs = torch.randint(0, 2, (dim,), generator=g).float() * 2 - 1
    rows = torch.linspace(0, n - 1, 16).long()
    with torch.no_grad():
        w = text_model.tok_embeddings(rows).float()  # (16, D)
    return [round(float(w[i] @ signs) / dim ** 0.5, 6) for i in range(len(rows))]


class VisionLM(Llama4Multimodal):
    """Early fusion (Llama 4 layout) over any herd text Transformer: image features at <|patch|> ids, trained
    vectors at the three marker ids. forward(tokens (B, T), ..., pixel_values (n_images, 3, S, S)) -> logits."""

    def __init__(self, text: nn.Module, vision: Llama4VisionModel, tokens: ImageTokens):
        super().__init__(text, vision, patch_token_id=tokens.patch)
        self.tokens = tokens
        D = text.config.dim
        # trained vectors (build_vision_lm starts them at the mean token embedding; a checkpoint brings its own)
        self.marker_embeddings = nn.Parameter(torch.zeros(3, D))

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(n_images, 3, S, S) -> (n_images * N, D) in image order."""
        return self.vision(pixel_values)

    def fuse(self, tokens: torch.Tensor, feats: torch.Tensor | None, strict: bool = True) -> torch.Tensor:
        """(B, T) ids + (n, D) image features -> (B, T, D) input embeddings; features fill <|patch|> slots row-major.
        strict=False (decoding): <|patch|> ids without features keep their token embedding."""
        h = self.text.tok_embeddings(tokens)
        slots = tokens == self.tokens.patch
        n = int(slots.sum()) if (strict or feats is not None) else 0
        if n != (0 if feats is None else feats.shape[0]):
            raise GenerationError(f"the prompt has {n} image patch tokens (id {self.tokens.patch}) but the images give "
                                  f"{0 if feats is None else feats.shape[0]} embeddings")
        if n:
            h = h.masked_scatter(slots[..., None], feats.to(h.dtype))
        for row, tid in enumerate(self.tokens.markers):
            m = tokens == tid
            if bool(m.any()):
                h = torch.where(m[..., None], self.marker_embeddings[row].to(h.dtype), h)
        return h

    def embed(self, tokens, pixel_values):
        return self.fuse(tokens, None if pixel_values is None else self.image_features(pixel_values))

    def forward(self, tokens, input_pos=None, cache=None, pixel_values=None, last_only: bool = False,
                cache_rows=None, feats=None):
        """feats (n, D): precomputed image features, instead of pixel_values. The text model's vision LoRA is on."""
        if feats is None and pixel_values is not None:
            feats = self.image_features(pixel_values)
        with lora_switched(self.text, True):
            return self.text(tokens, input_pos, cache, embeds=self.fuse(tokens, feats), last_only=last_only,
                             cache_rows=cache_rows)

    def uses_embeds(self, tokens: torch.Tensor) -> bool:
        """Whether these ids need fused embeddings (an image or marker token is among them)."""
        t = self.tokens
        return bool(torch.isin(tokens, torch.tensor([t.patch, *t.markers], device=tokens.device)).any())


def embedding_table(text_model) -> torch.Tensor:
    """The text model's token embeddings as a float32 (V, D) tensor (dequantized when kept in blocks)."""
    w = getattr(text_model.tok_embeddings, "weight", None)
    if isinstance(w, torch.Tensor) and w.is_floating_point():
        return w.detach().float()
    with torch.no_grad():
        return text_model.tok_embeddings(torch.arange(text_model.config.vocab_size)).float()


def activation_dtype(text_model) -> torch.dtype:
    """The dtype of the text model's activations: its final norm's (float also when the linears are quantized)."""
    return text_model.norm.weight.dtype


def build_vision_lm(text_model, tokens: ImageTokens, vision: Llama4VisionConfig = SMALL_VISION,
                    seed: int = 0) -> VisionLM:
    """A VisionLM with freshly initialised vision parts (seeded) over a loaded text model."""
    if vision.dim // vision.n_heads % 4:
        raise ConfigError(f"vision head dim {vision.dim // vision.n_heads} must be a multiple of 4 (2-D RoPE)")
    if vision.image_size % vision.patch_size or (vision.grid * vision.pixel_shuffle_ratio) % 1:
        raise ConfigError(f"vision: tile {vision.image_size} must be a multiple of patch {vision.patch_size}, and the "
                          f"grid {vision.grid} divisible by 1/pixel_shuffle_ratio")
    g = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = Llama4VisionModel(vision, text_model.config.dim)
        enc = model.vision_embeddings.vision_encoder
        with torch.no_grad():  # Meta's encoder starts these at zero; small noise breaks the symmetry from step 1
            enc.class_embedding.normal_(0, 0.02)
            enc.positional_embedding_vlm.normal_(0, 0.02)
    finally:
        torch.random.set_rng_state(g)
    vlm = VisionLM(text_model, model, tokens)
    with torch.no_grad():  # the markers start at the mean token embedding: a neutral point of the input distribution
        vlm.marker_embeddings.copy_(embedding_table(text_model).mean(0).expand_as(vlm.marker_embeddings))
    return vlm

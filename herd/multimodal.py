"""Images in a chat: a small Llama 4-layout vision model fused early into a text Llama, and the glue for --image.

A vision checkpoint is a folder (written by `herd train-vision`, herd/train/vision.py):
    vision_config.json          the encoder's Llama4VisionConfig, the base text model it was trained on (dims and an
                                embedding probe that must match), the image token ids, training summary and accuracy
    vision.safetensors          vision.* (Meta names: vision.vision_embeddings..., vision.vision_projection.weight)
                                and marker_embeddings (3, D)
    adapter_config.json, adapter_model.safetensors
                                the LoRA of the text model, PEFT layout (herd/train/lora.py)

Image tokens. Llama 4 writes one single-tile image as <|image_start|> <|image|> <|patch|> x N <|image_end|>
(llama4_image_tokens). The default model's tokenizer has none of these. Growing its vocabulary would also grow the
tied output layer and let sampling emit ids the tokenizer cannot decode, so herd instead reuses four special tokens
that chat never produces (SmolLM2: <jupyter_start>, <jupyter_text>, <jupyter_code>, <jupyter_output>; Llama 3:
reserved special tokens; Llama 4: its own image tokens) and replaces their *input* embeddings: each <|patch|> by one
image embedding, the three markers by trained vectors (marker_embeddings). The output layer is untouched.

Generation: prompts are prefilled one at a time by herd.engine.generate.BatchRun; ImageBoundModel is the model
BatchRun sees: it fills the image embeddings into the prefill of each prompt that has images, and is the plain text
model otherwise. The server's OpenAI-style image_url parts go through ImageChat.run / ImageChat.stream.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from herd.errors import ConfigError, FormatError, GenerationError
from herd.models.vision import (LLAMA4_IMAGE, LLAMA4_IMAGE_END, LLAMA4_IMAGE_START, LLAMA4_PATCH, Llama4Multimodal,
                                Llama4VisionConfig, Llama4VisionModel, llama4_image_tokens)

CONFIG_FILE, WEIGHTS_FILE = "vision_config.json", "vision.safetensors"
FORMAT_NAME, FORMAT_VERSION = "herd-vision", 1

# Candidate special tokens for (image_start, image, patch, image_end), by tokenizer family, first match wins.
TOKEN_CANDIDATES = [
    ("<|image_start|>", "<|image|>", "<|patch|>", "<|image_end|>"),  # Llama 4: its own
    ("<jupyter_start>", "<jupyter_text>", "<jupyter_code>", "<jupyter_output>"),  # SmolLM2 / StarCoder
    ("<|reserved_special_token_2|>", "<|reserved_special_token_3|>", "<|reserved_special_token_4|>",
     "<|reserved_special_token_5|>"),  # Llama 3.x
]


# ---------------------------------------------------------------------------------------------------------------
# Configuration


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
    Another model gives unrelated numbers; the same model in another dtype or quantization nearly the same."""
    w = text_model.tok_embeddings.weight.detach().float()
    g = torch.Generator().manual_seed(0)
    signs = torch.randint(0, 2, (w.shape[1],), generator=g).float() * 2 - 1
    rows = torch.linspace(0, w.shape[0] - 1, 16).long()
    return [round(float(w[r] @ signs) / w.shape[1] ** 0.5, 6) for r in rows]


@dataclass
class VisionSpec:
    """What vision_config.json holds."""

    vision: Llama4VisionConfig
    tokens: ImageTokens
    text_dim: int
    text_layers: int
    vocab_size: int
    probe: list[float]
    base: str = ""  # the base model it was trained on (catalog name or path), for the error messages
    max_tiles: int = 1
    training: dict = dataclasses.field(default_factory=dict)  # free-form: schedule, timings, accuracies

    @property
    def tokens_per_image(self) -> int:
        return self.vision.tokens_per_tile

    def to_json(self) -> dict:
        return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "vision": dataclasses.asdict(self.vision),
                "image_tokens": {"ids": [self.tokens.image_start, self.tokens.image, self.tokens.patch,
                                         self.tokens.image_end], "names": list(self.tokens.names)},
                "text": {"dim": self.text_dim, "n_layers": self.text_layers, "vocab_size": self.vocab_size,
                         "embedding_probe": self.probe, "base": self.base},
                "max_tiles": self.max_tiles, "training": self.training}

    @classmethod
    def from_json(cls, d: dict, where: str) -> "VisionSpec":
        known = {"format", "version", "vision", "image_tokens", "text", "max_tiles", "training"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise FormatError(f"{where}: unknown key(s) {unknown}")
        if d.get("format") != FORMAT_NAME or d.get("version") != FORMAT_VERSION:
            raise FormatError(f"{where}: format {d.get('format')!r} version {d.get('version')!r}, expected "
                              f"{FORMAT_NAME!r} version {FORMAT_VERSION}")
        try:
            fields = {f.name for f in dataclasses.fields(Llama4VisionConfig)}
            bad = sorted(set(d["vision"]) - fields)
            if bad:
                raise FormatError(f"{where}: vision: unknown key(s) {bad}")
            vision = Llama4VisionConfig(**d["vision"])
            ids, names = d["image_tokens"]["ids"], d["image_tokens"]["names"]
            tokens = ImageTokens(*[int(i) for i in ids], names=tuple(names))
            t = d["text"]
            return cls(vision, tokens, int(t["dim"]), int(t["n_layers"]), int(t["vocab_size"]),
                       [float(x) for x in t["embedding_probe"]], str(t.get("base", "")), int(d.get("max_tiles", 1)),
                       dict(d.get("training", {})))
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"{where}: missing or malformed entry ({type(e).__name__}: {e})") from None

    def check_base(self, text_model, where: str) -> None:
        """ConfigError unless text_model is the model this vision checkpoint was trained on."""
        c = text_model.config
        found = (c.dim, c.n_layers, c.vocab_size)
        if found != (self.text_dim, self.text_layers, self.vocab_size):
            raise ConfigError(f"{where}: trained on {self.base or 'another model'} (dim {self.text_dim}, "
                              f"{self.text_layers} layers, vocab {self.vocab_size}); this model has dim {found[0]}, "
                              f"{found[1]} layers, vocab {found[2]}")
        probe = torch.tensor(embedding_probe(text_model))
        ref = torch.tensor(self.probe)
        if probe.shape != ref.shape or float((probe - ref).abs().max()) > 0.1 * float(ref.pow(2).mean().sqrt()) + 1e-6:
            raise ConfigError(f"{where}: trained on {self.base or 'another model'}, whose token embeddings differ "
                              f"from this model's (same shape, other weights)")


# ---------------------------------------------------------------------------------------------------------------
# The model


class VisionLM(Llama4Multimodal):
    """Early fusion (Llama 4 layout) over any herd text Transformer: image features at <|patch|> ids, trained
    vectors at the three marker ids. forward(tokens (B, T), ..., pixel_values (n_images, 3, S, S)) -> logits."""

    def __init__(self, text: nn.Module, vision: Llama4VisionModel, tokens: ImageTokens):
        super().__init__(text, vision, patch_token_id=tokens.patch)
        self.tokens = tokens
        D = text.config.dim
        # start the markers at the mean token embedding: a neutral point of the input distribution
        mean = text.tok_embeddings.weight.detach().float().mean(0)
        self.marker_embeddings = nn.Parameter(mean.expand(3, D).clone())

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
    return VisionLM(text_model, model, tokens)


# ---------------------------------------------------------------------------------------------------------------
# Save / load


def save_vision(vlm: VisionLM, spec: VisionSpec, folder: str | Path) -> Path:
    """Write the vision checkpoint folder (vision parts + markers, LoRA adapter if any, config json)."""
    from herd.formats.io import save_safetensors_atomic, write_text_atomic
    from herd.train.lora import lora_modules, save_adapter

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"vision.{k}": v.detach().float().contiguous() for k, v in vlm.vision.state_dict().items()}
    tensors["marker_embeddings"] = vlm.marker_embeddings.detach().float().contiguous()
    save_safetensors_atomic(tensors, folder / WEIGHTS_FILE)
    if lora_modules(vlm.text):
        save_adapter(vlm.text, folder, base_model=spec.base)
    write_text_atomic(folder / CONFIG_FILE, json.dumps(spec.to_json(), indent=2))
    return folder


def read_spec(folder: str | Path) -> VisionSpec:
    path = Path(folder) / CONFIG_FILE
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FormatError(f"{path}: not found; a vision checkpoint folder is written by `herd train-vision`") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise FormatError(f"{path}: expected a JSON object")
    return VisionSpec.from_json(d, str(path))


def load_vision(folder: str | Path, text_model) -> tuple[VisionLM, VisionSpec]:
    """Attach a saved vision checkpoint to a loaded text model (its LoRA is added to that model, in place)."""
    from safetensors import SafetensorError, safe_open

    from herd.train.lora import ADAPTER_CONFIG, apply_adapter

    folder = Path(folder)
    spec = read_spec(folder)
    spec.check_base(text_model, str(folder))
    path = folder / WEIGHTS_FILE
    try:
        with safe_open(path, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise FormatError(f"{path}: not found") from None
    except (SafetensorError, OSError) as e:
        raise FormatError(f"{path}: cannot be read ({e})") from None
    with torch.device("meta"):
        vision = Llama4VisionModel(spec.vision, spec.text_dim)
    expected = {f"vision.{k}": v for k, v in vision.state_dict().items()}
    expected["marker_embeddings"] = torch.empty(3, spec.text_dim, device="meta")
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise FormatError(f"{path}: missing tensors {missing[:6]}, unexpected tensors {unexpected[:6]}")
    for k, ref in expected.items():
        if tuple(tensors[k].shape) != tuple(ref.shape):
            raise FormatError(f"{path}: tensor {k} has shape {tuple(tensors[k].shape)}, the config expects "
                              f"{tuple(ref.shape)}")
    dtype = text_model.tok_embeddings.weight.dtype
    vision.load_state_dict({k[len("vision."):]: v.to(dtype) for k, v in tensors.items() if k.startswith("vision.")},
                           assign=True)
    # the RoPE tables are non-persistent buffers: rebuild them off the meta device
    from herd.models.vision import llama4_vision_rope

    cos, sin = llama4_vision_rope(spec.vision)
    enc = vision.vision_embeddings.vision_encoder
    enc.rope_cos, enc.rope_sin = cos, sin
    if (folder / ADAPTER_CONFIG).exists():
        apply_adapter(text_model, folder)
    # the vision LoRA works only with images (ImageBoundModel switches it on): the text model stays the base model
    set_lora(text_model, False)
    vlm = VisionLM(text_model, vision, spec.tokens)
    with torch.no_grad():
        vlm.marker_embeddings.copy_(tensors["marker_embeddings"].to(dtype))
    for p in vlm.parameters():
        p.requires_grad_(False)
    return vlm.eval(), spec


def default_vision_dir(base: str | None = None) -> Path:
    """Where `herd train-vision` writes (and --image looks) by default: HERD_HOME/vision/<base name>."""
    from herd.hub import DEFAULT_MODEL, herd_home

    name = re.sub(r"[^\w.-]+", "_", Path(base).stem if base else DEFAULT_MODEL)
    return herd_home() / "vision" / name


# ---------------------------------------------------------------------------------------------------------------
# Prompts with images

_SENTINEL = "\ue000herd-image\ue000"  # a private-use character pair: never in real text


def image_source(part: dict, where: str):
    """What an image content part points at (path, data: URL, bytes or PIL image), for herd.images.load_image."""
    kind = part.get("type")
    if kind == "image":
        for key in ("image", "path", "url", "data"):
            if part.get(key) is not None:
                src = part[key]
                break
        else:
            raise GenerationError(f"{where}: an image part needs 'image' (a path, bytes or PIL image) or 'url'")
    elif kind in ("image_url", "input_image"):
        src = part.get("image_url")
        if isinstance(src, dict):
            src = src.get("url")
        if not isinstance(src, str):
            raise GenerationError(f"{where}: an image_url part needs image_url.url (a data: URL or a path)")
    else:
        raise GenerationError(f"{where}: unknown content part type {kind!r}")
    if isinstance(src, str):
        if src.startswith(("http://", "https://")):
            raise FormatError(f"{where}: remote image URLs are not fetched ({src[:60]}); send the image as a "
                              f"base64 data: URL")
        if src.startswith("file://"):
            src = src[len("file://"):]
    return src


def split_images(messages: Sequence[dict]) -> tuple[list[dict], list]:
    """Messages whose content may hold image parts (or an 'images' list, placed before the text) -> the same messages
    with text content where each image is a placeholder, and the image sources in prompt order."""
    flat, sources = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise GenerationError(f"message {i}: expected a dict with role and content, got {type(m).__name__}")
        m = dict(m)
        where = f"message {i} ({m.get('role', '?')})"
        text = []
        for src in m.pop("images", None) or []:
            text.append(_SENTINEL)
            sources.append(src)
        content = m.get("content")
        if isinstance(content, list):
            for part in content:
                if isinstance(part, str):
                    text.append(part)
                elif isinstance(part, dict) and part.get("type") in ("text", "input_text"):
                    text.append(str(part.get("text", "")))
                elif isinstance(part, dict):
                    text.append(_SENTINEL)
                    sources.append(image_source(part, where))
                else:
                    raise GenerationError(f"{where}: a content part must be a dict, got {type(part).__name__}")
            m["content"] = "".join(text)
        elif text:
            m["content"] = "".join(text) + (content or "")
        if isinstance(m.get("content"), str) and _SENTINEL in m["content"] and m.get("role") != "user":
            raise GenerationError(f"{where}: images are only taken in user messages")
        flat.append(m)
    return flat, sources


def with_images(prompt, images: Sequence | None) -> list[dict]:
    """A prompt (string or messages) as messages, with `images` put in front of the last user message's content."""
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    if images:
        users = [i for i, m in enumerate(msgs) if isinstance(m, dict) and m.get("role") == "user"]
        if not users:
            raise GenerationError("images need a user message to go with")
        last = msgs[users[-1]]
        content = last.get("content") or ""
        parts = content if isinstance(content, list) else [{"type": "text", "text": content}]
        last["content"] = [{"type": "image", "image": src} for src in images] + list(parts)
    return msgs


def has_images(messages: Sequence[dict]) -> bool:
    """Whether any message carries an image (a non-text content part or an 'images' list): route it to ImageChat."""
    for m in messages:
        if isinstance(m, dict) and (m.get("images") or (isinstance(m.get("content"), list) and any(
                isinstance(p, dict) and p.get("type") not in ("text", "input_text") for p in m["content"]))):
            return True
    return False


def encode_with_images(tokenizer, chat_format, messages: Sequence[dict], image_ids: list[int],
                       add_generation_prompt: bool = True) -> tuple[list[int], list]:
    """Messages (with image parts) -> (prompt ids with image_ids at each image, image sources in order).

    The chat template renders the conversation with a placeholder per image; the text between placeholders is
    encoded as the template's own encoding does (special-token text recognised), and each placeholder becomes
    image_ids. Without images this is chat_format.encode_dialog exactly.
    """
    flat, sources = split_images(messages)
    if not sources:
        return chat_format.encode_dialog(flat, add_generation_prompt=add_generation_prompt), []
    text = chat_format.render(flat, add_generation_prompt=add_generation_prompt)
    pieces = text.split(_SENTINEL)
    if len(pieces) - 1 != len(sources):
        raise GenerationError(f"the chat template kept {len(pieces) - 1} of {len(sources)} image placeholders")
    ids: list[int] = []
    for k, piece in enumerate(pieces):
        if piece:
            ids += tokenizer.encode(piece, allow_special=True)
        if k < len(sources):
            ids += image_ids
    return ids, sources


# ---------------------------------------------------------------------------------------------------------------
# Generation


def set_lora(model: nn.Module, on: bool) -> None:
    """Switch the text model's LoRA layers on (their trained scaling) or off (scaling 0: the base model exactly)."""
    from herd.train.lora import lora_modules

    for m in lora_modules(model).values():
        if not hasattr(m, "trained_scaling"):
            m.trained_scaling = m.scaling
        m.scaling = m.trained_scaling if on else 0.0


class lora_switched:
    """Within the block, the text model's LoRA layers are on or off; afterwards they are as they were."""

    def __init__(self, model: nn.Module, on: bool):
        from herd.train.lora import lora_modules

        self.model, self.on = model, on
        self.mods = list(lora_modules(model).values())

    def __enter__(self):
        self.saved = [m.scaling for m in self.mods]
        set_lora(self.model, self.on)

    def __exit__(self, *exc):
        for m, s in zip(self.mods, self.saved):
            m.scaling = s


class ImageBoundModel(nn.Module):
    """What BatchRun drives for prompts with images: the text model whose prefill of each listed prompt gets that
    prompt's image features (prompts are prefilled one at a time, in order); decode steps pass straight through."""

    whole_prompts = True  # each prefill is matched to its bound images by its whole ids: no slices
    decode_step = None  # the text model's LoRA switch wraps every step: always the PyTorch path

    def __init__(self, vlm: VisionLM, bound: Sequence[tuple[Sequence[int], torch.Tensor | None]]):
        super().__init__()
        self.vlm = vlm
        self.pending = [(list(map(int, ids)), feats) for ids, feats in bound if feats is not None]
        # the vision LoRA only where there are images: a run of text-only prompts is the base model exactly
        self.lora_on = bool(self.pending)

    def __getattr__(self, name: str):
        """Everything else (config, norm, tok_embeddings, ...) is the text model's: BatchRun reads those."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.vlm.text, name)

    def forward(self, tokens, input_pos=None, cache=None, cache_rows=None, last_only: bool = False):
        with lora_switched(self.vlm.text, self.lora_on):
            return self._forward(tokens, input_pos, cache, cache_rows, last_only)

    def _forward(self, tokens, input_pos, cache, cache_rows, last_only):
        feats = None
        prefill = tokens.shape[0] == 1 and tokens.shape[1] > 1
        if prefill and bool((tokens == self.vlm.tokens.patch).any()):
            ids = tokens[0].tolist()
            while self.pending and self.pending[0][0] != ids:  # a prompt BatchRun skipped (max_tokens 0)
                self.pending.pop(0)
            if not self.pending:
                raise GenerationError("a prompt with image tokens has no images bound to it")
            feats = self.pending.pop(0)[1]
        if feats is None and not self.vlm.uses_embeds(tokens):
            return self.vlm.text(tokens, input_pos, cache, last_only=last_only, cache_rows=cache_rows)
        embeds = self.vlm.fuse(tokens, feats, strict=prefill)
        return self.vlm.text(tokens, input_pos, cache, embeds=embeds, last_only=last_only, cache_rows=cache_rows)


class ImageChat:
    """An LLM plus a vision checkpoint: chat, generate and stream with images in the messages.

    A prompt is a string (one user message), or a message list whose user contents may hold image parts:
    {"type": "image", "image": PATH | bytes | PIL image}, {"type": "image_url", "image_url": {"url": "data:..."}},
    or an "images": [...] list on the message. `images=` adds images to the last user message of the prompt.
    """

    accepts_images = True

    def __init__(self, llm, vlm: VisionLM, spec: VisionSpec):
        self.llm, self.vlm, self.spec = llm, vlm, spec
        self.image_ids = spec.tokens.for_image(spec.tokens_per_image)

    @classmethod
    def load(cls, vision_dir: str | Path | None = None, llm=None, model: str | None = None,
             dtype=None) -> "ImageChat":
        """Load (or take) the text model and attach the vision checkpoint (default: default_vision_dir())."""
        folder = Path(vision_dir) if vision_dir is not None else default_vision_dir(model)
        if not (folder / CONFIG_FILE).exists():
            raise FormatError(f"{folder}: no vision model there ({CONFIG_FILE} missing); train one with "
                              f"`herd train-vision` (or `make vision-demo`), or pass the folder of one")
        if llm is None:
            from herd.api import load

            llm = load(model, dtype)
        vlm, spec = load_vision(folder, llm.model)
        return cls(llm, vlm, spec)

    @property
    def source(self) -> str:
        return self.llm.source

    # -- prompts -----------------------------------------------------------------------------------------
    def messages(self, prompt, images: Sequence | None = None) -> list[dict]:
        return with_images(prompt, images)

    def encode(self, prompt, images: Sequence | None = None) -> tuple[list[int], torch.Tensor | None]:
        """Prompt -> (ids, image features (n_images * N, D) or None)."""
        if self.llm.chat_format is None:
            raise GenerationError(f"{self.llm.source}: this model has no chat format to place images in")
        ids, sources = encode_with_images(self.llm.tokenizer, self.llm.chat_format, self.messages(prompt, images),
                                          self.image_ids)
        return ids, self.features(sources) if sources else None

    @torch.inference_mode()
    def features(self, sources: Sequence) -> torch.Tensor:
        """Image sources -> their embeddings (n * N, D); FormatError for anything that is not a good image."""
        from herd.images import llama4_preprocess

        pixels = llama4_preprocess(list(sources), tile_size=self.spec.vision.image_size, max_tiles=self.spec.max_tiles)
        return self.vlm.image_features(pixels.pixel_values)

    # -- generation --------------------------------------------------------------------------------------
    def run(self, prompts: Sequence, params, images: Sequence[Sequence] | None = None):
        """A BatchRun over several prompts (each with its own images); iterate it for Deltas."""
        from herd.engine.generate import BatchRun
        from herd.ops.sampling import SamplingParams

        if isinstance(params, dict):
            params = SamplingParams(**params)
        images = images or [None] * len(prompts)
        if len(images) != len(prompts):
            raise GenerationError(f"{len(prompts)} prompts but {len(images)} image lists")
        bound = [self.encode(p, im) for p, im in zip(prompts, images)]
        model = ImageBoundModel(self.vlm, bound)
        return BatchRun(model, [ids for ids, _ in bound], params, self.llm.tokenizer, self.llm.stop_ids)

    def generate_batch(self, prompts: Sequence, images: Sequence[Sequence] | None = None, **sampling):
        run = self.run(prompts, sampling, images)
        for _ in run:
            pass
        return run.completions()

    def generate(self, prompt, images: Sequence | None = None, **sampling):
        """One Completion for a prompt (string or messages) with optional images."""
        return self.generate_batch([prompt], [images], **sampling)[0]

    def chat(self, messages, **sampling):
        return self.generate(messages, **sampling)

    def stream(self, prompt, images: Sequence | None = None, **sampling) -> Iterator[str]:
        """Text pieces as they are generated."""
        for delta in self.run([prompt], sampling, [images]):
            if delta.text:
                yield delta.text


# ---------------------------------------------------------------------------------------------------------------
# For the chat loop (herd/chat.py): `/image PATH` attaches a picture to the next message


def user_message(text: str, images: Sequence = ()) -> dict:
    """A user message: the images first (as Llama 4 places them), then the text."""
    if not images:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [{"type": "image", "image": src} for src in images]
            + [{"type": "text", "text": text}]}


def image_command(line: str, pending: list) -> str | None:
    """Handle `/image PATH` (attach) and `/image` alone (drop attached images); returns what to tell the user, or
    None when the line is not an /image command. The image is checked now, so a bad file fails at once."""
    from herd.images import load_image

    text = line.strip()
    if text != "/image" and not text.startswith("/image "):
        return None
    path = text[len("/image"):].strip().strip("'\"")
    if not path:
        pending.clear()
        return "(attached images removed)"
    img = load_image(path)
    pending.append(path)
    return f"(image attached: {path}, {img.size[0]}x{img.size[1]}; it goes with your next message)"

"""Released multimodal checkpoints as LLMs that also read images: Llama 3.2 Vision (Mllama) and Llama 4 early fusion.

herd.load() returns a VisionLLM for an HF MllamaForConditionalGeneration folder, a Meta Llama 3.2 Vision folder
(params.json + consolidated.00.pth) or an HF Llama4ForConditionalGeneration folder. Text-only use is that of
herd.api.LLM; with images it speaks the protocol of herd.multimodal.ImageChat:

    generate(prompt, images=None, **sampling) -> Completion      stream(prompt, images=None, **sampling) -> str pieces
    generate_batch(prompts, images=None, **sampling)              chat(messages, **sampling)
    run(prompts, params, images=None) -> Deltas, then .completions()

A prompt is token ids, a string (one user message) or OpenAI-style messages whose user contents may hold image parts
({"type": "image", "image": PATH | bytes | PIL} or {"type": "image_url", "image_url": {"url": "data:..."}}), parsed by
herd.multimodal.split_images; `images=` adds images in front of the last user message's text.

How images enter (SPEC.md §5, §6):
* Mllama: the chat format writes one <|image|> (config.image_token_id) per image; the prefill encodes the tiles,
  computes each cross-attention block's K/V once (kept in MllamaCache) and the mask of which text rows see which
  tiles; decode steps reuse the K/V and the last prompt row's mask, as transformers' generate does.
* Llama 4: llama4_preprocess picks each image's tile grid; the chat format lays out that many <|patch|> tokens (the
  grid is given as the image part's aspect_ratio); the prefill replaces them by the projected patch embeddings; decode
  is plain text decoding.

Generation is herd.engine.generate.BatchRun over VisionStep, the model object BatchRun drives. Prompts without images
run as one batch; a prompt with images runs as a batch of one (its vision state belongs to it), prompts one after
another (PromptRuns).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from herd.api import LLM, parse_dtype
from herd.engine.generate import BatchRun, Completion, Delta
from herd.errors import ConfigError, GenerationError
from herd.models.mllama import Mllama, MllamaCache, encode_multimodal_prompt
from herd.multimodal import _SENTINEL, split_images, with_images
from herd.ops.sampling import SamplingParams

# Images per prompt: herd's guard, not a limit of the weights. Llama 4: Meta's launch notes report good results after
# post-training with up to 8 images. Llama 3.2 Vision: neither Meta's code nor transformers caps the count; 8 bounds
# the cross-attention K/V (images x 4 tiles x 1601 tokens per block). Set VisionLLM.max_images to change it.
DEFAULT_MAX_IMAGES = {"mllama": 8, "llama4": 8}
LLAMA4_MAX_TILES = 16  # tiles per image (transformers' Llama4ImageProcessor max_patches, Meta's max_num_chunks)


# ---------------------------------------------------------------------------------------------------------------
# The model BatchRun drives


class VisionStep(nn.Module):
    """forward(tokens (B, T), input_pos, cache: KVCache, cache_rows, last_only) -> logits, as BatchRun calls a text
    Transformer. Built with `images` (one prompt's preprocessed images), its first call -- the prompt's prefill --
    reads them; every later call decodes text. Without images it is the text model (any batch)."""

    whole_prompts = True  # the first call is the prompt's whole prefill, which consumes the images
    decode_step = None  # cross-attention (Mllama) and fused embeddings are not what the native step runs

    def __init__(self, mm: nn.Module, images=None):
        super().__init__()
        self.mm = mm
        self.images = images  # Mllama: MllamaInputs; Llama 4: pixel values (tiles, 3, S, S); None: text only
        self.is_mllama = isinstance(mm, Mllama)
        if self.is_mllama:
            c = mm.config
            # <|image|> and the other learnable rows follow the text vocabulary: prompts may hold them
            self.config = dataclasses.replace(c.text, vocab_size=c.text.vocab_size + c.extra_embeddings)
            self._xattn: MllamaCache | None = None  # cross-attention K/V + last row's mask, around BatchRun's cache
        else:
            self.config = mm.text.config

    def __getattr__(self, name: str):
        """Everything else (norm, layers, tok_embeddings, ...) is the text model's: the server's Engine reads those."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            mm = super().__getattr__("mm")
            return getattr(mm.text_model if isinstance(mm, Mllama) else mm.text, name)

    def forward(self, tokens, input_pos=None, cache=None, cache_rows=None, last_only: bool = False):
        images, self.images = self.images, None  # only the prefill sees them
        if not self.is_mllama:
            embeds = None if images is None else self.mm.embed(tokens, images)  # (B, T, D), patches fused
            return self.mm.text(tokens, input_pos, cache, embeds=embeds, last_only=last_only, cache_rows=cache_rows)
        state = self._mllama_cache(cache)
        if images is None:  # decode (cached cross K/V, if the prefill had images) or text only
            return self.mm.text_model(tokens, input_pos, state, last_only=last_only, cache_rows=cache_rows)
        dtype = self.mm.text_model.tok_embeddings.weight.dtype
        return self.mm(tokens, input_pos, state, images.pixel_values.to(dtype), images.aspect_ratio_ids,
                       images.aspect_ratio_mask, images.cross_attention_mask, last_only=last_only)

    def _mllama_cache(self, cache) -> MllamaCache | None:
        """BatchRun's KVCache (or a view of its rows) inside the MllamaCache that keeps this prompt's vision state."""
        if cache is None:
            return None
        if self._xattn is None:
            self._xattn = MllamaCache.__new__(MllamaCache)  # no buffers of its own: BatchRun owns the KV cache
            self._xattn.xk = self._xattn.xv = self._xattn.last_mask = None
        self._xattn.kv = cache
        return self._xattn


class PromptRuns:
    """One BatchRun per prompt, run one after another; iterate for Deltas (index = the prompt's), then completions()."""

    def __init__(self, runs: Sequence[BatchRun]):
        self.runs = list(runs)

    def __iter__(self) -> Iterator[Delta]:
        for i, run in enumerate(self.runs):
            for delta in run:
                delta.index = i
                yield delta

    def completions(self) -> list[Completion]:
        return [c for run in self.runs for c in run.completions()]

    @property
    def seqs(self) -> list:
        """The sequences of every run, in prompt order (their .prompt: the prompt ids)."""
        return [s for run in self.runs for s in run.seqs]


# ---------------------------------------------------------------------------------------------------------------
# Prompts


def _image_parts(flat: list[dict], grids: Sequence[tuple[int, int]] | None) -> list[dict]:
    """split_images' messages (a placeholder per image) -> content lists with {"type": "image"} parts, which the
    chat formats place; Llama 4's also carry the image's tile grid as aspect_ratio [rows, cols]."""
    out, k = [], 0
    for m in flat:
        content = m.get("content")
        if not (isinstance(content, str) and _SENTINEL in content):
            out.append(m)
            continue
        parts = []
        pieces = content.split(_SENTINEL)
        for j, text in enumerate(pieces):
            if text:
                parts.append({"type": "text", "text": text})
            if j < len(pieces) - 1:
                part = {"type": "image"}
                if grids is not None:
                    part["aspect_ratio"] = list(grids[k])
                parts.append(part)
                k += 1
        out.append({**m, "content": parts})
    return out


# ---------------------------------------------------------------------------------------------------------------
# The LLM


class VisionLLM(LLM):
    """An LLM over a multimodal checkpoint: herd.api.LLM's text use, plus images (module docstring).

    model: the VisionStep that text generation drives; mm: the whole multimodal module (Mllama or
    Llama4Multimodal); config: the text model's ModelConfig."""

    accepts_images = True

    def __init__(self, mm: nn.Module, tokenizer, chat_format, source: str = "", max_images: int | None = None):
        super().__init__(VisionStep(mm), tokenizer, chat_format, source)
        self.mm = mm
        self.kind = "mllama" if isinstance(mm, Mllama) else "llama4"
        self.config = mm.config.text if self.kind == "mllama" else mm.text.config
        self.max_images = DEFAULT_MAX_IMAGES[self.kind] if max_images is None else int(max_images)

    # -- prompts -----------------------------------------------------------------------------------------
    def encode_prompt(self, prompt, raw: bool = False, tools=None) -> list[int]:
        """Prompt ids of a prompt without images (LLM.encode_prompt); prompts with images go through encode()."""
        ids, inputs = self.encode(prompt, raw=raw, tools=tools)
        if inputs is not None:
            raise GenerationError(f"{self.source}: this prompt has images; generate() / run() take it")
        return ids

    def encode(self, prompt, images: Sequence | None = None, *, raw: bool = False, tools=None):
        """Prompt (+ images) -> (prompt ids, the images as the model takes them at prefill, or None)."""
        is_ids = isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, int) for t in prompt)
        if is_ids or (raw and isinstance(prompt, str)):
            if images:
                raise GenerationError("images go into a chat prompt (a string or messages), not into token ids or "
                                      "a raw prompt")
            return super().encode_prompt(prompt, raw, tools), None
        flat, sources = split_images(with_images(prompt, images))
        if not sources:
            return super().encode_prompt(flat, False, tools), None
        if len(sources) > self.max_images:
            raise GenerationError(f"{len(sources)} images in one prompt; {self.source} takes at most "
                                  f"{self.max_images} ({self.kind})")
        if self.chat_format is None:
            raise GenerationError(f"{self.source}: this checkpoint has no tokenizer and chat format to place images")
        if self.kind == "llama4":
            return self._encode_llama4(flat, sources, tools)
        ids = self._dialog(_image_parts(flat, None), tools, len(sources))
        return ids, encode_multimodal_prompt(ids, sources, self.mm.config)

    def _encode_llama4(self, flat, sources, tools):
        from herd.images import llama4_preprocess

        v = self.mm.vision.config
        pre = llama4_preprocess(list(sources), tile_size=v.image_size, max_tiles=LLAMA4_MAX_TILES)
        ids = self._dialog(_image_parts(flat, pre.aspect_ratios), tools, len(sources), pre.aspect_ratios)
        want = sum(pre.tiles_per_image) * v.tokens_per_tile
        found = sum(1 for t in ids if t == self.mm.patch_token_id)
        if found != want:
            raise GenerationError(f"the prompt has {found} <|patch|> tokens (id {self.mm.patch_token_id}); its "
                                  f"{len(sources)} image(s) give {want} patch embeddings")
        return ids, pre.pixel_values

    def _dialog(self, messages, tools, n_images: int, grids=None) -> list[int]:
        """Ids of the messages with their image parts. Meta's formats place images themselves; a chat template
        (JinjaChatFormat) writes "<|image|>" per image, which is mapped here as transformers' processors do: to the
        model's image token (Mllama) or to the whole tile layout of that image (Llama 4)."""
        from herd.chat_format import JinjaChatFormat, Llama4ChatFormat

        fmt = self.chat_format
        ids = fmt.encode_dialog(messages, add_generation_prompt=True, tools=tools)
        if not isinstance(fmt, JinjaChatFormat):
            return ids
        marker = self.tokenizer.special_tokens.get("<|image|>")
        count = sum(1 for t in ids if t == marker)
        if marker is None or count != n_images:
            raise GenerationError(f"the chat template placed {0 if marker is None else count} <|image|> tokens for "
                                  f"{n_images} image(s)")
        if self.kind == "mllama":
            return [self.mm.config.image_token_id if t == marker else t for t in ids]
        layout = Llama4ChatFormat(self.tokenizer, patches_per_tile=self.mm.vision.config.tokens_per_tile)
        out, k = [], 0
        for t in ids:
            if t == marker:
                out += [p.id for p in layout._image({"aspect_ratio": list(grids[k])}, f"image {k}")]
                k += 1
            else:
                out.append(t)
        return out

    # -- generation --------------------------------------------------------------------------------------
    def run(self, prompts: Sequence, params, images: Sequence | None = None, *, raw: bool = False, tools=None):
        """Generation for prompts (ids, strings or messages), each with its own images (or None); iterate for
        Deltas, then .completions(). Without any image this is one batched BatchRun, as LLM.run."""
        if isinstance(params, dict):
            params = SamplingParams(**params)
        if images is None:
            images = [None] * len(prompts)
        if len(images) != len(prompts):
            raise GenerationError(f"{len(prompts)} prompts but {len(images)} image lists")
        encoded = [self.encode(p, im, raw=raw, tools=tools) for p, im in zip(prompts, images)]
        if all(inputs is None for _, inputs in encoded):
            return BatchRun(self.model, [ids for ids, _ in encoded], params, self.tokenizer, self.stop_ids)
        per = list(params) if isinstance(params, (list, tuple)) else [params] * len(encoded)
        if len(per) != len(encoded):
            raise GenerationError(f"{len(encoded)} prompts but {len(per)} sampling settings")
        return PromptRuns([BatchRun(VisionStep(self.mm, inputs) if inputs is not None else self.model, [ids], [p],
                                    self.tokenizer, self.stop_ids) for (ids, inputs), p in zip(encoded, per)])

    def generate_batch(self, prompts: Sequence, images: Sequence | None = None, *, raw: bool = False, tools=None,
                       **sampling) -> list[Completion]:
        run = self.run(prompts, SamplingParams(**sampling), images, raw=raw, tools=tools)
        for _ in run:
            pass
        return run.completions()

    def generate(self, prompt, images: Sequence | None = None, *, raw: bool = False, tools=None,
                 **sampling) -> Completion:
        """One Completion for a prompt (ids, string or messages) with optional images."""
        return self.generate_batch([prompt], [images], raw=raw, tools=tools, **sampling)[0]

    def stream(self, prompt, images: Sequence | None = None, *, raw: bool = False, tools=None,
               **sampling) -> Iterator[str]:
        """Text pieces as they are generated (BatchRun's streaming: whole characters, stop strings held back)."""
        for delta in self.run([prompt], SamplingParams(**sampling), [images], raw=raw, tools=tools):
            if delta.text:
                yield delta.text


# ---------------------------------------------------------------------------------------------------------------
# Loading


def _hf_dtype(folder: Path) -> torch.dtype:
    """The dtype an HF config.json says its weights are in (float32 when it says nothing usable)."""
    from herd.formats.io import read_json

    cfg = read_json(folder / "config.json")
    for d in (cfg, cfg.get("text_config") or {}):
        name = d.get("torch_dtype") or d.get("dtype")
        if name in ("float32", "bfloat16", "float16"):
            return getattr(torch, name)
    return torch.float32


def load_vision_llm(path: str | Path, kind: str, dtype=None, *, chat_template: str | None = None,
                    max_images: int | None = None) -> VisionLLM:
    """A multimodal checkpoint folder (kind from herd.formats.multimodal_kind) -> VisionLLM. dtype None keeps the
    checkpoint's."""
    from herd.chat_format import JinjaChatFormat, Llama3ChatFormat, Llama4ChatFormat
    from herd.formats import _hf_chat_template
    from herd.formats.mllama import build_mllama, load_llama4_multimodal_hf, load_mllama_hf, load_mllama_meta

    path = Path(path)
    dtype = parse_dtype(dtype)
    hf = (path / "config.json").exists()
    if kind == "mllama":
        config, sd = load_mllama_hf(path) if hf else load_mllama_meta(path)
        if dtype is None:
            dtype = next((t.dtype for t in sd.values() if t.is_floating_point()), torch.float32)
        mm = build_mllama(config, sd, dtype)
    elif kind == "llama4":
        mm = load_llama4_multimodal_hf(path, dtype or _hf_dtype(path))
    else:
        raise ConfigError(f"{path}: unknown multimodal kind {kind!r} (mllama, llama4)")
    tokenizer = fmt = None
    if any((path / n).exists() for n in ("tokenizer.json", "tokenizer.model")):
        from herd.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(path)
    template = chat_template if chat_template is not None else (_hf_chat_template(path) if hf else None)
    if tokenizer is not None:
        if template:
            fmt = JinjaChatFormat(tokenizer, template)
        elif kind == "llama4":
            fmt = Llama4ChatFormat(tokenizer, patches_per_tile=mm.vision.config.tokens_per_tile)
        else:
            fmt = Llama3ChatFormat(tokenizer)
            fmt.IMAGE_ID = mm.config.image_token_id  # the model's <|image|> row (128256 in the released models)
    if max_images is not None and max_images < 1:
        raise ConfigError(f"max_images must be at least 1, got {max_images}")
    return VisionLLM(mm, tokenizer, fmt, str(path), max_images)

"""Messages with images: OpenAI-style image parts (or an "images" list) -> placeholders, image sources and prompt ids.

A message's content may hold {"type": "image", "image": PATH | bytes | PIL}, {"type": "image_url", "image_url":
{"url": "data:..."}} or {"type": "input_image", ...} parts, or the message an "images" list (placed before its
text). split_images turns each into a placeholder in the text and collects the sources in prompt order; the chat
format then places the image tokens. Remote URLs are refused here: nothing is ever fetched.

Floor 5 (beside the tokenizer and chat formats): imports herd.errors, herd.images (the pixels) and the
Mllama model's input types.
"""

from __future__ import annotations

from typing import Sequence

import torch

from herd.errors import FormatError, GenerationError
from herd.images import ImageProcessing, mllama_preprocess
from herd.models.mllama import MllamaConfig, MllamaInputs, cross_attention_mask

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


def image_parts(flat: list[dict], grids: Sequence[tuple[int, int]] | None) -> list[dict]:
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


def user_message(text: str, images: Sequence = ()) -> dict:
    """A user message: the images first (as Llama 4 places them), then the text."""
    if not images:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [{"type": "image", "image": src} for src in images]
            + [{"type": "text", "text": text}]}


def encode_multimodal_prompt(tokens: list[int], images, config: MllamaConfig,
                             processing: ImageProcessing | None = None) -> MllamaInputs:
    """Token ids holding one <|image|> (config.image_token_id) per image + image sources -> MllamaInputs; the pixels
    as `processing` says (the checkpoint's image processor; default: the released model's, at config's tile size)."""
    v = config.vision
    if processing is not None and (processing.tile_size, processing.max_tiles) != (v.image_size, v.max_num_tiles):
        raise GenerationError(f"{processing.source}: {processing.max_tiles} tiles of {processing.tile_size} pixels, "
                              f"but the model takes {v.max_num_tiles} tiles of {v.image_size}")
    pre = mllama_preprocess(list(images), tile_size=v.image_size, max_tiles=v.max_num_tiles, processing=processing)
    mask = cross_attention_mask(tokens, pre.num_tiles, v.max_num_tiles, config.image_token_id)
    return MllamaInputs(torch.tensor([tokens]), pre.pixel_values[None], pre.aspect_ratio_ids[None],
                        pre.aspect_ratio_mask[None], mask[None])

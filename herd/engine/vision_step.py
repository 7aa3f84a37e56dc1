"""The one model object the engines drive when prompts carry images: VisionStep.

A VisionStep wraps a multimodal module and answers forward(tokens (B, T), input_pos, cache, cache_rows, last_only)
as a text Transformer does, so BatchRun and the continuous-batching Engine run it unchanged: paging, prefix caching
(of the text before the first image), preemption, cancellation and batched decoding included. Before a prompt's
prefill the engine calls bind(row, ids, inputs) to attach that prompt's images (or None) to its cache row; every
forward then looks up, per row, what the row was bound with. Three kinds of multimodal module:

* early fusion, herd's VisionLM and Llama 4 (Llama4Multimodal): bind computes the prompt's input embeddings with the
  image embeddings at its <|patch|> slots, (T, D); a prefill (in any slices) reads them by position, a decode step is
  text decoding, batched with every other row. herd's vision LoRA is on exactly for the rows bound to images
  (lora_rows), so text rows in the same batch run the base model.
* cross-attention, Llama 3.2 Vision (Mllama): the prefill encodes the row's tiles and keeps each cross block's K/V and
  the last row's tile mask with the row; rows with images run their forward one at a time (their cross-attention
  lengths differ), text rows together. Its prefill is whole (whole_prompts): the tile mask is made for the prompt.

Floor: engine/ (imports models and the chat-free image preprocessing of herd.images; nothing above).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from herd.models.lora import lora_modules, lora_rows
from herd.models.mllama import Mllama, MllamaInputs, expand_tile_mask
from herd.models.vision_lm import VisionLM


@dataclass
class _Bound:
    """What one cache row was bound with: the prompt ids and its images as the module takes them."""

    ids: list[int]
    embeds: torch.Tensor | None = None  # early fusion: (T, D) input embeddings of the prompt
    lora: bool = False  # herd's VisionLM: the vision LoRA is on for this row
    mllama: MllamaInputs | None = None  # cross-attention: tiles and the (1, T, I, N) tile mask
    xattn: tuple | None = None  # after the prefill: (xk, xv, last_mask) of this row


class _CrossState:
    """An MllamaCache made of the engine's self-attention cache and one row's cross-attention state."""

    def __init__(self, kv, xattn=None):
        self.kv = kv
        self.xk, self.xv, self.last_mask = xattn if xattn is not None else (None, None, None)


class VisionStep(nn.Module):
    """forward(tokens (B, T), input_pos, cache, cache_rows, last_only) -> logits over rows bound by bind()."""

    decode_step = None  # the native decode step runs plain Llama layers only

    def __init__(self, mm: nn.Module):
        super().__init__()
        self.mm = mm
        self.kind = "mllama" if isinstance(mm, Mllama) else "herd" if isinstance(mm, VisionLM) else "llama4"
        self.text = mm.text_model if self.kind == "mllama" else mm.text
        if self.kind == "mllama":
            c = mm.config
            # <|image|> and the other learnable rows follow the text vocabulary: prompts may hold them
            self.config = dataclasses.replace(c.text, vocab_size=c.text.vocab_size + c.extra_embeddings)
        else:
            self.config = mm.text.config
        self.bound: dict[int, _Bound] = {}
        self.has_lora = self.kind == "herd" and bool(lora_modules(self.text))

    @property
    def whole_prompts(self) -> bool:
        """Whether a prompt with images must be prefilled in one forward (Mllama's tile mask)."""
        return self.kind == "mllama"

    def __getattr__(self, name: str):
        """Everything else (norm, layers, tok_embeddings, ...) is the text model's: the engines read those."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("text"), name)

    # -- binding ---------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def bind(self, row: int, ids, inputs) -> None:
        """Attach one prompt's images (inputs as VisionLLM.encode made them; None: a text prompt) to cache row `row`.
        ids may run past the prompt (a preempted request re-prefills what it generated): those positions are text."""
        if inputs is None:
            self.bound.pop(row, None)
            return
        ids = [int(t) for t in ids]
        if self.kind == "mllama":
            mask = inputs.cross_attention_mask
            if mask.shape[1] < len(ids):  # generated tokens see what the last prompt token sees
                mask = torch.cat([mask, mask[:, -1:].expand(-1, len(ids) - mask.shape[1], -1, -1)], dim=1)
            self.bound[row] = _Bound(ids, mllama=dataclasses.replace(inputs, cross_attention_mask=mask))
            return
        t = torch.tensor([ids])
        if self.kind == "herd":
            embeds = self.mm.fuse(t, inputs)[0]  # inputs: the image features (n_images * N, D)
        else:
            dtype = self.text.norm.weight.dtype
            embeds = self.mm.embed(t, inputs.to(dtype))[0]  # inputs: pixel values (tiles, 3, S, S)
        self.bound[row] = _Bound(ids, embeds=embeds, lora=self.has_lora)

    def prefix_key(self, ids, inputs=None) -> tuple[int, int]:
        """(root, limit) for the prefix cache of a prompt with images: its pages may be shared only with prompts of
        the same root, and only over its first `limit` tokens, those whose keys and values no image can change.
        Early fusion: the text before the first <|patch|> (herd's rows run the vision LoRA: a root of their own).
        Mllama: nothing (a text row's cross-attention output may be kept, so the image reaches every position)."""
        if self.kind == "mllama":
            return 0, 0
        patch = self.mm.tokens.patch if self.kind == "herd" else self.mm.patch_token_id
        limit = next((i for i, t in enumerate(ids) if t == patch), len(ids))
        return (-1 if self.has_lora else 0), limit

    # -- forward ---------------------------------------------------------------------------------------------
    def forward(self, tokens, input_pos=None, cache=None, cache_rows=None, last_only: bool = False):
        B, T = tokens.shape
        if input_pos is None:
            input_pos = torch.arange(T, device=tokens.device).expand(B, T)
        elif input_pos.dim() == 1:
            input_pos = input_pos.expand(B, T)
        rows = list(range(B)) if cache_rows is None else [int(r) for r in cache_rows.reshape(-1)]
        bound = [self.bound.get(r) for r in rows]
        if self.kind == "mllama":
            return self._mllama(tokens, input_pos, cache, cache_rows, last_only, bound)
        embeds = self._embeds(tokens, input_pos, bound)
        if not self.has_lora:
            return self.text(tokens, input_pos, cache, embeds=embeds, last_only=last_only, cache_rows=cache_rows)
        on = torch.tensor([b is not None and b.lora for b in bound])
        with lora_rows(self.text, on):
            return self.text(tokens, input_pos, cache, embeds=embeds, last_only=last_only, cache_rows=cache_rows)

    def _embeds(self, tokens, input_pos, bound) -> torch.Tensor | None:
        """(B, T, D) input embeddings where a row's prompt positions take its bound embeddings; None when no row
        needs anything but the token embeddings."""
        fused = self.kind == "herd" and self.mm.uses_embeds(tokens)  # marker ids: their trained vectors
        if not fused and all(b is None for b in bound):
            return None
        h = self.mm.fuse(tokens, None, strict=False) if fused else self.text.tok_embeddings(tokens)
        for i, b in enumerate(bound):
            if b is None:
                continue
            pos = input_pos[i]
            inside = pos < b.embeds.shape[0]  # positions past the prompt (generated, padding) are text
            if bool(inside.any()):
                h[i, inside] = b.embeds[pos[inside]].to(h.dtype)
        return h

    def _mllama(self, tokens, input_pos, cache, cache_rows, last_only, bound):
        text = self.mm.text_model
        alone = [i for i, b in enumerate(bound) if b is not None]
        if not alone:  # text rows only: one batch
            state = None if cache is None else _CrossState(cache)
            return text(tokens, input_pos, state, last_only=last_only, cache_rows=cache_rows)
        rows = torch.arange(tokens.shape[0]) if cache_rows is None else cache_rows.reshape(-1)
        together = [i for i, b in enumerate(bound) if b is None]
        out: list[torch.Tensor | None] = [None] * tokens.shape[0]
        if together:
            idx = torch.tensor(together)
            logits = text(tokens[idx], input_pos[idx], _CrossState(cache), last_only=last_only, cache_rows=rows[idx])
            for j, i in enumerate(together):
                out[i] = logits[j]
        for i in alone:
            out[i] = self._mllama_row(tokens[i:i + 1], input_pos[i:i + 1], cache, rows[i:i + 1], last_only,
                                      bound[i])[0]
        return torch.stack(out)

    def _mllama_row(self, tokens, input_pos, cache, rows, last_only, b: _Bound):
        """One row with images: its prefill encodes the tiles (kept with the row), its decode steps reuse them."""
        text = self.mm.text_model
        if b.xattn is not None:
            state = _CrossState(cache, b.xattn)
            logits = text(tokens, input_pos, state, last_only=last_only, cache_rows=rows)
            b.xattn = (state.xk, state.xv, state.last_mask)
            return logits
        inp = b.mllama
        dtype = text.norm.weight.dtype
        vision = self.mm.encode_images(inp.pixel_values.to(dtype), inp.aspect_ratio_ids, inp.aspect_ratio_mask)
        # rows past the bound ids (the engine's padding tokens, placed after the chunk) see what the last one sees
        tile_mask = inp.cross_attention_mask[:, input_pos[0].clamp(max=inp.cross_attention_mask.shape[1] - 1)]
        vision_mask = expand_tile_mask(tile_mask, self.mm.config.vision.n_patches)
        state = _CrossState(cache)
        logits = text(tokens, input_pos, state, vision, vision_mask, last_only, cache_rows=rows)
        b.xattn = (state.xk, state.xv, state.last_mask)
        return logits

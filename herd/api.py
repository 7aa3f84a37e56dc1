"""The Python API: herd.load() returns an LLM with its tokenizer and chat format; the CLI and server call this."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import torch

from herd.engine.generate import BatchRun, Completion, generate_batch
from herd.errors import GenerationError
from herd.ops.sampling import SamplingParams

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise GenerationError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    return DTYPES[dtype]


class LLM:
    """A loaded model with its tokenizer and chat format."""

    def __init__(self, model, tokenizer, chat_format, source: str = "", checkpoint=None):
        self.model, self.tokenizer, self.chat_format = model, tokenizer, chat_format
        self.config = model.config
        self.source = source
        self.checkpoint = checkpoint

    # -- prompts -----------------------------------------------------------------------------------------
    @property
    def stop_ids(self) -> frozenset[int]:
        ids = set(self.tokenizer.stop_ids) if self.tokenizer is not None else set()
        if self.chat_format is not None:
            ids |= set(self.chat_format.stop_ids)
        return frozenset(ids)

    def encode_prompt(self, prompt, raw: bool = False, tools=None) -> list[int]:
        """A string (one user message unless raw), a message list, or token ids -> prompt ids."""
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        if self.tokenizer is None:
            raise GenerationError(f"{self.source}: no tokenizer was found with this checkpoint; pass token ids")
        if isinstance(prompt, str) and raw:
            return self.tokenizer.encode(prompt, bos=self.tokenizer.add_bos)
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if not getattr(self, "accepts_images", False):
            from herd.multimodal import has_images

            if has_images(messages):
                raise GenerationError(f"{self.source}: a text-only model takes no images; load a vision checkpoint "
                                      f"(Llama 3.2 Vision, Llama 4) or attach a herd vision model (ImageChat)")
        if self.chat_format is None:
            raise GenerationError(f"{self.source}: this model has no chat format; use raw=True")
        return self.chat_format.encode_dialog(messages, add_generation_prompt=True, tools=tools)

    # -- generation --------------------------------------------------------------------------------------
    def generate(self, prompt, *, raw: bool = False, tools=None, **sampling) -> Completion:
        """Complete one prompt (string, messages or ids); sampling keywords as SamplingParams."""
        return self.generate_batch([prompt], raw=raw, tools=tools, **sampling)[0]

    def chat(self, messages, **sampling) -> Completion:
        return self.generate(messages, raw=False, **sampling)

    def generate_batch(self, prompts: Sequence, *, raw: bool = False, tools=None, **sampling) -> list[Completion]:
        ids = [self.encode_prompt(p, raw, tools) for p in prompts]
        return generate_batch(self.model, ids, SamplingParams(**sampling), self.tokenizer, self.stop_ids)

    def stream(self, prompt, *, raw: bool = False, tools=None, **sampling) -> Iterator[str]:
        """Text pieces as they are generated; never splits a multi-byte character."""
        run = BatchRun(self.model, [self.encode_prompt(prompt, raw, tools)], SamplingParams(**sampling),
                       self.tokenizer, self.stop_ids)
        for delta in run:
            if delta.text:
                yield delta.text

    def run(self, prompts_ids: Sequence[Sequence[int]], params) -> BatchRun:
        return BatchRun(self.model, prompts_ids, params, self.tokenizer, self.stop_ids)

    @torch.inference_mode()
    def logits(self, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Float32 logits (T, V) of a token sequence, one full forward."""
        t = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1)
        if t.shape[1] > self.config.max_seq_len:
            raise GenerationError(f"{t.shape[1]} tokens exceed the context of {self.config.max_seq_len}")
        return self.model(t)[0].float()


def drop_tokenizer_arrays(metadata: dict) -> dict:
    """GGUF metadata without the vocabulary arrays (tokens, merges, scores, types) once the tokenizer holds them:
    ~100k Python strings, ~6 MB of RSS for the default model, that nothing reads again."""
    return {k: v for k, v in metadata.items() if not (k.startswith("tokenizer.ggml.") and isinstance(v, list))}


def load(path: str | Path | None = None, dtype=None, *, chat_template: str | None = None,
         keep_quantized: bool = False) -> LLM:
    """Load a checkpoint (path, catalog name, or None for the default model) into an LLM."""
    from herd.chat_format import chat_format_for
    from herd.formats import load_checkpoint, multimodal_kind
    from herd.hub import resolve
    from herd.models.llama import build_model

    path = resolve(None if path is None else str(path))
    kind = multimodal_kind(path)
    if kind is not None:  # Llama 3.2 Vision / Llama 4 with its vision tower: an LLM that also takes images
        from herd.vision_llm import load_vision_llm

        if keep_quantized:
            raise GenerationError(f"{path}: keep_quantized applies to GGUF files, not to a {kind} vision checkpoint")
        return load_vision_llm(path, kind, dtype, chat_template=chat_template)
    ckpt = load_checkpoint(path, parse_dtype(dtype), keep_quantized=keep_quantized)
    ckpt.metadata = drop_tokenizer_arrays(ckpt.metadata)
    # a GGUF file's own rope_freqs divisors that no llama3 setting explains (SPEC.md §4)
    rope_divisors = ckpt.state_dict.pop("rope.freqs", None)
    if keep_quantized:
        from herd.quant.model import build_quantized_model

        model = build_quantized_model(ckpt.config, ckpt.state_dict)
    else:
        model = build_model(ckpt.config, ckpt.state_dict)
    if rope_divisors is not None:
        model.set_inv_freq(model.inv_freq / rope_divisors.float().reshape(-1))
    template = chat_template if chat_template is not None else ckpt.chat_template
    fmt = chat_format_for(ckpt.tokenizer, ckpt.config.family, template) if ckpt.tokenizer is not None else None
    ckpt.state_dict = {}  # the model owns the tensors now
    return LLM(model, ckpt.tokenizer, fmt, str(path), ckpt)


def load_tokenizer_only(path: str | Path | None = None):
    """The tokenizer of a checkpoint without loading its weights."""
    from herd.formats import detect_format
    from herd.hub import resolve

    path = resolve(None if path is None else str(path))
    if detect_format(path) == "gguf":
        from herd.formats.gguf import read_gguf
        from herd.formats.gguf_vocab import tokenizer_from_gguf

        file = path if path.is_file() else sorted(path.glob("*.gguf"))[0]
        return tokenizer_from_gguf(read_gguf(file).metadata)
    from herd.tokenizer import load_tokenizer

    return load_tokenizer(path)

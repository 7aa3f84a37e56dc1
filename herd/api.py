"""The Python API: herd.load() returns an LLM (text) or a VisionLLM (text and images); the CLI and server call this.

One image protocol for every model that reads pictures -- a released multimodal checkpoint (Llama 3.2 Vision, Llama 4)
or a text model with a herd vision model attached (ImageChat, from `herd train-vision`):

    encode(prompt, images=None) -> (ids, image inputs or None)     run(prompts, params, images=None) -> Deltas
    generate(prompt, images=None, **sampling) -> Completion         stream(prompt, images=None, **sampling) -> str
    generate_batch(prompts, images=None, **sampling)                chat(messages, **sampling)

A prompt is token ids, a string (one user message) or OpenAI-style messages whose user contents may hold image parts
(herd/image_prompts.py). Generation is BatchRun over a VisionStep (herd/engine/vision_step.py): prompts with and
without images run in one batch.

Floor 9: imports the engine, formats, hub and everything below; the server, training, evaluation and the CLI sit above.
"""

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
        self.kv_type = "f32"  # the KV cache's storage for generation here and in an engine: f32, f16 or q8_0
        self.speculation = None  # a herd.engine.speculate.Speculation (see speculation()): draft-and-verify decoding

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
            from herd.image_prompts import has_images

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
        return generate_batch(self.model, ids, SamplingParams(**sampling), self.tokenizer, self.stop_ids,
                              kv_type=self.kv_type, speculation=self.speculation)

    def stream(self, prompt, *, raw: bool = False, tools=None, **sampling) -> Iterator[str]:
        """Text pieces as they are generated; never splits a multi-byte character."""
        run = BatchRun(self.model, [self.encode_prompt(prompt, raw, tools)], SamplingParams(**sampling),
                       self.tokenizer, self.stop_ids, kv_type=self.kv_type, speculation=self.speculation)
        for delta in run:
            if delta.text:
                yield delta.text

    def run(self, prompts_ids: Sequence[Sequence[int]], params) -> BatchRun:
        return BatchRun(self.model, prompts_ids, params, self.tokenizer, self.stop_ids, kv_type=self.kv_type,
                        speculation=self.speculation)

    def step(self):
        """The model object an engine drives for this LLM (a fresh one where it keeps per-row state)."""
        return self.model

    @torch.inference_mode()
    def logits(self, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Float32 logits (T, V) of a token sequence, one full forward."""
        t = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1)
        if t.shape[1] > self.config.max_seq_len:
            raise GenerationError(f"{t.shape[1]} tokens exceed the context of {self.config.max_seq_len}")
        if self.kv_type == "f32":
            return self.model(t)[0].float()
        # an f16 / q8_0 KV cache: the keys and values are stored, then read back, as generation reads them
        from herd.engine.generate import activation_dtype_device
        from herd.models.kv_cache import KVCache

        dtype, device = activation_dtype_device(self.model)
        cache = KVCache(self.config, 1, t.shape[1], dtype=dtype, device=device, kv_type=self.kv_type)
        return self.model(t.to(device), torch.arange(t.shape[1], device=device)[None], cache)[0].float()

    # -- embeddings and reranking (herd/engine/embeddings.py) ---------------------------------------------
    def _text_model(self):
        """The text Transformer whose hidden states embeddings read (an ImageChat's text model)."""
        return getattr(self, "llm", self).model

    def embed(self, inputs: Sequence, pooling: str = "mean", normalize: bool = True) -> torch.Tensor:
        """Embeddings (N, D) float32 of texts (encoded raw, as a completion prompt) or token-id lists: the final
        hidden states (after the last norm) pooled by "mean" (default), "last" or "cls", L2-normalised."""
        from herd.engine.embeddings import check_sequences, embed_ids

        seqs = [self.encode_prompt(x, raw=True) if isinstance(x, str) else list(x) for x in inputs]
        check_sequences(seqs, self.config.vocab_size, self.config.max_seq_len)
        return embed_ids(self._text_model(), seqs, pooling, normalize)

    def rerank(self, query: str, documents: Sequence[str]) -> list[float]:
        """Relevance of each document to the query, in (0, 1]: the query's likelihood given the document (UPR,
        Sachan et al. 2022: the per-token geometric mean of p(query | RERANK_PROMPT with the document)). Any
        causal LM scores this way, small ones included, with no embedding training."""
        return self.rerank_scores(self.rerank_inputs(query, documents))

    def rerank_inputs(self, query: str, documents: Sequence[str]) -> list[tuple[list[int], int]]:
        """(ids, where the query starts) of each document's scoring sequence: RERANK_PROMPT, then the query."""
        if self.tokenizer is None:
            raise GenerationError(f"{self.source}: reranking needs the checkpoint's tokenizer")
        if not query.strip():
            raise GenerationError("rerank: the query is empty")
        if not documents:
            raise GenerationError("rerank: no documents given")
        q = self.tokenizer.encode(" " + query.strip())
        heads = [self.tokenizer.encode(RERANK_PROMPT.format(document=d), bos=self.tokenizer.add_bos)
                 for d in documents]
        return [(h + q, len(h)) for h in heads]

    def rerank_scores(self, inputs: Sequence[tuple[list[int], int]]) -> list[float]:
        from herd.engine.embeddings import check_sequences, continuation_logprobs

        check_sequences([ids for ids, _ in inputs], self.config.vocab_size, self.config.max_seq_len, "document")
        lps = continuation_logprobs(self._text_model(), [ids for ids, _ in inputs], [a for _, a in inputs])
        return [float(lp.mean().exp()) for lp in lps]


# The query-likelihood prompt of LLM.rerank (UPR's, Sachan et al. 2022)
RERANK_PROMPT = "Passage: {document}\nPlease write a question based on this passage.\nQuestion:"


def speculation(llm: LLM, method: str, draft_model: str | None = None, draft_tokens: int = 4):
    """A Speculation for llm's model (herd/engine/speculate.py): method "ngram" (prompt lookup) or "draft" with
    draft_model = a checkpoint or catalog name sharing the vocabulary, or "prune:N" (the target's first N // 2 and
    last N - N // 2 blocks, sharing its weights). On the native quantized path a single sequence's verifying rows
    carry the one-row step's bits, so its greedy output equals plain decoding's bit for bit: on AVX-512 the one-row
    kernel has the GEMM's arithmetic and nothing is needed; elsewhere `spec.exact_rows` keeps the verifying rows on
    the one-row kernels (`spec.exact_rows = None` trades that for the multi-row kernel's speed)."""
    from herd.engine.speculate import Speculation, prune_layers

    draft = None
    if method == "draft":
        if not draft_model:
            raise GenerationError("--speculate draft needs --draft-model (a checkpoint, or prune:N for the target's "
                                  "first and last layers)")
        if draft_model.startswith("prune:"):
            try:
                n = int(draft_model[len("prune:"):])
            except ValueError:
                raise GenerationError(f"--draft-model {draft_model!r}: prune:N takes a layer count") from None
            draft = prune_layers(llm.model, n)
        else:
            draft = load(draft_model).model
    elif draft_model:
        raise GenerationError(f"--draft-model {draft_model!r} needs --speculate draft")
    spec = Speculation(method, int(draft_tokens), draft, exact_rows=_one_row_kernels(llm.model))
    spec.check_target(llm.model)
    return spec


def _one_row_kernels(model):
    """For a model on the native decode step: a context under which herd's kernels give every activation row the
    bits a one-row call gives, so that verification rows equal plain decode steps. Where the one-row kernel has the
    GEMM's arithmetic (AVX-512, integer activations: herd_q_set_gemv) every row already has those bits and this is
    None; elsewhere (the decode kernels, whose one-row and multi-row passes differ from the GEMM) the context keeps
    the multi-row calls off the GEMM. None for models off the native step."""
    from contextlib import contextmanager

    from herd.quant import native
    from herd.quant.decode import NativeDecodeStep

    if not isinstance(getattr(model, "decode_step", None), NativeDecodeStep):
        return None
    lib = native.load()
    if lib is None or (native.best_isa() == 2 and lib.herd_q_set_gemv(-1) == 1):
        return None

    @contextmanager
    def one_row():
        old = lib.herd_q_set_gemm_min_rows(1 << 30)
        try:
            yield
        finally:
            lib.herd_q_set_gemm_min_rows(old)

    return one_row


def drop_tokenizer_arrays(metadata: dict) -> dict:
    """GGUF metadata without the vocabulary arrays (tokens, merges, scores, types) once the tokenizer holds them:
    ~100k Python strings, ~6 MB of RSS for the default model, that nothing reads again."""
    return {k: v for k, v in metadata.items() if not (k.startswith("tokenizer.ggml.") and isinstance(v, list))}


def load(path: str | Path | None = None, dtype=None, *, chat_template: str | None = None,
         keep_quantized: bool | None = None, quantization: str | None = None, vision=None,
         kv_type: str | None = None) -> LLM:
    """Load a checkpoint (path, catalog name, or None for the default model) into an LLM, on the fastest correct path
    by default: a GGUF file keeps its weight blocks (native kernels, C decode step) unless keep_quantized=False or a
    float dtype is asked for; `quantization` ("q8_0", "q4_0", "q4_k", ...) quantizes an HF / Meta (or dequantized
    GGUF) checkpoint in memory at load, with the same kernels. A multimodal checkpoint gives a VisionLLM; `vision`
    (a `herd train-vision` folder) attaches a herd vision model to a text model (ImageChat). kv_type: the KV
    cache's storage, "f32" (default, exact), "f16" or "q8_0" (llama.cpp's -ctk/-ctv; half or ~0.27 of the memory)."""
    from herd.models.kv_cache import kv_type_of

    kv = kv_type_of(kv_type)  # a bad name fails before any loading
    llm = _load(path, dtype, chat_template, keep_quantized, quantization, vision)
    llm.kv_type = kv
    if getattr(llm, "llm", None) is not None:  # an ImageChat: its text model generates
        llm.llm.kv_type = kv
    return llm


def _load(path, dtype, chat_template, keep_quantized, quantization, vision) -> LLM:
    from herd.chat_format import chat_format_for
    from herd.formats import detect_format, load_checkpoint, multimodal_kind
    from herd.hub import resolve
    from herd.models.llama import build_model

    path = resolve(None if path is None else str(path))
    kind = multimodal_kind(path)
    if kind is not None:  # Llama 3.2 Vision / Llama 4 with its vision tower: an LLM that also takes images
        if keep_quantized or quantization:
            raise GenerationError(f"{path}: quantized weights apply to text checkpoints, not to a {kind} vision "
                                  f"checkpoint")
        if vision is not None:
            raise GenerationError(f"{path} reads images itself ({kind}); vision= attaches a herd vision model to a "
                                  f"text model")
        return load_multimodal(path, kind, dtype, chat_template=chat_template)
    if keep_quantized is None:  # the default: GGUF blocks stay blocks, unless a float dtype or a re-quantization
        keep_quantized = dtype is None and quantization is None and detect_format(path) == "gguf"
    if keep_quantized and quantization:
        raise GenerationError(f"{path}: keep_quantized keeps the file's own blocks; quantization={quantization!r} "
                              f"re-quantizes float weights: choose one")
    ckpt = load_checkpoint(path, parse_dtype(dtype), keep_quantized=keep_quantized)
    ckpt.metadata = drop_tokenizer_arrays(ckpt.metadata)
    # a GGUF file's own rope_freqs divisors that no llama3 setting explains (SPEC.md §4)
    rope_divisors = ckpt.state_dict.pop("rope.freqs", None)
    if keep_quantized:
        from herd.quant.model import build_quantized_model

        model = build_quantized_model(ckpt.config, ckpt.state_dict)
    else:
        # float32 unless a dtype is asked for (float32 is also the faster CPU path for a checkpoint stored in bf16)
        model = build_model(ckpt.config, ckpt.state_dict, parse_dtype(dtype) or torch.float32)
        if quantization:
            from herd.quant.model import quantize_model

            quantize_model(model, quantization.lower())
    if rope_divisors is not None:
        model.set_inv_freq(model.inv_freq / rope_divisors.float().reshape(-1))
    template = chat_template if chat_template is not None else ckpt.chat_template
    fmt = chat_format_for(ckpt.tokenizer, ckpt.config.family, template) if ckpt.tokenizer is not None else None
    ckpt.state_dict = {}  # the model owns the tensors now
    llm = LLM(model, ckpt.tokenizer, fmt, str(path), ckpt)
    return ImageChat.load(vision, llm=llm) if vision is not None else llm


# ---------------------------------------------------------------------------------------------------------------
# Images: one protocol for vision checkpoints and herd's own vision models

# Images per prompt: herd's guard, not a limit of the weights. Llama 4: Meta's launch notes report good results after
# post-training with up to 8 images. Llama 3.2 Vision: neither Meta's code nor transformers caps the count; 8 bounds
# the cross-attention K/V (images x 4 tiles x 1601 tokens per block). Set VisionLLM.max_images to change it.
MAX_IMAGES = 8
LLAMA4_MAX_TILES = 16  # tiles per image (transformers' Llama4ImageProcessor max_patches, Meta's max_num_chunks)


class VisionLLM(LLM):
    """An LLM that also reads images (the module docstring's protocol). mm: the whole multimodal module (Mllama,
    Llama4Multimodal or herd's VisionLM); model: a VisionStep over it; config: the text model's ModelConfig."""

    accepts_images = True

    def __init__(self, mm, tokenizer, chat_format, source: str = "", max_images: int | None = None,
                 processing=None):
        from herd.engine.vision_step import VisionStep

        super().__init__(VisionStep(mm), tokenizer, chat_format, source)
        self.mm = mm
        self.kind = self.model.kind  # "mllama", "llama4" or "herd"
        self.config = self.model.text.config if self.kind != "mllama" else mm.config.text
        self.max_images = MAX_IMAGES if max_images is None else int(max_images)
        # the checkpoint's image-processor settings (herd.images.ImageProcessing); None: the released model's
        self.processing = processing

    def step(self):
        from herd.engine.vision_step import VisionStep

        return VisionStep(self.mm)

    # -- prompts -----------------------------------------------------------------------------------------
    def encode_prompt(self, prompt, raw: bool = False, tools=None) -> list[int]:
        """Prompt ids of a prompt without images (LLM.encode_prompt); prompts with images go through encode()."""
        ids, inputs = self.encode(prompt, raw=raw, tools=tools)
        if inputs is not None:
            raise GenerationError(f"{self.source}: this prompt has images; generate() / run() take it")
        return ids

    def encode(self, prompt, images: Sequence | None = None, *, raw: bool = False, tools=None):
        """Prompt (+ images) -> (prompt ids, the images as the model takes them at prefill, or None)."""
        from herd.image_prompts import split_images, with_images

        is_ids = isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, int) for t in prompt)
        if is_ids or (raw and isinstance(prompt, str)):
            if images:
                raise GenerationError("images go into a chat prompt (a string or messages), not into token ids or "
                                      "a raw prompt")
            return super().encode_prompt(prompt, raw, tools), None
        messages = with_images(prompt, images)
        flat, sources = split_images(messages)
        if not sources:
            ids = super().encode_prompt(flat, False, tools)
            image_token = self._image_token()
            if image_token in ids:  # typed as text: an image slot with no image to fill it
                raise GenerationError(f"the prompt holds the image token (id {image_token}) but has no images bound "
                                      f"to it; send the picture as an image part")
            return ids, None
        if len(sources) > self.max_images:
            raise GenerationError(f"{len(sources)} images in one prompt; {self.source} takes at most "
                                  f"{self.max_images} ({self.kind})")
        if self.chat_format is None:
            raise GenerationError(f"{self.source}: this model has no tokenizer and chat format to place images in")
        return self._encode_images(messages, flat, sources, tools)

    def _image_token(self) -> int:
        """The id that stands for (part of) an image in a prompt: <|patch|> (early fusion) or <|image|> (Mllama)."""
        if self.kind == "mllama":
            return self.mm.config.image_token_id
        return self.mm.tokens.patch if self.kind == "herd" else self.mm.patch_token_id

    def _encode_images(self, messages, flat, sources, tools):
        """(ids, image inputs) of messages with images (flat: with a placeholder per image; sources: the images)."""
        from herd.image_prompts import encode_multimodal_prompt, image_parts

        if self.kind == "llama4":
            from herd.images import llama4_preprocess

            v = self.mm.vision.config
            pre = llama4_preprocess(list(sources), tile_size=v.image_size, max_tiles=LLAMA4_MAX_TILES,
                                    processing=self.processing)
            ids = self._dialog(image_parts(flat, pre.aspect_ratios), tools, len(sources), pre.aspect_ratios)
            want = sum(pre.tiles_per_image) * v.tokens_per_tile
            found = sum(1 for t in ids if t == self.mm.patch_token_id)
            if found != want:
                raise GenerationError(f"the prompt has {found} <|patch|> tokens (id {self.mm.patch_token_id}); its "
                                      f"{len(sources)} image(s) give {want} patch embeddings")
            return ids, pre.pixel_values
        ids = self._dialog(image_parts(flat, None), tools, len(sources))
        return ids, encode_multimodal_prompt(ids, sources, self.mm.config, self.processing)

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
                                  f"{n_images} image(s): {fmt.source} does not write image parts as <|image|>; give "
                                  f"one that does with --chat-template FILE_OR_STRING")
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
        """Generation for prompts (ids, strings or messages), each with its own images (or None), in one batch;
        iterate for Deltas, then .completions()."""
        if isinstance(params, dict):
            params = SamplingParams(**params)
        if images is None:
            images = [None] * len(prompts)
        if len(images) != len(prompts):
            raise GenerationError(f"{len(prompts)} prompts but {len(images)} image lists")
        encoded = [self.encode(p, im, raw=raw, tools=tools) for p, im in zip(prompts, images)]
        return BatchRun(self.step(), [ids for ids, _ in encoded], params, self.tokenizer, self.stop_ids,
                        images=[inputs for _, inputs in encoded], kv_type=self.kv_type)

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


class ImageChat(VisionLLM):
    """A text LLM with a herd vision model attached (`herd train-vision`): VisionLLM's protocol over it. The images
    of a prompt become embeddings of its <|patch|> slots (herd/models/vision_lm.py); llm is the text LLM."""

    def __init__(self, llm: LLM, vlm, spec):
        super().__init__(vlm, llm.tokenizer, llm.chat_format, llm.source)
        self.llm, self.vlm, self.spec = llm, vlm, spec
        self.image_ids = spec.tokens.for_image(spec.tokens_per_image)

    @classmethod
    def load(cls, vision_dir: str | Path | None = None, llm: LLM | None = None, model: str | None = None,
             dtype=None) -> "ImageChat":
        """Load (or take) the text model and attach the vision checkpoint (default: hub.default_vision_dir())."""
        from herd.errors import FormatError
        from herd.formats.vision_ckpt import CONFIG_FILE, load_vision
        from herd.hub import default_vision_dir

        folder = Path(vision_dir).expanduser() if vision_dir is not None else default_vision_dir(model)
        if not (folder / CONFIG_FILE).exists():
            raise FormatError(f"{folder}: no vision model there ({CONFIG_FILE} missing); train one with "
                              f"`herd train-vision` (or `make vision-demo`), or pass the folder of one")
        if llm is None:
            llm = load(model, dtype)
        vlm, spec = load_vision(folder, llm.model)
        return cls(llm, vlm, spec)

    def _encode_images(self, messages, flat, sources, tools):
        from herd.image_prompts import encode_with_images

        ids, _ = encode_with_images(self.tokenizer, self.chat_format, messages, self.image_ids)
        return ids, self.features(sources)

    @torch.inference_mode()
    def features(self, sources: Sequence) -> torch.Tensor:
        """Image sources -> their embeddings (n * N, D); FormatError for anything that is not a good image."""
        from herd.images import llama4_preprocess

        pixels = llama4_preprocess(list(sources), tile_size=self.spec.vision.image_size, max_tiles=self.spec.max_tiles)
        return self.vlm.image_features(pixels.pixel_values)


def _hf_dtype(folder: Path) -> torch.dtype:
    """The dtype an HF config.json says its weights are in (float32 when it says nothing usable)."""
    from herd.formats.io import read_json

    cfg = read_json(folder / "config.json")
    for d in (cfg, cfg.get("text_config") or {}):
        name = d.get("torch_dtype") or d.get("dtype")
        if name in ("float32", "bfloat16", "float16"):
            return getattr(torch, name)
    return torch.float32


def load_multimodal(path: str | Path, kind: str, dtype=None, *, chat_template: str | None = None,
                    max_images: int | None = None) -> VisionLLM:
    """A multimodal checkpoint folder (kind from herd.formats.multimodal_kind) -> VisionLLM. dtype None keeps the
    checkpoint's."""
    from herd.chat_format import JinjaChatFormat, Llama3ChatFormat, Llama4ChatFormat
    from herd.errors import ConfigError
    from herd.formats import _hf_chat_template
    from herd.formats.mllama import (build_mllama, load_llama4_multimodal_hf, load_mllama_hf, load_mllama_meta,
                                     read_image_processing)

    path = Path(path)
    dtype = parse_dtype(dtype)
    hf = (path / "config.json").exists()
    if kind == "mllama":
        config, sd = load_mllama_hf(path) if hf else load_mllama_meta(path)
        if dtype is None:
            dtype = next((t.dtype for t in sd.values() if t.is_floating_point()), torch.float32)
        mm = build_mllama(config, sd, dtype)
        processing = read_image_processing(path, kind, config.vision.image_size, config.vision.max_num_tiles)
    elif kind == "llama4":
        mm = load_llama4_multimodal_hf(path, dtype or _hf_dtype(path))
        processing = read_image_processing(path, kind, mm.vision.config.image_size)
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
            fmt.source = ("the chat template given (chat_template=...)" if chat_template is not None else
                          f"the chat template of {_template_file(path)}")
        elif kind == "llama4":
            fmt = Llama4ChatFormat(tokenizer, patches_per_tile=mm.vision.config.tokens_per_tile)
        else:
            fmt = Llama3ChatFormat(tokenizer)
            fmt.IMAGE_ID = mm.config.image_token_id  # the model's <|image|> row (128256 in the released models)
    if max_images is not None and max_images < 1:
        raise ConfigError(f"max_images must be at least 1, got {max_images}")
    return VisionLLM(mm, tokenizer, fmt, str(path), max_images, processing)


def _template_file(folder: Path) -> Path:
    """The file an HF folder's chat template is read from (as herd.formats._hf_chat_template reads it)."""
    jinja = folder / "chat_template.jinja"
    return jinja if jinja.exists() else folder / "tokenizer_config.json"


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

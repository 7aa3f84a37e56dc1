"""`herd train-vision`: teach the default text model to see, on a generated image-question data set.

The data (herd/train/vision_data.py): generated pictures of shapes, each with one question and a one-word answer
(colour, shape, position, count), reproducible from (seed, index).

The model (herd.models.vision_lm.VisionLM): a small Llama 4 vision encoder (64-pixel tile, 8-pixel patches, 4 layers of
width 128, 2-D RoPE, pixel shuffle 0.5 -> 16 image embeddings per image) with Meta's adapter MLP and projection to
the text width, fused early into the frozen text model at <|patch|> positions; LoRA on the text model's linears.

Training runs in two stages:
1. vision pre-training (no language model, so cheap): encoder, adapter and projection learn to turn a picture into
   16 embeddings whose four groups of four sit near the text model's input embeddings of the picture's label words
   ("red", "circle", "left", "1"); see WordAnchors. A real vision-language model starts from a pre-trained (CLIP)
   encoder; this stage stands in for that, and gives the text model image embeddings it can read from the start.
2. alignment: encoder, adapter, projection, marker embeddings and LoRA together, by the cross-entropy of the answer
   tokens (and the end-of-turn token) after the chat prompt, through the whole 30-layer text model; stage 1's loss
   stays on with a small weight. The shared system-prompt prefix of a batch runs once (hidden_states).

Evaluation is exact-answer accuracy per question kind on held-out pictures (another seed), half of them asked in
phrasings training never used.

Shapes: B batch, T tokens, D text width, N image embeddings per image (16), S side of a tile in pixels (64).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from herd.errors import ConfigError
from herd.train.loop import lr_lambda
from herd.train.vision_data import (COLOURS, Example, KINDS, MAX_COUNT, PICTURE_KINDS, POSITIONS, SHAPES, make_example, make_split)

# ---------------------------------------------------------------------------------------------------------------
# Batches


def pixel_batch(examples: list[Example], image_size: int) -> torch.Tensor:
    """Pictures -> (B, 3, S, S) float32 through the same preprocessing as inference (herd.images)."""
    from herd.images import llama4_preprocess

    return llama4_preprocess([e.image for e in examples], tile_size=image_size, max_tiles=1).pixel_values.float()


def label_batch(examples: list[Example]) -> dict[str, torch.Tensor]:
    labels = [e.labels() for e in examples]
    return {k: torch.tensor([lb[k] for lb in labels]) for k in ("colour", "shape", "position", "count")}


# ---------------------------------------------------------------------------------------------------------------
# Stage 1: vision pre-training towards word embeddings


CLASSES = {"colour": list(COLOURS), "shape": list(SHAPES), "position": list(POSITIONS),
           "count": [str(n) for n in range(1, MAX_COUNT + 1)]}


class WordAnchors:
    """Stage 1's targets: the text model's input embedding of each label word, per image slot group.

    The N image embeddings are split into four contiguous groups (colour, shape, position, count); each group is
    pulled towards the embedding of the first token of its label's word (e.g. "red"), so the text model meets
    image embeddings that already read like words, which it learns to use in a few hundred steps rather than the
    many thousands an unanchored projector takes. Stage 2 then trains everything further through the text model.
    """

    def __init__(self, tokenizer, text_model, n_slots: int):
        if n_slots % len(CLASSES):
            raise ConfigError(f"{n_slots} image embeddings cannot be split into {len(CLASSES)} equal slot groups")
        emb = text_model.tok_embeddings.weight.detach().float()
        m = n_slots // len(CLASSES)
        self.slots = {k: slice(i * m, (i + 1) * m) for i, k in enumerate(CLASSES)}
        self.table, self.scale = {}, {}
        for k, words in CLASSES.items():
            ids = [tokenizer.encode(w)[0] for w in words]
            if len(set(ids)) != len(ids):
                raise ConfigError(f"the {k} words {words} do not all start with different tokens")
            t = emb[ids]  # (C, D)
            self.table[k] = t
            d = torch.cdist(t, t).pow(2)
            self.scale[k] = float(d.sum() / (len(ids) * (len(ids) - 1))) / 8  # distance logits' temperature

    def loss(self, feats: torch.Tensor, labels: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """feats (B, N, D) image embeddings -> loss (distance cross-entropy + relative squared error to the label
        word's embedding, labels -1 ignored) and per-kind accuracy of the nearest word (mean over the group)."""
        total, acc = 0.0, {}
        for k, sl in self.slots.items():
            y, ok = labels[k], labels[k] >= 0
            if not bool(ok.any()):
                continue
            f = feats[ok, sl].float()  # (b, m, D)
            t = self.table[k]
            d = (f[:, :, None, :] - t[None, None]).pow(2).sum(-1)  # (b, m, C)
            yk = y[ok]
            ce = F.cross_entropy((-d / self.scale[k]).flatten(0, 1), yk.repeat_interleave(f.shape[1]))
            mse = (d.gather(2, yk[:, None, None].expand(-1, f.shape[1], 1)).squeeze(2)
                   / t[yk].pow(2).sum(-1, keepdim=True)).mean()
            total = total + ce + mse
            acc[k] = float((d.mean(1).argmin(-1) == yk).float().mean())
        return total, acc


def pretrain_vision(vlm, anchors: WordAnchors, cfg: "VisionTrainConfig") -> dict:
    """Stage 1: encoder, adapter and projection learn to turn pictures into their label words' embeddings."""
    params = list(vlm.vision.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.pretrain_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.pretrain_warmup, cfg.pretrain_steps, 0.1))
    bar = _bar(cfg.pretrain_steps, "stage 1: vision", cfg.progress)
    size = vlm.vision.config.image_size
    t0, losses = time.perf_counter(), []
    vlm.vision.train()
    for step in range(cfg.pretrain_steps):
        exs = make_split(cfg.seed * 2 + 1, cfg.pretrain_batch, start=step * cfg.pretrain_batch, kinds=PICTURE_KINDS)
        feats = vlm.image_features(pixel_batch(exs, size)).view(len(exs), -1, vlm.text.config.dim)
        loss, _ = anchors.loss(feats, label_batch(exs))
        _step(opt, sched, loss, params)
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    bar.close()
    vlm.vision.eval()
    for p in params:
        p.requires_grad_(False)
    secs = time.perf_counter() - t0
    return {"steps": cfg.pretrain_steps, "batch": cfg.pretrain_batch, "seconds": round(secs, 1),
            "steps_per_s": round(cfg.pretrain_steps / secs, 3), "loss_first": losses[0], "loss_last": losses[-1]}


@torch.no_grad()
def anchor_accuracy(vlm, anchors: WordAnchors, examples: list[Example]) -> dict:
    """Stage 1's own accuracy on held-out pictures: each kind on the pictures asked about it."""
    feats = vlm.image_features(pixel_batch(examples, vlm.vision.config.image_size))
    feats = feats.view(len(examples), -1, vlm.text.config.dim)
    labels = label_batch(examples)
    out = {}
    for k in CLASSES:
        rows = torch.tensor([e.kind == k for e in examples])
        _, acc = anchors.loss(feats[rows], {kk: v[rows] if kk == k else torch.full_like(v[rows], -1)
                                            for kk, v in labels.items()})
        out[k] = acc.get(k, float("nan"))
    return out


@torch.no_grad()
def calibrate_projection(vlm, examples: list[Example]) -> float:
    """Scale the projection so image embeddings start at the RMS of the text model's token embeddings."""
    emb = vlm.text.tok_embeddings.weight.float()
    target = float(emb.pow(2).mean().sqrt())
    feats = vlm.image_features(pixel_batch(examples, vlm.vision.config.image_size))
    scale = target / float(feats.float().pow(2).mean().sqrt())
    vlm.vision.vision_projection.weight.mul_(scale)
    return scale


# ---------------------------------------------------------------------------------------------------------------
# Stage 2: prompts, answers and the language-model loss

IGNORE = -100


class PromptBuilder:
    """Token ids of training rows, made exactly as inference makes prompts (herd.image_prompts.encode_with_images)."""

    def __init__(self, tokenizer, chat_format, image_ids: list[int], stop_ids):
        from herd.image_prompts import encode_with_images

        self.tok, self.fmt, self.image_ids = tokenizer, chat_format, image_ids
        self.stop_ids = frozenset(stop_ids)
        self._encode = encode_with_images
        self._prompts: dict[str, list[int]] = {}
        self._answers: dict[str, list[int]] = {}

    def prompt(self, question: str) -> list[int]:
        """ids of the chat prompt: one user message holding the image, then the question."""
        if question not in self._prompts:
            msgs = [{"role": "user", "content": [{"type": "image", "image": "unused"}, {"type": "text",
                                                                                        "text": question}]}]
            self._prompts[question] = self._encode(self.tok, self.fmt, msgs, self.image_ids)[0]
        return self._prompts[question]

    def answer(self, text: str) -> list[int]:
        """ids the model must produce for an answer: the reply and the end-of-turn token, as the template ends a
        reply (the difference of the dialog with and without it)."""
        if text not in self._answers:
            user = [{"role": "user", "content": "Q"}]
            head = self.fmt.encode_dialog(user, add_generation_prompt=True)
            full = self.fmt.encode_dialog(user + [{"role": "assistant", "content": text}], add_generation_prompt=False)
            if full[:len(head)] != head:
                raise ConfigError("the chat template's reply does not extend its generation prompt; cannot make "
                                  "training targets")
            tail = full[len(head):]
            ends = [i for i, t in enumerate(tail) if t in self.stop_ids]
            if not ends:
                raise ConfigError("the chat template ends a reply with no stop token")
            self._answers[text] = tail[:ends[0] + 1]
        return self._answers[text]

    def rows(self, examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """(B, T) inputs, right-padded; (B, T) labels (IGNORE except answer tokens); prompt length per row."""
        seqs, lens = [], []
        for e in examples:
            p, a = self.prompt(e.question), self.answer(e.answer)
            seqs.append((p, a))
            lens.append(len(p))
        T = max(len(p) + len(a) for p, a in seqs) - 1
        tokens = torch.zeros(len(seqs), T, dtype=torch.long)
        labels = torch.full((len(seqs), T), IGNORE, dtype=torch.long)
        for b, (p, a) in enumerate(seqs):
            s = p + a
            tokens[b, :len(s) - 1] = torch.tensor(s[:-1])
            labels[b, len(p) - 1:len(s) - 1] = torch.tensor(a)
        return tokens, labels, lens


class _HiddenOnly:
    """Within the block, the text model returns its final-norm hidden states (B, T, D), not logits: the output
    layer then runs on the answer positions only (it is a quarter of the model's work per position)."""

    def __init__(self, text):
        self.text = text

    def __enter__(self):
        self.head = self.text.output
        self.text.output = nn.Identity()
        return self.head

    def __exit__(self, *exc):
        self.text.output = self.head


def shared_prefix(tokens: torch.Tensor, stop_at: int) -> int:
    """Length of the prefix every row shares, at most stop_at (the position of the first image token)."""
    same = (tokens == tokens[:1]).all(0)
    n = int(same.long().cumprod(0).sum())
    return min(n, stop_at)


def hidden_states(vlm, tokens: torch.Tensor, feats: torch.Tensor, prefix: int = 0) -> torch.Tensor:
    """(B, T) inputs -> (B, T - prefix, D) hidden states of positions prefix..T-1 (inside _HiddenOnly).

    The first `prefix` tokens, the same in every row (system prompt and user header), run once for the batch into a
    KV cache that each row then attends to: the same numbers as the full rows (the test checks it), with gradients.
    """
    from herd.models.kv_cache import KVCache

    text = vlm.text
    B, T = tokens.shape
    if prefix == 0:
        return text(tokens, embeds=vlm.fuse(tokens, feats))
    one = KVCache(text.config, 1, T, dtype=text.tok_embeddings.weight.dtype)
    head = tokens[:1, :prefix]
    text(head, torch.arange(prefix)[None], one, embeds=vlm.fuse(head, None), last_only=True)
    cache = KVCache(text.config, B, T, dtype=text.tok_embeddings.weight.dtype)
    cache.k = [k.expand(B, -1, -1, -1).clone() for k in one.k]
    cache.v = [v.expand(B, -1, -1, -1).clone() for v in one.v]
    rest = tokens[:, prefix:]
    pos = torch.arange(prefix, T).expand(B, T - prefix)
    return text(rest, pos, cache, embeds=vlm.fuse(rest, feats))


def answer_logits(vlm, builder: PromptBuilder, examples: list[Example], feats: torch.Tensor | None = None,
                  share_prefix: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits (n, V) at every answer position of the batch, their targets (n,), and the row of each (n,).
    feats: the pictures' image embeddings (B * N, D) when the caller has them already."""
    tokens, labels, _ = builder.rows(examples)
    if feats is None:
        feats = vlm.image_features(pixel_batch(examples, vlm.vision.config.image_size))
    first_image = int((tokens[0] == vlm.tokens.image_start).nonzero()[0, 0])
    prefix = shared_prefix(tokens, first_image) if share_prefix else 0
    with _HiddenOnly(vlm.text) as out:
        h = hidden_states(vlm, tokens, feats, prefix)  # (B, T - prefix, D)
    lab = labels[:, prefix:]
    sel = lab != IGNORE
    rows = torch.arange(len(examples))[:, None].expand_as(lab)[sel]
    return out(h[sel]), lab[sel], rows


# ---------------------------------------------------------------------------------------------------------------
# Training configuration, schedule, progress


@dataclass
class VisionTrainConfig:
    """Everything `herd train-vision` decides; defaults are the `make vision-demo` schedule (~10 min, 2 cores)."""

    model: str | None = None  # base text model (default: the default model)
    seed: int = 0
    vision: dict = field(default_factory=dict)  # overrides of herd.models.vision_lm.SMALL_VISION
    # stage 1: vision pre-training
    pretrain_steps: int = 700
    pretrain_batch: int = 64
    pretrain_lr: float = 1e-3
    pretrain_warmup: int = 30
    # stage 2: alignment through the language model
    steps: int = 160
    batch: int = 8
    lr: float = 1e-3  # projection, markers, LoRA
    vision_lr: float = 3e-4  # encoder and adapter (already pre-trained)
    warmup: int = 15
    anchor_weight: float = 0.5  # stage 1's loss, kept on during stage 2
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: str = "wq,wk,wv,wo,w1,w2,w3"
    # evaluation
    eval_per_kind: int = 100
    eval_held_out_rate: float = 0.5  # share of evaluation questions in phrasings training never shows
    eval_batch: int = 32
    threads: int | None = None
    progress: bool = True

    def checked(self) -> "VisionTrainConfig":
        for name in ("pretrain_batch", "steps", "batch", "lora_rank", "eval_per_kind", "eval_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.pretrain_steps < 0:
            raise ConfigError(f"pretrain_steps must be >= 0, got {self.pretrain_steps}")
        if not 0 <= self.eval_held_out_rate <= 1:
            raise ConfigError(f"eval_held_out_rate must be in [0, 1], got {self.eval_held_out_rate}")
        return self


def _step(opt, sched, loss: torch.Tensor, params) -> None:
    """One optimizer step of either training stage: backward, gradients clipped to norm 1, step, schedule."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()


def _bar(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, file=sys.stderr, dynamic_ncols=True,
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]")


# ---------------------------------------------------------------------------------------------------------------
# Evaluation


@torch.inference_mode()
def evaluate(vlm, builder: PromptBuilder, examples: list[Example], batch: int = 32,
             progress: bool = False) -> dict:
    """Exact-answer accuracy per question kind: an answer is right when greedy decoding gives exactly its tokens
    and then the end-of-turn token (read from one forward: every answer position's argmax is its target)."""
    right: dict[str, list[int]] = {}
    held: dict[str, list[int]] = {}
    bar = _bar(len(examples), "evaluating", progress)
    for i in range(0, len(examples), batch):
        chunk = examples[i:i + batch]
        logits, target, rows = answer_logits(vlm, builder, chunk)
        wrong = torch.zeros(len(chunk)).index_add_(0, rows, (logits.argmax(-1) != target).float())
        for e, good in zip(chunk, (wrong == 0).tolist()):
            right.setdefault(e.kind, []).append(int(good))
            if e.held_out_phrasing:
                held.setdefault(e.kind, []).append(int(good))
        bar.update(len(chunk))
    bar.close()
    acc = {k: sum(v) / len(v) for k, v in right.items()}
    return {"accuracy": acc, "held_out_phrasing": {k: sum(v) / len(v) for k, v in held.items()},
            "n": {k: len(v) for k, v in right.items()}}


def eval_split(cfg: VisionTrainConfig) -> list[Example]:
    """The held-out pictures: another seed than training, eval_per_kind of each kind."""
    seed = 10_000 + cfg.seed
    return [make_example(seed, i * len(KINDS) + j, kind=k, held_out_rate=cfg.eval_held_out_rate)
            for i in range(cfg.eval_per_kind) for j, k in enumerate(KINDS)]


# ---------------------------------------------------------------------------------------------------------------
# The whole run


def align(vlm, builder: PromptBuilder, anchors: WordAnchors, cfg: VisionTrainConfig) -> dict:
    """Stage 2: every trainable part together, by the answer tokens' cross-entropy through the text model, plus
    stage 1's anchor loss on the same pictures (weight cfg.anchor_weight), which keeps the image embeddings
    word-like while the noisier language-model gradient moves the encoder."""
    from herd.models.lora import lora_modules

    emb = vlm.vision.vision_embeddings
    lora = [p for m in lora_modules(vlm.text).values() for p in (m.lora_A.weight, m.lora_B.weight)]
    groups = [{"params": list(emb.parameters()), "lr": cfg.vision_lr},
              {"params": [vlm.vision.vision_projection.weight, vlm.marker_embeddings] + lora, "lr": cfg.lr}]
    params = [p for g in groups for p in g["params"]]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.warmup, cfg.steps, 0.1))
    bar = _bar(cfg.steps, "stage 2: align", cfg.progress)
    t0, losses = time.perf_counter(), []
    vlm.train()
    for step in range(cfg.steps):
        exs = make_split(cfg.seed * 2 + 2, cfg.batch, start=step * cfg.batch)
        feats = vlm.image_features(pixel_batch(exs, vlm.vision.config.image_size))
        logits, target, _ = answer_logits(vlm, builder, exs, feats)
        lm_loss = F.cross_entropy(logits.float(), target)
        loss = lm_loss
        if cfg.anchor_weight:
            aux, _ = anchors.loss(feats.view(len(exs), -1, feats.shape[-1]), label_batch(exs))
            loss = loss + cfg.anchor_weight * aux
        _step(opt, sched, loss, params)
        losses.append(lm_loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    bar.close()
    vlm.eval()
    for p in params:
        p.requires_grad_(False)
    secs = time.perf_counter() - t0
    return {"steps": cfg.steps, "batch": cfg.batch, "seconds": round(secs, 1),
            "steps_per_s": round(cfg.steps / secs, 4), "loss_first": losses[0], "loss_last": losses[-1],
            "loss_curve": [round(sum(losses[i:i + 10]) / len(losses[i:i + 10]), 4) for i in range(0, len(losses), 10)]}


def fit_vision(llm, cfg: VisionTrainConfig):
    """Build and train a vision model over llm's text model (LoRA is added to it); -> (VisionLM, VisionSpec) whose
    spec.training holds the summary: timings, steps/s, losses, held-out accuracy."""
    from herd.formats.vision_ckpt import VisionSpec
    from herd.models.vision_lm import SMALL_VISION, build_vision_lm, choose_image_tokens, embedding_probe
    from herd.models.lora import apply_lora

    cfg = cfg.checked()
    t_start = time.perf_counter()
    if llm.chat_format is None:
        raise ConfigError(f"{llm.source}: the model has no chat format; a vision model needs one to place images")
    try:
        vision = dataclasses.replace(SMALL_VISION, **cfg.vision)
    except TypeError as e:
        raise ConfigError(f"vision overrides: {e}") from None
    tokens = choose_image_tokens(llm.tokenizer)
    vlm = build_vision_lm(llm.model, tokens, vision, seed=cfg.seed)
    summary: dict = {"config": dataclasses.asdict(cfg), "threads": torch.get_num_threads()}
    summary["projection_scale"] = calibrate_projection(vlm, make_split(cfg.seed * 2 + 1, 64, start=10 ** 7))
    anchors = WordAnchors(llm.tokenizer, llm.model, vision.tokens_per_tile)
    summary["stage1"] = pretrain_vision(vlm, anchors, cfg) if cfg.pretrain_steps else {"steps": 0}
    apply_lora(llm.model, rank=cfg.lora_rank, alpha=cfg.lora_alpha, targets=cfg.lora_targets, seed=cfg.seed)
    builder = PromptBuilder(llm.tokenizer, llm.chat_format, tokens.for_image(vision.tokens_per_tile), llm.stop_ids)
    summary["stage2"] = align(vlm, builder, anchors, cfg)
    t_eval = time.perf_counter()
    summary.update(evaluate(vlm, builder, eval_split(cfg), cfg.eval_batch, cfg.progress),
                   eval_seconds=round(time.perf_counter() - t_eval, 1),
                   train_seconds=round(t_eval - t_start, 1))
    spec = VisionSpec(vision, tokens, llm.config.dim, llm.config.n_layers, llm.config.vocab_size,
                      embedding_probe(llm.model), base=str(cfg.model or llm.source), training=summary)
    return vlm, spec


def train_vision(out: str | Path | None = None, config: VisionTrainConfig | None = None, *, llm=None,
                 **overrides) -> dict:
    """`herd train-vision`: load the base model, fit_vision, save to `out` (default:
    herd.hub.default_vision_dir()); returns the summary that vision_config.json also records."""
    from herd.formats.vision_ckpt import save_vision
    from herd.hub import default_vision_dir

    cfg = dataclasses.replace(config or VisionTrainConfig(), **overrides).checked()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    if llm is None:
        from herd.api import load

        llm = load(cfg.model, "float32")
        if cfg.model is None:
            cfg = dataclasses.replace(cfg, model="smollm2-135m-instruct")
    vlm, spec = fit_vision(llm, cfg)
    spec.training["total_seconds"] = round(time.perf_counter() - t0, 1)  # model loading included
    folder = Path(out) if out is not None else default_vision_dir(cfg.model)
    save_vision(vlm, spec, folder)
    return dict(spec.training, out=str(folder))

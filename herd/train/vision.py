"""`herd train-vision`: teach the default text model to see, on a generated image-question data set.

The data: pictures drawn with Pillow (white-ish background; circles, squares, triangles, stars and crosses in six
colours), each with one question and a one-word answer of four kinds: the colour or the shape of the single object,
where it is (left, right, top, bottom, center), and how many objects there are (1 to 4). Example i of a split is a
pure function of (seed, i), so every split is reproducible; the held-out split uses other seeds, and part of its
questions use phrasings that training never shows.

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
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from herd.errors import ConfigError

# ---------------------------------------------------------------------------------------------------------------
# Data: pictures and questions

SHAPES = ("circle", "square", "triangle", "star", "cross")
COLOURS = {  # name -> RGB; each picture jitters every channel by up to +-COLOUR_JITTER
    "red": (215, 35, 35), "green": (35, 155, 55), "blue": (35, 75, 215),
    "yellow": (235, 200, 25), "purple": (135, 55, 185), "orange": (240, 125, 20),
}
COLOUR_JITTER = 18
POSITIONS = {  # name -> (x, y) centre as a fraction of the side
    "left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73), "center": (0.5, 0.5),
}
MAX_COUNT = 4
KINDS = ("colour", "shape", "position", "count")

# Training phrasings (questions and imperatives, so that the attribute word, not the sentence form, tells the kind);
# HELD_OUT phrasings appear only in evaluation (they test the language side, not the eyes).
TEMPLATES = {
    "colour": ["What colour is the shape?", "What color is the object in the picture?", "Which colour is the shape?",
               "What is the color of the shape in this image?", "Name the colour of the shape.",
               "Tell me the color of the object.", "Identify the colour of the object in this image.",
               "Say which colour the shape has."],
    "shape": ["What shape is this?", "Which shape is shown in the picture?", "What kind of shape is in the image?",
              "What is the shape in this picture?", "Name the shape.", "Tell me which shape you see.",
              "Identify the shape in the image.", "What shape is drawn here?"],
    "position": ["Where is the shape?", "Where is the object in the picture?", "In which part of the image is the "
                 "shape?", "Where is the shape located?", "Tell me where the object is.",
                 "Name the position of the shape.", "Identify where the shape is in the image.",
                 "Which part of the picture holds the object?"],
    "count": ["How many shapes are there?", "How many objects are in the picture?", "Count the shapes in the image.",
              "What is the number of shapes in this picture?", "Tell me how many objects there are.",
              "Name the number of shapes.", "Identify how many shapes are drawn.", "How many shapes do you see?"],
}
HELD_OUT = {
    "colour": ["Tell me the colour of the object you see.", "Which color has been used for the shape?"],
    "shape": ["Name the shape drawn in this image.", "What sort of shape can you see?"],
    "position": ["Which side of the picture is the object on?", "Where can the shape be found?"],
    "count": ["How many things can you see in this image?", "Give the number of objects in the picture."],
}


@dataclass
class Example:
    """One picture, its question and answer, and the labels behind them."""

    image: object  # PIL.Image.Image, RGB, CANVAS x CANVAS
    kind: str  # colour | shape | position | count
    question: str
    answer: str
    held_out_phrasing: bool
    objects: list[dict] = field(default_factory=list)  # [{shape, colour, x, y, r}] in canvas pixels

    def labels(self) -> dict[str, int]:
        """Class indices for the pre-training heads; -1 where a picture has no such label (several objects)."""
        n = len(self.objects)
        one = self.objects[0] if n == 1 else None
        pos = _region(one["x"], one["y"]) if one else None
        return {"count": n - 1,
                "colour": list(COLOURS).index(one["colour"]) if one else -1,
                "shape": SHAPES.index(one["shape"]) if one else -1,
                "position": list(POSITIONS).index(pos) if pos else -1}


CANVAS = 128  # pictures are drawn at 128 px; preprocessing resizes them to the encoder's tile (64 px)


def _region(x: float, y: float) -> str | None:
    """The POSITIONS name of a centre (canvas pixels), or None if it is not near any."""
    for name, (fx, fy) in POSITIONS.items():
        if abs(x - fx * CANVAS) <= 0.1 * CANVAS and abs(y - fy * CANVAS) <= 0.1 * CANVAS:
            return name
    return None


def shape_points(shape: str, x: float, y: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Polygon vertices of a shape of 'radius' r centred at (x, y), rotated by angle (radians)."""
    def ring(n, radii, start):
        return [(x + radii[i % len(radii)] * math.cos(start + 2 * math.pi * i / n),
                 y + radii[i % len(radii)] * math.sin(start + 2 * math.pi * i / n)) for i in range(n)]
    if shape == "square":
        return ring(4, [r], math.pi / 4 + angle)
    if shape == "triangle":
        return ring(3, [1.15 * r], -math.pi / 2 + angle)
    if shape == "star":
        return ring(10, [1.15 * r, 0.48 * r], -math.pi / 2 + angle)
    if shape == "cross":  # a plus sign of arm width 0.6 r
        w = 0.3 * r
        pts = [(w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w),
               (-w, -r)]
        c, s = math.cos(angle), math.sin(angle)
        return [(x + px * c - py * s, y + px * s + py * c) for px, py in pts]
    raise ConfigError(f"unknown shape {shape!r} (expected one of {', '.join(SHAPES)})")


def draw(objects: list[dict], background: tuple[int, int, int], rng: random.Random):
    """A CANVAS x CANVAS RGB picture of the objects on a plain background."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (CANVAS, CANVAS), background)
    d = ImageDraw.Draw(img)
    for o in objects:
        rgb = tuple(max(0, min(255, c + rng.randint(-COLOUR_JITTER, COLOUR_JITTER))) for c in COLOURS[o["colour"]])
        if o["shape"] == "circle":
            d.ellipse([o["x"] - o["r"], o["y"] - o["r"], o["x"] + o["r"], o["y"] + o["r"]], fill=rgb)
        else:
            d.polygon(shape_points(o["shape"], o["x"], o["y"], o["r"], o["angle"]), fill=rgb)
    return img


def _place(rng: random.Random, n: int) -> list[tuple[float, float, float]]:
    """n non-overlapping (x, y, r) with a gap between objects, all inside the canvas."""
    while True:
        out = []
        for _ in range(200):
            r = rng.uniform(0.1, 0.14) * CANVAS
            m = 1.15 * r + 2  # triangles and stars reach 1.15 r from their centre
            x, y = rng.uniform(m, CANVAS - m), rng.uniform(m, CANVAS - m)
            if all(math.hypot(x - a, y - b) > 1.15 * (r + c) + 0.04 * CANVAS for a, b, c in out):
                out.append((x, y, r))
                if len(out) == n:
                    return out
        # rare: ran out of tries for this layout; start over with fresh sizes


def make_example(seed: int, index: int, kind: str | None = None, held_out_rate: float = 0.0) -> Example:
    """Example `index` of the split `seed`: a pure function of its arguments."""
    rng = random.Random(f"herd-vision/{seed}/{index}")  # str seeds hash with SHA-512: stable across runs
    kind = kind or KINDS[index % len(KINDS)]
    if kind not in KINDS:
        raise ConfigError(f"unknown question kind {kind!r} (expected one of {', '.join(KINDS)})")
    grey = rng.randint(228, 255)
    background = tuple(max(0, min(255, grey + rng.randint(-8, 8))) for _ in range(3))
    if kind == "count":
        n = rng.randint(1, MAX_COUNT)
        spots = _place(rng, n)
    else:
        pos = rng.choice(list(POSITIONS))
        fx, fy = POSITIONS[pos]
        r = rng.uniform(0.15, 0.2) * CANVAS
        j = 0.04 * CANVAS
        spots = [(fx * CANVAS + rng.uniform(-j, j), fy * CANVAS + rng.uniform(-j, j), r)]
    objects = [{"shape": rng.choice(SHAPES), "colour": rng.choice(list(COLOURS)), "x": x, "y": y, "r": r,
                "angle": rng.uniform(-0.35, 0.35)} for x, y, r in spots]
    held = rng.random() < held_out_rate
    question = rng.choice(HELD_OUT[kind] if held else TEMPLATES[kind])
    one = objects[0]
    answer = {"colour": one["colour"], "shape": one["shape"], "count": str(len(objects)),
              "position": _region(one["x"], one["y"]) or ""}[kind]
    return Example(draw(objects, background, rng), kind, question, answer, held, objects)


def make_split(seed: int, n: int, held_out_rate: float = 0.0, start: int = 0, kinds=KINDS) -> list[Example]:
    """Examples start .. start+n-1 of split `seed`, the given kinds in turn."""
    return [make_example(seed, i, kinds[i % len(kinds)], held_out_rate) for i in range(start, start + n)]


# Stage 1 sees the two kinds of picture equally: one object (which has all four labels) and 1-4 objects (count).
PICTURE_KINDS = ("colour", "count")


def normalize_answer(text: str) -> str:
    """What exact-answer accuracy compares: lower case, no surrounding blanks or final punctuation."""
    return text.strip().lower().rstrip(".!").strip()


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
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.pretrain_steps, cfg.pretrain_warmup))
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


def warmup_cosine(total: int, warmup: int, floor: float = 0.1):
    """LR multiplier: linear warm-up, then cosine down to `floor`."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return f


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
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.steps, cfg.warmup))
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

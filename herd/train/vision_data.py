"""The generated image-question data of `herd train-vision`: pictures drawn with Pillow (white-ish background; circles,
squares, triangles, stars and crosses in six colours), each with one question and a one-word answer of four kinds:
the colour or the shape of the single object, where it is (left, right, top, bottom, center), and how many objects
there are (1 to 4). Example i of a split is a pure function of (seed, i), so every split is reproducible; the
held-out split uses other seeds, and part of its questions use phrasings that training never shows.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from herd.errors import ConfigError

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



"""Images in: safe loading (path, bytes, data: URL) and the pixel preprocessing of Llama 3.2 Vision and Llama 4.

Loading bounds the decoded size before any pixel is decoded, verifies that the whole file decodes (truncated files are
an error, never a silently grey image) and converts every supported mode to 8-bit RGB, compositing alpha on white
(as transformers' convert_to_rgb does).

Preprocessing (SPEC.md §5, §6) follows the checkpoint's own image-processor settings (ImageProcessing, read from
preprocessor_config.json or processor_config.json by herd/formats/mllama.py); the defaults are the released models':
* Llama 3.2 Vision (Mllama): best-fit canvas of at most `max_tiles` tiles, resize without distortion with a Pillow
  filter (bilinear), zero padding right/bottom, rescale (1/255), normalize (CLIP mean/std), row-major tiles; the same
  numbers as transformers' MllamaImageProcessor (its Pillow backend) and Meta's VariableSizeImageTransform.
* Llama 4: best-fit canvas of at most 16 tiles (upscaling limited to one tile edge), antialiased bilinear resize of a
  uint8 tensor (torch's kernel, which torchvision calls), zero padding, rescale and normalize in bfloat16 (mean = std
  = 0.5), and a whole-image "global" tile appended when there is more than one tile; as transformers'
  Llama4ImageProcessor.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from herd.errors import FormatError

# A decoded RGB image of this many pixels takes 3 bytes each: 64 Mpx is 192 MB, far beyond any tile canvas.
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024
MAX_FILE_BYTES = 64 * 1024 * 1024

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Pillow's resampling filters by the numbers transformers writes as `resample` (PILImageResampling's values)
PIL_FILTERS = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


@dataclass(frozen=True)
class ImageProcessing:
    """The pixel settings of a vision checkpoint: its image processor's, or the released models' defaults."""

    tile_size: int  # tile edge in pixels (`size`)
    max_tiles: int  # tiles per image at most (Mllama `max_image_tiles`, Llama 4 `max_patches`)
    mean: tuple[float, ...]  # per channel (`image_mean`), used when normalize
    std: tuple[float, ...]  # per channel (`image_std`)
    resample: int = 2  # a PIL_FILTERS number; Llama 4 takes bilinear only
    rescale: bool = True  # multiply the 0..255 values by rescale_factor (`do_rescale`)
    rescale_factor: float = 1 / 255
    normalize: bool = True  # (x - mean) / std (`do_normalize`)
    convert_rgb: bool = True  # other modes converted to RGB (`do_convert_rgb`); when False they are refused
    resize_to_max_canvas: bool = False  # Llama 4: the largest canvas instead of the least upscaling
    source: str = "defaults"  # where the settings come from, for the error messages


MLLAMA_PROCESSING = ImageProcessing(560, 4, CLIP_MEAN, CLIP_STD)
LLAMA4_PROCESSING = ImageProcessing(336, 16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

# Pillow modes that convert to RGB without losing meaning; 16/32-bit integer and float modes do not (their values
# are clipped to 0..255 by Pillow), so they are refused with a message naming the mode.
_RGB_MODES = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}


# ---------------------------------------------------------------------------------------------------------------
# Loading


def _source_bytes(source, what: str) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, str) and source.startswith("data:"):
        header, sep, payload = source.partition(",")
        if not sep:
            raise FormatError(f"{what}: a data: URL needs a comma before its payload")
        if not header.endswith(";base64"):
            raise FormatError(f"{what}: only base64 data: URLs are supported, got header {header[:40]!r}")
        if len(payload) > MAX_FILE_BYTES * 4 // 3 + 4:
            raise FormatError(f"{what}: data: URL payload larger than {MAX_FILE_BYTES} bytes")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise FormatError(f"{what}: data: URL is not valid base64 ({e})") from None
    path = Path(source)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise FormatError(f"{path}: image file not found") from None
    except OSError as e:
        raise FormatError(f"{path}: cannot be read ({e})") from None
    if not path.is_file():
        raise FormatError(f"{path}: not a file")
    if size > MAX_FILE_BYTES:
        raise FormatError(f"{path}: {size} bytes, more than the {MAX_FILE_BYTES}-byte limit for an image file")
    return path.read_bytes()


def to_rgb(image, what: str = "image"):
    """A Pillow image of a supported mode -> 8-bit RGB; alpha (or palette transparency) is composited on white."""
    from PIL import Image

    if image.mode not in _RGB_MODES:
        raise FormatError(f"{what}: image mode {image.mode!r} is not supported (expected 8-bit modes such as RGB, "
                          f"RGBA, L, LA, P, CMYK); convert it to 8-bit RGB first")
    if "A" in image.getbands() or "a" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _load_strict(image) -> None:
    """image.load() with truncated data an error, whatever another library set globally (Meta's llama4
    preprocess module turns ImageFile.LOAD_TRUNCATED_IMAGES on at import)."""
    from PIL import ImageFile

    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        image.load()
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _rgb(image, what: str, convert: bool):
    if convert:
        return to_rgb(image, what)
    if image.mode != "RGB":  # unconverted, a 1- or 4-channel array would reach a 3-channel model
        raise FormatError(f"{what}: image mode {image.mode!r}, and the checkpoint's image processor says "
                          f"do_convert_rgb: false, so only RGB images are taken; convert the image to RGB first")
    return image


def load_image(source, max_pixels: int = DEFAULT_MAX_PIXELS, convert_rgb: bool = True):
    """Path, bytes or base64 data: URL (or a Pillow image) -> 8-bit RGB Pillow image; FormatError when it is not a
    complete image, is larger than max_pixels, or has a mode herd cannot convert (any mode but RGB when
    convert_rgb is False)."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, Image.Image):
        what = "image"
        w, h = source.size
        if w * h > max_pixels:
            raise FormatError(f"{what}: {w}x{h} pixels, more than the limit of {max_pixels}")
        return _rgb(source, what, convert_rgb)
    what = "image bytes" if isinstance(source, (bytes, bytearray, memoryview)) else (
        "data: URL" if isinstance(source, str) and source.startswith("data:") else str(source))
    data = _source_bytes(source, what)
    if not data:
        raise FormatError(f"{what}: empty, not an image")
    try:
        with warnings.catch_warnings():
            # Pillow warns (then errors) on "decompression bombs"; herd applies its own bound below, first.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            w, h = image.size
            if w <= 0 or h <= 0:
                raise FormatError(f"{what}: image has no pixels ({w}x{h})")
            if w * h > max_pixels:
                raise FormatError(f"{what}: {w}x{h} pixels ({w * h}), more than the limit of {max_pixels}")
            if getattr(image, "n_frames", 1) > 1:
                image.seek(0)  # animated images: the first frame
            _load_strict(image)  # decode every byte now: truncated data raises here
    except FormatError:
        raise
    except UnidentifiedImageError:
        raise FormatError(f"{what}: not an image Pillow can identify ({len(data)} bytes, starting {data[:8]!r})") \
            from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise FormatError(f"{what}: image too large, more than the limit of {max_pixels} pixels ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise FormatError(f"{what}: image data is truncated or corrupt ({e})") from None
    return _rgb(image, what, convert_rgb)


# ---------------------------------------------------------------------------------------------------------------
# Llama 3.2 Vision (Mllama)


def mllama_aspect_ratios(max_tiles: int) -> list[tuple[int, int]]:
    """Tile grids (rows, cols) with rows*cols <= max_tiles, in the order whose 1-based index is the aspect_ratio_id."""
    return [(r, c) for r in range(1, max_tiles + 1) for c in range(1, max_tiles + 1) if r * c <= max_tiles]


def mllama_canvas(height: int, width: int, tile: int, max_tiles: int) -> tuple[int, int]:
    """Best-fit canvas (rows, cols): the smallest scale >= 1 if any canvas allows upscaling, else the largest scale
    below 1; ties go to the smallest area (first in aspect-ratio order)."""
    grids = mllama_aspect_ratios(max_tiles)
    scales = [min(c * tile / width, r * tile / height) for r, c in grids]  # float64, as numpy computes them
    up = [s for s in scales if s >= 1]
    chosen = min(up) if up else max(s for s in scales if s < 1)
    best = None
    for (r, c), s in zip(grids, scales):
        if s == chosen and (best is None or r * c < best[0] * best[1]):
            best = (r, c)
    return best


def mllama_resized_size(height: int, width: int, canvas_h: int, canvas_w: int, tile: int) -> tuple[int, int]:
    """Size (h, w) inside the canvas keeping the aspect ratio; never below one tile edge on the limiting side."""
    target_w = min(max(width, tile), canvas_w)
    target_h = min(max(height, tile), canvas_h)
    scale_h, scale_w = target_h / height, target_w / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, target_h), target_w
    return target_h, min(math.floor(width * scale_h) or 1, target_w)


@dataclass
class MllamaImages:
    """Preprocessed images of one prompt, in the layout the Mllama vision encoder takes."""

    pixel_values: torch.Tensor  # (N, max_tiles, 3, T, T) float32, padding tiles zero
    aspect_ratio_ids: torch.Tensor  # (N,) int64, 1-based index into mllama_aspect_ratios
    aspect_ratio_mask: torch.Tensor  # (N, max_tiles) int64, 1 for real tiles
    num_tiles: list[int]  # tiles per image
    aspect_ratios: list[tuple[int, int]]  # (rows, cols) per image


def mllama_preprocess(images, tile_size: int = 560, max_tiles: int = 4, mean=CLIP_MEAN, std=CLIP_STD,
                      processing: ImageProcessing | None = None) -> MllamaImages:
    """Sources (anything load_image takes) -> MllamaImages, equal to transformers' MllamaImageProcessor output
    (Pillow backend). `processing` (a checkpoint's settings) replaces tile_size, max_tiles, mean and std."""
    from PIL import Image

    p = processing or ImageProcessing(tile_size, max_tiles, tuple(mean), tuple(std))
    tile_size, max_tiles = p.tile_size, p.max_tiles
    if not isinstance(images, (list, tuple)):
        images = [images]
    if not images:
        raise FormatError("mllama_preprocess needs at least one image")
    grids = mllama_aspect_ratios(max_tiles)
    mean_t = torch.tensor(p.mean, dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.tensor(p.std, dtype=torch.float32).view(-1, 1, 1)
    pixels = torch.zeros(len(images), max_tiles, 3, tile_size, tile_size)
    ids = torch.zeros(len(images), dtype=torch.int64)
    mask = torch.zeros(len(images), max_tiles, dtype=torch.int64)
    mask[:, 0] = 1
    num_tiles, ratios = [], []
    for n, src in enumerate(images):
        img = load_image(src, convert_rgb=p.convert_rgb)
        w, h = img.size
        rows, cols = mllama_canvas(h, w, tile_size, max_tiles)
        new_h, new_w = mllama_resized_size(h, w, rows * tile_size, cols * tile_size, tile_size)
        img = img.resize((new_w, new_h), resample=Image.Resampling(p.resample))
        canvas = torch.zeros(3, rows * tile_size, cols * tile_size, dtype=torch.uint8)
        canvas[:, :new_h, :new_w] = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
        # rescale in float64 then round to float32, normalize in float32: the same operations as transformers
        # (without rescale, the 0..255 values are cast to float32 first, as its normalize does)
        x = (canvas.double() * p.rescale_factor).float() if p.rescale else canvas.float()
        if p.normalize:
            x = (x - mean_t) / std_t
        tiles = x.view(3, rows, tile_size, cols, tile_size).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, tile_size,
                                                                                          tile_size)
        pixels[n, :rows * cols] = tiles
        ids[n] = grids.index((rows, cols)) + 1
        mask[n, :rows * cols] = 1
        num_tiles.append(rows * cols)
        ratios.append((rows, cols))
    return MllamaImages(pixels, ids, mask, num_tiles, ratios)


# ---------------------------------------------------------------------------------------------------------------
# Llama 4


def llama4_resolutions(max_tiles: int, tile: int) -> list[tuple[int, int]]:
    """Canvas sizes (h, w) of every grid of at most max_tiles tiles, grouped by aspect ratio (the reference order)."""
    by_ratio: dict[float, list[tuple[int, int]]] = defaultdict(list)
    for n in range(max_tiles, 0, -1):
        factors = sorted({d for i in range(1, int(n ** 0.5) + 1) if n % i == 0 for d in (i, n // i)})
        for f in factors:
            by_ratio[f / (n // f)].append((f, n // f))
    return [(r * tile, c * tile) for grids in by_ratio.values() for r, c in grids]


def llama4_canvas(height: int, width: int, tile: int, max_tiles: int, to_max: bool = False) -> tuple[int, int]:
    """Best-fit canvas (h, w) in pixels: the least upscaling (the largest when to_max, transformers'
    resize_to_max_canvas), else the least downscaling; scales in float32 as the reference computes them on tensors."""
    res = torch.tensor(llama4_resolutions(max_tiles, tile))
    scale_h, scale_w = res[:, 0] / height, res[:, 1] / width
    scales = torch.where(scale_h > scale_w, scale_w, scale_h)
    up = scales[scales >= 1]
    chosen = (up.max() if to_max else up.min()) if len(up) else scales[scales < 1].max()
    candidates = res[scales == chosen]
    best = candidates[torch.argmin(candidates[:, 0] * candidates[:, 1])]
    return int(best[0]), int(best[1])


def _fit_without_distortion(h: int, w: int, target_h: int, target_w: int) -> tuple[int, int]:
    scale_w, scale_h = target_w / w, target_h / h
    if scale_w < scale_h:
        return min(math.floor(h * scale_w), target_h), target_w
    return target_h, min(math.floor(w * scale_h), target_w)


def _resize_uint8(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(3, H, W) uint8 -> (3, h, w) uint8, antialiased bilinear: the kernel torchvision's resize runs on CPU."""
    if tuple(x.shape[-2:]) == (h, w):
        return x
    return F.interpolate(x[None].contiguous(), size=[h, w], mode="bilinear", align_corners=False,
                         antialias=True)[0]


def _llama4_rescale_normalize(x: torch.Tensor, p: ImageProcessing) -> torch.Tensor:
    """uint8 (…, 3, H, W) -> pixel values. Rescale and normalize together run in bfloat16 (as Meta's original code
    and transformers' Llama4ImageProcessor do); rescale alone in float32, as its `images * rescale_factor`."""
    if p.rescale and p.normalize:
        x = x.to(torch.bfloat16) * p.rescale_factor
        mean = torch.tensor(p.mean, dtype=torch.bfloat16).view(-1, 1, 1)
        std = torch.tensor(p.std, dtype=torch.bfloat16).view(-1, 1, 1)
        return (x - mean) / std
    if p.rescale:
        return x * p.rescale_factor
    raise FormatError(f"{p.source}: do_rescale {p.rescale}, do_normalize {p.normalize}: herd takes Llama 4 pixels "
                      f"rescaled (normalized or not); transformers' normalize refuses the 0..255 integers")


@dataclass
class Llama4Images:
    """Preprocessed images of one prompt for the Llama 4 vision encoder."""

    pixel_values: torch.Tensor  # (total tiles, 3, T, T) bfloat16; per image its grid tiles, then its global tile
    aspect_ratios: list[tuple[int, int]]  # (rows, cols) per image
    tiles_per_image: list[int]  # rows*cols, plus 1 for the global tile when rows*cols > 1


def llama4_preprocess(images, tile_size: int = 336, max_tiles: int = 16,
                      processing: ImageProcessing | None = None) -> Llama4Images:
    """Sources -> Llama4Images, as transformers' Llama4ImageProcessor. `processing` (a checkpoint's settings)
    replaces tile_size and max_tiles; without it mean = std = 0.5, bilinear, no resize_to_max_canvas."""
    p = processing or ImageProcessing(tile_size, max_tiles, LLAMA4_PROCESSING.mean, LLAMA4_PROCESSING.std)
    tile_size, max_tiles = p.tile_size, p.max_tiles
    if p.resample != 2:
        raise FormatError(f"{p.source}: resample {p.resample} ({PIL_FILTERS.get(p.resample, '?')}): herd resizes "
                          f"Llama 4 images with the bilinear filter (2) only")
    if not isinstance(images, (list, tuple)):
        images = [images]
    if not images:
        raise FormatError("llama4_preprocess needs at least one image")
    out, ratios, counts = [], [], []
    for src in images:
        img = load_image(src, convert_rgb=p.convert_rgb)
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()  # (3, H, W)
        h, w = x.shape[-2:]
        canvas_h, canvas_w = llama4_canvas(h, w, tile_size, max_tiles, to_max=p.resize_to_max_canvas)
        if p.resize_to_max_canvas:
            limit_h, limit_w = canvas_h, canvas_w
        else:  # upscale at most to one tile edge: a small image stays small on its canvas
            limit_h, limit_w = min(max(h, tile_size), canvas_h), min(max(w, tile_size), canvas_w)
        new_h, new_w = _fit_without_distortion(h, w, limit_h, limit_w)
        resized = _resize_uint8(x, max(new_h, 1), max(new_w, 1))
        canvas = F.pad(resized, (0, canvas_w - resized.shape[-1], 0, canvas_h - resized.shape[-2]))
        canvas = _llama4_rescale_normalize(canvas, p)
        rows, cols = canvas_h // tile_size, canvas_w // tile_size
        tiles = canvas.view(3, rows, tile_size, cols, tile_size).permute(1, 3, 0, 2, 4).reshape(
            rows * cols, 3, tile_size, tile_size)
        if rows * cols > 1:
            glob = _llama4_rescale_normalize(_resize_uint8(x, tile_size, tile_size), p)
            tiles = torch.cat([tiles, glob[None]])
        out.append(tiles)
        ratios.append((rows, cols))
        counts.append(tiles.shape[0])
    return Llama4Images(torch.cat(out), ratios, counts)

"""Image loading (bad inputs give clear errors, with a bound on decoded size) and Mllama preprocessing against
transformers' MllamaImageProcessor on generated images of many sizes and aspect ratios."""

import base64
import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from herd.errors import FormatError
from herd.images import CLIP_MEAN, CLIP_STD, load_image, mllama_canvas, mllama_preprocess


def _png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _random_image(h, w, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": None, "LA": 2}[mode]
    shape = (h, w) if channels is None else (h, w, channels)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


# ---------------------------------------------------------------------------------------------------------------
# Loading


def test_path_bytes_and_data_url_give_the_same_pixels(tmp_path):
    img = _random_image(17, 23)
    data = _png_bytes(img)
    (tmp_path / "a.png").write_bytes(data)
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    for src in (tmp_path / "a.png", str(tmp_path / "a.png"), data, url, img):
        out = load_image(src)
        assert out.mode == "RGB" and np.array_equal(np.asarray(out), np.asarray(img))


def test_modes_convert_like_transformers():
    from transformers.image_transforms import convert_to_rgb

    rgba = _random_image(9, 11, "RGBA", seed=1)
    la = _random_image(9, 11, "LA", seed=2)
    gray = _random_image(9, 11, "L", seed=3)
    pal = gray.convert("P")
    pal.info["transparency"] = 5
    cmyk = _random_image(9, 11).convert("CMYK")
    one = gray.convert("1")
    for img in (rgba, la, gray, pal, cmyk, one):
        want = convert_to_rgb(img, return_numpy=True)
        assert np.array_equal(np.asarray(load_image(img)), want), img.mode
    # fully transparent pixels become white, opaque ones keep their colour
    rgba_arr = np.zeros((2, 2, 4), np.uint8)
    rgba_arr[0, 0] = (10, 20, 30, 255)
    out = np.asarray(load_image(Image.fromarray(rgba_arr, "RGBA")))
    assert tuple(out[0, 0]) == (10, 20, 30) and tuple(out[1, 1]) == (255, 255, 255)


def test_not_an_image(tmp_path):
    with pytest.raises(FormatError, match="not an image Pillow can identify"):
        load_image(b"this is plain text, not a picture")
    with pytest.raises(FormatError, match="empty"):
        load_image(b"")
    with pytest.raises(FormatError, match="not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(FormatError, match="not a file"):
        load_image(tmp_path)
    with pytest.raises(FormatError, match="not valid base64"):
        load_image("data:image/png;base64,@@@")
    with pytest.raises(FormatError, match="only base64"):
        load_image("data:image/png,abc")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files_are_errors(fmt):
    buf = io.BytesIO()
    _random_image(64, 64).save(buf, format=fmt)
    data = buf.getvalue()
    with pytest.raises(FormatError, match="truncated or corrupt"):
        load_image(data[: len(data) * 2 // 3])


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, with a tiny (invalid) body: nothing may decode it."""
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_enormous_dimensions_are_refused_before_decoding():
    with pytest.raises(FormatError, match=r"more than the limit.*10000000000 pixels"):
        load_image(_png_header_only(100000, 100000))
    with pytest.raises(FormatError, match=r"9000x9000 pixels \(81000000\), more than the limit"):
        load_image(_png_header_only(9000, 9000))  # below Pillow's own bomb limit: herd's bound refuses it
    with pytest.raises(FormatError, match="more than the limit of 1000"):
        load_image(_png_bytes(_random_image(40, 30)), max_pixels=1000)
    with pytest.raises(FormatError, match="more than the limit"):
        load_image(_random_image(40, 30), max_pixels=1000)


def test_unsupported_modes_are_named():
    deep = Image.fromarray(np.full((4, 4), 40000, dtype=np.uint16))  # 16-bit grayscale
    with pytest.raises(FormatError, match="mode 'I;16'"):
        load_image(_png_bytes(deep))
    with pytest.raises(FormatError, match="mode 'F'"):
        load_image(Image.fromarray(np.zeros((3, 3), np.float32)))


def test_animated_images_use_the_first_frame():
    frames = [_random_image(8, 8, seed=s).convert("P") for s in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    out = load_image(buf.getvalue())
    assert np.array_equal(np.asarray(out), np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")))


# ---------------------------------------------------------------------------------------------------------------
# Mllama preprocessing against transformers


@pytest.fixture(scope="module")
def reference():
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    return MllamaImageProcessorPil(size={"height": 560, "width": 560}, max_image_tiles=4, image_mean=list(CLIP_MEAN),
                                   image_std=list(CLIP_STD))


# (height, width): 1x1, tiny, exact tile, one pixel either side of a tile edge, the 8 grid shapes, portrait and
# landscape extremes including a very wide panorama, and large photos
SIZES = [(1, 1), (2, 7), (560, 560), (559, 561), (561, 559), (300, 1100), (1100, 300), (600, 1700), (1700, 600),
         (800, 600), (1120, 1120), (1200, 50), (2240, 560), (40, 3000), (120, 8000), (3024, 4032), (4032, 3024),
         (333, 777)]


@pytest.mark.parametrize("size", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_mllama_pixels_match_transformers(reference, size):
    h, w = size
    img = _random_image(h, w, seed=h * 31 + w)
    want = reference(images=[[img]], return_tensors="pt")
    got = mllama_preprocess([img])
    assert torch.equal(got.pixel_values, want["pixel_values"][0])
    assert torch.equal(got.aspect_ratio_ids, want["aspect_ratio_ids"][0])
    assert torch.equal(got.aspect_ratio_mask, want["aspect_ratio_mask"][0])
    assert got.num_tiles == want["num_tiles"][0]


def test_mllama_several_images_and_alpha_match_transformers(reference):
    images = [_random_image(50, 900, seed=1), _random_image(700, 700, "RGBA", seed=2), _random_image(3, 2, "L", seed=3)]
    want = reference(images=[images], return_tensors="pt")
    got = mllama_preprocess(images)
    assert torch.equal(got.pixel_values, want["pixel_values"][0])
    assert torch.equal(got.aspect_ratio_ids, want["aspect_ratio_ids"][0])
    assert torch.equal(got.aspect_ratio_mask, want["aspect_ratio_mask"][0])


def test_mllama_canvas_matches_transformers_over_many_sizes():
    from transformers.models.mllama.image_processing_pil_mllama import get_optimal_tiled_canvas

    rng = np.random.default_rng(5)
    sizes = [(int(a), int(b)) for a, b in rng.integers(1, 5000, (400, 2))] + [(560 * r, 560 * c) for r in range(1, 5)
                                                                          for c in range(1, 5)]
    for h, w in sizes:
        rows, cols = mllama_canvas(h, w, 560, 4)
        assert (rows * 560, cols * 560) == tuple(int(x) for x in get_optimal_tiled_canvas(h, w, 4, 560)), (h, w)


def test_mllama_preprocess_rejects_bad_images():
    with pytest.raises(FormatError, match="not an image"):
        mllama_preprocess([b"GIF89a-but-not-really"])
    with pytest.raises(FormatError, match="at least one image"):
        mllama_preprocess([])

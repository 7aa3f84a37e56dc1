"""Llama 4 early fusion: herd against transformers' Llama4ForConditionalGeneration on a tiny random model, the image
token layout against Llama4Processor, and the preprocessing against transformers' Llama4ImageProcessor."""

import enum
import importlib.util
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from herd.models.kv_cache import KVCache
from herd.errors import ConfigError, GenerationError
from herd.formats.mllama import llama4_vision_config_from_hf, load_llama4_multimodal_hf
from herd.images import llama4_preprocess
from herd.models import vision as V

TOL = 1e-4
# the tiny model's special tokens: the real ids (200080...) would need a 200k vocabulary
IDS = {V.LLAMA4_IMAGE_START: 390, V.LLAMA4_IMAGE_END: 391, V.LLAMA4_IMAGE: 392, V.LLAMA4_PATCH: 399,
       V.LLAMA4_TILE_X: 393, V.LLAMA4_TILE_Y: 394}
PER_TILE = 4  # 56-pixel tiles, patch 14: 16 patches, pixel shuffle 0.5 -> 4 tokens


def make_reference(seed=0):
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                  vision_output_dim=48, image_size=56, patch_size=14, projector_input_dim=48,
                  projector_output_dim=48, pixel_shuffle_ratio=0.5,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, initializer_range=0.2)
    text = dict(vocab_size=400, hidden_size=64, intermediate_size=96, intermediate_size_mlp=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                num_experts_per_tok=1, interleave_moe_layer_step=2, use_qk_norm=True, no_rope_layer_interval=4,
                attention_chunk_size=16, attn_temperature_tuning=True, floor_scale=8, attn_scale=0.1,
                max_position_embeddings=256, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                initializer_range=0.3, pad_token_id=None, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    return Llama4ForConditionalGeneration(Llama4Config(vision_config=vision, text_config=text,
                                                       image_token_index=IDS[V.LLAMA4_PATCH],
                                                       boi_token_index=390, eoi_token_index=391)).eval()


def reference_logits(ref, tokens, pixel_values):
    """transformers' own pieces in the order of its forward (whose output assembly fails in transformers 5.24:
    'MoeCausalLMOutputWithPast' object has no attribute 'image_outputs')."""
    with torch.no_grad():
        emb = ref.get_input_embeddings()(tokens)
        feats = ref.get_image_features(pixel_values=pixel_values, return_dict=True).last_hidden_state
        proj = ref.multi_modal_projector(feats.view(-1, feats.size(-1)))
        mask = ref.get_placeholder_mask(tokens, inputs_embeds=emb, image_features=proj)
        return ref.language_model(inputs_embeds=emb.masked_scatter(mask, proj)).logits


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama4mm")
    ref = make_reference()
    ref.save_pretrained(folder)
    model = load_llama4_multimodal_hf(folder)
    return ref, model, folder


def _prompt(grids, seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = [1, 5, 6]
    n_tiles = 0
    for rows, cols in grids:
        tokens += [IDS[t] for t in V.llama4_image_tokens((rows, cols), PER_TILE)] + [7, 8]
        n_tiles += rows * cols + (1 if rows * cols > 1 else 0)
    tokens += torch.randint(10, 380, (6,), generator=g).tolist()
    return torch.tensor([tokens]), torch.randn(n_tiles, 3, 56, 56, generator=g)


@pytest.mark.parametrize("grids", [[(1, 2)], [(1, 1), (2, 1)]], ids=["one-image", "two-images"])
def test_full_forward_matches_transformers(pair, grids):
    ref, model, _ = pair
    tokens, px = _prompt(grids)
    want = reference_logits(ref, tokens, px)
    with torch.no_grad():
        got = model(tokens, pixel_values=px)
        text_only = model(tokens)
    assert (got - want).abs().max().item() <= TOL
    assert (got - text_only).abs().max().item() > 0.1  # the image embeddings took effect


def test_vision_tower_matches_transformers(pair):
    ref, model, _ = pair
    px = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref.get_image_features(pixel_values=px, return_dict=True).last_hidden_state
        got = model.vision.vision_embeddings(px)
    assert got.shape == want.shape == (3, PER_TILE, 48)
    assert (got - want).abs().max().item() <= TOL


def test_incremental_decoding_matches_full_forward(pair):
    ref, model, _ = pair
    tokens, px = _prompt([(2, 2)])  # 4 tiles + global, separators: a 40-token prompt
    T = tokens.shape[1]
    want = reference_logits(ref, tokens, px)
    P = T - 5
    cache = KVCache(model.text.config, batch=1, max_len=T + 4)
    with torch.no_grad():
        pieces = [model(tokens[:, :P], torch.arange(P), cache, pixel_values=px)]
        for t in range(P, T):
            pieces.append(model(tokens[:, t:t + 1], torch.tensor([t]), cache))
    got = torch.cat(pieces, dim=1)
    assert (got - want).abs().max().item() <= TOL


def test_patch_count_mismatch_is_an_error(pair):
    _, model, _ = pair
    tokens, px = _prompt([(1, 1)])
    with pytest.raises(GenerationError, match="<|patch|> tokens"):
        model(tokens, pixel_values=torch.cat([px, px]))


def test_image_token_layout_matches_transformers_processor():
    from transformers.models.llama4.processing_llama4 import Llama4Processor

    names = {V.LLAMA4_IMAGE_START: "<|image_start|>", V.LLAMA4_IMAGE_END: "<|image_end|>",
             V.LLAMA4_IMAGE: "<|image|>", V.LLAMA4_PATCH: "<|patch|>", V.LLAMA4_TILE_X: "<|tile_x_separator|>",
             V.LLAMA4_TILE_Y: "<|tile_y_separator|>"}
    for grid in [(1, 1), (1, 2), (2, 1), (2, 3), (4, 4), (1, 16)]:
        want = Llama4Processor._prompt_split_image(None, grid, 144)
        assert "".join(names[t] for t in V.llama4_image_tokens(grid, 144)) == want, grid


def test_vision_config_checks(pair):
    import json

    _, _, folder = pair
    cfg = json.loads((folder / "config.json").read_text())
    c, patch = llama4_vision_config_from_hf(cfg)
    assert (c.dim, c.tokens_per_tile, patch) == (32, PER_TILE, 399)
    bad = json.loads(json.dumps(cfg))
    bad["vision_config"]["projector_input_dim"] = 40
    with pytest.raises(ConfigError, match="projector_input_dim"):
        llama4_vision_config_from_hf(bad)
    bad = json.loads(json.dumps(cfg))
    bad["vision_config"]["sparkle"] = 1
    with pytest.raises(ConfigError, match="unknown config keys.*sparkle"):
        llama4_vision_config_from_hf(bad)


# ---------------------------------------------------------------------------------------------------------------
# Preprocessing against transformers' Llama4ImageProcessor.
#
# That class runs on torchvision, which cannot be installed beside this project's CPU torch (the registry's
# torchvision wheels are CUDA builds and fail to import). The reference is therefore transformers' own
# image_processing_llama4.py (canvas choice, upscaling limit, padding, tiling, global tile, bfloat16 arithmetic),
# loaded with a stand-in for the three torchvision kernels it calls, each transcribed from torchvision 0.28:
# resize_image (uint8 bilinear on CPU -> torch interpolate with antialias), pad (constant fill) and normalize_image.


class _Interp(enum.Enum):
    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    LANCZOS = "lanczos"


def _tv_resize(image, size, interpolation=_Interp.BILINEAR, antialias=True):
    assert interpolation == _Interp.BILINEAR
    shape = image.shape
    C, H, W = shape[-3:]
    h, w = size
    if (h, w) == (H, W):
        return image
    out = F.interpolate(image.reshape(-1, C, H, W), size=[h, w], mode="bilinear", align_corners=False,
                        antialias=antialias)
    return out.reshape(shape[:-3] + (C, h, w))


def _tv_pad(image, padding, fill=0):
    left, top, right, bottom = padding
    fills = [fill] if isinstance(fill, (int, float)) else list(fill)
    assert all(f == 0 for f in fills)  # the processor pads with black
    return F.pad(image, (left, right, top, bottom), value=0.0)


def _tv_normalize(image, mean, std, inplace=False):
    mean = torch.as_tensor(mean, dtype=image.dtype).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=image.dtype).view(-1, 1, 1)
    return image.sub(mean).div_(std)


@pytest.fixture(scope="module")
def reference_preprocess():
    import transformers.models.llama4 as pkg
    from transformers.image_utils import PILImageResampling, SizeDict

    functional = types.ModuleType("torchvision.transforms.v2.functional")
    functional.resize, functional.pad, functional.normalize = _tv_resize, _tv_pad, _tv_normalize
    functional.InterpolationMode = _Interp
    stubs = {"torchvision": types.ModuleType("torchvision"),
             "torchvision.transforms": types.ModuleType("torchvision.transforms"),
             "torchvision.transforms.v2": types.ModuleType("torchvision.transforms.v2"),
             "torchvision.transforms.v2.functional": functional}
    stubs["torchvision.transforms.v2"].functional = functional
    saved = {k: sys.modules.get(k) for k in stubs}
    sys.modules.update(stubs)
    try:
        path = pkg.__path__[0] + "/image_processing_llama4.py"
        spec = importlib.util.spec_from_file_location("transformers.models.llama4._herd_reference", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # its decorators look the module up by name
        spec.loader.exec_module(mod)
    finally:
        sys.modules.pop("transformers.models.llama4._herd_reference", None)
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v

    proc = types.SimpleNamespace()
    proc.resize = lambda image, size, resample=None: _tv_resize(image, [size.height, size.width])
    proc.normalize = lambda image, mean, std: _tv_normalize(image, mean, std)
    proc.rescale_and_normalize = types.MethodType(mod.Llama4ImageProcessor.rescale_and_normalize, proc)

    def run(image):
        chw = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()
        out = mod.Llama4ImageProcessor._preprocess(
            proc, [chw], do_resize=True, size=SizeDict(height=336, width=336),
            resample=PILImageResampling.BILINEAR, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
            image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], max_patches=16, resize_to_max_canvas=False,
            disable_grouping=None, return_tensors="pt")
        return out["pixel_values"], out["aspect_ratios"]

    return run


SIZES = [(1, 1), (2, 3), (336, 336), (335, 337), (400, 300), (100, 3000), (3000, 90), (700, 1400), (1000, 1000),
         (50, 700), (1344, 1344), (2000, 5000)]


@pytest.mark.parametrize("size", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_llama4_preprocess_matches_transformers(reference_preprocess, size):
    from PIL import Image

    h, w = size
    rng = np.random.default_rng(h * 7919 + w)
    image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    want_px, want_ratio = reference_preprocess(image)
    got = llama4_preprocess([image])
    assert got.aspect_ratios == [tuple(want_ratio[0].tolist())]
    assert got.pixel_values.dtype == want_px.dtype == torch.bfloat16
    assert torch.equal(got.pixel_values, want_px)
    rows, cols = got.aspect_ratios[0]
    assert got.tiles_per_image == [rows * cols + (rows * cols > 1)]

"""Llama 3.2 Vision (Mllama): herd against transformers' MllamaForConditionalGeneration on a tiny random model.

The reference is saved with save_pretrained and read back through herd's production loader. Every gate (cross-
attention, vision global layers, tile and position embeddings) is set to a random non-zero value first: transformers
initialises them to zero, which would switch the vision path off and let a wrong implementation pass.
"""

import dataclasses

import pytest
import torch

from herd.errors import ConfigError, FormatError, GenerationError
from herd.formats.mllama import build_mllama, config_from_hf, load_mllama_hf
from herd.image_prompts import encode_multimodal_prompt
from herd.models.mllama import MllamaCache, cross_attention_mask, image_spans

TOL = 1e-4
IMG = 300  # <|image|> id of the tiny model (its text vocabulary is 300; embeddings have 8 more rows)
TILE = 28


def make_reference(seed=0):
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    vision = dict(hidden_size=32, num_hidden_layers=4, num_global_layers=2, attention_heads=4, intermediate_size=64,
                  vision_output_dim=32 * 3, image_size=TILE, patch_size=14, max_num_tiles=4,
                  intermediate_layers_indices=[0, 2], initializer_range=0.3)
    text = dict(vocab_size=300, hidden_size=64, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=96, cross_attention_layers=[1, 4], max_position_embeddings=256,
                rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 32},
                initializer_range=0.3, pad_token_id=None, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration(MllamaConfig(vision_config=vision, text_config=text,
                                                        image_token_index=IMG)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate" in name and p.numel() == 1:
                p.uniform_(-1.5, 1.5)
    return model


def hf_taps_layer_outputs() -> bool:
    """Which vision features the installed transformers concatenates: Meta (and transformers before 5.x) take the
    INPUT of each listed local layer; transformers 5.x's MllamaVisionEncoder records each layer's OUTPUT."""
    from transformers.models.mllama.modeling_mllama import MllamaVisionEncoder

    enc = make_reference().model.vision_model.transformer
    x = torch.randn(1, 8, 32)
    with torch.no_grad():
        states = MllamaVisionEncoder.forward(enc, x).hidden_states
    return not torch.equal(states[0], x)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mllama")
    ref = make_reference()
    ref.save_pretrained(folder)
    config, sd = load_mllama_hf(folder)
    if hf_taps_layer_outputs():
        # output of layer i == input of layer i+1: compare with the same features transformers uses
        shifted = tuple(i + 1 for i in config.vision.intermediate_layers)
        config = config.replace(vision=dataclasses.replace(config.vision, intermediate_layers=shifted))
    return ref, build_mllama(config, sd), folder


def _inputs(n_images, T=24, seed=1, positions=(3, 9)):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 300, (1, T), generator=g)
    grids = {2: ((1, 2), 2), 6: ((2, 2), 6), 1: ((1, 1), 1), 5: ((2, 1), 5)}
    chosen = [6, 2, 5][:n_images]
    for p in positions[:n_images]:
        tokens[0, p] = IMG
    px = torch.randn(1, n_images, 4, 3, TILE, TILE, generator=g)
    ids = torch.tensor([chosen])
    ntiles = [grids[i][0][0] * grids[i][0][1] for i in chosen]
    mask = torch.zeros(1, n_images, 4, dtype=torch.int64)
    for i, n in enumerate(ntiles):
        mask[0, i, :n] = 1
        px[0, i, n:] = 0  # padding tiles are zeros, as the processor leaves them
    xmask = cross_attention_mask(tokens[0].tolist(), ntiles, 4, IMG)[None]
    return dict(tokens=tokens, pixel_values=px, aspect_ratio_ids=ids, aspect_ratio_mask=mask,
                cross_attention_mask=xmask)


def _ref_logits(ref, inp):
    with torch.no_grad():
        return ref(input_ids=inp["tokens"], pixel_values=inp["pixel_values"], aspect_ratio_ids=inp["aspect_ratio_ids"],
                   aspect_ratio_mask=inp["aspect_ratio_mask"], cross_attention_mask=inp["cross_attention_mask"]).logits


@pytest.mark.parametrize("n_images", [1, 2])
def test_full_forward_matches_transformers(pair, n_images):
    ref, model, _ = pair
    inp = _inputs(n_images)
    want = _ref_logits(ref, inp)
    with torch.no_grad():
        got = model(inp["tokens"], pixel_values=inp["pixel_values"], aspect_ratio_ids=inp["aspect_ratio_ids"],
                    aspect_ratio_mask=inp["aspect_ratio_mask"], cross_attention_mask=inp["cross_attention_mask"])
    assert (got - want).abs().max().item() <= TOL
    # the images matter: the same text without them gives other logits after the first <|image|>
    with torch.no_grad():
        text_only = model(inp["tokens"])
    assert (text_only[:, 4:] - want[:, 4:]).abs().max().item() > 0.1


@pytest.mark.parametrize("n_images", [1, 2])
def test_incremental_decoding_reuses_cross_attention_cache(pair, n_images):
    ref, model, _ = pair
    inp = _inputs(n_images, T=30)
    want = _ref_logits(ref, inp)
    P = 14  # prompt holds every image; the rest is decoded one token at a time
    cache = MllamaCache(model.config, batch=1, max_len=40)
    with torch.no_grad():
        pieces = [model(inp["tokens"][:, :P], torch.arange(P), cache, pixel_values=inp["pixel_values"],
                        aspect_ratio_ids=inp["aspect_ratio_ids"], aspect_ratio_mask=inp["aspect_ratio_mask"],
                        cross_attention_mask=inp["cross_attention_mask"][:, :P])]
        for t in range(P, 30):  # no pixels, no mask: the cached vision K/V and the last row's mask are reused
            pieces.append(model(inp["tokens"][:, t:t + 1], torch.tensor([t]), cache))
    got = torch.cat(pieces, dim=1)
    assert (got - want).abs().max().item() <= TOL


def test_text_only_matches_transformers(pair):
    ref, model, _ = pair
    tokens = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = ref(input_ids=tokens).logits
        got = model(tokens)
    assert (got - want).abs().max().item() <= TOL


def test_meta_row_masking_leaves_text_before_the_image_untouched(pair):
    _, model, _ = pair
    meta = build_mllama(model.config.replace(zero_unmasked_rows=True), model.state_dict())
    inp = _inputs(1, positions=(6,))
    with torch.no_grad():
        with_image = meta(inp["tokens"], pixel_values=inp["pixel_values"], aspect_ratio_ids=inp["aspect_ratio_ids"],
                          aspect_ratio_mask=inp["aspect_ratio_mask"],
                          cross_attention_mask=inp["cross_attention_mask"])
        text_only = meta(inp["tokens"])
    assert torch.allclose(with_image[:, :6], text_only[:, :6], atol=1e-5)
    assert (with_image[:, 6:] - text_only[:, 6:]).abs().max().item() > 0.1


def test_cross_attention_mask_matches_transformers_processor():
    from transformers.models.mllama.processing_mllama import (convert_sparse_cross_attention_mask_to_dense,
                                                              get_cross_attention_token_mask)

    cases = [[5, IMG, 7, 8], [IMG, IMG, 4, 5, IMG, 9], [1, IMG, 2, IMG, IMG, 3, 4], [IMG, 1, 2], [1, 2, 3, IMG]]
    for tokens in cases:
        n = tokens.count(IMG)
        tiles = [(i % 4) + 1 for i in range(n)]
        spans = get_cross_attention_token_mask(tokens, IMG)
        want = convert_sparse_cross_attention_mask_to_dense([spans], [tiles], 4, len(tokens))[0]
        assert torch.equal(cross_attention_mask(tokens, tiles, 4, IMG), torch.from_numpy(want)), tokens
    assert image_spans([1, 2, 3], IMG) == []
    with pytest.raises(GenerationError, match="2 <|image|> tokens but 1 images"):
        cross_attention_mask([IMG, 1, IMG], [1], 4, IMG)


def test_encode_multimodal_prompt_matches_transformers_processor(pair):
    """Real images through herd's preprocessing give the same logits as transformers' processor + model."""
    import numpy as np
    from PIL import Image
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    ref, model, _ = pair
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40, 90, 3), dtype=np.uint8)),
              Image.fromarray(rng.integers(0, 256, (70, 30, 3), dtype=np.uint8))]
    tokens = [1, 5, IMG, 7, 8, 9, IMG, 11, 12, 13]
    inp = encode_multimodal_prompt(tokens, images, model.config)
    proc = MllamaImageProcessorPil(size={"height": TILE, "width": TILE}, max_image_tiles=4,
                                   image_mean=[0.48145466, 0.4578275, 0.40821073],
                                   image_std=[0.26862954, 0.26130258, 0.27577711])
    hf = proc(images=[images], return_tensors="pt")
    assert torch.equal(inp.pixel_values, hf["pixel_values"])
    assert torch.equal(inp.aspect_ratio_ids, hf["aspect_ratio_ids"])
    with torch.no_grad():
        want = ref(input_ids=inp.tokens, pixel_values=hf["pixel_values"], aspect_ratio_ids=hf["aspect_ratio_ids"],
                   aspect_ratio_mask=hf["aspect_ratio_mask"], cross_attention_mask=inp.cross_attention_mask).logits
        got = model(inp.tokens, pixel_values=inp.pixel_values, aspect_ratio_ids=inp.aspect_ratio_ids,
                    aspect_ratio_mask=inp.aspect_ratio_mask, cross_attention_mask=inp.cross_attention_mask)
    assert (got - want).abs().max().item() <= TOL


def test_loader_rejects_unknown_keys_and_bad_tensors(pair, tmp_path):
    import json
    import shutil

    _, _, folder = pair
    cfg = json.loads((folder / "config.json").read_text())
    with pytest.raises(ConfigError, match="unknown config keys.*frobnicate"):
        config_from_hf({**cfg, "frobnicate": 1})
    with pytest.raises(ConfigError, match="model_type"):
        config_from_hf({**cfg, "model_type": "llama"})
    bad = json.loads(json.dumps(cfg))
    bad["vision_config"]["vision_output_dim"] = 7
    with pytest.raises(ConfigError, match="vision_output_dim"):
        config_from_hf(bad)
    # a checkpoint whose config says more layers than its tensors hold
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    bad = json.loads(json.dumps(cfg))
    bad["text_config"]["num_hidden_layers"] = 7
    (broken / "config.json").write_text(json.dumps(bad))
    config, sd = load_mllama_hf(broken)
    with pytest.raises(FormatError, match="missing"):
        build_mllama(config, sd)

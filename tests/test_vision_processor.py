"""A vision checkpoint's own image-processor settings (preprocessor_config.json, or the image_processor section of
transformers 5.x's processor_config.json) are read and applied; settings herd cannot honour are errors; a chat template
that cannot render image parts is an error naming it, and --chat-template gives one that can.

References: tiny Llama 3.2 Vision models saved by transformers with non-CLIP processors, run by transformers' generate
on pixels from transformers' own processor loaded from the same folder (AutoImageProcessor: its Pillow backend here)
and prompt ids from Meta's llama_models ChatFormat; Llama 4 pixels from transformers' Llama4ImageProcessor code (with
torchvision's three kernels transcribed, as tests/test_llama4_vision.py explains).
"""

import functools
import importlib.util
import json
import shutil
import sys
import types

import numpy as np
import pytest
import torch

import herd
from herd.chat_format import load_chat_template
from herd.errors import ConfigError, FormatError
from herd.formats.mllama import image_processing_from_hf
from herd.images import CLIP_MEAN, CLIP_STD, llama4_preprocess, mllama_preprocess
from test_vision_generate import MLLAMA_IMAGE, meta_tokenizer, pil, png

IMAGES = [(37, 91), (83, 29), (45, 61)]  # odd sizes: different canvases, resizes both ways, padding
TEXT = "What is in this picture?"


@functools.lru_cache(maxsize=1)
def meta_chat_format():
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer

    return ChatFormat(Tokenizer(meta_tokenizer("llama3")))  # ~1.5 s to build: once


def meta_llama3_ids(content: list[dict]) -> list[int]:
    """Meta's Llama 3 ChatFormat (llama_models) on one user message of text and PNG image parts."""
    from llama_models.datatypes import RawMediaItem, RawMessage, RawTextItem, StopReason

    items = [RawTextItem(text=p["text"]) if p["type"] == "text" else RawMediaItem(data=p["image"]) for p in content]
    msg = RawMessage(role="user", content=items, tool_calls=[], stop_reason=StopReason("end_of_turn"))
    return list(meta_chat_format().encode_dialog_prompt([msg]).tokens)


# ---------------------------------------------------------------------------------------------------------------
# Tiny Llama 3.2 Vision checkpoints saved by transformers, with their processors


def _mllama_folder(root, tile: int, tiles: int):
    """A tiny MllamaForConditionalGeneration (Llama 3 vocabulary, so that Meta's tokenizer and chat format apply)
    saved with save_pretrained; vision gates random (transformers starts them at 0) and the tapped vision layers
    identities (Meta and herd tap a layer's input, transformers 5.x its output: tests/test_mllama.py)."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    vision = dict(hidden_size=32, num_hidden_layers=4, num_global_layers=2, attention_heads=4, intermediate_size=64,
                  vision_output_dim=32 * 3, image_size=tile, patch_size=14, max_num_tiles=tiles,
                  intermediate_layers_indices=[0, 2], initializer_range=0.3,
                  supported_aspect_ratios=[[r, c] for r in range(1, tiles + 1) for c in range(1, tiles + 1)
                                           if r * c <= tiles])
    text = dict(vocab_size=128256, hidden_size=64, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=96, cross_attention_layers=[1, 4], max_position_embeddings=256,
                rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 32},
                initializer_range=0.3, pad_token_id=None, bos_token_id=128000, eos_token_id=128001)
    torch.manual_seed(tile + tiles)
    ref = MllamaForConditionalGeneration(MllamaConfig(vision_config=vision, text_config=text,
                                                      image_token_index=MLLAMA_IMAGE)).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "gate" in name and p.numel() == 1:
                p.uniform_(-1.5, 1.5)
        for i in vision["intermediate_layers_indices"]:
            layer = ref.model.vision_model.transformer.layers[i]
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.fc2.weight.zero_()
            layer.mlp.fc2.bias.zero_()
    ref.generation_config.eos_token_id = None
    folder = root / f"mllama-{tile}x{tiles}"
    ref.save_pretrained(folder)
    shutil.copy(meta_tokenizer("llama3"), folder / "tokenizer.model")
    return ref, folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vision-processor")
    return {(28, 4): _mllama_folder(root, 28, 4), (42, 2): _mllama_folder(root, 42, 2)}


def _tiny_tokenizer():
    """The smallest tokenizer MllamaProcessor accepts (it looks up <|image|> and <|python_tag|>): only to let
    transformers write processor_config.json; the checkpoint keeps Meta's tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<|begin_of_text|>": 1, "<|image|>": 2, "<|python_tag|>": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", unk_token="<unk>")


def _variant(base, dest, layout: str, processor):
    """The checkpoint in `base` with `processor` saved by transformers in one of its two layouts."""
    from transformers import MllamaProcessor

    dest.mkdir()
    for f in base.iterdir():
        (dest / f.name).symlink_to(f)
    if layout == "preprocessor_config.json":
        processor.save_pretrained(dest)
    else:  # transformers 5.x: one processor_config.json with an image_processor section (tokenizer files left out)
        tmp = dest.parent / (dest.name + "-processor")
        MllamaProcessor(processor, _tiny_tokenizer()).save_pretrained(tmp)
        shutil.copy(tmp / "processor_config.json", dest / "processor_config.json")
    assert {p.name for p in dest.iterdir()} & {"processor_config.json", "preprocessor_config.json"} == {layout}
    return dest


def transformers_greedy(ref, proc, ids: list[int], images: list[bytes], tiles: int, n: int = 6):
    """transformers' generate with pixels from `proc`: a folder (the processor transformers itself loads from it)
    or an image processor."""
    from transformers import AutoImageProcessor
    from transformers.models.mllama.processing_mllama import (convert_sparse_cross_attention_mask_to_dense,
                                                              get_cross_attention_token_mask)

    if not callable(proc):
        proc = AutoImageProcessor.from_pretrained(proc)
    px = proc(images=[[pil(d) for d in images]], return_tensors="pt")
    spans = get_cross_attention_token_mask(ids, MLLAMA_IMAGE)
    xmask = convert_sparse_cross_attention_mask_to_dense([spans], px["num_tiles"], tiles, len(ids))
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        out = ref.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                           pixel_values=px["pixel_values"], aspect_ratio_ids=px["aspect_ratio_ids"],
                           aspect_ratio_mask=px["aspect_ratio_mask"], cross_attention_mask=torch.from_numpy(xmask),
                           max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist(), px["pixel_values"]


# (model tile, model tiles), file layout, MllamaImageProcessorPil settings beyond size and max_image_tiles.
# transformers' own default processor has mean = std = 0.5 (IMAGENET_STANDARD_*), not CLIP's.
CASES = {
    "preprocessor-mean-std-0.5": ((28, 4), "preprocessor_config.json", {}),
    "processor-mean-std-0.5": ((28, 4), "processor_config.json", {}),
    "processor-bicubic-own-mean-std": ((28, 4), "processor_config.json",
                                       dict(resample=3, image_mean=[0.2, 0.3, 0.4], image_std=[0.6, 0.5, 0.7])),
    "tile-42-max-tiles-2": ((42, 2), "preprocessor_config.json", {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_mllama_follows_the_checkpoint_processor(models, tmp_path, case):
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    (tile, tiles), layout, settings = CASES[case]
    ref, base = models[(tile, tiles)]
    processor = MllamaImageProcessorPil(size={"height": tile, "width": tile}, max_image_tiles=tiles, **settings)
    folder = _variant(base, tmp_path / "ckpt", layout, processor)
    llm = herd.load(folder)
    assert llm.processing.source.startswith(str(folder / layout))
    assert (llm.processing.tile_size, llm.processing.max_tiles) == (tile, tiles)
    pictures = [png(h, w, seed=k) for k, (h, w) in enumerate(IMAGES)]
    for images in (pictures[:1], pictures[1:]):  # one image, then two in one prompt
        content = [{"type": "image", "image": d} for d in images] + [{"type": "text", "text": TEXT}]
        ids = meta_llama3_ids(content)
        want, want_px = transformers_greedy(ref, folder, ids, images, tiles)
        prompt_ids, inputs = llm.encode([{"role": "user", "content": content}])
        assert prompt_ids == ids
        assert torch.equal(inputs.pixel_values[0], want_px[0])  # bit for bit
        # the checkpoint's settings matter: the released model's (CLIP mean/std, bilinear) give other pixels
        clip = mllama_preprocess(images, tile_size=tile, max_tiles=tiles)
        assert (clip.pixel_values - want_px[0]).abs().max() > 0.1
        got = llm.generate([{"role": "user", "content": content}], max_tokens=6, ignore_eos=True)
        assert got.output_ids == want, case


def test_mllama_without_a_processor_file_keeps_the_released_settings(models):
    """No processor file (Meta's folders, older saves): CLIP mean/std and bilinear, as the released checkpoints
    state; the folder's tile size and tile count."""
    _, folder = models[(42, 2)]
    p = herd.load(folder).processing
    assert (p.tile_size, p.max_tiles, p.mean, p.std, p.resample) == (42, 2, CLIP_MEAN, CLIP_STD, 2)


# ---------------------------------------------------------------------------------------------------------------
# Every Mllama pixel setting against transformers' processor (pixels only, bit for bit)

SETTINGS = [dict(resample=r) for r in range(6)] + [
    dict(do_rescale=False), dict(do_normalize=False), dict(do_rescale=False, do_normalize=False),
    dict(rescale_factor=1 / 127.5, image_mean=[1.0, 1.0, 1.0], image_std=[1.0, 1.0, 1.0]),
    dict(do_convert_rgb=False), dict(image_mean=0.25, image_std=0.75)]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_mllama_pixel_settings_match_transformers(settings):
    from PIL import Image
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    ref = MllamaImageProcessorPil(size={"height": 28, "width": 28}, max_image_tiles=4, **settings)
    d = json.loads(ref.to_json_string())
    p = image_processing_from_hf(d, "mllama", 28, 4)
    rng = np.random.default_rng(7)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in IMAGES]
    want = ref(images=[images], return_tensors="pt")
    got = mllama_preprocess(images, processing=p)
    assert torch.equal(got.pixel_values, want["pixel_values"][0])
    assert torch.equal(got.aspect_ratio_ids, want["aspect_ratio_ids"][0])


def test_convert_rgb_false_takes_only_rgb_images():
    from PIL import Image

    p = image_processing_from_hf({"do_convert_rgb": False}, "mllama", 28, 4)
    rgba = Image.new("RGBA", (30, 20), (10, 20, 30, 128))
    with pytest.raises(FormatError, match="mode 'RGBA'.*do_convert_rgb: false"):
        mllama_preprocess([rgba], processing=p)
    assert mllama_preprocess([rgba], tile_size=28).num_tiles == [2]  # converted by default


BAD = [
    ({"do_pad": False}, "mllama", "do_pad False"),
    ({"do_resize": False}, "llama4", "do_resize False"),
    ({"size": {"shortest_edge": 28}}, "mllama", "size {'shortest_edge': 28}"),
    ({"size": {"height": 28, "width": 56}}, "mllama", "height and width must be the same"),
    ({"size": {"height": 56, "width": 56}}, "mllama", "size .*image_size is 28"),
    ({"max_image_tiles": 2}, "mllama", "max_image_tiles 2, but .* max_num_tiles is 4"),
    ({"max_patches": 0}, "llama4", "max_patches 0 must be a positive integer"),
    ({"image_mean": [0.5, 0.5]}, "mllama", r"image_mean \[0.5, 0.5\] must be 3 numbers"),
    ({"image_std": [0.5, 0.0, 0.5]}, "llama4", "image_std .* has a zero"),
    ({"resample": 7}, "mllama", "resample 7 is not a Pillow filter"),
    ({"resample": 3}, "llama4", r"resample 3 \(bicubic\): herd resizes Llama 4 images with the bilinear"),
    ({"do_rescale": False}, "llama4", "do_rescale false"),
    ({"do_normalize": "yes"}, "mllama", "do_normalize 'yes' must be true or false"),
    ({"image_processor_type": "CLIPImageProcessor"}, "mllama", "image_processor_type 'CLIPImageProcessor'"),
    ({"data_format": "channels_last"}, "llama4", "data_format 'channels_last'"),
    ({"do_center_crop": True, "crop_size": {"height": 20, "width": 20}}, "mllama", "do_center_crop True"),
    ({"pixel_shuffle": 3, "max_image_tiles": 4}, "mllama", "does not know for mllama: pixel_shuffle 3"),
    ({"max_image_tiles": 4}, "llama4", "does not know for llama4: max_image_tiles 4"),
    ({"rescale_factor": -1}, "mllama", "rescale_factor -1 must be a positive number"),
]


@pytest.mark.parametrize("d,kind,match", BAD, ids=[m[:40] for _, _, m in BAD])
def test_settings_herd_cannot_honour_are_errors_naming_key_and_value(d, kind, match):
    with pytest.raises(ConfigError, match=match):
        image_processing_from_hf(d, kind, 28, 4, where="preprocessor_config.json")


def test_a_bad_processor_file_stops_the_load(models, tmp_path):
    _, base = models[(28, 4)]
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for f in base.iterdir():
        (folder / f.name).symlink_to(f)
    (folder / "preprocessor_config.json").write_text(json.dumps({"max_image_tiles": 4, "do_pad": True,
                                                                 "size": {"height": 28, "width": 28}}))
    (folder / "processor_config.json").write_text(json.dumps({"image_processor": {"resample": 9}}))
    with pytest.raises(ConfigError, match="processor_config.json image_processor: resample 9"):
        herd.load(folder)  # processor_config.json's section wins over preprocessor_config.json, as in transformers


# ---------------------------------------------------------------------------------------------------------------
# Llama 4: the settings read from either layout give transformers' Llama4ImageProcessor pixels


@pytest.fixture(scope="module")
def llama4_reference():
    """transformers' image_processing_llama4.py with torchvision's resize / pad / normalize transcribed (the stand-ins
    of tests/test_llama4_vision.py); run(image, settings) -> (pixel_values, aspect_ratios)."""
    import transformers.models.llama4 as pkg
    from transformers.image_utils import PILImageResampling, SizeDict

    from test_llama4_vision import _Interp, _tv_normalize, _tv_pad, _tv_resize

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
    name = "transformers.models.llama4._herd_processor_reference"
    try:
        spec = importlib.util.spec_from_file_location(name, pkg.__path__[0] + "/image_processing_llama4.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    finally:
        sys.modules.pop(name, None)
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    proc = types.SimpleNamespace()
    proc.resize = lambda image, size, resample=None: _tv_resize(image, [size.height, size.width])
    proc.normalize = lambda image, mean, std: _tv_normalize(image, mean, std)
    proc.rescale_and_normalize = types.MethodType(mod.Llama4ImageProcessor.rescale_and_normalize, proc)

    def run(image, s: dict):
        chw = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()
        out = mod.Llama4ImageProcessor._preprocess(
            proc, [chw], do_resize=True, size=SizeDict(**s["size"]), resample=PILImageResampling.BILINEAR,
            do_rescale=s["do_rescale"], rescale_factor=s["rescale_factor"], do_normalize=s["do_normalize"],
            image_mean=s["image_mean"], image_std=s["image_std"], max_patches=s["max_patches"],
            resize_to_max_canvas=s["resize_to_max_canvas"], disable_grouping=None, return_tensors="pt")
        return out["pixel_values"], out["aspect_ratios"]

    return run


def _scout_like(**changes) -> dict:
    """The keys of Llama 4 Scout's preprocessor_config.json (nulls and all), at the tiny model's 56-pixel tiles."""
    d = {"crop_size": None, "data_format": "channels_first", "default_to_square": True, "device": None,
         "do_center_crop": None, "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
         "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "Llama4ImageProcessorFast",
         "image_std": [0.5, 0.5, 0.5], "input_data_format": None, "max_patches": 16,
         "processor_class": "Llama4Processor", "resample": 2, "rescale_factor": 0.00392156862745098,
         "resize_to_max_canvas": False, "return_tensors": None, "size": {"height": 56, "width": 56}}
    return {**d, **changes}


L4_CASES = {
    "preprocessor-own-mean-std-4-tiles": ("preprocessor_config.json",
                                          _scout_like(image_mean=[0.4, 0.45, 0.5], image_std=[0.25, 0.3, 0.35],
                                                      max_patches=4)),
    "processor-max-canvas": ("processor_config.json", _scout_like(resize_to_max_canvas=True, max_patches=6)),
    "preprocessor-rescale-only": ("preprocessor_config.json", _scout_like(do_normalize=False)),
}


@pytest.mark.parametrize("case", list(L4_CASES))
def test_llama4_processor_settings_match_transformers(llama4_reference, tmp_path, case):
    from PIL import Image

    from test_llama4_vision import make_reference

    layout, settings = L4_CASES[case]
    folder = tmp_path / "l4"
    make_reference().save_pretrained(folder)
    body = settings if layout == "preprocessor_config.json" else {"image_processor": settings,
                                                                  "processor_class": "Llama4Processor"}
    (folder / layout).write_text(json.dumps(body))
    p = herd.load(folder).processing  # what VisionLLM preprocesses with
    assert p.source.startswith(str(folder / layout)) and p.max_tiles == settings["max_patches"]
    rng = np.random.default_rng(3)
    for h, w in IMAGES + [(20, 130), (170, 150)]:
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        want_px, want_ratio = llama4_reference(image, settings)
        got = llama4_preprocess([image], processing=p)
        assert got.aspect_ratios == [tuple(want_ratio[0].tolist())]
        assert got.pixel_values.dtype == want_px.dtype
        assert torch.equal(got.pixel_values, want_px), (case, h, w)
        default = llama4_preprocess([image], tile_size=56)
        assert default.pixel_values.shape != want_px.shape or not torch.equal(default.pixel_values, want_px)


# ---------------------------------------------------------------------------------------------------------------
# Chat templates that cannot render image parts; --chat-template

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
IMAGE_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
                  "{% if m.content is string %}{{ m.content }}{% else %}{% for p in m.content %}"
                  "{% if p.type == 'image' %}<|image|>{% else %}{{ p.text }}{% endif %}{% endfor %}{% endif %}"
                  "<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>"
                  "\n\n{% endif %}")


@pytest.fixture(scope="module")
def chatml_checkpoint(models, tmp_path_factory):
    """The tiny Llama 3.2 Vision checkpoint shipping a plain ChatML chat_template.jinja."""
    ref, base = models[(28, 4)]
    folder = tmp_path_factory.mktemp("chatml") / "ckpt"
    folder.mkdir()
    for f in base.iterdir():
        (folder / f.name).symlink_to(f)
    (folder / "chat_template.jinja").write_text(CHATML)
    picture = folder.parent / "pic.png"
    picture.write_bytes(png(37, 91, seed=0))
    return ref, folder, picture


def test_a_template_without_image_parts_is_an_error_naming_it(chatml_checkpoint, capsys):
    from herd.cli import main

    _, folder, picture = chatml_checkpoint
    assert main(["generate", "-m", str(folder), "--image", str(picture), "-p", TEXT, "--max-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("herd: error: ") and "Traceback" not in err
    assert f"the chat template of {folder / 'chat_template.jinja'} cannot render image parts" in err
    assert "--chat-template" in err
    # a template that drops image parts (renders them as nothing) is named too
    dropping = herd.load(folder, chat_template=IMAGE_TEMPLATE.replace("<|image|>", ""))
    with pytest.raises(herd.errors.GenerationError, match="placed 0 <|image|> tokens for 1 image.*chat_template="):
        dropping.generate(TEXT, images=[str(picture)], max_tokens=1)


@pytest.mark.parametrize("given", ["file", "string"])
def test_chat_template_option_gives_one_that_can(chatml_checkpoint, tmp_path, capsys, given):
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    from herd.cli import main

    ref, folder, picture = chatml_checkpoint
    if given == "file":
        value = tmp_path / "vision.jinja"
        value.write_text(IMAGE_TEMPLATE)
    else:
        value = IMAGE_TEMPLATE
    assert main(["generate", "-m", str(folder), "--chat-template", str(value), "--image", str(picture), "-p", TEXT,
                 "--max-tokens", "5", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    data = picture.read_bytes()
    ids = meta_llama3_ids([{"type": "image", "image": data}, {"type": "text", "text": TEXT}])
    assert got["prompt_ids"] == ids  # the given template places the image as Meta's format does
    # no processor file: the released checkpoint's processor (CLIP mean and std)
    released = MllamaImageProcessorPil(size={"height": 28, "width": 28}, max_image_tiles=4, image_mean=list(CLIP_MEAN),
                                       image_std=list(CLIP_STD))
    want, _ = transformers_greedy(ref, released, ids, [data], 4, n=5)
    assert got["output_ids"] == want


def test_chat_command_takes_chat_template(chatml_checkpoint, tmp_path, capsys, monkeypatch):
    import io

    from herd.cli import main

    _, folder, picture = chatml_checkpoint
    template = tmp_path / "vision.jinja"
    template.write_text(IMAGE_TEMPLATE)
    want = herd.load(folder, chat_template=IMAGE_TEMPLATE).generate(TEXT, images=[str(picture)], max_tokens=4)
    monkeypatch.setattr(sys, "stdin", io.StringIO(TEXT))
    assert main(["chat", "-m", str(folder), "--chat-template", str(template), "--image", str(picture),
                 "--max-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip() == want.text.strip()
    monkeypatch.setattr(sys, "stdin", io.StringIO(TEXT))
    assert main(["chat", "-m", str(folder), "--image", str(picture), "--max-tokens", "4"]) == 2
    assert "cannot render image parts" in capsys.readouterr().err


def test_load_chat_template_reads_files_json_and_text(tmp_path):
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"chat_template": IMAGE_TEMPLATE, "model_max_length": 8}))
    assert load_chat_template(str(config)) == IMAGE_TEMPLATE
    config.write_text(json.dumps({"chat_template": [{"name": "tool_use", "template": "{{ x }}"},
                                                    {"name": "default", "template": IMAGE_TEMPLATE}]}))
    assert load_chat_template(str(config)) == IMAGE_TEMPLATE  # named templates: the default one
    assert load_chat_template("{{ messages }}") == "{{ messages }}"
    with pytest.raises(FormatError, match="'no-such-template.jinja': no such file, and not a Jinja template"):
        load_chat_template("no-such-template.jinja")
    config.write_text(json.dumps({"model_max_length": 8}))
    with pytest.raises(FormatError, match="a JSON file needs a chat_template string"):
        load_chat_template(str(config))

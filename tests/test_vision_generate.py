"""herd.load() of multimodal checkpoints (Llama 3.2 Vision, Llama 4) and generation with images, against transformers.

Tiny random reference models with the released vocabularies (so that the real Llama 3 / Llama 4 tokenizers from
llama_models and herd's chat formats place the real image token ids) are saved with save_pretrained, loaded with
herd.load, and their greedy tokens compared with transformers' generate on inputs built independently of herd:
Meta's llama_models ChatFormat (Llama 3.2 Vision prompt ids), transformers' image processor and cross-attention mask
(Mllama), transformers' Llama4Processor tile layout tokenized by Meta's Llama 4 tokenizer (Llama 4).
"""

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import herd
from herd.errors import ConfigError, FormatError, GenerationError

TILE_MLLAMA, TILE_L4, PER_TILE_L4 = 28, 56, 4
MLLAMA_IMAGE = 128256


def meta_tokenizer(family: str) -> Path:
    import llama_models

    return Path(llama_models.__file__).parent / family / "tokenizer.model"


def png(h: int, w: int, seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def pil(data: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")


# ---------------------------------------------------------------------------------------------------------------
# Llama 3.2 Vision


@pytest.fixture(scope="module")
def mllama(tmp_path_factory):
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    vision = dict(hidden_size=32, num_hidden_layers=4, num_global_layers=2, attention_heads=4, intermediate_size=64,
                  vision_output_dim=32 * 3, image_size=TILE_MLLAMA, patch_size=14, max_num_tiles=4,
                  intermediate_layers_indices=[0, 2], initializer_range=0.3)
    text = dict(vocab_size=128256, hidden_size=64, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=96, cross_attention_layers=[1, 4], max_position_embeddings=256,
                rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 32},
                initializer_range=0.3, pad_token_id=None, bos_token_id=128000, eos_token_id=128001)
    torch.manual_seed(0)
    ref = MllamaForConditionalGeneration(MllamaConfig(vision_config=vision, text_config=text,
                                                      image_token_index=MLLAMA_IMAGE)).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "gate" in name and p.numel() == 1:  # transformers starts the gates at 0: the vision path would be off
                p.uniform_(-1.5, 1.5)
        # The tapped vision layers are made identities (zero residual branches): Meta and herd concatenate the INPUT
        # of each listed layer, transformers 5.x its OUTPUT (see tests/test_mllama.py); with identities both agree,
        # and the untapped layers, global layers and tile embeddings keep the vision path non-trivial.
        for i in vision["intermediate_layers_indices"]:
            layer = ref.model.vision_model.transformer.layers[i]
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.fc2.weight.zero_()
            layer.mlp.fc2.bias.zero_()
    ref.generation_config.eos_token_id = None  # ignore_eos on both sides
    folder = tmp_path_factory.mktemp("mllama-vision")
    ref.save_pretrained(folder)
    shutil.copy(meta_tokenizer("llama3"), folder / "tokenizer.model")
    return ref, herd.load(folder), folder


def meta_llama3_ids(content: list[dict]) -> list[int]:
    """Meta's Llama 3 ChatFormat (llama_models) on one user message of text and PNG image parts."""
    from llama_models.datatypes import RawMediaItem, RawMessage, RawTextItem, StopReason
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer

    fmt = ChatFormat(Tokenizer(meta_tokenizer("llama3")))
    items = [RawTextItem(text=p["text"]) if p["type"] == "text" else RawMediaItem(data=p["image"]) for p in content]
    msg = RawMessage(role="user", content=items, tool_calls=[], stop_reason=StopReason("end_of_turn"))
    return list(fmt.encode_dialog_prompt([msg]).tokens)


def transformers_mllama_greedy(ref, ids: list[int], images: list[bytes], n: int = 8) -> list[int]:
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil
    from transformers.models.mllama.processing_mllama import (convert_sparse_cross_attention_mask_to_dense,
                                                              get_cross_attention_token_mask)

    proc = MllamaImageProcessorPil(size={"height": TILE_MLLAMA, "width": TILE_MLLAMA}, max_image_tiles=4,
                                   image_mean=[0.48145466, 0.4578275, 0.40821073],
                                   image_std=[0.26862954, 0.26130258, 0.27577711])
    px = proc(images=[[pil(d) for d in images]], return_tensors="pt")
    spans = get_cross_attention_token_mask(ids, MLLAMA_IMAGE)
    xmask = convert_sparse_cross_attention_mask_to_dense([spans], px["num_tiles"], 4, len(ids))
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        out = ref.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                           pixel_values=px["pixel_values"], aspect_ratio_ids=px["aspect_ratio_ids"],
                           aspect_ratio_mask=px["aspect_ratio_mask"],
                           cross_attention_mask=torch.from_numpy(xmask), max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


MLLAMA_CASES = {
    "one-image": [("image", (40, 90)), ("text", "What is in this picture?")],
    "two-images": [("image", (70, 30)), ("text", "Compare this one"), ("image", (30, 60)), ("text", " with that.")],
}


@pytest.mark.parametrize("case", list(MLLAMA_CASES))
def test_mllama_generate_with_images_matches_transformers(mllama, case):
    ref, llm, _ = mllama
    content = [{"type": "image", "image": png(*v, seed=k)} if kind == "image" else {"type": "text", "text": v}
               for k, (kind, v) in enumerate(MLLAMA_CASES[case])]
    images = [p["image"] for p in content if p["type"] == "image"]
    ids = meta_llama3_ids(content)
    assert ids.count(MLLAMA_IMAGE) == len(images)
    want = transformers_mllama_greedy(ref, ids, images)
    got = llm.generate([{"role": "user", "content": content}], max_tokens=8, ignore_eos=True)
    assert got.prompt_ids == ids
    assert got.output_ids == want
    # the images took effect: the same text without them continues differently
    text_only = llm.generate([{"role": "user", "content": [p for p in content if p["type"] == "text"]}],
                             max_tokens=8, ignore_eos=True)
    assert text_only.output_ids != want


def test_mllama_images_argument_stream_and_run(mllama):
    """images= adds pictures in front of the last user message; stream and run give generate's tokens and text."""
    _, llm, _ = mllama
    data = png(40, 90, seed=0)
    by_part = llm.generate([{"role": "user", "content": [{"type": "image", "image": data},
                                                         {"type": "text", "text": "What is in this picture?"}]}],
                           max_tokens=6, ignore_eos=True)
    by_arg = llm.generate("What is in this picture?", images=[data], max_tokens=6, ignore_eos=True)
    assert by_arg.prompt_ids == by_part.prompt_ids and by_arg.output_ids == by_part.output_ids
    assert "".join(llm.stream("What is in this picture?", images=[data], max_tokens=6, ignore_eos=True)) == by_arg.text
    # a mixed batch: one prompt with an image, one text-only (the text one equals LLM's batched path)
    run = llm.run(["What is in this picture?", "Hello there"], {"max_tokens": 6, "ignore_eos": True}, [[data], None])
    indexes = {d.index for d in run}
    done = run.completions()
    assert indexes == {0, 1}
    assert done[0].output_ids == by_arg.output_ids
    assert done[1].output_ids == llm.generate("Hello there", max_tokens=6, ignore_eos=True).output_ids


def test_mllama_text_only_matches_transformers(mllama):
    ref, llm, _ = mllama
    got = llm.generate("Tell me a story.", max_tokens=8, ignore_eos=True)
    with torch.no_grad():
        want = ref.generate(input_ids=torch.tensor([got.prompt_ids]), max_new_tokens=8, do_sample=False)
    assert got.output_ids == want[0, len(got.prompt_ids):].tolist()
    # batched text decoding with rows finishing at different steps (cache_rows) equals one prompt at a time
    from herd.ops.sampling import SamplingParams

    run = llm.run(["Tell me a story.", "Hi"], [SamplingParams(max_tokens=8, ignore_eos=True),
                                               SamplingParams(max_tokens=3, ignore_eos=True)])
    for _ in run:
        pass
    batch = run.completions()
    assert batch[0].output_ids == got.output_ids
    assert batch[1].output_ids == llm.generate("Hi", max_tokens=3, ignore_eos=True).output_ids


def test_mllama_errors(mllama, tmp_path):
    _, llm, folder = mllama
    data = png(40, 90, seed=0)
    with pytest.raises(GenerationError, match="9 images in one prompt; .* at most 8"):
        llm.generate("Many pictures", images=[data] * 9, max_tokens=1)
    with pytest.raises(FormatError, match="not an image"):
        llm.generate("Broken", images=[b"this is not a png"], max_tokens=1)
    with pytest.raises(FormatError, match="image file not found"):
        llm.generate("Missing", images=[str(tmp_path / "nope.png")], max_tokens=1)
    with pytest.raises(GenerationError, match="not into token ids"):
        llm.generate([1, 2, 3], images=[data], max_tokens=1)
    few = herd.load(folder)
    few.max_images = 1
    with pytest.raises(GenerationError, match="2 images in one prompt"):
        few.generate("Two", images=[data, data], max_tokens=1)


def test_images_to_a_text_only_model_are_an_error(tmp_path):
    from refmodels import save_hf_model

    save_hf_model("llama3-gqa", tmp_path)
    shutil.copy(meta_tokenizer("llama3"), tmp_path / "tokenizer.model")
    llm = herd.load(tmp_path)
    assert not getattr(llm, "accepts_images", False)
    msgs = [{"role": "user", "content": [{"type": "image", "image": png(8, 8, seed=0)},
                                         {"type": "text", "text": "What is it?"}]}]
    with pytest.raises(GenerationError, match="text-only model takes no images"):
        llm.generate(msgs, max_tokens=1)


# ---------------------------------------------------------------------------------------------------------------
# Llama 4


@pytest.fixture(scope="module")
def llama4(tmp_path_factory):
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                  vision_output_dim=48, image_size=TILE_L4, patch_size=14, projector_input_dim=48,
                  projector_output_dim=48, pixel_shuffle_ratio=0.5,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, initializer_range=0.2)
    text = dict(vocab_size=202048, hidden_size=64, intermediate_size=96, intermediate_size_mlp=128,
                num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                num_experts_per_tok=1, interleave_moe_layer_step=2, use_qk_norm=True, no_rope_layer_interval=4,
                attention_chunk_size=16, attn_temperature_tuning=True, floor_scale=8, attn_scale=0.1,
                max_position_embeddings=256, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                initializer_range=0.3, pad_token_id=None, bos_token_id=200000, eos_token_id=200001)
    torch.manual_seed(0)
    ref = Llama4ForConditionalGeneration(Llama4Config(vision_config=vision, text_config=text,
                                                      image_token_index=200092, boi_token_index=200080,
                                                      eoi_token_index=200081)).eval()
    ref.language_model.generation_config.eos_token_id = None
    folder = tmp_path_factory.mktemp("llama4-vision")
    ref.save_pretrained(folder)
    shutil.copy(meta_tokenizer("llama4"), folder / "tokenizer.model")
    return ref, herd.load(folder), folder


def llama4_reference_ids(grid: tuple[int, int], text: str) -> list[int]:
    """The prompt as transformers' Llama4Processor writes it (its tile layout text), tokenized by Meta's tokenizer."""
    from llama_models.llama4.tokenizer import Tokenizer
    from transformers.models.llama4.processing_llama4 import Llama4Processor

    image = Llama4Processor._prompt_split_image(None, grid, PER_TILE_L4)
    prompt = (f"<|begin_of_text|><|header_start|>user<|header_end|>\n\n{image}{text}<|eot|>"
              f"<|header_start|>assistant<|header_end|>\n\n")
    return Tokenizer(meta_tokenizer("llama4")).encode(prompt, bos=False, eos=False, allowed_special="all")


def transformers_llama4_greedy(ref, ids: list[int], pixel_values: torch.Tensor, n: int = 8) -> list[int]:
    """transformers' generate on transformers' own fused embeddings (Llama4ForConditionalGeneration.forward cannot
    assemble its output in transformers 5.24, so its generate runs on the language model with inputs_embeds)."""
    tokens = torch.tensor([ids])
    with torch.no_grad():
        emb = ref.get_input_embeddings()(tokens)
        feats = ref.get_image_features(pixel_values=pixel_values, return_dict=True).last_hidden_state
        proj = ref.multi_modal_projector(feats.view(-1, feats.size(-1)))
        mask = ref.get_placeholder_mask(tokens, inputs_embeds=emb, image_features=proj)
        out = ref.language_model.generate(inputs_embeds=emb.masked_scatter(mask, proj),
                                          attention_mask=torch.ones_like(tokens), max_new_tokens=n, do_sample=False)
    return out[0, -n:].tolist()


@pytest.mark.parametrize("size,grid", [((50, 40), (1, 1)), ((50, 110), (1, 2))], ids=["single-tile", "1x2-tiles"])
def test_llama4_generate_with_image_matches_transformers(llama4, size, grid):
    from herd.images import llama4_preprocess

    ref, llm, _ = llama4
    data = png(*size, seed=3)
    pre = llama4_preprocess([data], tile_size=TILE_L4)  # equal to transformers' processor: test_llama4_vision.py
    assert pre.aspect_ratios == [grid]
    ids = llama4_reference_ids(grid, "Describe this.")
    want = transformers_llama4_greedy(ref, ids, pre.pixel_values.float())
    got = llm.generate([{"role": "user", "content": [{"type": "image", "image": data},
                                                     {"type": "text", "text": "Describe this."}]}],
                       max_tokens=8, ignore_eos=True)
    assert got.prompt_ids == ids
    assert got.output_ids == want
    text_only = llm.generate("Describe this.", max_tokens=8, ignore_eos=True)
    assert text_only.output_ids != want


def test_llama4_image_url_part_and_text_only(llama4):
    """An OpenAI image_url data: URL part is the same image; text-only generation equals transformers'."""
    import base64

    ref, llm, _ = llama4
    data = png(50, 110, seed=3)
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    a = llm.generate([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                   {"type": "text", "text": "Describe this."}]}],
                     max_tokens=5, ignore_eos=True)
    b = llm.generate("Describe this.", images=[data], max_tokens=5, ignore_eos=True)
    assert a.prompt_ids == b.prompt_ids and a.output_ids == b.output_ids
    got = llm.generate("Hello", max_tokens=6, ignore_eos=True)
    with torch.no_grad():
        want = ref.language_model.generate(input_ids=torch.tensor([got.prompt_ids]), max_new_tokens=6,
                                           do_sample=False)
    assert got.output_ids == want[0, len(got.prompt_ids):].tolist()


# ---------------------------------------------------------------------------------------------------------------
# Chat templates (HF checkpoints ship one): each image part becomes "<|image|>", mapped as transformers' processors do


def _template(start: str, end: str, eot: str) -> str:
    return ("{{ bos_token }}{% for m in messages %}" + start + "{{ m.role }}" + end + "\n\n{% if m.content is string %}"
            "{{ m.content }}{% else %}{% for p in m.content %}{% if p.type == 'image' %}<|image|>{% else %}{{ p.text }}"
            "{% endif %}{% endfor %}{% endif %}" + eot + "{% endfor %}{% if add_generation_prompt %}" + start
            + "assistant" + end + "\n\n{% endif %}")


def test_chat_template_places_images_like_meta_format(mllama, llama4):
    from herd.chat_format import JinjaChatFormat

    _, meta_fmt, folder = mllama
    jinja = herd.load(folder, chat_template=_template("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))
    assert isinstance(jinja.chat_format, JinjaChatFormat)
    content = [{"type": "image", "image": png(70, 30, seed=0)}, {"type": "text", "text": "Compare this one"},
               {"type": "image", "image": png(30, 60, seed=2)}, {"type": "text", "text": " with that."}]
    a = jinja.generate([{"role": "user", "content": content}], max_tokens=5, ignore_eos=True)
    b = meta_fmt.generate([{"role": "user", "content": content}], max_tokens=5, ignore_eos=True)
    assert a.prompt_ids == b.prompt_ids == meta_llama3_ids(content)  # <|image|> (128011) -> the model's 128256
    assert a.output_ids == b.output_ids

    _, l4, folder = llama4
    jinja = herd.load(folder, chat_template=_template("<|header_start|>", "<|header_end|>", "<|eot|>"))
    data = png(50, 110, seed=3)
    got = jinja.generate("Describe this.", images=[data], max_tokens=5, ignore_eos=True)
    assert got.prompt_ids == llama4_reference_ids((1, 2), "Describe this.")  # "<|image|>" -> the 1x2 tile layout
    assert got.output_ids == l4.generate("Describe this.", images=[data], max_tokens=5, ignore_eos=True).output_ids
    dropped = herd.load(folder, chat_template=_template("<|header_start|>", "<|header_end|>", "<|eot|>").replace(
        "<|image|>", ""))
    with pytest.raises(GenerationError, match="chat template placed 0 <|image|> tokens for 1 image"):
        dropped.generate("Describe this.", images=[data], max_tokens=1)


def test_checkpoint_kinds_are_recognised(mllama, llama4, tmp_path):
    """HF Mllama and Llama 4 folders load as VisionLLM; a Meta Llama 3.2 Vision folder (params.json with cross-
    attention layers) is routed to the Mllama reader; text-only folders are not multimodal."""
    import json

    from herd.formats import multimodal_kind
    from herd.api import VisionLLM

    assert multimodal_kind(mllama[2]) == "mllama" and multimodal_kind(llama4[2]) == "llama4"
    assert isinstance(mllama[1], VisionLLM) and isinstance(llama4[1], VisionLLM)
    assert mllama[1].config.vocab_size == 128256 and mllama[1].config.family == "llama3.2-vision"
    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 4, "n_heads": 4, "vocab_size": 128256,
                                                  "vision_num_cross_attention_layers": 2}))
    assert multimodal_kind(meta) == "mllama"
    with pytest.raises(ConfigError, match="params.json: required key 'multiple_of'"):
        herd.load(meta)
    text = tmp_path / "text"
    text.mkdir()
    (text / "config.json").write_text(json.dumps({"model_type": "llama4_text"}))
    assert multimodal_kind(text) is None


@pytest.mark.parametrize("which", ["mllama", "llama4"])
def test_server_engine_runs_the_text_side(request, which):
    """The continuous-batching Engine (what the server runs text requests on) drives VisionLLM.model as it drives a
    text model, with the same greedy tokens as generate."""
    from herd.engine.scheduler import Engine
    from herd.ops.sampling import SamplingParams

    llm = request.getfixturevalue(which)[1]
    prompts = [llm.encode_prompt("Tell me a story."), llm.encode_prompt("Hi")]
    got = Engine(llm.model, llm.tokenizer, llm.stop_ids, max_batch=2, ctx=64).generate(
        prompts, SamplingParams(max_tokens=5, ignore_eos=True))
    for ids, c in zip(prompts, got):
        assert c.output_ids == llm.generate(ids, max_tokens=5, ignore_eos=True).output_ids


@pytest.mark.parametrize("which", ["mllama", "llama4"])
def test_server_answers_image_url_parts_with_the_vision_checkpoint(request, which):
    """A vision checkpoint served as it is: an image_url data: URL part gets generate's answer (greedy), streaming
    gives the same text, and text-only requests still go through the engine."""
    import base64

    from fastapi.testclient import TestClient

    from herd.server.app import create_app

    llm = request.getfixturevalue(which)[1]
    data = png(40, 90, seed=5)
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "What is in the picture?"}]}]
    want = llm.generate(messages, max_tokens=5, ignore_eos=True)
    body = {"model": "m", "messages": messages, "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    with TestClient(create_app(llm, model_name="m", max_batch=2, ctx=4096)) as c:
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["usage"]["prompt_tokens"] == len(want.prompt_ids)
        assert got["choices"][0]["message"]["content"] == want.text
        with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
            chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
        assert "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks if ch["choices"]) == want.text
        text = c.post("/v1/chat/completions", json={**body, "messages": [{"role": "user", "content": "Hi"}]}).json()
        assert text["choices"][0]["message"]["content"] == llm.generate("Hi", max_tokens=5, ignore_eos=True).text


@pytest.mark.parametrize("which", ["mllama", "llama4"])
def test_cli_generate_with_image_on_a_vision_checkpoint(request, which, tmp_path, capsys):
    """`herd generate -m DIR --image PATH --json` on a vision checkpoint: the library's answer, no --vision needed."""
    from herd.cli import main

    _, llm, folder = request.getfixturevalue(which)
    path = tmp_path / "pic.png"
    path.write_bytes(png(50, 30, seed=11))
    assert main(["generate", "-m", str(folder), "--image", str(path), "-p", "What is it?", "--max-tokens", "4",
                 "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    want = llm.generate("What is it?", images=[str(path)], max_tokens=4)
    assert got["prompt_ids"] == want.prompt_ids and got["output_ids"] == want.output_ids


def test_openai_client_against_herd_serve_with_a_vision_checkpoint(mllama):
    """`herd serve --model <Llama 3.2 Vision folder>` as a user starts it; the openai client sends a picture as a
    base64 data: URL and gets generate's greedy answer; a remote URL is refused with a 400 that says why."""
    import base64

    import openai

    from test_server import Server

    _, llm, folder = mllama
    data = png(64, 48, seed=21)
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    content = [{"type": "text", "text": "Describe the image."}, {"type": "image_url", "image_url": {"url": url}}]
    want = llm.generate([{"role": "user", "content": content}], max_tokens=6, ignore_eos=True)
    server = Server(folder)
    try:
        client = server.client()
        r = client.chat.completions.create(model=server.name, messages=[{"role": "user", "content": content}],
                                           max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
        assert r.choices[0].message.content == want.text
        assert r.usage.prompt_tokens == len(want.prompt_ids)
        with pytest.raises(openai.BadRequestError, match="remote"):
            client.chat.completions.create(model=server.name, max_tokens=2, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}])
    finally:
        server.stop()

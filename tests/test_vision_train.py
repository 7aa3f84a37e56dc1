"""The small vision model: generated data, prompts with images, training, save/load, generation with images.

Fast tests use the default model's real tokenizer and chat template over a tiny random text model (2 layers,
dim 64) and a tiny vision encoder; the slow test runs the `make vision-demo` schedule on the real default model and
checks the accuracy targets.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque

import pytest
import torch

from herd.errors import ConfigError, FormatError, GenerationError
from herd.images import llama4_preprocess
from herd.models.vision import Llama4VisionConfig
from herd.models.lora import lora_modules, lora_switched
from herd.api import ImageChat
from herd.chat import image_command
from herd.formats.vision_ckpt import read_spec, save_vision
from herd.image_prompts import encode_with_images, has_images, split_images, user_message
from herd.models.vision_lm import build_vision_lm, choose_image_tokens
from herd.train.vision import (PromptBuilder, VisionTrainConfig, _HiddenOnly, answer_logits, eval_split, fit_vision,
                               hidden_states, train_vision)
from herd.train.vision_data import (CANVAS, COLOURS, HELD_OUT, KINDS, POSITIONS, SHAPES, TEMPLATES, make_example,
                                    make_split, shape_points)

TINY_VISION = dict(image_size=32, patch_size=8, dim=32, n_layers=1, n_heads=2, ffn_dim=64, projector_input_dim=64,
                   projector_output_dim=64)


# ---------------------------------------------------------------------------------------------------------------
# fixtures: the real tokenizer and chat template over a tiny random text model


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These tiny models run many small ops: one thread is several times faster than two on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def smol_text(smollm_gguf):
    """(tokenizer, chat_format, config) of the default model, without loading its weights."""
    from herd.chat_format import chat_format_for
    from herd.formats.gguf import read_gguf
    from herd.formats.gguf_vocab import tokenizer_from_gguf

    g = read_gguf(smollm_gguf)
    tok = tokenizer_from_gguf(g.metadata)
    fmt = chat_format_for(tok, "llama", g.metadata["tokenizer.chat_template"])
    from herd.formats.gguf import config_from_gguf

    return tok, fmt, config_from_gguf(g)


def _tiny_llm(smol_text, seed=0):
    from herd.api import LLM
    from herd.models.llama import build_model

    tok, fmt, cfg = smol_text
    cfg = dataclasses.replace(cfg, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=512)
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():
        model.tok_embeddings.weight.mul_(0.1)
    for p in model.parameters():
        p.requires_grad_(False)
    return LLM(model, tok, fmt, source=f"tiny-random-{seed}")


@pytest.fixture(scope="module")
def trained(smol_text, tmp_path_factory):
    """A tiny run of train_vision (both stages, evaluation, save): (llm, trained VisionLM, folder, summary)."""
    llm = _tiny_llm(smol_text)
    out = tmp_path_factory.mktemp("vision")
    vlm, spec = fit_vision(llm, VisionTrainConfig(vision=TINY_VISION, pretrain_steps=8, pretrain_batch=8, steps=40,
                                                  batch=4, warmup=2, lr=3e-3, eval_per_kind=2, eval_batch=8,
                                                  progress=False))
    save_vision(vlm, spec, out)
    return llm, vlm, out, spec.training


# ---------------------------------------------------------------------------------------------------------------
# data


def _objects_mask(img):
    """Boolean (H, W) mask of pixels far from the background colour (the corner pixel)."""
    import numpy as np

    a = np.asarray(img, dtype=np.int32)
    return np.abs(a - a[0, 0]).sum(-1) > 60


def _components(mask) -> int:
    """Number of 8-connected components of a boolean mask (a triangle's tip pixel touches its body diagonally)."""
    import numpy as np

    seen = np.zeros_like(mask)
    n = 0
    H, W = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        n += 1
        todo = deque([(y0, x0)])
        seen[y0, x0] = True
        while todo:
            y, x = todo.popleft()
            for yy, xx in ((y + dy, x + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)):
                if 0 <= yy < H and 0 <= xx < W and mask[yy, xx] and not seen[yy, xx]:
                    seen[yy, xx] = True
                    todo.append((yy, xx))
    return n


def test_examples_are_deterministic_and_splits_differ():
    a, b = make_example(3, 17), make_example(3, 17)
    assert a.image.tobytes() == b.image.tobytes() and (a.question, a.answer) == (b.question, b.answer)
    c = make_example(4, 17)
    assert c.image.tobytes() != a.image.tobytes()
    kinds = [e.kind for e in make_split(0, 8)]
    assert kinds == list(KINDS) * 2
    assert a.image.size == (CANVAS, CANVAS) and a.image.mode == "RGB"


def test_labels_match_the_pixels():
    """The answers are read back from the drawn pixels: colour, position, count (connected blobs)."""
    import numpy as np

    for e in make_split(7, 80):
        mask = _objects_mask(e.image)
        assert mask.any()
        if e.kind == "count":
            assert _components(mask) == int(e.answer), e
            continue
        assert _components(mask) == 1
        pixels = np.asarray(e.image, dtype=np.float64)[mask]
        if e.kind == "colour":
            mean = pixels.mean(0)
            nearest = min(COLOURS, key=lambda c: float(((mean - np.array(COLOURS[c])) ** 2).sum()))
            assert nearest == e.answer
        if e.kind == "position":
            ys, xs = np.nonzero(mask)
            fx, fy = POSITIONS[e.answer]
            assert abs(xs.mean() - fx * CANVAS) < 0.1 * CANVAS and abs(ys.mean() - fy * CANVAS) < 0.1 * CANVAS
        if e.kind == "shape":
            assert e.answer in SHAPES and e.objects[0]["shape"] == e.answer


def test_shape_outlines():
    assert [len(shape_points(s, 0, 0, 10, 0)) for s in SHAPES if s != "circle"] == [4, 3, 10, 12]
    sq = shape_points("square", 0, 0, 10, 0)  # circumradius 10: side 10*sqrt(2)
    assert math.dist(sq[0], sq[1]) == pytest.approx(10 * math.sqrt(2))
    with pytest.raises(ConfigError, match="hexagon"):
        shape_points("hexagon", 0, 0, 1, 0)


def test_held_out_phrasings_only_in_evaluation():
    for k in KINDS:
        assert not set(HELD_OUT[k]) & set(TEMPLATES[k])
    train = {e.question for e in make_split(0, 400)}
    assert not train & {q for qs in HELD_OUT.values() for q in qs}
    ev = eval_split(VisionTrainConfig(eval_per_kind=40))
    assert {e.kind for e in ev} == set(KINDS) and len(ev) == 160
    held = [e for e in ev if e.held_out_phrasing]
    assert 40 < len(held) < 120 and all(e.question in HELD_OUT[e.kind] for e in held)


# ---------------------------------------------------------------------------------------------------------------
# prompts


def test_image_tokens_reuse_unused_specials(smol_text):
    tok = smol_text[0]
    t = choose_image_tokens(tok)
    assert t.names == ("<jupyter_start>", "<jupyter_text>", "<jupyter_code>", "<jupyter_output>")
    assert [tok.special_tokens[n] for n in t.names] == [t.image_start, t.image, t.patch, t.image_end]
    assert t.for_image(16) == [t.image_start, t.image] + [t.patch] * 16 + [t.image_end]


def test_prompt_with_an_image_is_the_chat_template_around_the_image_tokens(smol_text):
    tok, fmt, _ = smol_text
    t = choose_image_tokens(tok)
    image_ids = t.for_image(16)
    msgs = [{"role": "user", "content": [{"type": "image", "image": "x.png"},
                                         {"type": "text", "text": "What colour is the shape?"}]}]
    ids, sources = encode_with_images(tok, fmt, msgs, image_ids)
    assert sources == ["x.png"]
    k = ids.index(t.image_start)
    assert ids[k:k + len(image_ids)] == image_ids and ids.count(t.patch) == 16
    plain = fmt.encode_dialog([{"role": "user", "content": "What colour is the shape?"}])
    assert ids[:k] + ids[k + len(image_ids):] == plain  # the same prompt with the image taken out
    # no image: exactly encode_dialog; an OpenAI image_url part and an 'images' list place the same tokens
    assert encode_with_images(tok, fmt, [{"role": "user", "content": "hi"}], image_ids)[0] == \
        fmt.encode_dialog([{"role": "user", "content": "hi"}])
    url = "data:image/png;base64,AAAA"
    ids2, src2 = encode_with_images(tok, fmt, [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What colour is the shape?"}]}],
        image_ids)
    ids3, src3 = encode_with_images(tok, fmt, [{"role": "user", "images": [url],
                                                "content": "What colour is the shape?"}], image_ids)
    assert ids2 == ids3 == ids and src2 == src3 == [url]


def test_has_images_routes_requests():
    assert not has_images([{"role": "user", "content": "hi"}, {"role": "user", "content": [{"type": "text",
                                                                                              "text": "x"}]}])
    assert has_images([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}])
    assert has_images([{"role": "user", "content": "hi", "images": ["a.png"]}])


def test_bad_image_parts_are_clear_errors():
    with pytest.raises(FormatError, match="remote image URLs"):
        split_images([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}])
    with pytest.raises(GenerationError, match="only taken in user messages"):
        split_images([{"role": "assistant", "content": [{"type": "image", "image": "a.png"}]}])
    with pytest.raises(GenerationError, match="unknown content part type"):
        split_images([{"role": "user", "content": [{"type": "audio"}]}])


def test_answer_targets_end_with_the_end_of_turn_token(smol_text):
    tok, fmt, _ = smol_text
    b = PromptBuilder(tok, fmt, choose_image_tokens(tok).for_image(4), tok.stop_ids | fmt.stop_ids)
    assert b.answer("red") == tok.encode("red") + [tok.special_tokens["<|im_end|>"]]
    tokens, labels, lens = b.rows(make_split(0, 4))
    for row, lab, n, e in zip(tokens, labels, lens, make_split(0, 4)):
        a = b.answer(e.answer)
        assert lab[n - 1:n - 1 + len(a)].tolist() == a and (lab[:n - 1] == -100).all()
        assert row[n:n - 1 + len(a)].tolist() == a[:-1]  # teacher forcing: the answer is in the inputs


# ---------------------------------------------------------------------------------------------------------------
# model


def test_shared_prefix_equals_full_rows_with_gradients(smol_text):
    """Running the common prefix once into a KV cache gives the same hidden states and gradients as full rows."""
    llm = _tiny_llm(smol_text)
    tokens = choose_image_tokens(llm.tokenizer)
    vlm = build_vision_lm(llm.model, tokens, Llama4VisionConfig(**TINY_VISION))
    from herd.models.lora import apply_lora

    apply_lora(llm.model, rank=4, alpha=8, seed=1)
    for m in llm.model.modules():  # non-zero B so that LoRA changes the prefix too
        if hasattr(m, "lora_B"):
            torch.nn.init.normal_(m.lora_B.weight, std=0.1)
            m.lora_B.weight.requires_grad_(True)
    b = PromptBuilder(llm.tokenizer, llm.chat_format, tokens.for_image(4), llm.stop_ids)
    exs = make_split(5, 3)
    grads = []
    outs = []
    for share in (False, True):
        vlm.zero_grad(set_to_none=True)
        logits, target, rows = answer_logits(vlm, b, exs, share_prefix=share)
        loss = torch.nn.functional.cross_entropy(logits, target)
        loss.backward()
        outs.append(logits.detach())
        grads.append([p.grad.clone() for p in (vlm.marker_embeddings, vlm.vision.vision_projection.weight,
                                                 llm.model.layers[0].attention.wk.lora_B.weight)])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1, rtol=1e-3, atol=1e-5)
    with _HiddenOnly(llm.model):
        t = b.rows(exs)[0]
        assert hidden_states(vlm, t, vlm.image_features(torch.zeros(3, 3, 32, 32)), 0).shape == (3, t.shape[1], 64)


def test_training_reduces_the_loss_and_records_its_run(trained):
    _, _, out, s = trained
    curve = s["stage2"]["loss_curve"]
    assert len(curve) == 4 and curve[-1] < curve[0] - 1.0, curve  # mean loss of steps 1-10 vs 31-40 (nats)
    assert s["stage1"]["loss_last"] < s["stage1"]["loss_first"]
    assert set(s["accuracy"]) == set(KINDS) and all(0 <= v <= 1 for v in s["accuracy"].values())
    spec = read_spec(out)
    assert spec.training["stage2"]["steps"] == 40 and spec.vision.image_size == 32
    assert (out / "adapter_config.json").exists() and (out / "vision.safetensors").exists()


def test_save_load_round_trip_gives_the_same_logits(trained, smol_text, tmp_path):
    llm, vlm, out, _ = trained
    chat = ImageChat.load(out, llm=_tiny_llm(smol_text))  # same seed: the same base weights, no LoRA yet
    img = make_example(1, 0).image
    ids, feats = chat.encode("What colour is the shape?", images=[img])
    t = torch.tensor([ids])
    with torch.no_grad():
        ref = vlm(t, pixel_values=llama4_preprocess([img], tile_size=32, max_tiles=1).pixel_values)
        got = chat.vlm(t, feats=feats)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # the LoRA went into the text model, and saving what was loaded writes the same tensors again
    assert len(lora_modules(chat.llm.model)) == 7 * 2
    save_vision(chat.vlm, chat.spec, tmp_path)
    from safetensors.torch import load_file

    for name in ("vision.safetensors", "adapter_model.safetensors"):
        a, b = load_file(out / name), load_file(tmp_path / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_generation_with_an_image_matches_a_plain_greedy_loop(trained, smol_text):
    """ImageChat's generation (BatchRun over the VisionStep, KV cache) equals greedy decoding by full forwards of
    the fused model, for a batch mixing prompts with and without images. The vision LoRA is on per row, for the
    rows with images only: a prompt without images answers as the base model whatever shares its batch (batch
    invariance, which the server's engine needs: a request's answer must not depend on its neighbours)."""
    _, _, out, _ = trained
    chat = ImageChat.load(out, llm=_tiny_llm(smol_text))
    imgs = [make_example(2, i).image for i in range(2)]
    prompts = ["What colour is the shape?", "How many shapes are there?", "Say hi."]
    images = [[imgs[0]], [imgs[1]], None]
    got = chat.generate_batch(prompts, images, max_tokens=6, ignore_eos=True)
    for p, im, c in zip(prompts, images, got):
        ids, feats = chat.encode(p, im)
        seq = list(ids)
        with torch.no_grad(), lora_switched(chat.vlm.text, feats is not None):
            for _ in range(6):
                logits = chat.vlm.text(torch.tensor([seq]), embeds=chat.vlm.fuse(torch.tensor([seq]), feats))[0, -1]
                seq.append(int(logits.argmax()))
        assert c.prompt_ids == ids and c.output_ids == seq[len(ids):]
    assert got[0].output_ids != got[1].output_ids or got[0].prompt_ids != got[1].prompt_ids
    # a prompt without images is the base model's (the vision LoRA is off), alone or beside images
    base = _tiny_llm(smol_text).generate(prompts[2], max_tokens=6, ignore_eos=True)
    assert chat.generate(prompts[2], max_tokens=6, ignore_eos=True).output_ids == base.output_ids
    assert got[2].output_ids == base.output_ids
    # streaming gives the same text, and a picture given as PNG bytes or a file path is the same picture
    import io

    buf = io.BytesIO()
    imgs[0].save(buf, format="PNG")
    text = "".join(chat.stream(prompts[0], images=[buf.getvalue()], max_tokens=6, ignore_eos=True))
    assert text == got[0].text


def test_vision_checkpoint_refuses_another_base_and_bad_images(trained, smol_text, tmp_path):
    _, _, out, _ = trained
    with pytest.raises(ConfigError, match="token embeddings differ"):
        ImageChat.load(out, llm=_tiny_llm(smol_text, seed=1))
    chat = ImageChat.load(out, llm=_tiny_llm(smol_text))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(FormatError, match="bad.png"):
        chat.generate("What is this?", images=[str(bad)], max_tokens=2)
    with pytest.raises(FormatError, match="not found"):
        chat.generate("What is this?", images=[str(tmp_path / "missing.png")], max_tokens=2)
    with pytest.raises(FormatError, match="train-vision"):
        ImageChat.load(tmp_path, llm=chat.llm)
    (tmp_path / "vision_config.json").write_text('{"format": "herd-vision", "version": 1, "colour": 1}')
    with pytest.raises(FormatError, match="unknown key"):
        read_spec(tmp_path)


def test_chat_image_command(tmp_path):
    img = make_example(0, 0).image
    path = tmp_path / "pic.png"
    img.save(path)
    pending = []
    assert image_command("hello", pending) is None
    assert "attached" in image_command(f"/image {path}", pending) and pending == [str(path)]
    with pytest.raises(FormatError):
        image_command(f"/image {tmp_path / 'nope.png'}", pending)
    m = user_message("What is it?", pending)
    assert m["content"][0] == {"type": "image", "image": str(path)} and m["content"][1]["text"] == "What is it?"
    assert image_command("/image", pending) == "(attached images removed)" and pending == []
    assert user_message("hi") == {"role": "user", "content": "hi"}


# ---------------------------------------------------------------------------------------------------------------
# the demo schedule on the real default model (about 10 minutes on 2 quiet cores)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ~9-10 minutes on 2 quiet cores: past the suite's 600 s default
def test_demo_schedule_reaches_the_targets(tmp_path):
    s = train_vision(tmp_path / "vision", VisionTrainConfig(progress=False))
    acc = s["accuracy"]
    assert acc["colour"] >= 0.9 and acc["shape"] >= 0.9 and acc["count"] >= 0.7, acc


def test_cli_registers_train_vision_and_image_options_and_reports(trained):
    from herd.cli import build_parser
    from herd.train.cli import report_lines

    parser = build_parser()
    a = parser.parse_args(["train-vision", "--steps", "5", "--out", "somewhere", "--threads", "2"])
    assert (a.steps, a.out, a.threads, a.func.__name__) == (5, "somewhere", 2, "cmd_train_vision")
    for cmd in ("generate", "chat"):
        a = parser.parse_args(([cmd, "-p", "x"] if cmd == "generate" else [cmd])
                              + ["--image", "a.png", "--image", "b.png", "--vision", "dir"])
        assert a.image == ["a.png", "b.png"] and a.vision == "dir"
    text = report_lines(dict(trained[3], out="somewhere", total_seconds=1.0))
    assert "stage 2" in text and "colour" in text and "held-out pictures" in text


def test_generate_and_chat_with_images_through_the_cli(trained, smol_text, tmp_path, capsys, monkeypatch):
    """`herd generate --image PATH --vision DIR --json` and `herd chat --image` (piped), on the tiny model."""
    import io
    import json

    import herd.cli as cli

    _, _, out, _ = trained
    path = tmp_path / "pic.png"
    make_example(0, 1).image.save(path)
    monkeypatch.setattr(cli, "_load_llm", lambda args: _tiny_llm(smol_text))
    base = ["generate", "-p", "What shape is this?", "--vision", str(out), "--max-tokens", "3"]
    assert cli.main(base + ["--image", str(path), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert len(got["output_ids"]) >= 1 and got["prompt_ids"].count(choose_image_tokens(smol_text[0]).patch) == 4
    direct = ImageChat.load(out, llm=_tiny_llm(smol_text)).generate("What shape is this?", images=[str(path)],
                                                                     max_tokens=3)
    assert got["output_ids"] == direct.output_ids and got["prompt_ids"] == direct.prompt_ids

    assert cli.main(base + ["--image", str(path), "--raw"]) == 2
    assert "--raw" in capsys.readouterr().err
    assert cli.main(base + ["--image", str(tmp_path / "missing.png")]) == 2
    assert "missing.png" in capsys.readouterr().err
    assert cli.main(["generate", "-p", "hi", "--image", str(path), "--vision", str(tmp_path / "none")]) == 2
    assert "train-vision" in capsys.readouterr().err

    monkeypatch.setattr("sys.stdin", io.StringIO("What shape is this?\n"))
    assert cli.main(["chat", "--image", str(path), "--vision", str(out), "--max-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip() == direct.text.strip()


def test_chat_loop_image_command_loads_the_vision_model_once(trained, smol_text, tmp_path, monkeypatch):
    """In an interactive chat, /image switches a text model to its vision model and the picture goes with the next
    message only; a bad path is reported and the chat goes on."""
    import io

    from herd.chat import run_chat

    _, _, out, _ = trained
    path = tmp_path / "pic.png"
    make_example(0, 2).image.save(path)
    llm = _tiny_llm(smol_text)
    loads = []

    def loader():
        loads.append(1)
        return ImageChat.load(out, llm=llm)

    class Tty(io.StringIO):
        def isatty(self):
            return True

    lines = iter([f"/image {tmp_path / 'nope.png'}", f"/image {path}", "What colour is the shape?", "And now?",
                  "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    seen = []
    real = ImageChat.stream

    def spy(self, prompt, images=None, **kw):
        seen.append([isinstance(m["content"], list) for m in prompt if m["role"] == "user"])
        return real(self, prompt, images, **kw)

    monkeypatch.setattr(ImageChat, "stream", spy)
    buf = io.StringIO()
    run_chat(llm, sampling={"max_tokens": 2}, stdin=Tty(), stdout=buf, vision_loader=loader)
    text = buf.getvalue()
    assert "error:" in text and "nope.png" in text and "image attached" in text
    assert loads == [1] and seen == [[True], [True, False]]


def test_a_typed_patch_token_without_an_image_is_a_clear_error(trained, smol_text):
    _, _, out, _ = trained
    chat = ImageChat.load(out, llm=_tiny_llm(smol_text))
    with pytest.raises(GenerationError, match="no images bound"):
        chat.generate("what is <jupyter_code> ?", max_tokens=2)
    assert chat.generate("what is <jupyter_start> ?", max_tokens=2).finish_reason is not None  # a marker is fine


def test_openai_client_with_an_image_gets_the_image_models_answer(trained, smol_text, tmp_path):
    """The server's image_url parts (base64 data: URLs) through the openai client: the answer equals ImageChat's;
    text-only requests on the same server stay the base model; bad image parts are 400s that say what is wrong."""
    import base64
    import io
    import socket
    import threading
    import time

    import openai
    import uvicorn

    from herd.server.app import create_app

    _, _, out, _ = trained
    llm = _tiny_llm(smol_text)
    chat = ImageChat.load(out, llm=llm)
    buf = io.BytesIO()
    make_example(0, 3).image.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "What colour is the shape?"}]}]
    expected = chat.generate(messages, max_tokens=4, ignore_eos=True)
    text_expected = llm.generate("Hello there", max_tokens=4, ignore_eos=True)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(llm, model_name="tiny", vision=chat, max_batch=2, ctx=512),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
        kw = dict(model="tiny", max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
        r = client.chat.completions.create(messages=messages, **kw)
        assert r.choices[0].message.content == expected.text
        assert r.usage.prompt_tokens == len(expected.prompt_ids)
        assert r.usage.completion_tokens == sum(t not in llm.stop_ids for t in expected.output_ids)
        pieces = [c.choices[0].delta.content or "" for c in
                  client.chat.completions.create(messages=messages, stream=True, **kw) if c.choices]
        assert "".join(pieces) == expected.text
        r = client.chat.completions.create(messages=[{"role": "user", "content": "Hello there"}], **kw)
        assert r.choices[0].message.content == text_expected.text  # the vision LoRA is off without images

        def bad(content, match):
            with pytest.raises(openai.BadRequestError, match=match):
                client.chat.completions.create(messages=[{"role": "user", "content": content}], **kw)

        bad([{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}], "remote")
        bad([{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}], "image")
        bad([{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}], "unsupported")
        with pytest.raises(openai.BadRequestError, match="only taken in user"):
            client.chat.completions.create(messages=[
                {"role": "system", "content": [{"type": "image_url", "image_url": {"url": url}}]},
                {"role": "user", "content": "hi"}], **kw)
    finally:
        server.should_exit = True
        thread.join(30)


def test_a_server_without_a_vision_model_refuses_images(smol_text):
    from fastapi.testclient import TestClient

    from herd.server.app import create_app

    app = create_app(_tiny_llm(smol_text), model_name="tiny", max_batch=1, ctx=256)
    with TestClient(app) as c:
        r = c.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 2, "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]})
    assert r.status_code == 400 and "takes no images" in r.json()["error"]["message"]


def test_image_requests_batch_with_text_requests_in_the_engine(trained, smol_text, monkeypatch):
    """4 concurrent chat requests with images and 4 without, through the server's continuous-batching engine: each
    answer equals the same request alone (generate), image and text rows share decode steps, and /metrics counts all
    eight requests and their tokens. ~10 s."""
    import base64
    import io
    from concurrent.futures import ThreadPoolExecutor

    from fastapi.testclient import TestClient

    from herd.engine.vision_step import VisionStep
    from herd.server.app import create_app

    _, _, out, _ = trained
    llm = _tiny_llm(smol_text)
    chat = ImageChat.load(out, llm=llm)
    requests, expected = [], []
    for k in range(4):
        buf = io.BytesIO()
        make_example(k, 5 + k).image.save(buf, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": TEMPLATES["colour"][0] if k % 2 else
                                              TEMPLATES["shape"][0]}]}]
        requests.append(msgs)
        expected.append(chat.generate(msgs, max_tokens=6, ignore_eos=True))
    for k, text in enumerate(["Hello there", "What is 2 + 2?", "Name a colour.", "Say yes."]):
        msgs = [{"role": "user", "content": text}]
        requests.append(msgs)
        expected.append(llm.generate(msgs, max_tokens=6, ignore_eos=True))
    mixed = []  # (rows, rows bound to images) of each decode step with both kinds
    real = VisionStep.forward

    def spy(self, tokens, input_pos=None, cache=None, cache_rows=None, last_only=False):
        rows = [int(r) for r in cache_rows] if cache_rows is not None else list(range(tokens.shape[0]))
        bound = sum(r in self.bound for r in rows)
        if tokens.shape[1] == 1 and 0 < bound < len(rows):
            mixed.append((len(rows), bound))
        return real(self, tokens, input_pos, cache, cache_rows, last_only)

    monkeypatch.setattr(VisionStep, "forward", spy)
    app = create_app(llm, model_name="tiny", vision=chat, max_batch=8, ctx=512)
    with TestClient(app) as c:
        def ask(msgs):
            r = c.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 6, "temperature": 0,
                                                     "ignore_eos": True, "messages": msgs})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["message"]["content"]

        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(ask, requests))
        metrics = c.get("/metrics").text
    assert got == [c.text for c in expected]
    assert mixed, "no decode step ran image and text rows together"
    line = next(l for l in metrics.splitlines() if l.startswith('herd_requests_total{endpoint="/v1/chat/completions"'))
    assert float(line.split()[-1]) == 8
    tokens = next(l for l in metrics.splitlines() if l.startswith("herd_generation_tokens_total "))
    assert float(tokens.split()[-1]) == sum(t not in llm.stop_ids for c in expected for t in c.output_ids)

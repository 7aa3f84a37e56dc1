"""Meta-format Llama 3.2 Vision folders (params.json + consolidated.00.pth) against Meta's own CrossAttentionTransformer.

The reference is llama_models 0.3.0 (llama3/multimodal/model.py) run on CPU with fairscale model parallel of size 1.
Its vision tower has fixed sizes (width 1280, 32 + 8 layers, about 790M parameters with the 7680 -> D projection), but
its cost follows the number of image tokens: with "vision_chunk_size": 28 a tile is 2 x 2 patches + 1 class token, so a
forward is cheap. The text model is tiny (dim 64, 4 layers, 2 cross-attention blocks) with the real Llama 3 vocabulary,
so prompts come from Meta's own ChatFormat and tokenizer.model. The checkpoint (about 3.2 GB float32) is written once
per module; every gate is set to a non-zero value (Meta initialises them at zero) so each gated path contributes.

torchvision: Meta's image transform imports it for ToTensor, Normalize and resize. Where it is not installed (the
package index here has only CUDA builds, which do not import against the CPU torch), a stand-in with torchvision's
behaviour on PIL images (PIL bilinear resize; uint8 -> float32 / 255; in-place (x - mean) / std) is placed in
sys.modules only while llama_models' module is imported. The canvas choice, padding, tiling and aspect ratio are
Meta's code either way.
"""

from __future__ import annotations

import enum
import io
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.filterwarnings("ignore:.*all_gather_tensor.*:FutureWarning")  # inside Meta's code
TOL = 1e-4
PARAMS = dict(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32, ffn_dim_multiplier=1.3,
              norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True, vision_chunk_size=28,
              vision_max_num_chunks=4, vision_num_cross_attention_layers=2)
MAX_SEQ = 64
GATES = ("gate", "gate_attn", "gate_ffn", "gate_ffwd", "gated_positional_embedding_gate")


# --- Meta's reference, importable on CPU ---------------------------------------------------------------------

def _torchvision_stand_in() -> dict:
    """The three torchvision pieces VariableSizeImageTransform uses, as torchvision computes them for PIL input."""
    from PIL import Image

    class InterpolationMode(enum.Enum):
        BILINEAR = "bilinear"

    class ToTensor:
        def __call__(self, pic):
            a = torch.from_numpy(np.array(pic, np.uint8, copy=True)).view(pic.size[1], pic.size[0], len(pic.getbands()))
            return a.permute(2, 0, 1).contiguous().to(torch.get_default_dtype()).div(255)

    class Normalize:
        def __init__(self, mean, std, inplace=False):
            self.mean, self.std, self.inplace = mean, std, inplace

        def __call__(self, t):
            t = t if self.inplace else t.clone()
            mean = torch.as_tensor(self.mean, dtype=t.dtype).view(-1, 1, 1)
            return t.sub_(mean).div_(torch.as_tensor(self.std, dtype=t.dtype).view(-1, 1, 1))

    def resize(img, size, interpolation=InterpolationMode.BILINEAR):
        assert interpolation is InterpolationMode.BILINEAR
        return img.resize((size[1], size[0]), Image.BILINEAR)  # size is (h, w); PIL takes (w, h)

    tv, tr, fn = (types.ModuleType(n) for n in ("torchvision", "torchvision.transforms",
                                                "torchvision.transforms.functional"))
    tr.ToTensor, tr.Normalize, tr.InterpolationMode, tr.functional, fn.resize, tv.transforms = (
        ToTensor, Normalize, InterpolationMode, fn, resize, tr)
    return {"torchvision": tv, "torchvision.transforms": tr, "torchvision.transforms.functional": fn}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread here: on the shared 2-core machine, Meta's first vision forward with 2 threads took 18 s
    instead of 2 s (measured), and the ops are small."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def meta(meta_model_parallel):
    """Meta's multimodal module (fairscale model parallel of size 1 over an in-process store: no port needed)."""
    import importlib.util

    stand_in = {} if importlib.util.find_spec("torchvision") else _torchvision_stand_in()
    sys.modules.update(stand_in)
    try:
        from llama_models.llama3.multimodal import model as mm
    finally:
        for name in stand_in:  # nothing else (transformers' availability checks) may see the stand-in
            del sys.modules[name]
    return mm


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Meta leaves linear weights uninitialised and gates at zero: fill everything. Vision gates +-(0.3..0.9); the
    text cross-attention gates +-(0.1..0.3), where the image still moves the logits by several units but greedy
    decoding does not lock onto one token (at +-(0.3..0.9) it repeats a single token, a weak check of the cache)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in GATES:
                sign = 1.0 if torch.rand(1, generator=g).item() > 0.5 else -1.0
                lo, hi = (0.1, 0.3) if name.startswith("text_model.") else (0.3, 0.9)
                p.uniform_(lo, hi, generator=g).mul_(sign)
            elif p.dim() == 1 and leaf == "weight":  # RMSNorm / LayerNorm scales
                p.normal_(1.0, 0.1, generator=g)
            elif p.dim() == 1:  # biases, class embedding
                p.normal_(0.0, 0.02 if leaf == "bias" else 0.5, generator=g)
            else:
                p.normal_(0.0, p.shape[-1] ** -0.5, generator=g)


@pytest.fixture(scope="module")
def checkpoint(meta, tmp_path_factory):
    """(Meta's model with its caches set up, the folder laid out as Meta's releases: params.json,
    consolidated.00.pth, tokenizer.model)."""
    import llama_models.llama3 as l3
    from llama_models.llama3.args import ModelArgs

    folder = tmp_path_factory.mktemp("mllama_meta")
    model = meta.CrossAttentionTransformer(ModelArgs(**PARAMS, max_batch_size=1, max_seq_len=MAX_SEQ))
    _randomize(model)
    torch.save(model.state_dict(), folder / "consolidated.00.pth")
    (folder / "params.json").write_text(json.dumps(PARAMS))
    shutil.copy(Path(l3.__file__).parent / "tokenizer.model", folder / "tokenizer.model")
    model.eval()
    model.setup_cache(1, torch.device("cpu"), torch.float32)
    return model, folder


@pytest.fixture(scope="module")
def llm(checkpoint):
    import herd

    return herd.load(checkpoint[1])


# --- prompts ---------------------------------------------------------------------------------------------------

def _png(w: int, h: int, seed: int) -> bytes:
    from PIL import Image

    a = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _prompts(parts: list):
    """parts: str or PNG bytes -> (Meta's LLMInput from its ChatFormat, herd's OpenAI-style messages)."""
    from llama_models.datatypes import RawMediaItem, RawMessage, RawTextItem
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer

    raw = [RawTextItem(text=p) if isinstance(p, str) else RawMediaItem(data=p) for p in parts]
    inp = ChatFormat(Tokenizer.get_instance()).encode_dialog_prompt([RawMessage(role="user", content=raw)])
    content = [{"type": "text", "text": p} if isinstance(p, str) else {"type": "image", "image": p} for p in parts]
    return inp, [{"role": "user", "content": content}]


ONE = [_png(50, 20, 1), "What is in this image?"]
TWO = ["Compare", _png(50, 20, 1), "with", _png(30, 70, 2), "please."]


def _meta_vision(model, inp, total_len: int, masks=None):
    """Meta's xattn caches and masks, as Llama3.generate computes them once per batch."""
    masks = [list(m) for m in inp.vision.mask] if masks is None else masks
    return model.compute_vision_tokens_masks(batch_images=[inp.vision.images], batch_masks=[masks],
                                             total_len=total_len, device=torch.device("cpu"))


def _meta_logits(model, inp) -> torch.Tensor:
    T = len(inp.tokens)
    with torch.no_grad():
        xattn, xmask, rows = _meta_vision(model, inp, T)
        return model.forward(torch.arange(T), torch.tensor([inp.tokens]), xmask, rows, xattn)


def _meta_greedy(model, inp, steps: int, masks=None) -> tuple[list[int], list[float]]:
    """Meta's decode loop (Llama3.generate at temperature 0): prefill, then one token at a time through its caches."""
    T = len(inp.tokens)
    total = T + steps
    tokens = torch.zeros(1, total, dtype=torch.long)
    tokens[0, :T] = torch.tensor(inp.tokens)
    out, logprobs = [], []
    with torch.no_grad():
        xattn, xmask, rows = _meta_vision(model, inp, total, masks)
        prev = 0
        for cur in range(T, total):
            logits = model.forward(torch.arange(prev, cur), tokens, xmask, rows, xattn)[0, -1]
            nxt = int(logits.argmax())
            tokens[0, cur] = nxt
            out.append(nxt)
            logprobs.append(float(torch.log_softmax(logits.double(), -1)[nxt]))
            prev = cur
    return out, logprobs


def _herd_logits(llm, messages) -> tuple[list[int], torch.Tensor]:
    ids, x = llm.encode(messages)
    with torch.no_grad():
        logits = llm.mm(x.tokens, None, None, x.pixel_values, x.aspect_ratio_ids, x.aspect_ratio_mask,
                        x.cross_attention_mask)
    return ids, logits


# --- checks ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(50, 20), (30, 70), (32, 32), (10, 12), (200, 90), (61, 61)])
def test_image_transform_matches_herd_preprocessing(meta, size):
    from PIL import Image

    from herd.images import mllama_preprocess

    png = _png(*size, seed=sum(size))
    chunks, ratio = meta.VariableSizeImageTransform(size=28)(Image.open(io.BytesIO(png)).convert("RGB"),
                                                             max_num_chunks=4)
    pre = mllama_preprocess([png], tile_size=28, max_tiles=4)
    n = chunks.shape[0]
    assert pre.aspect_ratios == [tuple(ratio)] and pre.num_tiles == [n]
    assert (pre.pixel_values[0, :n] - chunks).abs().max().item() <= 1e-6
    assert torch.count_nonzero(pre.pixel_values[0, n:]) == 0  # padding tiles


def test_checkpoint_layout_and_config(checkpoint, llm):
    """The folder is what Meta's own loader reads (its state_dict keys), and herd maps every tensor."""
    model, folder = checkpoint
    sd = torch.load(folder / "consolidated.00.pth", mmap=True, weights_only=True)
    assert set(sd) == set(model.state_dict())
    c = llm.mm.config
    assert c.xattn_before == tuple(model.text_model.fusion_schedule)
    assert c.text.ffn_dim == model.text_model.layers[0].feed_forward.w1.weight.shape[0]
    for name in ("gate_attn", "gate_ffwd"):  # the gates arrive non-zero, so the cross-attention contributes
        ours = getattr(llm.mm.text_model.cross_attention_layers[1], name)
        assert torch.equal(ours, getattr(model.text_model.cross_attention_layers[1], name)) and ours.abs() > 0.05


def test_one_image_logits(checkpoint, llm):
    model, _ = checkpoint
    inp, messages = _prompts(ONE)
    want = _meta_logits(model, inp)
    ids, got = _herd_logits(llm, messages)
    assert ids == inp.tokens  # herd's Llama3ChatFormat places <|image|> (128256) as Meta's ChatFormat does
    assert (got - want).abs().max().item() <= TOL
    # the image matters: without it (cross-attention skipped) the rows after <|image|> change
    with torch.no_grad():
        text_only = llm.mm.text_model(torch.tensor([ids]))
    first = ids.index(llm.mm.config.image_token_id)
    assert (text_only[0, :first] - want[0, :first]).abs().max().item() <= TOL
    assert (text_only[0, first:] - want[0, first:]).abs().max().item() > 1e-2


def test_two_images_logits(checkpoint, llm):
    model, _ = checkpoint
    inp, messages = _prompts(TWO)
    assert len(inp.vision.mask) == 2
    want = _meta_logits(model, inp)
    ids, got = _herd_logits(llm, messages)
    assert ids == inp.tokens
    assert (got - want).abs().max().item() <= TOL


def test_one_image_greedy_decode(checkpoint, llm):
    model, _ = checkpoint
    inp, messages = _prompts(ONE)
    want, want_lp = _meta_greedy(model, inp, steps=6)
    assert len(set(want)) > 2  # a varied continuation
    c = llm.generate(messages, max_tokens=6, temperature=0, ignore_eos=True, logprobs=0)
    assert c.output_ids == want
    assert max(abs(a.logprob - b) for a, b in zip(c.logprobs, want_lp)) <= TOL


def test_two_images_greedy_decode(checkpoint, llm):
    """Meta's create_vision_mask ends the last image's span at the prompt length (a single image's at -1, the end),
    so in Meta's generator tokens generated after a multi-image prompt see no image at all, although its comment says
    "last image will attend to all subsequent text". herd (as transformers) lets them see the last image; with that
    span extended (-1), Meta's loop gives herd's tokens."""
    model, _ = checkpoint
    inp, messages = _prompts(TWO)
    assert inp.vision.mask[-1][1] == len(inp.tokens)
    masks = [list(m) for m in inp.vision.mask]
    masks[-1][1] = -1
    want, want_lp = _meta_greedy(model, inp, steps=4, masks=masks)
    c = llm.generate(messages, max_tokens=4, temperature=0, ignore_eos=True, logprobs=0)
    assert c.output_ids == want
    assert max(abs(a.logprob - b) for a, b in zip(c.logprobs, want_lp)) <= TOL


# --- bad params.json: typed errors naming the key ---------------------------------------------------------------

@pytest.mark.parametrize("change, match", [
    ({"vision_chunk_sizes": 28}, r"unknown params.json keys \['vision_chunk_sizes'\]"),
    ({"dim": "sixty-four"}, "params.json: a value has the wrong type"),
    ({"norm_eps": None}, "params.json: a value has the wrong type"),
])
def test_bad_params_json(tmp_path, change, match):
    import herd
    from herd.errors import ConfigError

    (tmp_path / "params.json").write_text(json.dumps({**PARAMS, **change}))
    torch.save({}, tmp_path / "consolidated.00.pth")
    with pytest.raises(ConfigError, match=match):
        herd.load(tmp_path)


def test_missing_params_key():
    from herd.errors import ConfigError
    from herd.formats.mllama import config_from_meta

    params = {k: v for k, v in PARAMS.items() if k != "vision_chunk_size"}
    with pytest.raises(ConfigError, match="required key 'vision_chunk_size' is missing"):
        config_from_meta(params)
    with pytest.raises(ConfigError, match="expected a JSON object"):
        config_from_meta({"model": [1, 2]})

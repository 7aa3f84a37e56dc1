"""Multimodal checkpoints: Llama 3.2 Vision (Mllama) from HF or Meta folders into herd's Meta-named modules.

HF layout (transformers' MllamaForConditionalGeneration, SPEC.md §6): one flattened list of text layers where the
`cross_attention_layers` indices hold cross-attention blocks; self-attention q/k rows in rotate-half order (permuted
back to Meta's interleaved pairs here), cross-attention q/k NOT permuted (no RoPE there); embed_tokens has V + 8 rows.
Meta layout (`consolidated.*.pth` + params.json): separate `layers` and `cross_attention_layers` lists, tile position
grids [max_tiles, max_tiles, ...] that are expanded here into herd's per-aspect-ratio tables. Also the vision tower of
HF Llama 4 (Llama4ForConditionalGeneration), whose text part llama4.py reads. Name tables are in keymaps.py.

The image processor's settings of both families (preprocessor_config.json / processor_config.json) are read at the
end of this module into herd.images.ImageProcessing.

Floor 6 (formats); imports herd.config, herd.errors, herd.images, herd.models, herd.ops and formats' containers, io,
keymaps, shapes and llama4.py (a family builds on the containers; nothing below imports this module).
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import torch

from herd.config import ModelConfig, RopeScaling, ffn_hidden_dim
from herd.errors import ConfigError, FormatError
from herd.formats import keymaps
from herd.formats.hf import read_hf_tensors, rope_scaling
from herd.formats.io import cast, read_json
from herd.formats.meta import PARAMS_KEYS, load_shard, read_params
from herd.formats.shapes import check_tensors
from herd.images import LLAMA4_PROCESSING, MLLAMA_PROCESSING, PIL_FILTERS, ImageProcessing
from herd.models.mllama import IMAGE_TOKEN_ID, Mllama, MllamaConfig, fusion_schedule
from herd.models.vision import MllamaVisionConfig

# ---------------------------------------------------------------------------------------------------------------
# Config

_TEXT_IGNORED = {
    "model_type", "initializer_range", "use_cache", "pad_token_id", "bos_token_id", "eos_token_id", "dropout",
    "hidden_act", "torch_dtype", "dtype", "tie_word_embeddings", "_name_or_path", "architectures",
    "output_attentions", "output_hidden_states", "return_dict", "transformers_version", "is_decoder",
    "add_cross_attention", "tie_encoder_decoder", "chunk_size_feed_forward", "id2label", "label2id",
}
_TEXT_USED = {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "intermediate_size", "rope_parameters", "rope_theta", "rope_scaling", "rms_norm_eps",
              "max_position_embeddings", "cross_attention_layers", "head_dim"}
_VISION_USED = {"hidden_size", "num_hidden_layers", "num_global_layers", "attention_heads", "num_attention_heads",
                "num_channels", "intermediate_size", "vision_output_dim", "image_size", "patch_size", "norm_eps",
                "max_num_tiles", "intermediate_layers_indices", "supported_aspect_ratios", "hidden_act"}
_TOP_USED = {"text_config", "vision_config", "image_token_index", "image_token_id"}


def _check_keys(d: dict, used: set, where: str) -> None:
    unknown = sorted(set(d) - used - _TEXT_IGNORED)
    if unknown:
        raise ConfigError(f"{where}: unknown config keys {unknown}")


def config_from_hf(cfg: dict, where: str = "config.json") -> MllamaConfig:
    """HF MllamaConfig dict -> MllamaConfig. Unknown keys are an error naming them."""
    if cfg.get("model_type") != "mllama":
        raise ConfigError(f"{where}: model_type {cfg.get('model_type')!r} is not 'mllama'")
    _check_keys(cfg, _TOP_USED, where)
    t, v = cfg.get("text_config") or {}, cfg.get("vision_config") or {}
    _check_keys(t, _TEXT_USED, where + " text_config")
    _check_keys(v, _VISION_USED, where + " vision_config")
    if t.get("hidden_act", "silu") != "silu" or v.get("hidden_act", "gelu") != "gelu":
        raise ConfigError(f"{where}: Mllama uses silu (text) and gelu (vision) activations")
    try:
        rope = t.get("rope_parameters") or {}
        scaling = rope_scaling(t.get("rope_scaling") or rope, where)
        theta = float(t.get("rope_theta", rope.get("rope_theta", 500000.0)))
        cross = [int(i) for i in t.get("cross_attention_layers", [3, 8, 13, 18, 23, 28, 33, 38])]
        total = int(t.get("num_hidden_layers", 40))
        if sorted(set(cross)) != cross or (cross and (cross[0] < 0 or cross[-1] >= total)):
            raise ConfigError(f"{where}: cross_attention_layers {cross} must be increasing indices below "
                              f"num_hidden_layers ({total})")
        # cross block at flattened index j runs before the self-attention layer that follows it
        before = tuple(j - k for k, j in enumerate(cross))
        n_heads = int(t.get("num_attention_heads", 32))
        dim = int(t.get("hidden_size", 4096))
        head_dim = t.get("head_dim")
        if head_dim not in (None, dim // n_heads):
            raise ConfigError(f"{where}: head_dim {head_dim} != hidden_size / num_attention_heads")
        text = ModelConfig(
            dim=dim, n_layers=total - len(cross), n_heads=n_heads,
            n_kv_heads=int(t.get("num_key_value_heads", 8)), vocab_size=int(t.get("vocab_size", 128256)),
            ffn_dim=int(t.get("intermediate_size", 14336)), norm_eps=float(t.get("rms_norm_eps", 1e-5)),
            rope_theta=theta, rope_scaling=scaling, max_seq_len=int(t.get("max_position_embeddings", 131072)),
            family="llama3.2-vision",
        )
        heads = int(v.get("attention_heads", v.get("num_attention_heads", 16)))
        ratios = v.get("supported_aspect_ratios")
        vision = MllamaVisionConfig(
            image_size=int(v.get("image_size", 448)), patch_size=int(v.get("patch_size", 14)),
            dim=int(v.get("hidden_size", 1280)), n_layers=int(v.get("num_hidden_layers", 32)),
            n_global_layers=int(v.get("num_global_layers", 8)), n_heads=heads,
            ffn_dim=int(v.get("intermediate_size", 5120)), max_num_tiles=int(v.get("max_num_tiles", 4)),
            norm_eps=float(v.get("norm_eps", 1e-5)),
            intermediate_layers=tuple(int(i) for i in v.get("intermediate_layers_indices", [3, 7, 15, 23, 30])),
            num_channels=int(v.get("num_channels", 3)),
            aspect_ratios=tuple(tuple(int(x) for x in a) for a in ratios) if ratios else None,
        )
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: a value has the wrong type ({e})") from None
    if "vision_output_dim" in v and int(v["vision_output_dim"]) != vision.output_dim:
        raise ConfigError(f"{where}: vision_output_dim {v['vision_output_dim']} != hidden_size x "
                          f"(1 + {len(vision.intermediate_layers)} intermediate layers) = {vision.output_dim}")
    if any(i >= vision.n_layers for i in vision.intermediate_layers):
        raise ConfigError(f"{where}: intermediate_layers_indices {list(vision.intermediate_layers)} exceed "
                          f"num_hidden_layers {vision.n_layers}")
    image_token = int(cfg.get("image_token_index", cfg.get("image_token_id", IMAGE_TOKEN_ID)))
    return MllamaConfig(text=text, vision=vision, xattn_before=before, image_token_id=image_token,
                        zero_unmasked_rows=False)


# ---------------------------------------------------------------------------------------------------------------
# HF tensors -> herd names

def hf_to_herd_state_dict(tensors: dict[str, torch.Tensor], config: MllamaConfig, where: str) -> dict:
    """HF Mllama tensor names -> herd (Meta) names, self-attention q/k permuted to interleaved pairs."""
    t = config.text
    cross_index = {j + k: k for k, j in enumerate(config.xattn_before)}  # flattened HF index -> cross block
    sd: dict[str, torch.Tensor] = {}
    for name, w in tensors.items():
        for new, old in keymaps.MLLAMA_HF_PREFIXES:
            if name.startswith(new):
                name = old + name[len(new):]
        out = None
        if name == "language_model.model.embed_tokens.weight":
            out = "text_model.tok_embeddings.weight"
        elif name == "language_model.model.norm.weight":
            out = "text_model.norm.weight"
        elif name == "language_model.lm_head.weight":
            out = "text_model.output.weight"
        elif name.startswith("multi_modal_projector."):
            out = "vision_model.vision_projection." + name.split(".", 1)[1]
        elif m := re.fullmatch(r"language_model\.model\.layers\.(\d+)\.(.+)", name):
            j, rest = int(m.group(1)), m.group(2)
            if j in cross_index:
                if rest in keymaps.MLLAMA_CROSS:
                    out = f"text_model.cross_attention_layers.{cross_index[j]}.{keymaps.MLLAMA_CROSS[rest]}"
            else:
                i = j - sum(1 for c in cross_index if c < j)  # index among the self-attention layers
                herd = keymaps.hf_to_herd_name(f"model.layers.{i}.{rest}")
                if herd is not None:
                    out = "text_model." + herd
                    if herd.endswith("attention.wq.weight"):
                        w = keymaps.permute_hf_to_meta(w, t.n_heads)
                    elif herd.endswith("attention.wk.weight"):
                        w = keymaps.permute_hf_to_meta(w, t.n_kv_heads)
        elif m := re.fullmatch(r"vision_model\.(transformer|global_transformer)\.layers\.(\d+)\.(.+)\.(weight|bias)",
                               name):
            if m.group(3) in keymaps.VISION_BLOCK:
                out = (f"vision_model.vision_encoder.{m.group(1)}.resblocks.{m.group(2)}."
                       f"{keymaps.VISION_BLOCK[m.group(3)]}.{m.group(4)}")
        elif m := re.fullmatch(r"vision_model\.global_transformer\.layers\.(\d+)\.(gate_attn|gate_ffn)", name):
            out = f"vision_model.vision_encoder.global_transformer.resblocks.{m.group(1)}.{m.group(2)}"
        elif name.startswith("vision_model.") and name[len("vision_model."):] in keymaps.MLLAMA_VISION_TOP:
            out = "vision_model.vision_encoder." + keymaps.MLLAMA_VISION_TOP[name[len("vision_model."):]]
            if out.endswith("conv1._linear.weight"):
                w = w.reshape(w.shape[0], -1)  # conv (D, C, p, p) -> Meta's Linear over unfolded patches
        if out is None:
            raise FormatError(f"{where}: unexpected tensor {name!r} for an Mllama model")
        sd[out] = w
    return sd


def load_mllama_hf(folder: str | Path, dtype: torch.dtype | None = None) -> tuple[MllamaConfig, dict]:
    """Read an HF Mllama folder: (config, state dict in herd names)."""
    folder = Path(folder)
    config = config_from_hf(read_json(folder / "config.json"), str(folder / "config.json"))
    sd = hf_to_herd_state_dict(read_hf_tensors(folder), config, str(folder))
    return config, cast(sd, dtype)


# ---------------------------------------------------------------------------------------------------------------
# Meta checkpoints


_META_VISION_KEYS = {"vision_chunk_size", "vision_max_num_chunks", "vision_num_cross_attention_layers"}


def config_from_meta(params: dict, where: str = "params.json") -> MllamaConfig:
    """Meta multimodal params.json -> MllamaConfig (vision tower constants as in Meta's code)."""
    p = params.get("model", params) if isinstance(params, dict) else params
    if not isinstance(p, dict):
        raise ConfigError(f"{where}: expected a JSON object, found {type(p).__name__}")
    unknown = sorted(set(p) - (PARAMS_KEYS - {"rope_scaling"}) - _META_VISION_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown params.json keys {unknown}")
    try:
        L, n_cross = int(p["n_layers"]), int(p["vision_num_cross_attention_layers"])
        dim, n_heads = int(p["dim"]), int(p["n_heads"])
        text = ModelConfig(
            dim=dim, n_layers=L, n_heads=n_heads, n_kv_heads=int(p.get("n_kv_heads") or n_heads),
            vocab_size=int(p["vocab_size"]),
            ffn_dim=ffn_hidden_dim(dim, int(p["multiple_of"]), p.get("ffn_dim_multiplier")),
            norm_eps=float(p["norm_eps"]), rope_theta=float(p.get("rope_theta", 500000.0)),
            rope_scaling=RopeScaling(factor=8.0) if p.get("use_scaled_rope") else None, max_seq_len=131072,
            family="llama3.2-vision",
        )
        vision = MllamaVisionConfig(image_size=int(p["vision_chunk_size"]),
                                    max_num_tiles=int(p["vision_max_num_chunks"]))
    except KeyError as e:
        raise ConfigError(f"{where}: required key {e} is missing") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: a value has the wrong type ({e})") from None
    return MllamaConfig(text=text, vision=vision, xattn_before=fusion_schedule(L, n_cross), zero_unmasked_rows=True)


def _per_ratio(grid: torch.Tensor, ratios: list[tuple[int, int]]) -> torch.Tensor:
    """Meta's [max_tiles, max_tiles, ...] grid -> [n_ratios + 1, max_tiles * ...] table (row 0 = padding)."""
    n = grid.shape[0]
    rest = grid.shape[2:]
    out = torch.zeros(len(ratios) + 1, n, *rest, dtype=grid.dtype)
    for i, (r, c) in enumerate(ratios):
        out[i + 1, : r * c] = grid[:r, :c].reshape(r * c, *rest)
    return out.flatten(1)


def meta_to_herd_state_dict(sd: dict[str, torch.Tensor], config: MllamaConfig, where: str) -> dict:
    """Meta multimodal names -> herd names: the tile grids become per-ratio tables, embeddings are concatenated."""
    out = {}
    ratios = config.vision.supported_aspect_ratios
    ve = "vision_model.vision_encoder."
    for name, w in sd.items():
        if name == "text_model.rope.freqs" or name.endswith("inner_attention.rope.freqs"):
            continue
        if name == "text_model.learnable_embedding.weight":
            continue
        if name == "text_model.tok_embeddings.weight":
            extra = sd.get("text_model.learnable_embedding.weight")
            if extra is None:
                raise FormatError(f"{where}: missing tensor text_model.learnable_embedding.weight")
            w = torch.cat([w, extra])
        elif name in (ve + "gated_positional_embedding", ve + "pre_tile_pos_embed.embedding",
                      ve + "post_tile_pos_embed.embedding"):
            w = _per_ratio(w, ratios)
        elif name.endswith(("gate_attn", "gate_ffwd", "gate_ffn", ".gate", "_gate")):
            w = w.reshape(1)
        out[name] = w
    return out


def load_mllama_meta(folder: str | Path, dtype: torch.dtype | None = None) -> tuple[MllamaConfig, dict]:
    """Read a single-shard Meta Llama 3.2 Vision folder (params.json + consolidated.00.pth)."""
    folder = Path(folder)
    params, params_path = read_params(folder)
    config = config_from_meta(params, str(params_path))
    shards = sorted(folder.glob("consolidated.*.pth"))
    if len(shards) != 1:
        raise FormatError(f"{folder}: expected one consolidated.*.pth shard, found {len(shards)} "
                          "(model-parallel Mllama shards are not supported)")
    sd = meta_to_herd_state_dict(load_shard(shards[0]), config, str(folder))
    return config, cast(sd, dtype)


# ---------------------------------------------------------------------------------------------------------------
# Building


def build_mllama(config: MllamaConfig, state_dict: dict[str, torch.Tensor] | None = None,
                 dtype: torch.dtype = torch.float32) -> Mllama:
    """Build an Mllama model; with a state dict, on the meta device and assigned (every name and shape checked)."""
    if state_dict is None:
        return Mllama(config).to(dtype)
    with torch.device("meta"):
        model = Mllama(config)
    from herd.models.llama import checked_tensors

    tensors = checked_tensors(model.state_dict(), state_dict, dtype, "Mllama checkpoint")
    model.load_state_dict(tensors, strict=True, assign=True)
    # buffers built on the meta device are recomputed on the CPU
    from herd.ops.rope import inv_frequencies

    c = config.text
    model.text_model.inv_freq = inv_frequencies(c.head_dim, c.rope_theta, c.rope_scaling)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------
# Llama 4 early fusion (HF Llama4ForConditionalGeneration): the text part is read by herd/formats/llama4.py

_L4_VISION_USED = {"hidden_size", "hidden_act", "num_hidden_layers", "num_attention_heads", "num_channels",
                   "intermediate_size", "vision_output_dim", "image_size", "patch_size", "norm_eps",
                   "vision_feature_select_strategy", "pixel_shuffle_ratio", "projector_input_dim",
                   "projector_output_dim", "multi_modal_projector_bias", "projector_dropout", "attention_dropout",
                   "rope_parameters", "rope_theta", "vision_feature_layer"}
def llama4_vision_config_from_hf(cfg: dict, where: str = "config.json"):
    """HF Llama4Config dict -> (Llama4VisionConfig, patch token id). Shapes the reference would silently mis-wire
    (adapter sizes that only work when equal) are errors here."""
    from herd.models.vision import Llama4VisionConfig

    v = cfg.get("vision_config")
    if cfg.get("model_type") != "llama4" or not isinstance(v, dict):
        raise ConfigError(f"{where}: not a Llama 4 multimodal config (model_type 'llama4' with a vision_config)")
    unknown = sorted(set(v) - _L4_VISION_USED - _TEXT_IGNORED)
    if unknown:
        raise ConfigError(f"{where} vision_config: unknown config keys {unknown}")
    if v.get("hidden_act", "gelu") != "gelu" or v.get("multi_modal_projector_bias"):
        raise ConfigError(f"{where} vision_config: Llama 4 uses gelu and a projector without bias")
    if v.get("vision_feature_select_strategy", "default") != "default":
        raise ConfigError(f"{where} vision_config: vision_feature_select_strategy must be 'default'")
    rope = v.get("rope_parameters") or {}
    try:
        c = Llama4VisionConfig(
            image_size=int(v.get("image_size", 448)), patch_size=int(v.get("patch_size", 14)),
            dim=int(v.get("hidden_size", 768)), n_layers=int(v.get("num_hidden_layers", 34)),
            n_heads=int(v.get("num_attention_heads", 16)), ffn_dim=int(v.get("intermediate_size", 5632)),
            rope_theta=float(v.get("rope_theta", rope.get("rope_theta", 10000.0))),
            pixel_shuffle_ratio=float(v.get("pixel_shuffle_ratio", 0.5)),
            projector_input_dim=int(v.get("projector_input_dim", 4096)),
            projector_output_dim=int(v.get("projector_output_dim", 4096)),
            num_channels=int(v.get("num_channels", 3)),
        )
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where} vision_config: a value has the wrong type ({e})") from None
    shuffled = int(c.dim / c.pixel_shuffle_ratio ** 2)
    if shuffled != c.ffn_dim:
        raise ConfigError(f"{where} vision_config: the adapter reads intermediate_size ({c.ffn_dim}) features but "
                          f"pixel shuffle gives hidden_size / ratio^2 = {shuffled}")
    if c.projector_input_dim != c.projector_output_dim:
        raise ConfigError(f"{where} vision_config: projector_input_dim ({c.projector_input_dim}) must equal "
                          f"projector_output_dim ({c.projector_output_dim}) (the adapter's second layer reads it)")
    if int(v.get("vision_output_dim", c.projector_output_dim)) != c.projector_output_dim:
        raise ConfigError(f"{where} vision_config: vision_output_dim must equal projector_output_dim")
    return c, int(cfg.get("image_token_index", 200092))


def llama4_vision_state_dict(tensors: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """The vision tensors of an HF Llama 4 checkpoint -> herd (Meta) names; text tensors are left out."""
    sd = {}
    for name, w in tensors.items():
        name = name.removeprefix("model.")
        if not name.startswith(("vision_model.", "multi_modal_projector.")):
            continue
        out = keymaps.LLAMA4_VISION_TOP.get(name)
        if m := re.fullmatch(r"vision_model\.model\.layers\.(\d+)\.(.+)\.(weight|bias)", name):
            if m.group(2) in keymaps.VISION_BLOCK:
                out = (f"vision_embeddings.vision_encoder.transformer.resblocks.{m.group(1)}."
                       f"{keymaps.VISION_BLOCK[m.group(2)]}.{m.group(3)}")
        if out is None:
            raise FormatError(f"{where}: unexpected tensor {name!r} for a Llama 4 vision model")
        sd[out] = w
    return sd


def load_llama4_multimodal_hf(folder: str | Path, dtype: torch.dtype = torch.float32):
    """An HF Llama4ForConditionalGeneration folder -> herd Llama4Multimodal (text via herd/formats/llama4.py)."""
    from herd.formats.llama4 import load_hf_llama4
    from herd.models.llama import build_model
    from herd.models.vision import Llama4Multimodal, Llama4VisionModel

    folder = Path(folder)
    cfg = read_json(folder / "config.json")  # read once: the vision tower's config and the text model's
    vcfg, patch_id = llama4_vision_config_from_hf(cfg, str(folder / "config.json"))
    text_config, text_sd = load_hf_llama4(folder, cfg=cfg)
    text = build_model(text_config, text_sd, dtype)
    vsd = llama4_vision_state_dict(read_hf_tensors(folder), str(folder))
    with torch.device("meta"):
        vision = Llama4VisionModel(vcfg, text_config.dim)
    _assign(vision, vsd, dtype, str(folder))
    from herd.models.vision import llama4_vision_rope

    cos, sin = llama4_vision_rope(vcfg)
    vision.vision_embeddings.vision_encoder.rope_cos = cos
    vision.vision_embeddings.vision_encoder.rope_sin = sin
    return Llama4Multimodal(text, vision.eval(), patch_id).eval()


def _assign(module: torch.nn.Module, sd: dict, dtype: torch.dtype, where: str) -> None:
    check_tensors(sd, {k: tuple(v.shape) for k, v in module.state_dict().items()}, f"{where} (vision tower)")
    module.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True, assign=True)
    for p in module.parameters():
        p.requires_grad_(False)


# ---------------------------------------------------------------------------------------------------------------
# Image processor settings: preprocessor_config.json, or the image_processor section of the processor_config.json
# that transformers 5.x writes (which wins when both are there, as in transformers). A null value states nothing
# (transformers takes its class default); a value herd cannot honour is a ConfigError naming the key and value.

PROCESSOR_FILE, PREPROCESSOR_FILE = "processor_config.json", "preprocessor_config.json"
_PROCESSOR_TYPES = {"mllama": ("MllamaImageProcessor", "MllamaImageProcessorFast", "MllamaImageProcessorPil"),
                    "llama4": ("Llama4ImageProcessor", "Llama4ImageProcessorFast")}
_MAX_TILES_KEY = {"mllama": "max_image_tiles", "llama4": "max_patches"}
# keys that say nothing about the pixel values of a PIL image: class names, the tensor type and device of the output,
# the layout of array inputs, the batching of equal shapes; default_to_square and crop_size are read only for
# shortest-edge sizes and with do_center_crop, which herd refuses below
_PROCESSOR_IGNORED = {"image_processor_type", "processor_class", "return_tensors", "device", "input_data_format",
                      "disable_grouping", "default_to_square", "crop_size"}
_PROCESSOR_USED = {"size", "image_mean", "image_std", "resample", "do_rescale", "rescale_factor", "do_normalize",
                   "do_convert_rgb", "do_resize", "data_format", "do_center_crop"}
_PROCESSOR_FAMILY = {"mllama": {"max_image_tiles", "do_pad"}, "llama4": {"max_patches", "resize_to_max_canvas"}}


def read_processor_config(folder: str | Path) -> tuple[dict | None, str]:
    """(the image processor's settings, where they were read) of an HF folder; (None, '') when it has neither file."""
    folder = Path(folder)
    if (folder / PROCESSOR_FILE).exists():
        d = read_json(folder / PROCESSOR_FILE)
        section = d.get("image_processor")
        if section is not None:
            where = f"{folder / PROCESSOR_FILE} image_processor"
            if not isinstance(section, dict):
                raise ConfigError(f"{where}: expected a JSON object, found {type(section).__name__}")
            return section, where
    if (folder / PREPROCESSOR_FILE).exists():
        return read_json(folder / PREPROCESSOR_FILE), str(folder / PREPROCESSOR_FILE)
    return None, ""


def _flag(d: dict, key: str, default: bool, where: str) -> bool:
    v = d.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ConfigError(f"{where}: {key} {v!r} must be true or false")
    return v


def _channels(d: dict, key: str, default: tuple, where: str) -> tuple[float, ...]:
    v = d.get(key)
    if v is None:
        return default
    values = [v] * 3 if isinstance(v, (int, float)) and not isinstance(v, bool) else v
    if (not isinstance(values, list) or len(values) != 3
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in values)):
        raise ConfigError(f"{where}: {key} {v!r} must be 3 numbers (one per RGB channel) or one number")
    if key == "image_std" and any(x == 0 for x in values):
        raise ConfigError(f"{where}: {key} {v!r} has a zero: normalizing would divide by it")
    return tuple(float(x) for x in values)


def _tile_size(d: dict, default: int, where: str) -> int:
    v = d.get("size")
    if v is None:
        return default
    if isinstance(v, int) and not isinstance(v, bool):
        v = {"height": v, "width": v}
    if not isinstance(v, dict) or set(k for k, x in v.items() if x is not None) != {"height", "width"}:
        raise ConfigError(f"{where}: size {v!r}: herd takes square tiles given as {{\"height\": N, \"width\": N}} "
                          f"(not shortest_edge / longest_edge sizes)")
    h, w = v["height"], v["width"]
    if not (isinstance(h, int) and isinstance(w, int) and h == w and h > 0):
        raise ConfigError(f"{where}: size {v!r}: height and width must be the same positive integer (square tiles)")
    return h


def image_processing_from_hf(d: dict | None, kind: str, tile_size: int, max_tiles: int | None = None,
                             where: str = PREPROCESSOR_FILE) -> ImageProcessing:
    """An image processor's settings (read_processor_config) -> ImageProcessing for a model whose vision tower takes
    tile_size-pixel tiles (and, Mllama, exactly max_tiles tiles). None: the released models' settings."""
    base = MLLAMA_PROCESSING if kind == "mllama" else LLAMA4_PROCESSING
    if kind not in _PROCESSOR_TYPES:
        raise ConfigError(f"{where}: unknown vision model kind {kind!r} (mllama, llama4)")
    tiles_key = _MAX_TILES_KEY[kind]
    if d is None:
        return replace(base, tile_size=tile_size, max_tiles=max_tiles if kind == "mllama" else base.max_tiles,
                       source=f"{base.source} of {kind} (no {PREPROCESSOR_FILE})")
    d = {k: v for k, v in d.items() if v is not None}
    unknown = sorted(set(d) - _PROCESSOR_USED - _PROCESSOR_IGNORED - _PROCESSOR_FAMILY[kind])
    if unknown:
        raise ConfigError(f"{where}: image processor setting(s) herd does not know for {kind}: "
                          + ", ".join(f"{k} {d[k]!r}" for k in unknown))
    kind_name = d.get("image_processor_type")
    if kind_name is not None and kind_name not in _PROCESSOR_TYPES[kind]:
        raise ConfigError(f"{where}: image_processor_type {kind_name!r}, but this {kind} model takes "
                          f"{' or '.join(_PROCESSOR_TYPES[kind])}")
    for key, must in (("do_resize", True), ("do_pad", True), ("do_center_crop", False)):
        if key in d and d[key] is not must:
            raise ConfigError(f"{where}: {key} {d[key]!r}: the {kind} vision model takes only "
                              f"{str(must).lower()} (tiles of the size the model was trained on)")
    if d.get("data_format", "channels_first") != "channels_first":
        raise ConfigError(f"{where}: data_format {d['data_format']!r}: the vision model takes channels_first pixels")
    tile = _tile_size(d, tile_size, where)
    if tile != tile_size:
        raise ConfigError(f"{where}: size {d['size']!r}, but the model's vision_config image_size is {tile_size}: "
                          f"its position embeddings are for {tile_size}-pixel tiles")
    n = d.get(tiles_key, max_tiles if kind == "mllama" else base.max_tiles)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(f"{where}: {tiles_key} {n!r} must be a positive integer")
    if kind == "mllama" and n != max_tiles:
        raise ConfigError(f"{where}: {tiles_key} {n}, but the model's vision_config max_num_tiles is {max_tiles}: its "
                          f"tile and aspect-ratio embeddings are for {max_tiles} tiles")
    resample = d.get("resample", base.resample)
    if isinstance(resample, str) and resample.lower() in PIL_FILTERS.values():
        resample = next(k for k, v in PIL_FILTERS.items() if v == resample.lower())
    if resample not in PIL_FILTERS or isinstance(resample, bool):
        raise ConfigError(f"{where}: resample {resample!r} is not a Pillow filter "
                          f"({', '.join(f'{k} {v}' for k, v in PIL_FILTERS.items())})")
    if kind == "llama4" and resample != 2:
        raise ConfigError(f"{where}: resample {resample} ({PIL_FILTERS[resample]}): herd resizes Llama 4 images with "
                          f"the bilinear filter (2) only, as the released checkpoints do")
    factor = d.get("rescale_factor", base.rescale_factor)
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not factor > 0:
        raise ConfigError(f"{where}: rescale_factor {factor!r} must be a positive number")
    p = ImageProcessing(
        tile_size=tile, max_tiles=n, mean=_channels(d, "image_mean", base.mean, where),
        std=_channels(d, "image_std", base.std, where), resample=resample,
        rescale=_flag(d, "do_rescale", True, where), rescale_factor=float(factor),
        normalize=_flag(d, "do_normalize", True, where), convert_rgb=_flag(d, "do_convert_rgb", True, where),
        resize_to_max_canvas=_flag(d, "resize_to_max_canvas", False, where), source=where)
    if kind == "llama4" and not p.rescale:
        raise ConfigError(f"{where}: do_rescale false: herd takes Llama 4 pixels rescaled (transformers' normalize "
                          f"refuses the 0..255 integers, and the vision tower would read them unscaled)")
    return p


def read_image_processing(folder: str | Path, kind: str, tile_size: int, max_tiles: int | None = None):
    """The ImageProcessing of a checkpoint folder (image_processing_from_hf over read_processor_config)."""
    d, where = read_processor_config(folder)
    return image_processing_from_hf(d, kind, tile_size, max_tiles, where or PREPROCESSOR_FILE)

"""herd vision checkpoint folders (`herd train-vision` writes them; `--image` and `herd serve` read them):

    vision_config.json          the encoder's Llama4VisionConfig, the base text model it was trained on (dims and an
                                embedding probe that must match), the image token ids, training summary and accuracy
    vision.safetensors          vision.* (Meta names: vision.vision_embeddings..., vision.vision_projection.weight)
                                and marker_embeddings (3, D)
    adapter_config.json, adapter_model.safetensors
                                the LoRA of the text model, PEFT layout (herd/formats/peft.py)

Floor: formats/ (reads and writes files; builds herd/models/vision_lm.py's VisionLM over a loaded text model).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from herd.errors import ConfigError, FormatError
from herd.formats.io import read_json, save_safetensors_atomic, write_text_atomic
from herd.formats.peft import ADAPTER_CONFIG, apply_adapter, save_adapter
from herd.models.lora import lora_modules, set_lora
from herd.models.vision import Llama4VisionConfig, Llama4VisionModel, llama4_vision_rope
from herd.models.vision_lm import ImageTokens, VisionLM, activation_dtype, embedding_probe

CONFIG_FILE, WEIGHTS_FILE = "vision_config.json", "vision.safetensors"
FORMAT_NAME, FORMAT_VERSION = "herd-vision", 1


@dataclass
class VisionSpec:
    """What vision_config.json holds."""

    vision: Llama4VisionConfig
    tokens: ImageTokens
    text_dim: int
    text_layers: int
    vocab_size: int
    probe: list[float]
    base: str = ""  # the base model it was trained on (catalog name or path), for the error messages
    max_tiles: int = 1
    training: dict = dataclasses.field(default_factory=dict)  # free-form: schedule, timings, accuracies

    @property
    def tokens_per_image(self) -> int:
        return self.vision.tokens_per_tile

    def to_json(self) -> dict:
        return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "vision": dataclasses.asdict(self.vision),
                "image_tokens": {"ids": [self.tokens.image_start, self.tokens.image, self.tokens.patch,
                                         self.tokens.image_end], "names": list(self.tokens.names)},
                "text": {"dim": self.text_dim, "n_layers": self.text_layers, "vocab_size": self.vocab_size,
                         "embedding_probe": self.probe, "base": self.base},
                "max_tiles": self.max_tiles, "training": self.training}

    @classmethod
    def from_json(cls, d: dict, where: str) -> "VisionSpec":
        known = {"format", "version", "vision", "image_tokens", "text", "max_tiles", "training"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise FormatError(f"{where}: unknown key(s) {unknown}")
        if d.get("format") != FORMAT_NAME or d.get("version") != FORMAT_VERSION:
            raise FormatError(f"{where}: format {d.get('format')!r} version {d.get('version')!r}, expected "
                              f"{FORMAT_NAME!r} version {FORMAT_VERSION}")
        try:
            fields = {f.name for f in dataclasses.fields(Llama4VisionConfig)}
            bad = sorted(set(d["vision"]) - fields)
            if bad:
                raise FormatError(f"{where}: vision: unknown key(s) {bad}")
            vision = Llama4VisionConfig(**d["vision"])
            ids, names = d["image_tokens"]["ids"], d["image_tokens"]["names"]
            tokens = ImageTokens(*[int(i) for i in ids], names=tuple(names))
            t = d["text"]
            return cls(vision, tokens, int(t["dim"]), int(t["n_layers"]), int(t["vocab_size"]),
                       [float(x) for x in t["embedding_probe"]], str(t.get("base", "")), int(d.get("max_tiles", 1)),
                       dict(d.get("training", {})))
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"{where}: missing or malformed entry ({type(e).__name__}: {e})") from None

    def check_base(self, text_model, where: str) -> None:
        """ConfigError unless text_model is the model this vision checkpoint was trained on."""
        c = text_model.config
        found = (c.dim, c.n_layers, c.vocab_size)
        if found != (self.text_dim, self.text_layers, self.vocab_size):
            raise ConfigError(f"{where}: trained on {self.base or 'another model'} (dim {self.text_dim}, "
                              f"{self.text_layers} layers, vocab {self.vocab_size}); this model has dim {found[0]}, "
                              f"{found[1]} layers, vocab {found[2]}")
        probe = torch.tensor(embedding_probe(text_model))
        ref = torch.tensor(self.probe)
        if probe.shape != ref.shape or float((probe - ref).abs().max()) > 0.1 * float(ref.pow(2).mean().sqrt()) + 1e-6:
            raise ConfigError(f"{where}: trained on {self.base or 'another model'}, whose token embeddings differ "
                              f"from this model's (same shape, other weights)")


def save_vision(vlm: VisionLM, spec: VisionSpec, folder: str | Path) -> Path:
    """Write the vision checkpoint folder (vision parts + markers, LoRA adapter if any, config json)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"vision.{k}": v.detach().float().contiguous() for k, v in vlm.vision.state_dict().items()}
    tensors["marker_embeddings"] = vlm.marker_embeddings.detach().float().contiguous()
    save_safetensors_atomic(tensors, folder / WEIGHTS_FILE)
    if lora_modules(vlm.text):
        save_adapter(vlm.text, folder, base_model=spec.base)
    write_text_atomic(folder / CONFIG_FILE, json.dumps(spec.to_json(), indent=2))
    return folder


def read_spec(folder: str | Path) -> VisionSpec:
    path = Path(folder) / CONFIG_FILE
    d = read_json(path, missing="not found; a vision checkpoint folder is written by `herd train-vision`")
    return VisionSpec.from_json(d, str(path))


def load_vision(folder: str | Path, text_model) -> tuple[VisionLM, VisionSpec]:
    """Attach a saved vision checkpoint to a loaded text model (its LoRA is added to that model, in place)."""
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    spec = read_spec(folder)
    spec.check_base(text_model, str(folder))
    path = folder / WEIGHTS_FILE
    try:
        with safe_open(path, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise FormatError(f"{path}: not found") from None
    except (SafetensorError, OSError) as e:
        raise FormatError(f"{path}: cannot be read ({e})") from None
    with torch.device("meta"):
        vision = Llama4VisionModel(spec.vision, spec.text_dim)
    expected = {f"vision.{k}": v for k, v in vision.state_dict().items()}
    expected["marker_embeddings"] = torch.empty(3, spec.text_dim, device="meta")
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise FormatError(f"{path}: missing tensors {missing[:6]}, unexpected tensors {unexpected[:6]}")
    for k, ref in expected.items():
        if tuple(tensors[k].shape) != tuple(ref.shape):
            raise FormatError(f"{path}: tensor {k} has shape {tuple(tensors[k].shape)}, the config expects "
                              f"{tuple(ref.shape)}")
    dtype = activation_dtype(text_model)
    vision.load_state_dict({k[len("vision."):]: v.to(dtype) for k, v in tensors.items() if k.startswith("vision.")},
                           assign=True)
    # the RoPE tables are non-persistent buffers: rebuild them off the meta device
    cos, sin = llama4_vision_rope(spec.vision)
    enc = vision.vision_embeddings.vision_encoder
    enc.rope_cos, enc.rope_sin = cos, sin
    if (folder / ADAPTER_CONFIG).exists():
        apply_adapter(text_model, folder)
    # the vision LoRA works only with images (VisionStep switches it on for rows with images): the text model stays the base model
    set_lora(text_model, False)
    vlm = VisionLM(text_model, vision, spec.tokens)
    with torch.no_grad():
        vlm.marker_embeddings.copy_(tensors["marker_embeddings"].to(dtype))
    for p in vlm.parameters():
        p.requires_grad_(False)
    return vlm.eval(), spec

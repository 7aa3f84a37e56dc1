"""QLoRA's base: the blocks' linear layers swapped for frozen quantized layers that the LoRA layers wrap.

The LoRA layers are herd/models/lora.py's; adapter folders (PEFT layout) are herd/formats/peft.py's.
"""

from __future__ import annotations

from torch import nn

from herd.errors import ConfigError


def is_gguf(path) -> bool:
    """Whether a model path or catalog name is a GGUF file."""
    from herd.formats import detect_format
    from herd.hub import resolve

    return detect_format(resolve(None if path is None else str(path))) == "gguf"


def quantized_base(model: nn.Module) -> None:
    """A model loaded with its GGUF blocks kept: checked to have quantized block layers, all set to float32
    activations for training (the gradient flows through x; no int rounding of it)."""
    from herd.quant.linear import QuantLinear

    if not any(isinstance(m, QuantLinear) for m in model.layers.modules()):
        raise ConfigError("QLoRA: no linear layer of the base is quantized (a float GGUF? use --method lora)")
    _float_activations(model)


def quantize_base(model: nn.Module, scheme: str = "q4_1") -> list[str]:
    """Swap a float base's (HF, Meta) block linear layers for frozen QuantLinear layers quantized to `scheme`
    (float32 activations, gradient to x only); embedding, norms and output layer stay float. A GGUF base keeps its
    own blocks instead: load it with keep_quantized=True and call quantized_base."""
    from herd.quant.model import quantize_model

    swapped = quantize_model(model, scheme, include=r"^layers\.", act="f32")
    if not swapped:
        raise ConfigError("QLoRA: no linear layer of the base could be quantized (a float GGUF? use --method lora)")
    _float_activations(model)
    return swapped


def _float_activations(model: nn.Module) -> None:
    from herd.quant.linear import QuantLinear

    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.act = "f32"  # training: float activations (no int8 rounding of x)

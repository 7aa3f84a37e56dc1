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
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.act = "f32"


def quantize_base(model: nn.Module, gguf_path=None, scheme: str = "q4_1") -> list[str]:
    """Swap the blocks' linear layers for frozen QuantLinear layers (float32 activations, gradient to x only).

    With a GGUF file, its own quantized blocks are used as they are (no re-quantization); otherwise (an HF or Meta
    float base) the weights are quantized to `scheme`. Embedding, norms and output layer stay float.
    """
    from herd.quant.linear import QuantLinear
    from herd.quant.model import load_quantized_linears, quantize_model

    if gguf_path is not None:
        from herd.formats.gguf import gguf_to_herd_name, read_gguf

        g = read_gguf(gguf_path)
        blocks = {}
        for gname, t in g.tensors.items():
            name = gguf_to_herd_name(gname, g.architecture)
            if name and name.startswith("layers.") and len(t.shape) == 2 and t.is_quantized:
                blocks[name] = (t.data, t.ggml_type, t.shape)
        swapped = load_quantized_linears(model, blocks, act="f32")
    else:
        swapped = quantize_model(model, scheme, include=r"^layers\.", act="f32")
    if not swapped:
        raise ConfigError("QLoRA: no linear layer of the base could be quantized (a float GGUF? use --method lora)")
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.act = "f32"  # training: float activations (no int8 rounding of x)
    return swapped

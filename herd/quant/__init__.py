"""Quantization: ggml block formats (`blocks`, numpy only) and the quantized linear layers built on them."""

from herd.quant.blocks import GGML_TYPES, QUANTIZABLE, dequantize, quantize, type_id, type_name

__all__ = ["GGML_TYPES", "QUANTIZABLE", "dequantize", "quantize", "type_id", "type_name"]

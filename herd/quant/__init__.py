"""Quantization floor: ggml block formats (blocks.py, numpy only), the quantized linear layers and experts built on them
(linear.py, experts.py), the whole-model swaps (model.py), the native kernels (native.py, csrc/) and the C decode step
(decode.py), attached to a model from outside.

May import herd.models (to swap their modules), herd.ops, herd.config and herd.errors; never formats, the engine or
above: reading GGUF files is formats/'s job, and formats/ hands the blocks in.
"""

from herd.quant.blocks import GGML_TYPES, QUANTIZABLE, dequantize, quantize, type_id, type_name

__all__ = ["GGML_TYPES", "QUANTIZABLE", "dequantize", "quantize", "type_id", "type_name"]

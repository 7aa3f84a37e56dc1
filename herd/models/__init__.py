"""Models floor: the Llama text transformer (llama.py), Llama 4's MoE (moe.py), the vision towers (vision.py), Llama
3.2 Vision (mllama.py), herd's own small vision model (vision_lm.py), LoRA as a module swap (lora.py) and the KV cache
(kv_cache.py).

May import herd.config, herd.errors and herd.ops only: no file I/O, no engine, no quantization, no formats. A model is
only a model -- forward(tokens, input_pos, cache) -> logits -- plain single-device PyTorch, usable on the meta
device, under torch.compile and in FSDP; faster paths (quantized layers, the native decode step, LoRA) are swapped in
or attached from outside.
"""

"""Engine floor: generation over models -- BatchRun (generate.py: prefill in slices, batched decode through the native
step when the model carries one), continuous batching with a paged KV cache (scheduler.py), and the one adapter for
prompts with images (vision_step.py).

May import herd.models, herd.ops, herd.config, herd.errors (and the floors below them); never herd.quant, formats or
anything above: a faster decode step reaches the engine as an attribute of the model it is handed.
"""

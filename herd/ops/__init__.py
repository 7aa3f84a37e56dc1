"""Ops floor: pure functions the models and engines share -- RoPE tables and rotation (rope.py), sampling with an
explicit torch.Generator (sampling.py).

May import herd.config and herd.errors only. Every function here is deterministic given its inputs and generator.
"""

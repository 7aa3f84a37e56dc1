"""QLoRA's base: the blocks' linear layers swapped for frozen quantized layers that the LoRA layers wrap; and the
fused LoRA step that training runs through every LoRA layer.

The LoRA layers are herd/models/lora.py's; adapter folders (PEFT layout) are herd/formats/peft.py's. `fuse_lora`
swaps each LoRA layer's forward (on the instance, from outside, as loss.loss_head does) for one autograd node,
_LoRAFunction: y = x W^T + s (x A^T) B^T. It keeps x (which the layer's neighbours share) and a = x A^T (N, r) for the
backward pass, and no weight: a frozen quantized base is dequantized for the call at hand, forward and backward, so
a float (out, in) copy of one layer exists at a time, never one of the model. The input gradient dx = dy W + s (dy B) A
is one GEMM plus one accumulating GEMM (no second (N, in) tensor and sum). compute="bfloat16" runs the two base GEMMs
(the bulk of a LoRA step) with bf16 inputs and float32 accumulation, QLoRA's compute dtype (Dettmers et al. 2023);
the LoRA products, the loss and every gradient stay float32. `fuse_swiglu` does the same for the feed-forward's
gate: silu(g) * u as one node keeping g and u, not also silu(g) (one (N, ffn) float32 tensor less per layer).

Shapes: N rows (tokens), in / out the layer's features, r the rank.
"""

from __future__ import annotations

import torch
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
    float_activations(model)


def quantize_base(model: nn.Module, scheme: str = "q4_1") -> list[str]:
    """Swap a float base's (HF, Meta) block linear layers for frozen QuantLinear layers quantized to `scheme`
    (float32 activations, gradient to x only); embedding, norms and output layer stay float. A GGUF base keeps its
    own blocks instead: load it with keep_quantized=True and call quantized_base."""
    from herd.quant.model import quantize_model

    swapped = quantize_model(model, scheme, include=r"^layers\.", act="f32")
    if not swapped:
        raise ConfigError("QLoRA: no linear layer of the base could be quantized (a float GGUF? use --method lora)")
    float_activations(model)
    return swapped


def float_activations(model: nn.Module) -> None:
    """Every quantized layer computes with float32 activations (training: no integer rounding of x)."""
    from herd.quant.linear import QuantLinear

    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.act = "f32"  # training: float activations (no int8 rounding of x)


# -- the fused LoRA step -------------------------------------------------------------------------------------------

COMPUTE = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX): where torch's bf16 GEMM is the fast one
    (measured on an AVX512-BF16 core: 1024 x 576 x 1536 in 4.4 ms vs 21 ms in float32)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _base_weight(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The frozen base's (out, in) weight in `dtype`: a float base's own tensor (no copy in float32), a quantized
    base's blocks dequantized for this call."""
    w = base.weight.detach() if isinstance(base, nn.Linear) else base.dequantize()
    return w if w.dtype is dtype else w.to(dtype)


class _LoRAFunction(torch.autograd.Function):
    """y = x W^T + s (x A^T) B^T with W frozen; gradients for x, A and B."""

    @staticmethod
    def forward(ctx, x, A, B, base, scaling, dtype):
        # x (..., in) float32, A (r, in), B (out, r)
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        w = _base_weight(base, dtype)  # (out, in), transient for a quantized base
        y = x2 @ w.t() if dtype is torch.float32 else (x2.to(dtype) @ w.t()).float()  # (N, out)
        a = x2 @ A.t()  # (N, r)
        y.addmm_(a, B.t(), alpha=scaling)
        ctx.save_for_backward(x2, a, A, B)
        ctx.base, ctx.scaling, ctx.dtype = base, scaling, dtype
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, a, A, B = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])  # (N, out)
        s = ctx.scaling
        g_a = torch.mm(dy2, B).mul_(s)  # (N, r): the gradient reaching a
        gA = g_a.t() @ x2 if ctx.needs_input_grad[1] else None  # (r, in)
        gB = torch.mm(dy2.t(), a).mul_(s) if ctx.needs_input_grad[2] else None  # (out, r)
        dx = None
        if ctx.needs_input_grad[0]:
            w = _base_weight(ctx.base, ctx.dtype)
            dx = dy2 @ w if ctx.dtype is torch.float32 else (dy2.to(ctx.dtype) @ w).float()  # (N, in)
            dx.addmm_(g_a, A)
            dx = dx.view(*dy.shape[:-1], dx.shape[-1])
        return dx, gA, gB, None, None, None


def fuse_lora(model: nn.Module, compute: str = "float32") -> int:
    """Route every LoRA layer of the model through _LoRAFunction (module docstring) when autograd records; returns how
    many. Layers it cannot serve (dropout, a bias, per-row scaling, a non-float32 input) keep their own forward."""
    from herd.models.lora import lora_modules

    if compute not in COMPUTE:
        raise ConfigError(f"compute must be one of {list(COMPUTE)}, got {compute!r}")
    dtype = COMPUTE[compute]
    mods = list(lora_modules(model).values())
    for m in mods:
        if isinstance(m.dropout, nn.Dropout) or getattr(m.base, "bias", None) is not None:
            continue

        def forward(x, _m=m, _own=type(m).forward):
            # without autograd (evaluation, the answer check's decoding) the layer's own call is the fast one: a
            # quantized base multiplies its blocks directly there (one-row kernels), with no float weight at all
            if (not torch.is_grad_enabled() or _m.row_scaling is not None or x.dtype is not torch.float32
                    or _m.lora_A.weight.dtype is not torch.float32):
                return _own(_m, x)
            return _LoRAFunction.apply(x, _m.lora_A.weight, _m.lora_B.weight, _m.base, _m.scaling, dtype)

        m.forward = forward
    return len(mods)


class _SwiGLU(torch.autograd.Function):
    """p = silu(g) * u, keeping g and u only; silu(g) and sigmoid(g) are recomputed in the backward pass."""

    @staticmethod
    def forward(ctx, g, u):
        ctx.save_for_backward(g, u)
        return torch.nn.functional.silu(g).mul_(u)

    @staticmethod
    def backward(ctx, dp):
        g, u = ctx.saved_tensors
        sig = torch.sigmoid(g)
        du = (g * sig).mul_(dp) if ctx.needs_input_grad[1] else None  # silu(g) dp
        # d silu(g) / dg = sig (1 + g (1 - sig)), as torch's silu_backward
        dg = (dp * u).mul_(sig).mul_((1 - sig).mul_(g).add_(1)) if ctx.needs_input_grad[0] else None
        return dg, du


def fuse_swiglu(model: nn.Module) -> int:
    """Route every dense SwiGLU feed-forward's gate through _SwiGLU when autograd records (instance forward swap,
    from outside); returns how many. MoE layers keep theirs."""
    from herd.models.llama import FeedForward

    mods = [m for m in model.modules() if type(m) is FeedForward]
    for ff in mods:
        def forward(x, _ff=ff):
            if not torch.is_grad_enabled():
                return type(_ff).forward(_ff, x)
            return _ff.w2(_SwiGLU.apply(_ff.w1(x), _ff.w3(x)))

        ff.forward = forward
    return len(mods)

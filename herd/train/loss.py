"""Cross entropy through the output layer without the batch's logits: the loss and its gradients a chunk of rows at
a time, for pretrain, distill's CE term and finetune alike.

Shapes: N target positions, D model dim, V vocabulary, C rows per chunk. A plain `F.cross_entropy(h @ W.T)` holds
the float32 logits (N, V), their log-softmax and, in the backward pass, their gradient: three (N, V) float32 arrays,
600 MB for one 1,024-token row of a 49,152-word vocabulary, which is more than the rest of a LoRA step on a 135M
model. Here each chunk's logits (C, V) live only inside the forward pass, which also computes the gradients (with
respect to h, and to W when it is trained) while the chunk is at hand, as Liger-Kernel's fused linear cross entropy
does; the backward pass only scales them by the incoming gradient. Peak extra memory: one (C, V) float32 chunk plus
the (N, D) gradient of h and, when W is trained, a float32 (V, D) gradient of W.

The model is not changed: `loss_head` swaps the output layer's forward for the duration of one model call, so the
call returns the summed loss instead of logits. That keeps FSDP2, DDP and activation checkpointing, which hook the
model's own call, working as before.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

IGNORE = -100  # label of a position without loss (data.IGNORE, torch's ignore_index)
CHUNK_ELEMS = 1 << 23  # logits per chunk: 32 MiB of float32 (C = 170 rows at V = 49,152)


class _LinearCrossEntropy(torch.autograd.Function):
    """sum over rows with a label of -log softmax(h W^T)[label]; gradients computed in the forward pass."""

    @staticmethod
    def forward(ctx, h, weight, labels, chunk, grads):
        # h (N, D), weight (V, D), labels (N,) int64 with IGNORE for rows without loss; grads: False under no_grad
        want_h, want_w = grads and ctx.needs_input_grad[0], grads and ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        gh = torch.empty_like(h) if want_h else None  # (N, D)
        gw = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if want_w else None  # (V, D)
        # float32 h and W: one (C, V) buffer written by the GEMM and reused by every chunk, with the softmax and its
        # gradient computed in place (a fresh 32 MiB block per chunk is mmapped and page-faulted anew: measured
        # ~0.15 s per 1,024-token row on 2 cores); other dtypes take the allocating path
        same = h.dtype is torch.float32 and weight.dtype is torch.float32
        buf = torch.empty((min(chunk, h.shape[0]), weight.shape[0]), dtype=torch.float32, device=h.device) \
            if same else None
        for s in range(0, h.shape[0], chunk):
            hc, yc = h[s:s + chunk], labels[s:s + chunk]  # (C, D), (C,)
            if same:
                z = torch.mm(hc, weight.t(), out=buf[:hc.shape[0]])  # (C, V): the only logits that exist at a time
            else:
                z = (hc @ weight.t()).float()
            valid = yc != IGNORE
            y = torch.where(valid, yc, 0)
            zy = z.gather(1, y[:, None])[:, 0]  # (C,) the targets' logits, read before z is overwritten
            # log-sum-exp as torch.logsumexp computes it (max + log sum exp(z - max)), with exp(z - max) left in z
            m = z.amax(dim=-1, keepdim=True)  # (C, 1)
            z.sub_(m).exp_()
            se = z.sum(dim=-1, keepdim=True)  # (C, 1)
            lse = m[:, 0] + se[:, 0].log()  # (C,)
            total += ((lse - zy) * valid).sum()
            if want_h or want_w:
                # d loss / d z = softmax(z) - onehot(y), zero on rows without a label; computed in place in z
                z.div_(se)
                z[torch.arange(len(y), device=z.device), y] -= 1.0
                if not bool(valid.all()):
                    z.mul_(valid[:, None])
                if want_h:
                    if same:
                        torch.mm(z, weight, out=gh[s:s + chunk])
                    else:
                        gh[s:s + chunk] = (z.to(weight.dtype) @ weight).to(h.dtype)
                if want_w:
                    gw.addmm_(z.t(), hc.float())
        ctx.save_for_backward(gh, gw)
        ctx.w_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, g):
        gh, gw = ctx.saved_tensors
        return (None if gh is None else gh * g.to(gh.dtype),
                None if gw is None else (gw * g).to(ctx.w_dtype), None, None, None)


def _chunk_rows(vocab: int) -> int:
    return max(1, CHUNK_ELEMS // max(vocab, 1))


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int | None = None
                         ) -> torch.Tensor:
    """Summed cross entropy of logits h @ weight.T (float32) against labels (IGNORE: no loss), chunk rows at a time.
    h (..., D), labels (...), weight (V, D) -> float32 scalar; equal to F.cross_entropy(logits.float(), labels,
    reduction="sum") up to float32 rounding (tests/test_train_lean.py)."""
    D = h.shape[-1]
    h2, y = h.reshape(-1, D), labels.reshape(-1)
    if y.shape[0] != h2.shape[0]:
        raise ValueError(f"{h2.shape[0]} rows of hidden states but {y.shape[0]} labels")
    return _LinearCrossEntropy.apply(h2, weight, y, chunk or _chunk_rows(weight.shape[0]), torch.is_grad_enabled())


@contextlib.contextmanager
def loss_head(output: nn.Module, labels: torch.Tensor):
    """Within the block, a call of the model that owns `output` (its vocabulary projection: an nn.Linear, or a
    quantized layer with dequantize()) returns the summed cross entropy against labels (shaped like the rows output
    receives, minus the last axis) instead of logits. The forward is swapped on the instance for this block only."""
    def forward(h):
        # a quantized output layer (QLoRA over a GGUF base, tied to the embedding's blocks) is frozen: its float
        # weight exists only for this call, and the loss needs it in the forward pass alone
        w = output.weight if isinstance(output, nn.Linear) else output.dequantize()
        return linear_cross_entropy(h, w, labels)

    had = "forward" in output.__dict__
    saved = output.__dict__.get("forward")
    output.forward = forward
    try:
        yield
    finally:
        if had:
            output.forward = saved
        else:
            del output.forward

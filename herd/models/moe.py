"""Llama 4 mixture of experts: a top-k sigmoid router, routed SwiGLU experts and one shared expert (SPEC.md §5).

    y = SharedExpert(x) + sum over the k chosen experts e of Expert_e(x * sigmoid(router_logit_e))

The router's score scales the expert's INPUT, not its output (Meta moe.py and HF Llama4TextMoe agree). A SwiGLU
without biases maps 0 to 0, so the experts a token did not choose contribute nothing; Meta and HF still run every
expert on every token (inputs scaled by 0), herd groups the routed tokens by expert and runs only the chosen
experts, one matmul chain per expert on all of its tokens, so the cost follows the active parameters.

Shape legend (the suffixes of Meta's moe.py): a tokens (B*T), D model dim, E experts, F expert hidden size,
K experts per token (top_k), g routed (token, expert) pairs = a*K, sorted by expert.

Weight names and layouts are those of Meta's reference model after its load hooks, so a herd state dict loads into
`llama_models.llama4` as it is:
    feed_forward.router_DE                  (D, E)     router logits = x @ router_DE
    feed_forward.experts.w1 / .w3           (E, D, F)  gate / up projection of expert e: x @ w1[e]
    feed_forward.experts.w2                 (E, F, D)  down projection
    feed_forward.shared_expert.w1/w3/w2     nn.Linear (F, D) / (F, D) / (D, F), a plain FeedForward
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from herd.config import ModelConfig
from herd.models.llama import FeedForward  # the dense SwiGLU, shared with the Llama layers


class Experts(nn.Module):
    """E SwiGLU experts stored as plain stacked tensors.

    The interface is forward(x_gD, counts): rows sorted by expert, counts[e] of them for expert e. A quantized
    variant replaces this module whole (same interface), as quantized linear layers replace nn.Linear.
    """

    def __init__(self, n_experts: int, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, dim, hidden))  # gate
        self.w3 = nn.Parameter(torch.empty(n_experts, dim, hidden))  # up
        self.w2 = nn.Parameter(torch.empty(n_experts, hidden, dim))  # down

    def forward(self, x_gD: torch.Tensor, counts: list[int]) -> torch.Tensor:
        out_gD = torch.empty_like(x_gD)
        start = 0
        for e, n in enumerate(counts):  # one matmul chain per expert that received tokens; the rest never run
            if n == 0:
                continue
            x_nD = x_gD[start:start + n]
            h_nF = F.silu(x_nD @ self.w1[e]) * (x_nD @ self.w3[e])
            out_gD[start:start + n] = h_nF @ self.w2[e]
            start += n
        return out_gD


class MoE(nn.Module):
    """forward(x (B, T, D)) -> (B, T, D): shared expert on every token plus the top-k routed experts."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        m = config.moe
        self.n_experts, self.top_k = m.n_experts, m.top_k
        self.router_DE = nn.Parameter(torch.empty(config.dim, m.n_experts))
        self.experts = Experts(m.n_experts, config.dim, m.expert_ffn_dim)
        self.shared_expert = FeedForward(config.dim, m.expert_ffn_dim) if m.shared_expert else None

    def route(self, x_aD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(experts (a, K) int64, scores (a, K)): the top-k router logits and their sigmoids, in x's dtype."""
        logits_aE = x_aD @ self.router_DE
        top_aK, experts_aK = torch.topk(logits_aE, self.top_k, dim=-1)
        return experts_aK, torch.sigmoid(top_aK.float()).type_as(x_aD)  # sigmoid in fp32, as HF does

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        x_aD = x.reshape(-1, D)
        experts_aK, scores_aK = self.route(x_aD)
        # group the a*K (token, expert) pairs by expert: a stable sort keeps each expert's tokens in order
        expert_g = experts_aK.reshape(-1)
        order_g = torch.argsort(expert_g, stable=True)
        token_g = torch.div(order_g, self.top_k, rounding_mode="floor")
        routed_gD = x_aD[token_g] * scores_aK.reshape(-1)[order_g, None]  # the score scales the input
        counts = torch.bincount(expert_g, minlength=self.n_experts).tolist()
        y_gD = self.experts(routed_gD, counts)
        out_aD = self.shared_expert(x_aD) if self.shared_expert is not None else torch.zeros_like(x_aD)
        out_aD = out_aD.index_add(0, token_g, y_gD)  # sum each token's k expert outputs into its row
        return out_aD.view(B, T, D)

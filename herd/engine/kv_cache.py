"""A preallocated key/value cache: one (B, KV, S, hd) buffer pair per layer, written at explicit positions."""

from __future__ import annotations

import torch

from herd.config import ModelConfig


class KVCache:
    """Static cache for `batch` sequences of up to `max_len` positions each.

    k[layer], v[layer]: (B, n_kv_heads, max_len, head_dim). Buffers start as zeros, never `empty`: masked slots are
    multiplied by a zero attention weight, and 0 * NaN from uninitialised memory would still poison the output.
    """

    def __init__(self, config: ModelConfig, batch: int, max_len: int, dtype=torch.float32, device="cpu"):
        self.batch, self.max_len = batch, max_len
        shape = (batch, config.n_kv_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]

    def rows(self, index: slice | int) -> "KVCache":
        """A view of some rows (sequences) of this cache; writes go to the same memory."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        view = KVCache.__new__(KVCache)
        view.k = [t[index] for t in self.k]
        view.v = [t[index] for t in self.v]
        view.batch, view.max_len = view.k[0].shape[0], self.max_len
        return view

    def update(self, layer: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int,
               rows: torch.Tensor | None = None):
        """Write k, v (B, T, KV, hd) at positions input_pos (B, T) of cache rows `rows` (B,) (default: all, in
        order); return the first kv_len cached positions of those rows, (B, KV, S', hd)."""
        index = (torch.arange(k.shape[0], device=k.device) if rows is None else rows).unsqueeze(1)  # (B, 1)
        self.k[layer][index, :, input_pos] = k
        self.v[layer][index, :, input_pos] = v
        if rows is None:  # a view, no copy
            return self.k[layer][:, :, :kv_len], self.v[layer][:, :, :kv_len]
        return self.k[layer][rows, :, :kv_len], self.v[layer][rows, :, :kv_len]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

"""A preallocated key/value cache: one (B, KV, S, hd) buffer pair per layer, written at explicit positions.

Llama 4's chunked-attention layers (RoPE layers with attention_chunk_size C) never look further back than the start
of their own chunk, so when the cache is longer than C their buffers are rings of W = C slots: position p lives in
slot p % W. Those layers' memory is bounded by the chunk size, not by the context; only the NoPE (global) layers
hold the whole context.
"""

from __future__ import annotations

import torch

from herd.config import ModelConfig


class KVCache:
    """Static cache for `batch` sequences of up to `max_len` positions each.

    k[layer], v[layer]: (B, n_kv_heads, max_len, head_dim), or (B, n_kv_heads, window, head_dim) for a ring layer.
    Buffers start as zeros, never `empty`: masked slots are multiplied by a zero attention weight, and 0 * NaN from
    uninitialised memory would still poison the output.

    Like the full buffers, the rings assume each row's positions are written contiguously from 0 (prefill, then
    decode), so that the positions a ring holds follow from the row's current position (see ring_positions).
    """

    def __init__(self, config: ModelConfig, batch: int, max_len: int, dtype=torch.float32, device="cpu"):
        self.batch, self.max_len = batch, max_len
        chunk = config.attention_chunk_size
        self.window = chunk if (chunk and max_len > chunk) else 0  # 0: no ring layers
        self.ring = [bool(self.window) and config.is_chunked_layer(i) for i in range(config.n_layers)]
        self.k, self.v = [], []
        for ring in self.ring:
            shape = (batch, config.n_kv_heads, self.window if ring else max_len, config.head_dim)
            self.k.append(torch.zeros(shape, dtype=dtype, device=device))
            self.v.append(torch.zeros(shape, dtype=dtype, device=device))

    def rows(self, index: slice | int) -> "KVCache":
        """A view of some rows (sequences) of this cache; writes go to the same memory."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        view = KVCache.__new__(KVCache)
        view.k = [t[index] for t in self.k]
        view.v = [t[index] for t in self.v]
        view.batch, view.max_len = view.k[0].shape[0], self.max_len
        view.window, view.ring = self.window, self.ring
        return view

    def update(self, layer: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int,
               rows: torch.Tensor | None = None):
        """Write k, v (B, T, KV, hd) at positions input_pos (B, T) of cache rows `rows` (B,) (default: all, in
        order); return the keys and values to attend to, (B, KV, S', hd): the first kv_len cached positions, or for
        a ring layer the keys at ring_positions(input_pos)."""
        index = (torch.arange(k.shape[0], device=k.device) if rows is None else rows).unsqueeze(1)  # (B, 1)
        kbuf, vbuf = self.k[layer], self.v[layer]
        if self.ring[layer]:
            return self._update_ring(kbuf, vbuf, index, input_pos, k, v, rows)
        kbuf[index, :, input_pos] = k
        vbuf[index, :, input_pos] = v
        if rows is None:  # a view, no copy
            return kbuf[:, :, :kv_len], vbuf[:, :, :kv_len]
        return kbuf[rows, :, :kv_len], vbuf[rows, :, :kv_len]

    def _update_ring(self, kbuf, vbuf, index, input_pos, k, v, rows):
        W, T = self.window, k.shape[1]
        if T == 1:  # decode: write first, then the ring holds exactly the W positions up to this one
            kbuf[index, :, input_pos % W] = k
            vbuf[index, :, input_pos % W] = v
            return (kbuf, vbuf) if rows is None else (kbuf[rows], vbuf[rows])
        # prefill: the new tokens may overwrite slots that earlier new tokens still need, so attend to
        # [ring as it was, new keys] and write only the last W new positions afterwards
        old_k, old_v = (kbuf, vbuf) if rows is None else (kbuf[rows], vbuf[rows])
        keys = torch.cat((old_k, k.transpose(1, 2)), dim=2)  # (B, KV, W + T, hd)
        values = torch.cat((old_v, v.transpose(1, 2)), dim=2)
        last = input_pos[:, -W:]
        kbuf[index, :, last % W] = k[:, -W:]
        vbuf[index, :, last % W] = v[:, -W:]
        return keys, values

    def ring_positions(self, input_pos: torch.Tensor) -> torch.Tensor:
        """Positions (B, S') of the keys a ring layer's update returns for new tokens at input_pos (B, T).

        A ring that has seen positions 0 .. e-1 holds in slot s the position e-1 - ((e-1-s) mod W); negative means
        never written (the chunk test in the mask rejects it, as its chunk index is negative).
        """
        W, T = self.window, input_pos.shape[1]
        slots = torch.arange(W, device=input_pos.device)
        end = input_pos[:, :1] + (1 if T == 1 else 0)  # (B, 1): positions before `end` are in the ring
        ring = end - 1 - torch.remainder(end - 1 - slots, W)  # (B, W)
        return ring if T == 1 else torch.cat((ring, input_pos), dim=1)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

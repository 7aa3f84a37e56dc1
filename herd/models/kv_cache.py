"""A preallocated key/value cache: one (B, KV, S, hd) buffer pair per layer, written at explicit positions.

Llama 4's chunked-attention layers (RoPE layers with attention_chunk_size C) never look further back than the start
of their own chunk, so when the cache is longer than C their buffers are rings of W = C slots: position p lives in
slot p % W. Those layers' memory is bounded by the chunk size, not by the context; only the NoPE (global) layers
hold the whole context.

The cache holds keys and values as float32 (the default, exact), float16 or q8_0 (llama.cpp's `-ctk/-ctv`): each
head vector of hd values stored as hd/32 blocks of an fp16 scale d = max|x| / 127 and 32 int8 q = round(x / d),
34 bytes per block as ggml's block_q8_0. `kv_encode` / `kv_decode` are the one definition of those formats; the
native decode step (herd/quant/csrc/herd_decode.c) writes and reads the same bytes with the same arithmetic.
"""

from __future__ import annotations

import torch

from herd.config import ModelConfig
from herd.errors import ConfigError

KV_TYPES = ("f32", "f16", "q8_0")
_Q8_BLOCK, _Q8_BYTES = 32, 34


def kv_type_of(name: str | None) -> str:
    """The canonical KV cache type for a user's spelling (None -> f32): f32/float32, f16/float16, q8_0/q8."""
    key = (name or "f32").lower()
    key = {"float32": "f32", "fp32": "f32", "float16": "f16", "fp16": "f16", "half": "f16", "q8": "q8_0"}.get(key, key)
    if key not in KV_TYPES:
        raise ConfigError(f"unknown KV cache type {name!r}: choose one of {', '.join(KV_TYPES)}")
    return key


def kv_storage(kv_type: str, head_dim: int) -> tuple[torch.dtype, int]:
    """(storage dtype, storage elements per head vector) for a KV cache type."""
    if kv_type == "f16":
        return torch.float16, head_dim
    if kv_type == "q8_0":
        if head_dim % _Q8_BLOCK:
            raise ConfigError(f"a q8_0 KV cache needs a head dimension divisible by 32, not {head_dim}")
        return torch.uint8, head_dim // _Q8_BLOCK * _Q8_BYTES
    return torch.float32, head_dim


def kv_encode(x: torch.Tensor, kv_type: str) -> torch.Tensor:
    """Head vectors x (..., hd), float -> the cache's storage (..., kv_storage(kv_type, hd)[1])."""
    if kv_type == "f16":
        return x.to(torch.float16)
    if kv_type != "q8_0":
        return x
    x = x.float()
    blocks = x.reshape(*x.shape[:-1], -1, _Q8_BLOCK)
    d = blocks.abs().amax(-1, keepdim=True) / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    y = blocks * inv
    q = (torch.sign(y) * torch.floor(y.abs() + 0.5)).to(torch.int8)  # round half away from zero, as C's below
    packed = torch.cat((d.to(torch.float16).view(torch.uint8), q.view(torch.uint8)), dim=-1)  # (..., nb, 34)
    return packed.reshape(*x.shape[:-1], -1)


def kv_decode(s: torch.Tensor, kv_type: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The cache's storage (..., n) -> float head vectors (..., hd) in `dtype`."""
    if kv_type == "f32":
        return s if s.dtype == dtype else s.to(dtype)
    if kv_type == "f16":
        return s.to(dtype)
    blocks = s.reshape(*s.shape[:-1], -1, _Q8_BYTES)
    d = blocks[..., :2].contiguous().view(torch.float16).float()  # (..., nb, 1)
    q = blocks[..., 2:].contiguous().view(torch.int8).float()
    return (q * d).reshape(*s.shape[:-1], -1).to(dtype)


class KVCache:
    """Static cache for `batch` sequences of up to `max_len` positions each.

    k[layer], v[layer]: (B, n_kv_heads, max_len, head_dim), or (B, n_kv_heads, window, head_dim) for a ring layer.
    Buffers start as zeros, never `empty`: masked slots are multiplied by a zero attention weight, and 0 * NaN from
    uninitialised memory would still poison the output.

    Like the full buffers, the rings assume each row's positions are written contiguously from 0 (prefill, then
    decode), so that the positions a ring holds follow from the row's current position (see ring_positions).
    """

    def __init__(self, config: ModelConfig, batch: int, max_len: int, dtype=torch.float32, device="cpu",
                 kv_type: str | None = None):
        self.batch, self.max_len = batch, max_len
        self.kv_type, self.dtype = kv_type_of(kv_type), dtype
        store, width = kv_storage(self.kv_type, config.head_dim)
        store = dtype if self.kv_type == "f32" else store
        chunk = config.attention_chunk_size
        self.window = chunk if (chunk and max_len > chunk) else 0  # 0: no ring layers
        self.ring = [bool(self.window) and config.is_chunked_layer(i) for i in range(config.n_layers)]
        self.k, self.v = [], []
        for ring in self.ring:
            shape = (batch, config.n_kv_heads, self.window if ring else max_len, width)
            self.k.append(torch.zeros(shape, dtype=store, device=device))
            self.v.append(torch.zeros(shape, dtype=store, device=device))

    def rows(self, index: slice | int) -> "KVCache":
        """A view of some rows (sequences) of this cache; writes go to the same memory."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        view = KVCache.__new__(KVCache)
        view.k = [t[index] for t in self.k]
        view.v = [t[index] for t in self.v]
        view.batch, view.max_len = view.k[0].shape[0], self.max_len
        view.window, view.ring = self.window, self.ring
        view.kv_type, view.dtype = self.kv_type, self.dtype
        return view

    def update(self, layer: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int,
               rows: torch.Tensor | None = None):
        """Write k, v (B, T, KV, hd) at positions input_pos (B, T) of cache rows `rows` (B,) (default: all, in
        order); return the keys and values to attend to, (B, KV, S', hd): the first kv_len cached positions, or for
        a ring layer the keys at ring_positions(input_pos)."""
        index = (torch.arange(k.shape[0], device=k.device) if rows is None else rows).unsqueeze(1)  # (B, 1)
        kbuf, vbuf = self.k[layer], self.v[layer]
        t = self.kv_type
        if t != "f32":  # stored in another format: written encoded, read back decoded to the activations' dtype
            k, v = kv_encode(k, t), kv_encode(v, t)
        if self.ring[layer]:
            keys, values = self._update_ring(kbuf, vbuf, index, input_pos, k, v, rows)
        else:
            kbuf[index, :, input_pos] = k
            vbuf[index, :, input_pos] = v
            if rows is None:  # a view, no copy
                keys, values = kbuf[:, :, :kv_len], vbuf[:, :, :kv_len]
            else:
                keys, values = kbuf[rows, :, :kv_len], vbuf[rows, :, :kv_len]
        if t != "f32":
            keys, values = kv_decode(keys, t, self.dtype), kv_decode(values, t, self.dtype)
        return keys, values

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

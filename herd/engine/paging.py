"""Paged KV memory for continuous batching: the page pool and page table (PagedKVCache), the allocator with its
prefix cache (PagePool), and the granules that make a row's arithmetic independent of its batch.

Every layer's keys and values live in one pool of fixed-size pages shared by all sequences; each sequence owns a
list of pages (its row of the page table). Full pages written by a prefill are registered under (parent page's
serial, their tokens), so a later prompt with the same prefix reuses them; unused cached pages wait in LRU order
(children before parents) until the allocator needs them back. Chains start at a root: 0 for text, another root for
rows whose keys differ for the same ids (a LoRA switched on for rows with images).

Floor: engine/ (imports torch, herd.errors and the KV formats of herd.models.kv_cache). The scheduler (scheduler.py) decides who gets pages; this file
only keeps them.
"""

from __future__ import annotations

import functools
import itertools
from collections import OrderedDict
from typing import Sequence

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from herd.models.kv_cache import kv_decode, kv_encode, kv_storage, kv_type_of


class PagedKVCache:
    """Keys and values of all sequences in one page pool per layer, addressed through a page table.

    k[layer], v[layer]: (n_pages, P, KV, hd); page 0 is the null page (unassigned table entries point there, and
    padding rows write there; its content is only ever read at masked positions). table: (rows, pages_per_row).
    Implements the `update` contract of KVCache, so the model runs on it unchanged; a quantized model's native decode
    step reads and writes these buffers in place through the same table (herd/quant/decode.py).
    """

    def __init__(self, config, n_pages: int, page_size: int, rows: int, pages_per_row: int,
                 dtype=torch.float32, device="cpu", kv_type: str | None = None):
        self.page_size, self.n_pages = page_size, n_pages
        self.max_len = pages_per_row * page_size
        self.window = 0  # no ring layers: Llama 4 chunked layers see all positions, masked by chunk
        # f32 (stored in the activations' dtype), f16 or q8_0: see herd/models/kv_cache.py
        self.kv_type, self.dtype = kv_type_of(kv_type), dtype
        store, width = kv_storage(self.kv_type, config.head_dim)
        dtype = dtype if self.kv_type == "f32" else store
        shape = (n_pages, page_size, config.n_kv_heads, width)
        # zeros, never empty: masked positions get a zero weight, and 0 * NaN would still be NaN
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.table = torch.zeros((rows, pages_per_row), dtype=torch.long, device=device)
        self._memo: tuple | None = None

    def _index(self, input_pos: torch.Tensor, rows: torch.Tensor, kv_len: int):
        """(page (B, T), offset (B, T), gather table (B, n)) for one forward; computed once, reused by every layer."""
        memo = self._memo
        if memo is not None and memo[0] is input_pos and memo[1] is rows and memo[2] == kv_len:
            return memo[3]
        P = self.page_size
        page = self.table[rows[:, None], torch.div(input_pos, P, rounding_mode="floor")]
        n = -(-kv_len // P)
        out = (page, input_pos % P, self.table[rows, :n])
        self._memo = (input_pos, rows, kv_len, out)
        return out

    def update(self, layer: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int,
               rows: torch.Tensor | None = None):
        """Write k, v (B, T, KV, hd) at input_pos (B, T) of table rows `rows` (B,); return the first kv_len
        positions of those rows, (B, KV, kv_len, hd)."""
        if rows is None:
            rows = torch.arange(k.shape[0], device=k.device)
        page, off, gather = self._index(input_pos, rows, kv_len)
        t = self.kv_type
        if t != "f32":
            k, v = kv_encode(k, t), kv_encode(v, t)
        self.k[layer][page, off] = k
        self.v[layer][page, off] = v
        B = k.shape[0]
        ks = self.k[layer][gather].reshape(B, -1, *k.shape[2:])[:, :kv_len]  # (B, S, KV, hd)
        vs = self.v[layer][gather].reshape(B, -1, *v.shape[2:])[:, :kv_len]
        if t != "f32":
            ks, vs = kv_decode(ks, t, self.dtype), kv_decode(vs, t, self.dtype)
        return ks.transpose(1, 2), vs.transpose(1, 2)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class PagePool:
    """Page allocator with reference counts and a prefix cache of full pages (LRU when unused)."""

    def __init__(self, n_pages: int, page_size: int, prefix_cache: bool = True):
        self.page_size, self.prefix_cache = page_size, prefix_cache
        self.free = list(range(n_pages - 1, 0, -1))  # page 0 is the null page
        self.ref = [0] * n_pages
        self.key_of: dict[int, tuple] = {}
        self.page_of: dict[tuple, int] = {}
        self.serial: dict[int, int] = {}
        self.lru: OrderedDict[int, None] = OrderedDict()  # cached pages nobody uses, oldest first
        self._serials = itertools.count(1)
        self.n_pages = n_pages

    def available(self) -> int:
        return len(self.free) + len(self.lru)

    def used(self) -> int:
        return self.n_pages - 1 - self.available()

    def alloc(self) -> int | None:
        if self.free:
            page = self.free.pop()
        elif self.lru:
            page, _ = self.lru.popitem(last=False)
            del self.page_of[self.key_of.pop(page)]
            del self.serial[page]
        else:
            return None
        self.ref[page] = 1
        return page

    def match(self, tokens: Sequence[int], limit: int, root: int = 0) -> list[int]:
        """Cached pages holding a prefix of tokens (at most `limit` tokens) in the chains that start at `root` (0:
        text; another root for rows whose keys differ for the same ids, e.g. with a LoRA on), each referenced once
        more."""
        if not self.prefix_cache:
            return []
        P, parent, pages = self.page_size, root, []
        for i in range(limit // P):
            page = self.page_of.get((parent, tuple(tokens[i * P:(i + 1) * P])))
            if page is None:
                break
            pages.append(page)
            parent = self.serial[page]
        for page in pages:
            self.ref[page] += 1
            self.lru.pop(page, None)
        return pages

    def register(self, pages: Sequence[int], tokens: Sequence[int], root: int = 0) -> None:
        """Make every full page of a sequence (tokens: its ids in cache, in position order) findable by match."""
        if not self.prefix_cache:
            return
        P, parent = self.page_size, root
        for i in range(min(len(tokens) // P, len(pages))):
            page = pages[i]
            if page in self.key_of:
                parent = self.serial[page]
                continue
            key = (parent, tuple(tokens[i * P:(i + 1) * P]))
            other = self.page_of.get(key)
            if other is not None:  # the same content already cached in another page: follow that chain
                parent = self.serial[other]
                continue
            self.key_of[page], self.page_of[key] = key, page
            self.serial[page] = parent = next(self._serials)

    def release(self, pages: Sequence[int]) -> None:
        # children first, so that the LRU evicts a chain from its tail and never orphans a cached child
        for page in reversed(pages):
            self.ref[page] -= 1
            if self.ref[page] == 0:
                if page in self.key_of:
                    self.lru[page] = None
                else:
                    self.free.append(page)


OUTPUT_PROBE_ROWS = 1024


def row_granule(model, max_rows: int = 64) -> int:
    """Smallest g such that the model's linear layers give each row bit-identical results for every row count
    that is a multiple of g (BLAS kernels change with the row count, and each weight shape has its own boundaries:
    on one CPU 64 -> 160 repeats every 4 rows, 160 -> 64 only every 8). Every distinct shape of a block's linear
    layers is probed, and the output layer on its first OUTPUT_PROBE_ROWS outputs (the kernel choice follows the row
    count and the inner size, not the number of outputs). Quantized layers run herd's own kernels: the first one is
    probed. 0 if no g up to 16 serves them all."""
    linears = [m for m in model.layers[0].modules()
               if hasattr(m, "in_features") and hasattr(m, "out_features") and not list(m.children())]
    if any(type(m) is not torch.nn.Linear for m in linears):  # quantized kernels: their first layer tells
        weight = next(iter(linears[0].parameters()), None)
        dtype = weight.dtype if weight is not None and weight.is_floating_point() else torch.float32
        return _granule(linears[0], linears[0].in_features, dtype, max_rows)
    probes = {}  # (in, out) -> (forward, in_features, dtype)
    for m in linears:
        probes.setdefault((m.in_features, m.out_features), (m, m.in_features, m.weight.dtype))
    out = getattr(model, "output", None)
    if type(out) is torch.nn.Linear:
        w = out.weight[:OUTPUT_PROBE_ROWS]
        probes["output"] = (lambda x: torch.nn.functional.linear(x, w), out.in_features, w.dtype)
    granule = 1
    for forward, dim, dtype in probes.values():
        g = _granule(forward, dim, dtype, max_rows)
        if g == 0:
            return 0
        granule = max(granule, g)  # powers of two: the largest is a multiple of the others
    return granule


def _granule(forward, dim: int, dtype: torch.dtype, max_rows: int) -> int:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(max_rows, dim, generator=gen).to(dtype)
    with torch.inference_mode():
        ref = forward(x[None])[0]
        for g in (1, 2, 4, 8, 16):
            if all(torch.equal(forward(x[None, :m])[0], ref[:m]) and torch.equal(forward(x[:m]), ref[:m])
                   for m in range(g, max_rows + 1, g)):
                return g
    return 0


@functools.lru_cache(maxsize=None)
def attention_granule(n_heads: int, head_dim: int, threads: int = 0) -> int:
    """Smallest a such that a query's attention output (math backend) is bit-identical for every key length that
    is a multiple of a, the extra keys masked out (the BLAS kernels and vectorised reductions over the keys group
    elements by the key count). 0 if none up to 64 does. `threads` and `n_heads` only key the cache."""
    gen = torch.Generator().manual_seed(0)
    # one batch row per count of real keys: rows (and heads) are computed independently (checked by the tests)
    reals = torch.arange(1, 98)
    n = 768
    q = torch.randn(len(reals), 1, 1, head_dim, generator=gen)
    k = torch.randn(len(reals), 1, n, head_dim, generator=gen)
    v = torch.randn(len(reals), 1, n, head_dim, generator=gen)

    def attend(total: int) -> torch.Tensor:  # (R, H, 1, hd)
        mask = (torch.arange(total)[None, :] < reals[:, None])[:, None, None, :]
        return torch.nn.functional.scaled_dot_product_attention(q, k[:, :, :total], v[:, :, :total], mask)

    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH):
        for a in (8, 16, 32, 64):
            totals = range(a, min(n, round_up(int(reals[-1]), a) + 6 * a) + 1, a)
            out = {t: attend(t) for t in totals}
            if all(torch.equal(out[t][r], out[round_up(int(real), a)][r])
                   for r, real in enumerate(reals) for t in totals if t >= real):
                return a
    return 0


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m

"""Many LoRA adapters served at once over one base model: AdapterStep, the model object an engine drives.

Requests for different adapters (and for the base model) decode in the same batch. Each adapter is a set of low-rank
pairs (A (r, in), B (out, r)) with its scaling s = alpha / r, one per target linear layer; they are added to the base
layers' outputs by forward hooks, row by row: the rows of a batch are grouped by adapter and each group gets
s * B(A(x_rows)) added (the gathered low-rank products of S-LoRA / Punica, as plain grouped matmuls). The base
layers themselves are untouched, so the rows with no adapter still take the native decode step (the same bits as
the base model alone), and the adapter rows of the same step run the PyTorch path with the hooks. The arithmetic per row is herd/models/lora.py's LoRALinear's, the layer
`herd generate --adapter` uses: base(x) + (s * B(A(x))).

The engine binds each request's adapter to its cache row before its prefill (bind(row, ids, AdapterChoice)), as it
binds images for a VisionStep, and keeps the prefix cache of each adapter in chains of its own (prefix_key): the
keys and values of the same prompt differ from adapter to adapter.

Floor: engine/ (imports models; the adapter files are read by herd.formats.peft, below).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from torch import nn

from herd.errors import ConfigError
from herd.models.lora import TARGETS


@dataclass(frozen=True)
class AdapterChoice:
    """What a request binds to its row: the adapter's id in the AdapterStep (0 = the base model)."""

    id: int


class AdapterStep(nn.Module):
    """forward(tokens, input_pos, cache, cache_rows, last_only) of the base model with each row's adapter added."""

    def __init__(self, model: nn.Module):
        super().__init__()
        if any(isinstance(m, AdapterStep) for m in model.modules()) or hasattr(model, "bind"):
            raise ConfigError("adapters are served over a plain text model")
        self.text = model
        self.config = model.config
        self.adapters: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor, float]]] = {}
        self.names: dict[str, int] = {}
        self.bound: dict[int, int] = {}  # cache row -> adapter id (rows of the base model absent)
        self._rows: torch.Tensor | None = None  # adapter id of each row of the forward under way
        self._next = 1
        self._lock = threading.Lock()  # add / remove come from HTTP handlers, forwards from the engine thread
        self.decode_step = _AdapterDecode(self)
        self._hooks = []
        for i, block in enumerate(model.layers):
            for path, _ in TARGETS.values():
                lin = block.get_submodule(path)
                self._hooks.append(lin.register_forward_hook(self._hook(f"layers.{i}.{path}")))

    def __getattr__(self, name: str):
        """Everything else (norm, layers, tok_embeddings, output, ...) is the base model's: the engines read those."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("text"), name)

    # -- the adapters ----------------------------------------------------------------------------------------
    def add(self, name: str, weights: dict[str, tuple[torch.Tensor, torch.Tensor]], scaling: float) -> int:
        """Register an adapter (herd module path -> (A, B), as herd.formats.peft.read_adapter gives them); its id."""
        if not name or name in self.names:
            raise ConfigError(f"an adapter named {name!r} is already loaded" if name else "an adapter needs a name")
        # float32 pairs, as LoRALinear holds them (the arithmetic `--adapter` runs)
        table = {path: (a.to(torch.float32).contiguous(), b.to(torch.float32).contiguous(), float(scaling))
                 for path, (a, b) in weights.items()}
        with self._lock:
            i, self._next = self._next, self._next + 1
            self.adapters[i], self.names[name] = table, i
        return i

    def remove(self, name: str, requests=()) -> None:
        """Unload an adapter; refused while one of `requests` (the engine's running and waiting ones) uses it. Rows
        still bound to it from finished requests are unbound (the engine binds a row again at each admission)."""
        with self._lock:
            i = self.names.get(name)
            if i is None:
                raise ConfigError(f"no adapter named {name!r} is loaded")
            if any(getattr(r, "images", None) == AdapterChoice(i) for r in requests):
                raise ConfigError(f"adapter {name!r} is in use by a running request")
            del self.names[name], self.adapters[i]
            for row in [r for r, a in self.bound.items() if a == i]:
                del self.bound[row]

    def choice(self, name: str | None) -> AdapterChoice | None:
        """The AdapterChoice for a request naming `name`, or None for the base model (a name not loaded: None)."""
        i = self.names.get(name) if name is not None else None
        return AdapterChoice(i) if i is not None else None

    # -- binding (the engine's protocol, as VisionStep's) -----------------------------------------------------
    def bind(self, row: int, ids, inputs) -> None:
        if inputs is None or inputs.id == 0:
            self.bound.pop(row, None)
            return
        if inputs.id not in self.adapters:
            raise ConfigError(f"adapter {inputs.id} is not loaded")
        self.bound[row] = inputs.id

    def prefix_key(self, ids, inputs=None) -> tuple[int, int]:
        """(root, tokens): each adapter's prompts share pages only with prompts of the same adapter."""
        return (-1000 - inputs.id if inputs is not None else 0), len(ids)

    whole_prompts = False

    def any_bound(self, rows) -> bool:
        return bool(self.bound) and any(int(r) in self.bound for r in rows)

    # -- forward -----------------------------------------------------------------------------------------------
    def forward(self, tokens, input_pos=None, cache=None, cache_rows=None, last_only: bool = False, **kw):
        B = tokens.shape[0]
        rows = range(B) if cache_rows is None else [int(r) for r in cache_rows.reshape(-1)]
        ids = torch.tensor([self.bound.get(r, 0) for r in rows])
        self._rows = ids if bool((ids != 0).any()) else None
        try:
            return self.text(tokens, input_pos, cache, last_only=last_only, cache_rows=cache_rows, **kw)
        finally:
            self._rows = None

    def _hook(self, path: str):
        def add_lora(module, args, y):
            ids = self._rows
            if ids is None:
                return None
            x = args[0]
            y = y.clone()
            for i in ids.unique().tolist():
                lora = self.adapters.get(i, {}).get(path) if i else None
                if lora is None:
                    continue
                a, b, s = lora
                sel = (ids == i).nonzero()[:, 0]
                xr = x[sel].to(a.dtype)
                d = torch.nn.functional.linear(torch.nn.functional.linear(xr, a), b)
                y[sel] = y[sel] + (d * s).to(y.dtype)
            return y
        return add_lora


class _AdapterDecode:
    """One decode step over rows of several adapters: the base model's native decode step for the rows with no
    adapter (the same bits as a batch of the base alone), the PyTorch path with the hooks for the others, in two
    forwards; None (all on the PyTorch path) where the base has no native step."""

    def __init__(self, step: AdapterStep):
        self.step = step

    def _inner(self):
        return getattr(self.step.text, "decode_step", None)

    def __call__(self, model, tokens, input_pos, cache, rows=None):
        inner, step = self._inner(), self.step
        if inner is None:
            return None
        B = tokens.shape[0]
        rows = torch.arange(B, device=tokens.device) if rows is None else rows.reshape(B)
        lora = torch.tensor([int(r) in step.bound for r in rows.tolist()])
        if not bool(lora.any()):
            return inner(step.text, tokens, input_pos, cache, rows)
        if bool(lora.all()):
            return None
        base = (~lora).nonzero()[:, 0]
        plain = inner(step.text, tokens[base], input_pos[base], cache, rows[base])
        if plain is None:
            return None
        mine = lora.nonzero()[:, 0]
        adapted = step(tokens[mine], input_pos[mine], cache, cache_rows=rows[mine])
        out = plain.new_empty((B, *plain.shape[1:]))
        out[base], out[mine] = plain, adapted.to(plain.dtype)
        return out

    def batch_invariant(self, model, cache) -> bool:
        inner = self._inner()
        return (not self.step.bound and inner is not None and hasattr(inner, "batch_invariant")
                and inner.batch_invariant(self.step.text, cache))

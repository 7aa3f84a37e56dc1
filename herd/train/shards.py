"""Pretraining data: a corpus tokenized once into memory-mapped token shards, and a stateful, deterministic loader.

On disk (`herd data prepare --tokenizer M --input FILE... --out DIR`):
  DIR/manifest.json       {"format": "herd-tokens/1", "dtype": "uint16"|"uint32", "vocab_size", "tokenizer",
                           "bos_id", "eos_id", "documents", "tokens", "shards": [{"file", "tokens", "sha256"}]}
  DIR/tokens-00000.bin    the token ids of whole documents, one after another, each wrapped as the tokenizer wraps
                          text (BOS if the model adds one, EOS); raw little-endian uint16 (vocab <= 65,536) or uint32
Inputs are read as `herd finetune` reads them (train/data.py's read_rows): .txt/.md files are one document each, JSONL
rows {"text": ...} one document each, chat rows {"messages": ...} rendered with the tokenizer's chat format.

The loader sees the shards as one token stream. Sample k is the window stream[k*T : k*T + T + 1] (T inputs and
their T next-token targets), for k < N = (tokens - 1) // T. Epoch e visits the N samples in the order of
torch.randperm(N) seeded with seed + e, so the order is a pure function of (seed, epoch): global optimizer step s
takes the B samples at positions s*B ... s*B + B - 1 of the endless concatenation of epochs. That step is split into
K micro-batches of B/K, each split into D data-parallel slices of B/(K*D) rows; rank r takes slice r. The loader's
whole state is the step number, so a resumed run at any world size reads exactly what the uninterrupted run would.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from herd.errors import ConfigError, FormatError

FORMAT = "herd-tokens/1"
SHARD_TOKENS = 1 << 26  # 64 Mi tokens per shard (128 MiB at uint16)


def _dtype_for(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _documents(paths, tokenizer, get_chat_format):
    """(token ids, 'file:line') of every document of the inputs."""
    from herd.train.data import encode_text, read_rows

    for path in paths:
        for row, where in read_rows(path):
            if "messages" in row:
                fmt = get_chat_format()
                yield list(fmt.encode_dialog(row["messages"], add_generation_prompt=False,
                                             tools=row.get("tools"))), where
            else:
                yield encode_text(row["text"], tokenizer, where).ids, where


@dataclass
class PrepareReport:
    out: Path
    documents: int
    tokens: int
    shards: int
    dtype: str

    def line(self) -> str:
        return (f"{self.documents} documents, {self.tokens} tokens in {self.shards} shard(s) of {self.dtype} "
                f"-> {self.out}")


def prepare(tokenizer: str | Path | None, inputs, out, *, progress: bool = True,
            shard_tokens: int = SHARD_TOKENS) -> PrepareReport:
    """Tokenize the input files into DIR/tokens-NNNNN.bin shards and DIR/manifest.json (see the module docstring)."""
    from tqdm import tqdm

    from herd.api import load_tokenizer_only
    from herd.hub import resolve

    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    inputs = [Path(p) for p in inputs]
    if not inputs:
        raise ConfigError("data prepare needs at least one --input file")
    for p in inputs:
        if not p.is_file():
            raise FormatError(f"{p}: no such input file")
    tok = load_tokenizer_only(tokenizer)
    chat = []

    def chat_format():  # loaded only when a chat row appears (it reads the checkpoint's template)
        if not chat:
            from herd.api import load

            llm = load(tokenizer)
            if llm.chat_format is None:
                raise ConfigError(f"{tokenizer}: chat rows in the data, but this model has no chat format")
            chat.append(llm.chat_format)
        return chat[0]

    dtype = _dtype_for(tok.vocab_size)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("tokens-*.bin"):
        old.unlink()
    shards, buf, n_docs, total = [], [], 0, 0

    def flush():
        if not buf:
            return
        name = f"tokens-{len(shards):05d}.bin"
        np.asarray(buf, dtype=dtype).tofile(out / name)
        shards.append({"file": name, "tokens": len(buf), "sha256": _sha256(out / name)})
        buf.clear()

    total_bytes = sum(p.stat().st_size for p in inputs)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, disable=not progress, desc="tokenizing")
    for path in inputs:
        for ids, where in _documents([path], tok, chat_format):
            bad = [i for i in ids if not 0 <= i < tok.vocab_size]
            if bad:
                raise FormatError(f"{where}: token id {bad[0]} outside the vocabulary ({tok.vocab_size})")
            n_docs += 1
            total += len(ids)
            while ids:  # a document may straddle two shards: the stream is what counts
                room = shard_tokens - len(buf)
                buf.extend(ids[:room])
                ids = ids[room:]
                if len(buf) >= shard_tokens:
                    flush()
        bar.update(path.stat().st_size)
    flush()
    bar.close()
    if total < 2:
        raise ConfigError(f"{', '.join(map(str, inputs))}: fewer than 2 tokens, nothing to train on")
    manifest = {"format": FORMAT, "dtype": dtype, "vocab_size": tok.vocab_size, "tokenizer": str(resolve(None if tokenizer is None else str(tokenizer))),
                "tokenizer_source": str(tok.source), "bos_id": tok.bos_id, "eos_id": tok.eos_id,
                "documents": n_docs, "tokens": total, "inputs": [str(p) for p in inputs], "shards": shards}
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    tmp.replace(out / "manifest.json")
    return PrepareReport(out, n_docs, total, len(shards), dtype)


# -- reading -----------------------------------------------------------------------------------------------------

class TokenData:
    """The shards of a prepared folder as one memory-mapped token stream, checked against the manifest."""

    def __init__(self, folder: str | Path, verify: bool = False):
        self.folder = folder = Path(folder)
        mpath = folder / "manifest.json"
        if not mpath.is_file():
            raise FormatError(f"{folder}: no manifest.json (make one with `herd data prepare`)")
        try:
            m = json.loads(mpath.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise FormatError(f"{mpath}: not valid JSON ({e.msg})") from None
        if m.get("format") != FORMAT:
            raise FormatError(f"{mpath}: format {m.get('format')!r}, expected {FORMAT!r}")
        for key in ("dtype", "vocab_size", "tokens", "shards"):
            if key not in m:
                raise FormatError(f"{mpath}: missing key {key!r}")
        if m["dtype"] not in ("uint16", "uint32"):
            raise FormatError(f"{mpath}: dtype {m['dtype']!r}, expected uint16 or uint32")
        self.manifest, self.vocab_size = m, int(m["vocab_size"])
        item = np.dtype(m["dtype"]).itemsize
        self.arrays, self.starts = [], []
        start = 0
        for s in m["shards"]:
            path = folder / s["file"]
            if not path.is_file():
                raise FormatError(f"{mpath}: shard {s['file']} is missing")
            size = path.stat().st_size
            if size != s["tokens"] * item:
                raise FormatError(f"{path}: {size} bytes, the manifest says {s['tokens']} tokens of {m['dtype']} "
                                  f"({s['tokens'] * item} bytes)")
            if verify and _sha256(path) != s["sha256"]:
                raise FormatError(f"{path}: contents do not match the manifest's sha256")
            self.arrays.append(np.memmap(path, dtype=m["dtype"], mode="r"))
            self.starts.append(start)
            start += s["tokens"]
        if start != m["tokens"]:
            raise FormatError(f"{mpath}: shards hold {start} tokens, the manifest says {m['tokens']}")
        self.n_tokens = start

    def window(self, begin: int, length: int) -> np.ndarray:
        """stream[begin : begin + length] as int64, across shard boundaries."""
        out = np.empty(length, dtype=np.int64)
        got = 0
        for arr, s in zip(self.arrays, self.starts):
            lo, hi = max(begin + got, s), min(begin + length, s + len(arr))
            if lo < hi:
                out[lo - begin:hi - begin] = arr[lo - s:hi - s]
                got = hi - begin
        return out


class Loader:
    """Deterministic batches for one data-parallel rank; the state is the optimizer step (see module docstring)."""

    def __init__(self, data: TokenData, seq_len: int, batch_size: int, grad_accum: int = 1, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 0):
        if batch_size % (grad_accum * dp_size):
            raise ConfigError(f"--batch-size {batch_size} (global, sequences per step) must divide into "
                              f"--grad-accum {grad_accum} x data-parallel degree {dp_size}")
        self.data, self.T, self.B, self.K = data, seq_len, batch_size, grad_accum
        self.rank, self.dp, self.seed = dp_rank, dp_size, seed
        self.n_samples = (data.n_tokens - 1) // seq_len
        if self.n_samples < 1:
            raise ConfigError(f"{data.folder}: {data.n_tokens} tokens do not fill one sequence of {seq_len} + 1")
        self.step = 0
        self._order: tuple[int, torch.Tensor] | None = None

    def _sample(self, j: int) -> int:
        """The sample index at position j of the endless sequence of epochs."""
        epoch, i = divmod(j, self.n_samples)
        if self._order is None or self._order[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = (epoch, torch.randperm(self.n_samples, generator=g))
        return int(self._order[1][i])

    def next(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's K micro-batches of the next step: (inputs (b, T), targets (b, T)) with b = B / (K * D)."""
        micro, b = self.B // self.K, self.B // (self.K * self.dp)
        first = self.step * self.B
        out = []
        for m in range(self.K):
            rows = []
            for r in range(b):
                k = self._sample(first + m * micro + self.rank * b + r)
                rows.append(self.data.window(k * self.T, self.T + 1))
            w = torch.from_numpy(np.stack(rows))  # (b, T + 1)
            out.append((w[:, :-1].contiguous(), w[:, 1:].contiguous()))
        self.step += 1
        return out

    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed, "seq_len": self.T, "batch_size": self.B,
                "n_samples": self.n_samples}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "seq_len", "batch_size", "n_samples"):
            if state.get(key) != self.state_dict()[key]:
                raise ConfigError(f"data loader state has {key}={state.get(key)}, this run has "
                                  f"{self.state_dict()[key]}: not the same data order")
        self.step = int(state["step"])

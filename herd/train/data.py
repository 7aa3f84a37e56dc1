"""Training data: chat JSONL and plain text -> token ids with a loss mask -> packed rows of seq_len tokens.

Chat rows are OpenAI-shaped, {"messages": [...], "tools": [...]?}, rendered with the model's own chat format; only
the tokens of assistant messages (their content and their end-of-turn token) carry loss. The spans come from
rendering the dialog incrementally: the prompt before assistant message i (with the generation prompt) must be a
prefix of the dialog up to and including message i, which must be a prefix of the whole dialog; the tokens in
between are message i's. A template for which this does not hold is reported, never guessed around.

Plain text (.txt/.md files, or JSONL rows {"text": ...}) is continued pretraining: every token carries loss, and a
document longer than seq_len is cut into seq_len pieces (counted as `split`). An over-long chat example is
truncated (default) or dropped, and counted in the summary.

Packing: examples are laid one after another in rows of exactly seq_len tokens; an example never straddles two rows;
a row's tail is padding. `doc` numbers the examples inside a row, so the loop can keep attention inside each one
(block-diagonal causal mask) and restart positions at 0 for each.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from herd.errors import ConfigError, FormatError

ROLES = {"system", "user", "assistant", "tool", "ipython", "developer"}
TEXT_SUFFIXES = {".txt", ".md", ".text"}
IGNORE = -100  # label of a position that carries no loss (torch cross_entropy's ignore_index)


@dataclass
class Example:
    ids: list[int]
    train: list[bool]  # train[i]: token i is a target (predicted from tokens < i)
    where: str  # "file:line" for messages


@dataclass
class DataSummary:
    examples: int = 0
    tokens: int = 0
    target_tokens: int = 0
    truncated: int = 0
    dropped: int = 0
    split: int = 0
    sources: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (f"{self.examples} examples, {self.tokens} tokens ({self.target_tokens} trained on); "
                f"{self.truncated} truncated, {self.dropped} dropped as over-long, {self.split} text documents split")


# -- reading and checking rows ---------------------------------------------------------------------------------

def _check_messages(row: dict, where: str) -> None:
    msgs = row.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise FormatError(f"{where}: 'messages' must be a non-empty list")
    for j, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise FormatError(f"{where}: message {j} is a {type(m).__name__}, expected an object")
        role = m.get("role")
        if role not in ROLES:
            raise FormatError(f"{where}: message {j} has role {role!r}, expected one of {sorted(ROLES)}")
        content = m.get("content")
        if content is None and not m.get("tool_calls"):
            raise FormatError(f"{where}: message {j} ({role}) has no 'content'")
        if content is not None and not isinstance(content, (str, list)):
            raise FormatError(f"{where}: message {j} content is a {type(content).__name__}, expected a string")
    if not any(m["role"] == "assistant" for m in msgs):
        raise FormatError(f"{where}: no assistant message, so nothing to train on")
    if "tools" in row and not isinstance(row["tools"], list):
        raise FormatError(f"{where}: 'tools' must be a list")


def read_rows(path: str | Path) -> list[tuple[dict, str]]:
    """(row, 'file:line') for every row of a JSONL file or the single document of a text file."""
    path = Path(path)
    if not path.exists():
        raise FormatError(f"{path}: no such data file")
    if path.suffix.lower() in TEXT_SUFFIXES:
        try:
            return [({"text": path.read_text(encoding="utf-8")}, f"{path}")]
        except UnicodeDecodeError as e:
            raise FormatError(f"{path}: not UTF-8 text ({e})") from None
    rows = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as e:
                raise FormatError(f"{where}: not UTF-8 ({e})") from None
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise FormatError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise FormatError(f"{where}: expected a JSON object, found {type(row).__name__}")
            if "messages" in row:
                _check_messages(row, where)
            elif not isinstance(row.get("text"), str):
                raise FormatError(f"{where}: expected {{\"messages\": [...]}} (chat) or {{\"text\": \"...\"}}")
            rows.append((row, where))
    if not rows:
        raise FormatError(f"{path}: no rows")
    return rows


# -- rows -> token ids and loss masks ------------------------------------------------------------------------

def encode_chat(messages: list[dict], chat_format, tools=None, where: str = "") -> Example:
    """Render a dialog; train only on the assistant messages' tokens (found by incremental rendering)."""
    full = list(chat_format.encode_dialog(messages, add_generation_prompt=False, tools=tools))
    train = [False] * len(full)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = list(chat_format.encode_dialog(messages[:i], add_generation_prompt=True, tools=tools)) if i else []
        upto = list(chat_format.encode_dialog(messages[: i + 1], add_generation_prompt=False, tools=tools))
        if upto[: len(prompt)] != prompt or full[: len(upto)] != upto or len(upto) == len(prompt):
            raise FormatError(f"{where}: the chat template does not render message {i} (assistant) as a suffix of "
                              "the prompt before it, so its tokens cannot be located for the loss mask")
        for t in range(len(prompt), len(upto)):
            train[t] = True
    return Example(full, train, where)


def encode_text(text: str, tokenizer, where: str = "") -> Example:
    """A plain-text document: BOS (if the model adds one) + text + EOS, every token a target."""
    ids = tokenizer.encode(text, bos=bool(tokenizer.add_bos and tokenizer.bos_id is not None),
                           eos=tokenizer.eos_id is not None)
    return Example(ids, [True] * len(ids), where)


def load_examples(paths, tokenizer, chat_format, seq_len: int, over_long: str = "truncate"
                  ) -> tuple[list[Example], DataSummary]:
    """Read and tokenize data files; over-long chat examples truncated or dropped, text split; with a summary."""
    if over_long not in ("truncate", "drop"):
        raise ConfigError(f"over_long must be 'truncate' or 'drop', got {over_long!r}")
    if isinstance(paths, (str, Path)):
        paths = [paths]
    out, s = [], DataSummary(sources=[str(p) for p in paths])
    for path in paths:
        for row, where in read_rows(path):
            if "messages" in row:
                if chat_format is None:
                    raise ConfigError(f"{where}: chat data, but this model has no chat format")
                ex = encode_chat(row["messages"], chat_format, row.get("tools"), where)
                if len(ex.ids) > seq_len:
                    if over_long == "drop":
                        s.dropped += 1
                        continue
                    ex = Example(ex.ids[:seq_len], ex.train[:seq_len], where)
                    if not any(ex.train[1:]):  # truncation cut every assistant token: nothing left to learn
                        s.dropped += 1
                        continue
                    s.truncated += 1
                pieces = [ex]
            else:
                ex = encode_text(row["text"], tokenizer, where)
                pieces = [Example(ex.ids[k:k + seq_len], ex.train[k:k + seq_len], where)
                          for k in range(0, len(ex.ids), seq_len)]
                s.split += len(pieces) > 1
                pieces = [p for p in pieces if len(p.ids) > 1]
            for p in pieces:
                out.append(p)
                s.tokens += len(p.ids)
                s.target_tokens += sum(p.train[1:])
    s.examples = len(out)
    if not out:
        raise ConfigError(f"no usable examples in {', '.join(s.sources)} ({s.line()})")
    return out, s


# -- packing -------------------------------------------------------------------------------------------------

@dataclass
class Batch:
    tokens: torch.Tensor  # (B, T) int64
    labels: torch.Tensor  # (B, T) int64, IGNORE where no loss
    pos: torch.Tensor  # (B, T) int64, position inside each example
    doc: torch.Tensor  # (B, T) int64, example number inside the row (padding: -1 - t, alone)

    @property
    def n_targets(self) -> int:
        return int((self.labels != IGNORE).sum())


def pack(examples: Sequence[Example], seq_len: int, pad_id: int = 0) -> list[tuple[list, list, list, list]]:
    """Greedy in-order packing into rows of seq_len: (tokens, labels, positions, doc ids) per row."""
    rows, cur = [], None
    for ex in examples:
        n = len(ex.ids)
        if cur is None or len(cur[0]) + n > seq_len:
            if cur is not None:
                rows.append(cur)
            cur = ([], [], [], [])
        d = len(set(cur[3]))
        cur[0].extend(ex.ids)
        # label at t is the token at t+1 when that one is a target of the same example
        cur[1].extend([ex.ids[t + 1] if ex.train[t + 1] else IGNORE for t in range(n - 1)] + [IGNORE])
        cur[2].extend(range(n))
        cur[3].extend([d] * n)
    if cur is not None:
        rows.append(cur)
    for r in rows:
        k = seq_len - len(r[0])
        r[0].extend([pad_id] * k)
        r[1].extend([IGNORE] * k)
        r[2].extend([0] * k)
        r[3].extend(-1 - t for t in range(k))
    return rows


def to_batches(rows, rows_per_batch: int) -> list[Batch]:
    out = []
    for k in range(0, len(rows), rows_per_batch):
        chunk = rows[k:k + rows_per_batch]
        out.append(Batch(*(torch.tensor([r[j] for r in chunk], dtype=torch.long) for j in range(4))))
    return out


class PackedData:
    """Examples -> batches for each epoch: shuffled with a seed per epoch (none for eval), then packed."""

    def __init__(self, examples: list[Example], seq_len: int, rows_per_batch: int, seed: int | None, pad_id: int = 0):
        self.examples, self.seq_len, self.rows_per_batch = examples, seq_len, rows_per_batch
        self.seed, self.pad_id = seed, pad_id
        self._cache: dict[int, list[Batch]] = {}

    def epoch(self, e: int) -> list[Batch]:
        if e not in self._cache:
            order = list(range(len(self.examples)))
            if self.seed is not None:
                random.Random(self.seed * 100003 + e).shuffle(order)
            rows = pack([self.examples[i] for i in order], self.seq_len, self.pad_id)
            self._cache = {e: to_batches(rows, self.rows_per_batch)}  # keep one epoch in memory
        return self._cache[e]

    def n_batches(self, e: int) -> int:
        return len(self.epoch(e))

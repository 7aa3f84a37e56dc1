"""JSON mode: a token-level constraint that keeps a generated reply a valid JSON prefix and ends it when complete.

A character-level JSON validator (a small pushdown automaton whose state is an immutable tuple) is run over the
text of candidate tokens, most likely first: the top-k tokens are tried, then, only if none fits, the whole
vocabulary in order of likelihood with a cheap first-character filter. Everything that does not fit is masked to
-inf before sampling; a stop token is allowed only once the value is complete, and then nothing else is.

`heads` optionally forces the reply to begin with one of some strings (each itself a JSON prefix): '{' for a JSON
object, '{"name": "f", "parameters": {' for a forced tool call.

Limits: a token is a candidate only if its bytes decode as UTF-8 by themselves, so a character split across
tokens cannot appear; runs of whitespace outside strings are capped (a model stuck on newlines would otherwise never
finish) and nesting is capped at MAX_DEPTH.
"""

from __future__ import annotations

import weakref
from typing import Sequence

import torch

MAX_DEPTH = 32
MAX_WS_RUN = 16

# modes
VALUE, ARR_FIRST, OBJ_FIRST, KEY, COLON, AFTER, STRING, ESCAPE, UHEX, NUMBER, LITERAL, DONE = range(12)
_WS = " \t\n\r"
_ESCAPES = '"\\/bfnrtu'
_HEX = set("0123456789abcdefABCDEF")
_LITERALS = {"t": "rue", "f": "alse", "n": "ull"}
# number sub-states: which may end the number, and transitions
_NUM_END = {"zero", "int", "frac", "exp"}

State = tuple  # (stack: str of '{' / '[', mode, aux, whitespace run)


def initial_state() -> State:
    return ("", VALUE, None, 0)


def _num_step(sub: str, ch: str) -> str | None:
    if sub == "minus":
        return "zero" if ch == "0" else "int" if ch.isdigit() and ch.isascii() else None
    if sub == "zero":
        return "dot" if ch == "." else "e" if ch in "eE" else None
    if sub == "int":
        return "int" if ch in "0123456789" else "dot" if ch == "." else "e" if ch in "eE" else None
    if sub == "dot":
        return "frac" if ch in "0123456789" else None
    if sub == "frac":
        return "frac" if ch in "0123456789" else "e" if ch in "eE" else None
    if sub == "e":
        return "esign" if ch in "+-" else "exp" if ch in "0123456789" else None
    if sub in ("esign", "exp"):
        return "exp" if ch in "0123456789" else None
    return None


def _after_value(stack: str) -> State:
    return (stack, AFTER if stack else DONE, None, 0)


def _start_value(stack: str, ch: str) -> State | None:
    """State after the first character of a value (ch is not whitespace)."""
    if ch == "{":
        return None if len(stack) >= MAX_DEPTH else (stack + "{", OBJ_FIRST, None, 0)
    if ch == "[":
        return None if len(stack) >= MAX_DEPTH else (stack + "[", ARR_FIRST, None, 0)
    if ch == '"':
        return (stack, STRING, "v", 0)
    if ch == "-":
        return (stack, NUMBER, "minus", 0)
    if ch == "0":
        return (stack, NUMBER, "zero", 0)
    if ch in "123456789":
        return (stack, NUMBER, "int", 0)
    if ch in _LITERALS:
        return (stack, LITERAL, _LITERALS[ch], 0)
    return None


def step(state: State, ch: str) -> State | None:
    """The state after one more character, or None if the text is no longer a JSON prefix."""
    stack, mode, aux, ws = state
    if mode == STRING:
        if ch == '"':
            return (stack, COLON, None, 0) if aux == "k" else _after_value(stack)
        if ch == "\\":
            return (stack, ESCAPE, aux, 0)
        return None if ord(ch) < 0x20 else state
    if mode == ESCAPE:
        if ch not in _ESCAPES:
            return None
        return (stack, UHEX, (aux, 4), 0) if ch == "u" else (stack, STRING, aux, 0)
    if mode == UHEX:
        if ch not in _HEX:
            return None
        kind, left = aux
        return (stack, STRING, kind, 0) if left == 1 else (stack, UHEX, (kind, left - 1), 0)
    if mode == LITERAL:
        if ch != aux[0]:
            return None
        return _after_value(stack) if len(aux) == 1 else (stack, LITERAL, aux[1:], 0)
    if mode == NUMBER:
        sub = _num_step(aux, ch)
        if sub is not None:
            return (stack, NUMBER, sub, 0)
        if aux not in _NUM_END:
            return None
        state = _after_value(stack)  # the number ended: this character belongs to what follows
        if state[1] == DONE:
            return state if ch in _WS else None
        stack, mode, aux, ws = state
    if ch in _WS:
        return None if ws >= MAX_WS_RUN else (stack, mode, aux, ws + 1)
    if mode == VALUE:
        return _start_value(stack, ch)
    if mode == ARR_FIRST:
        return _after_value(stack[:-1]) if ch == "]" else _start_value(stack, ch)
    if mode == OBJ_FIRST:
        if ch == "}":
            return _after_value(stack[:-1])
        return (stack, STRING, "k", 0) if ch == '"' else None
    if mode == KEY:
        return (stack, STRING, "k", 0) if ch == '"' else None
    if mode == COLON:
        return (stack, VALUE, None, 0) if ch == ":" else None
    if mode == AFTER:
        top = stack[-1]
        if ch == ",":
            return (stack, KEY, None, 0) if top == "{" else (stack, VALUE, None, 0)
        if (ch == "}" and top == "{") or (ch == "]" and top == "["):
            return _after_value(stack[:-1])
        return None
    return None  # DONE: nothing may follow but whitespace (handled above)


def feed(state: State | None, text: str) -> State | None:
    """Run step over every character of text."""
    for ch in text:
        if state is None:
            return None
        state = step(state, ch)
    return state


def is_complete(state: State | None) -> bool:
    """True when the text so far is one whole JSON value (a trailing number counts as ended)."""
    if state is None:
        return False
    stack, mode, aux, _ = state
    return not stack and (mode == DONE or (mode == NUMBER and aux in _NUM_END))


# ---------------------------------------------------------------------------------------------------- tokens
class TokenTexts:
    """Text of each token id alone (None when its bytes are not UTF-8 by themselves, or it is a special token)."""

    _shared: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

    def __init__(self, tokenizer, vocab_size: int):
        self.tok, self.vocab_size = tokenizer, vocab_size
        self.special = set(getattr(tokenizer, "special_tokens", {}).values())
        self.texts: dict[int, str | None] = {}
        self.first_chars: dict[str, list[int]] | None = None  # first character -> ids, built on first need

    @classmethod
    def of(cls, tokenizer, vocab_size: int) -> "TokenTexts":
        """One shared table per tokenizer."""
        try:
            table = cls._shared.get(tokenizer)
        except TypeError:  # not weak-referenceable
            return cls(tokenizer, vocab_size)
        if table is None or table.vocab_size != vocab_size:
            table = cls._shared[tokenizer] = cls(tokenizer, vocab_size)
        return table

    def text(self, i: int) -> str | None:
        if i in self.texts:
            return self.texts[i]
        t = None
        if i not in self.special:
            try:
                t = self.tok.decode_bytes([i]).decode("utf-8")
            except (UnicodeDecodeError, Exception):
                t = None
            if t == "":
                t = None
        self.texts[i] = t
        return t

    def by_first_char(self) -> dict[str, list[int]]:
        if self.first_chars is None:
            groups: dict[str, list[int]] = {}
            for i in range(self.vocab_size):
                t = self.text(i)
                if t:
                    groups.setdefault(t[0], []).append(i)
            self.first_chars = groups
        return self.first_chars


class JsonConstraint:
    """Logits mask keeping the reply a JSON prefix (engine protocol: mask(logits) -> logits, advance(token))."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: Sequence[int], *, heads: Sequence[str] = ("{",),
                 greedy: bool = False, top_k: int = 32):
        self.tokens = TokenTexts.of(tokenizer, vocab_size)
        self.stop_ids = frozenset(stop_ids)
        self.heads = [h for h in heads if h]
        self.greedy, self.top_k = greedy, top_k
        self.state: State | None = initial_state()
        self.text = ""

    @property
    def complete(self) -> bool:
        return is_complete(self.state) and self._head_done(self.text)

    def _head_done(self, text: str) -> bool:
        return not self.heads or any(text.startswith(h) for h in self.heads)

    def _head_ok(self, text: str) -> bool:
        return not self.heads or any(h.startswith(text) or text.startswith(h) for h in self.heads)

    def allows(self, token: int) -> bool:
        if token in self.stop_ids:
            return self.complete
        if self.complete and self.stop_ids:
            return False  # a whole value: only a stop may follow
        t = self.tokens.text(token)
        if t is None:
            return False
        nxt = self.text + t
        return self._head_ok(nxt) and feed(self.state, t) is not None

    def allowed_ids(self, logits: torch.Tensor) -> list[int]:
        """The allowed tokens among the most likely: the first fitting one for greedy decoding, every fitting one
        of the top-k otherwise (or of the first block of the vocabulary, by likelihood, that has any)."""
        k = min(self.top_k, logits.numel())
        top = torch.topk(logits, k).indices.tolist()
        ok = [i for i in top if self.allows(i)]
        if ok:
            return ok[:1] if self.greedy else ok
        # nothing in the top-k fits: scan the vocabulary by likelihood, tokens with a fitting first char only
        if self.complete:
            return sorted(self.stop_ids) or []
        firsts = {c for c in self.tokens.by_first_char() if self._char_ok(c)}
        cand = torch.tensor(sorted(i for c in firsts for i in self.tokens.by_first_char()[c]) +
                            sorted(self.stop_ids), dtype=torch.long)
        cand = cand[cand < logits.numel()]
        order = cand[torch.argsort(logits[cand], descending=True, stable=True)].tolist()
        for start in range(0, len(order), 1024):
            ok = [i for i in order[start:start + 1024] if self.allows(i)]
            if ok:
                return ok[:1] if self.greedy else ok
        return []

    def _char_ok(self, c: str) -> bool:
        return self._head_ok(self.text + c) and step(self.state, c) is not None if self.state is not None else False

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (V,) with every token that would break the JSON set to -inf."""
        ok = self.allowed_ids(logits)
        out = torch.full_like(logits, float("-inf"))
        if not ok:  # cannot happen with a byte-level vocabulary; let the model end rather than loop
            ok = sorted(self.stop_ids) or [int(torch.argmax(logits))]
        idx = torch.tensor(ok, dtype=torch.long)
        out[idx] = logits[idx]
        return out

    def advance(self, token: int) -> None:
        if token in self.stop_ids:
            return
        t = self.tokens.text(token) or ""
        self.text += t
        self.state = feed(self.state, t)

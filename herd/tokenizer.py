"""Tokenizers for the Llama family: one `Tokenizer` protocol and three backends.

* `TiktokenTokenizer`  Meta's `tokenizer.model` for Llama 3.x / 4 (a tiktoken BPE-ranks file), encoding exactly
                       as Meta's `llama_models` Tokenizer does, with its 400k-char / 25k-run cuts (SPEC.md §2, §5).
* `SentencePieceTokenizer`  Llama 2's sentencepiece `tokenizer.model`, run by the `sentencepiece` library.
* `HFTokenizer`        anything the `tokenizers` library runs: a Hugging Face `tokenizer.json`, or a vocabulary rebuilt
                       from GGUF metadata by herd/formats/gguf_vocab.py (SPEC.md §4).

Ids are plain ints; `encode` never adds BOS/EOS unless asked. Special-token text such as "<|eot_id|>" is ordinary text
unless `allow_special=True` (Meta's default `disallowed_special=()`).

Floor 5: imports herd.errors only. GGUF vocabularies build on this module from above (herd/formats/gguf_vocab.py).
"""

from __future__ import annotations

import base64
import json
import re
import struct
import threading
from pathlib import Path
from typing import Any, Iterator, Sequence

from herd.errors import TokenizerError

# ================================================================================================ constants

# Pre-tokenizer regexes (SPEC.md §2, §5; llama.cpp `llama-vocab.cpp` for the GGUF `tokenizer.ggml.pre` names).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama.cpp spells the contractions without (?i:) so that only ASCII case variants match.
LLAMA3_PATTERN_GGUF = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA4_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

# GGUF `tokenizer.ggml.pre` -> (regexes applied one after the other, ignore_merges, default add_bos).
_LLAMA3_PRE = ([LLAMA3_PATTERN_GGUF], True, True)
_SMOLLM_PRE = ([r"\p{N}", GPT2_PATTERN], False, False)
_GPT2_PRE = ([GPT2_PATTERN], False, False)
GGUF_PRE_TOKENIZERS: dict[str, tuple[list[str], bool, bool]] = {
    **{name: _LLAMA3_PRE for name in ("llama3", "llama-v3", "llama-bpe", "falcon3", "dbrx", "smaug-bpe")},
    **{name: _SMOLLM_PRE for name in ("smollm", "starcoder", "refact", "codeshell")},
    **{name: _GPT2_PRE for name in ("gpt-2", "gpt2", "phi-2")},
    "default": ([r"[\p{P}\$\+<=>\^~\|]+", GPT2_PATTERN, r"\p{N}+", r"[0-9][0-9][0-9]"], False, False),
    "llama4": ([LLAMA4_PATTERN], False, False),
    "gpt-4o": ([LLAMA4_PATTERN], False, False),
}

# Meta's encoder cuts text into <= 400000-char pieces and cuts runs of > 25000 whitespace or non-whitespace
# characters (tiktoken's recursion limit), see llama_models/llama3/tokenizer.py.
META_MAX_CHUNK = 400_000
META_MAX_RUN = 25_000

# Special-token layouts of Meta's tiktoken files, in id order after the last BPE rank (SPEC.md §2, §5).
LLAMA3_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
    "<|eot_id|>", "<|python_tag|>", "<|image|>",
]  # fmt: skip
LLAMA3_SPECIALS += [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(LLAMA3_SPECIALS))]


def _llama4_specials() -> list[str]:
    """The 2048 Llama 4 special tokens, ids 200000..202047."""

    def reserved(kind: str, n: int, start: int) -> list[str]:
        return [f"<|{kind}_reserved_special_token_{i}|>" for i in range(start, start + n)]

    text = ["<|header_start|>", "<|header_end|>", "<|eom|>", "<|eot|>", "<|step|>"]
    text += reserved("text_post_train", 6, 0) + ["<|python_start|>", "<|python_end|>", "<|finetune_right_pad|>"]
    text += reserved("text_post_train", 61, 8)
    vision = ["<|image_start|>", "<|image_end|>"] + reserved("vision", 2, 0)
    vision += ["<|tile_x_separator|>", "<|tile_y_separator|>"] + reserved("vision", 4, 2)
    vision += ["<|image|>"] + reserved("vision", 1, 6) + ["<|patch|>"] + reserved("vision", 1041, 7)
    reasoning = reserved("reasoning", 8, 0) + ["<|reasoning_thinking_start|>", "<|reasoning_thinking_end|>"]
    names = ["<|begin_of_text|>", "<|end_of_text|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"]
    names += text + vision + reasoning
    return names + [f"<|reserved_special_token_{i}|>" for i in range(2048 - len(names))]


LLAMA4_SPECIALS = _llama4_specials()

# Text of control tokens that end a turn in some Llama-family vocabulary (used for `stop_ids` of HF / GGUF files).
END_OF_TURN_TEXTS = frozenset({
    "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|eot|>", "<|eom|>", "<|im_end|>", "<|endoftext|>", "</s>",
})  # fmt: skip


# GPT-2 byte-level alphabet: every byte maps to one printable character (printable Latin-1 bytes map to themselves,
# the rest to U+0100 onwards, in byte order). Token strings of byte-level vocabularies are spelled in it.
def _byte_alphabet() -> list[str]:
    keep = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    out, shift = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(0x100 + shift))
            shift += 1
    return out


BYTE_TO_CHAR = _byte_alphabet()
CHAR_TO_BYTE = {c: b for b, c in enumerate(BYTE_TO_CHAR)}


def bytes_to_byte_level(b: bytes) -> str:
    """Spell raw bytes in the GPT-2 byte-level alphabet."""
    return "".join(BYTE_TO_CHAR[x] for x in b)


def byte_level_to_bytes(s: str) -> bytes:
    """Inverse of `bytes_to_byte_level`; characters outside the alphabet are taken as UTF-8 text."""
    out = bytearray()
    for ch in s:
        b = CHAR_TO_BYTE.get(ch)
        out.extend(ch.encode("utf-8") if b is None else (b,))
    return bytes(out)


# ================================================================================================ protocol


class Tokenizer:
    """Text <-> token ids. Concrete backends below fill these attributes and implement the methods."""

    kind: str = "abstract"  # "tiktoken" | "spm" | "bpe" (byte-level) | "other"
    source: str = "<memory>"  # file it came from, for error messages
    vocab_size: int
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    stop_ids: frozenset[int] = frozenset()
    special_tokens: dict[str, int]
    add_bos: bool = False

    def encode(self, text: str, *, bos: bool = False, eos: bool = False, allow_special: bool = False) -> list[int]:
        """Token ids of `text`, optionally wrapped in BOS / EOS."""
        if not isinstance(text, str):
            raise TokenizerError(f"{self.source}: encode() takes a str, got {type(text).__name__}")
        ids = self._encode(text, allow_special)
        if bos:
            ids.insert(0, self._require(self.bos_id, "BOS"))
        if eos:
            ids.append(self._require(self.eos_id, "EOS"))
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Text of `ids`; invalid UTF-8 becomes U+FFFD."""
        if skip_special:
            specials = set(self.special_tokens.values())
            ids = [i for i in ids if i not in specials]
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """Exact bytes of `ids` (a streaming decoder emits only complete UTF-8 characters of these)."""
        raise NotImplementedError

    def id_to_token(self, i: int) -> str:
        """The vocabulary's spelling of one id (byte-level BPE: GPT-2 alphabet, e.g. "Ġthe"; specials: their text)."""
        raise NotImplementedError

    def token_to_id(self, s: str) -> int | None:
        """Inverse of `id_to_token`; None when `s` is not a token."""
        raise NotImplementedError

    # -- helpers
    def _encode(self, text: str, allow_special: bool) -> list[int]:
        raise NotImplementedError

    def _require(self, i: int | None, what: str) -> int:
        if i is None:
            raise TokenizerError(f"{self.source}: this tokenizer has no {what} token")
        return i

    def _check_ids(self, ids: Sequence[int]) -> None:
        for i in ids:
            if not 0 <= int(i) < self.vocab_size:
                raise TokenizerError(f"{self.source}: token id {i} is outside the vocabulary (size {self.vocab_size})")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kind={self.kind!r}, vocab_size={self.vocab_size}, source={self.source!r})"


# ================================================================================================ Meta tiktoken


def _meta_pieces(text: str) -> Iterator[str]:
    """Cut text as Meta's encoder does: 400000-char chunks, then runs of one kind (str.isspace or not) cut every
    25000 chars. Yields the pieces in order (their concatenation is `text`)."""
    for start in range(0, max(len(text), 1), META_MAX_CHUNK):
        chunk = text[start : start + META_MAX_CHUNK]
        cuts = [0]
        # Python's re `\s` is str.isspace, the test Meta's splitter uses.
        for run in re.finditer(r"\s+|\S+", chunk):
            cuts.extend(range(run.start() + META_MAX_RUN, run.end(), META_MAX_RUN))
        cuts.append(len(chunk))
        for a, b in zip(cuts, cuts[1:], strict=False):
            yield chunk[a:b]


def _read_bpe_ranks(path: Path, data: bytes) -> dict[bytes, int]:
    """Parse a tiktoken ranks file: one '<base64 token> <rank>' per line."""
    ranks: dict[bytes, int] = {}
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{path}: not a tiktoken ranks file (non-ASCII byte at offset {e.start})") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError("expected '<base64> <rank>'")
            token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
        except ValueError as e:
            raise TokenizerError(f"{path}: line {lineno} of the tiktoken ranks file is malformed ({e})") from None
        if token in ranks:
            raise TokenizerError(f"{path}: line {lineno}: token {parts[0]} listed twice")
        ranks[token] = rank
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{path}: ranks are not exactly 0..{len(ranks) - 1}")
    return ranks


class TiktokenTokenizer(Tokenizer):
    """Meta's Llama 3.x (128000 ranks + 256 specials) or Llama 4 (200000 ranks + 2048 specials) tokenizer."""

    kind = "tiktoken"

    def __init__(self, ranks: dict[bytes, int], *, source: str = "<memory>") -> None:
        import tiktoken

        n = len(ranks)
        if n == 128_000:
            self.family, names, pattern = "llama3", LLAMA3_SPECIALS, LLAMA3_PATTERN
            end_names, pad = ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"), "<|finetune_right_pad_id|>"
        elif n == 200_000:
            self.family, names, pattern = "llama4", LLAMA4_SPECIALS, LLAMA4_PATTERN
            end_names, pad = ("<|end_of_text|>", "<|eom|>", "<|eot|>"), "<|finetune_right_pad|>"
        else:
            raise TokenizerError(
                f"{source}: tiktoken file has {n} ranks; expected 128000 (Llama 3) or 200000 (Llama 4)"
            )
        self.source, self.pattern, self.ranks = source, pattern, ranks
        self.n_base = n
        self.special_tokens = {name: n + i for i, name in enumerate(names)}
        self._enc = tiktoken.Encoding(
            name=Path(source).name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=self.special_tokens
        )
        self.vocab_size = n + len(names)
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.pad_id = self.special_tokens[pad]
        self.stop_ids = frozenset(self.special_tokens[t] for t in end_names)
        self.add_bos = True
        self._by_id: list[bytes] | None = None
        self._by_text: dict[str, int] | None = None
        self._id_to_special = {i: s for s, i in self.special_tokens.items()}

    def _encode(self, text: str, allow_special: bool) -> list[int]:
        ids: list[int] = []
        for piece in _meta_pieces(text):
            if allow_special:
                ids.extend(self._enc.encode(piece, allowed_special="all"))
            else:
                ids.extend(self._enc.encode_ordinary(piece))
        return ids

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        self._check_ids(ids)
        return self._enc.decode_bytes([int(i) for i in ids])

    def token_bytes(self, i: int) -> bytes:
        """Bytes of one BPE rank (specials: their UTF-8 text)."""
        if self._by_id is None:
            by_id = [b""] * self.n_base
            for tok, r in self.ranks.items():
                by_id[r] = tok
            self._by_id = by_id
        if i >= self.n_base:
            return self._id_to_special[i].encode()
        return self._by_id[i]

    def id_to_token(self, i: int) -> str:
        self._check_ids([i])
        if i >= self.n_base:
            return self._id_to_special[i]
        return bytes_to_byte_level(self.token_bytes(i))  # HF spelling, e.g. " the" -> "Ġthe"

    def token_to_id(self, s: str) -> int | None:
        if s in self.special_tokens:
            return self.special_tokens[s]
        if self._by_text is None:
            self._by_text = {bytes_to_byte_level(t): r for t, r in self.ranks.items()}
        return self._by_text.get(s)


# ================================================================================================ sentencepiece

# SentencePiece piece types (sentencepiece_model.proto) == GGUF token_type values.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _proto_fields(buf: bytes) -> Iterator[tuple[int, int, Any]]:
    """Walk one protobuf message: yields (field number, wire type, value) -- value is int or bytes."""
    pos, n = 0, len(buf)

    def varint() -> int:
        nonlocal pos
        shift = result = 0
        while True:
            if pos >= n or shift > 63:
                raise ValueError("truncated varint")
            b = buf[pos]
            pos += 1
            result |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return result

    while pos < n:
        key = varint()
        field, wire = key >> 3, key & 7
        if wire == 0:
            yield field, wire, varint()
        elif wire == 1:
            yield field, wire, buf[pos : pos + 8]
            pos += 8
        elif wire == 2:
            size = varint()
            if pos + size > n:
                raise ValueError("truncated field")
            yield field, wire, buf[pos : pos + size]
            pos += size
        elif wire == 5:
            yield field, wire, buf[pos : pos + 4]
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if field == 0 or pos > n:
            raise ValueError("corrupt message")


def parse_sentencepiece_model(data: bytes) -> dict:
    """Pieces (text, score, type), model type and normalizer flags of a sentencepiece ModelProto."""
    pieces: list[tuple[str, float, int]] = []
    info = {"model_type": 1, "byte_fallback": False, "add_dummy_prefix": True, "remove_extra_whitespaces": True,
            "normalizer": "nmt_nfkc"}  # fmt: skip
    for field, _, value in _proto_fields(data):
        if field == 1:  # SentencePiece
            text, score, kind = "", 0.0, NORMAL
            for f, w, v in _proto_fields(value):
                if f == 1:
                    text = v.decode("utf-8")
                elif f == 2 and w == 5:
                    score = struct.unpack("<f", v)[0]
                elif f == 3:
                    kind = v
            pieces.append((text, score, kind))
        elif field == 2:  # TrainerSpec
            for f, _, v in _proto_fields(value):
                if f == 3:
                    info["model_type"] = v
                elif f == 35:
                    info["byte_fallback"] = bool(v)
        elif field == 3:  # NormalizerSpec
            for f, _, v in _proto_fields(value):
                if f == 1:
                    info["normalizer"] = v.decode("utf-8")
                elif f == 3:
                    info["add_dummy_prefix"] = bool(v)
                elif f == 4:
                    info["remove_extra_whitespaces"] = bool(v)
    if not pieces:
        raise ValueError("no pieces")
    info["pieces"] = pieces
    return info


class SentencePieceTokenizer(Tokenizer):
    """Llama 2 style sentencepiece model, encoded and decoded by the `sentencepiece` library itself."""

    kind = "spm"

    def __init__(self, data: bytes, *, source: str = "<memory>") -> None:
        import sentencepiece

        try:
            self.info = parse_sentencepiece_model(data)
            self.sp = sentencepiece.SentencePieceProcessor(model_proto=data)
        except Exception as e:  # sentencepiece raises RuntimeError / OSError on corrupt protos
            raise TokenizerError(f"{source}: not a sentencepiece model ({e})") from None
        self.source = source
        sp = self.sp
        self.vocab_size = sp.get_piece_size()
        self.pieces = self.info["pieces"]
        ids = (sp.bos_id(), sp.eos_id(), sp.pad_id())
        self.bos_id, self.eos_id, self.pad_id = (i if i >= 0 else None for i in ids)
        self.unk_id = sp.unk_id() if sp.unk_id() >= 0 else None
        # Control and unknown pieces are "special": never produced from text unless allow_special (as llama.cpp).
        self.special_tokens = {p: i for i, (p, _, t) in enumerate(self.pieces) if t in (CONTROL, UNKNOWN)}
        self.stop_ids = frozenset({self.eos_id} if self.eos_id is not None else ())
        self.add_bos = True
        by_length = sorted(self.special_tokens, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, by_length))) if by_length else None

    def _encode(self, text: str, allow_special: bool) -> list[int]:
        if not allow_special or self._special_re is None:
            return self.sp.encode(text)
        # Each text fragment between special tokens gets its own dummy prefix, as llama.cpp and HF (legacy) do.
        ids: list[int] = []
        pos = 0
        for m in self._special_re.finditer(text):
            if m.start() > pos:
                ids.extend(self.sp.encode(text[pos : m.start()]))
            ids.append(self.special_tokens[m.group()])
            pos = m.end()
        if pos < len(text):
            ids.extend(self.sp.encode(text[pos:]))
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        self._check_ids(ids)
        return self.sp.decode([int(i) for i in ids])  # sentencepiece drops control pieces either way

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        self._check_ids(ids)
        out = bytearray()
        first = True
        for i in ids:
            text, _, kind = self.pieces[i]
            if kind == CONTROL:
                continue
            if kind == BYTE:
                out.append(int(text[3:5], 16))
            elif kind == UNKNOWN:
                out.extend(" \u2047 ".encode())
            else:
                piece = text.replace("\u2581", " ").encode()
                if first and self.info["add_dummy_prefix"] and piece.startswith(b" "):
                    piece = piece[1:]  # the dummy prefix sentencepiece added in front of the text
                out.extend(piece)
            first = False
        return bytes(out)

    def id_to_token(self, i: int) -> str:
        self._check_ids([i])
        return self.pieces[i][0]

    def token_to_id(self, s: str) -> int | None:
        i = self.sp.piece_to_id(s)
        return i if self.pieces[i][0] == s else None


# ================================================================================================ tokenizers library


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` (from tokenizer.json, or built from GGUF metadata) behind herd's protocol."""

    def __init__(
        self,
        tk: Any,
        *,
        kind: str,
        bos_id: int | None,
        eos_id: int | None,
        pad_id: int | None = None,
        add_bos: bool = False,
        extra_stop_ids: Sequence[int] = (),
        source: str = "<memory>",
        gguf_pre: str | None = None,
        scores: list[float] | None = None,
    ) -> None:
        self.tk, self.kind, self.source = tk, kind, source
        self.gguf_pre, self.scores = gguf_pre, scores
        self.vocab_size = tk.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id, self.pad_id, self.add_bos = bos_id, eos_id, pad_id, add_bos
        self.added = {i: t for i, t in tk.get_added_tokens_decoder().items()}  # id -> AddedToken
        self.special_tokens = {t.content: i for i, t in self.added.items() if t.special}
        stops = {i for i in (eos_id, *extra_stop_ids) if i is not None}
        stops |= {i for t, i in self.special_tokens.items() if t in END_OF_TURN_TEXTS}
        self.stop_ids = frozenset(stops)
        self._lock = threading.Lock()

    def _encode(self, text: str, allow_special: bool) -> list[int]:
        # `encode_special_tokens=True` makes special added tokens plain text; non-special added tokens
        # (GGUF user-defined) stay whole, as in llama.cpp.
        with self._lock:
            self.tk.encode_special_tokens = not allow_special
            return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        self._check_ids(ids)
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        self._check_ids(ids)
        if self.kind not in ("bpe", "spm"):
            return self.decode(ids).encode()
        out = bytearray()
        for n, i in enumerate(ids):
            tok = self.tk.id_to_token(int(i))
            if int(i) in self.added:
                out.extend(tok.encode())
            elif self.kind == "bpe":
                out.extend(byte_level_to_bytes(tok))
            elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", tok):
                out.append(int(tok[3:5], 16))
            else:
                piece = tok.replace("\u2581", " ").encode()
                out.extend(piece[1:] if n == 0 and piece.startswith(b" ") else piece)  # drop the dummy prefix
        return bytes(out)

    def id_to_token(self, i: int) -> str:
        self._check_ids([i])
        return self.tk.id_to_token(int(i))

    def token_to_id(self, s: str) -> int | None:
        return self.tk.token_to_id(s)


# ================================================================================================ loading


def _load_hf_json(path: Path) -> HFTokenizer:
    """tokenizer.json (+ tokenizer_config.json / generation_config.json beside it)."""
    from tokenizers import Tokenizer as TK

    try:
        text = path.read_text(encoding="utf-8")
        spec = json.loads(text)
        tk = TK.from_str(text)
    except FileNotFoundError:
        raise TokenizerError(f"{path}: file not found") from None
    except Exception as e:
        raise TokenizerError(f"{path}: not a valid tokenizer.json ({type(e).__name__}: {e})") from None

    def read_json(name: str) -> dict:
        p = path.parent / name
        if not p.exists():
            return {}
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except Exception as e:
            raise TokenizerError(f"{p}: not valid JSON ({e})") from None

    config, gen = read_json("tokenizer_config.json"), read_json("generation_config.json")

    def token_id(name: str) -> int | None:
        value = config.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        return tk.token_to_id(value) if isinstance(value, str) else None

    bos, eos, pad = token_id("bos_token"), token_id("eos_token"), token_id("pad_token")
    # The post-processor template (Llama 3 files) says which token a raw prompt starts with.
    post = spec.get("post_processor") or {}
    single = [s for p in ([post] + post.get("processors", [])) for s in p.get("single", [])]
    template_bos = tk.token_to_id(single[0]["SpecialToken"]["id"]) if single and "SpecialToken" in single[0] else None
    bos = bos if bos is not None else template_bos
    add_bos = bool(config["add_bos_token"]) if "add_bos_token" in config else template_bos is not None
    extra = gen.get("eos_token_id", [])
    extra = [extra] if isinstance(extra, int) else list(extra)
    model, dec = spec.get("model") or {}, json.dumps(spec.get("decoder"))
    if model.get("byte_fallback") or "ByteFallback" in dec or "Metaspace" in dec or "\u2581" in dec:
        kind = "spm"
    elif "ByteLevel" in dec:
        kind = "bpe"
    else:
        kind = "other"
    return HFTokenizer(tk, kind=kind, bos_id=bos, eos_id=eos, pad_id=pad, add_bos=add_bos, extra_stop_ids=extra,
                       source=str(path))  # fmt: skip


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer from a checkpoint folder, a tokenizer.json or a tokenizer.model (a .gguf file's vocabulary:
    herd.formats.load_tokenizer)."""
    path = Path(path)
    if path.is_dir():
        if (path / "tokenizer.json").exists():
            return _load_hf_json(path / "tokenizer.json")
        if (path / "tokenizer.model").exists():
            return load_tokenizer(path / "tokenizer.model")
        raise TokenizerError(f"{path}: folder has neither tokenizer.json nor tokenizer.model")
    if not path.exists():
        raise TokenizerError(f"{path}: file not found")
    if path.suffix == ".json":
        return _load_hf_json(path)
    if path.suffix == ".gguf":  # a GGUF vocabulary is a format's business (floor 6), not this module's
        raise TokenizerError(f"{path}: a GGUF file's vocabulary is read by herd.formats.load_tokenizer")
    data = path.read_bytes()
    if not data:
        raise TokenizerError(f"{path}: file is empty")
    if re.match(rb"[A-Za-z0-9+/]+=* \d+\r?\n", data[:256]):
        return TiktokenTokenizer(_read_bpe_ranks(path, data), source=str(path))
    return SentencePieceTokenizer(data, source=str(path))

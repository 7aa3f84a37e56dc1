"""GGUF vocabularies <-> herd tokenizers (SPEC.md §4).

`tokenizer_from_gguf` rebuilds what a GGUF file's `tokenizer.ggml.*` metadata describes as an HFTokenizer: "gpt2"
byte-level BPE with llama.cpp's pre-tokenizer regexes (by `tokenizer.ggml.pre`), or "llama" sentencepiece-style BPE
with byte fallback (merges derived from the scores). `tokenizer_to_gguf_metadata` goes the other way for the GGUF
writer: tiktoken (Llama 3/4), sentencepiece (Llama 2) and tokenizer.json vocabularies.

Floor 6 (formats): it builds on herd.tokenizer (floor 5), which does not know GGUF; whoever reads a GGUF file's
vocabulary (herd.formats.load_checkpoint / load_tokenizer, herd.api) calls this module.
"""

from __future__ import annotations

import gc
import json
import re
from typing import Any, Sequence

from herd.errors import TokenizerError
from herd.tokenizer import (BYTE, CONTROL, GGUF_PRE_TOKENIZERS, LLAMA3_PATTERN, LLAMA3_PATTERN_GGUF, LLAMA4_PATTERN,
                            NORMAL, UNKNOWN, USER_DEFINED, HFTokenizer, SentencePieceTokenizer, TiktokenTokenizer,
                            Tokenizer, bytes_to_byte_level)

def _spm_merges(tokens: list[str], scores: Sequence[float], types: Sequence[int]) -> list[tuple[str, str]]:
    """BPE merges implied by a sentencepiece vocabulary: every split of a normal token into two known tokens,
    best score first (sentencepiece merges the pair whose result scores highest)."""
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    found = []
    for i, t in enumerate(tokens):
        if types[i] not in (NORMAL, USER_DEFINED) or len(t) < 2 or vocab[t] != i:
            continue
        for k in range(1, len(t)):
            left, right = t[:k], t[k:]
            if left in vocab and right in vocab:
                found.append((-scores[i], i, vocab[left], left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


def build_spm_tokenizers(
    tokens: list[str], scores: Sequence[float], types: Sequence[int], *, unk_id: int | None, add_space_prefix: bool
) -> Any:
    """A `tokenizers.Tokenizer` equivalent to a sentencepiece BPE vocabulary with byte fallback."""
    from tokenizers import Tokenizer as TK, decoders, models, normalizers

    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    unk = tokens[unk_id] if unk_id is not None else None
    model = models.BPE(vocab, _spm_merges(tokens, scores, types), unk_token=unk, fuse_unk=True, byte_fallback=True)
    tk = TK(model)
    steps = [normalizers.Replace(" ", "\u2581")]
    if add_space_prefix:
        steps.insert(0, normalizers.Prepend("\u2581"))
    tk.normalizer = normalizers.Sequence(steps)
    dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tk.decoder = decoders.Sequence(dec)
    _add_typed_tokens(tk, tokens, types, special_types=(CONTROL, UNKNOWN))
    return tk


def build_bpe_tokenizers(tokens: list[str], merges: Sequence[str], types: Sequence[int], pre: str) -> Any:
    """A `tokenizers.Tokenizer` for a byte-level BPE vocabulary, pre-tokenized as llama.cpp does for `pre`."""
    from tokenizers import Regex, Tokenizer as TK, decoders, models, pre_tokenizers

    if pre not in GGUF_PRE_TOKENIZERS:
        raise TokenizerError(
            f"GGUF tokenizer.ggml.pre = {pre!r} is not supported; known: {', '.join(sorted(GGUF_PRE_TOKENIZERS))}"
        )
    regexes, ignore_merges, _ = GGUF_PRE_TOKENIZERS[pre]
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    pairs = []
    for n, m in enumerate(merges):
        left, sep, right = m.partition(" ")
        if not sep or left not in vocab or right not in vocab:
            raise TokenizerError(f"GGUF tokenizer.ggml.merges[{n}] = {m!r} is not 'left right' over the vocabulary")
        pairs.append((left, right))
    tk = TK(models.BPE(vocab, pairs, fuse_unk=False, ignore_merges=ignore_merges))
    steps = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        steps + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tk.decoder = decoders.ByteLevel()
    _add_typed_tokens(tk, tokens, types, special_types=(CONTROL,))
    return tk


def _add_typed_tokens(tk: Any, tokens: list[str], types: Sequence[int], special_types: tuple[int, ...]) -> None:
    """Register control (special) and user-defined (plain added) tokens so text never splits them."""
    from tokenizers import AddedToken

    typed = list(zip(tokens, types, strict=True))
    special = [AddedToken(t, special=True, normalized=False) for t, k in typed if k in special_types]
    plain = [AddedToken(t, special=False, normalized=False) for t, k in typed if k == USER_DEFINED]
    if special:
        tk.add_special_tokens(special)
    if plain:
        tk.add_tokens(plain)


# ================================================================================================ GGUF vocabularies

_GGUF = "tokenizer.ggml."


def tokenizer_from_gguf(metadata: dict) -> Tokenizer:
    """Build the tokenizer a GGUF file describes from its metadata (key -> python value)."""
    # the ~10^5 small tuples and lists made on the way hold no cycles, yet their allocation would trigger full
    # collections over every object torch created (~0.08 s of CPU, a quarter of loading the default model): pause
    # the GC
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _tokenizer_from_gguf(metadata)
    finally:
        if enabled:
            gc.enable()


def _tokenizer_from_gguf(metadata: dict) -> Tokenizer:
    def get(key: str, default: Any = None) -> Any:
        return metadata.get(_GGUF + key, default)

    model = get("model")
    if model is None:
        raise TokenizerError(f"GGUF metadata has no {_GGUF}model key")
    tokens = get("tokens")
    if not isinstance(tokens, (list, tuple)) or not tokens:
        raise TokenizerError(f"GGUF metadata key {_GGUF}tokens is missing or empty")
    tokens = [str(t) for t in tokens]
    types = list(get("token_type") or [NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise TokenizerError(f"GGUF {_GGUF}token_type has {len(types)} entries for {len(tokens)} tokens")

    def tok_id(key: str) -> int | None:
        v = get(key)
        if v is None or int(v) < 0:
            return None
        if int(v) >= len(tokens):
            raise TokenizerError(f"GGUF {_GGUF}{key} = {v} is outside the vocabulary ({len(tokens)} tokens)")
        return int(v)

    bos, eos, pad = tok_id("bos_token_id"), tok_id("eos_token_id"), tok_id("padding_token_id")
    stops = [i for i in (tok_id("eot_token_id"), tok_id("eom_token_id")) if i is not None]
    if model == "gpt2":
        merges = get("merges")
        if not merges:
            raise TokenizerError(f"GGUF vocabulary of type 'gpt2' has no {_GGUF}merges")
        pre = str(get("pre") or "default")
        tk = build_bpe_tokenizers(tokens, [str(m) for m in merges], types, pre)
        add_bos = bool(get("add_bos_token", GGUF_PRE_TOKENIZERS[pre][2]))
        return HFTokenizer(tk, kind="bpe", bos_id=bos, eos_id=eos, pad_id=pad, add_bos=add_bos,
                           extra_stop_ids=stops, source="GGUF metadata", gguf_pre=pre)  # fmt: skip
    if model == "llama":
        scores = [float(s) for s in (get("scores") or [])]
        if len(scores) != len(tokens):
            raise TokenizerError(f"GGUF {_GGUF}scores has {len(scores)} entries for {len(tokens)} tokens")
        unk = tok_id("unknown_token_id")
        if unk is None:
            unk = next((i for i, k in enumerate(types) if k == UNKNOWN), None)
        tk = build_spm_tokenizers(
            tokens, scores, types, unk_id=unk, add_space_prefix=bool(get("add_space_prefix", True))
        )
        return HFTokenizer(tk, kind="spm", bos_id=bos, eos_id=eos, pad_id=pad, add_bos=bool(get("add_bos_token", True)),
                           extra_stop_ids=stops, source="GGUF metadata", scores=scores)  # fmt: skip
    raise TokenizerError(f"GGUF {_GGUF}model = {model!r} is not supported (expected 'gpt2' or 'llama')")


def _tiktoken_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Merges equivalent to a ranks file: every split (l, r) of a token into two tokens, ordered by the rank of
    the merged token, then of l and r (the layout HF's converter and llama.cpp's GGUF files use)."""
    found = []
    for tok, rank in ranks.items():
        for k in range(1, len(tok)):
            left, right = tok[:k], tok[k:]
            lr, rr = ranks.get(left), ranks.get(right)
            if lr is not None and rr is not None:
                found.append((rank, lr, rr, left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


def tokenizer_to_gguf_metadata(tok: Tokenizer) -> dict:
    """GGUF tokenizer metadata (key -> python value) describing `tok`; inverse of `tokenizer_from_gguf`."""
    md: dict[str, Any] = {}
    if isinstance(tok, TiktokenTokenizer):
        tokens = [bytes_to_byte_level(tok.token_bytes(i)) for i in range(tok.n_base)] + list(tok.special_tokens)
        md[_GGUF + "model"], md[_GGUF + "pre"] = "gpt2", ("llama-bpe" if tok.family == "llama3" else "llama4")
        md[_GGUF + "tokens"] = tokens
        md[_GGUF + "token_type"] = [NORMAL] * tok.n_base + [CONTROL] * len(tok.special_tokens)
        md[_GGUF + "merges"] = [
            f"{bytes_to_byte_level(a)} {bytes_to_byte_level(b)}" for a, b in _tiktoken_merges(tok.ranks)
        ]
        eot = tok.special_tokens.get("<|eot_id|>", tok.special_tokens.get("<|eot|>"))
        eom = tok.special_tokens.get("<|eom_id|>", tok.special_tokens.get("<|eom|>"))
        md[_GGUF + "eot_token_id"], md[_GGUF + "eom_token_id"] = eot, eom
    elif isinstance(tok, SentencePieceTokenizer):
        if tok.info["model_type"] != 2:
            raise TokenizerError(f"{tok.source}: only sentencepiece BPE models can be written as GGUF 'llama' vocab")
        md[_GGUF + "model"] = "llama"
        md[_GGUF + "tokens"] = [p for p, _, _ in tok.pieces]
        md[_GGUF + "scores"] = [float(s) for _, s, _ in tok.pieces]
        md[_GGUF + "token_type"] = [k for _, _, k in tok.pieces]
        md[_GGUF + "add_space_prefix"] = tok.info["add_dummy_prefix"]
        if tok.unk_id is not None:
            md[_GGUF + "unknown_token_id"] = tok.unk_id
    elif isinstance(tok, HFTokenizer):
        md.update(_hf_to_gguf(tok))
    else:
        raise TokenizerError(f"cannot describe {tok!r} as GGUF metadata")
    for key, value in (("bos_token_id", tok.bos_id), ("eos_token_id", tok.eos_id), ("padding_token_id", tok.pad_id)):
        if value is not None:
            md[_GGUF + key] = int(value)
    md[_GGUF + "add_bos_token"] = bool(tok.add_bos)
    return {k: v for k, v in md.items() if v is not None}


def _hf_to_gguf(tok: HFTokenizer) -> dict:
    """GGUF keys for a tokenizers-backed vocabulary (byte-level BPE or sentencepiece-style BPE)."""
    spec = json.loads(tok.tk.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise TokenizerError(
            f"{tok.source}: only BPE tokenizer.json models can be written as GGUF (got {model.get('type')})"
        )
    tokens = [""] * tok.vocab_size
    for t, i in tok.tk.get_vocab(with_added_tokens=True).items():
        tokens[i] = t
    types = [NORMAL] * tok.vocab_size
    for i, added in tok.added.items():
        types[i] = CONTROL if added.special else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    out: dict[str, Any] = {}
    if tok.kind == "bpe":
        pre = tok.gguf_pre or _detect_pre(spec.get("pre_tokenizer"))
        if pre is None:
            raise TokenizerError(f"{tok.source}: its pre-tokenizer has no GGUF tokenizer.ggml.pre equivalent")
        out.update({"model": "gpt2", "pre": pre, "merges": merges})
    elif tok.kind == "spm":
        for i, t in enumerate(tokens):
            if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", t) and types[i] == NORMAL:
                types[i] = BYTE
        unk = model.get("unk_token")
        if unk is not None and tok.token_to_id(unk) is not None:
            types[tok.token_to_id(unk)] = UNKNOWN
            out["unknown_token_id"] = tok.token_to_id(unk)
        scores = tok.scores
        if scores is None:  # rebuild sentencepiece scores from merge order: earlier merge = higher score
            scores = [0.0] * tok.vocab_size
            first = {}
            for n, m in enumerate(merges):
                first.setdefault(m.replace(" ", ""), n)
            for t, n in first.items():
                if tok.token_to_id(t) is not None:
                    scores[tok.token_to_id(t)] = -float(n + 1)
        out.update({"model": "llama", "scores": list(scores), "add_space_prefix": True})
    else:
        raise TokenizerError(f"{tok.source}: tokenizer kind {tok.kind!r} cannot be written as GGUF")
    out.update({"tokens": tokens, "token_type": types})
    return {_GGUF + k: v for k, v in out.items()}


def _detect_pre(pre: dict | None) -> str | None:
    """The GGUF `pre` name whose regexes equal a tokenizer.json pre_tokenizer, if any."""
    if not pre:
        return None
    steps = pre["pretokenizers"] if pre.get("type") == "Sequence" else [pre]
    splits = [s["pattern"].get("Regex") for s in steps if s.get("type") == "Split"]
    kinds = [s.get("type") for s in steps]
    if splits == [LLAMA3_PATTERN] or splits == [LLAMA3_PATTERN_GGUF]:
        return "llama-bpe"
    if splits == [LLAMA4_PATTERN]:
        return "llama4"
    byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
    if not splits and byte_level and byte_level[0].get("use_regex", True):
        if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
            return "smollm"
        if kinds == ["ByteLevel"]:
            return "gpt-2"
    return None

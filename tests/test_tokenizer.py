"""herd's tokenizers against the references, on the hard-strings corpus (tests/data/hard_strings.json).

References: Meta's `llama_models` Tokenizer (Llama 3 / 4 tiktoken files), transformers' PreTrainedTokenizerFast and
GGUF loader, the `sentencepiece` library, and llama.cpp (`llama_cpp`, vocab-only).
"""

from __future__ import annotations

import ctypes
import json
import unicodedata
from pathlib import Path

import pytest

from herd.errors import TokenizerError
from herd.formats import load_tokenizer
from herd.formats.gguf_vocab import tokenizer_from_gguf, tokenizer_to_gguf_metadata
from herd.tokenizer import LLAMA3_SPECIALS, _meta_pieces

DATA = Path(__file__).parent / "data"


def load_corpus() -> list[str]:
    """The corpus strings plus the generated long ones."""
    spec = json.loads((DATA / "hard_strings.json").read_text(encoding="utf-8"))
    gen = [g.get("prefix", "") + g["repeat"] * g["count"] + g.get("suffix", "") for g in spec["generated"]]
    return spec["strings"] + gen


CORPUS = load_corpus()


def longest_run(s: str) -> int:
    """Longest run of all-whitespace or all-non-whitespace characters (str.isspace, as Meta's splitter)."""
    best = run = 0
    for i, ch in enumerate(s):
        run = run + 1 if i and ch.isspace() == s[i - 1].isspace() else 1
        best = max(best, run)
    return best


# Strings where Meta's encoder cuts the text (runs > 25000 or > 400000 chars): only there may a tokenizer without
# that cut (HF tokenizer.json, llama.cpp) differ from Meta.
META_CUT = {i for i, s in enumerate(CORPUS) if len(s) > 400_000 or longest_run(s) > 25_000}
SHORT = [i for i, s in enumerate(CORPUS) if len(s) < 1000]


def special_modes(i: int) -> tuple[bool, ...]:
    """Both special-token modes for short strings; long ones (no special text, slow) only the plain mode."""
    return (False, True) if i in SHORT_SET else (False,)


SHORT_SET = set(SHORT)


def meta_path(family: str) -> Path:
    import llama_models

    return Path(llama_models.__file__).parent / family / "tokenizer.model"


@pytest.fixture(scope="module", params=["llama3", "llama4"])
def meta_pair(request):
    """(Meta's tokenizer, herd's tokenizer) for one family's tiktoken file."""
    if request.param == "llama3":
        from llama_models.llama3.tokenizer import Tokenizer
    else:
        from llama_models.llama4.tokenizer import Tokenizer
    return Tokenizer(meta_path(request.param)), load_tokenizer(meta_path(request.param))


def gguf_fields(path: Path) -> dict:
    """Test helper: every GGUF metadata field as a python value, read with gguf-py."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {key: field.contents() for key, field in reader.fields.items()}


def write_vocab_gguf(path: Path, metadata: dict) -> Path:
    """Test helper: a vocab-only GGUF (arch llama, dummy hparams, no tensors) that llama.cpp can open."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    hparams = {"llama.context_length": 64, "llama.embedding_length": 64, "llama.block_count": 1,
               "llama.feed_forward_length": 128, "llama.attention.head_count": 2,
               "llama.attention.layer_norm_rms_epsilon": 1e-5}  # fmt: skip
    for key, value in {**metadata, **hparams}.items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_array(key, list(value))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def llama_cpp_vocab(path: Path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is built by the Makefile")
    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


def llama_cpp_piece(llm, token: int) -> bytes:
    """One token's bytes from llama.cpp (llama-cpp-python's own detokenize truncates pieces > 32 bytes)."""
    import llama_cpp

    buf = ctypes.create_string_buffer(1024)
    n = llama_cpp.llama_token_to_piece(llm._model.vocab, token, buf, 1024, 0, True)
    assert n >= 0
    return buf.raw[:n]


def report(name: str, equal: int, total: int, note: str = "") -> None:
    print(f"[tokenizer parity] {name}: {equal}/{total} equal {note}")


# ================================================================================================ Meta tiktoken


def test_meta_tiktoken_ids_and_decode(meta_pair):
    """Ids with and without BOS/EOS and with specials allowed equal Meta's on every string; decode round-trips."""
    meta, herd = meta_pair
    assert herd.special_tokens == meta.special_tokens
    assert (herd.vocab_size, herd.bos_id, herd.eos_id, herd.pad_id) == (
        meta.n_words,
        meta.bos_id,
        meta.eos_id,
        meta.pad_id,
    )
    assert herd.stop_ids == frozenset(meta.stop_tokens)
    equal = 0
    for i, s in enumerate(CORPUS):
        for bos, eos in ((False, False), (True, True), (True, False)) if i in SHORT_SET else ((True, True),):
            ids = herd.encode(s, bos=bos, eos=eos)
            assert ids == meta.encode(s, bos=bos, eos=eos), (s[:50], bos, eos)
        special = herd.encode(s, allow_special=True)
        assert special == meta.encode(s, bos=False, eos=False, allowed_special="all"), s[:50]
        plain = ids[1:-1] if i not in SHORT_SET else herd.encode(s)
        assert herd.decode(plain) == s == meta.decode(plain)
        assert herd.decode_bytes(plain) == s.encode("utf-8")
        assert herd.decode(special) == meta.decode(special)
        equal += 1
    report(f"{herd.family} tiktoken vs Meta", equal, len(CORPUS), "(x3 bos/eos variants + specials + decode)")


def test_meta_cutting_matches_meta_splitter():
    """herd's 400000/25000 cutting yields exactly the pieces Meta's encoder feeds tiktoken."""
    from llama_models.llama3.tokenizer import Tokenizer

    for s in CORPUS:
        meta = [
            p
            for i in range(0, len(s), 400_000)
            for p in Tokenizer._split_whitespaces_or_nonwhitespaces(s[i : i + 400_000], 25_000)
        ]
        assert list(_meta_pieces(s)) == (meta or [""])


def test_decode_partial_utf8(meta_pair):
    """A character split across tokens: decode gives U+FFFD like Meta, decode_bytes the exact bytes."""
    meta, herd = meta_pair
    ids = herd.encode("🤷🏽‍♀️ and 日本")
    for k in range(1, len(ids)):
        assert herd.decode(ids[:k]) == meta.decode(ids[:k])
        assert herd.decode_bytes(ids[:k]) + herd.decode_bytes(ids[k:]) == "🤷🏽‍♀️ and 日本".encode()
    eot = herd.stop_ids - {herd.eos_id}
    assert herd.decode([*ids, *eot], skip_special=True) == "🤷🏽‍♀️ and 日本"


# ================================================================================================ HF tokenizer.json


@pytest.fixture(scope="module")
def llama3_hf_dir(tmp_path_factory) -> Path:
    """A Llama-3-style tokenizer.json made by transformers' own TikTokenConverter from Meta's file."""
    from tokenizers import processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    d = tmp_path_factory.mktemp("llama3_hf")
    tk = TikTokenConverter(vocab_file=str(meta_path("llama3")), extra_special_tokens=LLAMA3_SPECIALS).converted()
    bos = ("<|begin_of_text|>", 128000)
    tk.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos[0]} $A", pair=f"{bos[0]} $A {bos[0]} $B", special_tokens=[bos]),
    ])  # fmt: skip
    tk.save(str(d / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos[0], "eos_token": "<|eot_id|>",
              "clean_up_tokenization_spaces": False, "model_max_length": 131072}  # fmt: skip
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return d


def test_hf_tokenizer_json_matches_transformers_and_meta(llama3_hf_dir):
    from llama_models.llama3.tokenizer import Tokenizer
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast.from_pretrained(str(llama3_hf_dir))
    herd = load_tokenizer(llama3_hf_dir)
    meta = Tokenizer(meta_path("llama3"))
    assert (herd.bos_id, herd.eos_id, herd.add_bos, herd.kind) == (128000, 128009, True, "bpe")
    assert {128001, 128008, 128009} <= herd.stop_ids
    differs_from_meta = set()
    for i, s in enumerate(CORPUS):
        plain = herd.encode(s)
        if i in SHORT_SET:  # long strings: same `tokenizers` engine on both sides, only Meta's cut matters
            assert plain == hf.encode(s, add_special_tokens=False, split_special_tokens=True), s[:50]
            special = herd.encode(s, allow_special=True)
            assert special == hf.encode(s, add_special_tokens=False), s[:50]
            assert herd.encode(s, bos=True, allow_special=True) == hf(s)["input_ids"]
            assert herd.decode(special) == hf.decode(special)
            assert herd.decode(plain) == s and herd.decode_bytes(plain) == s.encode()
        if plain != meta.encode(s, bos=False, eos=False):
            differs_from_meta.add(i)
    # Without Meta's 25000-run cut, BPE merges across the cut point: the only place they may differ.
    assert differs_from_meta <= META_CUT
    # As GGUF metadata, the tokenizer.json and Meta's file give the same vocabulary, merges and types.
    md, ref = tokenizer_to_gguf_metadata(herd), tokenizer_to_gguf_metadata(load_tokenizer(meta_path("llama3")))
    for key in ("model", "pre", "tokens", "merges", "token_type", "bos_token_id", "add_bos_token"):
        assert md["tokenizer.ggml." + key] == ref["tokenizer.ggml." + key], key
    report("Llama 3 tokenizer.json vs transformers", len(SHORT), len(SHORT), "(x2 special modes, + BOS, decode)")
    report("Llama 3 tokenizer.json vs Meta", len(CORPUS) - len(differs_from_meta), len(CORPUS),
           f"(differ only on {len(differs_from_meta)} strings Meta cuts at 25000-char runs)")  # fmt: skip


# ================================================================================================ sentencepiece

TRAIN_TEXT = (
    "The quick brown fox jumps over the lazy dog. It's 2024 and I'll've said 12345 numbers.\n"
    "Llamas graze in the Andes; they're calm animals. Café, naïve, déjà vu — résumé!\n"
    "def main():\n    print('hello, world')\n    return 0\n"
    "日本語の文章も少し。 Привет, как дела? مرحبا\n"
)


@pytest.fixture(scope="module")
def tiny_spm(tmp_path_factory) -> Path:
    """A tiny Llama-2-like sentencepiece BPE model (byte fallback, identity normalizer, split digits)."""
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("spm")
    (d / "train.txt").write_text(TRAIN_TEXT * 40, encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(d / "train.txt"), model_prefix=str(d / "tokenizer"), vocab_size=400, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, split_digits=True, allow_whitespace_only_pieces=True, character_coverage=1.0,
        user_defined_symbols=["<tool>"], unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2,
    )  # fmt: skip
    return d / "tokenizer.model"


def test_sentencepiece_matches_sentencepiece_and_transformers(tiny_spm):
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    sp = spm.SentencePieceProcessor(model_file=str(tiny_spm))
    herd = load_tokenizer(tiny_spm.parent)  # folder without tokenizer.json -> tokenizer.model
    hf = LlamaTokenizer.from_pretrained(str(tiny_spm.parent), legacy=True)
    assert (herd.kind, herd.vocab_size, herd.bos_id, herd.eos_id, herd.add_bos) == ("spm", 400, 1, 2, True)
    hf_differs = set()
    for i, s in enumerate(CORPUS):
        ids = herd.encode(s, bos=True, eos=True)
        assert ids == [1, *sp.encode(s), 2]
        assert herd.decode(ids) == sp.decode(ids)
        assert herd.decode_bytes(ids[1:-1]).decode("utf-8", "replace") == sp.decode(ids)
        if ids[1:-1] != hf.encode(s, add_special_tokens=False, split_special_tokens=True):
            hf_differs.add(i)
        if i in SHORT_SET and herd.encode(s, allow_special=True) != hf.encode(s, add_special_tokens=False):
            hf_differs.add(i)
    # transformers' Metaspace does not add the dummy "▁" to text that already starts with a space, sentencepiece
    # (Meta's Llama 2 tokenizer) does: those are the only differences.
    assert hf_differs == {i for i, s in enumerate(CORPUS) if s.startswith(" ")}
    report("tiny sentencepiece vs sentencepiece", len(CORPUS), len(CORPUS))
    report("tiny sentencepiece vs transformers LlamaTokenizer", len(CORPUS) - len(hf_differs), len(CORPUS),
           "(differs only on strings starting with a space)")  # fmt: skip


def test_sentencepiece_style_tokenizer_json(tiny_spm, tmp_path):
    """A Llama-2-style tokenizer.json (written by transformers) loads as kind 'spm' and encodes / decodes as
    transformers does; written as GGUF (scores rebuilt from merge order) it encodes as sentencepiece."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    hf = LlamaTokenizer.from_pretrained(str(tiny_spm.parent), legacy=True)
    hf.save_pretrained(str(tmp_path))
    herd = load_tokenizer(tmp_path)
    assert (herd.kind, herd.bos_id, herd.eos_id) == ("spm", 1, 2)
    gguf_vocab = tokenizer_from_gguf(tokenizer_to_gguf_metadata(herd))
    sp = spm.SentencePieceProcessor(model_file=str(tiny_spm))
    for i in SHORT:
        s = CORPUS[i]
        ids = herd.encode(s, allow_special=True)
        assert ids == hf.encode(s, add_special_tokens=False), s[:50]
        assert herd.decode(ids) == hf.decode(ids)
        assert herd.decode_bytes(ids).decode("utf-8", "replace") == hf.decode(ids)
        assert gguf_vocab.encode(s) == sp.encode(s), s[:50]
    report("Llama-2-style tokenizer.json vs transformers", len(SHORT), len(SHORT), "(+ its GGUF vs sentencepiece)")


def spm_gguf_metadata(model: Path) -> dict:
    """GGUF 'llama' vocabulary metadata built straight from the sentencepiece API (independent of herd)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model))

    def kind(i: int) -> int:
        if sp.is_unknown(i):
            return 2
        if sp.is_control(i):
            return 3
        if sp.is_byte(i):
            return 6
        return 4 if sp.id_to_piece(i) == "<tool>" else 1

    n = sp.get_piece_size()
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
        "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)],
        "tokenizer.ggml.token_type": [kind(i) for i in range(n)],
        "tokenizer.ggml.bos_token_id": sp.bos_id(),
        "tokenizer.ggml.eos_token_id": sp.eos_id(),
        "tokenizer.ggml.unknown_token_id": sp.unk_id(),
        "tokenizer.ggml.add_bos_token": True,
    }


def test_gguf_spm_vocab_matches_sentencepiece(tiny_spm):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tiny_spm))
    md = spm_gguf_metadata(tiny_spm)
    herd = tokenizer_from_gguf(md)
    for i, s in enumerate(CORPUS):
        ids = herd.encode(s)
        assert ids == sp.encode(s), s[:50]
        if i in SHORT_SET:
            assert herd.decode(ids) == sp.decode(ids)
    # herd's own export of the sentencepiece file gives the same vocabulary
    exported = tokenizer_to_gguf_metadata(load_tokenizer(tiny_spm))
    for key in ("tokens", "scores", "token_type", "bos_token_id", "eos_token_id", "unknown_token_id"):
        assert exported["tokenizer.ggml." + key] == pytest.approx(md["tokenizer.ggml." + key]), key
    report("GGUF 'llama' vocab vs sentencepiece", len(CORPUS), len(CORPUS))


@pytest.mark.llamacpp
def test_gguf_spm_vocab_matches_llama_cpp(tiny_spm, tmp_path):
    md = tokenizer_to_gguf_metadata(load_tokenizer(tiny_spm))
    llm = llama_cpp_vocab(write_vocab_gguf(tmp_path / "spm.gguf", md))
    herd = load_tokenizer(tmp_path / "spm.gguf")  # herd's own GGUF path
    for i in SHORT:  # (long strings: checked against sentencepiece above)
        s = CORPUS[i]
        for special in (False, True):
            assert herd.encode(s, allow_special=special) == llm.tokenize(s.encode(), add_bos=False, special=special), s[
                :50
            ]
    report("GGUF 'llama' vocab vs llama.cpp", len(SHORT), len(SHORT), "(x2 special modes)")


# ================================================================================================ GGUF (default model)


@pytest.fixture(scope="module")
def smollm_metadata(smollm_gguf) -> dict:
    return gguf_fields(smollm_gguf)


def non_ascii_number(s: str) -> bool:
    return any(unicodedata.category(c).startswith("N") and not c.isascii() for c in s)


def test_gguf_default_model_matches_transformers(smollm_gguf, smollm_metadata):
    from transformers import AutoTokenizer

    herd = tokenizer_from_gguf(smollm_metadata)
    hf = AutoTokenizer.from_pretrained(str(smollm_gguf.parent), gguf_file=smollm_gguf.name)
    assert (herd.bos_id, herd.eos_id, herd.pad_id, herd.add_bos) == (1, 2, 2, False)
    differs = set()
    for i in SHORT:  # (long strings: checked against llama.cpp, the reference for GGUF files)
        s = CORPUS[i]
        if herd.encode(s) != hf.encode(s, add_special_tokens=False, split_special_tokens=True):
            differs.add(i)
        if herd.encode(s, allow_special=True) != hf.encode(s, add_special_tokens=False):
            differs.add(i)
    # transformers' GGUF loader has no `smollm` pre-tokenizer (it splits digits one by one first, as llama.cpp
    # and SmolLM's own tokenizer.json do): numbers outside ASCII whose merges exist are the only differences.
    assert differs <= {i for i, s in enumerate(CORPUS) if non_ascii_number(s)}
    report("SmolLM2 GGUF vs transformers", len(SHORT) - len(differs), len(SHORT),
           f"(differs on {len(differs)} strings with non-ASCII digits: transformers ignores pre=smollm)")  # fmt: skip


@pytest.mark.llamacpp
def test_gguf_default_model_matches_llama_cpp(smollm_gguf, smollm_metadata):
    from herd.tokenizer import BYTE_TO_CHAR

    herd = tokenizer_from_gguf(smollm_metadata)
    llm = llama_cpp_vocab(smollm_gguf)
    for i, s in enumerate(CORPUS):
        for special in special_modes(i):
            assert herd.encode(s, allow_special=special) == llm.tokenize(s.encode(), add_bos=False, special=special), s[
                :50
            ]
    for i in range(herd.vocab_size):  # every token's bytes, specials included
        assert herd.decode_bytes([i]) == llama_cpp_piece(llm, i), i
    # Round trip wherever the vocabulary can spell every byte (SmolLM2 has no token for some control bytes).
    missing = {b for b in range(256) if herd.token_to_id(BYTE_TO_CHAR[b]) is None}
    spellable = [CORPUS[i] for i in SHORT if not missing & set(CORPUS[i].encode())]
    assert all(herd.decode(herd.encode(s)) == s for s in spellable)
    report("SmolLM2 GGUF vs llama.cpp", len(CORPUS), len(CORPUS),
           f"(x2 special modes; {herd.vocab_size} token pieces; round trip {len(spellable)} strings)")  # fmt: skip


def test_gguf_metadata_round_trip(smollm_metadata):
    herd = tokenizer_from_gguf(smollm_metadata)
    md = tokenizer_to_gguf_metadata(herd)
    for key in ("model", "pre", "tokens", "merges", "token_type", "bos_token_id", "eos_token_id", "padding_token_id",
                "add_bos_token"):  # fmt: skip
        assert md["tokenizer.ggml." + key] == smollm_metadata["tokenizer.ggml." + key], key
    again = tokenizer_from_gguf(md)
    for i in SHORT:
        s = CORPUS[i]
        for special in (False, True):
            assert again.encode(s, allow_special=special) == herd.encode(s, allow_special=special)


# ================================================================================================ tiktoken -> GGUF


@pytest.mark.llamacpp
@pytest.mark.parametrize("family", ["llama3", pytest.param("llama4", marks=pytest.mark.slow)])
def test_tiktoken_to_gguf_matches_meta_and_llama_cpp(family, tmp_path):
    """Meta's file written as GGUF metadata: herd reads it back with Meta's ids, llama.cpp reads it too."""
    if family == "llama3":
        from llama_models.llama3.tokenizer import Tokenizer
    else:
        from llama_models.llama4.tokenizer import Tokenizer
    meta = Tokenizer(meta_path(family))
    md = tokenizer_to_gguf_metadata(load_tokenizer(meta_path(family)))
    herd = tokenizer_from_gguf(md)
    assert herd.stop_ids == frozenset(meta.stop_tokens) and herd.bos_id == meta.bos_id
    differs = {i for i, s in enumerate(CORPUS) if herd.encode(s) != meta.encode(s, bos=False, eos=False)}
    assert differs <= META_CUT
    llm = llama_cpp_vocab(write_vocab_gguf(tmp_path / f"{family}.gguf", md))
    # llama.cpp's Llama 4 ("gpt-4o") regex crashes on the 25000+ char runs, so only short strings go to it.
    cpp_differs = set()
    for i in SHORT:
        s = CORPUS[i]
        for special in (False, True):
            if herd.encode(s, allow_special=special) != llm.tokenize(s.encode(), add_bos=False, special=special):
                cpp_differs.add(i)
    if family == "llama3":
        assert not cpp_differs
    else:  # llama.cpp's rewrite of the o200k regex drops \p{M} from letter runs: Indic / Thai marks split apart
        assert cpp_differs <= {i for i in SHORT if any(unicodedata.category(c).startswith("M") for c in CORPUS[i])}
    report(f"{family} tiktoken->GGUF vs Meta", len(CORPUS) - len(differs), len(CORPUS), f"({len(differs)} Meta-cut)")
    report(f"{family} tiktoken->GGUF vs llama.cpp", len(SHORT) - len(cpp_differs), len(SHORT))


# ================================================================================================ bad input


def test_bad_files_raise_tokenizer_error_naming_the_file(tmp_path, llama3_hf_dir):
    with pytest.raises(TokenizerError, match="missing.model"):
        load_tokenizer(tmp_path / "missing.model")
    with pytest.raises(TokenizerError, match="neither tokenizer.json nor tokenizer.model"):
        load_tokenizer(tmp_path)
    garbage = tmp_path / "garbage" / "tokenizer.model"
    garbage.parent.mkdir()
    garbage.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(TokenizerError, match=str(garbage)):
        load_tokenizer(garbage.parent)
    bad_ranks = tmp_path / "ranks.model"
    bad_ranks.write_text("IQ== 0\nIg== 1\nnot-base64!! 2\n")
    with pytest.raises(TokenizerError, match=r"ranks.model: line 3"):
        load_tokenizer(bad_ranks)
    few_ranks = tmp_path / "few.model"
    few_ranks.write_text("IQ== 0\nIg== 1\n")
    with pytest.raises(TokenizerError, match=r"few.model.*2 ranks"):
        load_tokenizer(few_ranks)
    empty = tmp_path / "empty.model"
    empty.write_bytes(b"")
    with pytest.raises(TokenizerError, match="empty.model"):
        load_tokenizer(empty)
    truncated = tmp_path / "trunc" / "tokenizer.json"
    truncated.parent.mkdir()
    truncated.write_bytes((llama3_hf_dir / "tokenizer.json").read_bytes()[:100_000])
    with pytest.raises(TokenizerError, match=str(truncated)):
        load_tokenizer(truncated.parent)


def test_bad_spm_and_gguf_metadata(tmp_path, tiny_spm, smollm_metadata):
    cut = tmp_path / "cut.model"
    cut.write_bytes(tiny_spm.read_bytes()[:1001])
    with pytest.raises(TokenizerError, match="cut.model"):
        load_tokenizer(cut)
    md = dict(smollm_metadata)
    with pytest.raises(TokenizerError, match="tokenizer.ggml.pre"):
        tokenizer_from_gguf({**md, "tokenizer.ggml.pre": "no-such-pre"})
    with pytest.raises(TokenizerError, match="merges"):
        tokenizer_from_gguf({k: v for k, v in md.items() if k != "tokenizer.ggml.merges"})
    with pytest.raises(TokenizerError, match="token_type"):
        tokenizer_from_gguf({**md, "tokenizer.ggml.token_type": [1, 1]})
    with pytest.raises(TokenizerError, match="model"):
        tokenizer_from_gguf({**md, "tokenizer.ggml.model": "bert"})
    with pytest.raises(TokenizerError, match="bos_token_id"):
        tokenizer_from_gguf({**md, "tokenizer.ggml.bos_token_id": 10**6})
    herd = tokenizer_from_gguf(md)
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        herd.decode([10**6])

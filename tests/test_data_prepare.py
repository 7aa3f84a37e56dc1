"""`herd data prepare` and the pretraining loader: token shards equal the tokenizer's own encoding (and decode back
to the text), chat rows are rendered by the model's chat format, the manifest is checked against its shards, and the
loader gives each data-parallel rank a disjoint slice of one deterministic global batch, resumable at any step."""

import json

import numpy as np
import pytest
import torch

from herd.errors import ConfigError, FormatError
from herd.train.shards import Loader, TokenData, prepare

TEXT_A = "Lighthouses guide ships home at night. Their keepers log every storm."
TEXT_B = "The quick brown fox jumps over the lazy dog, twice."
DIALOG = [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Four."}]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, smollm_gguf):
    d = tmp_path_factory.mktemp("prep")
    (d / "a.txt").write_text(TEXT_A, encoding="utf-8")
    (d / "b.jsonl").write_text(json.dumps({"text": TEXT_B}) + "\n" + json.dumps({"messages": DIALOG}) + "\n",
                               encoding="utf-8")
    report = prepare(smollm_gguf, [d / "a.txt", d / "b.jsonl"], d / "out", progress=False, shard_tokens=20)
    return d, report


def test_shards_hold_the_tokenizers_encoding(prepared, smollm_gguf):
    from herd.api import load

    d, report = prepared
    llm = load(smollm_gguf)
    tok = llm.tokenizer
    expected = []
    for text in (TEXT_A, TEXT_B):
        expected += tok.encode(text, bos=bool(tok.add_bos and tok.bos_id is not None), eos=True)
    expected += list(llm.chat_format.encode_dialog(DIALOG, add_generation_prompt=False))
    data = TokenData(d / "out", verify=True)
    stream = data.window(0, data.n_tokens).tolist()
    assert stream == expected
    assert report.documents == 3 and report.tokens == len(expected)
    assert report.shards == -(-len(expected) // 20) > 1  # documents straddle the 20-token shards
    m = json.loads((d / "out" / "manifest.json").read_text())
    assert m["dtype"] == "uint16" and m["vocab_size"] == tok.vocab_size == 49152
    assert TEXT_A in tok.decode(stream)
    assert "Four." in tok.decode(stream)


def test_manifest_must_match_shards(prepared, tmp_path):
    import shutil

    d, _ = prepared
    bad = tmp_path / "bad"
    shutil.copytree(d / "out", bad)
    first = sorted(bad.glob("tokens-*.bin"))[0]
    first.write_bytes(first.read_bytes()[:-2])  # one token short
    with pytest.raises(FormatError, match=r"tokens-00000\.bin: 38 bytes, the manifest says 20 tokens"):
        TokenData(bad)
    first.write_bytes(first.read_bytes() + b"\x07\x00")  # right size, wrong contents
    TokenData(bad)  # sizes are checked on every open; contents on request
    with pytest.raises(FormatError, match="sha256"):
        TokenData(bad, verify=True)
    (bad / "manifest.json").unlink()
    with pytest.raises(FormatError, match="no manifest.json"):
        TokenData(bad)


def test_bad_inputs(tmp_path, smollm_gguf):
    (tmp_path / "x.jsonl").write_text('{"txt": "no text key"}\n', encoding="utf-8")
    with pytest.raises(FormatError, match=r"x\.jsonl:1"):
        prepare(smollm_gguf, [tmp_path / "x.jsonl"], tmp_path / "o", progress=False)
    with pytest.raises(FormatError, match="no such input file"):
        prepare(smollm_gguf, [tmp_path / "missing.txt"], tmp_path / "o", progress=False)


class _Stream:
    """A TokenData stand-in holding 0..n-1, so every window says where it came from."""

    def __init__(self, n):
        self.n_tokens, self.folder = n, "mem"

    def window(self, begin, length):
        return np.arange(begin, begin + length, dtype=np.int64)


def _rows(batches):
    return [tuple(r.tolist()) for x, _ in batches for r in x]


def test_loader_slices_one_global_batch():
    data = _Stream(4001)
    T, B = 10, 8
    whole = Loader(data, T, B, seed=3)
    ranks = [Loader(data, T, B, grad_accum=2, dp_rank=r, dp_size=2, seed=3) for r in range(2)]
    for _ in range(60):  # 480 samples: past the 400-sample epoch, into the next permutation
        ref = whole.next()
        assert len(ref) == 1 and ref[0][0].shape == (B, T)
        x, y = ref[0]
        assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)  # targets: next tokens
        parts = [r.next() for r in ranks]
        assert all(len(p) == 2 and p[0][0].shape == (2, T) for p in parts)
        # micro-batch m of rank r is rows m*4 + r*2 ... of the global batch
        assert _rows([parts[0][0], parts[1][0], parts[0][1], parts[1][1]]) == _rows(ref)
    assert sorted(whole._order[1].tolist()) == list(range(400))


def test_loader_resumes_exactly():
    data = _Stream(5000)
    a = Loader(data, 16, 4, seed=1)
    for _ in range(7):
        a.next()
    state = a.state_dict()
    expect = [a.next() for _ in range(5)]
    b = Loader(data, 16, 4, seed=1)
    b.load_state_dict(state)
    assert _rows(sum((b.next() for _ in range(5)), [])) == _rows(sum(expect, []))
    with pytest.raises(ConfigError, match="seed=1, this run has 2"):
        Loader(data, 16, 4, seed=2).load_state_dict(state)
    with pytest.raises(ConfigError, match="--batch-size 6 .* --grad-accum 1 x data-parallel degree 4"):
        Loader(data, 16, 6, dp_size=4)


def test_cli_data_prepare(tmp_path, smollm_gguf, capsys):
    from herd.cli import main

    (tmp_path / "c.txt").write_text(TEXT_A, encoding="utf-8")
    assert main(["data", "prepare", "--tokenizer", str(smollm_gguf), "--input", str(tmp_path / "c.txt"),
                 "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    assert "1 documents" in capsys.readouterr().out
    assert TokenData(tmp_path / "o").n_tokens > 10

"""`herd eval ppl`: perplexity and KL(reference || model) over non-overlapping windows, checked against transformers'
own loss and log-probabilities on the same windows of a tiny HF model."""

import json

import pytest
import torch

import herd
from herd.cli import main as cli
from herd.eval.ppl import perplexity, sample_text
from test_train import _tiny_folder

TEXT = sample_text()[:4000]
CTX = 48


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    return _tiny_folder(root / "a", seed=0), _tiny_folder(root / "b", seed=1)


def _windows(ids, ctx, max_chunks):
    chunks = [ids[i:i + ctx] for i in range(0, len(ids) - 1, ctx)]
    return [c for c in chunks if len(c) > 1][:max_chunks]


@torch.inference_mode()
def _reference(folder, other, ids, max_chunks):
    """Summed NLL and per-token KL(other || folder) from transformers' LlamaForCausalLM."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(folder).eval()
    ref = LlamaForCausalLM.from_pretrained(other).eval()
    nll, kl, n = 0.0, [], 0
    for chunk in _windows(ids, CTX, max_chunks):
        x = torch.tensor([chunk])
        logp = torch.log_softmax(model(x).logits[0, :-1].float(), -1)
        ref_logp = torch.log_softmax(ref(x).logits[0, :-1].float(), -1)
        nll += float(-logp.gather(1, x[0, 1:, None]).sum())
        kl.append((ref_logp.exp() * (ref_logp - logp)).sum(-1))
        n += len(chunk) - 1
    return nll / n, torch.cat(kl), n


def test_perplexity_and_kl_equal_transformers(folders):
    a, b = folders
    llm, ref = herd.load(a), herd.load(b)
    assert not llm.tokenizer.add_bos
    ids = llm.tokenizer.encode(TEXT)
    nll, kl, n = _reference(a, b, ids, max_chunks=5)
    got = perplexity(llm, TEXT, ctx=CTX, max_chunks=5, ref=ref, progress=False)
    assert got["tokens"] == n and got["chunks"] == 5 and got["ctx"] == CTX
    assert abs(got["nll"] - nll) <= 1e-5 * abs(nll)
    assert abs(got["kl_mean"] - float(kl.mean())) <= 1e-4 * float(kl.mean()) + 1e-7
    assert abs(got["kl_max"] - float(kl.max())) <= 1e-4 * float(kl.max()) + 1e-7
    assert float(kl.mean()) > 1e-3  # two different random models: the KL is not trivially zero


def test_cli_json_and_errors(folders, tmp_path, capsys):
    a, _ = folders
    text = tmp_path / "t.txt"
    text.write_text(TEXT, encoding="utf-8")
    args = ["eval", "ppl", "-m", str(a), "--file", str(text), "--ctx", str(CTX), "--max-chunks", "3", "--json"]
    assert cli(args + ["--kl-vs", str(a)]) == 0
    got = json.loads(capsys.readouterr().out)
    want = perplexity(herd.load(a), TEXT, ctx=CTX, max_chunks=3, progress=False)
    assert got["ppl"] == pytest.approx(want["ppl"], rel=1e-9) and got["tokens"] == want["tokens"]
    assert 0 <= got["kl_mean"] < 1e-9  # a model against itself
    assert cli(args[:-1] + ["--ctx", "1"]) == 2
    assert "ctx must be at least 2" in capsys.readouterr().err
    assert cli(["eval", "ppl", "-m", str(a), "--file", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in capsys.readouterr().err

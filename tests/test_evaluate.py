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


def test_llama_windows_score_the_tokens_llama_perplexity_scores(folders):
    """--llama-windows: windows of CTX tokens of the one token stream, the second half of each predicted
    (llama-perplexity's kl_divergence: positions n_ctx/2 .. n_ctx-2), against transformers on those positions."""
    from transformers import LlamaForCausalLM

    a, b = folders
    llm = herd.load(a)
    ids = llm.tokenizer.encode(TEXT)
    got = perplexity(llm, TEXT, ctx=CTX, max_chunks=3, progress=False, llama_windows=True)
    first = CTX // 2
    assert got["tokens"] == 3 * (CTX - 1 - first) and got["chunks"] == 3
    model = LlamaForCausalLM.from_pretrained(a).eval()
    nll = []
    with torch.inference_mode():
        for i in range(3):
            x = torch.tensor([ids[i * CTX:(i + 1) * CTX]])
            logp = torch.log_softmax(model(x).logits[0, first:-1].float(), -1)
            nll.append(-logp.gather(1, x[0, first + 1:, None])[:, 0])
    ref = float(torch.cat(nll).mean())
    assert abs(got["nll"] - ref) <= 1e-5 * abs(ref)
    with pytest.raises(herd.errors.GenerationError, match="too short"):
        perplexity(llm, TEXT[:40], ctx=CTX, progress=False, llama_windows=True)


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


def test_llama_perplexity_statistics_from_their_definitions(folders):
    """The --kl-divergence figures (KLD mean ± error and percentiles, Δp, same top token, ΔPPL) against their
    definitions recomputed here in numpy from transformers' log-probabilities on the same windows."""
    import numpy as np
    from transformers import LlamaForCausalLM

    a, b = folders
    llm, ref = herd.load(a), herd.load(b)
    ids = llm.tokenizer.encode(TEXT)
    got = perplexity(llm, TEXT, ctx=CTX, max_chunks=4, ref=ref, progress=False)
    m, r = LlamaForCausalLM.from_pretrained(a).eval(), LlamaForCausalLM.from_pretrained(b).eval()
    lp, rp, tgt = [], [], []
    with torch.inference_mode():
        for chunk in _windows(ids, CTX, 4):
            x = torch.tensor([chunk])
            lp.append(torch.log_softmax(m(x).logits[0, :-1].double(), -1).numpy())
            rp.append(torch.log_softmax(r(x).logits[0, :-1].double(), -1).numpy())
            tgt += chunk[1:]
    lp, rp, tgt = np.concatenate(lp), np.concatenate(rp), np.array(tgt)
    n = len(tgt)
    kld = (np.exp(rp) * (rp - lp)).sum(-1)
    p, q = np.exp(lp[np.arange(n), tgt]), np.exp(rp[np.arange(n), tgt])
    nll, ref_nll = -lp[np.arange(n), tgt], -rp[np.arange(n), tgt]
    # measured here: the herd and transformers float32 logits of these tiny models agree to ~1e-6, so every figure
    # agrees to ~1e-6 relative; checked at 1e-4
    close = dict(rel=1e-4, abs=1e-6)
    assert got["kld"]["mean"] == pytest.approx(kld.mean(), **close)
    assert got["kld"]["err"] == pytest.approx(kld.std() / np.sqrt(n - 1), **close)
    for key, pct in (("p99", 99), ("median", 50), ("p5", 5), ("p0_1", 0.1)):
        assert got["kld"][key] == pytest.approx(np.percentile(kld, pct), **close)
    assert got["kld"]["max"] == pytest.approx(kld.max(), **close) and got["kld"]["min"] == pytest.approx(kld.min(), **close)
    assert got["delta_p"]["mean"] == pytest.approx((p - q).mean(), **close)
    assert got["delta_p"]["rms"] == pytest.approx(np.sqrt(((p - q) ** 2).mean()), **close)
    assert got["same_top_p"] == pytest.approx((lp.argmax(-1) == rp.argmax(-1)).mean(), abs=1.5 / n)
    assert got["ppl"] == pytest.approx(np.exp(nll.mean()), **close)
    assert got["ref_ppl"] == pytest.approx(np.exp(ref_nll.mean()), **close)
    assert got["delta_ppl"] == pytest.approx(np.exp(nll.mean()) - np.exp(ref_nll.mean()), **close)
    assert got["ln_ppl_ratio"] == pytest.approx((nll - ref_nll).mean(), **close)
    assert got["ln_ppl_ratio_err"] == pytest.approx((nll - ref_nll).std() / np.sqrt(n - 1), **close)
    assert 0 < got["delta_ppl_err"] and got["kld"]["mean"] > 1e-3


def test_cli_prints_llama_perplexity_table(folders, capsys):
    a, b = folders
    assert cli(["eval", "ppl", "-m", str(a), "--ctx", str(CTX), "--max-chunks", "2", "--kl-vs", str(b)]) == 0
    out = capsys.readouterr().out
    for label in ("Mean    KLD:", "99.0%", "Median", "Mean    Δp:", "RMS Δp", "Same top p:", "Mean PPL(model)-PPL(ref)"):
        assert label in out, label

"""Embeddings and reranking (issue 15): LLM.embed, POST /v1/embeddings through the official openai client (base64,
its default, and float), POST /v1/rerank, and `herd embed`.

herd pools the final hidden states after the last RMS norm -- transformers' `hidden_states[-1]` -- by mean, last
or first token, and L2-normalises. On the float path (a tiny float checkpoint; the default model's GGUF loaded
with --dequantize's keep_quantized=False) vectors equal transformers' within 1e-5; on the default quantized path
within 5e-4 of transformers' model of the same GGUF (measured: 5.9e-5). Rerank scores by query likelihood and
must put each query's planted document first."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from test_server_echo import tiny_float_folder
from test_server_faults import InProcess

TEXTS = ["the quick brown fox jumps over the lazy dog", "paris", "lighthouses guide ships home at night",
         "one two three four five six seven eight nine ten, and then some more words to make it longer"]


def reference(model, seqs, pooling: str, normalize: bool = True) -> torch.Tensor:
    """transformers: hidden_states[-1] (after the final norm) of each sequence alone, pooled."""
    out = []
    for s in seqs:
        with torch.no_grad():
            h = model(torch.tensor([s]), output_hidden_states=True).hidden_states[-1][0].float()  # (T, D)
        v = {"mean": h.mean(0), "last": h[-1], "cls": h[0]}[pooling]
        out.append(torch.nn.functional.normalize(v, dim=-1) if normalize else v)
    return torch.stack(out)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_float_folder(tmp_path_factory.mktemp("tiny_float"))


@pytest.fixture(scope="module")
def ref(folder):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def llm(folder):
    import herd

    return herd.load(folder)


def test_library_embeddings_equal_transformers(llm, ref):
    """Texts of 1 to 20 tokens in one padded batch, each pooling, normalised and not: within 1e-5."""
    seqs = [llm.encode_prompt(t, raw=True) for t in TEXTS] + [[7]]
    assert len({len(s) for s in seqs}) == len(seqs)
    for pooling in ("mean", "last", "cls"):
        got = llm.embed(seqs, pooling)
        assert got.shape == (len(seqs), llm.config.dim)
        assert (got - reference(ref, seqs, pooling)).abs().max() < 1e-5, pooling
        raw = llm.embed(seqs, pooling, normalize=False)
        assert (raw - reference(ref, seqs, pooling, normalize=False)).abs().max() < 1e-5, pooling
    assert torch.equal(llm.embed(TEXTS[:1]), llm.embed([seqs[0]]))  # text and its ids: the same vector
    assert (llm.embed(TEXTS[:1]) - llm.embed(TEXTS)[:1]).abs().max() < 1e-6  # alone or padded in a batch


def test_openai_client_embeddings(llm, ref, folder):
    """The official client unchanged (base64 by default) and encoding_format=float; herd's pooling field through
    extra_body; token-id input; usage; and clear 400s."""
    import openai

    s = InProcess(llm, max_batch=2, ctx=256)
    try:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        seqs = [llm.encode_prompt(t, raw=True) for t in TEXTS]
        out = client.embeddings.create(model="m", input=TEXTS)
        got = torch.tensor([d.embedding for d in sorted(out.data, key=lambda d: d.index)])
        assert (got - reference(ref, seqs, "mean")).abs().max() < 1e-5
        assert out.usage.prompt_tokens == sum(len(x) for x in seqs)
        floats = client.embeddings.create(model="m", input=TEXTS, encoding_format="float")
        assert torch.equal(torch.tensor([d.embedding for d in floats.data]), got)  # base64 carries float32 exactly
        last = client.embeddings.create(model="m", input=seqs[2], extra_body={"pooling": "last"})
        assert (torch.tensor(last.data[0].embedding) - reference(ref, seqs[2:3], "last")[0]).abs().max() < 1e-5
        bad = [({"input": "x", "dimensions": 8}, "dimensions"), ({"input": [5, 999]}, "vocabulary"),
               ({"input": ["a", ""]}, "input 1 is empty"), ({"input": "x", "pooling": "max"}, "pooling"),
               ({"input": [1] * 300}, "context length"), ({"input": []}, "must not be empty")]
        for body, needle in bad:
            r = httpx.post(s.url + "/v1/embeddings", json={"model": "m", **body}, timeout=60)
            assert r.status_code == 400 and needle in r.json()["error"]["message"], (body, r.text)
    finally:
        s.stop()


def test_cli_embed(llm, folder, tmp_path, capsys):
    from herd.cli import main as cli

    lines = tmp_path / "texts.txt"
    lines.write_text(TEXTS[2] + "\n\n" + TEXTS[3] + "\n")
    assert cli(["embed", "--model", str(folder), TEXTS[0], TEXTS[1], "--file", str(lines), "--pooling", "last"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in rows] == TEXTS and [r["index"] for r in rows] == [0, 1, 2, 3]
    assert (torch.tensor([r["embedding"] for r in rows]) - llm.embed(TEXTS, "last")).abs().max() < 1e-6
    assert cli(["embed", "--model", str(folder)]) == 2
    assert "--file" in capsys.readouterr().err


DOCS = ["The Eiffel Tower is a wrought-iron lattice tower in Paris, France, completed in 1889.",
        "Photosynthesis converts light energy into chemical energy stored in glucose inside plant cells.",
        "The stock market fell sharply on Monday as investors worried about interest rates.",
        "Basketball is played by two teams of five players on a rectangular court.",
        "Mount Everest, on the border of Nepal and China, is the highest mountain above sea level."]
QUERIES = [("How do plants turn sunlight into energy?", 1), ("What is the tallest mountain on Earth?", 4),
           ("When was the Eiffel Tower built?", 0), ("How many players are on a basketball team?", 3),
           ("Why did stocks drop on Monday?", 2)]


def test_default_model_quantized_embeddings_and_rerank(smollm_gguf):
    """The default model: --dequantize's float weights within 1e-5 of transformers' model of the same GGUF, the
    quantized path (served) within 5e-4; /v1/rerank puts each query's planted document first."""
    import openai
    from transformers import AutoModelForCausalLM

    import herd

    ref = AutoModelForCausalLM.from_pretrained(smollm_gguf.parent, gguf_file=smollm_gguf.name,
                                               dtype=torch.float32).eval()
    q = herd.load(smollm_gguf)
    seqs = [q.encode_prompt(t, raw=True) for t in DOCS[:3]]
    want = reference(ref, seqs, "mean")
    del ref
    assert (herd.load(smollm_gguf, keep_quantized=False).embed(seqs) - want).abs().max() < 1e-5
    s = InProcess(q, max_batch=2, ctx=512)
    try:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        got = torch.tensor([d.embedding for d in client.embeddings.create(model="m", input=DOCS[:3]).data])
        assert (got - want).abs().max() < 5e-4, (got - want).abs().max()
        for query, planted in QUERIES:
            r = httpx.post(s.url + "/v1/rerank", json={"model": "m", "query": query, "documents": DOCS}, timeout=120)
            assert r.status_code == 200, r.text
            results = r.json()["results"]
            assert [x["index"] for x in results][0] == planted, (query, results)
            scores = [x["relevance_score"] for x in results]
            assert scores == sorted(scores, reverse=True) and 0 < scores[-1] and scores[0] <= 1
        r = httpx.post(s.url + "/v1/rerank", timeout=120, json={
            "query": QUERIES[0][0], "documents": [{"text": d} for d in DOCS], "top_n": 2, "return_documents": True})
        results = r.json()["results"]
        assert len(results) == 2 and results[0]["document"] == {"text": DOCS[1]}
        r = httpx.post(s.url + "/v1/rerank", json={"query": "x", "documents": []}, timeout=60)
        assert r.status_code == 400 and "documents" in r.json()["error"]["message"]
    finally:
        s.stop()


def test_engine_merges_waiting_embedding_calls(llm):
    """Embeddings go through the engine's thread (Engine.batch_call): calls of the same key that wait together run as
    ONE call over all their items (one set of padded forwards for several requests), each caller gets its own share,
    equal to the vectors computed alone; a failing call fails its callers only, and the engine keeps generating."""
    import threading

    from herd.engine.scheduler import Engine
    from herd.errors import GenerationError
    from herd.ops.sampling import SamplingParams

    eng = Engine(llm.model, llm.tokenizer, llm.stop_ids, max_batch=2, ctx=128).start()
    try:
        gate, calls = threading.Event(), []
        blocker = eng.batch_call(lambda items: [gate.wait(60)] * len(items), [0])  # holds the engine thread

        def embed(seqs):
            calls.append(len(seqs))
            return list(llm.embed(seqs, "last"))

        seqs = [llm.encode_prompt(t, raw=True) for t in TEXTS]
        futs = [eng.batch_call(embed, seqs[:1], "e"), eng.batch_call(embed, seqs[1:3], "e"),
                eng.batch_call(embed, seqs[3:], "e"), eng.batch_call(embed, seqs[:2], "other")]
        gate.set()
        assert blocker.result(60) == [True]
        got = [f.result(60) for f in futs]
        assert sorted(calls) == [2, 4]  # the three "e" calls merged into one over 4 sequences; "other" alone
        assert [len(g) for g in got] == [1, 2, 1, 2]
        alone = llm.embed(seqs, "last")
        assert all(torch.equal(v, alone[i]) for i, v in enumerate(got[0] + got[1] + got[2]))

        def broken(items):
            raise GenerationError("no good")

        with pytest.raises(GenerationError, match="no good"):
            eng.batch_call(broken, [1, 2], "e").result(60)
        out = eng.submit(seqs[0], SamplingParams(max_tokens=3, temperature=0.0)).result()
        assert len(out.output_ids) == 3
    finally:
        eng.stop()
    with pytest.raises(GenerationError, match="3 results for 1"):  # no engine thread: runs at once, still checked
        eng.batch_call(lambda items: [0, 0, 0], [1]).result(1)

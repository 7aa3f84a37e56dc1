"""/v1/completions with `echo` and `logprobs` (issue 15): the prompt's own tokens with their log-probabilities and
top-N alternatives in OpenAI's legacy shape (the first entry null), then the generated tokens, for text and token-id
prompts, with max_tokens 0 and more, whole and streamed -- checked against transformers' log-softmax of the same
sequence on a tiny float checkpoint served in-process."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from test_server_faults import InProcess
from test_train import _tiny_folder


def tiny_float_folder(folder):
    """A tiny random Llama (dim 64, 2 layers) in HF layout with a byte-level BPE tokenizer.json whose logits are
    well separated (init 0.3) and whose final norm weight is not all ones (so 'after the final norm' shows)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _tiny_folder(folder)  # tokenizer files (and weights replaced below)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"  # read tokenizer.json as it is (lm-eval's hf backend too)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    config = LlamaConfig.from_pretrained(folder)
    config.initializer_range = 0.3
    torch.manual_seed(1)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.model.norm.weight.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_float_folder(tmp_path_factory.mktemp("tiny_float"))


@pytest.fixture(scope="module")
def ref(folder):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def server(folder):
    import herd

    s = InProcess(herd.load(folder), max_batch=4, ctx=256)
    yield s
    s.stop()


def ref_logprobs(ref, ids) -> torch.Tensor:
    """(T-1, V): log p(. | ids[:t+1]) from transformers, float64 log-softmax of its float32 logits."""
    with torch.no_grad():
        logits = ref(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, -1)[:-1]


def post(server, body, **kw):
    r = httpx.post(server.url + "/v1/completions", json={"model": "m", **body}, timeout=120, **kw)
    return r


def check_prompt_part(lp: dict, ids: list[int], ref, k: int, tok) -> None:
    """The first len(ids) entries of a legacy logprobs object against transformers."""
    want = ref_logprobs(ref, ids)
    n = len(ids)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["tokens"][:n] == [tok.decode_bytes([t]).decode("utf-8", "replace") for t in ids]
    got = torch.tensor(lp["token_logprobs"][1:n], dtype=torch.float64)
    exp = want.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert (got - exp).abs().max() < 1e-5, (got - exp).abs().max()
    for t in range(1, n):
        top = lp["top_logprobs"][t]
        vals, idx = torch.topk(want[t - 1], k)
        expect: dict = {}  # ids whose texts coincide keep the likelier value
        for i, v in zip(idx.tolist(), vals.tolist()):
            expect.setdefault(tok.decode_bytes([i]).decode("utf-8", "replace"), v)
        assert top.keys() == expect.keys()
        assert all(abs(top[key] - expect[key]) < 1e-5 for key in expect), (top, expect)
        # the scorer's greediness test: the token's value is exactly the top value when it is the argmax
        if int(want[t - 1].argmax()) == ids[t]:
            assert lp["token_logprobs"][t] == max(top.values())
    offsets, at = [], 0
    for text in lp["tokens"][:n]:
        offsets.append(at)
        at += len(text)
    assert lp["text_offset"][:n] == offsets


def test_echo_text_prompt_only(server, ref):
    """max_tokens 0: the prompt alone, each token scored, top-3 alternatives; the text is the prompt itself."""
    tok = server.state.llm.tokenizer
    prompt = "the quick brown fox jumps over the lazy dog"
    r = post(server, {"prompt": prompt, "echo": True, "logprobs": 3, "max_tokens": 0})
    assert r.status_code == 200, r.text
    ch = r.json()["choices"][0]
    ids = tok.encode(prompt, bos=tok.add_bos)
    assert ch["text"] == prompt and ch["finish_reason"] == "length"
    assert len(ch["logprobs"]["tokens"]) == len(ids) > 5
    check_prompt_part(ch["logprobs"], ids, ref, 3, tok)
    assert r.json()["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}


def test_echo_token_prompts_then_generated_tokens(server, ref):
    """Two token-id prompts with max_tokens 3 (lm-eval sends 1): each choice's entries are its prompt's, then its
    generated tokens (a stop token too), all equal to transformers' log-softmax over prompt + generated."""
    tok = server.state.llm.tokenizer
    prompts = [tok.encode("one two three four five"), tok.encode("lighthouses guide ships home")]
    r = post(server, {"prompt": prompts, "echo": True, "logprobs": 2, "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200, r.text
    choices = sorted(r.json()["choices"], key=lambda c: c["index"])
    for ch, ids in zip(choices, prompts):
        lp = ch["logprobs"]
        n_gen = len(lp["tokens"]) - len(ids)
        assert 1 <= n_gen <= 3 and ch["text"].startswith(tok.decode_bytes(ids).decode())
        check_prompt_part(lp, ids, ref, 2, tok)
        # greedy continuation: each generated token is transformers' argmax, scored as transformers scores it
        seq = list(ids)
        for j in range(n_gen):
            want = ref_logprobs(ref, seq + [0])[-1]
            nxt = int(want.argmax())
            assert lp["tokens"][len(ids) + j] == tok.decode_bytes([nxt]).decode("utf-8", "replace")
            assert abs(lp["token_logprobs"][len(ids) + j] - float(want[nxt])) < 1e-5
            seq.append(nxt)


def test_echo_streamed_opens_with_the_prompt_logprobs(server, ref):
    tok = server.state.llm.tokenizer
    ids = tok.encode("what is the capital of france?")
    chunks = []
    with httpx.stream("POST", server.url + "/v1/completions", timeout=120,
                      json={"model": "m", "prompt": ids, "echo": True, "logprobs": 1, "max_tokens": 2,
                            "stream": True, "temperature": 0}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    first = chunks[0]["choices"][0]
    assert first["text"] == tok.decode_bytes(ids).decode()
    check_prompt_part(first["logprobs"], ids, ref, 1, tok)
    generated = [c["choices"][0]["logprobs"] for c in chunks[1:] if c["choices"] and c["choices"][0]["logprobs"]]
    assert 1 <= len(generated) <= 2


def test_echo_refusals(server):
    """A prompt past the context, token ids outside the vocabulary: 400s naming the prompt, before any work."""
    r = post(server, {"prompt": [5] * 300, "echo": True, "logprobs": 1, "max_tokens": 0})
    assert r.status_code == 400 and "context length" in r.json()["error"]["message"]
    r = post(server, {"prompt": [5, 99999], "echo": True, "logprobs": 1, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = post(server, {"prompt": "x", "echo": True, "logprobs": 21})
    assert r.status_code == 400 and "logprobs" in r.json()["error"]["message"]

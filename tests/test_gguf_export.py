"""`herd convert --to gguf` of the default model: llama.cpp loads the f16 export and decodes the same greedy tokens
as herd does from that same file."""

import pytest

import herd
from herd.formats.convert import convert

PROMPTS = ["What is the capital of France?", "List three fruits.", "Say hello in French."]


@pytest.mark.llamacpp
def test_f16_export_greedy_tokens_match_llama_cpp(smollm_gguf, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is installed by `make test`")
    out = convert(smollm_gguf, tmp_path / "smollm-f16.gguf", to="gguf", quant="f16")
    llm = herd.load(out)
    ref = llama_cpp.Llama(model_path=str(out), n_ctx=256, n_threads=2, verbose=False, logits_all=False,
                          type_k=0, type_v=0)  # F32 KV cache: the default f16 cache alone moves logits ~1e-2
    total = 0
    for prompt in PROMPTS:
        ids = llm.encode_prompt(prompt)
        ours = llm.generate(ids, max_tokens=16).output_ids
        theirs = []
        ref.reset()
        for tok in ref.generate(ids, temp=0.0, reset=True):
            if tok in llm.stop_ids or len(theirs) == len(ours):
                break
            theirs.append(tok)
        assert theirs == ours, prompt
        total += len(ours)
    assert total >= 12

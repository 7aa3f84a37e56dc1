"""A long prompt prefilled into a KV cache in slices (herd.engine.generate.prefill) gives transformers' logits, the
same cache as one pass, and the same greedy tokens."""

import pytest
import torch

from herd.engine.generate import generate_batch, prefill as prefill_into
from herd.models.kv_cache import KVCache
from herd.formats import load_hf
from herd.models.llama import build_model
from herd.ops.sampling import SamplingParams
from refmodels import save_hf_model

PROMPT = [(7 * i + 3) % 250 + 3 for i in range(45)]  # 45 tokens: slices of 16, 16 and 13


@pytest.fixture(scope="module", params=["llama3-gqa", "llama3.2-tied"])
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    ref = save_hf_model(request.param, folder, seed=3)
    config, sd = load_hf(folder)
    return ref, build_model(config, sd)


def prefill(model, chunk):
    cache = KVCache(model.config, batch=1, max_len=64)
    with torch.inference_mode():
        logits = prefill_into(model, torch.tensor([PROMPT]), torch.arange(len(PROMPT)), cache, chunk=chunk)
    return logits[0, -1], cache


def test_sliced_prefill_matches_one_pass_and_transformers(pair):
    ref, model = pair
    whole, cache_whole = prefill(model, 0)
    sliced, cache_sliced = prefill(model, 16)
    with torch.no_grad():
        want = ref(torch.tensor([PROMPT])).logits[0, -1]
    torch.testing.assert_close(sliced, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sliced, whole, rtol=1e-5, atol=1e-5)
    for a, b in zip(cache_sliced.k + cache_sliced.v, cache_whole.k + cache_whole.v):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_sliced_prefill_greedy_equals_transformers_generate(pair):
    ref, model = pair
    got = generate_batch(model, [PROMPT], SamplingParams(max_tokens=12), prefill_chunk=8)[0].output_ids
    with torch.no_grad():
        want = ref.generate(torch.tensor([PROMPT]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                            pad_token_id=0, attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long))
    assert got == want[0, len(PROMPT):].tolist()

"""herd's model against transformers' LlamaForCausalLM on tiny random configs of each Llama variant."""

import pytest
import torch

from herd.models.kv_cache import KVCache
from herd.formats import load_hf
from herd.models.llama import build_model
from refmodels import VARIANTS, save_hf_model

TOL = 1e-4


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    ref = save_hf_model(request.param, folder)
    config, sd = load_hf(folder)
    return ref, build_model(config, sd), folder


def test_full_forward_matches_transformers(pair):
    ref, model, _ = pair
    tokens = torch.randint(0, model.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(tokens).logits
        got = model(tokens)
    assert (got - want).abs().max().item() <= TOL


def test_incremental_decoding_matches_full_forward(pair):
    ref, model, _ = pair
    tokens = torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref(tokens).logits
        cache = KVCache(model.config, batch=1, max_len=64)
        pieces = [model(tokens[:, :17], torch.arange(17), cache)]
        for t in range(17, 40):
            pieces.append(model(tokens[:, t:t + 1], torch.tensor([t]), cache))
        got = torch.cat(pieces, dim=1)
    assert (got - want).abs().max().item() <= TOL


def test_rows_at_different_positions_decode_like_single_rows(pair):
    _, model, _ = pair
    g = torch.Generator().manual_seed(3)
    a = torch.randint(0, model.config.vocab_size, (1, 9), generator=g)
    b = torch.randint(0, model.config.vocab_size, (1, 21), generator=g)
    with torch.no_grad():
        cache = KVCache(model.config, batch=2, max_len=32)
        model(a, torch.arange(9), cache.rows(0))
        model(b, torch.arange(21), cache.rows(1))
        nxt = torch.tensor([[5], [7]])
        batched = model(nxt, torch.tensor([[9], [21]]), cache)
        alone_a = model(torch.cat([a, nxt[:1]], 1))[:, -1]
        alone_b = model(torch.cat([b, nxt[1:]], 1))[:, -1]
    assert (batched[0, -1] - alone_a[0]).abs().max().item() <= TOL
    assert (batched[1, -1] - alone_b[0]).abs().max().item() <= TOL

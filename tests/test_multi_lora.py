"""Many LoRA adapters in one engine (herd/engine/adapter_step.py): requests for different adapters and the base
model decode in the same batch, and each answer equals what that adapter gives alone through `--adapter`'s path
(apply_adapter: LoRA layers swapped in) and what the base gives without adapters; the prefix cache never shares
pages across adapters; batches with no adapter row keep the native decode step."""

from __future__ import annotations

import copy

import pytest
import torch

from herd.engine.adapter_step import AdapterStep
from herd.engine.generate import generate_batch
from herd.engine.scheduler import Engine
from herd.errors import ConfigError
from herd.formats.peft import adapter_scaling, apply_adapter, read_adapter, save_adapter
from herd.models.lora import apply_lora, lora_modules
from herd.ops.sampling import SamplingParams
from herd.quant import decode as decode_plan
from test_fast_decode import tiny_quantized
from test_kv_types import CFG

GREEDY = SamplingParams(max_tokens=10, ignore_eos=True)
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16, 17, 18, 19, 20, 21, 22], [23, 24, 25]]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny quantized base and three saved PEFT adapters of different ranks and targets."""
    model = tiny_quantized("q4_0", "int8", config=CFG)
    folders = {}
    for name, rank, targets, seed in (("alpha", 4, "all", 1), ("beta", 8, "wq,wv", 2), ("gamma", 2, "w1,w2,w3", 3)):
        m = copy.deepcopy(model)
        apply_lora(m, rank=rank, alpha=2.0 * rank, targets=targets, seed=seed)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for mod in lora_modules(m).values():  # B starts at zero: give each adapter a real effect
                mod.lora_B.weight.copy_(torch.randn(mod.lora_B.weight.shape, generator=g) * 0.3)
        folders[name] = save_adapter(m, tmp_path_factory.mktemp(name))
    return model, folders


def alone(model, folder, prompts):
    """What `herd generate --adapter` computes: the adapter's LoRA layers swapped into a copy of the base."""
    ref = copy.deepcopy(model)
    if folder is not None:
        apply_adapter(ref, folder)
    return [c.output_ids for c in generate_batch(ref, prompts, GREEDY)]


def step_with(model, folders) -> AdapterStep:
    step = AdapterStep(copy.deepcopy(model))
    for name, folder in folders.items():
        cfg, weights = read_adapter(folder, step.text)
        step.add(name, weights, adapter_scaling(cfg))
    return step


def test_mixed_batch_equals_each_adapter_alone(setup, monkeypatch):
    model, folders = setup
    step = step_with(model, folders)
    names = [None, "alpha", "beta", "gamma"]
    # 16 requests: every prompt under every adapter and the base, submitted together
    requests = [(p, n) for p in PROMPTS for n in names]
    engine = Engine(step, stop_ids=frozenset({2}), max_batch=16, page_size=4, kv_tokens=1024)
    handles = [engine.submit(p, GREEDY, images=step.choice(n)) for p, n in requests]
    while engine.step():  # no engine thread: stepped here, all 16 rows in one batch
        pass
    results = {(tuple(p), n): h.result().output_ids for (p, n), h in zip(requests, handles)}
    want = {n: alone(model, folders.get(n), PROMPTS) for n in names}
    for (p, n), ids in results.items():
        assert ids == want[n][PROMPTS.index(list(p))], (p, n)
    # the adapters change the answers (else the test would prove nothing)
    assert len({tuple(tuple(x) for x in want[n]) for n in names}) == 4


def test_base_batches_keep_the_native_step_and_errors(setup, monkeypatch):
    model, folders = setup
    step = step_with(model, {"alpha": folders["alpha"]})
    calls = []
    real = decode_plan.DecodePlan.run
    monkeypatch.setattr(decode_plan.DecodePlan, "run", lambda self, *a: calls.append(1) or real(self, *a))
    out = Engine(step, stop_ids=frozenset({2}), max_batch=4, page_size=4, kv_tokens=256).generate(PROMPTS, GREEDY)
    assert calls, "a batch with no adapter row must take the native decode step"
    assert [c.output_ids for c in out] == alone(model, None, PROMPTS)
    with pytest.raises(ConfigError, match="already loaded"):
        cfg, w = read_adapter(folders["alpha"], step.text)
        step.add("alpha", w, adapter_scaling(cfg))
    with pytest.raises(ConfigError, match="no adapter named"):
        step.remove("delta")
    step.remove("alpha")
    assert step.choice("alpha") is None


def test_server_serves_adapters_by_model_name(smollm_gguf, tmp_path):
    """herd serve --adapter on the default model: /v1/adapters adds and removes at run time, /v1/models lists them,
    and 6 concurrent chat requests (base and two adapters) each answer what `--adapter DIR` (apply_adapter) and the
    base alone answer."""
    from concurrent.futures import ThreadPoolExecutor

    from fastapi.testclient import TestClient

    import herd
    from herd.server.app import create_app

    llm = herd.load(smollm_gguf)
    folders = {}
    for name, seed in (("terse", 1), ("verbose", 2)):
        m = copy.deepcopy(llm.model)
        apply_lora(m, rank=4, alpha=8.0, targets="wq,wv,w2", seed=seed)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for mod in lora_modules(m).values():
                mod.lora_B.weight.copy_(torch.randn(mod.lora_B.weight.shape, generator=g) * 0.02)
        folders[name] = save_adapter(m, tmp_path / name)
        del m
    questions = ["What is the capital of France?", "Name a colour."]
    want = {None: [llm.generate(q, max_tokens=12).text for q in questions]}
    for name, folder in folders.items():
        ref = herd.load(smollm_gguf)
        apply_adapter(ref.model, folder)
        want[name] = [ref.generate(q, max_tokens=12).text for q in questions]
    assert len({tuple(v) for v in want.values()}) == 3  # each adapter changes the answers

    app = create_app(llm, model_name="smol", adapters={"terse": str(folders["terse"])}, max_batch=8)
    with TestClient(app) as c:
        r = c.post("/v1/adapters", json={"name": "verbose", "path": str(folders["verbose"])})
        assert r.status_code == 200, r.text
        assert {m["id"] for m in c.get("/v1/models").json()["data"]} == {"smol", "terse", "verbose"}
        assert c.post("/v1/adapters", json={"name": "x", "path": str(tmp_path / "nowhere")}).status_code == 400

        def ask(job):
            model, q = job
            r = c.post("/v1/chat/completions", json={"model": model, "max_tokens": 12, "temperature": 0,
                                                      "messages": [{"role": "user", "content": q}]})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["message"]["content"]

        jobs = [(m, q) for m in ("smol", "terse", "verbose") for q in questions]
        with ThreadPoolExecutor(len(jobs)) as pool:
            got = list(pool.map(ask, jobs))
        for (model, q), text in zip(jobs, got):
            assert text == want[None if model == "smol" else model][questions.index(q)], (model, q)
        assert c.delete("/v1/adapters/verbose").status_code == 200
        r = c.post("/v1/chat/completions", json={"model": "verbose", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 404

"""herd's LoRA adapters against PEFT on transformers' LlamaForCausalLM (tiny random models, fp32).

The adapter's B matrices get random (non-zero) values so that the update really changes the logits, and every
target is used, including wq/wk whose rows herd keeps in Meta order and PEFT in HF order.
"""

import copy

import pytest
import torch

from herd.formats import load_hf
from herd.models.llama import build_model
from herd.formats.peft import apply_adapter, save_adapter
from herd.models.lora import apply_lora, lora_modules, merge_lora
from refmodels import save_hf_model

peft = pytest.importorskip("peft")

TOL = 1e-4  # max |logit difference|, fp32; logits are O(10) on these models (measured: 1.5e-5 .. 5.5e-5)
# merged weights W + s·B·A round differently from the two-path sum: measured up to 1.8e-4 with every target
TOL_MERGE = 5e-4


def _randomize_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_A.weight.copy_(torch.randn(m.lora_A.weight.shape, generator=g) * 0.3)
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.3)


@pytest.fixture(scope="module", params=["llama3-gqa", "llama2-mha", "llama3.2-tied"])
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    ref = save_hf_model(request.param, folder)
    config, sd = load_hf(folder)
    return ref, build_model(config, sd), folder


def _tokens(model, seed=1, T=40):
    return torch.randint(0, model.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(seed))


def test_peft_loads_herd_adapter_with_same_logits(pair, tmp_path):
    ref, model, folder = pair
    model = copy.deepcopy(model)
    apply_lora(model, rank=4, alpha=8, targets="wq,wk,wv,wo,w1,w2,w3")
    _randomize_lora(model)
    save_adapter(model, tmp_path / "adapter", base_model=str(folder))
    tokens = _tokens(model)
    with torch.no_grad():
        got = model(tokens)
        peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(ref), str(tmp_path / "adapter")).eval()
        want = peft_model(tokens).logits
        plain = ref(tokens).logits
    assert (got - plain).abs().max().item() > 1.0  # the adapter really changes the output
    assert (got - want).abs().max().item() <= TOL


def test_herd_loads_peft_adapter_with_same_logits(pair, tmp_path):
    ref, model, _ = pair
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                              "up_proj", "down_proj"], init_lora_weights=False)
    peft_model = peft.get_peft_model(copy.deepcopy(ref), cfg).eval()
    peft_model.save_pretrained(str(tmp_path / "peft"))
    model = apply_adapter(copy.deepcopy(model), tmp_path / "peft")
    tokens = _tokens(model, seed=2)
    with torch.no_grad():
        want = peft_model(tokens).logits
        got = model(tokens)
        plain = ref(tokens).logits
    assert (want - plain).abs().max().item() > 1.0
    assert (got - want).abs().max().item() <= TOL


def test_adapter_round_trip_and_merge(pair, tmp_path):
    _, model, _ = pair
    a = copy.deepcopy(model)
    apply_lora(a, rank=3, alpha=5, targets="wq,wk,w2")
    _randomize_lora(a, seed=3)
    save_adapter(a, tmp_path / "ad")
    b = apply_adapter(copy.deepcopy(model), tmp_path / "ad")
    tokens = _tokens(model, seed=4)
    with torch.no_grad():
        la = a(tokens)
        assert torch.equal(la, b(tokens))  # save/load is exact, permutation included
        merged = merge_lora(b)
        assert not lora_modules(merged)
        assert (merged(tokens) - la).abs().max().item() <= TOL_MERGE


@pytest.mark.slow
def test_peft_on_the_default_model(smollm_gguf, tmp_path):
    """The default model (GGUF Q4_1, dequantized by both sides): herd's adapter under PEFT on transformers."""
    import transformers

    from herd.api import load

    llm = load(smollm_gguf, keep_quantized=False)
    apply_lora(llm.model, rank=8, alpha=16)
    _randomize_lora(llm.model, seed=5)
    with torch.no_grad():
        for m in lora_modules(llm.model).values():
            m.lora_B.weight.mul_(0.1)  # a realistic size of update: logits move by O(1)
    save_adapter(llm.model, tmp_path / "adapter", base_model=str(smollm_gguf))
    ref = transformers.AutoModelForCausalLM.from_pretrained(smollm_gguf.parent, gguf_file=smollm_gguf.name,
                                                            dtype=torch.float32).eval()
    ids = llm.encode_prompt("Who founded the Zephyrine Cartographers' Guild?")
    tokens = torch.tensor([ids])
    with torch.no_grad():
        got = llm.model(tokens)
        peft_model = peft.PeftModel.from_pretrained(ref, str(tmp_path / "adapter")).eval()
        want = peft_model(tokens).logits
        with peft_model.disable_adapter():
            plain = peft_model(tokens).logits
    assert (want - plain).abs().max().item() > 0.5  # the adapter matters
    assert (got - want).abs().max().item() <= 5e-4  # 30 layers in fp32, logits O(40); measured 6.6e-5
    assert torch.equal(got.argmax(-1), want.argmax(-1))

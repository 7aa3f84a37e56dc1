"""The default model with its GGUF blocks kept quantized (herd.load(keep_quantized=True)) against the float model,
and with the native kernels against the PyTorch fallback."""

import json
import os
import subprocess
import sys

import pytest
import torch

import herd
from herd.quant import native

PROMPTS = ["What is the capital of France?", "Name three colours.", "Write one sentence about llamas."]
BEST_ISA = max(native.machine_isas())  # the ISA -march=native compiles on this CPU (/proc/cpuinfo)


@pytest.fixture(autouse=True, params=[BEST_ISA], ids=[native.ISA_NAMES[BEST_ISA]])
def kernel_isa(request):
    """Names, in each test's id, the ISA the native kernels run, and checks the library really runs it."""
    assert native.load() is not None, f"native kernels unavailable: {native.load_error()}"
    assert native.best_isa() == request.param, (native.best_isa(), request.param)
    return request.param


def test_quantized_model_follows_the_float_model(smollm_gguf):
    q = herd.load(smollm_gguf, keep_quantized=True)
    f = herd.load(smollm_gguf, keep_quantized=False)
    n_quant = sum(type(m).__name__ == "QuantLinear" for m in q.model.modules())
    assert n_quant == 30 * 7 + 1  # every linear layer, and the tied Q8_0 output
    ids = f.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 6)
    lf, lq = torch.log_softmax(f.logits(ids), -1), torch.log_softmax(q.logits(ids), -1)
    kl = (lf.exp() * (lf - lq)).sum(-1)
    # measured mean 8.9e-8, max 1.1e-6 on 2026-12-07, 2 cores (avx512-vnni)
    assert kl.mean().item() < 1e-6 and kl.max().item() < 1e-5, (kl.mean().item(), kl.max().item())
    for p in PROMPTS:
        assert q.generate(p, max_tokens=16).output_ids == f.generate(p, max_tokens=16).output_ids, p


def test_native_kernels_and_fallback_give_the_same_greedy_tokens(smollm_gguf, kernel_isa):
    code = ("import json, herd; from herd.quant import native; llm = herd.load(%r, keep_quantized=True); "
            "print(json.dumps([native.best_isa(), [llm.generate(p, max_tokens=12).output_ids for p in %r]]))"
            % (str(smollm_gguf), PROMPTS))
    outs = []
    for no_native in ("0", "1"):
        env = dict(os.environ, HERD_NO_NATIVE=no_native)
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
        assert p.returncode == 0, p.stderr[-2000:]
        outs.append(json.loads(p.stdout.strip().splitlines()[-1]))
    assert outs[0][0] == kernel_isa and outs[1][0] == -1  # the kernels on this CPU's ISA vs the PyTorch fallback
    assert outs[0][1] == outs[1][1]

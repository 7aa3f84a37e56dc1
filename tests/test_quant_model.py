"""The default model with its GGUF blocks kept quantized (herd.load(keep_quantized=True)) against the float model,
and with the native kernels against the PyTorch fallback."""

import os
import subprocess
import sys

import torch

import herd

PROMPTS = ["What is the capital of France?", "Name three colours.", "Write one sentence about llamas."]


def test_quantized_model_follows_the_float_model(smollm_gguf):
    q = herd.load(smollm_gguf, keep_quantized=True)
    f = herd.load(smollm_gguf, keep_quantized=False)
    n_quant = sum(type(m).__name__ == "QuantLinear" for m in q.model.modules())
    assert n_quant == 30 * 7 + 1  # every linear layer, and the tied Q8_0 output
    ids = f.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 6)
    lf, lq = torch.log_softmax(f.logits(ids), -1), torch.log_softmax(q.logits(ids), -1)
    kl = (lf.exp() * (lf - lq)).sum(-1)
    assert kl.mean().item() < 1e-4 and kl.max().item() < 1e-3
    for p in PROMPTS:
        assert q.generate(p, max_tokens=16).output_ids == f.generate(p, max_tokens=16).output_ids, p


def test_native_kernels_and_fallback_give_the_same_greedy_tokens(smollm_gguf):
    code = ("import json, herd; llm = herd.load(%r, keep_quantized=True); "
            "print(json.dumps([llm.generate(p, max_tokens=12).output_ids for p in %r]))" % (str(smollm_gguf), PROMPTS))
    outs = []
    for no_native in ("0", "1"):
        env = dict(os.environ, HERD_NO_NATIVE=no_native)
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
        assert p.returncode == 0, p.stderr[-2000:]
        outs.append(p.stdout.strip().splitlines()[-1])
    assert outs[0] == outs[1]

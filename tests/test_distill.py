"""`herd distill` on a tiny random teacher (4 layers, dim 64, a byte-level BPE trained here, HF layout): the
chunked KD loss equals one computed from transformers' logits with torch's kl_div; Minitron pruning keeps the right
layers and the most active MLP channels (importance measured on transformers' model); a pruned student distilled in
one process and under 2-process FSDP2 gives the same losses, and gets closer to its teacher."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from herd.errors import ConfigError
from herd.train.distill import (DistillConfig, Teacher, agreement, build_student, distill, kd_loss_fn,
                                load_float_model, mlp_importance, prune_depth, prune_width)
from herd.train.shards import TokenData, prepare

CORPUS = Path(__file__).resolve().parent.parent / "herd" / "data" / "sample.txt"
ARGS = dict(steps=8, batch_size=4, seq_len=32, lr=3e-3, seed=0, progress=False)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A 4-layer Llama (dim 64, ffn 160) with a 512-token BPE trained on the shipped corpus, HF layout."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("teacher")
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    text = CORPUS.read_text(encoding="utf-8")
    tk.train_from_iterator([text[i:i + 2000] for i in range(0, 40000, 2000)], trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "add_bos_token": False}))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tk.get_vocab_size(), hidden_size=64, intermediate_size=160, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                      rope_theta=10000.0, initializer_range=0.2, eos_token_id=0, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data(teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("tokens")
    prepare(teacher, [CORPUS], out, progress=False)
    return out


def _hf(folder):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _batch(data, n=2, T=32):
    d = TokenData(data)
    w = torch.from_numpy(d.window(100, n * T + 1))
    return w[:-1].reshape(n, T), w[1:].reshape(n, T)


@pytest.mark.parametrize("ratio,temp", [(0.5, 1.0), (1.0, 2.0)])
def test_kd_loss_matches_reference(teacher, data, ratio, temp):
    t_model = load_float_model(teacher)
    _, student = build_student(DistillConfig(prune_from=str(teacher), prune_depth=2, **ARGS), 512, TokenData(data))
    x, y = _batch(data)
    loss, logged = kd_loss_fn(Teacher(t_model), ratio, temp, chunk=5)(student, x, y)  # chunks cut rows
    with torch.no_grad():
        t_logits = _hf(teacher)(x).logits  # the reference teacher: transformers
    s = student(x).float()
    ce = F.cross_entropy(s.reshape(-1, s.shape[-1]), y.reshape(-1), reduction="sum")
    kl = F.kl_div(F.log_softmax(s / temp, -1).reshape(-1, s.shape[-1]),
                  F.log_softmax(t_logits / temp, -1).reshape(-1, s.shape[-1]), log_target=True,
                  reduction="sum") * temp ** 2
    assert abs(logged["ce"] - float(ce)) <= 1e-4 * float(ce)
    assert abs(logged["kl"] - float(kl)) <= 1e-4 * float(kl) + 1e-4
    assert abs(float(loss) - float((1 - ratio) * ce + ratio * kl)) <= 1e-4 * float(loss)
    loss.backward()  # the gradient reaches the student only
    assert student.output.weight.grad is not None
    assert all(p.grad is None for p in t_model.parameters())


def test_prune_depth_and_width(teacher, data):
    from herd.formats import load_checkpoint
    from herd.models.llama import build_model

    ck = load_checkpoint(teacher, torch.float32)
    cfg2, sd2 = prune_depth(ck.config, ck.state_dict, 3)
    assert cfg2.n_layers == 3
    for new, old in ((0, 0), (1, 1), (2, 3)):  # the first L-1 and the last
        assert torch.equal(sd2[f"layers.{new}.attention.wq.weight"], ck.state_dict[f"layers.{old}.attention.wq.weight"])
    x, _ = _batch(data)
    # Minitron importance against transformers' own MLP activations
    hf, acts = _hf(teacher), []
    hooks = [layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: acts.append(a[0].abs().mean((0, 1))))
             for layer in hf.model.layers]
    with torch.no_grad():
        hf(x)
    for h in hooks:
        h.remove()
    ours = mlp_importance(build_model(ck.config, ck.state_dict), x)
    for a, b in zip(acts, ours):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    cfg3, sd3 = prune_width(ck.config, ck.state_dict, 96, x)
    keep = torch.sort(torch.topk(ours[2], 96).indices).values
    assert cfg3.ffn_dim == 96
    assert torch.equal(sd3["layers.2.feed_forward.w2.weight"], ck.state_dict["layers.2.feed_forward.w2.weight"][:, keep])
    full_cfg, full_sd = prune_width(*prune_depth(ck.config, ck.state_dict, 4), 160, x)  # nothing pruned
    with torch.no_grad():
        torch.testing.assert_close(build_model(full_cfg, full_sd)(x), hf(x).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="--prune-depth 9: the model has 4 layers"):
        prune_depth(ck.config, ck.state_dict, 9)


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distill_one_process_and_fsdp_agree_and_approach_teacher(teacher, data, tmp_path):
    opts = dict(prune_from=str(teacher), prune_depth=2, prune_width=128, kd_ratio=0.9, **{**ARGS, "lr": 1e-2})
    single = distill(teacher, data, tmp_path / "single", **opts)
    recs = [json.loads(line) for line in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 8 and {"ce", "kl", "loss", "lr", "tokens", "tokens_per_s", "grad_norm"} <= set(recs[0])
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(_port()), "-m", "herd", "distill", "--teacher", str(teacher), "--data", str(data),
            "--out", str(tmp_path / "fsdp"), "--prune-from", str(teacher), "--prune-depth", "2", "--prune-width",
            "128", "--kd-ratio", "0.9", "--steps", "8", "--batch-size", "4", "--seq-len", "32", "--lr", "1e-2",
            "--parallel", "fsdp", "--threads", "1", "--no-progress"]
    res = subprocess.run(argv, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"},
                         capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    fsdp = [json.loads(line) for line in (tmp_path / "fsdp" / "metrics.jsonl").read_text().splitlines()]
    assert len(fsdp) == 8
    for a, b in zip(recs, fsdp):  # relative: at lr 1e-2 the ranks' half-batch sums drift ~1.4e-5 by step 8
        assert abs(a["loss"] - b["loss"]) <= 5e-5 * a["loss"] and abs(a["kl"] - b["kl"]) <= 5e-5 * a["kl"]
    # the distilled student's KL to the teacher on held-out text fell from the pruned start
    from herd.train.dcp import full_model_state
    from herd.config import ModelConfig
    from herd.models.llama import build_model

    held = torch.from_numpy(TokenData(data).window(TokenData(data).n_tokens - 257, 256)).reshape(4, 64)
    t_model = load_float_model(teacher)
    _, start = build_student(DistillConfig(**opts), 512, TokenData(data))
    cfg, sd = full_model_state(single.checkpoint)
    after = build_model(ModelConfig.from_dict(cfg), sd)
    before_m, after_m = agreement(t_model, start.eval(), held), agreement(t_model, after, held)
    assert after_m["kl"] < before_m["kl"]


def test_vocabulary_mismatch_is_refused(teacher, data, tmp_path):
    shape = tmp_path / "s.json"
    shape.write_text(json.dumps({"dim": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "ffn_dim": 64,
                                 "vocab_size": 600}))
    with pytest.raises(ConfigError, match="teacher and student vocabularies differ: teacher 512, student 600"):
        distill(teacher, data, tmp_path / "o", student=str(shape), **ARGS)
    with pytest.raises(ConfigError, match="exactly one of --student or --prune-from"):
        distill(teacher, data, tmp_path / "o", **ARGS)

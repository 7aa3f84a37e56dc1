"""`herd pretrain --plan` (herd/train/memory_plan.py) against torchtitan's published figures and against sums done by
hand here, not re-derived from the module. Arithmetic only, except one slow-marked test that counts the bytes
autograd really keeps for one of herd's blocks on the CPU (`make test` runs it).

The reference: torchtitan benchmarks/llama3_h100_202412_torchtitan.md (pytorch/torchtitan, end of 2024; torch
1963fc8, torchtitan 9dec370). Table 1: Llama 3.1 8B, FSDP on 8 H100 (96 GB HBM2e, 500 W), local batch 2 (global 16),
sequence 8192, selective activation checkpointing (train_configs/llama3_8b.toml: selective_ac_option = 'op'), no
compile: 5,762 tokens/s per GPU, 82.4 GiB (torch.cuda max reserved). Table 3, the same on 128 GPUs (global batch 256):
5,605 tokens/s per GPU, 67.0 GiB. The text: "33% to 39% MFU" measured against the SXM peak of 989 TFLOP/s. Their
train.py of that commit computes F.cross_entropy(pred.flatten(0, 1).float(), labels), so the plan's eager loss.
"""

from __future__ import annotations

import pytest

from herd.config import PRESETS
from herd.errors import ConfigError
from herd.train.memory_plan import count_params, flops_per_token, layer_activation_bytes, plan_pretrain

GiB = 2 ** 30
TT = dict(batch_size=16, seq_len=8192, nodes=1, gpus_per_node=8, parallel="fsdp", dtype="bfloat16",
          activation_checkpointing="selective", gpu="h100-96gb", loss="eager", mfu=0.40)

# Llama 3.1 8B by hand (SPEC.md §1): D 4096, L 32, H 32, KV 8, hd 128, F 14336, V 128256
BLOCK_8B = 4096 * 4096 * 2 + 4096 * 1024 * 2 + 3 * 4096 * 14336  # wq, wo; wk, wv; w1, w2, w3 = 218,103,808
N_8B = 32 * (BLOCK_8B + 2 * 4096) + 2 * 128256 * 4096 + 4096
# Llama 3.1 70B: D 8192, L 80, H 64, KV 8, F 28672
BLOCK_70B = 8192 * 8192 * 2 + 8192 * 1024 * 2 + 3 * 8192 * 28672  # 855,638,016
N_70B = 80 * (BLOCK_70B + 2 * 8192) + 2 * 128256 * 8192 + 8192


def test_parameter_counts():
    assert BLOCK_8B == 218_103_808 and N_8B == 8_030_261_248
    assert N_70B == 70_553_706_496
    assert count_params(PRESETS["llama-3.1-8b"]) == N_8B
    assert count_params(PRESETS["llama-3.1-70b"]) == N_70B


def test_flops_per_token_is_torchtitans_formula():
    # torchtitan utils.get_num_flop_per_token: 6 * params without the embedding + 12 * L * H * hd * T
    want = 6 * (N_8B - 128256 * 4096) + 12 * 32 * 32 * 128 * 8192  # 57.91 G
    assert flops_per_token(PRESETS["llama-3.1-8b"], 8192) == pytest.approx(want, rel=1e-4)
    # at torchtitan's 5,762 tokens/s that is their "33%" MFU of 989 TFLOP/s
    assert 5762 * want / 989e12 == pytest.approx(0.337, abs=0.001)


def test_torchtitan_llama31_8b_fsdp_8_gpus():
    p = plan_pretrain("llama-3.1-8b", **TT)
    # the items, by hand: 16 B per parameter over 8 ranks; selective AC keeps per token and layer the block input
    # 2D, wq 2A, wv 2Kd, attention out 2A + logsumexp 4H, w1 2F, w2 2D (bf16)
    assert p.item("parameters") + p.item("gradients") + p.item("optimizer") == 16 * N_8B / 8
    per_token = 2 * 4096 + 2 * 4096 + 2 * 1024 + 2 * 4096 + 4 * 32 + 2 * 14336 + 2 * 4096
    assert per_token == 63_616
    assert p.item("activations") == 32 * 16384 * per_token  # 31.06 GiB
    assert p.item("logits + loss") == 12 * 128256 * 16384  # 23.48 GiB: fp32 log-softmax, its grad, the logits' grad
    # torchtitan: 82.4 GiB reserved, 5,762 tokens/s per GPU
    assert abs(p.reserved / GiB - 82.4) / 82.4 < 0.15, p.reserved / GiB
    assert abs(p.tokens_per_s_per_gpu - 5762) / 5762 < 0.25, p.tokens_per_s_per_gpu
    assert p.fits  # on their 96 GB cards...
    assert not plan_pretrain("llama-3.1-8b", **{**TT, "gpu": "h100"}).fits  # ...and not on an 80 GB H100
    # compute: 16,384 tokens x (57.9 G + 5.1 G recomputed wk, wo, w3) at 40% of 989 TFLOP/s = 2.61 s
    recompute = 32 * 2 * (4096 * 1024 + 4096 * 4096 + 4096 * 14336)
    compute = 16384 * (57_912_852_480 + recompute) / (0.40 * 989e12)
    assert compute == pytest.approx(2.610, abs=0.001)
    assert compute < p.step_s < compute * 1.05  # NVLink traffic hides behind it


def test_torchtitan_llama31_8b_fsdp_128_gpus():
    p = plan_pretrain("llama-3.1-8b", **{**TT, "nodes": 16, "batch_size": 256})
    assert abs(p.reserved / GiB - 67.0) / 67.0 < 0.15, p.reserved / GiB
    assert abs(p.tokens_per_s_per_gpu - 5605) / 5605 < 0.25, p.tokens_per_s_per_gpu
    # the difference between 8 and 128 GPUs is the training state's share: 16 B x N x (1/8 - 1/128), x 1.1
    p8 = plan_pretrain("llama-3.1-8b", **TT)
    assert p8.reserved - p.reserved == pytest.approx(1.1 * 16 * N_8B * (1 / 8 - 1 / 128), rel=1e-9)


@pytest.mark.slow  # a few seconds: the profiler's first start
def test_activation_bytes_match_what_autograd_keeps():
    """Count what herd's own block keeps for its backward pass (bf16, CPU) under no, selective (torchtitan's op
    policy, written out here) and full checkpointing, against the formula at the same tiny shape. Measured: 13,352,
    4,020 and 532 bytes per token against the formula's 13,352, 4,000 and 512 (the rest: a few fixed small tensors)."""
    import dataclasses
    from collections import defaultdict

    import torch
    from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

    from herd.models.llama import TransformerBlock

    c = dataclasses.replace(PRESETS["llama-3.1-8b"], dim=256, n_layers=1, n_heads=8, n_kv_heads=2, ffn_dim=896,
                            rope_scaling=None)
    torch.manual_seed(0)
    block = TransformerBlock(c, 0).to(torch.bfloat16)
    B, T = 2, 128
    pos = torch.arange(T).expand(B, T)
    angles = pos.float()[..., None] * (1e4 ** (-torch.arange(0, 32, 2).float() / 32))
    cos, sin = torch.cos(angles), torch.sin(angles)
    keep = {torch.ops.aten.mm.default, torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
            torch.ops.aten._scaled_dot_product_flash_attention.default,
            torch.ops.aten._scaled_dot_product_efficient_attention.default}

    def op_policy():  # torchtitan parallelize_llama._apply_ac_to_transformer_block, selective_ac_option 'op'
        count = defaultdict(int)

        def policy(ctx, func, *args, **kwargs):
            key = "recompute" if ctx.is_recompute else "forward"
            count[key] += func == torch.ops.aten.mm.default
            save = func in keep and not (func == torch.ops.aten.mm.default and count[key] % 2 == 0)
            return CheckpointPolicy.MUST_SAVE if save else CheckpointPolicy.PREFER_RECOMPUTE
        return create_selective_checkpoint_contexts(policy)

    def kept_per_token(mode):
        x = torch.randn(B, T, c.dim, dtype=torch.bfloat16, requires_grad=True)
        f = lambda x: block(x, cos, sin, pos, (None, None), None, T)  # noqa: E731
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            if mode == "none":
                y = f(x)
            elif mode == "full":
                y = checkpoint(f, x, use_reentrant=False)
            else:
                y = checkpoint(f, x, use_reentrant=False, context_fn=op_policy)
        net = sum(e.self_cpu_memory_usage for e in prof.events())  # allocated and still alive after the forward
        y.sum().backward()
        # minus the output; plus the input, allocated before and kept by a checkpoint
        return (net - y.numel() * 2 + (x.numel() * 2 if mode != "none" else 0)) / (B * T)

    for mode, rel in (("none", 0.01), ("selective", 0.02), ("full", 0.05)):
        assert kept_per_token(mode) == pytest.approx(layer_activation_bytes(c, mode, 1, 2), rel=rel), mode


def test_70b_fsdp_on_one_node_does_not_fit():
    p = plan_pretrain("llama-3.1-70b", batch_size=8, seq_len=8192, nodes=1, parallel="fsdp", dtype="bfloat16",
                      activation_checkpointing="full")
    assert not p.fits
    state = 16 * N_70B / 8  # 131.4 GiB of parameters, gradients and AdamW moments per GPU
    assert p.item("parameters") + p.item("gradients") + p.item("optimizer") == state
    assert any("training state alone (131.4 GiB" in n for n in p.notes), p.notes
    assert any("DOES NOT FIT" in line for line in p.lines())


def test_70b_on_8_nodes_fsdp_and_fsdp_tp():
    kw = dict(seq_len=8192, nodes=8, dtype="bfloat16", activation_checkpointing="full")
    fsdp = plan_pretrain("llama-3.1-70b", batch_size=64, parallel="fsdp", **kw)
    assert fsdp.fits and fsdp.item("activations") == 80 * 8192 * 2 * 8192  # block inputs only: 10 GiB
    # selective AC keeps 122 KiB per token and layer: 76 GiB of activations, over the 80 GB card
    assert not plan_pretrain("llama-3.1-70b", batch_size=64, parallel="fsdp",
                             **{**kw, "activation_checkpointing": "selective"}).fits
    tp = plan_pretrain("llama-3.1-70b", batch_size=16, parallel="fsdp+tp", tp=8, **kw)
    assert tp.fits
    # TP 8 splits the block matrices, FSDP 8 shards all: (80 (block/8 + norms) + embedding + output) / 8 per GPU
    local = (80 * (BLOCK_70B // 8 + 2 * 8192) + 2 * 128256 * 8192 + 8192) / 8
    assert tp.item("parameters") == 4 * local
    # no sequence parallelism in herd: every TP rank keeps the full block inputs of its 2 x 8192 tokens
    assert tp.item("activations") == 80 * 16384 * 2 * 8192  # 20 GiB
    # TP all-reduces: 80 blocks x 6 (2 forward, 2 backward, 2 recomputed) x 2 x 7/8 x 16384 x 8192 x 2 B at 360 GB/s
    tp_s = 80 * 6 * 2 * 7 / 8 * 16384 * 8192 * 2 / 360e9
    assert any(f"= {tp_s:.3f} s, not overlapped" in line for line in tp.lines()), tp.lines()
    assert 300 < tp.tokens_per_s_per_gpu < 700 and 300 < fsdp.tokens_per_s_per_gpu < 800


@pytest.mark.parametrize("kw, msg", [
    (dict(model_config="llama-9b"), "unknown model config 'llama-9b'"),
    (dict(parallel="fsdp+tp", tp=3, nodes=3), "tensor parallel degree 3 does not divide the model's n_heads (32)"),
    (dict(parallel="fsdp+tp", tp=3), "world size 8 (1 node(s) x 8) is not divisible by the TP degree --tp 3"),
    (dict(batch_size=10), "global batch 10 is not divisible by the data-parallel degree 8 x grad_accum 1"),
    (dict(parallel="ddp"), "--plan covers --parallel fsdp and fsdp+tp, got 'ddp'"),
    (dict(gpu="a100"), "unknown --gpu 'a100'"),
    (dict(mfu=1.5), "--mfu is a fraction"),
    (dict(model_config="debug"), "--plan needs a model shape"),
])
def test_bad_input_is_a_clear_error(kw, msg):
    args = {**TT, "model_config": "llama-3.1-8b", **kw}
    with pytest.raises(ConfigError) as e:
        plan_pretrain(args.pop("model_config"), **args)
    assert msg in str(e.value)


def test_cli(capsys):
    from herd.cli import build_parser, main
    from herd.train.cli_scale import _common_opts

    argv = ["pretrain", "--plan", "--model-config", "llama-3.1-8b", "--parallel", "fsdp", "--batch-size", "16",
            "--seq-len", "8192", "--dtype", "bfloat16", "--activation-checkpointing", "selective", "--gpu",
            "h100-96gb", "--loss-impl", "eager"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "fits: 8" in out and "tokens/s per GPU" in out and "assumptions:" in out
    assert main(argv[:-8] + ["--tp", "3", "--parallel", "fsdp+tp", "--nodes", "3"]) == 2
    assert "does not divide the model's n_heads (32)" in capsys.readouterr().err
    assert main(["pretrain", "--model-config", "llama-3.1-8b"]) == 2  # no --plan: --data and --out are needed
    assert "needs --data and --out" in capsys.readouterr().err
    # the training flag keeps its old meaning: given alone it is full checkpointing, selective is for --plan only
    args = build_parser().parse_args(["pretrain", "--data", "d", "--out", "o", "--activation-checkpointing"])
    assert args.activation_checkpointing == "full"
    assert _common_opts(args, ("activation_checkpointing",))["activation_checkpointing"] is True
    args.activation_checkpointing = "selective"
    with pytest.raises(ConfigError, match="for --plan estimates"):
        _common_opts(args, ("activation_checkpointing",))

"""`herd finetune`, `herd merge` and `herd train-vision`: parse arguments, call herd.train.finetune /
herd.train.merge / herd.train.vision.train_vision."""

from __future__ import annotations

import json

from herd.train.loop import FinetuneConfig
from herd.train.vision import VisionTrainConfig


def cmd_finetune(args) -> None:
    import torch

    from herd.train.loop import finetune

    if args.threads:
        torch.set_num_threads(args.threads)
    names = ("method", "rank", "alpha", "targets", "dropout", "quant", "lr", "weight_decay", "warmup", "epochs",
             "steps", "batch_tokens", "grad_accum", "seq_len", "grad_clip", "seed", "eval_every", "save_every",
             "over_long", "dtype", "compute", "check_samples")
    opts = {k: getattr(args, k) for k in names}
    opts["activation_checkpointing"] = args.activation_checkpointing
    opts["progress"] = not args.no_progress
    # the chosen settings, their reasons and any warning are printed before training starts
    res = finetune(args.model, args.data, args.out, eval_data=args.eval, resume=args.resume,
                   log=lambda line: print(line, flush=True), **opts)
    if res.losses:
        print(f"steps {res.steps}: train loss {res.losses[0]:.4f} -> {res.losses[-1]:.4f}")
    if res.eval_losses:
        print(f"eval loss {res.eval_losses[0][1]:.4f} (step {res.eval_losses[0][0]}) -> {res.eval_losses[-1][1]:.4f} "
              f"(step {res.eval_losses[-1][0]})")
    if res.check is not None:
        print(res.check.line())
        for q, reply, ok in res.check.graded[:3]:
            print(f"  {'ok   ' if ok else 'WRONG'} Q: {q[:70]!r} -> {reply[:70]!r}")
    print(f"wrote {res.out} (metrics.jsonl, loss.png, checkpoints/)")


def merge_paths(paths: list[str], model: str | None, adapter: str | None, out: str | None):
    """(base, adapter, out) from `herd merge [BASE] ADAPTER OUT` and/or the --model / --adapter / --out flags:
    positionals fill, in order, the places no flag took; BASE may be left out (the adapter names its base)."""
    from herd.errors import ConfigError

    slots = [name for name, flag in (("adapter", adapter), ("out", out)) if flag is None]
    if len(paths) == len(slots) + 1 and model is None:
        model, paths = paths[0], paths[1:]
    if len(paths) != len(slots):
        given = " ".join(paths) or "nothing"
        want = " ".join(s.upper() for s in slots) or "no positional paths"
        raise ConfigError(f"herd merge takes [BASE] ADAPTER OUT (or --model/--adapter/--out): expected "
                          f"{'[BASE] ' if model is None else ''}{want} as positional paths, got {given}")
    filled = dict(zip(slots, paths))
    return model, filled.get("adapter", adapter), filled.get("out", out)


def cmd_merge(args) -> None:
    from herd.train.merge import merge

    base, adapter, out = merge_paths(args.paths, args.model, args.adapter, args.out)
    report = merge(base, adapter, out, to=args.to, quant=args.quant, dtype=args.dtype, kl_data=args.kl_data)
    print(report.line())


def register(subparsers) -> None:
    """Add the `finetune` and `merge` subcommands to herd's CLI."""
    d = FinetuneConfig()
    p = subparsers.add_parser("finetune", help="fine-tune a model: LoRA, QLoRA or full")
    p.add_argument("--model", "-m", default=None, help="base checkpoint path or catalog name (default model)")
    p.add_argument("--data", required=True, nargs="+", help="training data: chat JSONL ({\"messages\": ...}), "
                   "JSONL of {\"text\": ...}, or .txt files")
    p.add_argument("--eval", default=None, nargs="+", help="evaluation data (same formats)")
    p.add_argument("--out", required=True, help="output folder (adapter or model, metrics.jsonl, loss.png)")
    p.add_argument("--method", choices=["lora", "qlora", "full"], default=d.method)
    p.add_argument("--rank", type=int, default=d.rank)
    p.add_argument("--alpha", type=float, default=d.alpha)
    p.add_argument("--targets", default=d.targets, help="comma-separated: wq,wk,wv,wo,w1,w2,w3 (or HF names)")
    p.add_argument("--dropout", type=float, default=d.dropout, help="LoRA dropout")
    p.add_argument("--quant", default=d.quant, help="QLoRA over a float base: q8_0, q4_0, q4_1, q5_0, q5_1, q4_k "
                   "(a GGUF base keeps its own blocks)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 8e-3 * sqrt(rank) / alpha "
                   "for LoRA and QLoRA, 1e-3 at rank 16; 2e-5 full)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 5%% of the run)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--epochs", type=int, default=d.epochs)
    g.add_argument("--steps", type=int, default=None, help="optimizer steps (instead of epochs)")
    p.add_argument("--batch-tokens", type=int, default=d.batch_tokens, help="tokens per micro-batch (default: "
                   "from the data, for ~100 optimizer steps, 256..4096 tokens)")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="packed row length; longer examples are cut "
                   "(default: the longest example rounded up to 64, at most 512)")
    p.add_argument("--grad-clip", type=float, default=d.grad_clip)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between eval losses (0: at the end)")
    p.add_argument("--save-every", type=int, default=d.save_every, help="steps between checkpoints (0: at the end)")
    p.add_argument("--over-long", choices=["truncate", "drop"], default=d.over_long)
    p.add_argument("--dtype", default=d.dtype, help="base weights: float32 or bfloat16")
    p.add_argument("--compute", default=d.compute, choices=["float32", "bfloat16"],
                   help="LoRA/QLoRA: the frozen base's matmuls in float32 or bfloat16 (float32 accumulation; the "
                   "adapter, loss and gradients stay float32). Default: float32 for LoRA; for QLoRA bfloat16 on a CPU "
                   "with bf16 dot products (AVX512-BF16, AMX), as QLoRA computes")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/latest")
    p.add_argument("--check-samples", type=int, default=d.check_samples, help="after training, greedy exact "
                   "answers on this many training prompts (with --eval: on every eval row); 0: no check")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=cmd_finetune, epochs=d.epochs)

    p = subparsers.add_parser("merge", help="fold a LoRA adapter into its base; write HF or GGUF",
                              usage="herd merge [-h] [BASE] ADAPTER OUT [--to {hf,gguf}] [--quant Q] [--dtype D] "
                                    "[--kl-data F]\n       herd merge [--model BASE] --adapter DIR --out OUT [...]")
    p.add_argument("paths", nargs="*", metavar="PATH", help="[BASE] ADAPTER OUT: base checkpoint or catalog name "
                   "(optional: default the one the adapter names), adapter folder, output")
    p.add_argument("--model", "-m", default=None, help="base checkpoint (default: the one the adapter names)")
    p.add_argument("--adapter", default=None, help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--out", default=None, help="output: a folder (hf) or a .gguf file (gguf)")
    p.add_argument("--to", choices=["hf", "gguf"], default="hf")
    p.add_argument("--quant", default=None, help="GGUF: f32, f16, bf16, q8_0, q4_0, q4_1 (default f16)")
    p.add_argument("--dtype", default=None, help="HF: float32 or bfloat16 (default float32)")
    p.add_argument("--kl-data", default=None, help="data file whose tokens measure the KL (default: built-in text)")
    p.set_defaults(func=cmd_merge)

    _register_vision(subparsers)
    from herd.train import cli_scale  # data prepare, pretrain, distill

    cli_scale.register(subparsers)


def cmd_train_vision(args) -> None:
    from herd.train.vision import train_vision

    opts = {k: getattr(args, k) for k in ("model", "seed", "pretrain_steps", "pretrain_batch", "steps", "batch", "lr",
                                          "vision_lr", "lora_rank", "eval_per_kind", "threads")}
    opts["progress"] = not args.no_progress
    summary = train_vision(args.out, **opts)
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(report_lines(summary))


def report_lines(summary: dict) -> str:
    """The human summary of a training run: timings, steps/s, held-out accuracy per question kind."""
    s1, s2 = summary["stage1"], summary["stage2"]
    lines = []
    if s1.get("steps"):
        lines.append(f"stage 1 (vision pre-training): {s1['steps']} steps x {s1['batch']} pictures in "
                     f"{s1['seconds']:.0f} s ({s1['steps_per_s']:.2f} steps/s)")
    lines.append(f"stage 2 (alignment through the text model): {s2['steps']} steps x {s2['batch']} in "
                 f"{s2['seconds']:.0f} s ({s2['steps_per_s']:.3f} steps/s), loss {s2['loss_first']:.3f} -> "
                 f"{s2['loss_last']:.3f}")
    held = summary.get("held_out_phrasing", {})
    for kind, acc in summary["accuracy"].items():
        extra = f" (unseen phrasings: {held[kind]:.1%})" if kind in held else ""
        lines.append(f"  {kind:<9} {acc:6.1%} of {summary['n'][kind]} held-out pictures{extra}")
    lines.append(f"total {summary['total_seconds']:.0f} s on {summary['threads']} thread(s); wrote {summary['out']}")
    return "\n".join(lines)


def _register_vision(subparsers) -> None:
    """Add `train-vision` to herd's CLI."""
    d = VisionTrainConfig()
    p = subparsers.add_parser("train-vision", help="train a small vision encoder for the default model on generated "
                              "pictures (shapes, colours, counts, positions)")
    p.add_argument("--model", "-m", default=None, help="base text model (default: the default model)")
    p.add_argument("--out", default=None, help="output folder (default: HERD_HOME/vision/<model>, where "
                   "--image looks)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--pretrain-steps", type=int, default=d.pretrain_steps, help="stage 1 steps (0 to skip)")
    p.add_argument("--pretrain-batch", type=int, default=d.pretrain_batch)
    p.add_argument("--steps", type=int, default=d.steps, help="stage 2 steps")
    p.add_argument("--batch", type=int, default=d.batch, help="stage 2 batch")
    p.add_argument("--lr", type=float, default=d.lr, help="stage 2 LR of projection, markers and LoRA")
    p.add_argument("--vision-lr", type=float, default=d.vision_lr, help="stage 2 LR of encoder and adapter")
    p.add_argument("--lora-rank", type=int, default=d.lora_rank)
    p.add_argument("--eval-per-kind", type=int, default=d.eval_per_kind, help="held-out pictures per question kind")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_train_vision)

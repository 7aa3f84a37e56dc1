"""`herd train-vision`: train the small vision model that `herd chat --image` / `herd generate --image` use."""

from __future__ import annotations

import json

from herd.vision_train import VisionTrainConfig


def cmd_train_vision(args) -> None:
    from herd.vision_train import train_vision

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


def register(subparsers) -> None:
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

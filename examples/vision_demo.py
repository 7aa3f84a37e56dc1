"""`make vision-demo`: teach the default model (SmolLM2-135M-Instruct) to see, then ask it about pictures.

1. `herd train-vision`'s schedule: a small Llama 4-layout vision encoder pre-trained on generated pictures, then
   aligned through the frozen text model with LoRA (herd/train/vision.py); about 10 minutes on 2 quiet cores.
2. Held-out accuracy per question kind (colour, shape, position, count), exact answers, unseen pictures.
3. The saved model reloaded the way `herd chat --image` loads it, and asked about PNG files written to disk, by
   real generation (KV cache, greedy): the answers, and how often they are exactly right.

    python examples/vision_demo.py [--out DIR] [--threads 2] [--ask 40]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

TARGETS = {"colour": 0.9, "shape": 0.9, "count": 0.7}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="vision model folder (default: where `herd chat --image` looks)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    ap.add_argument("--ask", type=int, default=40, help="held-out pictures to ask about by real generation")
    ap.add_argument("--steps", type=int, default=None, help="stage 2 steps (default: the demo schedule)")
    ap.add_argument("--pretrain-steps", type=int, default=None, help="stage 1 steps (default: the demo schedule)")
    args = ap.parse_args(argv)

    import torch

    from herd.api import ImageChat
    from herd.hub import default_vision_dir
    from herd.train.cli import report_lines
    from herd.train.vision import VisionTrainConfig, eval_split, train_vision
    from herd.train.vision_data import normalize_answer

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = VisionTrainConfig(threads=args.threads)
    if args.steps is not None:
        cfg.steps = args.steps
    if args.pretrain_steps is not None:
        cfg.pretrain_steps = args.pretrain_steps
    out = Path(args.out) if args.out else default_vision_dir()
    print(f"training a vision model for the default model on {torch.get_num_threads()} thread(s) -> {out}")
    summary = train_vision(out, cfg)
    print(report_lines(summary))

    # the saved model, loaded as `herd chat --image` loads it, asked about PNG files by real generation
    t0 = time.perf_counter()
    chat = ImageChat.load(out)
    samples = out / "samples"
    samples.mkdir(exist_ok=True)
    held_out = eval_split(cfg)  # the four kinds in turn: the first `ask` pictures cover them evenly
    asked = held_out[:args.ask]
    right: dict[str, list[int]] = {}
    print(f"\nasking the reloaded model about {len(asked)} held-out pictures (greedy generation):")
    for i, e in enumerate(asked):
        path = samples / f"{i:03d}-{e.kind}-{e.answer}.png"
        e.image.save(path)
        reply = chat.generate(e.question, images=[str(path)], max_tokens=8).text
        ok = normalize_answer(reply) == e.answer
        right.setdefault(e.kind, []).append(int(ok))
        if i < 12:
            print(f"  {path.name:<26} {e.question:<48} -> {reply.strip()!r:<12} {'ok' if ok else 'WRONG'}")
    for kind, v in right.items():
        print(f"  generation {kind:<9} {sum(v)}/{len(v)} exactly right")
    first = sorted(samples.glob("000-*.png"))
    print(f"(reload and {len(asked)} answers in {time.perf_counter() - t0:.0f} s)")
    if first:
        print(f"try it: herd chat --image {first[0]}")

    acc = summary["accuracy"]
    met = all(acc[k] >= v for k, v in TARGETS.items())
    print(f"\ntargets (colour >= 90%, shape >= 90%, count >= 70%): {'met' if met else 'NOT met'}; "
          f"total {summary['total_seconds']:.0f} s")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())

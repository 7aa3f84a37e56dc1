"""`herd data prepare`, `herd pretrain` and `herd distill`: parse arguments, call herd.train.shards.prepare /
herd.train.pretrain.pretrain / herd.train.distill.distill. Under torchrun every rank runs the same command."""

from __future__ import annotations

from herd.errors import ConfigError
from herd.train.memory_plan import AC_MODES, GPUS, LOSSES
from herd.train.parallel import LAYOUTS


def cmd_data_prepare(args) -> None:
    from herd.train.shards import prepare

    print(prepare(args.tokenizer, args.input, args.out, progress=not args.no_progress).line())


def _common_opts(args, names) -> dict:
    opts = {k: getattr(args, k) for k in names}
    opts["progress"] = not args.no_progress
    if "activation_checkpointing" in opts:  # training recomputes whole blocks or nothing
        if opts["activation_checkpointing"] == "selective":
            raise ConfigError("--activation-checkpointing selective (torchtitan's op-level policy) is for --plan "
                              "estimates; training does none or full")
        opts["activation_checkpointing"] = opts["activation_checkpointing"] == "full"
    return opts


_SHARED = ("steps", "batch_size", "seq_len", "lr", "warmup", "seed", "parallel", "tp", "grad_accum", "save_every",
           "dtype", "compile", "activation_checkpointing", "weight_decay", "grad_clip")


def _main_rank() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


def _threads(args) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def cmd_pretrain(args) -> None:
    if args.plan:
        from herd.train.memory_plan import plan_pretrain

        plan = plan_pretrain(args.model_config, batch_size=args.batch_size, seq_len=args.seq_len, nodes=args.nodes,
                             gpus_per_node=args.gpus_per_node, parallel=args.parallel, tp=args.tp,
                             grad_accum=args.grad_accum, dtype=args.dtype, gpu=args.gpu, mfu=args.mfu,
                             activation_checkpointing=args.activation_checkpointing, loss=args.loss_impl)
        print("\n".join(plan.lines()))
        return
    if not args.data or not args.out:
        raise ConfigError("herd pretrain needs --data and --out (or --plan for a memory and step-time estimate)")
    from herd.train.pretrain import pretrain

    _threads(args)
    opts = _common_opts(args, _SHARED + ("init_from",))
    opts["model_config"] = args.model_config
    res = pretrain(args.data, args.out, resume=args.resume, resume_from=args.resume_from, **opts)
    if res.losses and _main_rank():
        print(f"{res.n_params / 1e6:.2f} M parameters; steps {res.steps}: loss {res.losses[0]:.4f} -> "
              f"{res.losses[-1]:.4f}; wrote {res.out} (metrics.jsonl, loss.png, checkpoints/)")


def cmd_distill(args) -> None:
    from herd.train.distill import distill

    _threads(args)
    opts = _common_opts(args, _SHARED + ("kd_ratio", "temperature", "student", "prune_from", "prune_depth",
                                         "prune_width"))
    res = distill(args.teacher, args.data, args.out, resume=args.resume, resume_from=args.resume_from, **opts)
    if res.losses and _main_rank():
        print(f"student {res.n_params / 1e6:.2f} M parameters; steps {res.steps}: loss {res.losses[0]:.4f} -> "
              f"{res.losses[-1]:.4f}; wrote {res.out}")


def _add_training(p, d, need_data: bool = True) -> None:
    """The options pretrain and distill share."""
    p.add_argument("--data", required=need_data, help="a folder made by `herd data prepare`")
    p.add_argument("--out", required=need_data, help="output folder (checkpoints/, metrics.jsonl, loss.png)")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="GLOBAL batch: sequences per optimizer step, whatever the world size")
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 10%% of the run)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--grad-clip", type=float, default=d.grad_clip)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--parallel", choices=LAYOUTS, default=None,
                   help="layout (default: single in one process, fsdp under several)")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel degree (tp, fsdp+tp)")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step")
    p.add_argument("--save-every", type=int, default=d.save_every, help="steps between checkpoints (0: at the end)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    p.add_argument("--resume-from", default=None, help="continue from this checkpoint folder (writing into --out)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=d.dtype)
    p.add_argument("--compile", action="store_true", help="torch.compile each block")
    p.add_argument("--activation-checkpointing", nargs="?", const="full", default="none", choices=AC_MODES,
                   help="recompute activations in the backward pass: full (the default when given alone) recomputes "
                        "each block; selective is torchtitan's op-level policy, for --plan only")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")


def register(subparsers) -> None:
    """Add `data prepare`, `pretrain` and `distill` to herd's CLI."""
    from herd.train.distill import DistillConfig
    from herd.train.pretrain import PretrainConfig
    from herd.train.presets import pretrain_presets

    p = subparsers.add_parser("data", help="prepare pretraining data")
    dsub = p.add_subparsers(dest="data_command", required=True)
    q = dsub.add_parser("prepare", help="tokenize a corpus once into memory-mapped token shards + manifest.json")
    q.add_argument("--tokenizer", "-m", default=None, help="model whose tokenizer (and chat format) to use "
                   "(default: the default model)")
    q.add_argument("--input", required=True, nargs="+", help=".txt files, JSONL of {\"text\": ...}, or chat JSONL "
                   "of {\"messages\": ...} (rendered with the tokenizer's chat format)")
    q.add_argument("--out", required=True, help="output folder")
    q.add_argument("--no-progress", action="store_true")
    q.set_defaults(func=cmd_data_prepare)

    d = PretrainConfig()
    p = subparsers.add_parser("pretrain", help="pretrain a Llama model (one process, or under torchrun)")
    p.add_argument("--model-config", default="debug", help=f"preset ({', '.join(pretrain_presets())}) or a JSON "
                   "file of herd config keys; debug takes its vocabulary from the data")
    p.add_argument("--init-from", default=None, help="start from a checkpoint: a herd training checkpoint (any "
                   "layout) or any model herd loads (HF, Meta, GGUF)")
    _add_training(p, d, need_data=False)
    g = p.add_argument_group("--plan: print per-GPU memory and step time instead of training (no GPU, no data)")
    g.add_argument("--plan", action="store_true", help="estimate memory and step time for the layout and batch given")
    g.add_argument("--nodes", type=int, default=1)
    g.add_argument("--gpus-per-node", type=int, default=8)
    g.add_argument("--gpu", choices=list(GPUS), default="h100", help="h100: SXM 80 GB; h100-96gb: torchtitan's "
                   "benchmark hosts; h200")
    g.add_argument("--mfu", type=float, default=0.40,
                   help="assumed fraction of the GPU's dense bf16 peak the step's FLOPs (recompute included) reach")
    g.add_argument("--loss-impl", choices=LOSSES, default="chunked",
                   help="chunked: herd's loss (no logits kept); eager: F.cross_entropy on fp32 logits (torchtitan)")
    p.set_defaults(func=cmd_pretrain)

    d = DistillConfig()
    p = subparsers.add_parser("distill", help="distill a teacher into a smaller student (one process or torchrun)")
    p.add_argument("--teacher", required=True, help="any model herd loads (catalog name, HF, Meta, GGUF)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--student", default=None, help="preset name, JSON file, or a checkpoint herd loads")
    g.add_argument("--prune-from", default=None, help="build the student by pruning this model (Minitron)")
    p.add_argument("--prune-depth", type=int, default=None,
                   help="keep L layers: the first L-1 and the last one (Minitron: the first and last blocks matter "
                        "most; one contiguous run of late-middle blocks is the cheapest to drop)")
    p.add_argument("--prune-width", type=int, default=None,
                   help="MLP hidden size F: keep the F channels of each MLP with the largest activation on the "
                        "data (Minitron's importance: mean |silu(w1 x) * w3 x| over calibration tokens)")
    p.add_argument("--kd-ratio", type=float, default=d.kd_ratio, help="A in (1-A)*CE + A*KL(teacher || student)")
    p.add_argument("--temperature", type=float, default=d.temperature)
    _add_training(p, d)
    p.set_defaults(func=cmd_distill)

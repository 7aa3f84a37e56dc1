"""`herd pretrain`: train a Llama model from scratch (or from --init-from) on prepared token shards, in one process or
under `torchrun --nproc-per-node N -m herd pretrain ...` with any layout of parallel.py.

The loop is the fine-tuning loop's (loop.py: warm-up + cosine LR, AdamW, clipping, metrics.jsonl, loss.png), grown to
several processes: the global batch B (sequences per optimizer step) is fixed whatever the world size, cut into K
micro-batches and D data-parallel slices (shards.Loader); each rank's loss is its summed cross entropy over the
global token count B*T, times D because DDP/FSDP average gradients; gradients sync on the last micro-batch only.
So every layout computes the same step: the golden-loss tests hold DDP and FSDP2 bitwise equal to each other and
within 1e-5 of one process.

Initial weights come from the seed alone (built in full on the CPU, identically in every process, before the layout
is applied) or from --init-from (a herd training checkpoint, or any checkpoint herd loads). `--steps 0` writes the
seed checkpoint (OUT/checkpoints/step-000000) and stops: initialise once, then `--init-from` it in any layout.
Checkpoints are DCP (dcp.py), so a run resumes at another world size or layout.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from herd.errors import ConfigError
from herd.train import dcp, parallel
from herd.train.loop import _progress, _truncate_metrics, apply_activation_checkpointing, lr_lambda, plot_metrics
from herd.train.loss import loss_head
from herd.train.presets import model_config
from herd.train.shards import Loader, TokenData


@dataclass
class PretrainConfig:
    model_config: str | dict = "debug"  # preset name, JSON file or dict (presets.py)
    steps: int = 100
    batch_size: int = 8  # GLOBAL sequences per optimizer step
    seq_len: int = 256
    lr: float = 3e-3
    warmup: int | None = None  # default 10% of the run
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    parallel: str | None = None  # single | ddp | fsdp | hsdp | tp | fsdp+tp (default: single / fsdp)
    tp: int | None = None
    grad_accum: int = 1
    save_every: int = 0  # 0: at the end only
    keep_checkpoints: int = 0  # 0: keep all
    dtype: str = "float32"  # bfloat16: bf16 parameters with fp32 reduction under FSDP on GPU
    compile: bool = False
    activation_checkpointing: bool = False
    init_from: str | None = None
    progress: bool = True
    stop_at: int | None = None  # stop after this step as if interrupted (the schedule still plans every step)

    def checked(self) -> "PretrainConfig":
        if self.steps < 0:
            raise ConfigError(f"--steps must be >= 0 (0 writes the seed checkpoint only), got {self.steps}")
        for name in ("batch_size", "seq_len", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"--dtype must be float32 or bfloat16, got {self.dtype!r}")
        if not (self.lr > 0):
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        return self


# settings a resumed run may change: they do not change the mathematics of a step
_FREE = {"parallel", "tp", "progress", "stop_at", "save_every", "keep_checkpoints", "compile",
         "activation_checkpointing", "init_from"}


@dataclass
class PretrainResult:
    out: Path
    steps: int
    losses: list[float]  # loss of every step run in this call
    records: list[dict] = field(default_factory=list)
    checkpoint: Path | None = None
    n_params: int = 0


# -- the model ---------------------------------------------------------------------------------------------------

@torch.no_grad()
def init_weights(model, seed: int) -> None:
    """GPT-2 / torchtitan style: N(0, 0.02) weights, the residual projections (wo, w2) scaled by 1/sqrt(2L), norms 1.
    Seeded and on the CPU, so every process builds the same bits."""
    g = torch.Generator().manual_seed(seed)
    std = 0.02
    out_std = std / math.sqrt(2 * model.config.n_layers)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
            p.copy_(torch.randn(p.shape, generator=g) * out_std)
        else:
            p.copy_(torch.randn(p.shape, generator=g) * std)


def build(mcfg, cfg: PretrainConfig):
    """The plain model in full fp32 on the CPU: from the seed, or from --init-from when that is a model checkpoint."""
    from herd.models.llama import Transformer, load_weights

    torch.manual_seed(cfg.seed)
    model = Transformer(mcfg)
    init_weights(model, cfg.seed)
    src = cfg.init_from
    if src is not None and not (Path(src) / dcp.TRAINER).exists():
        from herd.formats import load_checkpoint
        from herd.hub import resolve

        ckpt = load_checkpoint(resolve(src), torch.float32)
        ckpt.state_dict.pop("rope.freqs", None)
        dcp.check_model_config(ckpt.config.to_dict(), mcfg.to_dict(), Path(src))
        load_weights(model, ckpt.state_dict)
    for p in model.parameters():
        p.requires_grad_(True)
    model.train()
    return model


def config_for(cfg: PretrainConfig, vocab_size: int):
    """The model config: --init-from's own when it is a checkpoint and --model-config is the default."""
    src = cfg.init_from
    if src is not None and cfg.model_config == "debug":
        if (Path(src) / dcp.TRAINER).exists():
            from herd.config import ModelConfig

            return ModelConfig.from_dict(dcp.read_trainer(src)["model_config"])
        from herd.formats import load_checkpoint
        from herd.hub import resolve

        return load_checkpoint(resolve(src), torch.float32, with_tokenizer=False).config
    return model_config(cfg.model_config, vocab_size)


def ce_loss(module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """(summed next-token cross entropy of inputs x (b, T) against targets y (b, T), extra sums to log: none), a
    chunk of positions at a time through the output layer (loss.py), inside the wrapped model's own call."""
    with loss_head(getattr(module, "module", module).output, y):  # DDP wraps the model as .module
        return module(x), {}


# -- the loop ----------------------------------------------------------------------------------------------------

def pretrain(data, out, *, resume: bool = False, resume_from=None, config: PretrainConfig | None = None,
             **options) -> PretrainResult:
    """Pretrain on prepared shards `data` (herd data prepare) into `out`; options are PretrainConfig fields."""
    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(PretrainConfig)})
    if unknown:
        raise ConfigError(f"unknown pretraining options {unknown}")
    cfg = dataclasses.replace(config or PretrainConfig(), **options).checked()
    out = Path(out)
    ckpt_root = out / "checkpoints"
    # every check that can fail is made on every rank before any process group, model or data work
    world, _, _ = parallel.env_world()
    _, tp, _ = parallel.check_layout(cfg.parallel, cfg.tp, world, cfg.batch_size, cfg.grad_accum)
    tokens = TokenData(data)
    mcfg = config_for(cfg, tokens.vocab_size)
    if mcfg.vocab_size < tokens.vocab_size:
        raise ConfigError(f"model vocabulary ({mcfg.vocab_size}) is smaller than the data's ({tokens.vocab_size})")
    if cfg.seq_len > mcfg.max_seq_len:
        raise ConfigError(f"--seq-len {cfg.seq_len} exceeds the model's context ({mcfg.max_seq_len})")
    start = _resume_point(ckpt_root, resume, resume_from, cfg, mcfg)
    if tp > 1:  # heads and MLP width must split over the TP ranks: refused here, on every rank
        parallel.check_tp_shape(mcfg, tp)
    layout = parallel.setup(cfg.parallel, cfg.tp, cfg.batch_size, cfg.grad_accum)
    try:
        return run(tokens, out, cfg, mcfg, layout, start, build(mcfg, cfg), ce_loss)
    finally:
        parallel.teardown(layout)


def _resume_point(root: Path, resume: bool, resume_from, cfg: PretrainConfig, mcfg) -> Path | None:
    if resume_from is not None:
        folder = Path(resume_from)
    elif resume:
        folder = dcp.latest(root)
        if folder is None:
            raise ConfigError(f"--resume: no complete checkpoint in {root}")
    else:
        return None
    st = dcp.read_trainer(folder)
    dcp.check_model_config(st["model_config"], mcfg.to_dict(), folder)
    now = dataclasses.asdict(cfg)
    diff = sorted(k for k in now if k not in _FREE and st["config"].get(k) != now[k])
    if diff:
        raise ConfigError(f"{folder}: cannot resume with changed settings "
                          + ", ".join(f"{k}: {st['config'].get(k)!r} -> {now[k]!r}" for k in diff))
    return folder


def run(tokens: TokenData, out: Path, cfg: PretrainConfig, mcfg, layout, start: Path | None, model, loss_fn
        ) -> PretrainResult:
    """The loop, shared by pretrain and distill: `model` is the plain full model, loss_fn(module, x, y) gives the
    summed loss over the micro-batch's tokens and a dict of other summed quantities to log per token."""
    from herd.models.llama import num_params

    if layout.is_main:
        out.mkdir(parents=True, exist_ok=True)
    n_params = num_params(model)
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    bf16_gpu = cfg.dtype == "bfloat16" and layout.device.type == "cuda"
    if cfg.dtype == "bfloat16" and not bf16_gpu:
        model.to(torch.bfloat16)
    module = parallel.apply_layout(model, layout, mixed_bf16=bf16_gpu and layout.kind in ("fsdp", "hsdp", "fsdp+tp"))
    if cfg.compile:
        for block in model.layers:
            block.compile()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8,
                            foreach=layout.kind != "tp")  # tp mixes plain and DTensor parameters
    warmup = cfg.warmup if cfg.warmup is not None else max(1, round(0.1 * cfg.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(warmup, cfg.steps, cfg.min_lr_ratio))
    loader = Loader(tokens, cfg.seq_len, cfg.batch_size, cfg.grad_accum, layout.dp_rank, layout.dp_size, cfg.seed)
    metrics_path = out / "metrics.jsonl"
    step = 0
    if start is not None:
        st = dcp.read_trainer(start)
        dcp.load(start, model, opt)
        sched.load_state_dict(st["scheduler"])
        loader.load_state_dict(st["loader"])
        torch.set_rng_state(st["rng"])
        step = st["step"]
        if layout.is_main:
            _truncate_metrics(metrics_path, step)
    elif cfg.init_from is not None and (Path(cfg.init_from) / dcp.TRAINER).exists():
        dcp.load(cfg.init_from, model)  # weights only: a seed checkpoint or another run's (any layout)
    if start is None and layout.is_main and metrics_path.exists():
        metrics_path.unlink()

    def save(step_: int) -> Path:
        state = {"step": step_, "scheduler": sched.state_dict(), "loader": loader.state_dict(),
                 "rng": torch.get_rng_state(), "config": dataclasses.asdict(cfg), "model_config": mcfg.to_dict(),
                 "layout": {"kind": layout.kind, "world": layout.world, "tp": layout.tp},
                 "data": {"folder": str(tokens.folder), "tokenizer": tokens.manifest.get("tokenizer")}}
        return dcp.save(out / "checkpoints", step_, model, opt, state, layout, cfg.keep_checkpoints)

    stop = min(cfg.steps, cfg.stop_at) if cfg.stop_at else cfg.steps
    bar = _progress(cfg.progress and layout.is_main, cfg.steps, step)
    tokens_per_step = cfg.batch_size * cfg.seq_len
    losses, records, last = [], [], None
    t0 = time.perf_counter()
    log = open(metrics_path, "a", encoding="utf-8") if layout.is_main else None
    try:
        if step == 0 and stop == 0:
            last = save(0)  # --steps 0 writes the seed checkpoint
        while step < stop:
            micro = loader.next()
            local, extra = 0.0, {}
            for m, (x, y) in enumerate(micro):
                x, y = x.to(layout.device), y.to(layout.device)
                with parallel.set_grad_sync(module, layout, m == len(micro) - 1):
                    loss_sum, more = loss_fn(module, x, y)
                    (loss_sum * (layout.dp_size / tokens_per_step)).backward()
                local += float(loss_sum.detach())
                for k, v in more.items():
                    extra[k] = extra.get(k, 0.0) + v
            loss = parallel.all_reduce_dp(local, layout) / tokens_per_step
            extra = {k: parallel.all_reduce_dp(v, layout) / tokens_per_step for k, v in sorted(extra.items())}
            grad_norm = parallel.clip_grad_norm(params, cfg.grad_clip, layout)
            lr = sched.get_last_lr()[0]
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            losses.append(loss)
            elapsed = time.perf_counter() - t0
            rec = {"step": step, "loss": loss, "lr": lr, "tokens": step * tokens_per_step,
                   "tokens_per_s": len(losses) * tokens_per_step / elapsed, "grad_norm": grad_norm,
                   "elapsed_s": elapsed, **extra}
            records.append(rec)
            if log is not None:
                log.write(json.dumps(rec) + "\n")
                log.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}")
            if (cfg.save_every and step % cfg.save_every == 0) or step == stop:
                last = save(step)
    finally:
        bar.close()
        if log is not None:
            log.close()
    if layout.is_main:
        plot_metrics(metrics_path, out / "loss.png")
    return PretrainResult(out, step, losses, records, last, n_params)

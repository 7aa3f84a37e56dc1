"""Fine-tuning: LoRA, QLoRA (LoRA over a frozen quantized base) or full, one plain single-device loop.

What is applied to the model happens from outside it (torchtitan style): LoRA by module swap (models/lora.py), run
through one fused autograd node per layer (train/lora.py fuse_lora: a quantized base stays blocks), activation
checkpointing by wrapping each block's forward, document masking for packed rows by pre-hooks (packed_forward). The
loop is: next micro-batches -> loss summed over target tokens / targets in the window -> backward -> clip -> AdamW
-> warm-up + cosine LR. What the user leaves unset (row length, micro-batch, learning rate) is chosen from the data,
method and rank by plan.py and printed with its reasons before training; after it, answers.py checks exact answers.
Everything that decides the next step (weights, optimizer, scheduler, torch RNG, data position) is in the checkpoint,
so a resumed run on the CPU reproduces the losses of an uninterrupted one bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

from herd.errors import ConfigError
from herd.train import checkpoint as ckpt_io
from herd.train.answers import AnswerCheck, check_answers, questions, sample
from herd.train.data import IGNORE, Batch, DataSummary, PackedData, load_examples
from herd.train.loss import loss_head
from herd.train.plan import MAX_AUTO_SEQ_LEN, Plan, choose_seq_len, make_plan, resolved


@dataclass
class FinetuneConfig:
    method: str = "lora"  # lora | qlora | full
    rank: int = 16
    alpha: float = 32.0
    targets: str | list = "wq,wk,wv,wo,w1,w2,w3"
    dropout: float = 0.0
    quant: str = "q4_1"  # QLoRA over a float base: the scheme its linear layers are quantized to
    lr: float | None = None  # default: plan.default_lr (1e-3 for LoRA/QLoRA rank 16, alpha 32; 2e-5 full)
    weight_decay: float = 0.0
    warmup: int | None = None  # warm-up steps; default 5% of the run
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    epochs: int = 1
    steps: int | None = None  # optimizer steps; overrides epochs
    batch_tokens: int | None = None  # tokens per micro-batch (rows of seq_len); default: from the data (plan.py)
    grad_accum: int = 1
    seq_len: int | None = None  # packed row length; default: the longest example rounded up to 64, at most 512
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 0  # steps between evaluations (0: at the end only)
    save_every: int = 0  # steps between checkpoints (0: at the end only)
    keep_checkpoints: int = 2
    activation_checkpointing: bool = False
    over_long: str = "truncate"  # or "drop"
    dtype: str = "float32"  # of the base weights; LoRA weights are float32
    compute: str | None = None  # LoRA/QLoRA: the frozen base's GEMMs in float32 or bfloat16 (bf16 inputs, float32
    # accumulation; the adapter, the loss and the gradients stay float32), train/lora.py fuse_lora. None: float32 for
    # LoRA (a float base's arithmetic); for QLoRA bfloat16 where the CPU has bf16 dot products, as QLoRA computes
    progress: bool = True
    stop_at: int | None = None  # stop after this step as if interrupted (the schedule still plans the whole run)
    check_samples: int = 32  # training prompts asked at the end when there is no eval data (the eval data: all of
    # its rows); 0: no answer check

    def checked(self) -> "FinetuneConfig":
        if self.method not in ("lora", "qlora", "full"):
            raise ConfigError(f"method must be lora, qlora or full, got {self.method!r}")
        for name in ("rank", "epochs", "batch_tokens", "grad_accum", "seq_len", "steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.compute not in (None, "float32", "bfloat16"):
            raise ConfigError(f"compute must be float32 or bfloat16, got {self.compute!r}")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.check_samples < 0:
            raise ConfigError(f"check_samples must be >= 0, got {self.check_samples}")
        if self.batch_tokens is not None and self.seq_len is not None and self.batch_tokens < self.seq_len:
            raise ConfigError(f"batch_tokens ({self.batch_tokens}) must hold at least one row of seq_len "
                              f"({self.seq_len})")
        return self


@dataclass
class FinetuneResult:
    out: Path
    steps: int
    losses: list[float]  # train loss of every step run in this call
    eval_losses: list[tuple[int, float]]
    summary: DataSummary
    eval_summary: DataSummary | None = None
    metrics: list[dict] = field(default_factory=list)
    plan: Plan | None = None
    check: AnswerCheck | None = None  # exact answers after a completed run (None: not run)


# -- applied from outside the model ----------------------------------------------------------------------------

def apply_activation_checkpointing(model) -> None:
    """Recompute each block's activations in the backward pass instead of keeping them."""
    for block in model.layers:
        inner = block.forward
        block.forward = lambda *a, _f=inner, **k: checkpoint(_f, *a, use_reentrant=False, **k)


@contextlib.contextmanager
def packed_forward(model, doc: torch.Tensor, keep: torch.Tensor | None = None):
    """Hooks for one forward over packed rows, applied from outside the model.

    Each block receives the model's causal masks (built from positions, which restart at 0 for each example) as its
    5th argument, a (global, chunked) pair of (B, 1, T, S) booleans: AND them with 'same document' so that packed
    examples do not see each other. With keep (B, T) bool, the output layer sees only the kept positions, so the
    model returns logits (N, V) for those alone (the vocabulary projection is the costliest matmul of small models).
    """
    T = doc.shape[1]
    chunk = model.config.attention_chunk_size
    if bool((doc == doc[:, :1]).all()) and not (chunk and chunk < T):
        # every row one example (positions 0..T-1): the model's masks are plain causal ones, which attention
        # computes without any mask over half the (T, T) blocks; None says so (llama.Attention)
        same = None
    else:
        same = doc[:, None, :, None] == doc[:, None, None, :]  # (B, 1, T, T)
    made: list = []  # [the model's mask pair of this forward, the combined pair as additive float masks]

    def mask_hook(_module, args):
        # made once per forward and shared by every block: attention keeps its mask for the backward pass, as a
        # float copy of a boolean one, so per-block masks would cost L x (B, T, T) float32 (120 MB at L 30, T 1,024);
        # -inf where masked is what attention itself turns a boolean mask into
        pair = args[4]
        if same is None:
            return args[:4] + ((None, None),) + args[5:]
        if not made or made[0] is not pair:
            made[:] = [pair, tuple(torch.zeros(m.shape, dtype=args[0].dtype, device=m.device)
                                   .masked_fill_(~(m & same), float("-inf")) for m in pair)]
        return args[:4] + (made[1],) + args[5:]

    handles = [block.register_forward_pre_hook(mask_hook) for block in model.layers]
    if keep is not None:
        handles.append(model.output.register_forward_pre_hook(lambda _m, args: (args[0][keep],) + args[1:]))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def batch_loss_sum(model, b: Batch) -> torch.Tensor:
    """Summed cross entropy over the batch's target tokens, a chunk of them at a time (loss.py: the (N, V) logits
    never exist at once)."""
    keep = b.labels != IGNORE  # (B, T)
    with packed_forward(model, b.doc, keep), loss_head(model.output, b.labels[keep]):
        return model(b.tokens, input_pos=b.pos)  # the output layer sees the target positions (N, D) only


@torch.no_grad()
def evaluate(model, data: PackedData) -> float:
    """Mean loss per target token over every batch of the data."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for b in data.epoch(0):
        total += float(batch_loss_sum(model, b))
        n += b.n_targets
    model.train(was_training)
    return total / max(n, 1)


def lr_lambda(warmup: int, total: int, min_ratio: float):
    """Linear warm-up to 1, then cosine down to min_ratio at the last step."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


# -- the model -------------------------------------------------------------------------------------------------

def prepare_model(model_path, cfg: FinetuneConfig):
    """Load the base and make the chosen parameters trainable: (LLM, trainable named parameters)."""
    from herd.api import load
    from herd.models.lora import apply_lora
    from herd.train.lora import (float_activations, fuse_lora, fuse_swiglu, is_gguf, quantize_base,
                                 quantized_base)

    # LoRA or QLoRA over a GGUF base: the file's own blocks as they are, no float copy of the base ever made; each
    # frozen layer dequantizes its blocks for the call at hand, forward and backward (herd/quant/linear.py), and the
    # tied output layer is dequantized inside the loss only. For LoRA this is the same base: the float weights it
    # would load are these blocks dequantized (tests/test_lora_fused.py). A float32 base only: a bf16 LoRA base is
    # the rounded copy it asks for
    gguf_blocks = is_gguf(model_path) and (cfg.method == "qlora" or (cfg.method == "lora" and cfg.dtype == "float32"))
    llm = load(model_path, cfg.dtype, keep_quantized=True) if gguf_blocks else load(model_path, cfg.dtype)
    model = llm.model
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        if gguf_blocks and cfg.method == "qlora":
            quantized_base(model)
        elif gguf_blocks:  # LoRA: a float GGUF has no blocks to keep, and that is fine
            float_activations(model)
        elif cfg.method == "qlora":  # a float base (HF, Meta) quantized to cfg.quant
            quantize_base(model, cfg.quant)
        apply_lora(model, cfg.rank, cfg.alpha, cfg.targets, cfg.dropout, seed=cfg.seed)
        fuse_lora(model, compute_dtype(cfg))
        fuse_swiglu(model)
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    model.train()
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}  # tied weights appear once
    return llm, named


def compute_dtype(cfg: FinetuneConfig) -> str:
    """The frozen base's GEMM dtype: cfg.compute, or its default (FinetuneConfig.compute)."""
    from herd.train.lora import native_bf16

    if cfg.compute is not None:
        return cfg.compute
    return "bfloat16" if cfg.method == "qlora" and native_bf16() else "float32"


# -- the loop --------------------------------------------------------------------------------------------------

def finetune(model, data, out, *, eval_data=None, resume: bool = False, config: FinetuneConfig | None = None,
             log=None, **options) -> FinetuneResult:
    """Fine-tune `model` (path or catalog name) on `data` (file(s)); write the adapter or model, metrics and plot
    to `out`. Options are FinetuneConfig fields. `log(line)` receives the chosen settings, their reasons and any
    warning before training (default: stderr when progress is on)."""
    cfg = (config or FinetuneConfig())
    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(FinetuneConfig)})
    if unknown:
        raise ConfigError(f"unknown fine-tuning options {unknown}")
    cfg = dataclasses.replace(cfg, **options).checked()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    llm, named = prepare_model(model, cfg)
    model_ = llm.model
    if log is None:
        log = (lambda line: print(line, file=sys.stderr, flush=True)) if cfg.progress else (lambda line: None)
    pad = llm.tokenizer.pad_id if llm.tokenizer.pad_id is not None else (llm.tokenizer.eos_id or 0)
    cap = cfg.seq_len or MAX_AUTO_SEQ_LEN
    examples, summary = load_examples(data, llm.tokenizer, llm.chat_format, cap, cfg.over_long)
    plan = make_plan(cfg, [len(e.ids) for e in examples],
                     lambda seq: PackedData(examples, seq, 1, cfg.seed, pad).n_batches(0),
                     lambda seq, rows: [PackedData(examples, seq, rows, cfg.seed, pad).n_batches(e)
                                        for e in range(cfg.epochs)])
    cfg = resolved(cfg, plan)
    log(f"data: {summary.line()}")
    if cfg.method != "full":
        log(f"base matmuls: {compute_dtype(cfg)}" + ("" if cfg.compute else " (default for the method and CPU)"))
    for line in plan.lines():
        log(line)
    rows, total, warmup = plan.rows_per_batch, plan.total_steps, plan.warmup
    train = PackedData(examples, cfg.seq_len, rows, cfg.seed, pad)
    evals, eval_summary = None, None
    if eval_data is not None:  # eval rows fit the eval examples (the training rows may be shorter)
        ev, eval_summary = load_examples(eval_data, llm.tokenizer, llm.chat_format, cap, cfg.over_long)
        ev_len = max(cfg.seq_len, choose_seq_len([len(e.ids) for e in ev], cap))
        evals = PackedData(ev, ev_len, max(1, cfg.batch_tokens // ev_len), None, pad)
        log(f"eval data: {eval_summary.line()}")

    decay = [p for n, p in named.items() if p.dim() >= 2]
    no_decay = [p for n, p in named.items() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(warmup, total, cfg.min_lr_ratio))
    step, epoch, index = 0, 0, 0
    ckpt_root = out / "checkpoints"
    metrics_path = out / "metrics.jsonl"
    if resume and (folder := ckpt_io.latest_checkpoint(ckpt_root)) is not None:
        trainable, opt_state, st = ckpt_io.load_checkpoint(folder)
        _check_same_run(st["config"], cfg, folder)
        missing = sorted(set(named) - set(trainable))
        if missing:
            raise ConfigError(f"{folder}: checkpoint lacks trainable tensors {missing[:4]}")
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(trainable[n])
        opt.load_state_dict(opt_state)
        sched.load_state_dict(st["scheduler"])
        torch.set_rng_state(st["rng"])
        step, epoch, index = st["step"], st["epoch"], st["index"]
        _truncate_metrics(metrics_path, step)
    elif metrics_path.exists():
        metrics_path.unlink()

    def save(step_):
        ckpt_io.save_checkpoint(ckpt_root, step_, {n: p for n, p in named.items()}, opt.state_dict(), {
            "step": step_, "epoch": epoch, "index": index, "scheduler": sched.state_dict(),
            "rng": torch.get_rng_state(), "config": dataclasses.asdict(cfg)}, keep=cfg.keep_checkpoints)

    bar = _progress(cfg.progress, total, step)
    losses, eval_losses, records = [], [], []
    t0, tokens_seen = time.perf_counter(), 0
    stop = min(total, cfg.stop_at) if cfg.stop_at else total
    with open(metrics_path, "a", encoding="utf-8") as log:
        if evals is not None and step == 0:  # the starting point of the eval curve
            rec = {"step": 0, "eval_loss": evaluate(model_, evals)}
            eval_losses.append((0, rec["eval_loss"]))
            log.write(json.dumps(rec) + "\n")
            records.append(rec)
        while step < stop:
            window = []
            for _ in range(cfg.grad_accum):
                if index >= train.n_batches(epoch):
                    epoch, index = epoch + 1, 0
                window.append(train.epoch(epoch)[index])
                index += 1
            n_targets = max(1, sum(b.n_targets for b in window))
            loss_total = 0.0
            for b in window:
                loss = batch_loss_sum(model_, b) / n_targets
                loss.backward()
                loss_total += float(loss.detach())
                tokens_seen += int((b.doc >= 0).sum())
            grad_norm = float(torch.nn.utils.clip_grad_norm_(list(named.values()), cfg.grad_clip))
            lr = sched.get_last_lr()[0]
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            losses.append(loss_total)
            elapsed = time.perf_counter() - t0
            rec = {"step": step, "epoch": epoch, "loss": loss_total, "lr": lr, "grad_norm": grad_norm,
                   "tokens_per_s": tokens_seen / elapsed, "elapsed_s": elapsed}
            if evals is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step == total):
                rec["eval_loss"] = evaluate(model_, evals)
                eval_losses.append((step, rec["eval_loss"]))
            log.write(json.dumps(rec) + "\n")
            log.flush()
            records.append(rec)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_total:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")
            if (cfg.save_every and step % cfg.save_every == 0) or step == stop:
                save(step)
    bar.close()
    check = None
    if step == total:
        _write_result(llm, model, cfg, out)
        if eval_data is not None and cfg.check_samples:
            check = check_answers(llm, questions(eval_data), "the eval data")
        elif cfg.check_samples:
            qs = questions(data)
            check = check_answers(llm, sample(qs, cfg.check_samples, cfg.seed),
                                  f"{min(len(qs), cfg.check_samples)} training prompts (a sample; nothing withheld)")
    plot_metrics(metrics_path, out / "loss.png")
    (out / "summary.json").write_text(json.dumps({
        "train": dataclasses.asdict(summary), "eval": dataclasses.asdict(eval_summary) if eval_summary else None,
        "steps": step, "total_steps": total, "settings": {k: getattr(cfg, k) for k in (
            "method", "rank", "alpha", "lr", "seq_len", "batch_tokens", "grad_accum", "epochs", "warmup")},
        "plan": plan.lines(),
        "answer_check": None if check is None else {"source": check.source, "asked": check.asked,
                                                    "exact": check.exact}}, indent=2), encoding="utf-8")
    return FinetuneResult(out, step, losses, eval_losses, summary, eval_summary, records, plan, check)


def _check_same_run(saved: dict, cfg: FinetuneConfig, folder: Path) -> None:
    """A resume must continue the same run: every field that changes the math must match."""
    free = {"progress", "stop_at", "save_every", "keep_checkpoints", "eval_every", "check_samples"}
    now = dataclasses.asdict(cfg)
    default = dataclasses.asdict(FinetuneConfig())  # a field added since the checkpoint was written: its default
    diff = sorted(k for k in now if k not in free and saved.get(k, default[k]) != now[k])
    if diff:
        raise ConfigError(f"{folder}: cannot resume with changed settings "
                          + ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in diff))


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric records past the checkpoint being resumed (they will be recomputed)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")


def _progress(enabled: bool, total: int, initial: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)


def _write_result(llm, model_path, cfg: FinetuneConfig, out: Path) -> None:
    """LoRA: the adapter in the PEFT layout; full: an HF folder with the tokenizer."""
    if cfg.method == "full":
        from herd.formats.convert import copy_tokenizer as _copy_tokenizer
        from herd.formats import save_hf

        tok = llm.tokenizer
        sd = {k: v.detach() for k, v in llm.model.state_dict().items()}
        save_hf(out, llm.config, sd, bos_id=tok.bos_id, eos_id=tok.eos_id)
        _copy_tokenizer(llm.checkpoint, out, "hf")
    else:
        from herd.formats.peft import save_adapter

        save_adapter(llm.model, out, base_model=str(llm.source))


def plot_metrics(metrics_path: Path, png: Path) -> None:
    """Train and eval loss against step, as a PNG."""
    if not metrics_path.exists():
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4))
    tr = [r for r in recs if "loss" in r]
    ax.plot([r["step"] for r in tr], [r["loss"] for r in tr], label="train loss")
    ev = [r for r in recs if "eval_loss" in r]
    if ev:
        ax.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)

"""The settings a fine-tuning run leaves to herd, chosen from the data, the method and the rank, each with its reason.

The one idea: what teaches a model a small set of facts is the number of optimizer updates, not the tokens per
update. 48 short question/answer pairs packed into 4,096-token micro-batches make ~1 step per epoch, and ten epochs
of that at lr 2e-4 taught SmolLM2-135M nothing (issue 13); the same data in batches of ~8 examples at lr 1e-3 (the
usual transformers + peft settings) taught it every fact. So:
- seq_len: the longest example rounded up to 64 tokens, at most 512 (the old fixed default), so that short examples
  are not packed eight to a row, which would fix the smallest micro-batch at ~8 examples;
- micro-batch: the largest (up to 4,096 tokens, the default for large data) that still gives TARGET_STEPS optimizer
  steps over the run, and never under MIN_BATCH_TOKENS (one or two examples per update is mostly noise);
- learning rate: LoRA's update to W is scale * B @ A with scale = alpha / rank; with Adam every entry of A and B moves
  ~lr per step, so the update grows like lr * alpha / sqrt(rank) (the rank-stabilised LoRA analysis). The rule keeps
  that product where 1e-3 sits for rank 16, alpha 32: lr = 8e-3 * sqrt(rank) / alpha. QLoRA trains the same adapter
  over a frozen quantized copy of the base and takes the same rule; full fine-tuning moves every weight, 2e-5;
- a run of fewer than MIN_STEPS optimizer steps is warned about before it starts.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from herd.errors import ConfigError

TARGET_STEPS = 100  # optimizer steps the automatic micro-batch aims for
MIN_STEPS = 50  # below this, warn before training
MAX_BATCH_TOKENS = 4096  # the micro-batch of large data sets (the old fixed default)
MIN_BATCH_TOKENS = 256  # the smallest automatic micro-batch
MAX_AUTO_SEQ_LEN = 512  # the automatic row length never exceeds the old fixed default
SEQ_LEN_GRANULE = 64
FULL_LR = 2e-5


def default_lr(method: str, rank: int, alpha: float) -> tuple[float, str]:
    """(peak learning rate, why) for a method and LoRA rank/alpha."""
    if method == "full":
        return FULL_LR, "full fine-tuning: every weight moves, a small step"
    lr = 8e-3 * math.sqrt(rank) / alpha
    kind = "QLoRA (a LoRA adapter over a frozen quantized base)" if method == "qlora" else "LoRA"
    return lr, f"{kind}: 8e-3 * sqrt(rank {rank}) / alpha {alpha:g}, i.e. 1e-3 at rank 16, alpha 32"


@dataclass
class Plan:
    """The resolved settings of a run and the reasons for those herd chose."""

    seq_len: int
    rows_per_batch: int
    lr: float
    total_steps: int
    steps_per_epoch: float
    warmup: int
    reasons: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def batch_tokens(self) -> int:
        return self.rows_per_batch * self.seq_len

    def lines(self) -> list[str]:
        return self.reasons + [f"warning: {w}" for w in self.warnings]


def choose_seq_len(lengths: list[int], cap: int = MAX_AUTO_SEQ_LEN) -> int:
    """The longest example rounded up to SEQ_LEN_GRANULE, at most cap."""
    longest = max(lengths)
    return min(cap, SEQ_LEN_GRANULE * math.ceil(longest / SEQ_LEN_GRANULE))


def choose_rows(rows_per_epoch: int, epochs: int, grad_accum: int, seq_len: int, steps: int | None) -> int:
    """Rows per micro-batch: as many as still give TARGET_STEPS optimizer steps, within the token bounds."""
    hi = max(1, MAX_BATCH_TOKENS // seq_len)
    lo = min(hi, max(1, math.ceil(MIN_BATCH_TOKENS / seq_len)))
    if steps is not None:  # the number of updates is fixed: give each the largest batch
        return hi
    return max(lo, min(hi, (rows_per_epoch * epochs) // (TARGET_STEPS * grad_accum)))


def make_plan(cfg, lengths: list[int], rows_per_epoch, batches_per_epoch) -> Plan:
    """Resolve cfg's automatic settings (None fields) for data with these example lengths.

    rows_per_epoch(seq_len) -> packed rows of the first epoch at that row length (packing depends on it);
    batches_per_epoch(seq_len, rows) -> micro-batches of each epoch (each epoch's shuffle packs a little differently).
    """
    reasons = []
    if cfg.seq_len is None:
        seq_len = choose_seq_len(lengths)
        reasons.append(f"seq_len {seq_len}: the longest example has {max(lengths)} tokens (rounded up to "
                       f"{SEQ_LEN_GRANULE}, at most {MAX_AUTO_SEQ_LEN})")
    else:
        seq_len = cfg.seq_len
    n_rows = rows_per_epoch(seq_len)
    if cfg.batch_tokens is None:
        rows = choose_rows(n_rows, cfg.epochs, cfg.grad_accum, seq_len, cfg.steps)
        why = ("--steps fixes the number of updates, so each takes the largest micro-batch" if cfg.steps else
               f"{n_rows} rows per epoch x {cfg.epochs} epoch(s) / {TARGET_STEPS} target steps, within "
               f"{MIN_BATCH_TOKENS}..{MAX_BATCH_TOKENS} tokens")
        reasons.append(f"micro-batch {rows} row(s) x {seq_len} = {rows * seq_len} tokens: {why}")
    else:
        if cfg.batch_tokens < seq_len:
            raise ConfigError(f"batch_tokens ({cfg.batch_tokens}) must hold at least one row of seq_len ({seq_len})")
        rows = cfg.batch_tokens // seq_len
    if cfg.lr is None:
        lr, why = default_lr(cfg.method, cfg.rank, cfg.alpha)
        reasons.append(f"lr {lr:.3g}: {why}")
    else:
        lr = cfg.lr
    batches = batches_per_epoch(seq_len, rows)
    per_epoch = sum(batches) / len(batches) / cfg.grad_accum
    total = cfg.steps or math.ceil(sum(batches) / cfg.grad_accum)
    warmup = cfg.warmup if cfg.warmup is not None else max(1, round(0.05 * total))
    reasons.append(f"{total} optimizer steps ({per_epoch:.3g} per epoch), warm-up {warmup}, cosine to "
                   f"{cfg.min_lr_ratio:g} x lr")
    warnings = []
    if total < MIN_STEPS:
        need = math.ceil(MIN_STEPS / max(per_epoch, 1e-9))
        warnings.append(f"only {total} optimizer step(s): a fine-tune this short usually learns little; give "
                        f"--epochs {need} or more (or --steps, or a smaller --batch-tokens)")
    return Plan(seq_len, rows, lr, total, per_epoch, warmup, reasons, warnings)


def resolved(cfg, plan: Plan):
    """cfg with every automatic field replaced by the plan's value (what checkpoints record)."""
    return dataclasses.replace(cfg, seq_len=plan.seq_len, batch_tokens=plan.batch_tokens, lr=plan.lr,
                               warmup=plan.warmup)

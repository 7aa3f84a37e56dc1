"""`herd distill`: train a student on (1-A)*CE + A*T^2*KL(teacher || student), the teacher's logits computed on the fly.

The student is a preset / JSON shape (seeded init), a checkpoint herd loads, or pruned from a model (Minitron:
Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge Distillation"; Sreenivas et al. 2024):
  depth  keep L of N layers: the first L-1 and the last. Minitron's depth study found the first and last blocks the
         most important and dropping one contiguous run of late-middle blocks the least harmful.
  width  keep F of each MLP's hidden channels: those of largest mean |silu(w1 x) * w3 x| (activation importance) over
         calibration tokens of the training data, in their original order (w1, w3 rows and w2 columns).
The teacher is any model herd loads, held whole by every rank in float32, never sharded: each data-parallel rank
runs it on its own slice. Its logits are produced a chunk of tokens at a time (its output layer is detached and
applied per chunk), and the KL is summed per chunk, so the teacher side never holds more than (chunk, V) logits.
Everything else (layouts, checkpoints, resume, metrics) is pretrain.py's loop.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from herd.errors import ConfigError
from herd.train import parallel
from herd.train.pretrain import PretrainConfig, PretrainResult, _resume_point, init_weights, run
from herd.train.presets import model_config
from herd.train.shards import TokenData

CHUNK = 256  # tokens per teacher-logit chunk: (256, V) float32 = 48 MiB at V = 49,152


@dataclass
class DistillConfig(PretrainConfig):
    student: str | None = None  # preset, JSON file, or checkpoint
    prune_from: str | None = None
    prune_depth: int | None = None
    prune_width: int | None = None
    kd_ratio: float = 0.5
    temperature: float = 1.0
    lr: float = 3e-4
    calib_tokens: int = 4096  # tokens of the data that rank the MLP channels for --prune-width

    def checked(self) -> "DistillConfig":
        super().checked()
        if (self.student is None) == (self.prune_from is None):
            raise ConfigError("distill needs exactly one of --student or --prune-from")
        if self.prune_from is None and (self.prune_depth or self.prune_width):
            raise ConfigError("--prune-depth / --prune-width need --prune-from")
        if not 0.0 <= self.kd_ratio <= 1.0:
            raise ConfigError(f"--kd-ratio must be in [0, 1], got {self.kd_ratio}")
        if not self.temperature > 0:
            raise ConfigError(f"--temperature must be positive, got {self.temperature}")
        return self


# -- the student -------------------------------------------------------------------------------------------------

def _float_checkpoint(path):
    from herd.formats import load_checkpoint
    from herd.hub import resolve

    ckpt = load_checkpoint(resolve(str(path)), torch.float32, with_tokenizer=False)
    ckpt.state_dict.pop("rope.freqs", None)
    return ckpt.config, ckpt.state_dict


def load_float_model(path) -> nn.Module:
    """Any checkpoint herd loads as a plain float32 Transformer (no tokenizer or chat format needed)."""
    from herd.formats import load_checkpoint
    from herd.hub import resolve
    from herd.models.llama import build_model

    ckpt = load_checkpoint(resolve(str(path)), torch.float32, with_tokenizer=False)
    divisors = ckpt.state_dict.pop("rope.freqs", None)  # a GGUF's own RoPE divisors, applied as herd.api.load does
    model = build_model(ckpt.config, ckpt.state_dict)
    if divisors is not None:
        model.set_inv_freq(model.inv_freq / divisors.float().reshape(-1))
    return model


def prune_depth(config, sd: dict, keep: int):
    """Keep the first keep-1 layers and the last one, renumbered."""
    n = config.n_layers
    if not 1 <= keep <= n:
        raise ConfigError(f"--prune-depth {keep}: the model has {n} layers (keep 1 to {n})")
    layers = list(range(keep - 1)) + [n - 1]
    out = {k: v for k, v in sd.items() if not k.startswith("layers.")}
    for new, old in enumerate(layers):
        prefix = f"layers.{old}."
        out.update({f"layers.{new}." + k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})
    return config.replace(n_layers=keep), out


@torch.no_grad()
def mlp_importance(model, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, (F,) mean |silu(w1 x) * w3 x| over the tokens (b, T): Minitron's activation importance."""
    scores, hooks = [], []
    for block in model.layers:
        ff = block.feed_forward
        acc = torch.zeros(ff.w1.out_features)
        scores.append(acc)

        def hook(mod, args, _acc=acc):
            x = args[0]
            a = (F.silu(mod.w1(x)) * mod.w3(x)).abs().reshape(-1, _acc.numel())
            _acc += a.sum(0)
        hooks.append(ff.register_forward_pre_hook(hook))
    try:
        model(tokens)
    finally:
        for h in hooks:
            h.remove()
    return [s / tokens.numel() for s in scores]


def prune_width(config, sd: dict, width: int, calib: torch.Tensor):
    """Keep the `width` most important MLP channels of every layer (by activation on calib (b, T))."""
    from herd.models.llama import build_model

    if not 1 <= width <= config.ffn_dim:
        raise ConfigError(f"--prune-width {width}: the MLP hidden size is {config.ffn_dim} (keep 1 to it)")
    model = build_model(config, sd)
    scores = mlp_importance(model, calib)
    out = dict(sd)
    for i, s in enumerate(scores):
        keep = torch.sort(torch.topk(s, width).indices).values
        p = f"layers.{i}.feed_forward."
        out[p + "w1.weight"] = sd[p + "w1.weight"][keep].clone()
        out[p + "w3.weight"] = sd[p + "w3.weight"][keep].clone()
        out[p + "w2.weight"] = sd[p + "w2.weight"][:, keep].clone()
    return config.replace(ffn_dim=width), out


def build_student(cfg: DistillConfig, vocab_size: int, tokens: TokenData):
    """(model config, plain fp32 student model) from --student or --prune-from."""
    from herd.models.llama import Transformer, load_weights

    sd = None
    if cfg.prune_from is not None:
        mcfg, sd = _float_checkpoint(cfg.prune_from)
        if cfg.prune_width:
            n = max(1, min(cfg.calib_tokens, tokens.n_tokens) // cfg.seq_len)
            calib = torch.from_numpy(tokens.window(0, n * cfg.seq_len)).reshape(n, cfg.seq_len)
            mcfg, sd = prune_width(mcfg, sd, cfg.prune_width, calib)
        if cfg.prune_depth:
            mcfg, sd = prune_depth(mcfg, sd, cfg.prune_depth)
    else:
        try:
            mcfg = model_config(cfg.student, vocab_size)
        except ConfigError:
            if not Path(cfg.student).exists():
                raise
            mcfg, sd = _float_checkpoint(cfg.student)
    torch.manual_seed(cfg.seed)
    model = Transformer(mcfg)
    init_weights(model, cfg.seed)
    if sd is not None:
        load_weights(model, sd)
    for p in model.parameters():
        p.requires_grad_(True)
    model.train()
    return mcfg, model


# -- the loss ----------------------------------------------------------------------------------------------------

class Teacher:
    """A frozen model whose logits come a chunk of tokens at a time."""

    def __init__(self, model: nn.Module):
        self.model = model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.head = model.output

    @torch.no_grad()
    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The final normed hidden states (b, T, D): the model with its output layer swapped for identity."""
        self.model.output = nn.Identity()
        try:
            return self.model(x)
        finally:
            self.model.output = self.head


def kd_loss_fn(teacher: Teacher, kd_ratio: float, temperature: float, chunk: int = CHUNK):
    """loss_fn for pretrain.run: summed (1-A)*CE + A*T^2*KL(teacher || student) over the tokens, logging ce and kl."""
    def loss_fn(module, x, y):
        logits = module(x)  # (b, T, V)
        V = logits.shape[-1]
        s = logits.float().reshape(-1, V)  # (N, V)
        ce = F.cross_entropy(s, y.reshape(-1), reduction="sum")
        h = teacher.hidden(x).reshape(-1, teacher.model.config.dim)  # (N, D)
        kl = s.new_zeros(())
        for k in range(0, h.shape[0], chunk):
            with torch.no_grad():
                t = teacher.head(h[k:k + chunk]).float()[:, :V] / temperature  # (C, V)
                log_pt = F.log_softmax(t, dim=-1)
            log_ps = F.log_softmax(s[k:k + chunk] / temperature, dim=-1)
            kl = kl + (log_pt.exp() * (log_pt - log_ps)).sum()
        kl = kl * temperature ** 2
        loss = (1 - kd_ratio) * ce + kd_ratio * kl
        return loss, {"ce": float(ce.detach()), "kl": float(kl.detach())}
    return loss_fn


@torch.no_grad()
def agreement(teacher_model, student_model, tokens: torch.Tensor) -> dict:
    """Mean KL(teacher || student) per token and top-1 agreement on tokens (b, T), both models in eval mode."""
    t = F.log_softmax(teacher_model(tokens).float(), dim=-1)
    s = F.log_softmax(student_model(tokens).float()[..., :t.shape[-1]], dim=-1)
    kl = (t.exp() * (t - s)).sum(-1).mean()
    top1 = (t.argmax(-1) == s.argmax(-1)).float().mean()
    return {"kl": float(kl), "top1": float(top1)}


# -- the command -------------------------------------------------------------------------------------------------

def distill(teacher, data, out, *, resume: bool = False, resume_from=None, config: DistillConfig | None = None,
            **options) -> PretrainResult:
    """Distill `teacher` (any model herd loads) into a student on prepared shards `data`, into `out`."""
    unknown = sorted(set(options) - {f.name for f in dataclasses.fields(DistillConfig)})
    if unknown:
        raise ConfigError(f"unknown distillation options {unknown}")
    cfg = dataclasses.replace(config or DistillConfig(), **options).checked()
    out = Path(out)
    world, _, _ = parallel.env_world()
    _, tp, _ = parallel.check_layout(cfg.parallel, cfg.tp, world, cfg.batch_size, cfg.grad_accum)
    tokens = TokenData(data)
    t_model = load_float_model(teacher)
    if t_model.config.vocab_size < tokens.vocab_size:
        raise ConfigError(f"teacher {teacher}: vocabulary {t_model.config.vocab_size} is smaller than the data's "
                          f"tokenizer ({tokens.vocab_size}); prepare the data with the teacher's tokenizer")
    mcfg, student = build_student(cfg, t_model.config.vocab_size, tokens)
    if mcfg.vocab_size != t_model.config.vocab_size:
        raise ConfigError(f"teacher and student vocabularies differ: teacher {t_model.config.vocab_size}, student "
                          f"{mcfg.vocab_size} (the KL compares distributions over the same tokens)")
    if cfg.seq_len > min(mcfg.max_seq_len, t_model.config.max_seq_len):
        raise ConfigError(f"--seq-len {cfg.seq_len} exceeds the student's or teacher's context")
    start = _resume_point(out / "checkpoints", resume, resume_from, cfg, mcfg)
    if tp > 1:  # heads and MLP width must split over the TP ranks: refused here, on every rank
        parallel.check_tp_shape(mcfg, tp)
    layout = parallel.setup(cfg.parallel, cfg.tp, cfg.batch_size, cfg.grad_accum)
    try:
        t_model.to(layout.device)
        loss_fn = kd_loss_fn(Teacher(t_model), cfg.kd_ratio, cfg.temperature)
        return run(tokens, out, cfg, mcfg, layout, start, student, loss_fn)
    finally:
        parallel.teardown(layout)

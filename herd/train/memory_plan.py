"""`herd pretrain --plan`: per-GPU memory and step time of pretraining a Llama shape on nodes of GPUs, from arithmetic
alone (no GPU, no data, no torch).

The one idea: at the peak of a step (the start of the backward pass) a GPU holds its shard of the training state, the
activations every layer kept for the backward pass, and the larger of two transients that never coexist: the
logits and their loss gradients, or one layer's recomputed activations with their gradients. FSDP's gathered copies
and a fragmentation allowance come on top. Time is FLOPs (recompute included) at an assumed utilization of the peak,
plus the communication that cannot hide behind it.

Assumptions (each also printed by `MemoryPlan.lines()`):
- the layout is herd's (parallel.py): FSDP2 shards each block and the root (embedding, output, final norm) over the
  data-parallel ranks; FSDP+TP splits wq/wk/wv/w1/w3 column-wise and wo/w2 row-wise over the TP ranks, with no
  sequence parallelism, so norms, the residual stream, the embedding and the output layer are replicated over TP;
- mixed precision as herd's FSDP bfloat16: fp32 sharded master parameters and gradients, bf16 gathered copies and
  activations, fp32 reduce-scatter; AdamW's two moments in fp32 (16 bytes per parameter, sharded);
- attention runs in a fused kernel (flash / memory-efficient): no T x T scores are kept; GQA's K and V are expanded
  to all heads before it (repeat_interleave, as herd and torchtitan do) and the kernel keeps q, k, v, out, logsumexp;
- RMSNorm is the eager fp32 one (herd, Meta, torchtitan): it keeps its fp32 upcast input and its bf16 output;
- selective checkpointing is torchtitan's op-level policy (keep every matmul output but every second one, and the
  attention output; recompute the rest); herd's trainer itself does none or full (each block recomputed);
- the loss is herd's chunked linear cross entropy (loss.py: no logits held) or, as torchtitan's train.py did,
  eager F.cross_entropy on fp32-cast logits (peak 12 bytes per vocabulary entry per token at the start of backward);
- FSDP2 keeps two blocks gathered (running + prefetched), one block's unsharded gradients in bf16 and fp32 for the
  reduce-scatter, and the root gathered from its forward to the end of backward (FSDP2 does not reshard the root);
- the caching allocator reserves ALLOWANCE more than the peak of live tensors (fragmentation); CUDA context, NCCL and
  cuBLAS take CONTEXT_GIB outside it. The total is comparable to torch.cuda.max_memory_reserved();
- FLOPs per token as torchtitan counts them: 6 x matmul parameters + 12 x L x H x hd x T (attention, causal mask
  not discounted, flash's backward recompute not counted) + the recompute of activation checkpointing; `mfu` is the
  fraction of the GPU's dense bf16 peak those FLOPs run at;
- FSDP collectives overlap compute except the first all-gather and the last reduce-scatter; TP all-reduces do not
  overlap (herd has no async TP); ring volumes 2(n-1)/n S (all-reduce) and (n-1)/n S (all-gather, reduce-scatter)
  at achievable bus bandwidths, NVLink inside a node, the per-GPU InfiniBand link across nodes;
- the optimizer step (AdamW + clipping, foreach) streams 32 bytes per local parameter through HBM.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from herd.errors import ConfigError

GiB = 1 << 30
ALLOWANCE = 0.10  # caching-allocator reserve over the live peak (reserved - allocated), a typical gap under FSDP
CONTEXT_GIB = 1.0  # CUDA context + NCCL + cuBLAS workspaces, outside PyTorch's allocator
LOSS_CHUNK_ELEMS = 1 << 23  # herd.train.loss.CHUNK_ELEMS (not imported: this module stays free of torch)
ADAMW_BYTES = 32  # HBM bytes per local parameter of one AdamW + clipping step: read p g m v, write p m v, norm of g
LAYOUTS = ("fsdp", "fsdp+tp")
AC_MODES = ("none", "selective", "full")
LOSSES = ("chunked", "eager")


@dataclass(frozen=True)
class GPU:
    name: str
    peak_flops: float  # dense bf16 FLOP/s
    memory_gib: float  # what a process can allocate
    hbm: float  # memory bandwidth, bytes/s
    nvlink: float  # achievable collective bus bandwidth inside a node, bytes/s per GPU
    ib: float  # achievable bus bandwidth across nodes, bytes/s per GPU


# NVLink 4: 18 links x 25 GB/s = 450 GB/s each way, NCCL reaches ~80% of it; InfiniBand NDR 400 Gb/s = 50 GB/s per GPU,
# ~90% reached. Usable memory: nvidia-smi's 81,559 MiB (H100 80 GB) and 143,771 MiB (H200).
GPUS = {
    "h100": GPU("H100 SXM 80 GB HBM3", 989e12, 79.6, 3.35e12, 360e9, 45e9),
    # torchtitan's benchmark hosts (Grand Teton): H100 with 96 GB HBM2e at 2.4 TB/s, run at 500 W; their MFU uses the
    # SXM peak though "the actual peak TFLOPs number is between SXM and NVL". Usable memory assumed ~94.5 GiB.
    "h100-96gb": GPU("H100 96 GB HBM2e (torchtitan's Grand Teton, 500 W)", 989e12, 94.5, 2.4e12, 360e9, 45e9),
    "h200": GPU("H200 SXM 141 GB HBM3e", 989e12, 140.4, 4.8e12, 360e9, 45e9),
}


@dataclass
class MemoryPlan:
    """The estimate: memory items (label, bytes, how), times, and the lines `herd pretrain --plan` prints."""

    header: list[str]
    memory: list[tuple[str, float, str]]  # summed into the live peak
    aside: tuple[str, float, str]  # the transient that does not coexist with the peak's larger one
    live: float  # bytes of live tensors at the peak
    reserved: float  # live + allowance
    needed: float  # reserved + context
    usable: float
    time_lines: list[str]
    step_s: float
    tokens_per_s_per_gpu: float
    mfu: float  # model FLOPs (no recompute) per second / peak, torchtitan's definition
    flops_per_token: float  # model FLOPs per token (torchtitan's formula)
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.needed <= self.usable

    def item(self, label: str) -> float:
        return dict((k, v) for k, v, _ in self.memory + [self.aside])[label]

    def lines(self) -> list[str]:
        row = "  {:<15}{:<62}{:>8}".format
        out = list(self.header) + ["", f"{'per-GPU memory':<79}{'GiB':>8}"]
        for label, n, how in self.memory:
            out.append(row(label, how, f"{n / GiB:.2f}"))
        label, n, how = self.aside
        out.append(row(label, how + " (not added)", f"({n / GiB:.2f})"))
        out.append(row("allowance", f"{ALLOWANCE:.0%} of the live tensors: allocator fragmentation",
                       f"{(self.reserved - self.live) / GiB:.2f}"))
        out.append(row("total", "what torch.cuda.max_memory_reserved() would show", f"{self.reserved / GiB:.2f}"))
        out.append(row("+ outside", "CUDA context, NCCL, cuBLAS (assumed)",
                       f"{(self.needed - self.reserved) / GiB:.2f}"))
        verdict = "fits" if self.fits else "DOES NOT FIT"
        out.append(f"  {verdict}: {self.needed / GiB:.1f} of {self.usable / GiB:.1f} GiB usable "
                   f"({self.needed / self.usable:.0%})")
        out += ["", "step time"] + [f"  {s}" for s in self.time_lines]
        out += [f"note: {s}" for s in self.notes]
        out += ["assumptions:"] + [f"  - {s}" for s in ASSUMPTIONS]
        return out


def _block_params(c, tp: int) -> tuple[int, int]:
    """(linear weights of one block on one TP rank, norm weights of one block)."""
    d, a, kd = c.dim, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    return (d * a + 2 * d * kd + a * d + 3 * d * c.ffn_dim) // tp, 2 * d


def _root_params(c) -> int:
    """Embedding, output layer (unless tied) and final norm: FSDP's root unit, replicated over TP in herd."""
    return c.vocab_size * c.dim * (1 if c.tie_embeddings else 2) + c.dim


def count_params(c) -> int:
    """All parameters of a dense Llama shape."""
    lin, norms = _block_params(c, 1)
    return c.n_layers * (lin + norms) + _root_params(c)


def layer_activation_bytes(c, mode: str, tp: int, act: int) -> float:
    """Bytes one block keeps per token for its backward pass; act = bytes per activation element (2 bf16, 4 fp32).

    D dim, A = H*hd, Kd = KV*hd, F ffn width; tensors split over TP are /tp, the residual stream is replicated.
      none:      2 norms x (fp32 input 4D + output aD) + qkv input aD + attention q, out 2aA and k, v 2aKd (the
                 KV heads as they are: causal attention without a mask takes them through SDPA's enable_gqa)
                 + logsumexp 4H + w1/w3 input aD + silu in/out, w3 out, w2 input 4aF (wo's input is a view of the
                 attention output: the kernels write it (B, T, H, hd)-contiguous)
      selective: block input aD + outputs of wq aA, wv aKd, attention aA (+ logsumexp 4H), w1 aF, w2 aD
                 (the 1st, 3rd, 5th, 7th matmuls; wk, wo, w3 and all elementwise ops are recomputed)
      full:      block input aD
    """
    d, h, f = c.dim, c.n_heads, c.ffn_dim
    a_, kd = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    if mode == "none":
        return 2 * (4 * d + act * d + 4) + 2 * act * d + 2 * act * (a_ + kd) / tp + 4 * h / tp + 4 * act * f / tp
    if mode == "selective":
        return 2 * act * d + act * (2 * a_ + kd + f) / tp + 4 * h / tp
    if mode == "full":
        return act * d
    raise ConfigError(f"--activation-checkpointing must be one of {', '.join(AC_MODES)}, got {mode!r}")


def flops_per_token(c, seq_len: int) -> float:
    """Model FLOPs per token, torchtitan's formula: 6 x (matmul parameters) + 12 x L x H x hd x T."""
    lin, _ = _block_params(c, 1)
    return 6 * (c.n_layers * lin + c.vocab_size * c.dim) + 12 * c.n_layers * c.n_heads * c.head_dim * seq_len


def recompute_flops_per_token(c, mode: str, seq_len: int) -> float:
    """Forward FLOPs redone in the backward pass: full redoes every block; selective the matmuls it did not keep."""
    d, kd, a_ = c.dim, c.n_kv_heads * c.head_dim, c.n_heads * c.head_dim
    if mode == "full":
        lin, _ = _block_params(c, 1)
        return c.n_layers * (2 * lin + 4 * c.n_heads * c.head_dim * seq_len)
    if mode == "selective":
        return c.n_layers * 2 * (d * kd + a_ * d + d * c.ffn_dim)  # wk, wo, w3
    return 0.0


def _load_config(model_config):
    from herd.train.presets import model_config as resolve

    if isinstance(model_config, str) and model_config == "debug":
        raise ConfigError("--plan needs a model shape: the debug preset takes its vocabulary from the data "
                          "(give an official preset or a JSON file)")
    return resolve(model_config) if isinstance(model_config, (str, dict)) or hasattr(model_config, "__fspath__") \
        else model_config


def plan_pretrain(model_config, *, batch_size: int, seq_len: int, nodes: int = 1, gpus_per_node: int = 8,
                  parallel: str | None = None, tp: int | None = None, grad_accum: int = 1, dtype: str = "bfloat16",
                  activation_checkpointing: str = "none", gpu: str = "h100", mfu: float = 0.40,
                  loss: str = "chunked") -> MemoryPlan:
    """Per-GPU memory and step time of `herd pretrain` for a preset name, JSON file or ModelConfig; batch_size is the
    GLOBAL batch (sequences per optimizer step)."""
    c = _load_config(model_config)
    name = model_config if isinstance(model_config, str) else "custom shape"
    if gpu not in GPUS:
        raise ConfigError(f"unknown --gpu {gpu!r}: expected one of {', '.join(GPUS)}")
    g = GPUS[gpu]
    for label, v in (("--nodes", nodes), ("--gpus-per-node", gpus_per_node), ("--batch-size", batch_size),
                     ("--seq-len", seq_len), ("--grad-accum", grad_accum)):
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"{label} must be an integer >= 1, got {v!r}")
    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu is a fraction of the GPU's peak, in (0, 1]; got {mfu}")
    if dtype not in ("bfloat16", "float32"):
        raise ConfigError(f"--dtype must be float32 or bfloat16, got {dtype!r}")
    if loss not in LOSSES:
        raise ConfigError(f"--loss-impl must be one of {', '.join(LOSSES)}, got {loss!r}")
    if activation_checkpointing not in AC_MODES:
        raise ConfigError(f"--activation-checkpointing must be one of {', '.join(AC_MODES)}, "
                          f"got {activation_checkpointing!r}")
    world = nodes * gpus_per_node
    parallel = parallel or ("fsdp" if tp in (None, 1) else "fsdp+tp")
    if parallel not in LAYOUTS:
        raise ConfigError(f"--plan covers --parallel {' and '.join(LAYOUTS)}, got {parallel!r}")
    if parallel == "fsdp":
        if tp not in (None, 1):
            raise ConfigError(f"--tp {tp} applies to --parallel fsdp+tp, not fsdp")
        tp = 1
    else:
        tp = tp or 2
        if tp < 2 or world % tp:
            raise ConfigError(f"world size {world} ({nodes} node(s) x {gpus_per_node}) is not divisible by the TP "
                              f"degree --tp {tp} (>= 2)")
        for key in ("n_heads", "n_kv_heads", "ffn_dim"):
            if getattr(c, key) % tp:
                raise ConfigError(f"tensor parallel degree {tp} does not divide the model's {key} "
                                  f"({getattr(c, key)})")
    dp = world // tp
    if batch_size % (dp * grad_accum):
        raise ConfigError(f"global batch {batch_size} is not divisible by the data-parallel degree {dp} x "
                          f"grad_accum {grad_accum}: give a multiple of {dp * grad_accum}")
    b = batch_size // (dp * grad_accum)  # sequences per micro-batch on each data-parallel rank
    tokens = b * seq_len  # tokens of one micro-batch; every TP rank of a group sees all of them
    act = 2 if dtype == "bfloat16" else 4
    mode = activation_checkpointing
    L, D, V = c.n_layers, c.dim, c.vocab_size

    # -- memory -----------------------------------------------------------------------------------------------
    lin, norms = _block_params(c, tp)
    root = _root_params(c)
    per_rank = L * (lin + norms) + root  # parameters on one TP rank before FSDP sharding
    local = per_rank / dp  # FSDP shards everything over the dp ranks (FSDP2 pads each to a multiple; ignored)
    n_total = count_params(c)
    mem = [("parameters", 4 * local, f"fp32 master, {local / 1e9:.3f} B per GPU (1/{dp} of {per_rank / 1e9:.2f} B)"),
           ("gradients", 4 * local, "fp32, sharded like the parameters"),
           ("optimizer", 8 * local, "AdamW exp_avg + exp_avg_sq, fp32, sharded")]
    per_tok = layer_activation_bytes(c, mode, tp, act)
    mem.append(("activations", L * per_tok * tokens,
                f"{mode} AC: {per_tok / 1024:.1f} KiB/token/layer x {tokens:,} x {L}"))
    # transient A: the logits and their gradients at the start of the backward pass
    if loss == "eager":
        loss_bytes = 12 * V * tokens  # fp32 log-softmax (kept), its incoming gradient, the logits' gradient
        loss_how = f"eager fp32 cross entropy: 12 B x {V:,} x {tokens:,} tokens"
    else:
        loss_bytes = act * tokens * D + 4 * V * D + 3 * 4 * LOSS_CHUNK_ELEMS  # grad of h, fp32 grad of W, chunks
        loss_how = "chunked: grad of h, fp32 grad of the output, chunks"
    # transient B: one layer recomputed (AC) with its gradients, and the output layer's unsharded gradient
    recompute = layer_activation_bytes(c, "none", tp, act) if mode != "none" else 0.0
    work_bytes = tokens * (recompute + act * (2 * c.ffn_dim / tp + 2 * D)) + act * V * D
    work_how = ("one layer recomputed + its gradients + output grad" if mode != "none" else
                "one layer's gradients + the output layer's gradient")
    big, small = sorted([("logits + loss", loss_bytes, loss_how), ("backward work", work_bytes, work_how)],
                        key=lambda x: x[1], reverse=True)
    mem.append(big)
    fsdp_bytes = act * root + lin * (2 * act + act + (4 if act != 4 else 0))
    mem.append(("FSDP buffers", fsdp_bytes, "root gathered, 2 blocks gathered, 1 block's grads"))
    if grad_accum > 1:
        mem.append(("accum. grads", 4 * per_rank, "unsharded fp32 grads kept between micro-batches"))
    live = sum(n for _, n, _ in mem)
    reserved = live * (1 + ALLOWANCE)
    needed = reserved + CONTEXT_GIB * GiB
    usable = g.memory_gib * GiB

    # -- time -------------------------------------------------------------------------------------------------
    f_model = flops_per_token(c, seq_len)
    lin1, _ = _block_params(c, 1)
    attn = 12 * L * c.n_heads * c.head_dim * seq_len
    # per GPU: the blocks' matmuls and attention split over TP; the output layer is replicated over TP in herd
    f_gpu_tok = (6 * L * lin1 + attn) / tp + 6 * V * D + recompute_flops_per_token(c, mode, seq_len) / tp
    compute_s = grad_accum * tokens * f_gpu_tok / (g.peak_flops * mfu)
    fsdp_bw = g.nvlink if nodes == 1 else g.ib
    share = (dp - 1) / dp
    ag_fwd = grad_accum * share * per_rank * act
    ag_bwd = grad_accum * share * (per_rank - root) * act  # blocks re-gathered; the root stays gathered
    rs = share * per_rank * 4
    fsdp_s = (ag_fwd + ag_bwd + rs) / fsdp_bw
    edge_s = share * ((root + lin + norms) * act + (root + lin + norms) * 4) / fsdp_bw  # first gather, last reduce
    exposed_s = min(fsdp_s, edge_s + max(0.0, fsdp_s - compute_s))
    n_ar = {"none": 4, "selective": 5, "full": 6}[mode]  # per block: 2 forward, 2 backward, + recomputed forwards
    tp_bw = g.nvlink if gpus_per_node % tp == 0 else g.ib
    tp_bytes = grad_accum * L * n_ar * 2 * (tp - 1) / tp * tokens * D * act if tp > 1 else 0.0
    tp_s = tp_bytes / tp_bw
    opt_s = local * ADAMW_BYTES / g.hbm
    step_s = compute_s + exposed_s + tp_s + opt_s
    tps = batch_size * seq_len / step_s / world
    mfu_tt = tps * f_model / g.peak_flops
    where = "NVLink" if fsdp_bw == g.nvlink else "InfiniBand"
    times = [
        f"FLOPs/token     {f_model / 1e9:.1f} G model (6 x {(L * lin1 + V * D) / 1e9:.2f} B matmul params + "
        f"12 x L x H x hd x T {attn / 1e9:.1f} G) + {recompute_flops_per_token(c, mode, seq_len) / 1e9:.1f} G "
        f"recompute ({mode} AC)",
        f"compute         {grad_accum * tokens:,} tokens x {f_gpu_tok / 1e9:.1f} GFLOP per GPU / "
        f"({g.peak_flops / 1e12:.0f} TFLOP/s x {mfu:.2f} assumed utilization, --mfu) = {compute_s:.3f} s",
        f"FSDP comm       all-gather {(ag_fwd + ag_bwd) / 1e9:.1f} GB + reduce-scatter {rs / 1e9:.1f} GB over "
        f"{where} at {fsdp_bw / 1e9:.0f} GB/s = {fsdp_s:.3f} s, overlapped; exposed {exposed_s:.3f} s",
        f"TP comm         " + (f"{L * n_ar} all-reduces of {tokens * D * act / 1e6:.0f} MB per micro-batch = "
                               f"{tp_s:.3f} s, not overlapped" if tp > 1 else "none (TP 1)"),
        f"optimizer       {local / 1e9:.3f} B params x {ADAMW_BYTES} B / {g.hbm / 1e12:.2f} TB/s = {opt_s:.3f} s",
        f"step            {step_s:.2f} s -> {tps:,.0f} tokens/s per GPU; MFU {mfu_tt:.1%} (torchtitan's "
        f"definition: model FLOPs, no recompute, over the peak)",
    ]
    header = [
        f"herd pretrain --plan: {name}, {n_total / 1e9:.2f} B parameters ({L} blocks of "
        f"{(lin1 + norms) / 1e6:.1f} M, embedding + output {root / 1e9:.2f} B)",
        f"layout: {parallel} on {world} GPUs ({nodes} node(s) x {gpus_per_node}); TP {tp} x data-parallel {dp}; "
        f"global batch {batch_size} = {dp} x {grad_accum} micro-batch(es) x {b} sequence(s) of {seq_len} tokens",
        f"GPU: {g.name}; {dtype}; {mode} activation checkpointing; {loss} loss",
    ]
    notes = []
    if seq_len > c.max_seq_len:
        notes.append(f"--seq-len {seq_len} is beyond the model's context of {c.max_seq_len}")
    if tp > gpus_per_node:
        notes.append(f"TP {tp} spans nodes: its all-reduces run over InfiniBand")
    if needed > usable:
        state = 16 * local
        if state + CONTEXT_GIB * GiB > usable:
            notes.append(f"the sharded training state alone ({state / GiB:.1f} GiB: 16 B x {local / 1e9:.2f} B "
                         f"parameters) exceeds the GPU: shard over more GPUs (--nodes) or add TP")
        else:
            top = max(mem, key=lambda x: x[1])
            notes.append(f"the largest item is {top[0]} ({top[1] / GiB:.1f} GiB): try --activation-checkpointing "
                         f"full, a smaller batch per GPU (--grad-accum, more GPUs), TP, or the chunked loss")
    if dtype == "float32":
        notes.append("--dtype float32: activations and gathered copies in fp32; the bf16 peak FLOP/s is still "
                     "assumed (fp32 matmuls reach it only as TF32)")
    return MemoryPlan(header, mem, small, live, reserved, needed, usable, times, step_s, tps, mfu_tt, f_model, notes)


ASSUMPTIONS = [
    "herd's layout: FSDP2 per block + root; TP splits attention heads and the MLP width, no sequence parallelism "
    "(norms, residual stream, embedding and output replicated over TP)",
    "bf16 compute over fp32 sharded master weights and gradients, fp32 reduce-scatter, AdamW moments in fp32",
    "fused attention kernel (no T x T scores kept); GQA keys and values expanded to all heads; eager fp32 RMSNorm",
    "selective AC = torchtitan's op policy (keep every other matmul output and the attention output)",
    "the logits/loss peak and one layer's recompute never coexist: the larger is added",
    f"allocator fragmentation {ALLOWANCE:.0%} of live tensors; {CONTEXT_GIB:g} GiB outside PyTorch's allocator",
    "MFU counts the recomputed FLOPs too; the causal mask's saving is not discounted (torchtitan's convention)",
    "FSDP traffic hidden behind compute but the first all-gather and last reduce-scatter; TP all-reduces exposed",
]

"""Parallel layouts, applied to the plain model from outside (torchtitan's way): the model file has no process groups.

  single    one process
  ddp       DistributedDataParallel: every rank holds the whole model, gradients all-reduced
  fsdp      FSDP2 (torch.distributed.fsdp.fully_shard) over a 1-D DeviceMesh: parameters, gradients and optimizer
            state sharded on dim 0; each block is its own unit (gathered for its forward and backward only)
  hsdp      FSDP2 over a 2-D mesh (replicate, shard): sharded inside a group of --shard ranks, replicated across groups
  tp        tensor parallel (torch.distributed.tensor.parallel): wq/wk/wv and w1/w3 column-wise (each rank computes
            n_heads/tp heads and ffn/tp hidden units), wo and w2 row-wise (their partial sums all-reduced), so one
            block costs two all-reduces forward and two backward; embedding, norms and output stay replicated
  fsdp+tp   a 2-D mesh (dp, tp): TP inside each dp group, FSDP2 across them

Every layout does the same mathematics: the global batch is split over the data-parallel ranks, each rank's loss is
its summed cross entropy over the global token count, scaled by the data-parallel degree because DDP and FSDP average
gradients. Backend: gloo on CPU, NCCL on GPU, chosen from the device.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from herd.errors import ConfigError

LAYOUTS = ("single", "ddp", "fsdp", "hsdp", "tp", "fsdp+tp")


@dataclass
class Layout:
    kind: str
    world: int = 1
    rank: int = 0
    dp_size: int = 1  # data-parallel degree: the number of distinct batch slices
    dp_rank: int = 0
    tp: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mesh: object = None  # DeviceMesh, or None in one process
    owns_group: bool = False  # this call created the process group (and tears it down)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world() -> tuple[int, int, int]:
    """(world size, rank, local rank) from torchrun's environment; (1, 0, 0) outside it."""
    return int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))


def check_layout(parallel: str | None, tp: int | None, world: int, batch_size: int, grad_accum: int,
                 shard: int | None = None) -> tuple[str, int, int]:
    """(layout, tp degree, dp degree) for this world size, or a ConfigError naming what does not fit. Pure: every
    rank reaches the same verdict before any process group exists."""
    parallel = parallel or ("single" if world == 1 else "fsdp")
    if parallel not in LAYOUTS:
        raise ConfigError(f"--parallel must be one of {', '.join(LAYOUTS)}, got {parallel!r}")
    if parallel == "single" and world != 1:
        raise ConfigError(f"--parallel single runs in one process, but the world size is {world}")
    if parallel != "single" and world == 1:
        raise ConfigError(f"--parallel {parallel} needs several processes: launch with torchrun --nproc-per-node N")
    if parallel in ("tp", "fsdp+tp"):
        tp = tp or (world if parallel == "tp" else 2)
        if parallel == "tp" and tp != world:
            raise ConfigError(f"--parallel tp uses every rank for tensor parallelism: --tp {tp} != world size {world}")
        if world % tp or tp < 2:
            raise ConfigError(f"world size {world} is not divisible by the TP degree --tp {tp} (>= 2)")
    elif tp not in (None, 1):
        raise ConfigError(f"--tp {tp} applies to --parallel tp or fsdp+tp, not {parallel}")
    else:
        tp = 1
    if parallel == "hsdp":
        shard = shard or (world // 2 if world % 2 == 0 and world >= 4 else world)
        if world % shard:
            raise ConfigError(f"hsdp: world size {world} is not divisible by the shard group size {shard}")
    dp = world // tp
    if batch_size % (dp * grad_accum):
        raise ConfigError(f"--batch-size {batch_size} (global sequences per step) is not divisible by the "
                          f"data-parallel degree {dp} x --grad-accum {grad_accum}")
    return parallel, tp, dp


def setup(parallel: str | None, tp: int | None, batch_size: int, grad_accum: int) -> Layout:
    """Check the layout, then join (or create) the process group and build the DeviceMesh."""
    world, rank, local = env_world()
    kind, tp, dp = check_layout(parallel, tp, world, batch_size, grad_accum)
    device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    if kind == "single":
        return Layout(kind, device=device)
    owns = False
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        owns = True
    from torch.distributed.device_mesh import init_device_mesh

    dt = device.type
    if kind in ("ddp", "fsdp"):
        mesh = init_device_mesh(dt, (world,), mesh_dim_names=("dp",))
    elif kind == "hsdp":
        shard = world // 2 if world % 2 == 0 and world >= 4 else world
        mesh = init_device_mesh(dt, (world // shard, shard), mesh_dim_names=("replicate", "shard"))
    elif kind == "tp":
        mesh = init_device_mesh(dt, (tp,), mesh_dim_names=("tp",))
    else:
        mesh = init_device_mesh(dt, (dp, tp), mesh_dim_names=("dp", "tp"))
    dp_rank = rank // tp
    return Layout(kind, world, rank, dp, dp_rank, tp, device, mesh, owns)


def teardown(layout: Layout) -> None:
    if layout.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(layout: Layout) -> None:
    if layout.mesh is not None:
        dist.barrier()


def all_reduce_dp(x: float, layout: Layout) -> float:
    """Sum a number over the data-parallel ranks (TP ranks of one dp group hold the same value: counted once)."""
    if layout.dp_size == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64)
    if layout.tp > 1:  # only the tp-rank-0 member of each dp group contributes
        t = t if layout.rank % layout.tp == 0 else torch.zeros_like(t)
    if layout.device.type == "cuda":
        t = t.to(layout.device)
    dist.all_reduce(t)
    return float(t.cpu())


# -- applying a layout to the model --------------------------------------------------------------------------------

def check_tp_shape(config, tp: int) -> None:
    """Heads, KV heads and the MLP width must split evenly over the TP ranks."""
    for name, n in (("n_heads", config.n_heads), ("n_kv_heads", config.n_kv_heads), ("ffn_dim", config.ffn_dim)):
        if n % tp:
            raise ConfigError(f"tensor parallel degree {tp} does not divide the model's {name} ({n})")


def apply_tp(model, mesh) -> None:
    """Column-wise wq, wk, wv, w1, w3; row-wise wo, w2 (Megatron's split); each attention computes its local heads."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    tp = mesh.size()
    check_tp_shape(model.config, tp)
    plan = {"attention.wq": ColwiseParallel(), "attention.wk": ColwiseParallel(), "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(), "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w3": ColwiseParallel(), "feed_forward.w2": RowwiseParallel()}
    for block in model.layers:
        parallelize_module(block, mesh, plan)
        # the attention reshapes its projections by head count: after the column split it holds n/tp of each
        block.attention.n_heads //= tp
        block.attention.n_kv_heads //= tp


def apply_layout(model, layout: Layout, *, mixed_bf16: bool = False):
    """Parallelize `model` in place for the layout; returns the module to call (a DDP wrapper for ddp)."""
    if layout.kind == "single":
        return model.to(layout.device)
    model.to(layout.device)
    if layout.kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[layout.device.index] if layout.device.type == "cuda" else None)
    if layout.kind == "tp":
        apply_tp(model, layout.mesh)
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = layout.mesh
    if layout.kind == "fsdp+tp":
        apply_tp(model, mesh["tp"])
        mesh = mesh["dp"]
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_bf16 \
        else MixedPrecisionPolicy()
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def set_grad_sync(module, layout: Layout, sync: bool):
    """DDP: a no_sync context for the non-final micro-batches; FSDP2: turn the reduce-scatter off likewise."""
    import contextlib

    if layout.kind == "ddp":
        return contextlib.nullcontext() if sync else module.no_sync()
    if layout.kind in ("fsdp", "hsdp", "fsdp+tp"):
        module.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def _square_sums(g: torch.Tensor, parts: int) -> float:
    """Sum of squares of g in float64 over its dim-0 chunks (torch.chunk: FSDP2's shards), added in chunk order."""
    return sum(float(c.double().square().sum()) for c in torch.chunk(g.reshape(g.shape[0], -1), parts, dim=0))


@torch.no_grad()
def clip_grad_norm(params, max_norm: float, layout: Layout) -> float:
    """Total gradient L2 norm over plain and DTensor (sharded) gradients, then scale them to max_norm if above.

    The same arithmetic under DDP and FSDP, so that the two stay bitwise equal: each gradient's sum of squares is
    taken in float64 over the dp_size dim-0 chunks FSDP2 shards it into (DDP chunks its full gradient alike; FSDP
    ranks all-gather their shards' sums) and added in chunk order, then over parameters in order. Other DTensor
    layouts (TP, 2-D meshes) reduce each parameter's norm across its mesh. Clip coefficient as torch's:
    max_norm / (norm + 1e-6), capped at 1."""
    from torch.distributed.tensor import DTensor, Shard

    grads = [p.grad for p in params if p.grad is not None]
    fsdp_1d = layout.kind == "fsdp"
    local = [float(g.to_local().double().square().sum()) for g in grads
             if fsdp_1d and isinstance(g, DTensor)]
    if local:  # one all-gather for every FSDP shard: (world, n) sums, added in rank (= chunk) order
        t = torch.tensor(local, dtype=torch.float64, device=layout.device)
        out = [torch.empty_like(t) for _ in range(layout.world)]
        dist.all_gather(out, t)
        gathered = torch.stack(out).cpu().tolist()
        local = [sum(row[j] for row in gathered) for j in range(len(local))]
    total, j = 0.0, 0
    for g in grads:
        if isinstance(g, DTensor):
            if fsdp_1d and all(isinstance(p, Shard) and p.dim == 0 for p in g.placements):
                total += local[j]
                j += 1
            else:
                total += float(torch.linalg.vector_norm(g, dtype=torch.float64).full_tensor()) ** 2
        else:
            total += _square_sums(g, layout.dp_size if layout.kind == "ddp" else 1)
    norm = math.sqrt(total)
    if max_norm and max_norm > 0:
        coef = min(1.0, max_norm / (norm + 1e-6))
        if coef < 1.0:
            for g in grads:
                g.mul_(coef)
    return norm

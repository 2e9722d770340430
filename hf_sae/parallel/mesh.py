"""The DP x TP process mesh and the few collectives the latent-sharded SAE needs (torch.distributed).

Ranks are laid out data-parallel-major: ``rank = dp_rank * tp_size + tp_rank``, so the ``tp_size``
processes of one tensor-parallel group are neighbours (on one node when ``tp_size`` <= GPUs per node).
Processes are started by ``torchrun`` or ``accelerate launch`` (the usual env:// rendezvous); the
groups are ordinary ``torch.distributed`` process groups (gloo on CPU, NCCL on GPU).

Autograd rules (Megatron's f / g): ``tp_copy`` is the identity forward and an all-reduce of the
gradient backward (the input of a row-sharded matmul); ``reduce_sum`` all-reduces forward and passes
the gradient through unchanged (the loss is computed identically on every rank of the group).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

# Bytes each rank contributes to the collectives, by kind; reset and read by benchmarks/bench_sharded.py.
COMM_BYTES: dict[str, int] = {}


def _count(kind: str, t: Tensor) -> None:
    COMM_BYTES[kind] = COMM_BYTES.get(kind, 0) + t.numel() * t.element_size()


@dataclass
class Mesh:
    """This process's place in a ``dp_size x tp_size`` mesh and its process groups.

    ``tp_group`` holds the ranks sharing one SAE (each owns n / tp_size latents); ``dp_group`` holds
    the ranks owning the same latent slice (data replicas). ``None`` groups mean size 1 (no collective).
    """

    tp_size: int = 1
    dp_size: int = 1
    tp_rank: int = 0
    dp_rank: int = 0
    tp_group: Any = None
    dp_group: Any = None
    world_group: Any = None
    groups: list = field(default_factory=list, repr=False)

    @property
    def rank(self) -> int:
        return self.dp_rank * self.tp_size + self.tp_rank

    @property
    def world_size(self) -> int:
        return self.dp_size * self.tp_size


def make_mesh(tp_size: int, ranks: Optional[list[int]] = None) -> Optional[Mesh]:
    """Split the initialized default process group (or the processes ``ranks`` of it) into
    ``processes / tp_size`` DP replicas of ``tp_size`` latent shards. Every process of the default group
    must call it (group creation is collective); processes outside ``ranks`` get None."""
    if not dist.is_available() or not dist.is_initialized():
        if tp_size == 1:
            return Mesh()
        raise ValueError(f"tp_size={tp_size} needs torch.distributed initialized: launch with torchrun or "
                         f"accelerate launch with a multiple of {tp_size} processes")
    ranks = list(range(dist.get_world_size())) if ranks is None else list(ranks)
    world = len(ranks)
    if tp_size < 1 or world % tp_size:
        raise ValueError(f"tp_size={tp_size} does not divide the {world} processes; launch a multiple of "
                         f"tp_size processes (dp_size = processes / tp_size)")
    dp_size = world // tp_size
    tp_groups = [dist.new_group(ranks[d * tp_size:(d + 1) * tp_size]) for d in range(dp_size)]
    dp_groups = [dist.new_group(ranks[t::tp_size]) for t in range(tp_size)]
    everyone = dist.new_group(ranks) if world != dist.get_world_size() else dist.group.WORLD
    if dist.get_rank() not in ranks:
        return None
    dp_rank, tp_rank = divmod(ranks.index(dist.get_rank()), tp_size)
    return Mesh(tp_size=tp_size, dp_size=dp_size, tp_rank=tp_rank, dp_rank=dp_rank,
                tp_group=tp_groups[dp_rank] if tp_size > 1 else None,
                dp_group=dp_groups[tp_rank] if dp_size > 1 else None,
                world_group=everyone if world > 1 else None, groups=tp_groups + dp_groups)


class _ReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        out = x.clone()
        _count("all_reduce", out)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _CopyTo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        _count("all_reduce", grad)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def reduce_sum(x: Tensor, group) -> Tensor:
    """All-reduce (sum) over ``group``; the gradient passes through (replicated loss). No-op for None."""
    if group is None:
        return x
    if not x.requires_grad:
        out = x.clone()
        _count("all_reduce", out)
        dist.all_reduce(out, group=group)
        return out
    return _ReduceSum.apply(x, group)


def tp_copy(x: Tensor, group) -> Tensor:
    """Identity forward; all-reduce (sum) of the gradient backward. No-op for None."""
    return x if group is None else _CopyTo.apply(x, group)


@torch.no_grad()
def all_gather_cat(x: Tensor, group, dim: int = -1) -> Tensor:
    """Concatenate ``x`` from every rank of ``group`` (rank order) along ``dim`` (no gradient)."""
    if group is None:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    _count("all_gather", x)
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


def free_port() -> int:
    """A TCP port the OS reports free on localhost (for single-node test launches)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_backend() -> str:
    """The torch.distributed backend of a launch: NCCL when CUDA is present, else gloo. (Under
    ``accelerate launch`` / ``torchrun`` the trainer's Accelerator makes the same choice: NCCL for GPU
    processes, gloo with ``ACCELERATE_USE_CPU=true`` or no GPU; :func:`make_mesh`'s groups inherit it.)"""
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_local(rank: int, world_size: int, port: int, backend: Optional[str] = None) -> None:
    """Initialize the default process group for a single-node launch (tests, benchmarks)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
                      FORK_LAUNCHED="1")  # Accelerate: the launcher owns the group (end_training keeps it)
    dist.init_process_group(backend or default_backend(), rank=rank, world_size=world_size)


def _entry(rank: int, fn, nprocs: int, port: int, backend: Optional[str], args: tuple) -> None:
    torch.set_num_threads(1)
    init_local(rank, nprocs, port, backend)
    try:
        fn(rank, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def launch_local(fn, nprocs: int, args: tuple = (), timeout: float = 300.0, backend: Optional[str] = None) -> None:
    """Run ``fn(rank, *args)`` in ``nprocs`` spawned processes joined in one process group on this
    machine (a free port, gloo on CPU), like ``torchrun --nproc_per_node nprocs``. A failing process
    re-raises here; processes still running after ``timeout`` seconds are killed (TimeoutError)."""
    import time

    import torch.multiprocessing as mp

    ctx = mp.start_processes(_entry, args=(fn, nprocs, free_port(), backend, args), nprocs=nprocs, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{nprocs} processes still running after {timeout:.0f} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()

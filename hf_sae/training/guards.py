"""The trainer's guards: checks that stop a run before it wastes work or writes garbage, and the atomic
export of SAE folders. Each raises an error that names the input or the flag to change."""

from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch
from torch import Tensor

from .._faults import fault_point
from .._io import publish_dir, remove_leftovers, tmp_name
from ..configuration_sae import SAEConfig


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN/Inf; nothing from that point on was saved."""


def check_activations(x: Tensor, d: int, what: str) -> None:
    """Raise ``ValueError`` naming ``what`` (and the first bad row) unless ``x`` is a finite [M, d] tensor."""
    if x.ndim != 2 or x.shape[1] != d:
        raise ValueError(f"{what} have shape {tuple(x.shape)}, expected [rows, {d}] (the training data's width); "
                         "give activations of the same hook point and model")
    if x.shape[0] == 0:
        raise ValueError(f"{what} are empty; give at least one row or set --eval_tokens 0")
    finite = torch.isfinite(x).all(dim=1)
    if not bool(finite.all()):
        rows = (~finite).nonzero().flatten()
        raise ValueError(f"{what} contain NaN/Inf values in {len(rows)} row(s), first at row {int(rows[0])}; "
                         "remove or recompute those rows")


def training_bytes(configs: dict[str, SAEConfig], micro_batch: int) -> int:
    """Rough peak memory of training these SAEs: fp32 weights + gradients + Adam's two moments
    (4 copies of 2nd + n + d values per SAE) and two [micro_batch, n] fp32 buffers (pre-activations and
    their top-k / gradient work space)."""
    total = 0
    for c in configs.values():
        n, d = c.n_latents, c.d_in
        total += 4 * 4 * (2 * n * d + 2 * n + d) + 2 * 4 * micro_batch * n
    return total


def available_bytes(device) -> Optional[int]:
    """Free memory on ``device`` (CUDA: ``mem_get_info``; CPU: MemAvailable of /proc/meminfo), or None."""
    device = torch.device(device)
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        if device.type == "cpu":
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
    except (OSError, RuntimeError, ValueError):
        return None
    return None


def check_memory(configs: dict[str, SAEConfig], micro_batch: int, device) -> None:
    """``ValueError`` naming ``--n_latents`` / ``--batch_size`` when training cannot fit, before allocating."""
    need, have = training_bytes(configs, micro_batch), available_bytes(device)
    if have is not None and need > have:
        sizes = ", ".join(f"{h}: n_latents={c.n_latents} x d={c.d_in}" for h, c in configs.items())
        raise ValueError(f"training needs about {need / 2**30:.1f} GiB ({sizes}; weights, gradients, Adam state and "
                          f"[{micro_batch}, n] pre-activations per micro-batch) but {device} has "
                          f"{have / 2**30:.1f} GiB free; lower --n_latents / --expansion_factor or --batch_size")


@contextlib.contextmanager
def atomic_export(folder: str):
    """``with atomic_export(folder) as tmp:`` fill the temporary folder ``tmp``; on success it replaces ``folder``
    in one swap, so a kill leaves the previous export or the new one, never a truncated ``model.safetensors``."""
    remove_leftovers(folder)
    tmp = tmp_name(folder)
    os.makedirs(tmp)
    yield tmp
    fault_point("export.written")
    publish_dir(tmp, folder, fault="export.between_renames")

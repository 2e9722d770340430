"""Sharded checkpoints of a latent-sharded SAE: one safetensors file per TP rank, atomic, with a manifest.

Layout of one checkpoint folder (written through :mod:`hf_sae.training.checkpoint`: a temporary folder,
``seal`` = fsync + ``manifest.json`` with sizes and sha256, then an atomic rename)::

    sharded.json                       {"tp_size": P, "n_latents": n, "config": SAEConfig dict, "meta": {...}}
    shard-00000-of-00004.safetensors   rank 0's rows: "param/W_enc", "adam/W_enc/exp_avg", ...,
    ...                                "state/<name>" ([n/P] counters), and the replicated tensors

Sharded tensors (``SHARDED_PARAMS``, their Adam moments, every ``state/`` tensor) are split by rows in
rank order; replicated ones (b_dec, its moments, Adam's step, the BatchTopK threshold) are stored in
every shard and read from shard 0. Because the split is by rows and Adam is elementwise, a checkpoint
written by P ranks loads on any P' dividing n: :func:`load_full` concatenates the shards and
:func:`slice_for` cuts the rows of one rank of the new mesh (re-sharding 4 -> 2 -> 1 is exact).
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ..configuration_sae import SAEConfig
from ..modeling_sae import SparseAutoencoder
from ..training import checkpoint as ckpt
from .sharded import SHARDED_PARAMS, ShardedSAE

INDEX = "sharded.json"


def shard_name(rank: int, size: int) -> str:
    return f"shard-{rank:05d}-of-{size:05d}.safetensors"


def _is_sharded(key: str) -> bool:
    kind, _, rest = key.partition("/")
    name = rest.split("/")[0]
    return kind == "state" or (name in SHARDED_PARAMS and not key.endswith("/step"))


def local_tensors(model: ShardedSAE, optimizer: Optional[torch.optim.Optimizer],
                  state: Optional[dict[str, Tensor]] = None) -> dict[str, Tensor]:
    """This rank's checkpoint tensors: parameters, buffers, Adam state and ``state`` counters ([n/P])."""
    out = {f"param/{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if optimizer is not None:
        for name, p in model.named_parameters():
            for k, v in optimizer.state.get(p, {}).items():
                out[f"adam/{name}/{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
    for k, v in (state or {}).items():
        out[f"state/{k}"] = v.detach().cpu().contiguous()
    return out


def write_shards(folder: str, model: ShardedSAE, optimizer: Optional[torch.optim.Optimizer] = None,
                 state: Optional[dict[str, Tensor]] = None, meta: Optional[dict] = None) -> None:
    """Write this rank's shard (TP ranks of DP replica 0) and, on mesh rank 0, ``sharded.json`` into
    ``folder`` (created here; not sealed: see :func:`save_sharded`). No collective."""
    from safetensors.torch import save_file

    mesh = model.mesh
    os.makedirs(folder, exist_ok=True)
    if mesh.dp_rank == 0:
        save_file(local_tensors(model, optimizer, state), os.path.join(folder, shard_name(mesh.tp_rank, mesh.tp_size)))
    if mesh.rank == 0:
        with open(os.path.join(folder, INDEX), "w") as f:
            json.dump({"tp_size": mesh.tp_size, "n_latents": model.config.n_latents,
                       "config": model.config.to_dict(), "meta": meta or {}}, f, default=float)


def save_sharded(folder: str, model: ShardedSAE, optimizer: Optional[torch.optim.Optimizer] = None,
                 state: Optional[dict[str, Tensor]] = None, meta: Optional[dict] = None) -> str:
    """Write an atomic sharded checkpoint at ``folder`` (collective: every rank of the mesh calls it):
    a temporary folder, :func:`write_shards`, then mesh rank 0 seals (manifest) and renames it."""
    mesh = model.mesh
    folder = os.path.abspath(folder)
    tmp = os.path.join(os.path.dirname(folder), ".tmp-" + os.path.basename(folder))

    def barrier():
        if mesh.world_group is not None:
            dist.barrier(group=mesh.world_group)

    if mesh.rank == 0:
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        ckpt.clean_temporaries(os.path.dirname(folder))
        os.makedirs(tmp)
    barrier()
    write_shards(tmp, model, optimizer, state, meta)
    barrier()
    if mesh.rank == 0:
        ckpt.seal(tmp)
        ckpt.publish(tmp, folder)
    barrier()
    return folder


def read_index(folder: str) -> dict:
    """The checkpoint's ``sharded.json``; a clear error for a folder that is not a complete sharded checkpoint."""
    path = os.path.join(folder, INDEX)
    if not os.path.isfile(path):
        raise ValueError(f"{folder} is not a sharded SAE checkpoint (no {INDEX}); pass a folder written by "
                         "hf_sae.parallel.save_sharded")
    sealed_here = os.path.isfile(os.path.join(folder, ckpt.MANIFEST))  # else: a part of a sealed trainer checkpoint
    if sealed_here and not ckpt.is_valid(folder, verify_checksums=False):
        raise ValueError(f"sharded checkpoint {folder} is damaged (file sizes differ from its manifest.json)"
                         "; resume from an earlier checkpoint")
    with open(path) as f:
        return json.load(f)


def load_full(folder: str) -> tuple[SAEConfig, dict[str, Tensor], dict]:
    """(config, full tensors, meta) of a sharded checkpoint: the shards' rows concatenated in rank order."""
    from safetensors.torch import load_file

    index = read_index(folder)
    P = index["tp_size"]
    shards = []
    for r in range(P):
        path = os.path.join(folder, shard_name(r, P))
        if not os.path.isfile(path):
            raise ValueError(f"sharded checkpoint {folder} lacks {shard_name(r, P)} (written by {P} ranks)")
        shards.append(load_file(path))
    full = {k: (torch.cat([s[k] for s in shards], 0) if _is_sharded(k) else v) for k, v in shards[0].items()}
    return SAEConfig.from_dict(index["config"]), full, index.get("meta", {})


def slice_for(full: dict[str, Tensor], model: ShardedSAE) -> dict[str, Tensor]:
    """The rows of ``full`` (from :func:`load_full`) that belong to ``model``'s rank, any TP size."""
    lo, hi = model.offset, model.offset + model.n_local
    return {k: (v[lo:hi].clone() if _is_sharded(k) else v.clone()) for k, v in full.items()}


def load_into(folder_or_full, model: ShardedSAE,
              optimizer: Optional[torch.optim.Optimizer] = None) -> dict[str, Tensor]:
    """Load a checkpoint (folder, or the tensors of :func:`load_full`) into this rank's model and
    optimizer, re-sharding as needed; return this rank's ``state`` counters {name: [n/P]}."""
    full = load_full(folder_or_full)[1] if isinstance(folder_or_full, str) else folder_or_full
    n = model.config.n_latents
    if full["param/W_dec"].shape[0] != n:
        raise ValueError(f"checkpoint has {full['param/W_dec'].shape[0]} latents, the model {n}")
    mine = slice_for(full, model)
    dev = model.W_dec.device
    model.load_state_dict({k[6:]: v.to(dev) for k, v in mine.items() if k.startswith("param/")})
    if optimizer is not None:
        for name, p in model.named_parameters():
            st = {k.split("/")[-1]: v.to(dev) for k, v in mine.items() if k.startswith(f"adam/{name}/")}
            if st:
                if "step" in st:
                    st["step"] = st["step"].cpu()  # Adam keeps its step counter on the CPU
                optimizer.state[p] = st
    return {k[6:]: v.to(dev) for k, v in mine.items() if k.startswith("state/")}


def consolidate(folder: str, out_dir: Optional[str] = None) -> SparseAutoencoder:
    """A normal SparseAutoencoder from a sharded checkpoint (no process group needed); with ``out_dir``
    also ``save_pretrained`` there (config.json + model.safetensors)."""
    config, full, _ = load_full(folder)
    sae = SparseAutoencoder(config).to(full["param/W_dec"].dtype)
    sae.load_state_dict({k[6:]: v for k, v in full.items() if k.startswith("param/")})
    if out_dir is not None:
        sae.save_pretrained(out_dir)
    return sae

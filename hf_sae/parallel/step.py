"""One optimizer step of a latent-sharded SAE: the trainer's recipe (``SAETrainer._step``) on a mesh.

    dead    = since_fired >= dead_tokens_threshold          (local latents; identical on DP replicas)
    out     = sharded_sae(x, dead)                           (global-batch loss, identical on every rank)
    backward; sum gradients over DP; project W_dec grads; clip by the global norm; Adam; renormalize W_dec
    fires   = all-reduce over DP; since_fired <- 0 where fired, += global batch tokens elsewhere

Adam is elementwise, so each rank's Adam on its own rows is the single-process Adam restricted to them.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .sharded import ShardedSAE, ShardedStep


def sharded_adam(model: ShardedSAE, lr: float, betas=(0.9, 0.999), eps: float = 1e-8) -> torch.optim.Adam:
    """Adam over this rank's parameters (its latent rows + the replicated b_dec)."""
    return torch.optim.Adam(model.parameters(), lr=lr, betas=betas, eps=eps)


def finish_gradients(model: ShardedSAE, max_grad_norm: float = 1.0, project_decoder_grad: bool = True) -> float:
    """After backward, before the optimizer step: sum gradients over DP, project W_dec's, clip by the
    global norm. Returns the gradient norm (0 when not clipping)."""
    model.reduce_gradients_()
    if project_decoder_grad:
        model.remove_parallel_grad_()
    return float(model.clip_grad_norm_(max_grad_norm)) if max_grad_norm > 0 else 0.0


def update_since_fired(model: ShardedSAE, fires: Tensor, since_fired: Tensor,
                       batch_tokens: int) -> tuple[Tensor, Tensor]:
    """(global fires [n/P], new since_fired [n/P]): fires summed over DP; counters reset where fired."""
    fires = model._dp(fires)
    return fires, torch.where(fires > 0, torch.zeros_like(since_fired), since_fired + batch_tokens)


def train_step(model: ShardedSAE, optimizer: torch.optim.Optimizer, x: Tensor, since_fired: Tensor, *,
               batch_tokens: int, max_grad_norm: float = 1.0, project_decoder_grad: bool = True,
               normalize_decoder: bool = True, lr: Optional[float] = None) -> tuple[ShardedStep, Tensor, float]:
    """One step on this DP rank's tokens x [N, d]; returns (forward output, new since_fired [n/P], grad norm).

    ``batch_tokens``: tokens of the global batch (N times the DP size), added to the counters of
    latents that did not fire."""
    if lr is not None:
        for group in optimizer.param_groups:
            group["lr"] = lr
    res = model(x, dead_mask=since_fired >= model.config.dead_tokens_threshold)
    res.output.loss.backward()
    grad_norm = finish_gradients(model, max_grad_norm, project_decoder_grad)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if normalize_decoder:
        model.normalize_decoder_()
    return res, update_since_fired(model, res.fires, since_fired, batch_tokens)[1], grad_norm

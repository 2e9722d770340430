"""The optimizer side of a training step: :class:`SAEAdam`.

The SAE recipe's update, for each SAE (one parameter group each), is::

    g_dec <- g_dec - (<g_dec_i, w_i> / ||w_i||^2) w_i      per decoder row i   (project_decoder_grad)
    c      = min(1, max_grad_norm / (||g||_2 + 1e-6))      over all of the SAE's gradients (max_grad_norm > 0)
    Adam(lr, betas, eps) on c * g                          (torch.optim.Adam's update)
    w_i   <- w_i / max(||w_i||, 1e-12)                     per decoder row i   (normalize_decoder)

``SAEAdam.step()`` does exactly this with ``SparseAutoencoder.remove_parallel_grad_`` (which also returns
the projected gradient's norm; ``||w_i||^2`` is taken as 1 while the rows are those this optimizer last
renormalised, see ``_rows_unit``; gradient norms by ``modeling_sae.l2_norm``), the clip coefficient as
``torch.nn.utils.clip_grads_with_norm_`` computes it (the multiplication by it skipped on CPU when it is 1:
it would change nothing), torch's fused Adam kernel (``fused=True``: one pass over each parameter, its
gradient and its two moments, instead of the ten or so passes of the unfused update) and
``SparseAutoencoder.normalize_decoder_``. Every operation runs over
whole tables: on a shared CPU each extra parallel region costs its threads' barrier wait, which outweighs
what row blocks kept in cache save (measured in benchmarks/RESULTS_speed.md, issue 20).

The clip coefficient and the norms stay tensors, so a step never waits on an accelerator; each SAE's
gradient norm (after the projection, before clipping: what ``clip_grad_norm_`` returns) is left in
``grad_norms``. The results equal the unfused recipe's up to the rounding of the norms (``tests/test_optim.py``).

The state (``step``, ``exp_avg``, ``exp_avg_sq`` per parameter) and the parameter groups are
``torch.optim.Adam``'s: checkpoints of the unfused Adam load, and ours load into it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from ..modeling_sae import l2_norm


class SAEAdam(torch.optim.Adam):
    """Adam (torch's fused kernel) with the SAE recipe's decoder-gradient projection, per-SAE gradient
    clipping and decoder renormalisation folded into ``step()`` (the math: module docstring).

    Args:
        param_groups: one dict per SAE, ``{"params": list(sae.parameters()), "lr": ..., ...}`` (extra keys
            are kept, as in any torch optimizer), in the order of ``saes``.
        saes: the SparseAutoencoders, one per group.
        betas, eps: Adam's.
        max_grad_norm: clip each SAE's gradient to this global L2 norm; 0 = no clipping.
        project_decoder_grad: remove the decoder-gradient component parallel to each decoder row.
        normalize_decoder: renormalise the decoder rows to unit norm after the update.
    """

    def __init__(self, param_groups: list[dict], saes: Sequence, *, betas=(0.9, 0.999), eps: float = 1e-8,
                 max_grad_norm: float = 0.0, project_decoder_grad: bool = True, normalize_decoder: bool = True):
        if len(param_groups) != len(saes):
            raise ValueError(f"SAEAdam needs one parameter group per SAE; got {len(param_groups)} groups for "
                             f"{len(saes)} SAEs")
        if max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be >= 0 (0 disables clipping), got {max_grad_norm}")
        for group, sae in zip(param_groups, saes):
            if {id(p) for p in group["params"]} != {id(p) for p in sae.parameters()}:
                raise ValueError("each SAEAdam parameter group must hold exactly its SAE's parameters "
                                 "(list(sae.parameters()))")
        super().__init__(param_groups, betas=betas, eps=eps, fused=True)
        for group in self.param_groups:
            if group.get("amsgrad") or group.get("decoupled_weight_decay"):
                raise ValueError("SAEAdam implements Adam without amsgrad or decoupled weight decay; drop those "
                                 "keys from the parameter groups")
        self.saes = list(saes)
        self.max_grad_norm = float(max_grad_norm)
        self.project_decoder_grad = bool(project_decoder_grad)
        self.normalize_decoder = bool(normalize_decoder)
        self._unit_versions: list[Optional[int]] = [None] * len(self.saes)  # see _rows_unit
        self.grad_norms: list[Optional[Tensor]] = [None] * len(self.saes)
        """per SAE: the global L2 norm of its gradient before clipping (0-d tensor); None without clipping"""

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("SAEAdam.step takes no closure (the SAE step computes its loss once)")
        for i, (group, sae) in enumerate(zip(self.param_groups, self.saes)):
            dec_norm = (sae.remove_parallel_grad_(unit_rows=self._rows_unit(i)) if self.project_decoder_grad
                        else None)
            grads = [p.grad for p in group["params"] if p.grad is not None]
            if self.max_grad_norm > 0 and grads:
                norms = [dec_norm if g is sae.W_dec.grad and dec_norm is not None else l2_norm(g) for g in grads]
                norm = torch.linalg.vector_norm(torch.stack(norms))
                self.grad_norms[i] = norm
                coef = torch.clamp(self.max_grad_norm / (norm + 1e-6), max=1.0)  # as clip_grads_with_norm_
                if coef.device.type != "cpu" or coef.item() < 1.0:
                    torch._foreach_mul_(grads, coef)
        super().step()
        if self.normalize_decoder:
            for i, sae in enumerate(self.saes):
                sae.normalize_decoder_()
                self._unit_versions[i] = sae.W_dec._version

    def _rows_unit(self, i: int) -> bool:
        """Whether SAE i's decoder rows are unit-norm: this optimizer renormalised them and W_dec has not
        been written to since (its version counter moves with every in-place write: a load, a copy, an
        update)."""
        return self._unit_versions[i] is not None and self._unit_versions[i] == self.saes[i].W_dec._version

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["unit_rows"] = [self._rows_unit(i) for i in range(len(self.saes))]  # ignored by torch's Adam
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # a resumed run takes ||w_i|| = 1 where the saved one did (load the SAEs first, as accelerate does)
        for i, unit in enumerate(state_dict.get("unit_rows", [])[:len(self.saes)]):
            self._unit_versions[i] = self.saes[i].W_dec._version if unit else None
        for group in self.param_groups:
            group["fused"] = True  # a checkpoint of the unfused Adam says None
            for p in group["params"]:
                st = self.state.get(p)
                if st and "step" in st:  # the fused kernel reads a float32 step on the parameter's device
                    st["step"] = st["step"].to(p.device, torch.float32)

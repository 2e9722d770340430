"""The one registry of SAE activation functions: topk, batchtopk, relu, jumprelu, topafa.

Every activation maps pre-activations ``pre`` [N, n] (normalized units) to a :class:`Latents`:
either a k-sparse code (``values`` [N, w], ``indices`` [N, w]; padded slots hold value 0) or a
dense code ``dense`` [N, n]. Sparsity penalties that belong to an activation (L1 for relu, L0 for
jumprelu) live here too, beside the function they penalise.

This file imports only torch so that saved SAE folders can carry it for ``trust_remote_code``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import Tensor


class Latents(NamedTuple):
    """A batch of latent codes, sparse or dense (exactly one form is set)."""

    values: Optional[Tensor] = None
    """[N, w] latent values (>= 0); padded slots are 0."""
    indices: Optional[Tensor] = None
    """[N, w] int64 latent ids of ``values``."""
    dense: Optional[Tensor] = None
    """[N, n] dense latents, when the activation is not k-sparse."""

    @property
    def is_sparse(self) -> bool:
        return self.values is not None

    def to_dense(self, n_latents: int) -> Tensor:
        """[N, n] dense latents (scatter of the sparse form; differentiable w.r.t. values)."""
        if self.dense is not None:
            return self.dense
        values, indices = self.sparse_parts()
        return values.new_zeros(values.shape[0], n_latents).scatter_add(-1, indices, values)

    def sparse_parts(self) -> tuple[Tensor, Tensor]:
        """``(values, indices)`` [N, w] each of a sparse code (a dense code: call :meth:`to_sparse` first)."""
        if self.values is None or self.indices is None:
            raise ValueError("this code is dense; use to_sparse() for its sparse form")
        return self.values, self.indices

    def dense_part(self) -> Tensor:
        """``dense`` [N, n] of a dense code (a sparse code: call :meth:`to_dense` instead)."""
        if self.dense is None:
            raise ValueError("this code is sparse; use to_dense(n_latents) for its dense form")
        return self.dense

    def to_sparse(self) -> Latents:
        """Sparse form; a dense code is converted with width = max non-zeros in a row (>= 1)."""
        if self.values is not None:
            return self
        return dense_to_sparse(self.dense_part())


def dense_to_sparse(z: Tensor) -> Latents:
    """Convert dense latents [N, n] to a padded sparse code of width max_row_nnz (>= 1)."""
    width = max(1, int((z != 0).sum(-1).max().item())) if z.numel() else 1
    width = min(width, z.shape[-1])
    _, idx = z.abs().topk(width, dim=-1)
    return Latents(values=z.gather(-1, idx), indices=idx)


# --------------------------------------------------------------------------------------------
# Activation functions. Signature: fn(pre [N, n], sae, x_centered [N, d]) -> Latents
# ``sae`` gives access to the config, decoder-row norms and the activation's own parameters.
# --------------------------------------------------------------------------------------------


def topk(pre: Tensor, sae, x_centered: Tensor) -> Latents:
    """TopK (Gao et al.): keep the k largest pre-activations per token, then ReLU."""
    values, indices = pre.topk(sae.config.k, dim=-1, sorted=False)
    return Latents(values=values.relu(), indices=indices)


def batchtopk(pre: Tensor, sae, x_centered: Tensor) -> Latents:
    """BatchTopK (Bussmann et al.): in training keep the k*N largest ReLU'd pre-activations over the
    whole batch of N tokens and update an EMA of the smallest kept value; at inference keep every
    pre-activation above that stored threshold (per-token TopK until a threshold has been estimated)."""
    acts = pre.relu()
    threshold = sae.batchtopk_threshold
    if sae.training:
        flat = acts.flatten()
        n_keep = min(sae.config.k * acts.shape[0], flat.numel())
        kept_values, kept = flat.topk(n_keep, sorted=False)
        mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(0, kept, True).view_as(acts)
        with torch.no_grad():
            positive = kept_values[kept_values > 0]
            if positive.numel():
                batch_min = positive.min().to(threshold.dtype)
                m = sae.config.batchtopk_threshold_momentum
                new = torch.where(threshold < 0, batch_min, m * threshold + (1 - m) * batch_min)
                threshold.copy_(new)
        return Latents(dense=acts * mask)
    if threshold.item() < 0:  # never trained: fall back to per-token TopK
        return topk(pre, sae, x_centered)
    return Latents(dense=acts * (acts > threshold.to(acts.dtype)))


def batchtopk_sparse(pre: Tensor, sae, x_centered: Tensor) -> Latents:
    """:func:`batchtopk` in sparse form, for the fused sparse step: in training the same kept set and
    the same threshold update, returned as a padded code of width = the most latents one token keeps
    (padded slots hold value 0). At inference, the sparse form of :func:`batchtopk`.

    The batch-wide top-(k*N) is found among per-token candidates (each token's top ``c`` pre-activations,
    c = 4k at first): exact as soon as no token has a non-candidate at or above the kept threshold,
    otherwise c grows (x4, up to n). Costs a per-row top-c instead of a flat top-k over N*n values.
    """
    if not sae.training:
        return batchtopk(pre, sae, x_centered).to_sparse()
    N, n = pre.shape
    n_keep = min(sae.config.k * N, N * n)
    cap = min(n, 4 * sae.config.k)
    while True:
        cand_values, cand_idx = pre.topk(cap, dim=-1, sorted=False)
        acts = cand_values.relu()
        kept_values, kept = acts.flatten().topk(n_keep, sorted=False)
        t = kept_values.min()
        # A token's non-candidates are <= its smallest candidate m; they cannot be kept when relu(m) < t,
        # and do not matter when relu(m) == 0 (they are zeros).
        m = acts.min(-1).values
        if cap == n or bool(((m < t) | (m == 0)).all()):
            break
        cap = min(n, 4 * cap)
    keep = torch.zeros(N * cap, dtype=torch.bool, device=pre.device).index_fill_(0, kept, True).view(N, cap)
    width = max(1, int(keep.sum(-1).max()))
    # kept slots first (their acts >= 0 > -1), then distinct non-kept candidates as padding
    _, slot = torch.where(keep, acts, acts.new_tensor(-1.0)).topk(width, dim=-1, sorted=False)
    values = (acts * keep).gather(-1, slot)
    with torch.no_grad():
        threshold = sae.batchtopk_threshold
        positive = kept_values[kept_values > 0]
        if positive.numel():
            batch_min = positive.min().to(threshold.dtype)
            mom = sae.config.batchtopk_threshold_momentum
            threshold.copy_(torch.where(threshold < 0, batch_min, mom * threshold + (1 - mom) * batch_min))
    return Latents(values=values, indices=cand_idx.gather(-1, slot))


def relu(pre: Tensor, sae, x_centered: Tensor) -> Latents:
    """ReLU SAE (the L1 baseline): z = ReLU(pre)."""
    return Latents(dense=pre.relu())


class _JumpReLU(torch.autograd.Function):
    """z = pre * H(pre - theta); d z/d pre = H(pre - theta); d z/d theta = -(theta/eps) K((pre-theta)/eps)
    with K the rectangle kernel 1{|u| < 1/2} (Rajamanoharan et al. 2024, straight-through estimator)."""

    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, grad):
        pre, theta = ctx.saved_tensors
        eps = ctx.eps
        gate = (pre > theta).to(grad.dtype)
        kernel = ((pre - theta).abs() < eps / 2).to(grad.dtype)
        grad_theta = -(theta / eps) * kernel * grad
        grad_theta = grad_theta.reshape(-1, theta.shape[-1]).sum(0)
        return grad * gate, grad_theta, None


class _Step(torch.autograd.Function):
    """H(pre - theta) with pseudo-gradient d/d theta = -(1/eps) K((pre-theta)/eps) and none to pre."""

    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, theta = ctx.saved_tensors
        eps = ctx.eps
        kernel = ((pre - theta).abs() < eps / 2).to(grad.dtype)
        grad_theta = (-(1.0 / eps) * kernel * grad).reshape(-1, theta.shape[-1]).sum(0)
        return None, grad_theta, None


def jumprelu_fn(pre: Tensor, theta: Tensor, eps: float) -> Tensor:
    """Differentiable JumpReLU (see :class:`_JumpReLU`). pre [N, n], theta [n] > 0."""
    return _JumpReLU.apply(pre, theta, eps)


def step_fn(pre: Tensor, theta: Tensor, eps: float) -> Tensor:
    """Heaviside step H(pre - theta) with the JumpReLU threshold pseudo-gradient."""
    return _Step.apply(pre, theta, eps)


def jumprelu(pre: Tensor, sae, x_centered: Tensor) -> Latents:
    """JumpReLU: z = pre * H(pre - theta) with a learned per-latent threshold theta = exp(log_threshold)."""
    return Latents(dense=jumprelu_fn(pre, sae.log_threshold.exp(), sae.config.jumprelu_bandwidth))


def afa_k(acts: Tensor, dec_norms: Tensor, target_norm: Tensor, cap: Optional[int] = None):
    """top-AFA's per-token k(x) (docs/FORMULAS.md §3; the authors' ``TopAFASAE.forward``).

    s_i = (a_i * ||W_dec,i||)^2 sorted descending, c_j = sqrt(sum_{m<=j} s_(m)), and
    k(x) = argmin_j |c_j - ||x - b_dec||| + 1 (j counted from 0, first minimum on ties). When the
    sorted list covers all n latents the last c_j is forced to +inf (the authors set it to 1e4), so
    k(x) <= n - 1.

    Args: acts [N, n] >= 0; dec_norms [n]; target_norm [N]; cap: consider only the ``cap`` largest
        (None = all n, the authors' rule).
    Returns: (k [N] int64 in [1, min(cap, n - 1)], order [N, width] latent ids sorted by s descending).
    """
    s = (acts * dec_norms).square()
    n = s.shape[-1]
    width = n if cap is None else min(cap, n)
    s_sorted, order = s.topk(width, dim=-1, sorted=True)
    c = s_sorted.cumsum(-1).sqrt()
    if width == n and n > 1:
        c[..., -1] = float("inf")
    k = (c - target_norm.unsqueeze(-1)).abs().argmin(-1) + 1
    return k, order


def topafa(pre: Tensor, sae, x_centered: Tensor) -> Latents:
    """top-AFA: keep, per token, the k(x) latents whose cumulative norm best matches ||x - b_dec||
    (:func:`afa_k`; ``config.k`` is an optional compute cap, None by default). Whether ``pre`` carries
    b_enc is the model's choice (``SAEConfig.afa_variant``)."""
    acts = pre.relu()
    with torch.no_grad():
        k, order = afa_k(acts, sae.decoder_norms().detach(), x_centered.norm(dim=-1), sae.config.k)
    width = int(k.max().item())
    indices = order[:, :width]
    keep = torch.arange(width, device=pre.device) < k.unsqueeze(-1)
    return Latents(values=acts.gather(-1, indices) * keep, indices=indices)


# --------------------------------------------------------------------------------------------
# Sparsity penalties that belong to an activation.
# --------------------------------------------------------------------------------------------


def l1_penalty(latents: Latents, pre: Tensor, sae) -> Tensor:
    """Mean over tokens of sum_i z_i * ||W_dec,i|| (decoder-norm-weighted L1)."""
    norms = sae.decoder_norms()
    if latents.is_sparse:
        return (latents.values * norms[latents.indices]).sum(-1).mean()
    return (latents.dense * norms).sum(-1).mean()


def l0_penalty(latents: Latents, pre: Tensor, sae) -> Tensor:
    """Mean over tokens of the number of active latents, with the JumpReLU threshold pseudo-gradient."""
    return step_fn(pre, sae.log_threshold.exp(), sae.config.jumprelu_bandwidth).sum(-1).mean()


@dataclass(frozen=True)
class ActivationSpec:
    """A registry entry: the function, whether its code is k-sparse, and its own penalty."""

    fn: Callable[..., Latents]
    k_sparse: bool
    penalty: Optional[Callable[..., Tensor]] = None
    penalty_coef: Optional[str] = None  # the SAEConfig field weighting the penalty
    sparse_fn: Optional[Callable[..., Latents]] = None
    """The same activation as a sparse code (values = ReLU(pre) * keep, indices). The fused step of
    ``modeling_sae`` calls it under no_grad to choose the selection, then recomputes the values with a
    sparse backward (``hf_sae.kernels``). None: the activation has no sparse form."""


ACTIVATIONS: dict[str, ActivationSpec] = {
    "topk": ActivationSpec(topk, k_sparse=True, sparse_fn=topk),
    "batchtopk": ActivationSpec(batchtopk, k_sparse=False, sparse_fn=batchtopk_sparse),
    "relu": ActivationSpec(relu, k_sparse=False, penalty=l1_penalty, penalty_coef="l1_coef"),
    "jumprelu": ActivationSpec(jumprelu, k_sparse=False, penalty=l0_penalty, penalty_coef="l0_coef"),
    "topafa": ActivationSpec(topafa, k_sparse=True, sparse_fn=topafa),
}


def get_activation(name: str) -> ActivationSpec:
    """Look up an activation by name; unknown names raise ValueError listing the registry."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"Unknown activation {name!r}; available: {sorted(ACTIVATIONS)}") from None

"""AFA diagnostic (docs/FORMULAS.md §3, "Evaluating and Designing SAEs by Approximating Quasi-Orthogonality").

With (nearly) unit-norm, quasi-orthogonal decoder rows, the norm of the sparse code approximates
the norm of the centred input: ||z~|| ≈ ||x - b_dec||, z~_i = z_i ||W_dec,i||. All quantities
are in the SAE's *normalized* units (inputs times ``config.input_scale``, where latents live).

Per token::

    rel_gap = (||x - b_dec||^2 - ||z~||^2) / ||x - b_dec||^2      (0 = perfect, > 0 under-activated,
                                                                    < 0 over-activated)

and for the decoder (rows normalised to unit length)::

    eps_max  = max_{i != j} |cos(W_dec,i, W_dec,j)|
    eps_mean = mean_{i != j} |cos(W_dec,i, W_dec,j)|

The "ZF plot" scatters ||z~|| against ||x - b_dec|| (see :mod:`hf_sae.evaluation.report`).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

__all__ = ["afa_batch_stats", "afa_norms", "afa_relative_gap", "afa_from_sums", "decoder_cosine_stats", "AFAStats", "GAP_BINS"]

GAP_BINS = torch.linspace(-2.0, 1.0, 61, dtype=torch.float64)
"""Default bin edges of the relative-gap histogram (values outside are clamped into the end bins)."""


def afa_norms(x: Tensor, b_dec: Tensor, dec_norms: Tensor, latent_values: Optional[Tensor] = None,
              latent_indices: Optional[Tensor] = None, latents: Optional[Tensor] = None,
              input_scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """(||x - b_dec|| [N], ||z~|| [N]) in normalized units.

    Args:
        x: [..., d] inputs in the caller's units (multiplied by ``input_scale`` here).
        b_dec: [d] decoder bias (normalized units); dec_norms: [n] decoder-row norms.
        latent_values/latent_indices: sparse code [..., w], or ``latents`` dense [..., n].
    """
    d = x.shape[-1]
    if b_dec.shape != (d,):
        raise ValueError(f"b_dec has shape {tuple(b_dec.shape)}; expected [{d}].")
    xc = x.reshape(-1, d).double() * input_scale - b_dec.double()
    if latents is not None:
        z = latents.reshape(-1, latents.shape[-1]).double() * dec_norms.double()
    elif latent_values is not None and latent_indices is not None:
        w = latent_values.shape[-1]
        z = latent_values.reshape(-1, w).double() * dec_norms.double()[latent_indices.reshape(-1, w).long()]
    else:
        raise ValueError("afa_norms needs a latent code: latent_values + latent_indices, or dense latents.")
    if z.shape[0] != xc.shape[0]:
        raise ValueError(f"the code has {z.shape[0]} tokens but x has {xc.shape[0]}.")
    return xc.norm(dim=-1), z.norm(dim=-1)


def afa_relative_gap(x_norm: Tensor, z_norm: Tensor) -> Tensor:
    """(||x - b||^2 - ||z~||^2) / ||x - b||^2 per token (float64; NaN where ||x - b|| = 0)."""
    xs = x_norm.double().square()
    gap = (xs - z_norm.double().square()) / xs
    return torch.where(xs > 0, gap, torch.full_like(gap, float("nan")))


def afa_from_sums(count, sum_gap, sum_sq_gap, sum_abs_gap, sum_sq_norm_diff) -> dict:
    """Mean / std / mean |.| of the relative gap and mean (||z~|| - ||x - b||)^2 from sums over
    ``count`` tokens (the core of :class:`AFAStats` and the ``afa`` evaluate module)."""
    if count <= 0:
        raise ValueError("AFA statistics need at least one token (count > 0).")
    c = float(count)
    mean = float(sum_gap) / c
    return {
        "n_tokens": int(count),
        "afa_gap_mean": mean,
        "afa_gap_std": math.sqrt(max(float(sum_sq_gap) / c - mean * mean, 0.0)),
        "afa_gap_abs_mean": float(sum_abs_gap) / c,
        "afa_norm_mse": float(sum_sq_norm_diff) / c,
    }


@torch.no_grad()
def decoder_cosine_stats(W_dec: Tensor, chunk: int = 2048) -> dict:
    """Off-diagonal |cosine| statistics of the decoder rows W_dec [n, d] (rows renormalised).

    Returns ``{"eps_max", "eps_mean", "cos_abs_p99"}`` (p99 estimated on a histogram of 1e-3 bins).
    """
    n = W_dec.shape[0]
    if W_dec.ndim != 2 or n < 2:
        raise ValueError(f"W_dec must be [n >= 2, d], got {tuple(W_dec.shape)}.")
    W = W_dec.double()
    W = W / W.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    best = 0.0
    total = 0.0
    hist = torch.zeros(1001, dtype=torch.float64)
    for s in range(0, n, chunk):
        G = (W[s:s + chunk] @ W.T).abs()
        rows = torch.arange(G.shape[0])
        G[rows, rows + s] = 0.0  # drop the diagonal
        best = max(best, float(G.max()))
        total += float(G.sum())
        hist += torch.bincount((G.clamp(0, 1) * 1000).round().long().flatten(), minlength=1001).double()
        hist[0] -= G.shape[0]  # the zeroed diagonal entries
    cdf = hist.cumsum(0) / hist.sum()
    p99 = float(torch.searchsorted(cdf, torch.tensor(0.99, dtype=torch.float64))) / 1000
    return {"eps_max": best, "eps_mean": total / (n * (n - 1)), "cos_abs_p99": p99}


def afa_batch_stats(x_norm: Tensor, z_norm: Tensor) -> dict:
    """Per-batch statistics of the ``afa`` evaluate module (``count``, ``sum_gap``, ``sum_sq_gap``,
    ``sum_abs_gap``, ``sum_sq_norm_diff``) from ||x - b_dec|| [N] and ||z~|| [N] (:func:`afa_norms`)."""
    s = AFAStats(max_points=0)
    s.update(x_norm, z_norm)
    return s.sums_dict()


class AFAStats:
    """Running AFA statistics over tokens: sums for :func:`afa_from_sums`, a fixed-bin histogram of
    the relative gap and the first ``max_points`` (||x - b||, ||z~||) pairs for the ZF plot.

    Usage::

        stats = AFAStats()
        for x in batches:
            out = sae(x)
            stats.update_from_sae(sae, x, out)
        stats.compute(); stats.histogram(); stats.points
    """

    def __init__(self, max_points: int = 5000, bins: Optional[Tensor] = None):
        self.max_points = max_points
        self.edges = GAP_BINS if bins is None else torch.as_tensor(bins, dtype=torch.float64)
        self.count = 0
        self.sum_gap = self.sum_sq_gap = self.sum_abs_gap = self.sum_sq_norm_diff = 0.0
        self.hist = torch.zeros(len(self.edges) - 1, dtype=torch.int64)
        self._x: list = []
        self._z: list = []
        self._n_points = 0

    def update(self, x_norm: Tensor, z_norm: Tensor) -> None:
        """Add tokens given ||x - b_dec|| [N] and ||z~|| [N] (normalized units; see :func:`afa_norms`)."""
        if x_norm.shape != z_norm.shape or x_norm.ndim != 1:
            raise ValueError(f"x_norm and z_norm must be 1-D of equal length, got {tuple(x_norm.shape)}, {tuple(z_norm.shape)}.")
        x_norm, z_norm = x_norm.detach(), z_norm.detach()
        gap = afa_relative_gap(x_norm, z_norm)
        ok = ~torch.isnan(gap)
        gap, xn, zn = gap[ok], x_norm[ok].double(), z_norm[ok].double()
        self.count += int(gap.numel())
        self.sum_gap += float(gap.sum())
        self.sum_sq_gap += float(gap.square().sum())
        self.sum_abs_gap += float(gap.abs().sum())
        self.sum_sq_norm_diff += float((zn - xn).square().sum())
        g = gap.clamp(float(self.edges[0]), float(self.edges[-1])).cpu()
        pos = (torch.bucketize(g, self.edges, right=True) - 1).clamp(0, len(self.edges) - 2)
        self.hist += torch.bincount(pos, minlength=len(self.edges) - 1)
        room = self.max_points - self._n_points
        if room > 0:
            self._x.append(xn[:room].float().cpu())
            self._z.append(zn[:room].float().cpu())
            self._n_points += min(room, xn.numel())

    def update_from_sae(self, sae, x: Tensor, out) -> None:
        """Convenience: add a batch given the SAE, its input x [..., d] (caller's units) and ``sae(x)``."""
        xn, zn = afa_norms(x, sae.b_dec.detach(), sae.decoder_norms().detach(), out.latent_values,
                           out.latent_indices, out.latents if out.latent_values is None else None,
                           sae.config.input_scale)
        self.update(xn, zn)

    def sums_dict(self) -> dict:
        """The per-batch statistics consumed by the ``afa`` evaluate module."""
        return {"count": self.count, "sum_gap": self.sum_gap, "sum_sq_gap": self.sum_sq_gap,
                "sum_abs_gap": self.sum_abs_gap, "sum_sq_norm_diff": self.sum_sq_norm_diff}

    def compute(self) -> dict:
        """See :func:`afa_from_sums`."""
        return afa_from_sums(**self.sums_dict())

    def histogram(self) -> dict:
        """``{"edges": [...], "counts": [...]}`` of the relative gap."""
        return {"edges": self.edges.tolist(), "counts": self.hist.tolist()}

    @property
    def points(self) -> tuple[Tensor, Tensor]:
        """(||x - b_dec|| [P], ||z~|| [P]) of the first P <= max_points tokens."""
        if not self._x:
            return torch.empty(0), torch.empty(0)
        return torch.cat(self._x), torch.cat(self._z)

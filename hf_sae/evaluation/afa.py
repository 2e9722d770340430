"""AFA diagnostic (docs/FORMULAS.md §3; Lee et al. 2025, "Evaluating and Designing Sparse Autoencoders by
Approximating Quasi-Orthogonality"; the authors' code: SewoongLee/top-afa-sae,
``visualization/zf-plot.ipynb`` and ``training/sae.py``).

All quantities are in the SAE's *normalized* units: the SAE's own input (``sae.normalize_input(x)``:
any per-token ``config.input_norm``, then times ``config.input_scale``; where latents live). ε_LBO is
scale-free; the ZF plot's axes scale together.

The paper's evaluation, per token (h = n_latents, the dictionary size, as in the notebook)::

    f~        = [f_i ||W_dec,i|| for every latent i,  ||b_dec||]      (b_dec appended as one more atom)
    ZF plot   : ||x|| (the SAE's input, NOT centred) against ||f~||, with the bands
                ||f~|| in [||x|| / sqrt(1 + e), ||x|| / sqrt(1 - e)] for e = ε(h-1) in {0.25, 0.5, 1}
    ε_LBO     = | ||x||^2 - ||f~||^2 | / ((h - 1) ||f~||^2)

and for the decoder (rows renormalised to unit length; the authors' ``epsilon_max/epsilon_mean``)::

    eps_max  = max_{i != j} cos(W_dec,i, W_dec,j)        (signed)
    eps_mean = mean_{i != j} cos(W_dec,i, W_dec,j)       (signed)

Beside these, under their own names (hf_sae's earlier statistics)::

    rel_gap      = (||x - b_dec||^2 - ||z~||^2) / ||x - b_dec||^2,  z~_i = z_i ||W_dec,i||
                   (0 = perfect, > 0 under-activated, < 0 over-activated)
    cos_abs_max / cos_abs_mean / cos_abs_p99 of |cos(W_dec,i, W_dec,j)|, i != j
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

__all__ = ["afa_batch_stats", "afa_norms", "afa_relative_gap", "afa_from_sums", "decoder_cosine_stats", "AFAStats",
           "GAP_BINS", "zf_norms", "eps_lbo", "LBO_BANDS"]

LBO_BANDS = (0.25, 0.5, 1.0)
"""The ZF plot's error-bound bands, as values of ε_LBO (h - 1) (the authors' notebook)."""

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
    xc, z = _norm_inputs(x, b_dec, dec_norms, latent_values, latent_indices, latents, input_scale)
    return xc.norm(dim=-1), z.norm(dim=-1)


def _norm_inputs(x, b_dec, dec_norms, latent_values, latent_indices, latents, input_scale):
    """(x - b_dec [N, d], z~ [N, w]) in float64, normalized units, with the shape checks."""
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
    return xc, z


def afa_relative_gap(x_norm: Tensor, z_norm: Tensor) -> Tensor:
    """(||x - b||^2 - ||z~||^2) / ||x - b||^2 per token (float64; NaN where ||x - b|| = 0)."""
    xs = x_norm.double().square()
    gap = (xs - z_norm.double().square()) / xs
    return torch.where(xs > 0, gap, torch.full_like(gap, float("nan")))


def zf_norms(x: Tensor, b_dec: Tensor, dec_norms: Tensor, latent_values: Optional[Tensor] = None,
             latent_indices: Optional[Tensor] = None, latents: Optional[Tensor] = None,
             input_scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """(||x|| [N], ||f~|| [N]) of the ZF plot, float64, normalized units: x the SAE's input (not centred),
    f~ = [f_i ||W_dec,i||, ||b_dec||] (the authors' notebook). Arguments as :func:`afa_norms`."""
    xc, z = _norm_inputs(x, b_dec, dec_norms, latent_values, latent_indices, latents, input_scale)
    x_norm = (xc + b_dec.double()).norm(dim=-1)
    f_norm = (z.square().sum(-1) + b_dec.double().square().sum()).sqrt()
    return x_norm, f_norm


def eps_lbo(x_norm: Tensor, f_norm: Tensor, n_latents: int) -> Tensor:
    """ε_LBO = | ||x||^2 - ||f~||^2 | / ((h - 1) ||f~||^2) per token, h = ``n_latents`` (float64; NaN
    where ||f~|| = 0). ``x_norm``, ``f_norm`` [N] from :func:`zf_norms`."""
    if n_latents < 2:
        raise ValueError(f"eps_lbo needs a dictionary of h >= 2 atoms, got n_latents={n_latents}.")
    fs = f_norm.double().square()
    r = (x_norm.double().square() - fs).abs() / fs
    return torch.where(fs > 0, r, torch.full_like(r, float("nan"))) / (n_latents - 1)


def afa_from_sums(count, sum_gap, sum_sq_gap, sum_abs_gap, sum_sq_norm_diff, zf_count=0, sum_lbo=0.0,
                  sum_lbo_signed=0.0, n_band_025=0, n_band_050=0, n_band_100=0, n_latents=None) -> dict:
    """AFA statistics from sums over tokens (the core of :class:`AFAStats` and the ``afa`` evaluate module).

    Relative gap over ``count`` tokens: mean / std / mean |.| and mean (||z~|| - ||x - b||)^2. ZF over
    ``zf_count`` tokens, with r = (||x||^2 - ||f~||^2) / ||f~||^2 summed as ``sum_lbo`` (|r|) and
    ``sum_lbo_signed`` (r): ``eps_lbo_mean`` = mean ε_LBO = mean|r| / (h - 1) (needs ``n_latents`` = h),
    ``eps_lbo_h1_mean`` = mean ε_LBO (h - 1), ``eps_lbo_h1_signed_mean`` = mean r, and the fraction of
    tokens inside each band ε(h - 1) <= 0.25 / 0.5 / 1 (``zf_frac_in_025`` ...)."""
    if count <= 0:
        raise ValueError("AFA statistics need at least one token (count > 0).")
    c = float(count)
    mean = float(sum_gap) / c
    out = {
        "n_tokens": int(count),
        "afa_gap_mean": mean,
        "afa_gap_std": math.sqrt(max(float(sum_sq_gap) / c - mean * mean, 0.0)),
        "afa_gap_abs_mean": float(sum_abs_gap) / c,
        "afa_norm_mse": float(sum_sq_norm_diff) / c,
    }
    if zf_count:
        z = float(zf_count)
        out.update({
            "eps_lbo_h1_mean": float(sum_lbo) / z,
            "eps_lbo_h1_signed_mean": float(sum_lbo_signed) / z,
            "zf_frac_in_025": n_band_025 / z, "zf_frac_in_050": n_band_050 / z, "zf_frac_in_100": n_band_100 / z,
        })
        if n_latents:
            if n_latents < 2:
                raise ValueError(f"eps_lbo needs n_latents >= 2, got {n_latents}.")
            out["eps_lbo_mean"] = float(sum_lbo) / z / (n_latents - 1)
    return out


@torch.no_grad()
def decoder_cosine_stats(W_dec: Tensor, chunk: int = 2048) -> dict:
    """Off-diagonal cosine statistics of the decoder rows W_dec [n, d] (rows renormalised).

    Returns ``eps_max`` / ``eps_mean``: max / mean of the *signed* cosines (the authors' epsilon_max /
    epsilon_mean), and ``cos_abs_max`` / ``cos_abs_mean`` / ``cos_abs_p99`` of their absolute values
    (p99 estimated on a histogram of 1e-3 bins).
    """
    n = W_dec.shape[0]
    if W_dec.ndim != 2 or n < 2:
        raise ValueError(f"W_dec must be [n >= 2, d], got {tuple(W_dec.shape)}.")
    W = W_dec.double()
    W = W / W.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    best = best_abs = -math.inf
    total = total_abs = 0.0
    hist = torch.zeros(1001, dtype=torch.float64)
    for s in range(0, n, chunk):
        G = W[s:s + chunk] @ W.T
        rows = torch.arange(G.shape[0])
        G[rows, rows + s] = 0.0  # the diagonal adds 0 to the sums; the max skips it below
        total += float(G.sum())
        A = G.abs()
        total_abs += float(A.sum())
        hist += torch.bincount((A.clamp(0, 1) * 1000).round().long().flatten(), minlength=1001).double()
        hist[0] -= G.shape[0]  # the zeroed diagonal entries
        G[rows, rows + s] = -math.inf
        A[rows, rows + s] = -math.inf
        best, best_abs = max(best, float(G.max())), max(best_abs, float(A.max()))
    cdf = hist.cumsum(0) / hist.sum()
    p99 = float(torch.searchsorted(cdf, torch.tensor(0.99, dtype=torch.float64))) / 1000
    pairs = n * (n - 1)
    return {"eps_max": best, "eps_mean": total / pairs, "cos_abs_max": best_abs, "cos_abs_mean": total_abs / pairs,
            "cos_abs_p99": p99}


def afa_batch_stats(x_norm: Tensor, z_norm: Tensor, zf: Optional[tuple[Tensor, Tensor]] = None,
                    n_latents: Optional[int] = None) -> dict:
    """Per-batch statistics of the ``afa`` evaluate module (the keyword arguments of :func:`afa_from_sums`)
    from ||x - b_dec|| [N] and ||z~|| [N] (:func:`afa_norms`) and, optionally, the ZF pair
    (||x|| [N], ||f~|| [N]) (:func:`zf_norms`) with ``n_latents`` = h for ε_LBO."""
    s = AFAStats(max_points=0, n_latents=n_latents)
    s.update(x_norm, z_norm, zf)
    return s.sums_dict()


class AFAStats:
    """Running AFA statistics over tokens: sums for :func:`afa_from_sums`, a fixed-bin histogram of
    the relative gap, and the first ``max_points`` (||x||, ||f~||) pairs for the ZF plot.

    Usage::

        stats = AFAStats()
        for x in batches:
            out = sae(x)
            stats.update_from_sae(sae, x, out)
        stats.compute(); stats.histogram(); stats.points
    """

    def __init__(self, max_points: int = 5000, bins: Optional[Tensor] = None, n_latents: Optional[int] = None):
        self.max_points = max_points
        self.n_latents = n_latents
        self.edges = GAP_BINS if bins is None else torch.as_tensor(bins, dtype=torch.float64)
        self.count = 0
        self.sum_gap = self.sum_sq_gap = self.sum_abs_gap = self.sum_sq_norm_diff = 0.0
        self.zf_count = 0
        self.sum_lbo = self.sum_lbo_signed = 0.0
        self.n_bands = [0] * len(LBO_BANDS)
        self.hist = torch.zeros(len(self.edges) - 1, dtype=torch.int64)
        self._x: list = []
        self._z: list = []
        self._n_points = 0

    def update(self, x_norm: Tensor, z_norm: Tensor, zf: Optional[tuple[Tensor, Tensor]] = None) -> None:
        """Add tokens given ||x - b_dec|| [N] and ||z~|| [N] (normalized units; see :func:`afa_norms`)
        and optionally the ZF pair (||x|| [N], ||f~|| [N]) (:func:`zf_norms`)."""
        if x_norm.shape != z_norm.shape or x_norm.ndim != 1:
            raise ValueError(f"x_norm and z_norm must be 1-D of equal length, got {tuple(x_norm.shape)}, "
                             f"{tuple(z_norm.shape)}.")
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
        if zf is None:
            return
        xz, fz = (t.detach().double() for t in zf)
        if xz.shape != x_norm.shape or fz.shape != x_norm.shape:
            raise ValueError(
                f"the ZF pair must be [N={x_norm.shape[0]}] each, got {tuple(xz.shape)}, {tuple(fz.shape)}."
            )
        fs = fz.square()
        keep = fs > 0
        r = (xz.square() - fs)[keep] / fs[keep]
        self.zf_count += int(r.numel())
        self.sum_lbo += float(r.abs().sum())
        self.sum_lbo_signed += float(r.sum())
        for i, band in enumerate(LBO_BANDS):
            self.n_bands[i] += int((r.abs() <= band).sum())
        room = self.max_points - self._n_points
        if room > 0:
            self._x.append(xz[:room].float().cpu())
            self._z.append(fz[:room].float().cpu())
            self._n_points += min(room, xz.numel())

    def update_from_sae(self, sae, x: Tensor, out) -> None:
        """Convenience: add a batch given the SAE, its input x [..., d] (caller's units) and ``sae(x)``."""
        with torch.no_grad():  # normalized units: input_scale and any per-token input_norm applied
            x = sae.normalize_input(x)
        args = (
            x,
            sae.b_dec.detach(),
            sae.decoder_norms().detach(),
            out.latent_values,
            out.latent_indices,
            out.latents if out.latent_values is None else None,
        )
        self.n_latents = sae.config.n_latents
        self.update(*afa_norms(*args), zf=zf_norms(*args))

    def sums_dict(self) -> dict:
        """The per-batch statistics consumed by the ``afa`` evaluate module (:func:`afa_from_sums`'s arguments)."""
        b025, b050, b100 = self.n_bands
        return {
            "count": self.count,
            "sum_gap": self.sum_gap,
            "sum_sq_gap": self.sum_sq_gap,
            "sum_abs_gap": self.sum_abs_gap,
            "sum_sq_norm_diff": self.sum_sq_norm_diff,
            "zf_count": self.zf_count,
            "sum_lbo": self.sum_lbo,
            "sum_lbo_signed": self.sum_lbo_signed,
            "n_band_025": b025,
            "n_band_050": b050,
            "n_band_100": b100,
            "n_latents": self.n_latents or 0,
        }

    def compute(self) -> dict:
        """See :func:`afa_from_sums`."""
        return afa_from_sums(**self.sums_dict())

    def histogram(self) -> dict:
        """``{"edges": [...], "counts": [...]}`` of the relative gap."""
        return {"edges": self.edges.tolist(), "counts": self.hist.tolist()}

    @property
    def points(self) -> tuple[Tensor, Tensor]:
        """(||x|| [P], ||f~|| [P]) of the first P <= max_points tokens: the ZF plot's points."""
        if not self._x:
            return torch.empty(0), torch.empty(0)
        return torch.cat(self._x), torch.cat(self._z)

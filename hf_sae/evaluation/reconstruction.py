"""Reconstruction metrics of an SAE from running sums: MSE, FVU, explained variance, cosine
similarity, L0 (mean and histogram), latent firing density (log10 histogram) and dead latents.

Everything is computed from *sums* accumulated in float64, so evaluating 100 batches one by one
(:class:`ReconstructionStats`) gives the same numbers as evaluating their concatenation at once
(the one-shot functions below call the same ``*_from_sums`` code). Units: ``x`` and ``x_hat`` in
the caller's units (MSE is in those units squared; FVU, explained variance, cosine and L0 are
unit-free). "Tokens" are rows of ``x`` (all leading dimensions flattened, optionally masked).

Definitions (N tokens, d features, e = x - x_hat)::

    mse                = sum ||e||^2 / (N d)
    fvu                = sum ||e||^2 / sum ||x - mean(x)||^2            (mean over the evaluated tokens)
    explained_variance = 1 - sum ||e - mean(e)||^2 / sum ||x - mean(x)||^2
    cosine_similarity  = mean over tokens of <x, x_hat> / (||x|| ||x_hat||)
    l0                 = mean over tokens of the number of non-zero latents
    firing density     = (tokens on which a latent is non-zero) / N, per latent
    dead fraction      = fraction of latents with density 0 over the evaluated tokens

with sum ||x - mean(x)||^2 = sum ||x||^2 - ||sum x||^2 / N.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

__all__ = [
    "reconstruction_sums",
    "latent_sums",
    "fvu_from_sums",
    "mse_from_sums",
    "explained_variance_from_sums",
    "total_variance_from_sums",
    "mse",
    "fvu",
    "explained_variance",
    "cosine_similarity",
    "l0",
    "fire_counts",
    "dead_fraction",
    "firing_density_histogram",
    "DENSITY_BINS",
    "ReconstructionStats",
    "combine_sums",
    "as_python",
    "fvu_batch_stats",
    "l0_batch_stats",
    "dead_latents_batch_stats",
    "l0_from_sums",
    "dead_latents_from_sums",
]

_EPS = 1e-12
DENSITY_BINS = torch.arange(-8.0, 0.0001, 0.25, dtype=torch.float64)
"""Default bin edges (log10 of firing density) for :func:`firing_density_histogram`: -8 ... 0 step 0.25."""


# ----------------------------------------------------------------------------------- input checks


def _flat_pair(x: Tensor, x_hat: Tensor, mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Validate (x, x_hat) [..., d] (+ optional bool mask [...]) and return float64 [N, d] rows."""
    if not isinstance(x, Tensor) or not isinstance(x_hat, Tensor):
        raise TypeError("x and x_hat must be torch tensors of shape [..., d].")
    if x.shape != x_hat.shape:
        raise ValueError(f"x has shape {tuple(x.shape)} but x_hat has {tuple(x_hat.shape)}; they must match [..., d].")
    if x.ndim == 0:
        raise ValueError("x must have a feature dimension: shape [..., d].")
    d = x.shape[-1]
    if mask is not None:
        if mask.shape != x.shape[:-1]:
            raise ValueError(
                f"mask has shape {tuple(mask.shape)}; expected {tuple(x.shape[:-1])} (x without its last dim)."
            )
        x, x_hat = x[mask.bool()], x_hat[mask.bool()]
    x = x.detach().reshape(-1, d).double()
    x_hat = x_hat.detach().reshape(-1, d).double()
    if not (torch.isfinite(x).all() and torch.isfinite(x_hat).all()):
        raise ValueError("x or x_hat contains NaN/Inf; reconstruction metrics need finite activations.")
    return x, x_hat


def _flat_code(latent_values=None, latent_indices=None, latents=None, n_latents=None, mask=None):
    """Normalise a latent code to (nonzero bool [N, w], indices [N, w] or None). Dense codes use
    indices=None and w = n_latents."""
    if latents is not None:
        if latent_values is not None or latent_indices is not None:
            raise ValueError("pass either dense `latents` or (`latent_values`, `latent_indices`), not both.")
        if n_latents is not None and latents.shape[-1] != n_latents:
            raise ValueError(f"dense latents have {latents.shape[-1]} columns; expected n_latents={n_latents}.")
        z = latents.detach()
        if mask is not None:
            z = z[mask.bool()]
        z = z.reshape(-1, z.shape[-1])
        if not torch.isfinite(z).all():
            raise ValueError("latents contain NaN/Inf.")
        return z != 0, None
    if latent_values is None or latent_indices is None:
        raise ValueError("a sparse code needs both latent_values and latent_indices ([..., w] each).")
    if latent_values.shape != latent_indices.shape:
        raise ValueError(
            f"latent_values {tuple(latent_values.shape)} and latent_indices "
            f"{tuple(latent_indices.shape)} must have the same shape [..., w]."
        )
    v, i = latent_values.detach(), latent_indices
    if mask is not None:
        v, i = v[mask.bool()], i[mask.bool()]
    w = v.shape[-1] if v.ndim else 1
    v, i = v.reshape(-1, w), i.reshape(-1, w).long()
    if not torch.isfinite(v).all():
        raise ValueError("latent_values contain NaN/Inf.")
    if n_latents is not None and i.numel() and (int(i.min()) < 0 or int(i.max()) >= n_latents):
        raise ValueError(
            f"latent_indices must lie in [0, n_latents={n_latents}); got range [{int(i.min())}, {int(i.max())}]."
        )
    return v != 0, i


# ----------------------------------------------------------------------------------- sums


def reconstruction_sums(x: Tensor, x_hat: Tensor, mask: Optional[Tensor] = None) -> dict:
    """Float64 sums over tokens needed by every reconstruction metric.

    Args:
        x, x_hat: [..., d] activations and their reconstruction (caller's units).
        mask: optional bool [...]; only rows where it is True count.
    Returns:
        dict with ``count`` (int, N), ``sum_x`` [d], ``sum_sq_x`` (scalar, sum ||x||^2),
        ``sum_err`` [d] (sum of e = x - x_hat), ``sum_sq_err`` (sum ||e||^2), ``sum_cos``
        (sum over tokens of cos(x, x_hat)); tensors are float64 on x's device.
    """
    x, x_hat = _flat_pair(x, x_hat, mask)
    err = x - x_hat
    cos = (x * x_hat).sum(-1) / (x.norm(dim=-1) * x_hat.norm(dim=-1)).clamp_min(_EPS)
    return {
        "count": int(x.shape[0]),
        "sum_x": x.sum(0),
        "sum_sq_x": x.square().sum(),
        "sum_err": err.sum(0),
        "sum_sq_err": err.square().sum(),
        "sum_cos": cos.sum(),
    }


def latent_sums(
    latent_values: Optional[Tensor] = None,
    latent_indices: Optional[Tensor] = None,
    latents: Optional[Tensor] = None,
    n_latents: Optional[int] = None,
    mask: Optional[Tensor] = None,
) -> dict:
    """Per-batch sums of a latent code: L0 and firing counts.

    Give either a sparse code (``latent_values``/``latent_indices`` [..., w]; slots with value 0
    are padding and do not count) or dense ``latents`` [..., n]. ``n_latents`` is required for a
    sparse code (it sizes ``fire_counts``).

    Returns:
        dict with ``count`` (tokens), ``sum_l0`` and ``sum_sq_l0`` (float64 scalars),
        ``l0_hist`` (int64 [max_l0 + 1], tokens per L0 value) and ``fire_counts``
        (int64 [n], tokens on which each latent is non-zero).
    """
    nz, idx = _flat_code(latent_values, latent_indices, latents, n_latents, mask)
    if idx is None:
        n_latents = nz.shape[-1]
        fires = nz.sum(0, dtype=torch.int64)
    else:
        if n_latents is None:
            raise ValueError("latent_sums needs n_latents for a sparse code (latent_values, latent_indices).")
        fires = torch.bincount(idx[nz], minlength=n_latents).to(torch.int64)
    per_token = nz.sum(-1)
    return {
        "count": int(nz.shape[0]),
        "sum_l0": per_token.double().sum(),
        "sum_sq_l0": per_token.double().square().sum(),
        "l0_hist": torch.bincount(per_token, minlength=1).to(torch.int64),
        "fire_counts": fires,
    }


def total_variance_from_sums(count, sum_x, sum_sq_x) -> float:
    """sum ||x - mean(x)||^2 = sum ||x||^2 - ||sum x||^2 / N (float64)."""
    count = float(count)
    if count <= 0:
        return float("nan")
    sum_x = torch.as_tensor(sum_x, dtype=torch.float64)
    return float(torch.as_tensor(sum_sq_x, dtype=torch.float64) - sum_x.square().sum() / count)


def fvu_from_sums(count, sum_x, sum_sq_x, sum_sq_err) -> float:
    """FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 (NaN when there is no variance)."""
    tv = total_variance_from_sums(count, sum_x, sum_sq_x)
    if not tv > 0:
        return float("nan")
    return float(sum_sq_err) / tv


def mse_from_sums(count, d: int, sum_sq_err) -> float:
    """MSE per element = sum ||x - x_hat||^2 / (N d), in the caller's units squared."""
    if count <= 0:
        return float("nan")
    return float(sum_sq_err) / (float(count) * d)


def explained_variance_from_sums(count, sum_x, sum_sq_x, sum_err, sum_sq_err) -> float:
    """1 - sum ||e - mean(e)||^2 / sum ||x - mean(x)||^2 with e = x - x_hat (bias-insensitive FVU)."""
    tv = total_variance_from_sums(count, sum_x, sum_sq_x)
    if not tv > 0:
        return float("nan")
    resid = total_variance_from_sums(count, sum_err, sum_sq_err)
    return 1.0 - resid / tv


# ----------------------------------------------------------------------------------- one-shot functions


def mse(x: Tensor, x_hat: Tensor, mask: Optional[Tensor] = None) -> float:
    """Mean squared error per element of x [..., d] vs x_hat [..., d] (caller's units squared)."""
    s = reconstruction_sums(x, x_hat, mask)
    return mse_from_sums(s["count"], x.shape[-1], s["sum_sq_err"])


def fvu(x: Tensor, x_hat: Tensor, mask: Optional[Tensor] = None) -> float:
    """Fraction of variance unexplained: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over tokens."""
    s = reconstruction_sums(x, x_hat, mask)
    return fvu_from_sums(s["count"], s["sum_x"], s["sum_sq_x"], s["sum_sq_err"])


def explained_variance(x: Tensor, x_hat: Tensor, mask: Optional[Tensor] = None) -> float:
    """1 - Var(x - x_hat) / Var(x), variances summed over features (the residual is centred)."""
    s = reconstruction_sums(x, x_hat, mask)
    return explained_variance_from_sums(s["count"], s["sum_x"], s["sum_sq_x"], s["sum_err"], s["sum_sq_err"])


def cosine_similarity(x: Tensor, x_hat: Tensor, mask: Optional[Tensor] = None) -> float:
    """Mean over tokens of cos(x, x_hat) for x, x_hat [..., d]."""
    s = reconstruction_sums(x, x_hat, mask)
    return float(s["sum_cos"]) / s["count"] if s["count"] else float("nan")


def l0(
    latent_values: Optional[Tensor] = None,
    latent_indices: Optional[Tensor] = None,
    latents: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
) -> float:
    """Mean number of non-zero latents per token (sparse code [..., w] or dense latents [..., n])."""
    nz, _ = _flat_code(latent_values, latent_indices, latents, None, mask)
    return float(nz.sum(-1).double().mean()) if nz.shape[0] else float("nan")


def fire_counts(
    latent_values: Optional[Tensor] = None,
    latent_indices: Optional[Tensor] = None,
    latents: Optional[Tensor] = None,
    n_latents: Optional[int] = None,
    mask: Optional[Tensor] = None,
) -> Tensor:
    """int64 [n]: for each latent, the number of tokens on which it is non-zero."""
    return latent_sums(latent_values, latent_indices, latents, n_latents, mask)["fire_counts"]


def dead_fraction(fire_counts: Tensor) -> float:
    """Fraction of latents that never fired (fire_counts == 0) over the evaluated tokens."""
    fire_counts = torch.as_tensor(fire_counts)
    if fire_counts.ndim != 1 or fire_counts.numel() == 0:
        raise ValueError(
            f"fire_counts must be a non-empty 1-D tensor [n_latents], got shape {tuple(fire_counts.shape)}."
        )
    return float((fire_counts == 0).double().mean())


def firing_density_histogram(fire_counts: Tensor, n_tokens: int, bins: Optional[Tensor] = None) -> dict:
    """Histogram of log10(firing density) of the latents that fired at least once.

    Args:
        fire_counts: int [n] tokens on which each latent fired.
        n_tokens: number of evaluated tokens (density = fire_counts / n_tokens).
        bins: float bin edges in log10 units (default :data:`DENSITY_BINS`, -8 ... 0 by 0.25);
            densities below the first edge go to the first bin.
    Returns:
        ``{"edges": [...], "counts": [...], "n_dead": int}`` (dead latents are not in ``counts``:
        log10(0) is -inf).
    """
    if n_tokens <= 0:
        raise ValueError(f"n_tokens must be > 0, got {n_tokens}.")
    fire_counts = torch.as_tensor(fire_counts).double()
    edges = DENSITY_BINS if bins is None else torch.as_tensor(bins, dtype=torch.float64)
    alive = fire_counts > 0
    logd = torch.log10(fire_counts[alive] / n_tokens).clamp(float(edges[0]), float(edges[-1]))
    pos = torch.bucketize(logd, edges, right=True) - 1
    pos = pos.clamp(0, len(edges) - 2)
    counts = torch.bincount(pos, minlength=len(edges) - 1)
    return {"edges": edges.tolist(), "counts": counts.tolist(), "n_dead": int((~alive).sum())}


# ----------------------------------------------------------------------------------- per-batch statistics
# (the inputs of the ``evaluate`` modules in hf_sae/metrics: Python numbers and lists, one row per batch)


def as_python(stats: dict) -> dict:
    """Tensors -> Python floats/ints/lists (float64 values stay exact as Python floats)."""
    out = {}
    for k, v in stats.items():
        if isinstance(v, Tensor):
            v = v.detach().cpu()
            v = v.item() if v.ndim == 0 else v.tolist()
        out[k] = v
    return out


def combine_sums(rows) -> dict:
    """Sum per-batch statistics: scalars are added, sequences are added element-wise (shorter ones
    zero-padded, e.g. L0 histograms), ``None`` stays ``None`` only if every row has ``None``.

    Args: rows: iterable of dicts with the same keys (tensors, numbers or lists), or a dict of
        columns ``{key: [row values]}`` (the form ``evaluate`` passes to ``_compute``).
    """
    if isinstance(rows, dict):
        keys = list(rows)
        n = len(rows[keys[0]]) if keys else 0
        rows = [{k: rows[k][i] for k in keys} for i in range(n)]
    rows = list(rows)
    if not rows:
        raise ValueError("combine_sums needs at least one row of statistics.")
    out = {}
    for k in rows[0]:
        vals = [r[k] for r in rows if r.get(k) is not None]
        if not vals:
            out[k] = None
            continue
        if len(vals) != len(rows):
            raise ValueError(f"statistic {k!r} is missing (None) in some rows but not in others.")
        ts = [torch.as_tensor(v, dtype=torch.int64 if _is_int(v) else torch.float64).cpu() for v in vals]
        if ts[0].ndim == 0:
            total = torch.stack(ts).sum()
        else:
            width = max(t.numel() for t in ts)
            total = torch.zeros(width, dtype=ts[0].dtype)
            for t in ts:
                total[: t.numel()] += t.to(total.dtype)
        out[k] = total
    return out


def _is_int(v) -> bool:
    if isinstance(v, Tensor):
        return not v.is_floating_point()
    if isinstance(v, (list, tuple)):
        return all(isinstance(e, int) and not isinstance(e, bool) for e in v) and len(v) > 0
    return isinstance(v, int) and not isinstance(v, bool)


def fvu_batch_stats(x: Tensor, x_hat: Tensor, mask: Optional[Tensor] = None) -> dict:
    """Per-batch statistics of the ``fvu`` evaluate module: ``count``, ``sum_x`` [d], ``sum_sq_x``,
    ``sum_err`` [d], ``sum_sq_err`` as Python numbers/lists (see :func:`reconstruction_sums`)."""
    s = reconstruction_sums(x, x_hat, mask)
    s.pop("sum_cos")
    return as_python(s)


def l0_batch_stats(
    latent_values: Optional[Tensor] = None,
    latent_indices: Optional[Tensor] = None,
    latents: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
) -> dict:
    """Per-batch statistics of the ``l0`` evaluate module: ``count``, ``sum_l0``, ``sum_sq_l0``, ``l0_hist``."""
    n = None
    if latents is None and latent_indices is not None:
        n = int(latent_indices.max()) + 1 if latent_indices.numel() else 1
    s = latent_sums(latent_values, latent_indices, latents, n, mask)
    s.pop("fire_counts")
    return as_python(s)


def dead_latents_batch_stats(
    n_latents: int,
    latent_values: Optional[Tensor] = None,
    latent_indices: Optional[Tensor] = None,
    latents: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
) -> dict:
    """Per-batch statistics of the ``dead_latents`` evaluate module: ``count``, ``fire_counts`` [n]."""
    s = latent_sums(latent_values, latent_indices, latents, n_latents, mask)
    return as_python({"count": s["count"], "fire_counts": s["fire_counts"]})


def l0_from_sums(count, sum_l0, sum_sq_l0, l0_hist=None) -> dict:
    """``{"l0", "l0_std"(, "l0_histogram")}`` from sums over ``count`` tokens."""
    count = int(count)
    if count <= 0:
        raise ValueError("L0 needs at least one token (count > 0).")
    mean = float(sum_l0) / count
    out = {"l0": mean, "l0_std": math.sqrt(max(float(sum_sq_l0) / count - mean * mean, 0.0))}
    if l0_hist is not None:
        out["l0_histogram"] = torch.as_tensor(l0_hist).tolist()
    return out


def dead_latents_from_sums(count, fire_counts) -> dict:
    """``{"dead_fraction", "n_dead", "n_latents", "density_log10_histogram"}`` from per-latent fire counts."""
    fc = torch.as_tensor(fire_counts, dtype=torch.int64)
    return {
        "dead_fraction": dead_fraction(fc),
        "n_dead": int((fc == 0).sum()),
        "n_latents": int(fc.numel()),
        "density_log10_histogram": firing_density_histogram(fc, int(count)),
    }


# The running statistics live in their own module; imported last because they use the functions above.
from .reconstruction_stats import ReconstructionStats  # noqa: E402

"""Data-dependent initialisation of an SAE: input scale, b_dec (geometric median) and tied weights."""

from __future__ import annotations

import torch
from torch import Tensor

from ..configuration_sae import input_scale_for


@torch.no_grad()
def geometric_median(x: Tensor, max_iter: int = 200, tol: float = 1e-6, eps: float = 1e-8) -> Tensor:
    """Geometric median of points x [m, d]: argmin_y sum_i ||x_i - y||_2 (Weiszfeld's algorithm).

    Starts from the mean and iterates y <- sum_i w_i x_i / sum_i w_i with w_i = 1 / max(||x_i - y||, eps),
    in float64, until the step is below ``tol`` times the data scale. Returns [d] in x's dtype.
    """
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"geometric_median needs points of shape [m, d] with m >= 1, got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("geometric_median: the sample contains NaN/Inf values")
    pts = x.double()
    y = pts.mean(0)
    scale = pts.std(0).norm().item() or 1.0
    for _ in range(max_iter):
        w = 1.0 / (pts - y).norm(dim=-1).clamp_min(eps)
        y_new = (w[:, None] * pts).sum(0) / w.sum()
        done = (y_new - y).norm().item() <= tol * scale
        y = y_new
        if done:
            break
    return y.to(x.dtype)


input_scale_from_mean_sq_norm = input_scale_for  # one definition: hf_sae.configuration_sae.input_scale_for


@torch.no_grad()
def initialize_sae(sae, sample: Tensor, *, tied_init: bool = True, b_dec_init: str = "geometric_median",
                   normalize_input: bool = True, input_scale: float | None = None,
                   generator: torch.Generator | None = None) -> dict:
    """Initialise an SAE in place from a data sample [m, d] (caller's units).

    - ``normalize_input``: set ``config.input_scale`` so that E||s x||^2 = d over the sample (or to
      ``input_scale`` when given, e.g. from a cache's statistics over all its tokens). Under a per-token
      ``config.input_norm`` the sample is normalised first and ``input_scale`` (raw units) is ignored.
    - ``b_dec_init``: ``geometric_median`` / ``mean`` of the (scaled) sample, or ``zeros``.
    - ``tied_init`` False: redraw W_enc independently of W_dec (rows uniform on the unit sphere);
      True keeps the model's tied init (W_enc = W_dec, unit rows).

    Returns a dict of what was set (``input_scale``, ``b_dec_norm``) for the training record.
    """
    d = sae.config.d_in
    if sample.ndim != 2 or sample.shape[1] != d:
        raise ValueError(f"initialisation sample has shape {tuple(sample.shape)}; expected [m, {d}]")
    sample = sample.float()
    if sae.config.input_norm != "none":  # statistics of the per-token-normalised inputs the SAE will see
        sae.config.input_scale = 1.0
        sample = sae.normalize_input(sample.to(sae.W_enc.dtype)).float()
        input_scale = None  # a cache's scale is measured on raw activations
    scale = 1.0
    if normalize_input and input_scale:
        scale = float(input_scale)
    elif normalize_input:
        scale = input_scale_from_mean_sq_norm(sample.square().sum(-1).mean().item(), d)
    sae.config.input_scale = scale
    xs = sample * scale
    if b_dec_init == "geometric_median":
        b = geometric_median(xs)
    elif b_dec_init == "mean":
        b = xs.mean(0)
    elif b_dec_init == "zeros":
        b = torch.zeros(d)
    else:
        raise ValueError(f"unknown b_dec_init {b_dec_init!r}; use geometric_median, mean or zeros")
    sae.b_dec.copy_(b.to(sae.b_dec))
    if not tied_init:
        W = torch.randn(sae.W_enc.shape, generator=generator, dtype=torch.float32)
        sae.W_enc.copy_((W / W.norm(dim=-1, keepdim=True)).to(sae.W_enc))
    return {"input_scale": scale, "b_dec_norm": float(b.norm())}

"""Running reconstruction and sparsity statistics (:class:`ReconstructionStats`), streaming over any number of
tokens with the formulas of :mod:`hf_sae.evaluation.reconstruction` (which re-exports the class).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .reconstruction import (
    dead_fraction,
    explained_variance_from_sums,
    firing_density_histogram,
    fvu_from_sums,
    l0_from_sums,
    latent_sums,
    mse_from_sums,
    reconstruction_sums,
)

__all__ = ["ReconstructionStats"]


class ReconstructionStats:
    """Running reconstruction and sparsity statistics over any number of tokens.

    Usage (the trainer's periodic evaluation and ``hf-sae eval`` both use this class)::

        stats = ReconstructionStats(n_latents=sae.config.n_latents)
        for x in batches:                                  # x [..., d], caller's units
            out = sae(x)
            stats.update(x, out.reconstruction, latent_values=out.latent_values,
                         latent_indices=out.latent_indices, latents=out.latents)
        metrics = stats.compute()                          # {"fvu": ..., "l0": ..., "dead_fraction": ...}
        plots = stats.histograms()                         # L0 and log10-density histograms

    Accumulators are float64/int64 tensors on ``device``; :meth:`state_dict` exposes them so that
    distributed workers can sum them (``accelerator.reduce(stats.state_dict(), "sum")``) and
    :meth:`load_state_dict` / :meth:`merge` combine them. Streamed results equal one-shot results.

    Args:
        n_latents: number of latents n (sizes the per-latent firing counts). ``None`` disables the
            latent statistics (then only x / x_hat metrics are reported).
        device: where the accumulators live (default: the device of the first batch).
    """

    def __init__(self, n_latents: Optional[int] = None, device: Optional[torch.device] = None):
        if n_latents is not None and (not isinstance(n_latents, int) or n_latents <= 0):
            raise ValueError(f"n_latents must be a positive int or None, got {n_latents!r}.")
        self.n_latents = n_latents
        self.device = torch.device(device) if device is not None else None
        self.reset()

    def reset(self) -> None:
        """Forget every accumulated token."""
        self.count = 0
        self.latent_count = 0
        self.d = None
        self.sum_x = self.sum_err = None
        self.sum_sq_x = self.sum_sq_err = self.sum_cos = None
        self.sum_l0 = self.sum_sq_l0 = None
        self.l0_hist = None
        self.fire_counts = None

    def _dev(self, t: Tensor) -> torch.device:
        if self.device is None:
            self.device = t.device
        return self.device

    @torch.no_grad()
    def update(
        self,
        x: Tensor,
        x_hat: Tensor,
        latent_values: Optional[Tensor] = None,
        latent_indices: Optional[Tensor] = None,
        latents: Optional[Tensor] = None,
        mask: Optional[Tensor] = None,
    ) -> None:
        """Add a batch.

        Args:
            x, x_hat: [..., d] activations and reconstruction (caller's units).
            latent_values, latent_indices: optional sparse code [..., w] (padded slots = 0).
            latents: optional dense latents [..., n] (used when no sparse code is given; if both are
                given, the sparse code is used).
            mask: optional bool [...] selecting the tokens that count.
        """
        s = reconstruction_sums(x, x_hat, mask)
        dev = self._dev(x)
        if self.d is None:
            self.d = x.shape[-1]
            self.sum_x = torch.zeros(self.d, dtype=torch.float64, device=dev)
            self.sum_err = torch.zeros(self.d, dtype=torch.float64, device=dev)
            zero = torch.zeros((), dtype=torch.float64, device=dev)
            self.sum_sq_x, self.sum_sq_err, self.sum_cos = zero.clone(), zero.clone(), zero.clone()
        elif x.shape[-1] != self.d:
            raise ValueError(f"x has {x.shape[-1]} features but earlier batches had {self.d}.")
        self.count += s["count"]
        self.sum_x += s["sum_x"].to(dev)
        self.sum_err += s["sum_err"].to(dev)
        self.sum_sq_x += s["sum_sq_x"].to(dev)
        self.sum_sq_err += s["sum_sq_err"].to(dev)
        self.sum_cos += s["sum_cos"].to(dev)
        if self.n_latents is None:
            return
        if latent_values is not None and latent_indices is not None:
            ls = latent_sums(latent_values, latent_indices, None, self.n_latents, mask)
        elif latents is not None:
            ls = latent_sums(latents=latents, n_latents=self.n_latents, mask=mask)
        else:
            raise ValueError(
                "ReconstructionStats(n_latents=...) needs the latent code in update(): "
                "latent_values + latent_indices, or dense latents."
            )
        if ls["count"] != s["count"]:
            raise ValueError(f"the latent code covers {ls['count']} tokens but x covers {s['count']}.")
        self._add_latent_sums(ls)

    def _add_latent_sums(self, ls: dict) -> None:
        dev = self.device
        if self.fire_counts is None:
            self.fire_counts = torch.zeros(self.n_latents, dtype=torch.int64, device=dev)
            self.sum_l0 = torch.zeros((), dtype=torch.float64, device=dev)
            self.sum_sq_l0 = torch.zeros((), dtype=torch.float64, device=dev)
            self.l0_hist = torch.zeros(1, dtype=torch.int64, device=dev)
        self.latent_count += ls["count"]
        self.fire_counts += ls["fire_counts"].to(dev)
        self.sum_l0 += ls["sum_l0"].to(dev)
        self.sum_sq_l0 += ls["sum_sq_l0"].to(dev)
        self.l0_hist = _add_hist(self.l0_hist, ls["l0_hist"].to(dev))

    # -- combination (distributed workers, several evaluation shards)
    def state_dict(self) -> dict:
        """The accumulators (tensors and ints); summing two state dicts element-wise merges them
        (``l0_hist`` may differ in length: pad with zeros, as :meth:`merge` does)."""
        return {
            k: getattr(self, k)
            for k in (
                "count",
                "latent_count",
                "sum_x",
                "sum_err",
                "sum_sq_x",
                "sum_sq_err",
                "sum_cos",
                "sum_l0",
                "sum_sq_l0",
                "l0_hist",
                "fire_counts",
            )
        }

    def load_state_dict(self, state: dict) -> None:
        """Replace the accumulators by ``state`` (e.g. the sum of several workers' state dicts)."""
        for k, v in state.items():
            setattr(self, k, int(v) if k in ("count", "latent_count") else v)
        if self.sum_x is not None:
            self.d = int(self.sum_x.shape[-1])
            self.device = self.sum_x.device

    def merge(self, other: ReconstructionStats) -> ReconstructionStats:
        """Add ``other``'s tokens to this one (in place); returns self."""
        if other.d is None:
            return self
        if self.d is None:
            self.load_state_dict(
                {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in other.state_dict().items()}
            )
            return self
        if other.d != self.d or other.n_latents != self.n_latents:
            raise ValueError("cannot merge ReconstructionStats of different d or n_latents.")
        self.count += other.count
        for k in ("sum_x", "sum_err", "sum_sq_x", "sum_sq_err", "sum_cos"):
            getattr(self, k).add_(getattr(other, k).to(self.device))
        if other.fire_counts is not None:
            self._add_latent_sums(
                {
                    "count": other.latent_count,
                    "fire_counts": other.fire_counts,
                    "sum_l0": other.sum_l0,
                    "sum_sq_l0": other.sum_sq_l0,
                    "l0_hist": other.l0_hist,
                }
            )
        return self

    # -- results
    def compute(self) -> dict:
        """Scalar metrics (Python floats/ints): ``n_tokens``, ``mse``, ``fvu``, ``explained_variance``,
        ``cosine_similarity``, and with latents ``l0``, ``l0_std``, ``dead_fraction``, ``n_dead``,
        ``n_latents``, ``density_median_log10`` (median log10 firing density of live latents)."""
        if self.count == 0:
            raise ValueError("ReconstructionStats.compute() called before any update() with at least one token.")
        out = {
            "n_tokens": int(self.count),
            "mse": mse_from_sums(self.count, self.d, self.sum_sq_err),
            "fvu": fvu_from_sums(self.count, self.sum_x, self.sum_sq_x, self.sum_sq_err),
            "explained_variance": explained_variance_from_sums(
                self.count, self.sum_x, self.sum_sq_x, self.sum_err, self.sum_sq_err
            ),
            "cosine_similarity": float(self.sum_cos) / self.count,
        }
        if self.fire_counts is not None:
            n = self.latent_count
            out.update(l0_from_sums(n, self.sum_l0, self.sum_sq_l0))
            out["n_latents"] = int(self.n_latents)
            out["n_dead"] = int((self.fire_counts == 0).sum())
            out["dead_fraction"] = dead_fraction(self.fire_counts)
            alive = self.fire_counts[self.fire_counts > 0].double()
            out["density_median_log10"] = float(torch.log10(alive.median() / n)) if alive.numel() else float("nan")
        return out

    def firing_density(self) -> Tensor:
        """float64 [n]: fraction of evaluated tokens on which each latent fired."""
        if self.fire_counts is None:
            raise ValueError("no latent statistics were accumulated (n_latents=None or no update()).")
        return self.fire_counts.double() / max(self.latent_count, 1)

    def histograms(self) -> dict:
        """``{"l0": {"values": [0..max], "counts": [...]}, "density_log10": {"edges", "counts", "n_dead"}}``."""
        if self.fire_counts is None:
            return {}
        return {
            "l0": {"values": list(range(len(self.l0_hist))), "counts": self.l0_hist.tolist()},
            "density_log10": firing_density_histogram(self.fire_counts.cpu(), self.latent_count),
        }


def _add_hist(a: Tensor, b: Tensor) -> Tensor:
    """Element-wise sum of two count vectors of possibly different lengths (zero-padded)."""
    if a.numel() < b.numel():
        a, b = b, a
    a = a.clone()
    a[: b.numel()] += b
    return a

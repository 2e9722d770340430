"""Scaling-law fits for SAE sweeps (Gao et al. 2024, section 3).

Two laws, fitted by non-linear least squares in log space (the losses span decades):

* fixed k:  L(N) = alpha * N**beta + L_irr                       (``fit_power_law``)
* joint:    L(N, k) = exp(a + b_k log k + b_n log N + g log k log N) + exp(z + h log k)
                                                                  (``fit_joint_law``, the paper's eq. 2)

Each fit returns point estimates, 95% confidence intervals (from the Jacobian's covariance, and
optionally a bootstrap over sweep points) and the RMS log-residual. ``plot_power_law`` writes the
PNG that people look at. Inputs are plain sequences of numbers: N = latents, k = active latents,
L = normalized MSE (FVU) or any loss.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class Fit:
    """A fitted law: parameter names, values, 95% intervals [lo, hi] and the RMS log residual."""

    law: str
    params: dict[str, float]
    ci95: dict[str, tuple[float, float]]
    rms_log_residual: float
    n_points: int
    bootstrap_ci95: dict[str, tuple[float, float]] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def _as_array(name: str, values: Sequence[float]) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence of numbers, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise ValueError(f"{name} must hold finite positive numbers (got {arr.tolist()})")
    return arr


def _least_squares(residual, x0: np.ndarray, n_points: int, names: list[str]):
    from scipy.optimize import least_squares

    sol = least_squares(residual, x0, method="lm" if n_points > len(x0) else "trf", max_nfev=20000)
    r = sol.fun
    dof = max(1, n_points - len(x0))
    sigma2 = float(r @ r) / dof
    try:
        cov = np.linalg.pinv(sol.jac.T @ sol.jac) * sigma2
        half = 1.96 * np.sqrt(np.clip(np.diag(cov), 0, None))
    except np.linalg.LinAlgError:  # pragma: no cover - degenerate Jacobian
        half = np.full(len(x0), np.nan)
    rms = float(np.sqrt(np.mean(r**2)))
    return sol.x, half, rms


def fit_power_law(N: Sequence[float], L: Sequence[float], bootstrap: int = 0, seed: int = 0) -> Fit:
    """Fit L(N) = alpha * N**beta + L_irr (beta < 0 for a loss that falls with N).

    Parametrised as (log alpha, beta, log L_irr) so alpha, L_irr > 0; residuals are in log L.
    Needs >= 3 points (>= 4 for meaningful intervals)."""
    N = _as_array("N", N)
    L = _as_array("L", L)
    if N.shape != L.shape:
        raise ValueError(f"N and L differ in length ({N.size} vs {L.size})")
    if N.size < 3:
        raise ValueError("fit_power_law needs at least 3 sweep points (3 parameters)")

    def solve(n, l):
        # initial guess: L_irr a bit below the smallest loss, slope from the first/last points
        irr0 = 0.5 * l.min()
        span = max(np.log(n.max() / n.min()), 1e-9)
        beta0 = (np.log(max(l[n.argmax()] - irr0, 1e-12)) - np.log(max(l[n.argmin()] - irr0, 1e-12))) / span
        beta0 = min(beta0, -1e-3)
        a0 = np.log(max(l[n.argmin()] - irr0, 1e-12)) - beta0 * np.log(n.min())
        x0 = np.array([a0, beta0, np.log(irr0)])

        def residual(p):
            pred = np.exp(p[0]) * n ** p[1] + np.exp(p[2])
            return np.log(pred) - np.log(l)

        return _least_squares(residual, x0, n.size, ["log_alpha", "beta", "log_L_irr"])

    x, half, rms = solve(N, L)
    params = {"alpha": float(np.exp(x[0])), "beta": float(x[1]), "L_irr": float(np.exp(x[2]))}
    ci = {
        "alpha": (float(np.exp(x[0] - half[0])), float(np.exp(x[0] + half[0]))),
        "beta": (float(x[1] - half[1]), float(x[1] + half[1])),
        "L_irr": (float(np.exp(x[2] - half[2])), float(np.exp(x[2] + half[2]))),
    }
    fit = Fit("L(N) = alpha * N^beta + L_irr", params, ci, rms, int(N.size))
    if bootstrap:
        fit.bootstrap_ci95 = _bootstrap(lambda idx: solve(N[idx], L[idx])[0], N.size, bootstrap, seed,
                                        {"alpha": lambda p: math.exp(p[0]), "beta": lambda p: p[1],
                                         "L_irr": lambda p: math.exp(p[2])})
    return fit


def fit_joint_law(N: Sequence[float], k: Sequence[float], L: Sequence[float]) -> Fit:
    """Fit the paper's joint law L(N, k) = exp(a + b_k log k + b_n log N + g log k log N) + exp(z + h log k).

    The first term is the reducible loss (falls with N at a k-dependent rate), the second the
    irreducible loss at that k. Needs >= 7 points spread over N and k."""
    N = _as_array("N", N)
    k = _as_array("k", k)
    L = _as_array("L", L)
    if not (N.shape == k.shape == L.shape):
        raise ValueError("N, k and L must have the same length")
    if N.size < 7:
        raise ValueError("fit_joint_law needs at least 7 sweep points (6 parameters)")
    lk, ln = np.log(k), np.log(N)

    def residual(p):
        pred = np.exp(p[0] + p[1] * lk + p[2] * ln + p[3] * lk * ln) + np.exp(p[4] + p[5] * lk)
        return np.log(pred) - np.log(L)

    x0 = np.array([np.log(L.max()), -0.5, -0.3, 0.0, np.log(0.5 * L.min()), -0.5])
    x, half, rms = _least_squares(residual, x0, N.size, ["a", "b_k", "b_n", "g", "z", "h"])
    names = ["a", "b_k", "b_n", "g", "z", "h"]
    return Fit(
        "L(N,k) = exp(a + b_k log k + b_n log N + g log k log N) + exp(z + h log k)",
        {n: float(v) for n, v in zip(names, x)},
        {n: (float(v - h), float(v + h)) for n, v, h in zip(names, x, half)},
        rms,
        int(N.size),
    )


def _bootstrap(refit, n: int, reps: int, seed: int, transforms: dict) -> dict[str, tuple[float, float]]:
    rng = np.random.default_rng(seed)
    draws = {name: [] for name in transforms}
    for _ in range(reps):
        idx = rng.integers(0, n, n)
        if len(np.unique(idx)) < 3:
            continue
        try:
            p = refit(idx)
        except Exception:  # a resample can be degenerate; skip it
            continue
        for name, f in transforms.items():
            draws[name].append(f(p))
    return {name: (float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))) for name, v in draws.items() if v}


def plot_power_law(N: Sequence[float], L: Sequence[float], fit: Fit, path: str | Path, title: str = "") -> Path:
    """Log-log plot of the sweep points and the fitted L(N); returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    N = np.asarray(N, dtype=float)
    L = np.asarray(L, dtype=float)
    grid = np.geomspace(N.min() / 1.5, N.max() * 4, 200)
    p = fit.params
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.loglog(N, L, "o", label="sweep")
    ax.loglog(grid, p["alpha"] * grid ** p["beta"] + p["L_irr"], "-",
              label=f"fit: beta={p['beta']:.3f} [{fit.ci95['beta'][0]:.3f}, {fit.ci95['beta'][1]:.3f}]")
    ax.axhline(p["L_irr"], ls=":", c="gray", label=f"L_irr={p['L_irr']:.3g}")
    ax.set_xlabel("latents N")
    ax.set_ylabel("normalized MSE")
    ax.set_title(title or "SAE scaling law")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

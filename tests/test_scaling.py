"""Scaling-law fits recover known parameters from synthetic sweeps."""

import numpy as np
import pytest

from hf_sae.scaling import fit_joint_law, fit_power_law, plot_power_law


def test_power_law_recovers_known_parameters(tmp_path):
    N = np.array([2**i for i in range(10, 18)], dtype=float)
    alpha, beta, irr = 3.0, -0.35, 0.04
    rng = np.random.default_rng(0)
    L = (alpha * N**beta + irr) * np.exp(rng.normal(0, 0.002, N.size))
    fit = fit_power_law(N, L, bootstrap=50)
    assert fit.params["beta"] == pytest.approx(beta, abs=0.02)
    assert fit.params["L_irr"] == pytest.approx(irr, rel=0.1)
    assert fit.ci95["beta"][0] < beta < fit.ci95["beta"][1]
    assert fit.bootstrap_ci95["beta"][0] <= fit.params["beta"] <= fit.bootstrap_ci95["beta"][1]
    assert fit.rms_log_residual < 0.01
    png = plot_power_law(N, L, fit, tmp_path / "fit.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_joint_law_recovers_known_parameters():
    true = dict(a=1.0, b_k=-0.6, b_n=-0.3, g=0.02, z=-3.0, h=-0.4)
    N, k = np.meshgrid([2.0**i for i in range(11, 17)], [8.0, 16.0, 32.0, 64.0])
    N, k = N.ravel(), k.ravel()
    lk, ln = np.log(k), np.log(N)
    L = np.exp(true["a"] + true["b_k"] * lk + true["b_n"] * ln + true["g"] * lk * ln) + np.exp(
        true["z"] + true["h"] * lk
    )
    fit = fit_joint_law(N, k, L)
    for name in ("b_n", "b_k", "h"):
        assert fit.params[name] == pytest.approx(true[name], abs=0.05), name
    assert fit.rms_log_residual < 1e-3


@pytest.mark.parametrize(
    "N, L, match", [([1, 2], [1, 1], "at least 3"), ([1, 2, 3], [1, -1, 1], "positive"), ([1, 2, 3], [1, 1], "differ")]
)
def test_bad_sweeps_raise(N, L, match):
    with pytest.raises(ValueError, match=match):
        fit_power_law(N, L)

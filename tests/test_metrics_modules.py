"""The `evaluate` modules in hf_sae/metrics load by path offline and equal the functions they wrap,
whether fed one batch at a time (add) or all rows at once (compute with columns)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hf_sae import SAEConfig, SparseAutoencoder
from hf_sae.evaluation import ReconstructionStats, fvu
from hf_sae.evaluation.afa import AFAStats, afa_batch_stats, afa_norms, zf_norms
from hf_sae.evaluation.downstream import DownstreamStats, downstream_batch_stats
from hf_sae.evaluation.probes import summarize_probe_results
from hf_sae.evaluation.reconstruction import dead_latents_batch_stats, fvu_batch_stats, l0_batch_stats

evaluate = pytest.importorskip("evaluate")
METRICS = Path(__file__).resolve().parents[1] / "hf_sae" / "metrics"


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def _load(name):
    return evaluate.load(str(METRICS / name))


@pytest.fixture(scope="module")
def batches():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in=16, n_latents=64, k=4)).eval()
    x = torch.randn(600, 16, generator=g) * 2 + 1
    with torch.no_grad():
        out = sae(x)
    chunks = [slice(s, s + 128) for s in range(0, 600, 128)]
    return sae, x, out, chunks


def test_fvu_module(batches):
    sae, x, out, chunks = batches
    m = _load("fvu")
    for sl in chunks:
        m.add(**fvu_batch_stats(x[sl], out.reconstruction[sl]))
    r = m.compute()
    ref = ReconstructionStats()
    ref.update(x, out.reconstruction)
    ref = ref.compute()
    assert r["fvu"] == pytest.approx(fvu(x, out.reconstruction), rel=1e-12)
    for k in ("fvu", "mse", "explained_variance"):
        assert r[k] == pytest.approx(ref[k], rel=1e-12), k
    assert r["n_tokens"] == 600
    # all rows at once (columns) gives the same
    rows = [fvu_batch_stats(x[sl], out.reconstruction[sl]) for sl in chunks]
    r2 = _load("fvu").compute(**{k: [row[k] for row in rows] for k in rows[0]})
    assert r2["fvu"] == pytest.approx(r["fvu"], rel=1e-12)


def test_l0_and_dead_latents_modules(batches):
    sae, x, out, chunks = batches
    ref = ReconstructionStats(n_latents=64)
    ref.update(x, out.reconstruction, out.latent_values, out.latent_indices)
    want = ref.compute()
    m_l0, m_dead = _load("l0"), _load("dead_latents")
    for sl in chunks:
        m_l0.add(**l0_batch_stats(out.latent_values[sl], out.latent_indices[sl]))
        m_dead.add(**dead_latents_batch_stats(64, out.latent_values[sl], out.latent_indices[sl]))
    r_l0, r_dead = m_l0.compute(), m_dead.compute()
    assert r_l0["l0"] == pytest.approx(want["l0"], rel=1e-12)
    assert r_l0["l0_std"] == pytest.approx(want["l0_std"], abs=1e-12)
    assert r_l0["l0_histogram"] == ref.histograms()["l0"]["counts"]
    assert r_dead["dead_fraction"] == pytest.approx(want["dead_fraction"])
    assert r_dead["n_dead"] == want["n_dead"] and r_dead["n_latents"] == 64
    assert r_dead["density_log10_histogram"] == ref.histograms()["density_log10"]


def test_downstream_loss_module():
    g = torch.Generator().manual_seed(1)
    rows, ref = [], DownstreamStats()
    for _ in range(4):
        per = {k: torch.rand(37, generator=g) + 2 for k in ("ce_clean", "ce_spliced", "kl", "ce_zero", "ce_mean")}
        per["kl"] = per["kl"] - 2
        rows.append(downstream_batch_stats(per))
        ref.update(**per)
    m = _load("downstream_loss")
    for r in rows:
        m.add(**r)
    got, want = m.compute(), ref.compute()
    assert set(got) == set(want)
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-12), k
    # without ablations: the keys are absent, not NaN
    m2 = _load("downstream_loss")
    for r in rows:
        m2.add(**{**r, "sum_ce_zero": None, "sum_ce_mean": None})
    got2 = m2.compute()
    assert "frac_recovered_zero" not in got2 and got2["delta_loss"] == pytest.approx(want["delta_loss"], rel=1e-12)


def test_probe_recovery_module():
    rows = [{"task": "a", "method": "sae", "test_loss": 0.1, "prior_loss": 0.6},
            {"task": "a", "method": "raw_basis", "test_loss": 0.3, "prior_loss": 0.6},
            {"task": "b", "method": "sae", "test_loss": 0.2, "prior_loss": 0.4},
            {"task": "b", "method": "raw_basis", "test_loss": 0.35, "prior_loss": 0.4}]
    m = _load("probe_recovery")
    m.add_batch(**{k: [r[k] for r in rows] for k in rows[0]})
    got = m.compute()
    want = summarize_probe_results(rows)
    assert got["mean_probe_loss"]["sae"] == pytest.approx(0.15)
    assert got["mean_probe_loss"]["raw_basis"] == pytest.approx(0.325)
    assert got["mean_prior_loss"] == pytest.approx(0.5)
    assert got == want


def test_afa_module(batches):
    sae, x, out, chunks = batches
    m = _load("afa")
    ref = AFAStats()
    ref.update_from_sae(sae, x, out)
    for sl in chunks:
        args = (x[sl], sae.b_dec.detach(), sae.decoder_norms().detach(), out.latent_values[sl],
                out.latent_indices[sl], None, sae.config.input_scale)
        m.add(**afa_batch_stats(*afa_norms(*args), zf=zf_norms(*args), n_latents=sae.config.n_latents))
    got, want = m.compute(), ref.compute()
    assert {"eps_lbo_mean", "eps_lbo_h1_mean", "zf_frac_in_025", "afa_gap_mean"} <= set(want)
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-12), k

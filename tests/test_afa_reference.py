"""top-AFA, the AFA loss, ε_LBO and the decoder ε statistics against a transcription of the authors'
formulas (SewoongLee/top-afa-sae: ``training/sae.py`` TopAFASAE / get_loss_dict, and
``visualization/zf-plot.ipynb``), in float64 on random weights with non-unit decoder rows, b_dec != 0
and b_enc != 0 so that each convention (centring, decoder norms, b_enc) makes a difference."""

import math

import pytest
import torch

from hf_sae import SAEConfig, SparseAutoencoder
from hf_sae.activations import afa_k
from hf_sae.evaluation.afa import AFAStats, afa_batch_stats, afa_norms, decoder_cosine_stats, eps_lbo, zf_norms
from hf_sae.training import SAETrainingArguments as TrainingArguments

D, N = 6, 24


def _sae(activation="topafa", variant="reference", k=None, afa_coef=0.25, kernel="dense", seed=0):
    torch.manual_seed(seed)
    sae = SparseAutoencoder(SAEConfig(d_in=D, n_latents=N, activation=activation, k=k, afa_coef=afa_coef,
                                      afa_variant=variant, kernel=kernel)).double()
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(N, D, dtype=torch.float64) * 0.25)
        sae.W_dec.copy_(torch.randn(N, D, dtype=torch.float64) * torch.rand(N, 1, dtype=torch.float64).add(0.5))
        sae.b_dec.copy_(torch.randn(D, dtype=torch.float64) * 0.3)
        sae.b_enc.copy_(torch.randn(N, dtype=torch.float64) * 0.5)
    return sae


# ----------------------------------------------------------------- transcriptions of the authors' code
def authors_topafa(x, W_enc, W_dec, b_dec):
    """TopAFASAE.forward (W_enc here is [n, d], theirs [d, n]); returns (acts_topk [N, n], x_reconstruct)."""
    x_cent = x - b_dec
    acts = torch.relu(x_cent @ W_enc.T)
    afa = torch.norm(x_cent, p=2, dim=1, keepdim=True).pow(2)
    dec_scaled_acts = (acts * torch.norm(W_dec, p=2, dim=-1)).pow(2)
    max_indices = torch.argsort(dec_scaled_acts, dim=-1, descending=True)
    cumulative_fa = torch.cumsum(torch.gather(dec_scaled_acts, -1, max_indices), dim=-1)
    cumulative_fa[..., -1] = 1e8
    afa = torch.sqrt(afa)
    cumulative_fa = torch.sqrt(cumulative_fa)
    k = torch.abs(cumulative_fa - afa).argmin(dim=-1) + 1
    mask = torch.zeros_like(acts, dtype=torch.bool).scatter_(
        1, max_indices, torch.arange(acts.shape[1]).unsqueeze(0) < k.unsqueeze(1))
    acts_topk = acts * mask
    return acts_topk, acts_topk @ W_dec + b_dec


def authors_afa_loss(acts_topk, x):
    """get_loss_dict's afa term without its coefficient."""
    return torch.mean((torch.norm(acts_topk, p=2, dim=-1) - torch.norm(x, p=2, dim=-1)).pow(2))


def authors_elbo(x, f, W_dec, b_dec, h):
    """zf-plot.ipynb per token: f_tilde = append(f * ||W_dec rows||, ||b_dec||); elbo = |z'z - f'f| / ((h-1) f'f)."""
    out = []
    for zi, fi in zip(x, f):
        f_tilde = torch.cat([fi * W_dec.norm(dim=1), b_dec.norm().reshape(1)])
        ztz, ftf = zi @ zi, f_tilde @ f_tilde
        out.append(abs(ztz - ftf) / ((h - 1) * ftf))
    return torch.stack(out)


# ----------------------------------------------------------------- tests
@pytest.mark.parametrize("kernel", ["dense", "torch"])
def test_topafa_forward_and_afa_loss_equal_the_authors(kernel):
    sae = _sae(kernel=kernel)
    x = torch.randn(40, D, dtype=torch.float64) * 2
    acts_topk, x_rec = authors_topafa(x, sae.W_enc.detach(), sae.W_dec.detach(), sae.b_dec.detach())
    assert (acts_topk > 0).sum(-1).max() > 1  # a real per-token k, not a degenerate case
    sae.train()
    out = sae(x, return_dense=True)
    torch.testing.assert_close(out.latents, acts_topk, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.reconstruction, x_rec, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.afa_loss, authors_afa_loss(acts_topk, x), rtol=1e-12, atol=0)
    # b_enc takes no part (the authors' top-AFA has none) and gets no gradient
    out.loss.backward()
    assert sae.b_enc.grad is None and not sae.b_enc.requires_grad
    assert sae.W_enc.grad is not None and sae.W_enc.grad.abs().sum() > 0


def test_afa_loss_reference_for_topk_and_the_centred_variant():
    x = torch.randn(30, D, dtype=torch.float64)
    sae = _sae("topk", k=4)
    out = sae(x, return_dense=True)
    assert float(out.afa_loss.detach()) == pytest.approx(float(authors_afa_loss(out.latents.detach(), x)), rel=1e-12)
    # the centred variant: mean((||z * ||W_dec,i|| || - ||x - b_dec||)^2), a different number on these weights
    c = _sae("topk", variant="centred", k=4)
    with torch.no_grad():
        outc = c(x, return_dense=True)
    want = ((outc.latents * c.W_dec.norm(dim=-1)).norm(dim=-1) - (x - c.b_dec).norm(dim=-1)).square().mean()
    assert float(outc.afa_loss) == pytest.approx(float(want), rel=1e-12)
    assert abs(float(outc.afa_loss) - float(out.afa_loss)) > 1e-3
    # centred top-AFA keeps b_enc in its pre-activations
    t = _sae("topafa", variant="centred")
    assert t.b_enc.requires_grad
    pre = torch.nn.functional.linear(x - t.b_dec, t.W_enc, t.b_enc).relu()
    k, order = afa_k(pre, t.decoder_norms(), (x - t.b_dec).norm(dim=-1))
    assert ((t(x, return_dense=True).latents > 0).sum(-1) <= k).all()


def test_eps_lbo_zf_norms_and_decoder_eps_equal_the_authors():
    sae = _sae("topk", k=5)
    x = torch.randn(25, D, dtype=torch.float64) * 3
    out = sae(x, return_dense=True)
    want = authors_elbo(x, out.latents, sae.W_dec.detach(), sae.b_dec.detach(), N)
    xz, fz = zf_norms(x, sae.b_dec.detach(), sae.decoder_norms().detach(), out.latent_values, out.latent_indices)
    torch.testing.assert_close(xz, x.norm(dim=-1), rtol=1e-13, atol=0)
    torch.testing.assert_close(eps_lbo(xz, fz, N), want, rtol=1e-12, atol=0)
    stats = AFAStats()
    stats.update_from_sae(sae, x, out)
    res = stats.compute()
    assert res["eps_lbo_mean"] == pytest.approx(float(want.mean()), rel=1e-12)
    assert res["eps_lbo_h1_mean"] == pytest.approx(float(want.mean()) * (N - 1), rel=1e-12)
    r = (xz.square() - fz.square()) / fz.square()
    assert res["eps_lbo_h1_signed_mean"] == pytest.approx(float(r.mean()), rel=1e-12)
    assert res["zf_frac_in_050"] == pytest.approx(float((r.abs() <= 0.5).double().mean()))
    assert stats.points[0].shape == (25,)
    # the per-batch form gives the same numbers
    c = afa_norms(x, sae.b_dec.detach(), sae.decoder_norms().detach(), out.latent_values, out.latent_indices)
    assert afa_batch_stats(*c, zf=(xz, fz), n_latents=N)["sum_lbo"] == pytest.approx(stats.sum_lbo, rel=1e-12)
    # epsilon_max / epsilon_mean: signed off-diagonal entries of W W^T (unit rows, as the authors train them)
    W = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=-1, keepdim=True)
    off = (W @ W.T)[~torch.eye(N, dtype=torch.bool)]
    cs = decoder_cosine_stats(sae.W_dec.detach(), chunk=7)
    assert cs["eps_max"] == pytest.approx(float(off.max()), rel=1e-12)
    assert cs["eps_mean"] == pytest.approx(float(off.mean()), rel=1e-12, abs=1e-15)
    assert cs["cos_abs_max"] == pytest.approx(float(off.abs().max()), rel=1e-12)
    assert cs["cos_abs_mean"] == pytest.approx(float(off.abs().mean()), rel=1e-12)
    assert cs["eps_mean"] < cs["cos_abs_mean"]  # signed and absolute are different statistics here


def test_topafa_has_no_k_cap_by_default_and_k_is_at_most_n_minus_1():
    assert SAEConfig(activation="topafa").k is None
    assert SAEConfig(activation="topk").k == 32 and SAEConfig(activation="relu").k == 32
    args = TrainingArguments(hook_points=["layers.3.resid_post"], activation="topafa")
    assert args.sae_config_kwargs(576)["k"] is None
    assert TrainingArguments(hook_points=["layers.3.resid_post"]).sae_config_kwargs(576)["k"] is None
    assert SAEConfig(**TrainingArguments(hook_points=["layers.3.resid_post"]).sae_config_kwargs(576)).k == 32
    # a token whose ||x - b_dec|| needs 50 of 64 equal latents: uncapped k(x) = 50; with the old default
    # cap of 32 it would stop at 32
    n = 64
    sae = SparseAutoencoder(SAEConfig(d_in=n, n_latents=n, activation="topafa")).double()
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(n, dtype=torch.float64))
        sae.W_dec.copy_(torch.eye(n, dtype=torch.float64))
        sae.b_dec.zero_()
    x = torch.zeros(2, n, dtype=torch.float64)
    x[0, :50] = 1.0  # ||x|| = sqrt(50): exactly 50 unit activations reach it
    x[1] = 1.0  # every latent at 1: k(x) would be n, the authors' rule stops at n - 1
    out = sae(x, return_dense=True)
    assert (out.latents > 0).sum(-1).tolist() == [50, n - 1]
    assert afa_k(torch.ones(1, n), torch.ones(n), torch.tensor([1e6]))[0].item() == n - 1
    capped = SparseAutoencoder(SAEConfig(d_in=n, n_latents=n, activation="topafa", k=32)).double()
    capped.load_state_dict(sae.state_dict())
    assert (capped(x, return_dense=True).latents > 0).sum(-1).tolist() == [32, 32]


def test_the_afa_variant_is_validated_and_saved(tmp_path):
    with pytest.raises(ValueError, match="afa_variant"):
        SAEConfig(activation="topafa", afa_variant="centered?")
    sae = _sae(variant="centred")
    sae.save_pretrained(tmp_path)
    again = SparseAutoencoder.from_pretrained(tmp_path)
    assert again.config.afa_variant == "centred" and again.config.k is None
    with pytest.raises(ValueError, match="afa_variant"):
        TrainingArguments(hook_points=["layers.3.resid_post"], afa_variant="x").validate()
    assert math.isfinite(float(again(torch.randn(3, D, dtype=torch.float64)).afa_loss))


def test_topafa_starts_from_b_dec_zero_by_default(tmp_path):
    # the authors' code starts b_dec at 0; with a geometric-median b_dec the reference AFA loss keeps a floor
    # (||x|| - ||x - b_dec||)^2 and training shrinks L0 (benchmarks/RESULTS_afa.md)
    from hf_sae.training import SAETrainer

    hp = "layers.3.resid_post"
    args = dict(hook_points=[hp], n_latents=32, train_tokens=256, batch_size=256, lr=1e-12, eval_every_tokens=0,
                checkpoint_every_tokens=0, log_with=["jsonl"], progress_bar=False, init_tokens=256, plot_report=False)
    assert TrainingArguments(**args, activation="topafa").b_dec_init_method == "zeros"
    assert TrainingArguments(**args, activation="topafa", afa_variant="centred").b_dec_init_method == "geometric_median"
    assert TrainingArguments(**args).b_dec_init_method == "geometric_median"
    assert TrainingArguments(**args, activation="topafa", b_dec_init="mean").b_dec_init_method == "mean"
    x = torch.randn(512, 8, generator=torch.Generator().manual_seed(0)) + 3.0  # far from the origin
    for act, zero in (("topafa", True), ("topk", False)):
        sae = SAETrainer(TrainingArguments(**args, activation=act, k=4 if act == "topk" else None,
                                           output_dir=str(tmp_path / act)), train_data=x).train()[hp]
        assert (sae.b_dec.abs().max().item() < 1e-6) == zero, act
        assert sae.config.training_info["recipe"]["b_dec_init"] == ("zeros" if zero else "geometric_median")

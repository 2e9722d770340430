"""Per-token input normalisation (``SAEConfig.input_norm``): the math against a hand computation, the
fused kernel path against the dense one, decode, save/load, training initialisation and the AFA metric."""

import pytest
import torch

from hf_sae import SAEConfig, SparseAutoencoder
from hf_sae.evaluation.afa import AFAStats
from hf_sae.training import SAETrainingArguments, initialize_sae, parse_args

F64 = torch.float64


def make(activation="topk", d=16, n=64, k=4, dtype=F64, **kw):
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in=d, n_latents=n, activation=activation, k=k, input_norm="layer_norm",
                                      **kw)).to(dtype)
    with torch.no_grad():  # biases off zero so that every term of the math is exercised
        sae.b_dec.normal_(0, 0.3)
        sae.b_enc.normal_(0, 0.1)
    return sae


def tokens(m=32, d=16, seed=1, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    # per-token offsets and scales far from 0 / 1: a normalisation bug cannot hide
    return (torch.randn(m, d, generator=g) * torch.rand(m, 1, generator=g) * 20 + torch.randn(m, 1, generator=g) * 5
            ).to(dtype)


def by_hand(sae, x, unbiased=True, eps=1e-5, s=1.0):
    """OpenAI sparse_autoencoder's LN (model.py) + TopK, written out."""
    mu = x.mean(-1, keepdim=True)
    xc = x - mu
    sigma = (xc.square().sum(-1, keepdim=True) / (x.shape[-1] - (1 if unbiased else 0))).sqrt()
    xn = s * xc / (sigma + eps)
    pre = (xn - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    v, i = pre.topk(sae.config.k, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, i, v.relu())
    rec = (z @ sae.W_dec + sae.b_dec) / s
    return z, rec * sigma + mu, (mu, sigma)


@pytest.mark.parametrize("unbiased, eps, s", [(True, 1e-5, 1.0), (False, 1e-3, 0.7)])
def test_layer_norm_matches_the_hand_computation(unbiased, eps, s):
    sae = make(input_norm_unbiased=unbiased, input_norm_eps=eps, input_scale=s)
    x = tokens()
    z, rec, (mu, sigma) = by_hand(sae, x, unbiased, eps, s)
    with torch.no_grad():
        out = sae(x, return_dense=True)
        assert torch.allclose(out.latents, z, atol=1e-12)
        assert torch.allclose(sae.encode(x), z, atol=1e-12)
        assert torch.allclose(out.reconstruction, rec, atol=1e-10)
        assert torch.allclose(out.mse, (rec - x).square().mean(), rtol=1e-10)  # caller's units
        stats = sae.input_norm_stats(x)
        assert torch.allclose(stats[0], mu) and torch.allclose(stats[1], sigma)
        assert torch.allclose(sae.decode(*sae.encode_sparse(x), norm_stats=stats), rec, atol=1e-10)
        # leading dims are kept
        assert torch.allclose(sae(x.reshape(4, 8, 16)).reconstruction, rec.reshape(4, 8, 16), atol=1e-10)
    # the reconstruction comes back in the caller's units: scaling and shifting tokens moves it along
    # (exactly once eps scales with sigma)
    sae.config.input_norm_eps = 3 * eps
    with torch.no_grad():
        moved = sae(3 * x + 7).reconstruction
    assert torch.allclose(moved, 3 * rec + 7, rtol=1e-10, atol=1e-9)


def test_decode_without_the_token_statistics_is_an_error():
    sae = make()
    z = sae.encode(tokens())
    with pytest.raises(ValueError, match=r"norm_stats=sae.input_norm_stats\(x\)"):
        sae.decode(z)


@pytest.mark.parametrize("bad, field", [(dict(input_norm="rms"), "input_norm"), (dict(input_norm_eps=0.0),
                                        "input_norm_eps"), (dict(input_norm_unbiased=1), "input_norm_unbiased")])
def test_bad_input_norm_fields_are_named(bad, field):
    with pytest.raises(ValueError, match=f"SAEConfig.{field}="):
        SAEConfig(d_in=8, n_latents=16, k=4, **bad)


def test_fused_path_equals_the_dense_path_values_and_gradients():
    x = tokens(64, dtype=torch.float32)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::3] = True
    results = {}
    for kernel in ("torch", "dense"):
        sae = make(dtype=torch.float32, kernel=kernel, multi_topk=False)
        sae.train()
        out = sae(x, dead_mask=dead)
        out.loss.backward()
        results[kernel] = (out, {n: p.grad.clone() for n, p in sae.named_parameters()})
    (a, ga), (b, gb) = results["torch"], results["dense"]
    for field in ("loss", "fvu", "mse", "auxk_loss", "reconstruction"):
        assert torch.allclose(getattr(a, field), getattr(b, field), rtol=1e-5, atol=1e-6), field
    assert float(a.auxk_loss.detach()) > 0  # the AuxK branch ran
    for name in ga:
        assert torch.allclose(ga[name], gb[name], rtol=1e-4, atol=1e-6), name


def test_config_round_trip_and_training_argument(tmp_path):
    sae = make(dtype=torch.float32, input_norm_eps=1e-4)
    sae.save_pretrained(tmp_path / "sae")
    import json

    cfg = json.loads((tmp_path / "sae" / "config.json").read_text())
    assert (cfg["input_norm"], cfg["input_norm_eps"], cfg["input_norm_unbiased"]) == ("layer_norm", 1e-4, True)
    loaded = SparseAutoencoder.from_pretrained(tmp_path / "sae")
    x = tokens(dtype=torch.float32)
    assert torch.equal(loaded(x).reconstruction, sae(x).reconstruction)
    args = parse_args(["--hook_points", "layers.0.resid_post", "--input_norm", "layer_norm"])
    assert args.sae_config(d_in=16).input_norm == "layer_norm"
    with pytest.raises(ValueError, match="--input_norm"):
        SAETrainingArguments(hook_points=["layers.0.resid_post"], input_norm="rms").sae_config(d_in=16)


def test_initialisation_measures_the_normalised_sample():
    sae = make(dtype=torch.float32)
    x = tokens(256, dtype=torch.float32)
    info = initialize_sae(sae, x, b_dec_init="mean", input_scale=123.0)  # a raw-units cache scale is ignored
    xc = x - x.mean(-1, keepdim=True)
    ln = xc / (xc.std(-1, keepdim=True) + 1e-5)
    s = (16 / ln.square().sum(-1).mean()).sqrt()
    assert info["input_scale"] == pytest.approx(float(s), rel=1e-5)  # ~ sqrt(16/15): LN rows have ||x||^2 ~ d-1
    assert torch.allclose(sae.b_dec, (ln * s).mean(0), atol=1e-5)


def test_afa_metric_uses_the_normalised_input():
    sae = make(dtype=F64, input_scale=0.5)
    x = tokens()
    with torch.no_grad():
        out = sae(x)
        stats = AFAStats()
        stats.update_from_sae(sae, x, out)
        _, _, (mu, sigma) = by_hand(sae, x, s=0.5)
        xn = 0.5 * (x - mu) / (sigma + 1e-5)
        x_norm = (xn - sae.b_dec).norm(dim=-1)
        dense = sae.encode(x)
        z_norm = (dense * sae.W_dec.norm(dim=-1)).norm(dim=-1)
    px, pf = stats.points  # the ZF pair: ||x|| of the normalised input (not centred), ||f~|| with ||b_dec||
    assert torch.allclose(px.double(), xn.norm(dim=-1), rtol=1e-6)
    assert torch.allclose(pf.double(), (z_norm.square() + sae.b_dec.square().sum()).sqrt(), rtol=1e-6)
    gap = (x_norm.square() - z_norm.square()) / x_norm.square()  # the centred relative gap
    assert stats.compute()["afa_gap_mean"] == pytest.approx(float(gap.mean()), rel=1e-6)


def test_training_with_layer_norm_learns_and_saves_it(tmp_path):
    from test_training import HP, small_args, synthetic

    from hf_sae.training import SAETrainer

    x = synthetic(4096) * torch.linspace(0.5, 4, 4096)[:, None]  # token norms spread over a decade
    trainer = SAETrainer(small_args(tmp_path, input_norm="layer_norm"), train_data=x)
    trainer.train()
    hist = [r[f"{HP}/fvu"] for r in trainer.state.history if f"{HP}/fvu" in r]
    assert hist[-1] < 0.5 * hist[0]
    loaded = SparseAutoencoder.from_pretrained(tmp_path / "out" / HP)
    assert loaded.config.input_norm == "layer_norm"
    with torch.no_grad():  # reconstructions in the data's units
        rel = (loaded(x[:512]).reconstruction - x[:512]).square().sum() / (x[:512] - x[:512].mean(0)).square().sum()
    assert float(rel) < 0.25

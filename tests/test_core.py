"""Core: SAEConfig, SparseAutoencoder, the activation registry, AuxK and the save/load round trip."""

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel

from hf_sae import ACTIVATIONS, SAEConfig, SparseAutoencoder
from hf_sae.activations import afa_k, jumprelu_fn, step_fn
from hf_sae.modeling_sae import sparse_decode_reference

ALL = sorted(ACTIVATIONS)


def make(activation="topk", d=16, n=64, k=4, **kw):
    torch.manual_seed(0)
    return SparseAutoencoder(SAEConfig(d_in=d, n_latents=n, activation=activation, k=k, **kw))


# ------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(d_in=0), "d_in"),
        (dict(d_in=16, n_latents=-3), "n_latents"),
        (dict(d_in=16, n_latents=32, k=33), "k"),
        (dict(d_in=16, n_latents=32, activation="softmax"), "activation"),
        (dict(d_in=16, n_latents=32, aux_coef=float("nan")), "aux_coef"),
        (dict(d_in=16, n_latents=32, input_scale=0.0), "input_scale"),
        (dict(d_in=16, n_latents=32, kernel="cuda"), "kernel"),
        (dict(d_in=16, n_latents=32, k_aux=64), "k_aux"),
        (dict(d_in=16, n_latents=32, k=16, multi_topk=True), "multi_topk"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"SAEConfig\.{field}="):
        SAEConfig(**kwargs)


def test_config_expansion_factor_and_defaults():
    cfg = SAEConfig(d_in=576, expansion_factor=16)
    assert cfg.n_latents == 9216 and cfg.effective_k_aux == 288 and cfg.aux_coef == 1 / 32
    assert SAEConfig(d_in=10).n_latents == 80  # default expansion 8


# ------------------------------------------------------------------------------------- init
def test_tied_init_unit_rows():
    sae = make(n=128)
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(128), atol=1e-6)
    assert torch.equal(sae.W_enc, sae.W_dec)
    assert torch.count_nonzero(sae.b_enc) == 0 and torch.count_nonzero(sae.b_dec) == 0


def test_normalize_and_parallel_grad_projection():
    sae = make()
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(64, 1) + 0.5)
    sae.normalize_decoder_()
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(64), atol=1e-6)
    sae.W_dec.grad = torch.randn_like(sae.W_dec)
    before = sae.W_dec.grad.clone()
    norm = sae.remove_parallel_grad_()
    assert (sae.W_dec.grad * sae.W_dec).sum(-1).abs().max() < 1e-5
    assert (before - sae.W_dec.grad).abs().max() > 1e-3  # it did remove something
    # the returned norm is the projected gradient's (computed block by block), not the original's
    assert norm.item() == pytest.approx(sae.W_dec.grad.norm().item(), rel=1e-5)
    assert norm.item() < before.norm().item() * (1 - 1e-4)


# ------------------------------------------------------------------------------------- activations
def test_topk_keeps_exactly_k():
    sae = make("topk", k=5)
    x = torch.randn(7, 16) * 3
    out = sae(x)
    assert out.latent_values.shape == (7, 5)
    dense = sae.encode(x)
    assert ((dense > 0).sum(-1) <= 5).all()
    # the kept latents are the 5 largest pre-activations
    pre = (x - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    top = pre.topk(5).indices.sort(-1).values
    assert torch.equal(out.latent_indices.sort(-1).values, top)


def test_batchtopk_keeps_k_times_batch_and_estimates_threshold():
    sae = make("batchtopk", k=3)
    with torch.no_grad():
        sae.b_enc.fill_(5.0)  # every pre-activation positive, so exactly k*B survive
    x = torch.randn(8, 16)
    sae.train()
    z = sae(x).latents
    assert int((z > 0).sum()) == 3 * 8
    # the kept entries are the k*B largest pre-activations of the whole batch, not k per row
    pre = sae._pre(x).detach()
    want = torch.zeros_like(pre, dtype=torch.bool).view(-1)
    want[pre.view(-1).topk(3 * 8).indices] = True
    assert torch.equal(z.detach() > 0, want.view_as(pre))
    assert not bool(((z > 0).sum(-1) == 3).all())  # and with this seed they are not k per row
    thr = float(sae.batchtopk_threshold)
    assert thr == pytest.approx(float(z[z > 0].min().detach()))  # first estimate = the batch's smallest kept value
    sae.eval()
    z_eval = sae.encode(x)
    assert torch.equal(z_eval > 0, (sae._pre(x) > thr) & (sae._pre(x) > 0))


def test_batchtopk_untrained_falls_back_to_topk():
    sae = make("batchtopk", k=3)
    sae.eval()
    assert ((sae.encode(torch.randn(5, 16)) > 0).sum(-1) <= 3).all()


def test_topafa_k_matches_hand_computation():
    # one token: activations 3, 0, 4, 1 with unit decoder norms -> sorted s = 16, 9, 1, 0
    # cumulative norms c = 4, 5, sqrt(26)=5.099, 5.099; target ||x - b_dec|| = 5.02 -> j=1 (0-based) -> k = 2
    acts = torch.tensor([[3.0, 0.0, 4.0, 1.0]])
    k, order = afa_k(acts, torch.ones(4), torch.tensor([5.02]))
    assert k.tolist() == [2] and order[0, :2].tolist() == [2, 0]
    # with decoder norms (1, 1, 0.5, 1): s = 9, 4, 1 -> c = 3, sqrt(13)=3.606, sqrt(14)=3.742; target 3.7 -> k = 3
    k, order = afa_k(acts, torch.tensor([1.0, 1.0, 0.5, 1.0]), torch.tensor([3.7]))
    assert k.tolist() == [3] and order[0, :3].tolist() == [0, 2, 3]
    # target 0 -> k = 1 (never empty)
    assert afa_k(acts, torch.ones(4), torch.tensor([0.0]))[0].tolist() == [1]


def test_topafa_in_model_uses_per_token_k():
    sae = make("topafa", k=None, d=8, n=32)
    x = torch.randn(6, 8)
    out = sae(x)
    pre = sae._pre(x)
    k, _ = afa_k(pre.relu(), sae.decoder_norms(), (x - sae.b_dec).norm(dim=-1))
    assert torch.equal((out.latent_values > 0).sum(-1), torch.minimum(k, (pre > 0).sum(-1)))


def test_jumprelu_threshold_and_pseudo_gradient():
    pre = torch.tensor([[0.05, 0.1004, 0.2, -1.0]], requires_grad=True)
    theta = torch.tensor([0.1, 0.1, 0.1, 0.1], requires_grad=True)
    eps = 0.002
    z = jumprelu_fn(pre, theta, eps)
    assert torch.allclose(z.detach(), torch.tensor([[0.0, 0.1004, 0.2, 0.0]]))
    z.sum().backward()
    assert torch.equal(pre.grad, torch.tensor([[0.0, 1.0, 1.0, 0.0]]))
    # only latent 1 is within eps/2 of its threshold: d/dtheta = -(theta/eps) * 1
    assert torch.allclose(theta.grad, torch.tensor([0.0, -0.1 / eps, 0.0, 0.0]))
    theta.grad = None
    step_fn(pre.detach(), theta, eps).sum().backward()
    assert torch.allclose(theta.grad, torch.tensor([0.0, -1 / eps, 0.0, 0.0]))


def test_jumprelu_model_threshold_is_learned_by_l0():
    sae = make("jumprelu", l0_coef=1.0, jumprelu_init_threshold=0.5, jumprelu_bandwidth=10.0)
    out = sae(torch.randn(32, 16))
    out.loss.backward()
    assert sae.log_threshold.grad is not None and sae.log_threshold.grad.abs().sum() > 0
    assert out.l0_loss is not None and out.l0_loss > 0


def test_relu_l1_is_decoder_norm_weighted():
    sae = make("relu")
    with torch.no_grad():
        sae.W_dec[:32].mul_(2.0)
    x = torch.randn(5, 16)
    out = sae(x)
    z = sae._pre(x).relu()
    expected = (z * sae.W_dec.norm(dim=-1)).sum(-1).mean()
    assert torch.allclose(out.l1_loss, expected)


# ------------------------------------------------------------------------------------- forward / units
@pytest.mark.parametrize("activation", ALL)
def test_forward_caller_units_and_fvu(activation):
    sae = make(activation, k=8, input_scale=0.25)
    x = torch.randn(3, 5, 16) * 4
    out = sae(x)
    assert out.reconstruction.shape == x.shape
    # reconstruction in caller units: equals decode(encode(x)) and is x^_norm / s
    assert torch.allclose(out.reconstruction, sae.decode(sae.encode(x)), atol=1e-5)
    xf, rf = x.reshape(-1, 16), out.reconstruction.reshape(-1, 16)
    fvu = (rf - xf).square().sum() / (xf - xf.mean(0)).square().sum()
    assert torch.allclose(out.fvu, fvu, rtol=1e-4)
    assert torch.allclose(out.mse, (rf - xf).square().mean(), rtol=1e-4)
    assert torch.isfinite(out.loss)


def test_decode_sparse_equals_dense():
    sae = make(k=4)
    x = torch.randn(9, 16)
    v, i = sae.encode_sparse(x)
    assert torch.allclose(sae.decode(v, i), sae.decode(sae.encode(x)), atol=1e-6)


@pytest.mark.parametrize(
    "x, match",
    [
        (torch.randn(4, 15), r"expected \[\.\.\., 16\]"),
        (torch.tensor([[float("nan")] * 16]), "NaN/Inf"),
        (torch.ones(2, 16, dtype=torch.int64), "floating dtype"),
    ],
)
def test_bad_inputs_raise_clear_errors(x, match):
    with pytest.raises(ValueError, match=match):
        make()(x)


def test_dead_mask_validation():
    with pytest.raises(ValueError, match="dead_mask"):
        make()(torch.randn(4, 16), dead_mask=torch.ones(10, dtype=torch.bool))


# ------------------------------------------------------------------------------------- AuxK
def test_auxk_zero_without_dead_latents_and_finite_always():
    sae = make()
    x = torch.randn(16, 16)
    assert sae(x).auxk_loss == 0
    assert sae(x, dead_mask=torch.zeros(64, dtype=torch.bool)).auxk_loss == 0
    # degenerate batch (one token, zero residual variance) stays finite
    out = sae(x[:1], dead_mask=torch.ones(64, dtype=torch.bool))
    assert torch.isfinite(out.auxk_loss) and torch.isfinite(out.loss)


def test_auxk_hand_computed_and_revives_dead_latents():
    torch.manual_seed(1)
    sae = make(d=4, n=6, k=1, k_aux=2)
    x = torch.randn(5, 4)
    dead = torch.tensor([False, True, True, True, False, False])
    out = sae(x, dead_mask=dead)
    # by hand
    pre = (x - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    xhat = out.reconstruction.detach()
    e = x - xhat
    masked = pre.detach().clone()
    masked[:, ~dead] = -math.inf
    vals, idx = masked.topk(2, dim=-1)
    ehat = torch.stack([(vals[r].relu()[:, None] * sae.W_dec.detach()[idx[r]]).sum(0) for r in range(5)])
    expected = (ehat - e).square().sum() / (e - e.mean(0)).square().sum()
    assert torch.allclose(out.auxk_loss, expected, rtol=1e-5)
    # gradient reaches the encoder and decoder rows of the dead latents used (where their value > 0)
    with torch.no_grad():
        sae.b_enc[dead] = 10.0  # make the dead latents' pre-activations positive
    sae.zero_grad()
    sae(x, dead_mask=dead).auxk_loss.backward()
    used = torch.unique(sae._pre(x).masked_fill(~dead, -math.inf).topk(2).indices)
    assert (sae.W_enc.grad[used].abs().sum(-1) > 0).all()
    assert (sae.W_dec.grad[used].abs().sum(-1) > 0).all()
    assert (sae.b_enc.grad[used].abs() > 0).all()


# ------------------------------------------------------------------------------------- gradients
def test_sparse_decode_gradcheck_float64():
    torch.manual_seed(0)
    W = torch.randn(10, 5, dtype=torch.float64, requires_grad=True)
    v = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, 10, (3, 4))
    assert torch.autograd.gradcheck(lambda v, W: sparse_decode_reference(v, idx, W), (v, W))


def test_jumprelu_pre_gradient_gradcheck_away_from_threshold():
    pre = torch.tensor([[0.5, -0.3, 1.2, 0.05]], dtype=torch.float64, requires_grad=True)
    theta = torch.full((4,), 0.2, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda p: jumprelu_fn(p, theta, 1e-3), (pre,))


@pytest.mark.parametrize("activation", ["topk", "topafa", "relu"])
def test_full_forward_gradients_match_dense_reference(activation):
    """The model's gradients equal those of a hand-written dense forward (float64)."""
    torch.manual_seed(0)
    cfg = dict(d_in=6, n_latents=12, activation=activation, k=3 if activation != "topafa" else None)
    sae = SparseAutoencoder(SAEConfig(**cfg)).double()
    x = torch.randn(7, 6, dtype=torch.float64)
    dead = torch.zeros(12, dtype=torch.bool)
    dead[::3] = True
    sae(x, dead_mask=dead).loss.backward()
    got = {n: p.grad.clone() for n, p in sae.named_parameters() if p.requires_grad}  # topafa: no b_enc
    ref = SparseAutoencoder(SAEConfig(**cfg, kernel="dense")).double()
    ref.load_state_dict(sae.state_dict())
    ref(x, dead_mask=dead).loss.backward()
    for n, p in ref.named_parameters():
        if p.requires_grad:
            assert torch.allclose(got[n], p.grad, atol=1e-10), n


# ------------------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("activation", ALL)
def test_save_load_roundtrip_bit_exact(activation, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sae = make(activation, k=4, hook_point="layers.3.resid_post", base_model="tiny", input_scale=0.5)
    x = torch.randn(10, 16)
    sae.train()
    sae(x)  # batchtopk: estimate a threshold
    sae.eval()
    ref = sae(x)
    sae.save_pretrained(tmp_path / "sae")
    sae.save_pretrained(tmp_path / "repo" / "layers.3.resid_post")
    assert {"config.json", "model.safetensors", "modeling_sae.py", "configuration_sae.py", "activations.py"} <= set(
        os.listdir(tmp_path / "sae")
    )
    loaded = [
        SparseAutoencoder.from_pretrained(tmp_path / "sae"),
        SparseAutoencoder.from_pretrained(tmp_path / "repo", subfolder="layers.3.resid_post"),
        AutoModel.from_pretrained(tmp_path / "sae"),
    ]
    assert AutoConfig.from_pretrained(tmp_path / "sae").hook_point == "layers.3.resid_post"
    for model in loaded:
        assert isinstance(model, SparseAutoencoder)
        for (name, a), (_, b) in zip(sae.state_dict().items(), model.state_dict().items()):
            assert torch.equal(a, b), name
        out = model(x)
        assert torch.equal(out.reconstruction, ref.reconstruction)
        assert model.config.input_scale == 0.5 and model.config.base_model == "tiny"


def test_trust_remote_code_without_the_package(tmp_path):
    sae = make("topk", k=4, input_norm="layer_norm", input_scale=0.5)  # the remote copy honours both
    sae.save_pretrained(tmp_path / "sae")
    x = torch.randn(4, 16)
    torch.save(x, tmp_path / "x.pt")
    torch.save(sae(x).reconstruction, tmp_path / "ref.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["hf_sae"] = None  # `import hf_sae` fails in this process
        try:
            import hf_sae
        except ImportError:
            pass
        else:
            raise SystemExit("hf_sae importable")
        import torch
        from transformers import AutoModel
        m = AutoModel.from_pretrained(r"{tmp_path / 'sae'}", trust_remote_code=True)
        assert type(m).__module__.startswith("transformers_modules"), type(m).__module__
        x = torch.load(r"{tmp_path / 'x.pt'}", weights_only=True)
        ref = torch.load(r"{tmp_path / 'ref.pt'}", weights_only=True)
        assert torch.equal(m(x).reconstruction, ref)
        print("REMOTE_OK")
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert "REMOTE_OK" in proc.stdout, proc.stderr[-3000:]


def test_checkpoint_that_disagrees_with_config_names_the_tensor(tmp_path):
    sae = make()
    sae.save_pretrained(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    sd["W_enc"] = torch.zeros(32, 16)
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"W_enc.*\[32, 16\].*\[64, 16\]"):
        SparseAutoencoder.from_pretrained(tmp_path)
    del sd["W_enc"]
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensors \['W_enc'\]"):
        SparseAutoencoder.from_pretrained(tmp_path)


def test_corrupt_checkpoint_names_the_file(tmp_path):
    make().save_pretrained(tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        SparseAutoencoder.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------- ground truth
@pytest.mark.slow
def test_topk_sae_recovers_known_sparse_features():
    """Data from a known dictionary (d=64, 256 unit features, 4 active per sample, positive
    magnitudes); a briefly trained TopK SAE recovers >= 90% of the features at cosine >= 0.9."""
    g = torch.Generator().manual_seed(0)
    d, m, active = 64, 256, 4
    truth = torch.randn(m, d, generator=g)
    truth /= truth.norm(dim=-1, keepdim=True)

    def batch(b):
        idx = torch.rand(b, m, generator=g).argsort(-1)[:, :active]
        mags = torch.rand(b, active, generator=g) + 0.5
        return torch.zeros(b, m).scatter_(1, idx, mags) @ truth

    torch.manual_seed(1234)  # not 0: the SAE's init must not replay the generator that drew the truth
    sae = SparseAutoencoder(SAEConfig(d_in=d, n_latents=512, k=active))

    def recovery():
        best = (truth @ sae.W_dec.detach().T).max(-1).values  # best cosine per true feature
        return (best >= 0.9).float().mean().item(), best.mean().item()

    assert recovery()[0] < 0.05  # random init recovers nothing: the check below can fail
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    last_fire = torch.zeros(512, dtype=torch.long)
    tokens = 0
    for _step in range(300):
        x = batch(256)
        out = sae(x, dead_mask=(tokens - last_fire) > 2560)
        opt.zero_grad()
        out.loss.backward()
        sae.remove_parallel_grad_()
        opt.step()
        sae.normalize_decoder_()
        tokens += x.shape[0]
        last_fire[torch.unique(out.latent_indices[out.latent_values > 0])] = tokens
    recovered, mean_max_cos = recovery()
    print(f"recovered {recovered:.3f}, mean max cosine {mean_max_cos:.3f}, final fvu {out.fvu.item():.4f}")
    assert recovered >= 0.9
    assert mean_max_cos > 0.9
    assert out.fvu.item() < 0.2

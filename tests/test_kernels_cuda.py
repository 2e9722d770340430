"""The Triton kernels compiled for a real GPU (skipped without CUDA): the same products as the torch
reference at training-sized shapes, both table-gradient modes, and the fused training step against
the dense path on CUDA. Run on a GPU machine with ``pytest tests/test_kernels_cuda.py`` (not together
with tests/test_kernels.py, which switches Triton to its interpreter for the whole process).

Also holds the interpreter check of both table-gradient modes (``atomic``, the default, and the
deterministic latent-major ``sorted``) on CPU, so that both GPU paths are exercised in every CI run."""

import os

import pytest
import torch

from hf_sae import SAEConfig, SparseAutoencoder, kernels
from hf_sae.kernels import reference as ref

cuda = pytest.mark.skipif(not (torch.cuda.is_available() and kernels.triton_available()),
                          reason="needs a CUDA GPU and triton")
MODES = ["sorted", "atomic"]


@pytest.fixture
def tk(monkeypatch):
    if not kernels.triton_available():
        pytest.skip("triton not installed")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA and Triton not in interpreter mode")
    from hf_sae.kernels import triton_kernels

    return triton_kernels


def random_code(N, blocks, n, d, device, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    W = sum(blocks)
    idx = torch.randint(0, n, (N, W), generator=g)
    idx[0, 1] = idx[0, 0]  # a duplicated slot
    idx[-1, :] = 3  # a popular latent
    coef = torch.randn(N, W, generator=g)
    table = torch.randn(n, d, generator=g)
    grads = [torch.randn(N, d, generator=g) for _ in blocks]
    x = torch.randn(N, d, generator=g)
    b_dec = torch.randn(d, generator=g)
    to = dict(device=device, dtype=dtype)
    return (idx.to(device), coef.to(**to), table.to(**to), [t.to(**to) for t in grads], x.to(**to), b_dec.to(**to))


def check_products(tk, monkeypatch, mode, N, blocks, n, d, device, dtype, tol):
    monkeypatch.setenv("HF_SAE_TRITON_TABLE_GRAD", mode)
    idx, coef, table, grads, x, b_dec = random_code(N, blocks, n, d, device, dtype)
    code = ref.SparseCode(idx, n, blocks=blocks)
    # float64 CPU reference of everything
    c64 = ref.SparseCode(idx.cpu(), n, blocks=blocks)
    d64 = lambda t: t.detach().cpu().double()  # noqa: E731
    want_fwd = ref.decode_forward(idx.cpu(), d64(coef), d64(table))
    want_gv, want_gt = ref.decode_backward(c64, d64(coef), d64(table), [d64(g) for g in grads])
    want_gW, want_gb = ref.encoder_backward(c64, d64(coef), d64(x), d64(b_dec))
    got_fwd = tk.decode_forward(idx, coef, table)
    got_gv, got_gt = tk.decode_backward(code, coef, table, grads)
    got_gW, got_gb = tk.encoder_backward(code, coef, x, b_dec)
    for got, want in ((got_fwd, want_fwd), (got_gv, want_gv), (got_gt, want_gt), (got_gW, want_gW), (got_gb, want_gb)):
        assert got.dtype == dtype and got.device.type == torch.device(device).type
        err = (d64(got) - want).norm() / want.norm()
        assert err < tol, (mode, float(err))
    # only values/only table variants agree with the full call
    gv_only, none_t = tk.decode_backward(code, coef, table, grads, True, False)
    none_v, gt_only = tk.decode_backward(code, coef, table, grads, False, True)
    assert none_t is None and none_v is None
    assert torch.equal(gv_only, got_gv)
    torch.testing.assert_close(gt_only, got_gt)


@pytest.mark.parametrize("mode", MODES)
def test_sorted_and_atomic_table_gradients_interpreter(tk, monkeypatch, mode):
    """Both table-gradient modes at tiny shapes (block edges straddled) on whatever device runs Triton."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    check_products(tk, monkeypatch, mode, N=5, blocks=[7, 12], n=11, d=150, device=device, dtype=torch.float32,
                   tol=1e-6)


def test_table_grad_mode_rejects_unknown(tk, monkeypatch):
    monkeypatch.setenv("HF_SAE_TRITON_TABLE_GRAD", "fast")
    with pytest.raises(ValueError, match="sorted"):
        tk.table_grad_mode()


@cuda
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_triton_products_on_gpu_training_shapes(tk, monkeypatch, mode, dtype, tol):
    """Main block k=32 + an AuxK block of 384 over n=32768 latents, d=768, 2048 tokens."""
    check_products(tk, monkeypatch, mode, N=2048, blocks=[32, 384], n=32768, d=768, device="cuda", dtype=dtype,
                   tol=tol)


@cuda
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("activation", ["topk", "batchtopk", "topafa"])
def test_fused_step_on_gpu_matches_dense(monkeypatch, mode, activation):
    monkeypatch.setenv("HF_SAE_TRITON_TABLE_GRAD", mode)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    torch.manual_seed(0)
    n, d = 4096, 256
    x = torch.randn(1024, d, device="cuda")
    dead = torch.arange(n, device="cuda") % 4 == 0
    outs = {}
    for kernel in ("dense", "triton"):
        torch.manual_seed(0)
        cfg = SAEConfig(d_in=d, n_latents=n, k=32, k_aux=64, activation=activation, kernel=kernel,
                        afa_coef=0.1 if activation == "topafa" else 0.0)
        sae = SparseAutoencoder(cfg).cuda().train()
        with torch.no_grad():
            sae.W_enc.add_(0.2 * torch.randn_like(sae.W_enc))
            sae.b_enc.normal_(0, 0.1)
        out = sae(x, dead_mask=dead)
        out.loss.backward()
        outs[kernel] = (out, {k: p.grad.detach().clone() for k, p in sae.named_parameters() if p.requires_grad})
    (want, wg), (got, gg) = outs["dense"], outs["triton"]
    assert float(want.auxk_loss.detach()) > 0
    torch.testing.assert_close(got.loss, want.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.auxk_loss, want.auxk_loss, atol=1e-5, rtol=1e-5)
    for name in wg:
        err = (gg[name] - wg[name]).norm() / wg[name].norm()
        assert err < 1e-4, (name, float(err))

"""Sparse kernels (hf_sae.kernels): the pure-torch primitives against dense formulas, the Triton kernels
against the torch ones under TRITON_INTERPRET=1, gradchecks of the custom autograd Functions, and the
fused training step against the dense reference path (parameter gradients in float64)."""

import os

# triton.jit reads TRITON_INTERPRET when the kernels module is imported: set it before any import.
os.environ["TRITON_INTERPRET"] = "1"

import importlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from hf_sae import (  # noqa: E402
    SAEConfig,
    SparseAutoencoder,
    kernels,  # noqa: E402
)
from hf_sae.activations import batchtopk, batchtopk_sparse  # noqa: E402
from hf_sae.kernels import reference as ref  # noqa: E402

has_triton = kernels.triton_available()
needs_triton = pytest.mark.skipif(not has_triton, reason="triton not installed")


@pytest.fixture(scope="module")
def tk():
    """The Triton kernels module, imported (or re-imported) in interpreter mode."""
    if not has_triton:
        pytest.skip("triton not installed")
    mod = importlib.import_module("hf_sae.kernels.triton_kernels")
    if type(mod._decode_fwd_kernel).__name__ != "InterpretedFunction":
        mod = importlib.reload(mod)
    return mod


def code(N=6, w=5, n=13, d=20, dtype=torch.float64, seed=0):
    """A random code with a duplicated slot and one row all on the same latent."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (N, w), generator=g)
    idx[0, 1] = idx[0, 0]
    idx[min(3, N - 1), :] = 2
    coef = torch.randn(N, w, generator=g, dtype=dtype)
    table = torch.randn(n, d, generator=g, dtype=dtype)
    rows = torch.randn(N, d, generator=g, dtype=dtype)
    return idx, coef, table, rows


# ------------------------------------------------------------------------------ torch primitives
def test_reference_primitives_hand_computed():
    table = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]], dtype=torch.float64)
    idx = torch.tensor([[0, 2], [1, 1]])
    coef = torch.tensor([[2.0, -1.0], [0.5, 0.25]], dtype=torch.float64)
    rows = torch.tensor([[1.0, 1.0], [2.0, -1.0]], dtype=torch.float64)
    # row 0: 2*[1,0] - [3,3] = [-1,-3]; row 1: 0.75*[0,2] = [0,1.5]
    assert torch.equal(ref.gather_sum(idx, coef, table), torch.tensor([[-1.0, -3.0], [0.0, 1.5]], dtype=torch.float64))
    # dots: [1,0].[1,1]=1, [3,3].[1,1]=6 ; [0,2].[2,-1]=-2 twice
    assert torch.equal(ref.gather_dot(idx, table, rows), torch.tensor([[1.0, 6.0], [-2.0, -2.0]], dtype=torch.float64))
    # scatter: latent 0 <- 2*[1,1]; latent 1 <- 0.75*[2,-1]; latent 2 <- -1*[1,1]
    expect = torch.tensor([[2.0, 2.0], [1.5, -0.75], [-1.0, -1.0]], dtype=torch.float64)
    assert torch.equal(ref.scatter_outer(idx, coef, rows, 3), expect)
    assert torch.equal(ref.segment_sum(idx, coef, 3), torch.tensor([2.0, 0.75, -1.0], dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_reference_primitives_match_dense_formulas(dtype):
    idx, coef, table, rows = code(dtype=dtype)
    tol = dict(atol=1e-12, rtol=0) if dtype == torch.float64 else dict(atol=5e-2 if dtype == torch.bfloat16 else 1e-5,
                                                                        rtol=1e-2 if dtype == torch.bfloat16 else 1e-5)
    torch.testing.assert_close(ref.gather_sum(idx, coef, table), ref.gather_sum_naive(idx, coef, table), **tol)
    torch.testing.assert_close(ref.gather_dot(idx, table, rows), ref.gather_dot_naive(idx, table, rows), **tol)
    torch.testing.assert_close(ref.scatter_outer(idx, coef, rows, 13), ref.scatter_outer_naive(idx, coef, rows, 13),
                               **tol)


def test_sparse_code_transpose_groups_slots_by_latent():
    idx = torch.tensor([[3, 0, 3], [1, 3, 0]])
    c = ref.SparseCode(idx, 5, blocks=[2, 1])
    offsets, order, latent = c.transpose()
    assert offsets.tolist() == [0, 2, 3, 3, 6]  # latent 0: 2 slots, 1: 1, 2: none, 3: 3, 4: none
    assert latent.tolist() == [0, 0, 1, 3, 3, 3]
    assert torch.equal(idx.reshape(-1)[order], latent)
    assert torch.equal(c.token(), order // 3)
    # stacked rows: block 1 (column 2) reads rows N.. 2N-1
    assert torch.equal(c.stacked_token(), order // 3 + 2 * (order % 3 == 2))
    with pytest.raises(ValueError, match="must sum to the code width"):
        ref.SparseCode(idx, 5, blocks=[2, 2])
    with pytest.raises(ValueError, match="supports for 2 blocks"):
        ref.SparseCode(idx, 5, blocks=[2, 1], supports=[None])


def test_valid_slots_are_skipped_exactly():
    """A code's invalid slots (value 0, value gradient unused) are skipped by the torch ops: same decode,
    same table and encoder gradients, value gradient 0 there."""
    idx, coef, table, rows = code(N=6, w=5, n=13, d=20)
    valid = coef > 0
    coef = coef * valid
    every = ref.SparseCode(idx, 13, blocks=[2, 3])
    some = ref.SparseCode(idx, 13, blocks=[2, 3], valid=valid)
    offsets, order, latent = some.active_transpose()
    assert order.numel() == int(valid.sum()) < idx.numel()
    assert bool(valid.reshape(-1)[order].all()) and torch.equal(idx.reshape(-1)[order], latent)
    assert torch.equal(some.active_rows(), order // 5)
    torch.testing.assert_close(ref.decode_forward(idx, coef, table, valid), ref.gather_sum(idx, coef, table),
                               atol=1e-12, rtol=0)
    grads = [rows, torch.randn_like(rows)]
    gv_all, gW_all = ref.decode_backward(every, coef, table, grads)
    gv, gW = ref.decode_backward(some, coef, table, grads)
    torch.testing.assert_close(gW, gW_all, atol=1e-12, rtol=0)
    torch.testing.assert_close(gv, gv_all * valid, atol=1e-12, rtol=0)
    b_dec = torch.randn(20, dtype=torch.float64)
    for got, want in zip(ref.encoder_backward(some, coef, rows, b_dec), ref.encoder_backward(every, coef, rows, b_dec)):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="valid"):
        ref.SparseCode(idx, 13, valid=valid[:, :2])


def test_scatter_into_a_given_table():
    """The table-gradient scatter writes into a given tensor (old content, even NaN, ignored; unused rows
    0), except above CSR_MAX_SLOTS_PER_LATENT slots per latent where it returns a new tensor."""
    for N, w, n in ((6, 5, 13), (60, 2, 3)):  # 2.3 and 40 slots per latent
        idx, coef, _, rows = code(N=N, w=w, n=n, d=7)
        c = ref.SparseCode(idx, n)
        out = torch.full((n, 7), float("nan"), dtype=torch.float64)
        got = ref._scatter_sorted(c, coef, rows, c.token(), out=out)
        assert (got.data_ptr() == out.data_ptr()) == (N * w <= ref.CSR_MAX_SLOTS_PER_LATENT * n)
        torch.testing.assert_close(got, ref.scatter_outer_naive(idx, coef, rows, n), atol=1e-12, rtol=0)


def test_reference_primitives_empty_code():
    idx = torch.zeros(4, 0, dtype=torch.long)
    coef = torch.zeros(4, 0)
    table, rows = torch.randn(7, 3), torch.randn(4, 3)
    assert torch.equal(ref.gather_sum(idx, coef, table), torch.zeros(4, 3))
    assert ref.gather_dot(idx, table, rows).shape == (4, 0)
    assert torch.equal(ref.scatter_outer(idx, coef, rows, 7), torch.zeros(7, 3))


# ------------------------------------------------------------------------------ Triton (interpreter)
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_triton_kernels_match_reference(tk, dtype):
    idx, coef, table, rows = code(N=5, w=19, n=11, d=150, dtype=dtype)  # w, d straddle the block sizes
    grads = [rows, torch.randn_like(rows)]
    b_dec = torch.randn(150, dtype=dtype)
    tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(tk.decode_forward(idx, coef, table), ref.decode_forward(idx, coef, table), **tol)
    two_blocks = ref.SparseCode(idx, 11, blocks=[7, 12])
    for need in [(True, True), (True, False), (False, True)]:
        got = tk.decode_backward(two_blocks, coef, table, grads, *need)
        want = ref.decode_backward(two_blocks, coef, table, grads, *need)
        for g, w in zip(got, want):
            assert (g is None) == (w is None)
            if g is not None:
                torch.testing.assert_close(g, w, **tol)
    for need_W in (True, False):
        gW, gb = tk.encoder_backward(two_blocks, coef, rows, b_dec, need_W)
        wW, wb = ref.encoder_backward(two_blocks, coef, rows, b_dec, need_W)
        torch.testing.assert_close(gb, wb, **tol)
        assert (gW is None) == (not need_W)
        if need_W:
            torch.testing.assert_close(gW, wW, **tol)


def test_decode_backward_of_blocks_equals_autograd_of_dense_decode():
    """Two blocks with their own output gradients: one sparse pass equals autograd through dense decodes."""
    idx, coef, table, rows = code(N=5, w=7, n=11, d=6)
    grads = [rows, torch.randn_like(rows)]
    c = ref.SparseCode(idx, 11, blocks=[3, 4])
    v = coef.clone().requires_grad_(True)
    W = table.clone().requires_grad_(True)
    outs = [ref.densify(idx[:, s], v[:, s], 11) @ W for s in c.block_slices()]
    torch.autograd.backward(outs, grads)
    g_v, g_W = ref.decode_backward(c, coef, table, grads)
    torch.testing.assert_close(g_v, v.grad, atol=1e-12, rtol=0)
    torch.testing.assert_close(g_W, W.grad, atol=1e-12, rtol=0)


# ------------------------------------------------------------------------------ autograd Functions
BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_decode_gradcheck(backend):
    idx, coef, table, _ = code(N=3, w=3, n=7, d=4)
    coef.requires_grad_(True)
    table.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v, W: kernels.sparse_decode(v, idx, W, backend=backend), (coef, table))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("x_grad", [False, True])
def test_encode_selected_gradcheck(backend, x_grad):
    idx, _, W_enc, x = code(N=3, w=3, n=7, d=4, seed=1)
    b_enc = torch.randn(7, dtype=torch.float64, requires_grad=True)
    b_dec = torch.randn(4, dtype=torch.float64, requires_grad=True)
    W_enc.requires_grad_(True)
    x.requires_grad_(x_grad)

    def f(x, W, b, bd):
        with torch.no_grad():
            pre = torch.nn.functional.linear(x - bd, W, b).gather(1, idx)
        return kernels.encode_selected(x, W, b, bd, idx, pre, backend=backend)

    out = f(x, W_enc, b_enc, b_dec)
    torch.testing.assert_close(out, torch.nn.functional.linear(x - b_dec, W_enc, b_enc).gather(1, idx))
    assert torch.autograd.gradcheck(f, (x, W_enc, b_enc, b_dec))


def test_functions_reject_bad_codes():
    W = torch.randn(5, 3)
    with pytest.raises(ValueError, match=r"out of range \[0, 5\)"):
        kernels.sparse_decode(torch.ones(2, 2), torch.tensor([[0, 5], [1, 2]]), W, backend="torch")
    with pytest.raises(ValueError, match="must both be"):
        kernels.sparse_decode(torch.ones(2, 3), torch.zeros(2, 2, dtype=torch.long), W, backend="torch")
    with pytest.raises(ValueError, match="int64"):
        kernels.sparse_decode(torch.ones(2, 2), torch.zeros(2, 2, dtype=torch.int32), W, backend="torch")
    with pytest.raises(ValueError, match=r"x \(2, 4\)"):
        kernels.encode_selected(
            torch.ones(2, 4),
            W,
            torch.zeros(5),
            torch.zeros(3),
            torch.zeros(2, 1, dtype=torch.long),
            torch.zeros(2, 1),
            backend="torch",
        )


# ------------------------------------------------------------------------------ dispatch
def test_resolve_backend_and_env_override(monkeypatch):
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    assert kernels.resolve_backend("auto", torch.device("cpu")) == "torch"
    assert kernels.resolve_backend("dense") == "dense"
    monkeypatch.setenv(kernels.ENV_VAR, "dense")
    assert kernels.resolve_backend("torch") == "dense"  # the environment wins over the config
    monkeypatch.setenv(kernels.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="HF_SAE_KERNEL"):
        kernels.resolve_backend("auto")
    monkeypatch.delenv(kernels.ENV_VAR)
    with pytest.raises(ValueError, match="Unknown kernel backend"):
        kernels.resolve_backend("fast")
    if has_triton:
        assert kernels.resolve_backend("triton", torch.device("cpu")) == "triton"  # interpreter on
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            kernels.resolve_backend("triton", torch.device("cpu"))


def test_env_override_reaches_the_model(monkeypatch):
    """HF_SAE_KERNEL=dense makes a kernel='torch' SAE take the dense path: the graph then holds [N, n]."""
    sae = make_sae("topk", kernel="torch")
    x = torch.randn(10, 16, dtype=torch.float64)
    monkeypatch.setenv(kernels.ENV_VAR, "dense")
    assert max_saved_width(sae, x) == 64
    monkeypatch.delenv(kernels.ENV_VAR)
    assert max_saved_width(sae, x) < 64


# ------------------------------------------------------------------------------ selections
def test_topk_among_equals_masked_topk():
    g = torch.Generator().manual_seed(3)
    pre = torch.randn(9, 40, generator=g, dtype=torch.float64)
    mask = torch.rand(40, generator=g) < 0.3
    got = kernels.topk_among(pre, mask, 5)
    want = pre.masked_fill(~mask, float("-inf")).topk(5, dim=-1).indices
    assert torch.equal(got.sort(-1).values, want.sort(-1).values)
    assert torch.equal(
        kernels.topk_among(pre, torch.ones(40, dtype=torch.bool), 3).sort(-1).values,
        pre.topk(3, dim=-1).indices.sort(-1).values,
    )
    with pytest.raises(ValueError, match="allowed columns"):
        kernels.topk_among(pre, mask, int(mask.sum()) + 1)
    same, (cols, local) = kernels.topk_among(pre, mask, 5, return_support=True)
    assert torch.equal(same, got) and torch.equal(cols[local], got) and bool(mask[cols].all())
    assert kernels.topk_among(pre, torch.ones(40, dtype=torch.bool), 3, return_support=True)[1] is None


class _Stub:
    """Just what batchtopk needs from an SAE."""

    def __init__(self, k, training=True):
        self.config = SAEConfig(d_in=4, n_latents=40, activation="batchtopk", k=k)
        self.training = training
        self.batchtopk_threshold = torch.tensor(-1.0)


@pytest.mark.parametrize("skewed", [False, True])
def test_batchtopk_sparse_equals_dense_selection(skewed):
    g = torch.Generator().manual_seed(4)
    pre = torch.randn(12, 40, generator=g, dtype=torch.float64)
    if skewed:  # one token holds far more than 4k of the batch's top values: the candidate cap must grow
        pre[5] += 10.0
    a, b = _Stub(k=2), _Stub(k=2)
    dense = batchtopk(pre, a, None).dense
    for _ in range(2):  # second call exercises the EMA update
        sparse = batchtopk_sparse(pre, b, None)
    dense = batchtopk(pre, a, None).dense
    torch.testing.assert_close(sparse.to_dense(40), dense, rtol=0, atol=0)
    assert torch.equal(a.batchtopk_threshold, b.batchtopk_threshold)
    assert sparse.values.shape[1] == int((dense > 0).sum(-1).max())
    if skewed:
        assert int((dense[5] > 0).sum()) > 4 * 2


# ------------------------------------------------------------------------------ the fused step
def make_sae(activation, kernel, multi=False, n=64, d=16, k=4):
    torch.manual_seed(0)
    cfg = SAEConfig(
        d_in=d,
        n_latents=n,
        activation=activation,
        k=k,
        k_aux=8,
        kernel=kernel,
        multi_topk=multi,
        afa_coef=0.1 if activation == "topafa" else 0.0,
        input_scale=1.5,
    )
    sae = SparseAutoencoder(cfg).double()
    with torch.no_grad():  # break the tied init and the zero biases so that every gradient is generic
        sae.W_enc.add_(0.2 * torch.randn_like(sae.W_enc))
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    return sae


def max_saved_width(sae, x):
    """Largest trailing dim of a [N, *] tensor that autograd saves during forward (n means dense)."""
    widths = []

    def pack(t):
        if t.ndim == 2 and t.shape[0] == x.shape[0]:
            widths.append(t.shape[1])
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sae(x, dead_mask=torch.arange(sae.config.n_latents) % 3 == 0).loss.backward()
    return max(widths)


def step(sae, x, dead_mask):
    sae.train()
    out = sae(x, dead_mask=dead_mask)
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in sae.named_parameters() if p.requires_grad}  # topafa: no b_enc


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "activation, multi", [("topk", False), ("topk", True), ("batchtopk", False), ("topafa", False)]
)
def test_fused_step_matches_dense_reference(activation, multi, backend):
    x = torch.randn(3, 7, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    dead = torch.arange(64) % 3 == 0  # 22 dead latents, k_aux = 8: AuxK active
    dense_sae, fast_sae = make_sae(activation, "dense", multi), make_sae(activation, backend, multi)
    want, want_grads = step(dense_sae, x, dead)
    got, got_grads = step(fast_sae, x, dead)
    assert float(want.auxk_loss.detach()) > 0
    for field in ("loss", "fvu", "auxk_loss", "afa_loss", "reconstruction", "multi_topk_fvu"):
        if getattr(want, field) is not None:
            torch.testing.assert_close(getattr(got, field), getattr(want, field), atol=1e-12, rtol=1e-10)
    if activation != "batchtopk":
        torch.testing.assert_close(got.latent_values, want.latent_values, atol=1e-12, rtol=0)
        assert torch.equal(got.latent_indices, want.latent_indices)
    else:  # batchtopk returns dense latents on both paths (the fast one also gives its sparse code)
        torch.testing.assert_close(got.latents, want.latents, atol=1e-12, rtol=0)
        dense_code = torch.zeros_like(want.latents).scatter_add_(-1, got.latent_indices, got.latent_values)
        torch.testing.assert_close(dense_code, want.latents, atol=1e-12, rtol=0)
        assert torch.equal(fast_sae.batchtopk_threshold, dense_sae.batchtopk_threshold)
    assert set(got_grads) == set(want_grads)
    for name in want_grads:
        assert want_grads[name].abs().max() > 0, name
        torch.testing.assert_close(got_grads[name], want_grads[name], atol=1e-12, rtol=1e-9, msg=name)


def test_fused_step_keeps_autograd_sparse():
    """Nothing of width n (the dense code) is saved for backward on the fused path; on the dense one it is."""
    x = torch.randn(20, 16, dtype=torch.float64)
    assert max_saved_width(make_sae("topk", "torch"), x) <= 16  # d wide at most (x itself)
    assert max_saved_width(make_sae("topk", "dense"), x) == 64


def test_fused_step_without_dead_latents_and_at_inference():
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    dense_sae, fast_sae = make_sae("batchtopk", "dense"), make_sae("batchtopk", "torch")
    for sae in (dense_sae, fast_sae):
        sae.train()
        sae(x)  # estimates the inference threshold
        sae.eval()
    a, b = dense_sae(x), fast_sae(x)  # inference: batchtopk is dense on both paths
    torch.testing.assert_close(b.latents, a.latents, atol=1e-12, rtol=0)
    fa, fb = make_sae("topk", "dense")(x), make_sae("topk", "torch")(x)
    assert float(fb.auxk_loss) == 0.0
    torch.testing.assert_close(fb.reconstruction, fa.reconstruction, atol=1e-12, rtol=0)


def test_fused_step_input_gradient_matches_dense():
    """Gradients w.r.t. the input activations (attribution use) are sparse-exact too."""
    x0 = torch.randn(12, 16, dtype=torch.float64)
    grads = []
    for kernel in ("dense", "torch"):
        x = x0.clone().requires_grad_(True)
        make_sae("topk", kernel)(x, dead_mask=torch.arange(64) % 3 == 0).loss.backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-12, rtol=1e-9)


def test_fused_step_bfloat16_runs_and_matches_dense():
    x = torch.randn(32, 16)
    outs = []
    for kernel in ("dense", "torch"):
        sae = make_sae("topk", kernel).to(torch.bfloat16)
        out = sae(x.to(torch.bfloat16), dead_mask=torch.arange(64) % 3 == 0)
        out.loss.backward()
        outs.append((out, sae.W_enc.grad.float(), sae.W_dec.grad.float()))
    (a, ga_enc, ga_dec), (b, gb_enc, gb_dec) = outs
    assert torch.equal(a.latent_indices, b.latent_indices)
    torch.testing.assert_close(b.loss.float(), a.loss.float(), atol=2e-2, rtol=2e-2)
    for got, want in ((gb_enc, ga_enc), (gb_dec, ga_dec)):
        assert (got - want).norm() <= 0.05 * want.norm()


# ------------------------------------------------------------------------------ AuxK slot pruning
def test_topk_among_positive_only_keeps_every_positive_entry():
    pre = torch.tensor(
        [[0.5, -1.0, 2.0, 0.1, -0.2, 3.0], [-0.3, -1.0, -2.0, 0.0, -0.2, 1.0], [-0.3, 4.0, -2.0, 0.0, 5.0, -1.0]],
        dtype=torch.float64,
    )
    mask = torch.tensor([True, True, True, True, True, False])  # column 5 is not allowed
    idx, (cols, local) = kernels.topk_among(pre, mask, 4, return_support=True, positive_only=True)
    assert idx.shape == (3, 3)  # row 0 has three allowed positives (0.5, 2.0, 0.1): 4 -> 3 columns
    assert torch.equal(cols[local], idx)
    assert [sorted(r) for r in idx[:1].tolist()] == [[0, 2, 3]]
    assert {1, 4} <= set(idx[2].tolist())  # row 2's two positives, plus one non-positive filler
    assert kernels.topk_among(pre, mask, 2, positive_only=True).shape == (3, 2)  # capped by k
    same, vals = kernels.topk_among(pre, mask, 4, positive_only=True, return_values=True)
    assert torch.equal(same, idx) and torch.equal(vals, pre.gather(1, idx).clamp(min=0))
    none = kernels.topk_among(pre - 10, mask, 4, positive_only=True)
    assert none.shape == (3, 0) and none.dtype == torch.long


def _aux_widths(monkeypatch):
    """Record (column blocks, valid slots) of every SparseCode the model decodes."""
    seen, real = [], kernels.decode_code

    def spy(values, code, W_dec, backend="auto", **kw):
        seen.append((code.blocks, code.valid))
        return real(values, code, W_dec, backend, **kw)

    monkeypatch.setattr(kernels, "decode_code", spy)
    return seen


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shift", [3.0, 100.0])  # dead latents' b_enc lowered: few / no pre-activation > 0
def test_fused_step_prunes_auxk_slots_exactly(backend, shift, monkeypatch):
    x = torch.randn(21, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    dead = torch.arange(64) % 3 == 0  # 22 dead latents, k_aux = 8
    dense_sae, fast_sae = make_sae("topk", "dense"), make_sae("topk", backend)
    for sae in (dense_sae, fast_sae):
        with torch.no_grad():
            sae.b_enc[dead] -= shift
    with torch.no_grad():
        pre = fast_sae._pre(x * 1.5)[:, dead]
    positives = int((pre > 0).sum(1).max())
    want, want_grads = step(dense_sae, x, dead)
    widths = _aux_widths(monkeypatch)
    got, got_grads = step(fast_sae, x, dead)
    if shift == 3.0:
        assert 0 < positives < 8 and float((pre > 0).float().mean()) < 0.05
        assert [blocks for blocks, _ in widths] == [(4, positives)]  # pruned to the most positives in one row
        if backend == "torch":  # the torch ops skip the padding slots (dead pre-activations <= 0)
            assert widths[0][1] is not None and not bool(widths[0][1][:, 4:].all())
        assert float(got_grads["W_enc"][dead].abs().max()) > 0  # AuxK still trains the dead encoders
    else:
        assert positives == 0 and [blocks for blocks, _ in widths] == [(4,)]  # no AuxK block at all
        e = x * 1.5 - want.reconstruction.detach() * 1.5
        no_pred = e.square().sum() / (e - e.mean(0)).square().sum()
        torch.testing.assert_close(got.auxk_loss, no_pred, atol=1e-12, rtol=1e-10)
        assert got.auxk_loss.grad_fn is None
        assert torch.equal(got_grads["W_enc"][dead], torch.zeros_like(got_grads["W_enc"][dead]))
    for field in ("loss", "fvu", "auxk_loss", "reconstruction"):
        torch.testing.assert_close(getattr(got, field), getattr(want, field), atol=1e-12, rtol=1e-10)
    assert set(got_grads) == set(want_grads)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], atol=1e-12, rtol=1e-9, msg=name)


def test_grad_buffers_reuse_memory_only_when_the_last_gradient_is_gone():
    """W_enc/W_dec gradients are written into memory kept from the previous step once that step's
    gradients were dropped; a gradient still referenced is never overwritten; accumulation stays exact."""
    import copy

    g = torch.Generator().manual_seed(5)
    x1, x2 = (torch.randn(20, 16, dtype=torch.float64, generator=g) for _ in range(2))
    dead = torch.arange(64) % 3 == 0
    fast, dense = make_sae("topk", "torch"), make_sae("topk", "dense")
    fast(x1, dead_mask=dead).loss.backward()
    dec_ptr, kept_enc = fast.W_dec.grad.data_ptr(), fast.W_enc.grad  # a caller keeps W_enc's gradient
    kept_copy = kept_enc.clone()
    fast.zero_grad(set_to_none=True)
    fast(x2, dead_mask=dead).loss.backward()
    enc_buf, dec_buf = (b._buf.data_ptr() for b in kernels.grad_buffers(fast))
    assert fast.W_dec.grad.data_ptr() == dec_ptr == dec_buf  # reused: the last W_dec gradient was dropped
    assert kept_enc.data_ptr() == enc_buf != fast.W_enc.grad.data_ptr()  # W_enc's was kept: a new tensor
    assert torch.equal(kept_enc, kept_copy)  # ... and the kept gradient was not overwritten
    dense(x2, dead_mask=dead).loss.backward()
    for (name, p), q in zip(fast.named_parameters(), dense.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-12, rtol=1e-9, msg=name)
    fast(x1, dead_mask=dead).loss.backward()  # no zero_grad: accumulates into the buffer-backed gradients
    dense(x1, dead_mask=dead).loss.backward()
    for (name, p), q in zip(fast.named_parameters(), dense.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-12, rtol=1e-9, msg=name)
    clone = copy.deepcopy(fast)
    assert all(b._buf is None for b in kernels.grad_buffers(clone))  # copies never carry the memory
    fast.release_grad_buffers()  # public way to free the kept memory; the next step allocates afresh
    assert all(b._buf is None for b in kernels.grad_buffers(fast))
    fast.zero_grad(set_to_none=True)
    dense.zero_grad(set_to_none=True)
    fast(x1, dead_mask=dead).loss.backward()
    dense(x1, dead_mask=dead).loss.backward()
    torch.testing.assert_close(fast.W_dec.grad, dense.W_dec.grad, atol=1e-12, rtol=1e-9)


def test_fused_forward_is_one_call_returning_what_the_eager_path_computes():
    """kernels.fused_forward returns a FusedForward (latents, x_hat, AuxK decode, 4k decode) equal to the model's
    eager reference, and None where it does not apply (dense backend, dense code at inference)."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(24, 16, dtype=torch.float64, generator=g)
    dead = torch.arange(64) % 4 == 0
    sae = make_sae("topk", "torch", multi=True).train()
    with torch.no_grad():
        sae.b_enc[dead] += 0.5  # some dead latents come near firing: AuxK's block is not empty
    got = kernels.fused_forward(sae, x, dead)
    assert isinstance(got, kernels.FusedForward)
    pre, latents, x_hat, e_hat, x_hat4 = sae._forward_eager(x, dead)
    torch.testing.assert_close(got.x_hat, x_hat, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(got.e_hat, e_hat, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(got.x_hat4, x_hat4, atol=1e-12, rtol=1e-10)
    dense_got = got.latents.to_dense(64)
    torch.testing.assert_close(dense_got, latents.to_dense(64), atol=1e-12, rtol=1e-10)
    assert got.e_hat.abs().sum() > 0 and kernels.fused_forward(sae, x, None).e_hat is None
    assert kernels.fused_forward(make_sae("topk", "dense"), x, dead) is None
    assert kernels.fused_forward(make_sae("batchtopk", "torch").eval(), x, dead) is None


def test_pre_activations_reuse_one_buffer_while_training():
    """While training, the fused step writes its [N, n] pre-activations into memory kept from the previous
    step (same addmm: the loss and gradients are bit-identical to a step without the buffer); in eval mode,
    or after release_grad_buffers, no memory is kept."""
    import copy

    from hf_sae.kernels import fused

    g = torch.Generator().manual_seed(7)
    xs = [torch.randn(20, 16, dtype=torch.float64, generator=g) for _ in range(3)]
    dead = torch.arange(64) % 3 == 0
    kept = make_sae("topk", "torch")
    plain = copy.deepcopy(kept)
    ptrs = []
    for x in xs:
        for sae in (kept, plain):
            sae.zero_grad(set_to_none=True)
        out = kept(x, dead_mask=dead)
        out.loss.backward()
        ptrs.append(kept.__dict__["_pre_buffer"][0]._buf.data_ptr())
        plain.__dict__.pop("_pre_buffer", None)  # the reference: a fresh F.linear every step
        ref = plain(x, dead_mask=dead)
        ref.loss.backward()
        assert torch.equal(out.loss, ref.loss)
        for (name, p), q in zip(kept.named_parameters(), plain.parameters()):
            assert torch.equal(p.grad, q.grad), name
    assert ptrs[0] == ptrs[1] == ptrs[2]
    kept.release_grad_buffers()
    assert kept.__dict__["_pre_buffer"][0]._buf is None
    kept.eval()
    with torch.no_grad():
        kept(xs[0])
    assert kept.__dict__["_pre_buffer"][0]._buf is None  # inference never keeps [N, n] memory
    kept.train()
    xc = xs[0] - kept.b_dec.detach()
    with torch.no_grad():
        pre = fused._pre_activations(kept, xc, kept.b_enc)
        assert kept.__dict__["_pre_buffer"][0]._buf.data_ptr() == pre.data_ptr()  # written into the buffer ...
        assert torch.equal(pre, torch.nn.functional.linear(xc, kept.W_enc, kept.b_enc))  # ... as F.linear computes

"""SAEAdam (hf_sae.training.optim) equals the unfused optimizer side of the recipe step by step:
``remove_parallel_grad_`` + ``clip_grad_norm_`` + ``torch.optim.Adam`` + ``normalize_decoder_``, in float64,
on gradients of the SAE's own loss."""

import copy
import functools

import pytest
import torch

from hf_sae import SAEConfig, SparseAutoencoder, modeling_sae
from hf_sae.training.optim import SAEAdam


def _sae(n: int, d: int, seed: int) -> SparseAutoencoder:
    torch.manual_seed(seed)
    sae = SparseAutoencoder(SAEConfig(d_in=d, n_latents=n, k=3, kernel="torch")).double()
    with torch.no_grad():
        sae.W_dec.mul_(1 + torch.rand(n, 1, dtype=torch.float64))  # rows not yet unit norm
        sae.b_dec.normal_()
    return sae


def _reference_step(sae, opt, max_grad_norm, project, normalize):
    """The recipe's optimizer side written out unfused: the formulas of the SAEAdam docstring."""
    with torch.no_grad():
        if project:
            g, w = sae.W_dec.grad, sae.W_dec
            g.sub_((g * w).sum(-1, keepdim=True) / w.square().sum(-1, keepdim=True).clamp_min(1e-12) * w)
        norm = torch.nn.utils.clip_grad_norm_(sae.parameters(), max_grad_norm) if max_grad_norm > 0 else None
        opt.step()
        if normalize:
            sae.W_dec.div_(sae.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12))
    return norm


def _backward(saes, x, dead):
    for sae in saes:
        for p in sae.parameters():
            p.grad = None
        sae(x, dead_mask=dead).loss.backward()


@pytest.mark.parametrize("max_grad_norm,project,normalize", [
    (0.05, True, True),  # clipping active
    (1e6, True, True),  # clipping inactive (scale 1)
    (0.0, True, False),  # no clipping, no renorm
    (0.05, False, True),  # no projection
])
def test_sae_adam_equals_projection_clip_adam_renorm(max_grad_norm, project, normalize, monkeypatch):
    # row blocks of 7 rows (not dividing n) in the decoder-gradient projection
    monkeypatch.setattr(modeling_sae, "_row_dots", functools.partial(modeling_sae._row_dots, block_bytes=7 * 12 * 8))
    n, d = 40, 12
    ref, fused = _sae(n, d, 0), _sae(n, d, 0)
    opt_ref = torch.optim.Adam(ref.parameters(), lr=3e-3, betas=(0.9, 0.99), eps=6.25e-10)
    opt = SAEAdam([{"params": list(fused.parameters()), "lr": 3e-3}], [fused], betas=(0.9, 0.99), eps=6.25e-10,
                  max_grad_norm=max_grad_norm, project_decoder_grad=project, normalize_decoder=normalize)
    g = torch.Generator().manual_seed(1)
    dead = torch.zeros(n, dtype=torch.bool)
    dead[::3] = True
    moved = 0.0
    for step in range(6):
        x = torch.randn(64, d, generator=g, dtype=torch.float64) * 2 + 1
        _backward([ref, fused], x, dead if step % 2 else None)
        for a, b in zip(ref.parameters(), fused.parameters()):
            assert torch.allclose(a.grad, b.grad, rtol=0, atol=1e-12)
        before = ref.W_dec.detach().clone()
        norm = _reference_step(ref, opt_ref, max_grad_norm, project, normalize)
        opt.step()
        moved = max(moved, (ref.W_dec - before).abs().max().item())
        for (name, a), b in zip(ref.named_parameters(), fused.parameters()):
            assert (a - b).abs().max().item() <= 1e-12, (step, name)
        if norm is None:
            assert opt.grad_norms[0] is None
        else:
            assert opt.grad_norms[0].item() == pytest.approx(norm.item(), rel=1e-12)
            if max_grad_norm < 1:
                assert norm.item() > max_grad_norm  # the clip was active, so the check above tests it
    assert moved > 1e-4  # the steps did something
    if normalize:
        assert torch.allclose(fused.W_dec.norm(dim=-1), torch.ones(n, dtype=torch.float64), atol=1e-12)
    for pa, pb in zip(ref.parameters(), fused.parameters()):
        a, b = opt_ref.state[pa], opt.state[pb]
        assert a["step"].item() == b["step"].item() == 6
        assert torch.allclose(a["exp_avg_sq"], b["exp_avg_sq"], rtol=1e-10, atol=1e-20)


def test_each_sae_is_clipped_on_its_own_and_the_check_can_fail():
    """Two SAEs of different sizes in one SAEAdam = each alone; a wrong recipe (no projection) differs."""
    saes = [_sae(40, 12, 0), _sae(24, 8, 3)]
    alone = [_sae(40, 12, 0), _sae(24, 8, 3)]
    wrong = _sae(40, 12, 0)
    kw = dict(betas=(0.9, 0.999), eps=1e-8, max_grad_norm=0.05)
    both = SAEAdam([{"params": list(s.parameters()), "lr": 1e-2} for s in saes], saes, **kw)
    singles = [SAEAdam([{"params": list(s.parameters()), "lr": 1e-2}], [s], **kw) for s in alone]
    bad = SAEAdam([{"params": list(wrong.parameters()), "lr": 1e-2}], [wrong], project_decoder_grad=False, **kw)
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        xs = [torch.randn(32, s.config.d_in, generator=g, dtype=torch.float64) for s in saes]
        for s, a, x in zip(saes, alone, xs):
            _backward([s, a], x, None)
        _backward([wrong], xs[0], None)
        both.step()
        for o in singles:
            o.step()
        bad.step()
    for s, a in zip(saes, alone):
        for p, q in zip(s.parameters(), a.parameters()):
            assert torch.equal(p, q)
    assert (wrong.W_dec - saes[0].W_dec).abs().max().item() > 1e-4


def test_state_loads_from_and_into_torch_adam():
    """A checkpoint of the unfused torch.optim.Adam resumes in SAEAdam exactly (and the state format is
    Adam's)."""
    ref, fused = _sae(30, 10, 0), _sae(30, 10, 0)
    opt_ref = torch.optim.Adam(ref.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(32, 10, generator=g, dtype=torch.float64) for _ in range(4)]
    for x in xs[:2]:
        _backward([ref], x, None)
        _reference_step(ref, opt_ref, 0.1, True, True)
    fused.load_state_dict(ref.state_dict())
    opt = SAEAdam([{"params": list(fused.parameters()), "lr": 1e-2}], [fused], max_grad_norm=0.1)
    opt.load_state_dict(copy.deepcopy(opt_ref.state_dict()))  # as through a checkpoint file: no shared tensors
    for x in xs[2:]:
        _backward([ref, fused], x, None)
        _reference_step(ref, opt_ref, 0.1, True, True)
        opt.step()
    for a, b in zip(ref.parameters(), fused.parameters()):
        assert (a - b).abs().max().item() <= 1e-12
    back = torch.optim.Adam(ref.parameters(), lr=1e-2)
    back.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert [s["step"].item() for s in back.state.values()] == [4.0] * 4


def test_bad_arguments_are_refused():
    sae = _sae(8, 4, 0)
    with pytest.raises(ValueError, match="one parameter group per SAE"):
        SAEAdam([{"params": list(sae.parameters())}], [sae, sae])
    with pytest.raises(ValueError, match="max_grad_norm"):
        SAEAdam([{"params": list(sae.parameters())}], [sae], max_grad_norm=-1)
    with pytest.raises(ValueError, match="exactly its SAE's parameters"):
        SAEAdam([{"params": [sae.b_enc]}], [sae])
    with pytest.raises(ValueError, match="amsgrad"):
        SAEAdam([{"params": list(sae.parameters()), "amsgrad": True}], [sae])


def test_unit_rows_are_assumed_only_while_w_dec_is_untouched():
    """After its own renormalisation SAEAdam takes ||w_i|| = 1 in the projection; any write to W_dec in
    between (a load, a user's rescale) makes it compute the norms again, and so still match the recipe."""
    n, d = 40, 12
    ref, fused = _sae(n, d, 0), _sae(n, d, 0)
    opt_ref = torch.optim.Adam(ref.parameters(), lr=3e-3)
    opt = SAEAdam([{"params": list(fused.parameters()), "lr": 3e-3}], [fused], max_grad_norm=0.05)
    g = torch.Generator().manual_seed(4)
    flags = []
    for step in range(4):
        if step == 2:  # rows no longer unit: the optimizer must notice
            with torch.no_grad():
                for s in (ref, fused):
                    s.W_dec.mul_(1.5)
        x = torch.randn(64, d, generator=g, dtype=torch.float64)
        _backward([ref, fused], x, None)
        flags.append(opt._rows_unit(0))
        _reference_step(ref, opt_ref, 0.05, True, True)
        opt.step()
        for a, b in zip(ref.parameters(), fused.parameters()):
            assert (a - b).abs().max().item() <= 1e-12, step
    assert flags == [False, True, False, True]
    # the check can fail: projecting rows of norm 1.5 as if they were unit leaves a parallel component
    with torch.no_grad():
        fused.W_dec.mul_(1.5)
    _backward([fused], torch.randn(64, d, generator=g, dtype=torch.float64), None)
    g_dec = fused.W_dec.grad.clone()
    fused.remove_parallel_grad_(unit_rows=True)
    assert (fused.W_dec.grad * fused.W_dec).sum(-1).abs().max().item() > 1e-6
    fused.W_dec.grad = g_dec
    fused.remove_parallel_grad_()
    assert (fused.W_dec.grad * fused.W_dec).sum(-1).abs().max().item() < 1e-12


def test_resume_from_state_dict_is_bit_exact():
    """SAE + SAEAdam state saved after a step and loaded into fresh objects continue exactly as the
    uninterrupted run (the unit-row flag travels in the state, so both take the same arithmetic path)."""
    n, d = 40, 12
    run, resumed = _sae(n, d, 0).float(), _sae(n, d, 5).float()
    opt = SAEAdam([{"params": list(run.parameters()), "lr": 3e-3}], [run], max_grad_norm=0.05)
    g = torch.Generator().manual_seed(6)
    xs = [torch.randn(64, d, generator=g) for _ in range(5)]
    for x in xs[:2]:
        _backward([run], x, None)
        opt.step()
    resumed.load_state_dict(copy.deepcopy(run.state_dict()))
    opt2 = SAEAdam([{"params": list(resumed.parameters()), "lr": 3e-3}], [resumed], max_grad_norm=0.05)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert opt2._rows_unit(0)
    for x in xs[2:]:
        _backward([run, resumed], x, None)
        opt.step()
        opt2.step()
    for a, b in zip(run.parameters(), resumed.parameters()):
        assert torch.equal(a, b)

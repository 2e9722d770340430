"""The fused TopK-family training step: encode, select, decode with sparse kernels, in one function.

:func:`fused_forward` is what :meth:`hf_sae.SparseAutoencoder.forward` runs for activations with a sparse
form when the kernels are importable and the backend is not ``dense``; it returns the same values and
gradients as the eager path (``SparseAutoencoder._forward_eager``), which stays the reference beside it.
The [n, d] gradient buffers and the [N, n] pre-activation buffer the step reuses on CPU
(:class:`~hf_sae.kernels.GradBuffer`) are owned here (:func:`grad_buffers`, :func:`release_grad_buffers`),
kept on the SAE so that each SAE has its own.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..activations import Latents

__all__ = ["FusedForward", "fused_forward", "grad_buffers", "release_grad_buffers"]


class FusedForward(NamedTuple):
    """What one fused step computes, in the SAE's normalized units."""

    latents: Latents
    """The activation's sparse code: values [N, k] (with gradients), indices [N, k]."""
    x_hat: Tensor
    """[N, d] reconstruction (with b_dec)."""
    e_hat: Optional[Tensor]
    """[N, d] AuxK's decode of the dead latents (no b_dec; zeros when none is > 0); None when none is dead."""
    x_hat4: Optional[Tensor]
    """[N, d] Multi-TopK reconstruction with 4k latents (with b_dec), or None when not enabled/training."""


def grad_buffers(sae) -> tuple:
    """``(W_enc's, W_dec's)`` :class:`~hf_sae.kernels.GradBuffer` of ``sae``, created on first use.

    Kept in the module's ``__dict__`` (not a parameter or buffer): copies get empty buffers."""
    from . import GradBuffer

    return sae.__dict__.setdefault("_grad_buffers", (GradBuffer(), GradBuffer()))


def release_grad_buffers(sae) -> None:
    """Free the memory kept between training steps for ``sae``'s W_enc and W_dec gradients and its
    pre-activations."""
    for buf in sae.__dict__.get("_grad_buffers", ()) + tuple(sae.__dict__.get("_pre_buffer", ())):
        buf.release()


def _pre_activations(sae, xc: Tensor, b_enc: Tensor) -> Tensor:
    """The dense pre-activations ``xc @ W_enc^T + b_enc`` [N, n]. While training on CPU they are written into
    memory kept from the previous step (a :class:`~hf_sae.kernels.GradBuffer`): a fresh [N, n] tensor per step
    is mapped, faulted in and unmapped again by the allocator, which costs about a tenth of the matmul at
    N = 4096, n = 32768 (benchmarks/RESULTS_speed.md, issue 20). Same addmm, same values."""
    from . import GradBuffer

    if sae.training and xc.dim() == 2 and not torch.is_autocast_enabled(xc.device.type):
        buf = sae.__dict__.setdefault("_pre_buffer", (GradBuffer(),))[0]
        out = buf.take(xc, (xc.shape[0], sae.W_enc.shape[0])) if xc.dtype == sae.W_enc.dtype else None
        if out is not None:
            return torch.addmm(b_enc, xc, sae.W_enc.t(), out=out)
    return F.linear(xc, sae.W_enc, b_enc)


def _select(sae, pre: Tensor, xc: Tensor, dead_mask: Optional[Tensor], k_aux: int, backend: str):
    """Under no_grad: the activation's selection and, as extra column blocks of one code, AuxK's and
    Multi-TopK's. Returns ``(selected, code, pre_sel, aux_block)``."""
    from . import SparseCode, topk_among

    cfg = sae.config
    selected = sae.activation.sparse_fn(pre, sae, xc)
    # The pre-activations at the selection, without a gather from pre: a main slot's value is
    # ReLU(pre) * keep, i.e. pre itself wherever it is > 0 -- the only slots that keep a value
    # and a gradient (the others are masked to 0 in fused_forward).
    picks, supports, pre_parts = [selected.indices], [None], [selected.values]
    aux_block = False
    if k_aux:
        # Exact pruning: dead latents with pre <= 0 add nothing (value, dW_dec, gradient through
        # the ReLU), so the block only needs the most positive dead pre-activations of one row.
        assert dead_mask is not None  # k_aux > 0 only with a dead mask
        aux, support, aux_pre = topk_among(pre, dead_mask.to(pre.device), k_aux, return_support=True,
                                           positive_only=True, return_values=True)
        if aux.shape[1]:
            picks.append(aux)
            supports.append(support)
            pre_parts.append(aux_pre)
            aux_block = True
    if cfg.multi_topk and sae.training:
        multi_pre, multi = pre.topk(4 * cfg.k, dim=-1, sorted=False)
        picks.append(multi)
        supports.append(None)
        pre_parts.append(multi_pre)
    pre_sel = torch.cat(pre_parts, 1) if len(pre_parts) > 1 else pre_parts[0]
    # Slots whose pre-activation is <= 0 are padding: value 0 after the ReLU, no gradient. The
    # torch ops skip them (AuxK's block is mostly padding beyond each row's few positives).
    valid = pre_sel > 0 if backend == "torch" else None
    if valid is not None and bool(valid.all()):
        valid = None
    code = SparseCode(torch.cat(picks, 1) if len(picks) > 1 else picks[0], cfg.n_latents,
                      [p.shape[1] for p in picks], supports, valid)
    return selected, code, pre_sel, aux_block


def fused_forward(sae, x: Tensor, dead_mask: Optional[Tensor]) -> Optional[FusedForward]:
    """The fused sparse step of ``sae`` on normalized inputs x [N, d], or None when it does not apply (the
    activation has no sparse form, the backend resolves to "dense", or the code is dense: batchtopk at
    inference).

    The dense pre-activations [N, n] once under no_grad; the selections of the activation, AuxK and
    Multi-TopK chosen from them as the column blocks of one sparse code; the selected values with a sparse
    encoder backward; one sparse decode of all blocks. No dense [N, n] tensor enters autograd. AuxK's block
    keeps only as many columns as the most dead pre-activations > 0 in one row (at most k_aux; the others
    are 0 after the ReLU and contribute nothing).
    """
    from . import decode_code, encode_selected, resolve_backend

    if getattr(sae.activation, "sparse_fn", None) is None or not (sae.activation.k_sparse or sae.training):
        return None
    backend = resolve_backend(sae.config.kernel, x.device)
    if backend == "dense":
        return None
    k_aux = sae._auxk_width(dead_mask)
    b_enc = sae.b_enc if sae.uses_b_enc else torch.zeros_like(sae.b_enc)
    with torch.no_grad():
        xc = x - sae.b_dec
        pre = _pre_activations(sae, xc, b_enc)
        selected, code, pre_sel, aux_block = _select(sae, pre, xc, dead_mask, k_aux, backend)
        del pre
    # W_enc's and W_dec's gradients reuse their memory from step to step on CPU (GradBuffer)
    enc_buf, dec_buf = grad_buffers(sae)
    parts = encode_selected(x, sae.W_enc, b_enc, sae.b_dec, code, pre_sel, backend=backend,
                            grad_buffer=enc_buf).split(code.blocks, dim=1)
    # ReLU(pre) * keep with its gradient: selected.values > 0 exactly where pre > 0 and the slot is kept.
    main = parts[0].where(selected.values > 0, 0.0)
    values = torch.cat([main] + [p.relu() for p in parts[1:]], 1) if len(parts) > 1 else main
    decoded = list(decode_code(values, code, sae.W_dec, backend=backend, grad_buffer=dec_buf))
    x_hat = decoded.pop(0).add_(sae.b_dec)  # in place: the decode's output is not needed by its backward
    e_hat: Optional[Tensor]
    if aux_block:
        e_hat = decoded.pop(0)
    else:  # no dead pre-activation > 0 anywhere: AuxK's decode is 0 (its loss has no gradient)
        e_hat = torch.zeros_like(x_hat) if k_aux else None
    x_hat4 = decoded.pop(0).add_(sae.b_dec) if decoded else None
    return FusedForward(Latents(values=main, indices=selected.indices), x_hat, e_hat, x_hat4)

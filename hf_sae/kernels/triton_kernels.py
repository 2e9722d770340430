"""Triton kernels of the sparse TopK step (GPU path), one beside each function of ``reference.py``.

Same signatures and semantics as :mod:`hf_sae.kernels.reference` (``decode_forward``,
``decode_backward``, ``encoder_backward``); the tests run both on the same inputs, on CPU under
``TRITON_INTERPRET=1`` (set before this module is imported: ``triton.jit`` reads it at decoration).

Layout: the token-major kernels run one program per (token i, block of BLOCK_J code slots) and walk
the d dimension in BLOCK_D chunks. The table gradients (d W_dec, d W_enc) have two forms, chosen by
the environment variable ``HF_SAE_TRITON_TABLE_GRAD`` (read at each call):

* ``atomic`` (default): token-major atomic adds into the selected rows (no sort).
* ``sorted``: latent-major, one program per (latent, BLOCK_D columns) summing the latent's slots in
  the order of the code's transpose (:meth:`SparseCode.transpose`, a sort of the N*W slot ids);
  every row is written once, without atomics, so the result is bit-reproducible run to run.

On an H200 (benchmarks/RESULTS_speed_gpu.md) ``atomic`` was faster in bf16 everywhere and in fp32
without dead latents; ``sorted`` won only in fp32 with AuxK at n <= 32768.

Accumulation is float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

_BLOCK_J = 16
_BLOCK_D = 128
COMPACT_TABLES = False  # GPU gathers do not gain from compacting the table (see reference.SparseCode)


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _blocks(w: int, d: int) -> tuple[int, int]:
    bj = min(_BLOCK_J, triton.next_power_of_2(max(1, w)))
    bd = min(_BLOCK_D, triton.next_power_of_2(max(1, d)))
    return bj, bd


@triton.jit
def _decode_fwd_kernel(idx_ptr, coef_ptr, table_ptr, out_ptr, W, D,
                       ACC: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    # out[i, dblock] = sum_j coef[i, j] * table[idx[i, j], dblock]
    i = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    acc = tl.zeros([BLOCK_D], dtype=ACC)
    for j0 in range(0, W, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        jmask = offs_j < W
        lat = tl.load(idx_ptr + i * W + offs_j, mask=jmask, other=0)
        c = tl.load(coef_ptr + i * W + offs_j, mask=jmask, other=0.0).to(ACC)
        t = tl.load(table_ptr + lat[:, None] * D + offs_d[None, :], mask=jmask[:, None] & dmask[None, :], other=0.0)
        acc += tl.sum(c[:, None] * t.to(ACC), axis=0)
    tl.store(out_ptr + i * D + offs_d, acc.to(out_ptr.dtype.element_ty), mask=dmask)


@triton.jit
def _decode_bwd_kernel(idx_ptr, coef_ptr, table_ptr, grad_ptr, gcoef_ptr, gtable_ptr, W, D,
                       NEED_COEF: tl.constexpr, NEED_TABLE: tl.constexpr,
                       ACC: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    # gcoef[i, j] = table[idx[i, j]] . grad[i];   gtable[idx[i, j]] += coef[i, j] * grad[i]
    i = tl.program_id(0).to(tl.int64)
    offs_j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    jmask = offs_j < W
    lat = tl.load(idx_ptr + i * W + offs_j, mask=jmask, other=0)
    c = tl.load(coef_ptr + i * W + offs_j, mask=jmask, other=0.0).to(ACC)
    dot = tl.zeros([BLOCK_J], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        m2 = jmask[:, None] & dmask[None, :]
        g = tl.load(grad_ptr + i * D + offs_d, mask=dmask, other=0.0).to(ACC)
        if NEED_COEF:
            t = tl.load(table_ptr + lat[:, None] * D + offs_d[None, :], mask=m2, other=0.0).to(ACC)
            dot += tl.sum(t * g[None, :], axis=1)
        if NEED_TABLE:
            tl.atomic_add(gtable_ptr + lat[:, None] * D + offs_d[None, :], c[:, None] * g[None, :], mask=m2)
    if NEED_COEF:
        tl.store(gcoef_ptr + i * W + offs_j, dot.to(gcoef_ptr.dtype.element_ty), mask=jmask)


@triton.jit
def _encoder_bwd_kernel(idx_ptr, grad_ptr, x_ptr, bdec_ptr, gW_ptr, gb_ptr, W, D,
                        NEED_W: tl.constexpr, ACC: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    # gW[idx[i, j]] += grad[i, j] * (x[i] - b_dec);   gb[idx[i, j]] += grad[i, j]
    i = tl.program_id(0).to(tl.int64)
    offs_j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    jmask = offs_j < W
    lat = tl.load(idx_ptr + i * W + offs_j, mask=jmask, other=0)
    g = tl.load(grad_ptr + i * W + offs_j, mask=jmask, other=0.0).to(ACC)
    tl.atomic_add(gb_ptr + lat, g, mask=jmask)
    if NEED_W:
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            dmask = offs_d < D
            xc = (tl.load(x_ptr + i * D + offs_d, mask=dmask, other=0.0).to(ACC)
                  - tl.load(bdec_ptr + offs_d, mask=dmask, other=0.0).to(ACC))
            tl.atomic_add(gW_ptr + lat[:, None] * D + offs_d[None, :], g[:, None] * xc[None, :],
                          mask=jmask[:, None] & dmask[None, :])


@triton.jit
def _scatter_sorted_kernel(offsets_ptr, row_ptr, coef_ptr, rows_ptr, out_ptr, D,
                           ACC: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    # out[l, dblock] = sum over the sorted slots s in [offsets[l], offsets[l + 1]) of coef[s] * rows[row[s], dblock]
    lat = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    start = tl.load(offsets_ptr + lat)
    end = tl.load(offsets_ptr + lat + 1)
    acc = tl.zeros([BLOCK_D], dtype=ACC)
    for s0 in range(start, end, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        smask = offs_s < end
        r = tl.load(row_ptr + offs_s, mask=smask, other=0)
        c = tl.load(coef_ptr + offs_s, mask=smask, other=0.0).to(ACC)
        t = tl.load(rows_ptr + r[:, None] * D + offs_d[None, :], mask=smask[:, None] & dmask[None, :], other=0.0)
        acc += tl.sum(c[:, None] * t.to(ACC), axis=0)
    tl.store(out_ptr + lat * D + offs_d, acc.to(out_ptr.dtype.element_ty), mask=dmask)


TABLE_GRAD_ENV = "HF_SAE_TRITON_TABLE_GRAD"


def table_grad_mode() -> str:
    """``atomic`` (default) or ``sorted``: how the table gradients are formed (see the module docstring)."""
    mode = os.environ.get(TABLE_GRAD_ENV, "atomic").strip().lower() or "atomic"
    if mode not in ("sorted", "atomic"):
        raise ValueError(f"{TABLE_GRAD_ENV}={mode!r}: choose 'sorted' or 'atomic'.")
    return mode


_BLOCK_S = 16


def scatter_sorted(code, coef: Tensor, rows: Tensor, row_of_slot: Tensor, acc: torch.dtype) -> Tensor:
    """Latent-major scatter (Triton): out[l] = sum over slots (i, j) with idx[i, j] == l of
    coef[i, j] * rows[row_of_slot(i, j)]. ``coef`` [N, W]; ``rows`` [R, d]; ``row_of_slot`` [N*W] in the
    code's sorted slot order. Returns [n, d] in ``acc`` (rows of unused latents are 0)."""
    offsets, order, _ = code.transpose()
    n, d = code.n, rows.shape[1]
    out = torch.empty(n, d, dtype=acc, device=rows.device)
    if n == 0:
        return out
    bounds = torch.cat([offsets, offsets.new_full((1,), order.numel())])
    coef_sorted = coef.reshape(-1).index_select(0, order).contiguous()
    bd = min(_BLOCK_D, triton.next_power_of_2(max(1, d)))
    _scatter_sorted_kernel[(n, triton.cdiv(d, bd))](bounds, row_of_slot.contiguous(), coef_sorted, rows.contiguous(),
                                                    out, d, ACC=_tl_acc(acc), BLOCK_S=_BLOCK_S, BLOCK_D=bd)
    return out


def decode_forward(idx: Tensor, coef: Tensor, table: Tensor) -> Tensor:
    """Sparse decode (Triton): out[i] = sum_j coef[i, j] * table[idx[i, j]]. [N, w], [N, w], [n, d] -> [N, d]."""
    idx, coef, table = idx.contiguous(), coef.contiguous(), table.contiguous()
    N, w = idx.shape
    d = table.shape[1]
    out = torch.empty(N, d, dtype=table.dtype, device=table.device)
    if N == 0:
        return out
    if w == 0:
        return out.zero_()
    bj, bd = _blocks(w, d)
    _decode_fwd_kernel[(N, triton.cdiv(d, bd))](idx, coef, table, out, w, d,
                                               ACC=_tl_acc(_acc_dtype(table)), BLOCK_J=bj, BLOCK_D=bd)
    return out


def decode_backward(code, values: Tensor, table: Tensor, grads, need_values: bool = True,
                    need_table: bool = True) -> tuple[Tensor | None, Tensor | None]:
    """Backward of decoding every block of ``code`` (a :class:`~hf_sae.kernels.reference.SparseCode`;
    block b's output is ``gather_sum(idx[:, b], values[:, b], table)``, ``grads[b]`` [N, d] its gradient).
    Returns (d values [N, W], d table [n, d]); None where not needed. d table: see ``table_grad_mode``."""
    N, W = code.shape
    n, d = table.shape
    acc = _acc_dtype(table)
    want_table = need_table
    sorted_table = need_table and N > 0 and W > 0 and table_grad_mode() == "sorted"
    g_values = torch.zeros(N, W, dtype=acc, device=table.device) if need_values else None
    g_table = torch.zeros(n, d, dtype=acc, device=table.device) if need_table and not sorted_table else None
    if sorted_table:
        rows = torch.cat([g.to(table.dtype) for g in grads], 0) if len(grads) > 1 else grads[0].to(table.dtype)
        g_table = scatter_sorted(code, values, rows, code.stacked_token(), acc)
        need_table = False
    if N and W and (need_values or need_table):
        table = table.contiguous()
        for cols, grad in zip(code.block_slices(), grads):
            idx = code.idx[:, cols].contiguous()
            coef = values[:, cols].contiguous()
            w = idx.shape[1]
            if w == 0:
                continue
            g_blk = torch.zeros(N, w, dtype=acc, device=table.device) if need_values else None
            bj, bd = _blocks(w, d)
            grad = grad.contiguous()
            _decode_bwd_kernel[(N, triton.cdiv(w, bj))](
                idx, coef, table, grad, g_blk if need_values else grad, g_table if need_table else grad, w, d,
                NEED_COEF=need_values, NEED_TABLE=need_table, ACC=_tl_acc(acc), BLOCK_J=bj, BLOCK_D=bd)
            if g_values is not None and g_blk is not None:
                g_values[:, cols] = g_blk
    return (g_values.to(values.dtype) if g_values is not None else None,
            g_table.to(table.dtype) if want_table and g_table is not None else None)


def encoder_backward(code, grad: Tensor, x: Tensor, b_dec: Tensor, need_W: bool = True) -> tuple[Tensor | None, Tensor]:
    """Sparse encoder backward (Triton): (d W_enc [n, d] or None, d b_enc [n]) for
    pre[i, idx[i, j]] = W_enc[idx[i, j]] . (x[i] - b_dec) + b_enc[idx[i, j]], given grad [N, W]."""
    idx, grad, x, b_dec = code.idx.contiguous(), grad.contiguous(), x.contiguous(), b_dec.contiguous()
    N, w = idx.shape
    n, d = code.n, x.shape[1]
    acc = _acc_dtype(x)
    if need_W and N and w and table_grad_mode() == "sorted":
        g_b = torch.zeros(n, dtype=acc, device=x.device).index_add_(0, idx.reshape(-1), grad.reshape(-1).to(acc))
        g_W = scatter_sorted(code, grad, x - b_dec, code.token(), acc)
        return g_W.to(x.dtype), g_b.to(grad.dtype)
    g_b = torch.zeros(n, dtype=acc, device=x.device)
    g_W_dense = torch.zeros(n, d, dtype=acc, device=x.device) if need_W else None
    if N and w:
        bj, bd = _blocks(w, d)
        _encoder_bwd_kernel[(N, triton.cdiv(w, bj))](
            idx, grad, x, b_dec, g_W_dense if g_W_dense is not None else g_b, g_b, w, d,
            NEED_W=need_W, ACC=_tl_acc(acc), BLOCK_J=bj, BLOCK_D=bd)
    return (g_W_dense.to(x.dtype) if g_W_dense is not None else None), g_b.to(grad.dtype)

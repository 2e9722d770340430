"""Pure-torch sparse primitives: the CPU fast path and the reference the Triton kernels are tested against.

A k-sparse code is a pair ``(coef [N, w], idx [N, w])``: row i of the batch uses the latents
``idx[i, :]`` with weights ``coef[i, :]`` (padded slots carry weight 0). With a table ``T [n, d]``
(a decoder or encoder matrix) and dense rows ``R [N, d]`` the products a TopK training step needs are

    gather_sum(idx, coef, T)[i]      = sum_j coef[i, j] * T[idx[i, j]]                 -> [N, d]
    gather_dot(idx, T, R)[i, j]      = T[idx[i, j]] . R[i]                              -> [N, w]
    scatter_outer(idx, coef, R, n)   = sum_{i, j} coef[i, j] * e_{idx[i, j]} R[i]^T    -> [n, d]

(the sparse decode, its gradient w.r.t. the values, and w.r.t. the table; the encoder backward is
``scatter_outer`` again). Each costs O(N * w * d) and none forms a dense [N, n] tensor.

How they run on CPU: ``gather_sum`` is ``embedding_bag`` over the tokens (token-major). The two
backward products run latent-major: the code is transposed once (:class:`SparseCode`, a counting sort
of the N*w slot ids) and every latent's slots become one bag of ``embedding_bag`` (for the scatter)
or of its per-sample-weight gradient (for the dot products). That reads each used table row once,
in order, and keeps the random accesses within the [N, d] rows, which stay in cache.

``*_naive`` functions are the obvious dense formulations, kept for tests.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


class SparseCode:
    """The selected latents of one batch, shared by every sparse product of a training step.

    ``idx`` [N, W] int64 is made of column ``blocks`` (e.g. the activation's k, AuxK's k_aux and
    Multi-TopK's 4k columns). The latent-major transpose is computed on first use and cached, so the
    decoder and encoder backward passes sort the slots once between them.

    Args:
        idx: [N, W] int64 latent ids in [0, n).
        n: number of latents.
        blocks: widths of the column blocks (sum W); default one block.
        supports: per block, None or ``(cols [m], local [N, w_b])`` when the block only draws from the
            latents ``cols`` (AuxK: the dead ones) and ``idx[:, block] == cols[local]``. The CPU decode
            then gathers from the compacted table rows ``W[cols]`` (fewer pages touched: ~25% faster).
        valid: optional [N, W] bool, False for slots that carry value 0 and whose value gradient is not
            needed (a ReLU'd pre-activation <= 0: padding). The torch ops skip them (``active_*``); the
            results are the same as with every slot (the skipped terms are exact zeros), except that the
            value gradient of a skipped slot comes back as 0. Ops that ignore it stay exact.
    """

    def __init__(self, idx: Tensor, n: int, blocks: Optional[Sequence[int]] = None,
                 supports: Optional[Sequence[Optional[tuple[Tensor, Tensor]]]] = None,
                 valid: Optional[Tensor] = None):
        self.idx = idx
        self.n = int(n)
        self.blocks = tuple(int(b) for b in blocks) if blocks is not None else (idx.shape[1],)
        if sum(self.blocks) != idx.shape[1]:
            raise ValueError(f"SparseCode: blocks {self.blocks} must sum to the code width {idx.shape[1]}.")
        self.supports = tuple(supports) if supports is not None else (None,) * len(self.blocks)
        if len(self.supports) != len(self.blocks):
            raise ValueError(f"SparseCode: {len(self.supports)} supports for {len(self.blocks)} blocks.")
        if valid is not None and valid.shape != idx.shape:
            raise ValueError(f"SparseCode: valid {tuple(valid.shape)} must have the code's shape {tuple(idx.shape)}.")
        self.valid = valid
        self._transpose: Optional[tuple[Tensor, Tensor, Tensor]] = None
        self._stacked: Optional[Tensor] = None
        self._active: Optional[tuple[Tensor, Tensor, Tensor]] = None
        self._active_rows: dict[bool, Tensor] = {}

    @property
    def shape(self) -> torch.Size:
        return self.idx.shape

    def block_slices(self) -> list[slice]:
        """Column slices of the blocks."""
        out, start = [], 0
        for b in self.blocks:
            out.append(slice(start, start + b))
            start += b
        return out

    def transpose(self) -> tuple[Tensor, Tensor, Tensor]:
        """(offsets [n], order [N*W], latent [N*W]): the flattened slots sorted by latent (``order``
        permutes them), the latent of each sorted slot, and where each latent's run of slots starts."""
        if self._transpose is None:
            flat = self.idx.reshape(-1)
            key = flat.to(torch.int32) if self.n < 2**31 else flat
            latent, order = _sort_ints(key)
            counts = torch.bincount(latent, minlength=self.n)
            offsets = torch.zeros(self.n, dtype=torch.long, device=flat.device)
            torch.cumsum(counts[:-1], 0, out=offsets[1:])
            self._transpose = (offsets, order, latent.long())
        return self._transpose

    def token(self) -> Tensor:
        """[N*W] batch row of each sorted slot."""
        _, order, _ = self.transpose()
        return torch.div(order, max(1, self.idx.shape[1]), rounding_mode="floor")

    def stacked_token(self) -> Tensor:
        """[N*W] row of each sorted slot in the blocks' stacked rows [n_blocks * N, d]: token + N * block."""
        if self._stacked is None:
            self._stacked = self._rows_of(self.transpose()[1], stacked=True)
        return self._stacked

    def _rows_of(self, order: Tensor, stacked: bool) -> Tensor:
        W = max(1, self.idx.shape[1])
        token = torch.div(order, W, rounding_mode="floor")
        if stacked and len(self.blocks) > 1:
            ends = torch.tensor(list(_cumsum(self.blocks))[:-1], device=order.device)
            block = torch.bucketize(order % W, ends, right=True)
            token = token + self.idx.shape[0] * block
        return token

    def active_transpose(self) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`transpose` restricted to the ``valid`` slots: (offsets [n], order [S], latent [S]) for the
        S valid slots sorted by latent (the transpose itself when ``valid`` is None)."""
        if self.valid is None:
            return self.transpose()
        if self._active is None:
            flat = self.idx.reshape(-1)
            key = flat.to(torch.int32) if self.n < 2**31 - 1 else flat
            key = key.masked_fill(~self.valid.reshape(-1), self.n)  # invalid slots sort last
            latent, order = _sort_ints(key)
            S = int(self.valid.sum())
            latent, order = latent[:S], order[:S]
            counts = torch.bincount(latent, minlength=self.n)
            offsets = torch.zeros(self.n, dtype=torch.long, device=flat.device)
            torch.cumsum(counts[:-1], 0, out=offsets[1:])
            self._active = (offsets, order, latent.long())
        return self._active

    def active_rows(self, stacked: bool = False) -> Tensor:
        """[S] row of each slot of :meth:`active_transpose`: its token, or with ``stacked`` its row in the
        blocks' stacked rows (see :meth:`stacked_token`)."""
        if self.valid is None:
            return self.stacked_token() if stacked else self.token()
        if stacked not in self._active_rows:
            self._active_rows[stacked] = self._rows_of(self.active_transpose()[1], stacked)
        return self._active_rows[stacked]


def _cumsum(xs):
    total = 0
    for x in xs:
        total += x
        yield total


def _sort_ints(key: Tensor) -> tuple[Tensor, Tensor]:
    """Sort of a 1-D integer tensor. On CPU single-threaded: ATen's parallel radix sort is ~30x slower
    than the serial one on 2 busy cores (barrier waits), and the serial one takes milliseconds."""
    if key.is_cuda:
        return key.sort()
    old = torch.get_num_threads()
    if old == 1:
        return key.sort()
    torch.set_num_threads(1)
    try:
        return key.sort()
    finally:
        torch.set_num_threads(old)


# ------------------------------------------------------------------ the three primitives


def gather_sum(idx: Tensor, coef: Tensor, table: Tensor) -> Tensor:
    """out[i] = sum_j coef[i, j] * table[idx[i, j]].

    Args: idx [N, w] int64 in [0, n); coef [N, w]; table [n, d]. Returns [N, d] in table's dtype.
    """
    if idx.shape[1] == 0:
        return table.new_zeros(idx.shape[0], table.shape[1])
    return F.embedding_bag(idx.contiguous(), table, per_sample_weights=coef.to(table.dtype).contiguous(), mode="sum")


def gather_dot(idx: Tensor, table: Tensor, rows: Tensor, code: Optional[SparseCode] = None) -> Tensor:
    """out[i, j] = table[idx[i, j]] . rows[i].

    Args: idx [N, w] int64; table [n, d]; rows [N, d]; code: ``SparseCode(idx, n)`` if already built.
    Returns [N, w] in rows' dtype.
    """
    N, w = idx.shape
    if N == 0 or w == 0:
        return rows.new_zeros(N, w)
    code = code if code is not None else SparseCode(idx, table.shape[0])
    return _gather_dot_sorted(code, table, rows.to(table.dtype), code.token()).view(N, w).to(rows.dtype)


def _gather_dot_sorted(code: SparseCode, table: Tensor, rows: Tensor, row_of_slot: Tensor,
                       active: bool = False) -> Tensor:
    # Latent-major: bag l = the slots of latent l, its "output gradient" table[l]; the per-sample-weight
    # gradient of that embedding_bag is table[l] . rows[row_of_slot] for every slot of the bag.
    # ``active``: only the code's valid slots (row_of_slot from active_rows); the others get 0.
    offsets, order, latent = code.active_transpose() if active else code.transpose()
    if table.is_cuda and table.dtype in (torch.bfloat16, torch.float16):  # no half kernel of this op on CUDA
        table, rows = table.float(), rows.float()
    sorted_dots = torch.ops.aten._embedding_bag_per_sample_weights_backward(
        table.contiguous(), rows.contiguous(), row_of_slot, offsets, latent, 0, -1)
    if order.numel() == code.idx.numel():
        return torch.empty_like(sorted_dots).index_put_((order,), sorted_dots)
    return sorted_dots.new_zeros(code.idx.numel()).index_put_((order,), sorted_dots)


def scatter_outer(idx: Tensor, coef: Tensor, rows: Tensor, n: int, code: Optional[SparseCode] = None) -> Tensor:
    """out[l] = sum over slots (i, j) with idx[i, j] == l of coef[i, j] * rows[i].

    Args: idx [N, w] int64 in [0, n); coef [N, w]; rows [N, d]; n: table rows; code: ``SparseCode(idx, n)``
    if already built. Returns a dense [n, d] (rows that no slot uses are 0) in rows' dtype.
    """
    N, w = idx.shape
    if N == 0 or w == 0:
        return rows.new_zeros(n, rows.shape[1])
    code = code if code is not None else SparseCode(idx, n)
    return _scatter_sorted(code, coef.to(rows.dtype), rows, code.token())


def _scatter_sorted(code: SparseCode, coef: Tensor, rows: Tensor, row_of_slot: Tensor, active: bool = False,
                    out: Optional[Tensor] = None) -> Tensor:
    # Latent-major: one bag per latent (empty bags give zero rows), weights = the slots' coefficients.
    # ``active``: only the code's valid slots (row_of_slot from active_rows). ``out``: write into this
    # [n, d] tensor (see can_scatter_into) instead of a new one.
    offsets, order, _ = code.active_transpose() if active else code.transpose()
    if order.numel() == 0:
        return rows.new_zeros(code.n, rows.shape[1]) if out is None else out.zero_()
    weights = coef.reshape(-1)[order]
    if out is None or order.numel() > CSR_MAX_SLOTS_PER_LATENT * code.n:
        return F.embedding_bag(row_of_slot, rows.contiguous(), offsets, per_sample_weights=weights, mode="sum")
    # The same sums as a CSR [n, R] (latent rows, one entry per slot) times rows [R, d], which MKL writes
    # into ``out`` (beta = 0: out's old content is ignored, empty rows come out 0).
    crow = torch.cat([offsets, offsets.new_full((1,), order.numel())])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*")  # "beta state" / invariant-check notices
        csr = torch.sparse_csr_tensor(crow, row_of_slot, weights.to(out.dtype), (code.n, rows.shape[0]))
        return torch.addmm(out, csr, rows.to(out.dtype).contiguous(), beta=0, out=out)


CSR_MAX_SLOTS_PER_LATENT = 32
"""Above this many slots per latent (on average) the CSR product is slower than embedding_bag into new
memory (measured: benchmarks/RESULTS_speed.md, "Kernel notes"), so _scatter_sorted ignores ``out`` there."""


def can_scatter_into(like: Tensor) -> bool:
    """Whether the torch ops can write a table gradient like ``like`` [n, d] into a given tensor (MKL's
    sparse x dense product: CPU, float32/float64, torch built with MKL) instead of allocating it."""
    return (like.device.type == "cpu" and like.dtype in (torch.float32, torch.float64)
            and torch.backends.mkl.is_available())


def segment_sum(idx: Tensor, coef: Tensor, n: int) -> Tensor:
    """out[l] = sum of coef[i, j] over slots with idx[i, j] == l. idx, coef [N, w] -> [n]."""
    return coef.new_zeros(n).index_add_(0, idx.reshape(-1), coef.reshape(-1))


# ------------------------------------------------------------------ the kernels of the step
# (same signatures in triton_kernels.py)

COMPACT_TABLES = True  # decode_forward of a block with a support gathers from the compacted table


def decode_forward(idx: Tensor, coef: Tensor, table: Tensor, valid: Optional[Tensor] = None) -> Tensor:
    """Sparse decode of one block: gather_sum(idx, coef, table) -> [N, d]. ``valid`` [N, w] bool: only
    these slots are read (the others must have coef 0; same result, fewer rows gathered)."""
    if valid is None or idx.shape[1] == 0:
        return gather_sum(idx, coef, table)
    counts = valid.sum(1)
    offsets = torch.zeros_like(counts)
    torch.cumsum(counts[:-1], 0, out=offsets[1:])
    return F.embedding_bag(idx[valid], table, offsets, per_sample_weights=coef[valid].to(table.dtype), mode="sum")


def decode_backward(code: SparseCode, values: Tensor, table: Tensor, grads: Sequence[Tensor],
                    need_values: bool = True, need_table: bool = True,
                    table_out: Optional[Tensor] = None) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """Backward of decoding every block of ``code``: block b's output is
    ``gather_sum(idx[:, b], values[:, b], table)`` and ``grads[b]`` [N, d] its gradient.

    Returns (d values [N, W], d table [n, d]), None where not needed. One latent-major pass over all
    blocks (their gradient rows stacked), sharing the code's transpose. ``table_out``: an [n, d] tensor
    d table may be written into (:func:`can_scatter_into` must hold; its content is overwritten); it is
    not used above ``CSR_MAX_SLOTS_PER_LATENT`` slots per latent, so always use the returned tensor.
    """
    N, W = code.shape
    if N == 0 or W == 0:
        g_table = None
        if need_table:
            g_table = table.new_zeros(table.shape) if table_out is None else table_out.zero_()
        return values.new_zeros(N, W) if need_values else None, g_table
    rows = torch.cat([g.to(table.dtype) for g in grads], 0) if len(grads) > 1 else grads[0].to(table.dtype)
    row_of_slot = code.active_rows(stacked=True)
    g_values = (_gather_dot_sorted(code, table, rows, row_of_slot, active=True).view(N, W).to(values.dtype)
                if need_values else None)
    g_table = (_scatter_sorted(code, values.to(table.dtype), rows, row_of_slot, active=True, out=table_out)
               if need_table else None)
    return g_values, g_table


def encoder_backward(code: SparseCode, grad: Tensor, x: Tensor, b_dec: Tensor,
                     need_W: bool = True, W_out: Optional[Tensor] = None) -> tuple[Optional[Tensor], Tensor]:
    """Sparse encoder backward for pre[i, idx[i, j]] = W_enc[idx[i, j]] . (x[i] - b_dec) + b_enc[idx[i, j]].

    Args: code (idx [N, W]); grad [N, W] (d loss / d pre at the selection); x [N, d]; b_dec [d];
    W_out: an [n, d] tensor d W_enc may be written into (as ``table_out`` of :func:`decode_backward`).
    Returns: (d W_enc [n, d] or None, d b_enc [n]).
    """
    g_b = segment_sum(code.idx, grad, code.n)
    g_W = None
    if need_W:
        if code.idx.numel() == 0:
            g_W = x.new_zeros(code.n, x.shape[1]) if W_out is None else W_out.zero_()
        else:
            g_W = _scatter_sorted(code, grad.to(x.dtype), x - b_dec, code.active_rows(), active=True, out=W_out)
    return g_W, g_b


# ------------------------------------------------------------------ naive (dense) forms, for tests


def densify(idx: Tensor, coef: Tensor, n: int) -> Tensor:
    """The dense code [N, n] (sum of duplicate slots)."""
    return coef.new_zeros(idx.shape[0], n).scatter_add_(1, idx, coef)


def gather_sum_naive(idx: Tensor, coef: Tensor, table: Tensor) -> Tensor:
    """Dense reference of :func:`gather_sum`: densify(idx, coef) @ table."""
    return densify(idx, coef.to(table.dtype), table.shape[0]) @ table


def gather_dot_naive(idx: Tensor, table: Tensor, rows: Tensor) -> Tensor:
    """Dense reference of :func:`gather_dot`: (rows @ table^T).gather(idx)."""
    return (rows @ table.t().to(rows.dtype)).gather(1, idx)


def scatter_outer_naive(idx: Tensor, coef: Tensor, rows: Tensor, n: int) -> Tensor:
    """Dense reference of :func:`scatter_outer`: densify(idx, coef)^T @ rows."""
    return densify(idx, coef.to(rows.dtype), n).t() @ rows

"""Pure-torch sparse primitives: the CPU fast path and the reference the Triton kernels are tested against.

A k-sparse code is a pair ``(coef [N, w], idx [N, w])``: row i of the batch uses the latents
``idx[i, :]`` with weights ``coef[i, :]`` (padded slots carry weight 0). With a table ``T [n, d]``
(a decoder or encoder matrix) and dense rows ``R [N, d]`` the three products a TopK training step
needs are

    gather_sum(idx, coef, T)[i]      = sum_j coef[i, j] * T[idx[i, j]]                 -> [N, d]
    gather_dot(idx, T, R)[i, j]      = T[idx[i, j]] . R[i]                              -> [N, w]
    scatter_outer(idx, coef, R, n)   = sum_{i, j} coef[i, j] * e_{idx[i, j]} R[i]^T    -> [n, d]

(``gather_sum`` is the sparse decode, ``gather_dot`` the gradient of the decode w.r.t. the values,
``scatter_outer`` the gradient w.r.t. the table; the encoder backward is ``scatter_outer`` again).
Each costs O(N * w * d): none forms a dense [N, n] tensor. ``*_naive`` functions are the obvious
dense formulations, kept for tests only.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

# Rows of the batch processed at once by the index_add fallback of scatter_outer (bounds [chunk, w, d]).
_CHUNK_ELEMS = 1 << 22


def gather_sum(idx: Tensor, coef: Tensor, table: Tensor) -> Tensor:
    """out[i] = sum_j coef[i, j] * table[idx[i, j]].

    Args: idx [N, w] int64 in [0, n); coef [N, w]; table [n, d]. Returns [N, d] in table's dtype.
    """
    if idx.shape[1] == 0:
        return table.new_zeros(idx.shape[0], table.shape[1])
    return F.embedding_bag(idx, table, per_sample_weights=coef.to(table.dtype), mode="sum")


def _use_sparse_matmul(t: Tensor) -> bool:
    # MKL sparse (CPU) and cuSPARSE handle float32/float64; other dtypes use the gather path.
    return t.dtype in (torch.float32, torch.float64)


def gather_dot(idx: Tensor, table: Tensor, rows: Tensor) -> Tensor:
    """out[i, j] = table[idx[i, j]] . rows[i].

    Args: idx [N, w] int64; table [n, d]; rows [N, d]. Returns [N, w] in rows' dtype.
    """
    N, w = idx.shape
    if N == 0 or w == 0:
        return rows.new_zeros(N, w)
    # The per-sample-weights gradient of embedding_bag is exactly these k-wide dot products; ATen runs
    # it without forming the [N, w, d] gather (and it accepts duplicate ids in a row).
    offsets = torch.arange(0, N * w, w, device=idx.device)
    bag_of_slot = torch.arange(N, device=idx.device).repeat_interleave(w)
    out = torch.ops.aten._embedding_bag_per_sample_weights_backward(
        rows.to(table.dtype).contiguous(), table, idx.reshape(-1), offsets, bag_of_slot, 0, -1)
    return out.view(N, w).to(rows.dtype)


def code_transpose(idx: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """The CSR structure of the transposed code (latent-major): (crow [n+1], token [N*w], order [N*w]).

    ``order`` permutes the flattened slots so that they are sorted by latent; ``token[m]`` is the batch
    row of sorted slot m. Reusable for every ``scatter_outer`` over the same ``idx``.
    """
    flat = idx.reshape(-1)
    sorted_lat, order = flat.sort(stable=True)
    counts = torch.bincount(sorted_lat, minlength=n)
    crow = torch.zeros(n + 1, dtype=torch.long, device=idx.device)
    torch.cumsum(counts, 0, out=crow[1:])
    token = torch.div(order, idx.shape[1], rounding_mode="floor")
    return crow, token, order


def scatter_outer(idx: Tensor, coef: Tensor, rows: Tensor, n: int, transpose=None) -> Tensor:
    """out[l] = sum over slots (i, j) with idx[i, j] == l of coef[i, j] * rows[i].

    Args: idx [N, w] int64 in [0, n); coef [N, w]; rows [N, d]; n: table rows; transpose: the result
    of :func:`code_transpose` for ``idx`` (computed when None). Returns a dense [n, d] (rows that no
    slot uses are 0), in rows' dtype.
    """
    N, w = idx.shape
    d = rows.shape[1]
    if N == 0 or w == 0:
        return rows.new_zeros(n, d)
    coef = coef.to(rows.dtype)
    if _use_sparse_matmul(rows):
        crow, token, order = transpose if transpose is not None else code_transpose(idx, n)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
            S = torch.sparse_csr_tensor(crow, token, coef.reshape(-1)[order], (n, N), check_invariants=False)
        return S @ rows
    out = rows.new_zeros(n, d)
    chunk = max(1, _CHUNK_ELEMS // max(1, w * d))
    for s in range(0, N, chunk):
        e = min(N, s + chunk)
        src = (coef[s:e].unsqueeze(-1) * rows[s:e].unsqueeze(1)).reshape(-1, d)
        out.index_add_(0, idx[s:e].reshape(-1), src)
    return out


def segment_sum(idx: Tensor, coef: Tensor, n: int) -> Tensor:
    """out[l] = sum of coef[i, j] over slots with idx[i, j] == l. idx, coef [N, w] -> [n]."""
    return coef.new_zeros(n).index_add_(0, idx.reshape(-1), coef.reshape(-1))


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


# ------------------------------------------------------------------ the three kernels of the step
# (same signatures in triton_kernels.py)


def decode_forward(idx: Tensor, coef: Tensor, table: Tensor) -> Tensor:
    """Sparse decode: gather_sum(idx, coef, table) -> [N, d]."""
    return gather_sum(idx, coef, table)


def decode_backward(idx: Tensor, coef: Tensor, table: Tensor, grad: Tensor, need_coef: bool = True,
                    need_table: bool = True) -> tuple[Tensor | None, Tensor | None]:
    """Backward of :func:`decode_forward` given grad [N, d]: (d coef [N, w], d table [n, d]) (None when
    not needed)."""
    g_coef = gather_dot(idx, table, grad).to(coef.dtype) if need_coef else None
    g_table = scatter_outer(idx, coef, grad, table.shape[0]).to(table.dtype) if need_table else None
    return g_coef, g_table


def encoder_backward(idx: Tensor, grad: Tensor, x: Tensor, b_dec: Tensor, n: int,
                     need_W: bool = True) -> tuple[Tensor | None, Tensor]:
    """Sparse encoder backward for pre[i, idx[i, j]] = W_enc[idx[i, j]] . (x[i] - b_dec) + b_enc[idx[i, j]].

    Args: idx [N, w]; grad [N, w] (d loss / d pre at the selection); x [N, d]; b_dec [d]; n latents.
    Returns: (d W_enc [n, d] or None, d b_enc [n]).
    """
    g_b = segment_sum(idx, grad, n)
    g_W = scatter_outer(idx, grad, x - b_dec, n) if need_W else None
    return g_W, g_b

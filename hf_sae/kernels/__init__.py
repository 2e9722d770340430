"""Sparse kernels of the TopK-family training step, and the one place that picks their backend.

After the encoder's dense matmul and the top-k, a TopK step only touches k latents per token. The
functions here cover everything that follows the top-k without a dense [N, n] tensor:

* :func:`sparse_decode` / :func:`decode_code` -- x^ = sum_j values[:, j] * W_dec[indices[:, j]] (a
  gather-sum); backward: k-wide dot products for d values and a scatter-add of values x grad into the
  used rows of W_dec. ``decode_code`` decodes several column blocks of one :class:`SparseCode` (the
  activation's code, AuxK's, Multi-TopK's) with a single backward pass.
* :func:`encode_selected` -- the pre-activations ``W_enc[idx] . (x - b_dec) + b_enc[idx]`` at a
  selection chosen beforehand (under ``no_grad``) from the dense pre-activations; backward: the
  pre-activation gradient has W non-zeros per row, so dW_enc and db_enc are scatter-adds into the
  selected rows, db_dec = -db_enc @ W_enc, and dx (only if needed) a gather-sum.
* :func:`topk_among` -- AuxK's top-k restricted to the dead latents' columns.

Backends (chosen by :func:`resolve_backend`): ``torch`` (``reference.py``: embedding_bag and its
per-sample-weight gradient, token-major for the decode and latent-major for the backward),
``triton`` (``triton_kernels.py``; CUDA tensors, or any tensors with ``TRITON_INTERPRET=1``),
``dense`` (materialises the dense code; the reference). ``auto`` = Triton on CUDA when importable,
else torch. The environment variable ``HF_SAE_KERNEL`` overrides the config's ``kernel`` everywhere.
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType
from typing import Optional

import torch
from torch import Tensor

from ..configuration_sae import KERNELS as BACKENDS  # one list of backend names, kept beside SAEConfig.kernel
from . import reference
from .reference import SparseCode

ENV_VAR = "HF_SAE_KERNEL"

__all__ = ["ENV_VAR", "BACKENDS", "SparseCode", "GradBuffer", "resolve_backend", "triton_available", "get_ops",
           "sparse_decode", "decode_code", "encode_selected", "topk_among", "FusedForward", "fused_forward",
           "grad_buffers", "release_grad_buffers"]


# ------------------------------------------------------------------------------------ dispatch


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def triton_available() -> bool:
    """True when the ``triton`` package imports (checked once per process)."""
    try:
        importlib.import_module("triton")
    except Exception:  # ImportError, or a broken install raising at import
        return False
    return True


def resolve_backend(backend: Optional[str] = "auto", device: Optional[torch.device] = None) -> str:
    """The backend that will run: ``torch``, ``triton`` or ``dense``.

    Args:
        backend: the requested one (``auto``/``torch``/``triton``/``dense``, e.g. ``SAEConfig.kernel``);
            the environment variable ``HF_SAE_KERNEL`` overrides it when set.
        device: where the tensors live (``auto`` picks Triton only for CUDA).
    Raises:
        ValueError: unknown backend, or ``triton`` requested where it cannot run.
    """
    env = os.environ.get(ENV_VAR, "").strip().lower()
    choice = env or (backend or "auto")
    if choice not in BACKENDS:
        source = f"environment variable {ENV_VAR}" if env else "kernel"
        raise ValueError(f"Unknown kernel backend {choice!r} (from {source}); choose one of {BACKENDS}.")
    device = torch.device(device) if device is not None else torch.device("cpu")
    if choice == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if choice == "triton":
        if not triton_available():
            raise ValueError("kernel='triton' but the triton package is not importable; install triton or use "
                             "kernel='torch'.")
        if device.type != "cuda" and not _interpreting():
            raise ValueError(f"kernel='triton' needs CUDA tensors (got {device}); on CPU use kernel='torch', or set "
                             "TRITON_INTERPRET=1 (before importing triton) to run the kernels in the interpreter.")
    return choice


def get_ops(backend: str) -> ModuleType:
    """The module implementing the primitives for a resolved backend (``torch`` or ``triton``)."""
    if backend == "triton":
        return importlib.import_module(".triton_kernels", __name__)
    if backend in ("torch", "dense"):
        return reference
    raise ValueError(f"get_ops: backend must be resolved to 'torch', 'triton' or 'dense', got {backend!r}")


def _check_code(values: Tensor, indices: Tensor, n: int, name: str) -> None:
    if values.ndim != 2 or indices.shape != values.shape:
        raise ValueError(
            f"{name}: values {tuple(values.shape)} and indices {tuple(indices.shape)} must both be [N, w]."
        )
    if indices.dtype != torch.long:
        raise ValueError(f"{name}: indices must be int64, got {indices.dtype}; use indices.long().")
    # Range check on CPU only: on CUDA it would synchronise every call (indices come from topk there).
    if indices.numel() and not indices.is_cuda and (int(indices.min()) < 0 or int(indices.max()) >= n):
        raise ValueError(f"{name}: indices out of range [0, {n}) (min {int(indices.min())}, max {int(indices.max())}).")


# ------------------------------------------------------------------------------------ gradient buffers


def _storage_refs(t: Tensor) -> int:
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


class GradBuffer:
    """Memory for a parameter's [n, d] gradient (or the step's [N, n] pre-activations), reused from one
    training step to the next on CPU.

    A fresh [n, d] gradient per step costs page faults (the allocator maps new memory for every large
    tensor; the cost is measured in benchmarks/RESULTS_speed.md, "Kernel notes").
    The torch ops instead write the table gradient into this buffer, whenever nothing references the
    previous step's gradient any more (``zero_grad(set_to_none=True)``, the default); otherwise (the
    gradient is kept or accumulated) a new tensor is used, as without a buffer. The buffer keeps its
    memory between steps (the size of the gradient); :meth:`release` frees it.
    """

    def __init__(self):
        self._buf: Optional[Tensor] = None
        self._refs = 0

    def take(self, like: Tensor, shape: Optional[tuple] = None) -> Optional[Tensor]:
        """A tensor shaped like ``like`` (or ``shape``, with ``like``'s dtype and device) to write a gradient
        into, or None when the torch ops cannot write into one (see ``reference.can_scatter_into``) or the
        previous gradient is still referenced."""
        if not (reference.can_scatter_into(like) and hasattr(torch._C, "_storage_Use_Count")):
            return None
        shape = torch.Size(like.shape if shape is None else shape)
        buf = self._buf
        if buf is None or buf.shape != shape or buf.dtype != like.dtype or buf.device != like.device:
            self._buf = buf = torch.empty(shape, dtype=like.dtype, device=like.device)
            self._refs = _storage_refs(buf)
        elif _storage_refs(buf) != self._refs:  # the last gradient handed out (or a view of it) is alive
            return None
        return buf.detach()  # a new tensor on the same memory: autograd may keep it as .grad without a copy

    def release(self) -> None:
        """Drop the buffer (its memory returns to the allocator once no gradient uses it)."""
        self._buf = None

    def __getstate__(self):  # never pickle or deep-copy the memory
        return {"_buf": None, "_refs": 0}


# ------------------------------------------------------------------------------------ decode


class _SparseDecode(torch.autograd.Function):
    """outputs[b] [N, d] = gather_sum(idx[:, block b], values[:, block b], W_dec) for every block of a
    :class:`SparseCode`; one sparse backward for all blocks (see the module docstring)."""

    @staticmethod
    def forward(ctx, values, W_dec, code, ops, grad_buffer):
        values = values.contiguous()
        ctx.save_for_backward(values, W_dec)
        ctx.code, ctx.ops, ctx.grad_buffer = code, ops, grad_buffer
        outs = []
        for cols, support in zip(code.block_slices(), code.supports):
            # the torch ops read only the valid slots of a block that has padding (see SparseCode)
            kw = {}
            if code.valid is not None and ops is reference and not bool(code.valid[:, cols].all()):
                kw["valid"] = code.valid[:, cols]
            if support is not None and getattr(ops, "COMPACT_TABLES", False):
                latents, local = support
                outs.append(ops.decode_forward(local, values[:, cols], W_dec.index_select(0, latents), **kw))
            else:
                outs.append(ops.decode_forward(code.idx[:, cols], values[:, cols], W_dec, **kw))
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        values, W_dec = ctx.saved_tensors
        need_v, need_w = ctx.needs_input_grad[:2]
        out = ctx.grad_buffer.take(W_dec) if need_w and ctx.grad_buffer is not None and ctx.ops is reference else None
        kw = {"table_out": out} if out is not None else {}
        g_values, g_W = ctx.ops.decode_backward(ctx.code, values, W_dec, grads, need_v, need_w, **kw)
        return g_values, g_W, None, None, None


def decode_code(
    values: Tensor,
    code: SparseCode,
    W_dec: Tensor,
    backend: Optional[str] = "auto",
    grad_buffer: Optional[GradBuffer] = None,
) -> tuple[Tensor, ...]:
    """Sparse decode (no b_dec) of every column block of ``code``.

    Args:
        values: [N, W] latent values for ``code.idx`` [N, W] (padded slots 0).
        code: the batch's :class:`SparseCode` (its transpose is shared with :func:`encode_selected`).
        W_dec: [n, d] decoder.
        backend: ``auto``/``torch``/``triton``/``dense`` (``HF_SAE_KERNEL`` overrides).
        grad_buffer: where the torch ops may write W_dec's gradient (see :class:`GradBuffer`).
    Returns:
        one [N, d] tensor per block, ``sum_j values[i, j] W_dec[idx[i, j]]`` over the block's columns.
        Differentiable w.r.t. values and W_dec; the backward of all blocks is one sparse pass.
    """
    if values.shape != code.shape:
        raise ValueError(f"decode_code: values {tuple(values.shape)} must match the code {tuple(code.shape)}.")
    resolved = resolve_backend(backend, W_dec.device)
    values = values.to(W_dec.dtype)
    if resolved == "dense":
        return tuple(reference.densify(code.idx[:, c], values[:, c], code.n) @ W_dec for c in code.block_slices())
    return _SparseDecode.apply(values, W_dec, code, get_ops(resolved), grad_buffer)


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor, backend: Optional[str] = "auto") -> Tensor:
    """Sparse decode without b_dec: out[i] = sum_j values[i, j] * W_dec[indices[i, j]].

    Args:
        values: [N, w] latent values (padded slots 0), any float dtype (cast to W_dec's).
        indices: [N, w] int64 latent ids in [0, n).
        W_dec: [n, d] decoder.
        backend: ``auto``/``torch``/``triton``/``dense`` (``HF_SAE_KERNEL`` overrides).
    Returns:
        [N, d] in W_dec's dtype. Differentiable w.r.t. values ([N, w] gradient) and W_dec (a dense
        [n, d] gradient whose only non-zero rows are the used ones); never forms a dense [N, n].
    """
    _check_code(values, indices, W_dec.shape[0], "sparse_decode")
    return decode_code(values, SparseCode(indices, W_dec.shape[0]), W_dec, backend)[0]


# ------------------------------------------------------------------------------------ encoder


class _EncodeSelected(torch.autograd.Function):
    """pre_values [N, W] (given) as a function of x, W_enc, b_enc, b_dec at the code's selection."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, b_dec, pre_values, code, ops, grad_buffer):
        ctx.save_for_backward(x, W_enc, b_dec)
        ctx.code, ctx.ops, ctx.grad_buffer = code, ops, grad_buffer
        return pre_values.clone()

    @staticmethod
    def backward(ctx, grad):
        x, W_enc, b_dec = ctx.saved_tensors
        need_x, need_W, need_b, need_bdec = ctx.needs_input_grad[:4]
        grad = grad.contiguous()
        code, ops = ctx.code, ctx.ops
        g_W = g_b = g_bdec = g_x = None
        if need_W or need_b or need_bdec:
            out = ctx.grad_buffer.take(W_enc) if need_W and ctx.grad_buffer is not None and ops is reference else None
            kw = {"W_out": out} if out is not None else {}
            g_W, g_b = ops.encoder_backward(code, grad, x, b_dec, need_W, **kw)
        if need_x:
            g_x = ops.decode_forward(code.idx, grad, W_enc)  # d pre / d x = the selected W_enc rows
        if need_bdec:  # sum_i sum_j g[i,j] W_enc[idx[i,j]] = segment_sum(g) @ W_enc
            g_bdec = -g_x.sum(0) if g_x is not None else -(g_b.to(W_enc.dtype) @ W_enc)
        if not need_b:
            g_b = None
        return g_x, g_W, g_b, g_bdec, None, None, None, None


def encode_selected(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor,
    indices,
    pre_values: Tensor,
    backend: Optional[str] = "auto",
    grad_buffer: Optional[GradBuffer] = None,
) -> Tensor:
    """Differentiable encoder pre-activations at a selection made beforehand.

    ``pre_values`` must equal ``(F.linear(x - b_dec, W_enc, b_enc)).gather(1, indices)`` (computed
    once under ``no_grad`` together with the selection); this returns them with the exact gradient
    of that expression, computed sparsely.

    Args:
        x: [N, d] inputs (normalized units). W_enc: [n, d]. b_enc: [n]. b_dec: [d].
        indices: [N, W] int64 selected latents per row (duplicates allowed; their gradients add up), or
            the batch's :class:`SparseCode` (shares its transpose with :func:`decode_code`).
        pre_values: [N, W] the pre-activations at ``indices``.
        backend: ``auto``/``torch``/``triton``/``dense``.
        grad_buffer: where the torch ops may write W_enc's gradient (see :class:`GradBuffer`).
    Returns:
        [N, W] tensor equal to ``pre_values``; backward gives dx (if x requires grad), dW_enc (dense [n, d],
        non-zero only in selected rows), db_enc [n] and db_dec [d] without a dense [N, n].
    """
    n = W_enc.shape[0]
    if isinstance(indices, SparseCode):
        code = indices
        if code.shape != pre_values.shape or code.n != n:
            raise ValueError(
                f"encode_selected: code {tuple(code.shape)} over {code.n} latents does not match "
                f"pre_values {tuple(pre_values.shape)} and W_enc {tuple(W_enc.shape)}."
            )
    else:
        _check_code(pre_values, indices, n, "encode_selected")
        code = SparseCode(indices, n)
    if x.ndim != 2 or x.shape[0] != code.shape[0] or x.shape[1] != W_enc.shape[1]:
        raise ValueError(f"encode_selected: x {tuple(x.shape)} must be [N={code.shape[0]}, d={W_enc.shape[1]}].")
    resolved = resolve_backend(backend, W_enc.device)
    if resolved == "dense":
        return torch.nn.functional.linear(x - b_dec, W_enc, b_enc).gather(1, code.idx)
    return _EncodeSelected.apply(
        x, W_enc, b_enc, b_dec, pre_values.to(W_enc.dtype), code, get_ops(resolved), grad_buffer
    )


# ------------------------------------------------------------------------------------ selection


def topk_among(
    pre: Tensor,
    column_mask: Tensor,
    k: int,
    return_support: bool = False,
    positive_only: bool = False,
    return_values: bool = False,
):
    """Indices [N, k] (into [0, n)) of the k largest entries of each row of ``pre`` [N, n] among the
    columns where ``column_mask`` [n] (bool) is True -- AuxK's top-k_aux over dead latents.

    Same selection as ``pre.masked_fill(~column_mask, -inf).topk(k)`` but runs the top-k on the
    gathered [N, n_true] columns (cheaper when few columns are allowed). Needs 1 <= k <= n_true.

    Args:
        return_support: also return ``support``: ``(cols [n_true], local [N, w])`` with
            ``indices == cols[local]`` (a :class:`SparseCode` block support), or None when every column
            is allowed.
        positive_only: prune the width to ``w = min(k, most allowed entries > 0 in one row)`` (possibly
            0: indices [N, 0]). Each row's top w then holds every positive entry of its top k, so a
            ReLU'd decode of the selection equals that of the full top k exactly (AuxK: dead latents
            whose pre-activation is <= 0 contribute nothing, not even a gradient through the ReLU).
            Entries <= 0 are then treated as 0: ties among them are broken arbitrarily and their
            ``values`` come back as 0.
        return_values: also return the selected entries ``pre.gather(1, indices)`` [N, w] (clamped at 0
            with ``positive_only``).
    Returns:
        ``indices``, or the tuple ``(indices[, support][, values])`` when any ``return_*`` is set.
    """
    cols = column_mask.nonzero().squeeze(1)
    if not 1 <= k <= cols.numel():
        raise ValueError(f"topk_among: k={k} must be in [1, {cols.numel()}] (the number of allowed columns).")
    everything = cols.numel() == pre.shape[1]
    sub = pre if everything else pre.index_select(1, cols)
    if positive_only:
        # Clamped (in place on our own copy), the mostly non-positive entries are ties at 0, which makes
        # the top-k several times faster; the pruning then only looks at the [N, k] result.
        sub = sub.clamp(min=0) if everything else sub.clamp_(min=0)
    values, local = sub.topk(k, dim=-1, sorted=False)
    if positive_only:
        w = int((values > 0).sum(1).max()) if values.shape[0] else 0
        if w < k:  # each row's positives (at most w) are its w largest selected entries
            values, keep = values.topk(w, dim=-1, sorted=False)
            local = local.gather(1, keep)
    indices, support = (local, None) if everything else (cols[local], (cols, local))
    if not (return_support or return_values):
        return indices
    return (indices,) + ((support,) if return_support else ()) + ((values,) if return_values else ())


# ------------------------------------------------------------------------------------ the fused step (uses the above)

from .fused import FusedForward, fused_forward, grad_buffers, release_grad_buffers  # noqa: E402

"""One streaming pass of the LM + SAE over held-out text: everything the feature browser shows per latent.

Per latent (n latents, all at once, in memory independent of the number of tokens except for the
token ids themselves, 4 bytes per token):

- ``top``: the ``top_k`` largest activations with their token, and the latent's activation at each
  token of the context window around it (``before`` tokens before, ``after`` after). Kept as a running
  top-k per latent: each batch's candidates are merged into an ``[n, top_k]`` table.
- ``samples``: ``n_samples`` firing tokens drawn uniformly at random (the same running top-k, keyed by a
  seeded random number instead of the activation: a reservoir sample), with their contexts; sorted by
  activation they cover the latent's activation quantiles.
- ``count`` (firing density = count / n_tokens), ``sum`` (mean activation when firing), ``max``, and a
  histogram of the activation over ``HIST_EDGES`` (log-spaced, fixed, so that it streams).
- ``n2g_acts``: the dense activations of ``n2g_latents`` on the first ``n2g_tokens`` kept tokens, for the
  N2G explanation (``hf_sae.evaluation.n2g``).
- ``pool``: ``n_pool`` random contexts with the set of latents active anywhere in each (negatives for
  ``hf-sae autointerp``'s detection scoring).

Activations are in the SAE's normalized units (those of ``SparseAutoencoder.encode``). Token positions
are those of ``hf_sae.data.corpus.token_mask`` (position 0 and special tokens never count as firing).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

__all__ = ["HIST_EDGES", "FeatureStats", "collect_features", "sparse_codes", "logit_effects", "nearest_latents"]

HIST_EDGES = torch.logspace(-3, 3, 49)
"""Bin edges of the per-latent activation histogram (activations below 1e-3 fall in bin 0, above 1e3 in the last)."""


@dataclass
class FeatureStats:
    """What :func:`collect_features` gathers. ``n`` latents, ``K`` = top_k, ``S`` = n_samples, ``W`` = context width.

    Token positions are global: ``row * T + pos`` into ``input_ids`` [N, T]; -1 marks an empty slot.
    """

    input_ids: Tensor  # int32 [N, T] the windows the pass read
    n_tokens: int  # kept tokens seen
    before: int  # context tokens before the activating one
    after: int  # context tokens after it
    top_act: Tensor  # float32 [n, K] (-inf = empty)
    top_pos: Tensor  # int64 [n, K]
    top_ctx: Tensor  # float16 [n, K, W] the latent's activation over the context window
    sample_act: Tensor  # float32 [n, S]
    sample_pos: Tensor  # int64 [n, S]
    sample_ctx: Tensor  # float16 [n, S, W]
    count: Tensor  # int64 [n] firing tokens
    act_sum: Tensor  # float64 [n]
    act_max: Tensor  # float32 [n]
    hist: Tensor  # int64 [n, len(HIST_EDGES) + 1]
    n2g_latents: list = field(default_factory=list)
    n2g_rows: int = 0  # the N2G activations cover input_ids[:n2g_rows]
    n2g_acts: Optional[Tensor] = None  # float32 [n2g_rows, T, len(n2g_latents)]
    pool_pos: Optional[Tensor] = None  # int64 [P] centre of each pool context
    pool_active: list = field(default_factory=list)  # P lists of latents active in the context window
    seconds: dict = field(default_factory=dict)  # "lm_forward", "encode", "update" -> [wall, CPU] seconds of the pass

    @property
    def lm_seconds(self) -> float:
        """Wall seconds of the pass spent in the LM forward."""
        return self.seconds.get("lm_forward", [0.0, 0.0])[0]

    @property
    def width(self) -> int:
        return self.before + 1 + self.after

    @property
    def density(self) -> Tensor:
        return self.count.double() / max(self.n_tokens, 1)


@contextmanager
def _clock(seconds: dict, name: str):
    """Add this block's [wall, CPU] seconds to ``seconds[name]``."""
    w, c = time.perf_counter(), time.process_time()
    try:
        yield
    finally:
        acc = seconds.setdefault(name, [0.0, 0.0])
        acc[0] += time.perf_counter() - w
        acc[1] += time.process_time() - c


def sparse_codes(sae, x: Tensor, max_width: int) -> tuple[Tensor, Tensor]:
    """(values [N, w], indices [N, w]) of the active latents of x [N, d], at most ``max_width`` per token
    (the largest; a TopK SAE has w = k). Padded slots have value 0."""
    v, i = sae.encode_sparse(x)
    if v.shape[-1] > max_width:
        v, j = v.topk(max_width, dim=-1)
        i = i.gather(-1, j)
    return v.float(), i.long()


def _group_topk(lat: Tensor, key: Tensor, n: int, K: int) -> Tensor:
    """Among pairs (lat[j], key[j]), the K largest keys of each latent: slots [n, K] of pair indices (-1 empty),
    in decreasing key order; equal keys keep the pairs' order (the callers list pairs by token position)."""
    order = key.argsort(descending=True, stable=True)
    order = order[lat[order].argsort(stable=True)]
    lat_sorted = lat[order]
    counts = torch.bincount(lat_sorted, minlength=n)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(lat_sorted.numel()) - starts[lat_sorted]
    ok = rank < K
    slots = torch.full((n, K), -1, dtype=torch.long)
    slots[lat_sorted[ok], rank[ok]] = order[ok]
    return slots


def _contexts(
    pos_local: Tensor, lat: Tensor, idx_bt: Tensor, val_bt: Tensor, before: int, after: int, chunk: int = 16384
) -> Tensor:
    """float16 [M, W]: latent lat[m]'s activation over the window around batch position pos_local[m]
    (a flat index into the batch's [B, T]); 0 outside the row."""
    B, T, w = idx_bt.shape
    offs = torch.arange(-before, after + 1)
    out = torch.zeros(pos_local.numel(), offs.numel(), dtype=torch.float16)
    flat_idx, flat_val = idx_bt.view(B * T, w), val_bt.view(B * T, w)
    for s in range(0, pos_local.numel(), chunk):
        p, l_ = pos_local[s : s + chunk], lat[s : s + chunk]
        row, col = p // T, p % T
        cols = col.unsqueeze(-1) + offs  # [m, W]
        inside = (cols >= 0) & (cols < T)
        where = row.unsqueeze(-1) * T + cols.clamp(0, T - 1)
        hit = flat_idx[where] == l_.view(-1, 1, 1)  # [m, W, w]
        acts = (flat_val[where] * hit).sum(-1) * inside
        out[s : s + chunk] = acts.to(torch.float16)
    return out


def _merge(
    best_key: Tensor, best_pos: Tensor, best_ctx: Tensor, slots: Tensor, key: Tensor, pos: Tensor, ctx: Tensor
) -> None:
    """Merge the candidates ``slots`` [n, K] (indices into key/pos/ctx, -1 empty) into the running top-K (in place)."""
    K = best_key.shape[1]
    has = slots >= 0
    s = slots.clamp_min(0)
    cand_key = torch.where(has, key[s], torch.full_like(best_key, float("-inf")))
    all_key = torch.cat([best_key, cand_key], 1)
    # a stable sort: among equal keys the earlier token wins (old entries precede this batch's), so the
    # result does not depend on how the tokens were batched
    top = all_key.sort(dim=1, descending=True, stable=True)
    take = top.indices[:, :K]
    all_pos = torch.cat([best_pos, torch.where(has, pos[s], torch.full_like(best_pos, -1))], 1)
    best_key.copy_(top.values[:, :K])
    best_pos.copy_(all_pos.gather(1, take))
    from_old = take < K
    old_ctx = best_ctx.gather(1, take.clamp_max(K - 1).unsqueeze(-1).expand(-1, -1, best_ctx.shape[-1]))
    new_slot = (take - K).clamp_min(0)
    new_ctx = ctx[s.gather(1, new_slot)]
    best_ctx.copy_(torch.where(from_old.unsqueeze(-1), old_ctx, new_ctx))


def _offer(
    best_key: Tensor,
    best_pos: Tensor,
    best_ctx: Tensor,
    lat: Tensor,
    key: Tensor,
    gpos: Tensor,
    tok: Tensor,
    idx_bt: Tensor,
    val_bt: Tensor,
    before: int,
    after: int,
) -> None:
    """Offer one batch's pairs (latent lat[j], key[j] at batch position tok[j] / global position gpos[j]) to
    the running top-K tables (in place).

    Only pairs whose key beats their latent's current K-th key can enter (on equal keys the earlier token,
    already in the table, stays), so the others are dropped first; the contexts are computed, and the
    tables re-sorted, only for what is left and the latents it touches. Once the tables fill, that is a
    small fraction of the batch: the cost per batch follows the pairs, not the number of latents."""
    ok = key > best_key[lat, -1]
    if not bool(ok.any()):
        return
    lat, key, tok, gpos = lat[ok], key[ok], tok[ok], gpos[ok]
    rows = lat.unique()  # sorted: the touched latents
    slots = _group_topk(torch.searchsorted(rows, lat), key, rows.numel(), best_key.shape[1])
    used = slots[slots >= 0]
    ctx = torch.zeros(lat.numel(), best_ctx.shape[-1], dtype=best_ctx.dtype)
    ctx[used] = _contexts(tok[used], lat[used], idx_bt, val_bt, before, after)
    sub_key, sub_pos, sub_ctx = best_key[rows], best_pos[rows], best_ctx[rows]
    _merge(sub_key, sub_pos, sub_ctx, slots, key, gpos, ctx)
    best_key[rows], best_pos[rows], best_ctx[rows] = sub_key, sub_pos, sub_ctx


@torch.no_grad()
def collect_features(
    sae,
    model,
    input_ids: Tensor,
    keep: Tensor,
    hook: str,
    *,
    top_k: int = 10,
    n_samples: int = 10,
    before: int = 8,
    after: int = 3,
    batch_size: int = 8,
    n2g_latents: Sequence[int] = (),
    n2g_tokens: int = 0,
    n_pool: int = 256,
    max_code_width: int = 256,
    seed: int = 0,
    device="cpu",
    progress: bool = False,
) -> FeatureStats:
    """Run the LM over ``input_ids`` [N, T] (positions where ``keep`` [N, T] is False never fire), encode
    the activations at ``hook`` with ``sae`` and gather :class:`FeatureStats`.

    ``n2g_latents``: latents whose dense activations are kept on the first windows holding ``n2g_tokens``
    kept tokens. ``n_pool``: random contexts recorded with their active latents. ``seed`` fixes the
    reservoir sample and the pool.
    """
    from tqdm.auto import tqdm

    from hf_sae.hooks import run_with_capture

    if input_ids.dim() != 2 or keep.shape != input_ids.shape:
        raise ValueError(
            f"input_ids and keep must both be [N, T], got {tuple(input_ids.shape)} and {tuple(keep.shape)}."
        )
    if top_k < 1 or n_samples < 0 or before < 0 or after < 0:
        raise ValueError("top_k must be >= 1 and n_samples, before, after >= 0.")
    n = sae.config.n_latents
    N, T = input_ids.shape
    W = before + 1 + after
    g = torch.Generator().manual_seed(seed)
    S = max(n_samples, 1)
    st = FeatureStats(
        input_ids=input_ids.to(torch.int32),
        n_tokens=0,
        before=before,
        after=after,
        top_act=torch.full((n, top_k), float("-inf")),
        top_pos=torch.full((n, top_k), -1, dtype=torch.long),
        top_ctx=torch.zeros(n, top_k, W, dtype=torch.float16),
        sample_act=torch.full((n, S), float("-inf")),
        sample_pos=torch.full((n, S), -1, dtype=torch.long),
        sample_ctx=torch.zeros(n, S, W, dtype=torch.float16),
        count=torch.zeros(n, dtype=torch.long),
        act_sum=torch.zeros(n, dtype=torch.float64),
        act_max=torch.zeros(n),
        hist=torch.zeros(n, HIST_EDGES.numel() + 1, dtype=torch.long),
    )
    sample_key = torch.full((n, S), float("-inf"))
    # N2G: dense activations of the chosen latents on the first windows
    n2g_latents = [int(x) for x in n2g_latents]
    if n2g_latents and n2g_tokens > 0:
        cum = keep.sum(-1).cumsum(0)
        st.n2g_rows = int(min(N, int((cum < n2g_tokens).sum()) + 1))
        st.n2g_latents = n2g_latents
        st.n2g_acts = torch.zeros(st.n2g_rows, T, len(n2g_latents))
        n2g_col = torch.full((n,), -1, dtype=torch.long)
        n2g_col[torch.tensor(n2g_latents, dtype=torch.long)] = torch.arange(len(n2g_latents))
    # the pool of random contexts (among kept positions)
    kept_flat = keep.flatten().nonzero().squeeze(-1)
    P = min(n_pool, kept_flat.numel())
    st.pool_pos = kept_flat[torch.randperm(kept_flat.numel(), generator=g)[:P]].sort().values
    st.pool_active = [[] for _ in range(P)]

    edges = HIST_EDGES
    for s in tqdm(range(0, N, batch_size), desc="dashboard", disable=not progress):
        b_ids, b_keep = input_ids[s : s + batch_size], keep[s : s + batch_size]
        B = b_ids.shape[0]
        if not b_keep.any():
            continue
        with _clock(st.seconds, "lm_forward"):
            acts = run_with_capture(model, b_ids.to(device), [hook])[hook]
        with _clock(st.seconds, "encode"):
            x = acts[b_keep.to(acts.device)].float()
            v, i = sparse_codes(sae, x, max_code_width)
            v, i = v.cpu(), i.cpu()
        with _clock(st.seconds, "update"):
            w = v.shape[1]
            val_bt = torch.zeros(B, T, w)
            idx_bt = torch.full((B, T, w), -1, dtype=torch.long)
            val_bt[b_keep], idx_bt[b_keep] = v, i
            st.n_tokens += x.shape[0]
            # firing pairs of this batch
            local = b_keep.flatten().nonzero().squeeze(-1)  # kept token -> flat batch position
            fire = v > 0
            pair_tok = local.unsqueeze(-1).expand_as(i)[fire]
            pair_lat, pair_val = i[fire], v[fire]
            st.count += torch.bincount(pair_lat, minlength=n)
            st.act_sum.index_add_(0, pair_lat, pair_val.double())
            st.act_max.scatter_reduce_(0, pair_lat, pair_val, reduce="amax")
            bins = torch.bucketize(pair_val, edges)
            st.hist.view(-1).index_add_(0, pair_lat * st.hist.shape[1] + bins, torch.ones_like(bins))
            if pair_lat.numel():
                gpos = s * T + pair_tok
                # running top-k by activation, and the reservoir sample (top-k by a random key)
                tables = (st.top_act, st.top_pos, st.top_ctx)
                _offer(*tables, pair_lat, pair_val, gpos, pair_tok, idx_bt, val_bt, before, after)
                if n_samples:
                    key = torch.rand(pair_lat.numel(), generator=g)
                    tables = (sample_key, st.sample_pos, st.sample_ctx)
                    _offer(*tables, pair_lat, key, gpos, pair_tok, idx_bt, val_bt, before, after)
            if st.n2g_acts is not None and s < st.n2g_rows:
                r = min(B, st.n2g_rows - s)
                col = n2g_col[idx_bt[:r].clamp_min(0)]
                hit = (col >= 0) & (idx_bt[:r] >= 0)
                rr, tt, jj = hit.nonzero(as_tuple=True)
                st.n2g_acts[s + rr, tt, col[rr, tt, jj]] = val_bt[:r][rr, tt, jj]
            # pool contexts in this batch: latents active anywhere in the window
            in_b = (st.pool_pos >= s * T) & (st.pool_pos < (s + B) * T)
            for j in in_b.nonzero().squeeze(-1).tolist():
                p = int(st.pool_pos[j]) - s * T
                r, c = p // T, p % T
                lo, hi = max(0, c - before), min(T, c + after + 1)
                ids_w, vals_w = idx_bt[r, lo:hi], val_bt[r, lo:hi]
                st.pool_active[j] = sorted(set(ids_w[vals_w > 0].tolist()))
    # sample activations: the reservoir kept positions; read their activation from the context centre
    has = st.sample_pos >= 0
    st.sample_act = torch.where(has, st.sample_ctx[..., before].float(), torch.full_like(st.sample_act, float("-inf")))
    if not n_samples:
        st.sample_act, st.sample_pos, st.sample_ctx = st.sample_act[:, :0], st.sample_pos[:, :0], st.sample_ctx[:, :0]
    return st


def _unembed_parts(model):
    """(final norm weight [d] or None, unembedding matrix [V, d]) of a HF causal LM."""
    from hf_sae.hooks import model_parts

    parts = model_parts(model)
    if parts.lm_head is None or getattr(parts.lm_head, "weight", None) is None:
        raise ValueError(f"{parts.name} has no LM head (get_output_embeddings()); use a causal LM for the dashboard.")
    w_norm = getattr(parts.final_norm, "weight", None) if parts.final_norm is not None else None
    return w_norm, parts.lm_head.weight


@torch.no_grad()
def logit_effects(W_dec: Tensor, model, n_top: int = 10, chunk: int = 512) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Tokens each decoder row promotes and suppresses: the row through the final norm's gain and the
    unembedding, ``logits_j = W_U (g * W_dec[j])`` (the norm's data-dependent scale is dropped: it scales
    all logits of a row alike). Returns (top values, top ids, bottom values, bottom ids), each [n, n_top]."""
    w_norm, W_U = _unembed_parts(model)
    W_U = W_U.detach().float().cpu()
    g = w_norm.detach().float().cpu() if w_norm is not None else None
    n = W_dec.shape[0]
    n_top = min(n_top, W_U.shape[0])
    tv, ti = torch.zeros(n, n_top), torch.zeros(n, n_top, dtype=torch.long)
    bv, bi = torch.zeros(n, n_top), torch.zeros(n, n_top, dtype=torch.long)
    for s in range(0, n, chunk):
        rows = W_dec[s : s + chunk].detach().float().cpu()
        if g is not None:
            rows = rows * g
        logits = rows @ W_U.T
        t = logits.topk(n_top, dim=-1)
        b = logits.topk(n_top, dim=-1, largest=False)
        tv[s : s + chunk], ti[s : s + chunk], bv[s : s + chunk], bi[s : s + chunk] = (
            t.values,
            t.indices,
            b.values,
            b.indices,
        )
    return tv, ti, bv, bi


@torch.no_grad()
def nearest_latents(W_dec: Tensor, n_near: int = 6, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """(cosines [n, m], ids [n, m]) of each latent's ``m = min(n_near, n - 1)`` nearest other latents by
    decoder-row cosine."""
    D = torch.nn.functional.normalize(W_dec.detach().float().cpu(), dim=-1)
    n = D.shape[0]
    m = min(n_near, n - 1)
    cv, ci = torch.zeros(n, m), torch.zeros(n, m, dtype=torch.long)
    for s in range(0, n, chunk):
        cos = D[s : s + chunk] @ D.T
        cos[torch.arange(cos.shape[0]), torch.arange(s, s + cos.shape[0])] = float("-inf")
        t = cos.topk(m, dim=-1)
        cv[s : s + chunk], ci[s : s + chunk] = t.values, t.indices
    return cv, ci

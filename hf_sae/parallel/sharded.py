"""A latent-sharded SAE: each rank of a tensor-parallel group owns n / P rows of W_enc, b_enc, W_dec
(and JumpReLU's thresholds), their gradients and their optimizer state; b_dec is replicated.

One forward on the tokens of this data-parallel rank, x [N, d] (normalized units below)::

    pre_r  = W_enc,r (x - b_dec) + b_enc,r                 local pre-activations [N, n/P]
    cand_r = top-k of pre_r (values, global ids)            k per token per rank
    sel    = top-k of all-gather(cand)                      k*P candidates -> the global top-k (identical
                                                            on every rank of the group)
    x^     = all-reduce_r( sum_{sel owned by r} z W_dec,r ) + b_dec

AuxK (top-k_aux among dead latents), Multi-TopK (4k), BatchTopK (top k*N over the *global* batch: the
candidates are gathered over the whole DP x TP world) and top-AFA (k(x) from the globally sorted
cumulative norms, candidates exchanged until the crossing point is exact) select the same way.

Loss statistics are sums over the global batch (all-reduced over the DP group), so the loss is the
single-process loss of the concatenated batch, and gradients are *summed* over DP ranks
(:meth:`ShardedSAE.reduce_gradients_`): P x D processes train exactly the SAE one process trains on the
same global batches. The backward needs one all-reduce of the encoder input's gradient (see
:func:`hf_sae.parallel.mesh.tp_copy`); row-local operations (decoder renorm, gradient projection, Adam)
need no communication; gradient clipping all-reduces one scalar.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..activations import jumprelu_fn, step_fn
from ..configuration_sae import SAEConfig
from ..modeling_sae import SAEOutput, SparseAutoencoder
from .mesh import Mesh, all_gather_cat, reduce_sum, tp_copy

_EPS = 1e-12
SHARDED_PARAMS = ("W_enc", "b_enc", "W_dec", "log_threshold")
"""Parameters split by rows (latents) over the TP group; every other tensor is replicated."""

_SUPPORTED = ("topk", "batchtopk", "relu", "jumprelu", "topafa")
AFA_FIRST_CANDIDATES = 16
"""Uncapped top-AFA: candidates each rank sends first (doubled until the selection is exact)."""


class ShardedStep(NamedTuple):
    """What one sharded forward returns besides the loss."""

    output: SAEOutput
    """the single-process SAEOutput fields (losses are global-batch values, identical on every rank)."""
    fires: Tensor
    """[n/P] int64: how many of this rank's tokens fired each local latent (sum over DP for the batch)."""
    l0: Tensor
    """scalar: mean active latents per token over the global batch."""


class ShardedSAE(nn.Module):
    """The latent slice ``[offset, offset + n/P)`` of an SAE described by ``config`` on ``mesh``.

    Build it with :meth:`from_full` (slice a :class:`~hf_sae.SparseAutoencoder`, e.g. after the
    data-dependent init on every rank) and turn it back into one with :meth:`to_full` (all-gather).
    """

    def __init__(self, config: SAEConfig, mesh: Mesh):
        super().__init__()
        n, d, P = config.n_latents, config.d_in, mesh.tp_size
        if config.activation not in _SUPPORTED:
            raise ValueError(f"activation {config.activation!r} cannot be latent-sharded; use one of {_SUPPORTED}")
        if config.activation == "topafa" and config.afa_variant != "centred":
            raise ValueError("top-AFA with afa_variant='reference' (no b_enc, k(x) <= n - 1) is not latent-sharded "
                             "yet; use afa_variant='centred' with --tp_size, or train top-AFA with --tp_size 1")
        if n % P:
            raise ValueError(f"n_latents={n} is not divisible by tp_size={P}: choose n_latents (or "
                             f"expansion_factor * d_in) a multiple of tp_size")
        self.config, self.mesh = config, mesh
        self.n_local = n // P
        self.offset = mesh.tp_rank * self.n_local
        self.W_enc = nn.Parameter(torch.zeros(self.n_local, d))
        self.b_enc = nn.Parameter(torch.zeros(self.n_local))
        self.W_dec = nn.Parameter(torch.zeros(self.n_local, d))
        self.b_dec = nn.Parameter(torch.zeros(d))
        if config.activation == "jumprelu":
            self.log_threshold = nn.Parameter(torch.full((self.n_local,), math.log(config.jumprelu_init_threshold)))
        if config.activation == "batchtopk":
            self.register_buffer("batchtopk_threshold", torch.tensor(-1.0))

    # ------------------------------------------------------------------ full <-> sharded
    @classmethod
    @torch.no_grad()
    def from_full(cls, sae: SparseAutoencoder, mesh: Mesh) -> ShardedSAE:
        """This rank's slice of ``sae`` (which every rank holds identically, e.g. same seed + init)."""
        out = cls(sae.config, mesh).to(sae.W_dec.device, sae.W_dec.dtype)
        out.load_state_dict(out.slice_state(sae.state_dict()))
        return out

    def slice_state(self, full: dict[str, Tensor]) -> dict[str, Tensor]:
        """This rank's rows of a full state dict (sharded tensors sliced, the rest as is)."""
        lo, hi = self.offset, self.offset + self.n_local
        return {k: (v[lo:hi].clone() if k in SHARDED_PARAMS else v.clone()) for k, v in full.items()}

    @torch.no_grad()
    def gather_state(self) -> dict[str, Tensor]:
        """The full state dict (sharded tensors all-gathered over the TP group, rank order)."""
        return {k: (all_gather_cat(v, self.mesh.tp_group, dim=0) if k in SHARDED_PARAMS else v.clone())
                for k, v in self.state_dict().items()}

    def to_full(self) -> SparseAutoencoder:
        """A normal SparseAutoencoder holding the whole SAE (collective: every TP rank must call it)."""
        full = self.gather_state()
        sae = SparseAutoencoder(self.config).to(self.W_dec.device, self.W_dec.dtype)
        sae.load_state_dict(full)
        return sae

    # ------------------------------------------------------------------ row-local geometry
    def decoder_norms(self) -> Tensor:
        """[n/P] norms of the local decoder rows."""
        return self.W_dec.norm(dim=-1)

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        SparseAutoencoder.normalize_decoder_(self)

    @torch.no_grad()
    def remove_parallel_grad_(self, unit_rows: bool = False) -> None:
        SparseAutoencoder.remove_parallel_grad_(self, unit_rows=unit_rows)

    # the single-process SAE's input handling (validation, per-token input_norm, input_scale), reused as is
    _normalize = SparseAutoencoder._normalize
    _denormalize = SparseAutoencoder._denormalize

    def release_grad_buffers(self) -> None:
        """Nothing to free (the sharded step keeps no gradient buffers between steps)."""

    @torch.no_grad()
    def reduce_gradients_(self) -> None:
        """Sum every gradient over the DP group (the loss is a global-batch loss; see the module doc)."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if self.mesh.dp_group is None or not grads:
            return
        flat = reduce_sum(torch.cat([g.reshape(-1) for g in grads]), self.mesh.dp_group)
        for g, new in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(new.view_as(g))

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """Clip by the norm of the *whole* SAE's gradient (torch.nn.utils.clip_grad_norm_'s rule);
        return that norm. Call after :meth:`reduce_gradients_`."""
        zero = torch.zeros((), dtype=torch.float64, device=self.W_dec.device)
        sq_local = sum((p.grad.double().square().sum() for n, p in self.named_parameters()
                        if p.grad is not None and n in SHARDED_PARAMS), zero)
        sq = reduce_sum(sq_local, self.mesh.tp_group)
        sq = sq + sum((p.grad.double().square().sum() for n, p in self.named_parameters()
                       if p.grad is not None and n not in SHARDED_PARAMS), zero)
        norm = sq.sqrt().to(self.W_dec.dtype)
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for p in self.parameters():
            if p.grad is not None:
                p.grad.mul_(coef.to(p.grad.dtype))
        return norm

    # ------------------------------------------------------------------ selection helpers
    def _tp(self, t: Tensor) -> Tensor:
        return reduce_sum(t, self.mesh.tp_group)

    def _dp(self, t: Tensor) -> Tensor:
        return reduce_sum(t, self.mesh.dp_group)

    @torch.no_grad()
    def _select(self, scores: Tensor, k: int) -> Tensor:
        """Global ids [N, k] of the k largest scores of each row of the full [N, n] matrix, found from
        each rank's top-k of its own columns ``scores`` [N, n/P]."""
        values, ids = scores.topk(min(k, self.n_local), dim=-1, sorted=False)
        if self.mesh.tp_group is None:
            return ids
        values = all_gather_cat(values, self.mesh.tp_group)
        ids = all_gather_cat(ids + self.offset, self.mesh.tp_group)
        return ids.gather(-1, values.topk(k, dim=-1, sorted=False).indices)

    def _owned(self, pre: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
        """(values, local ids) [N, w]: ReLU(pre) at the selected latents this rank owns, 0 elsewhere."""
        local = ids - self.offset
        own = (local >= 0) & (local < self.n_local)
        local = local.clamp(0, self.n_local - 1)
        return torch.where(own, pre.gather(-1, local).relu(), 0.0), local

    def _decode(self, values: Tensor, local: Tensor) -> Tensor:
        """All-reduced sparse decode (no b_dec) [N, d] of the owned slots."""
        part = F.embedding_bag(local, self.W_dec, per_sample_weights=values.to(self.W_dec.dtype), mode="sum")
        return self._tp(part)

    @torch.no_grad()
    def _afa_select(self, pre: Tensor, xc: Tensor) -> tuple[Tensor, Tensor]:
        """top-AFA's selection (``hf_sae.activations.afa_k`` on the full matrix): (ids [N, w], keep [N, w]).

        Each rank sends its top-c of s_i = (ReLU(pre_i) ||W_dec,i||)^2; the merged list is exact for its
        first c entries, which suffice once every token's cumulative norm crosses ||x - b_dec|| inside
        them (later entries can only be farther). Otherwise c doubles (up to n/P, i.e. everything)."""
        cfg, P = self.config, self.mesh.tp_size
        s = (pre.relu() * self.decoder_norms()).square()
        target = xc.norm(dim=-1)
        width = cfg.n_latents if cfg.k is None else min(cfg.k, cfg.n_latents)
        c = min(width, self.n_local) if cfg.k is not None else min(AFA_FIRST_CANDIDATES, self.n_local)
        while True:
            sv, si = s.topk(c, dim=-1, sorted=False)
            sv = all_gather_cat(sv, self.mesh.tp_group)
            si = all_gather_cat(si + self.offset, self.mesh.tp_group)
            exact = width if (cfg.k is not None or c == self.n_local) else c
            s_sorted, pos = sv.topk(min(exact, c * P), dim=-1, sorted=True)
            cum = s_sorted.cumsum(-1).sqrt()
            if cfg.k is not None or c == self.n_local or bool((cum[:, -1] >= target).all()):
                break
            c = min(2 * c, self.n_local)
        k = (cum - target.unsqueeze(-1)).abs().argmin(-1) + 1
        w = int(k.max())
        ids = si.gather(-1, pos[:, :w])
        return ids, torch.arange(w, device=pre.device) < k.unsqueeze(-1)

    def _batchtopk_mask(self, acts: Tensor, n_tokens: int) -> Tensor:
        """bool [N, n/P]: this rank's share of the top k*N_global ReLU'd pre-activations of the global
        batch (candidates gathered over the whole world); updates the inference threshold as the
        single-process batchtopk does."""
        cfg, m = self.config, self.mesh
        N = acts.shape[0]
        n_keep = min(cfg.k * n_tokens, n_tokens * cfg.n_latents)
        with torch.no_grad():
            values, flat = acts.flatten().topk(min(n_keep, acts.numel()), sorted=False)
            tok = flat // self.n_local + m.dp_rank * N
            gid = tok * cfg.n_latents + flat % self.n_local + self.offset
            values = all_gather_cat(values, m.world_group)
            gid = all_gather_cat(gid, m.world_group)
            kept_values, pos = values.topk(n_keep, sorted=False)
            kept = gid[pos]
            tok, lat = kept // cfg.n_latents - m.dp_rank * N, kept % cfg.n_latents - self.offset
            mine = (tok >= 0) & (tok < N) & (lat >= 0) & (lat < self.n_local)
            mask = torch.zeros_like(acts, dtype=torch.bool)
            mask[tok[mine], lat[mine]] = True
            threshold = self.batchtopk_threshold
            positive = kept_values[kept_values > 0]
            if positive.numel():
                batch_min = positive.min().to(threshold.dtype)
                mom = cfg.batchtopk_threshold_momentum
                threshold.copy_(torch.where(threshold < 0, batch_min, mom * threshold + (1 - mom) * batch_min))
        return mask

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, dead_mask: Optional[Tensor] = None) -> ShardedStep:
        """Loss and metrics of this DP rank's tokens x [N, d] (caller's units) as part of the global batch.

        ``dead_mask``: bool [n/P] for the local latents (AuxK). Every rank of the mesh must call it with
        the same N (BatchTopK exchanges equal-sized candidate lists)."""
        cfg = self.config
        xn, _, stats = SparseAutoencoder._flatten_input(self, x)
        N = xn.shape[0]
        with torch.no_grad():
            n_tokens = int(self._dp(torch.tensor(float(N), dtype=torch.float64, device=xn.device)))
            mean = self._dp(xn.sum(0)) / n_tokens
            total_var = self._dp((xn - mean).square().sum()).clamp_min(_EPS)
        xc = xn - self.b_dec
        pre = F.linear(tp_copy(xc, self.mesh.tp_group), self.W_enc, self.b_enc)

        act, dense, values, local, ids = cfg.activation, None, None, None, None
        if act == "topk" or (act == "batchtopk" and not self.training and float(self.batchtopk_threshold) < 0):
            ids = self._select(pre.detach(), cfg.k)
            values, local = self._owned(pre, ids)
        elif act == "topafa":
            ids, keep = self._afa_select(pre.detach(), xc.detach())
            values, local = self._owned(pre, ids)
            values = values * keep
        elif act == "batchtopk":
            acts = pre.relu()
            if self.training:
                dense = acts * self._batchtopk_mask(acts.detach(), n_tokens)
            else:
                dense = acts * (acts > self.batchtopk_threshold.to(acts.dtype))
        elif act == "relu":
            dense = pre.relu()
        else:  # jumprelu
            dense = jumprelu_fn(pre, self.log_threshold.exp(), cfg.jumprelu_bandwidth)
        sparse = values is not None
        x_hat = (self._decode(values, local) if sparse else self._tp(dense @ self.W_dec)) + self.b_dec

        def batch_sum(t: Tensor) -> Tensor:
            return self._dp(t.sum())

        err = batch_sum((x_hat - xn).square())
        fvu = err / total_var
        loss = fvu
        mse = err / (n_tokens * cfg.d_in * cfg.input_scale ** 2)

        # AuxK: top-k_aux among the dead latents of the whole SAE
        auxk = xn.new_zeros(())
        if dead_mask is not None:
            if dead_mask.shape != (self.n_local,) or dead_mask.dtype != torch.bool:
                raise ValueError(f"dead_mask must be a bool tensor of shape [{self.n_local}] (this rank's latents), "
                                 f"got {dead_mask.dtype} {tuple(dead_mask.shape)}")
            n_dead = int(self._tp(dead_mask.sum()))
            k_aux = min(cfg.effective_k_aux, n_dead)
            if k_aux:
                masked = pre.detach().masked_fill(~dead_mask.to(pre.device), float("-inf"))
                e_hat = self._decode(*self._owned(pre, self._select(masked, k_aux)))
                e = xn - x_hat.detach()
                e_mean = self._dp(e.sum(0)) / n_tokens
                denom = batch_sum((e - e_mean).square()).clamp_min(_EPS)
                auxk = torch.nan_to_num(batch_sum((e_hat - e).square()) / denom, nan=0.0, posinf=0.0)
        if cfg.aux_coef:
            loss = loss + cfg.aux_coef * auxk

        # decoder-norm-weighted code: L1 (penalty for relu, a metric otherwise) and AFA
        need_grad = torch.is_grad_enabled() and (bool(cfg.afa_coef) or (act == "relu" and bool(cfg.l1_coef)))
        with torch.set_grad_enabled(need_grad):
            norms = self.decoder_norms()
            if sparse:
                weighted = self._tp(values * norms[local])  # [N, w]: each slot owned by one rank
                z_norm = weighted.norm(dim=-1)
                l1_tok = weighted.sum(-1)
            else:
                weighted = dense * norms
                z_norm = self._tp(weighted.square().sum(-1)).clamp_min(_EPS ** 2).sqrt()
                l1_tok = self._tp(weighted.sum(-1))
            if cfg.afa_variant == "reference":  # the authors' form: raw latents against the uncentred input
                raw = (self._tp(values).norm(dim=-1) if sparse
                       else self._tp(dense.square().sum(-1)).clamp_min(_EPS ** 2).sqrt())
                afa = batch_sum((raw - xn.norm(dim=-1)).square()) / n_tokens
            else:
                afa = batch_sum((z_norm - xc.norm(dim=-1)).square()) / n_tokens
            l1 = batch_sum(l1_tok) / n_tokens
        l0_loss = None
        if act == "relu" and cfg.l1_coef:
            loss = loss + cfg.l1_coef * l1
        if act == "jumprelu":
            steps = step_fn(pre, self.log_threshold.exp(), cfg.jumprelu_bandwidth).sum(-1)
            l0_loss = batch_sum(self._tp(steps)) / n_tokens
            if cfg.l0_coef:
                loss = loss + cfg.l0_coef * l0_loss
        if cfg.afa_coef:
            loss = loss + cfg.afa_coef * afa

        multi = None
        if cfg.multi_topk and self.training:
            x_hat4 = self._decode(*self._owned(pre, self._select(pre.detach(), 4 * cfg.k))) + self.b_dec
            multi = batch_sum((x_hat4 - xn).square()) / total_var
            loss = loss + multi / 8

        with torch.no_grad():
            active = values > 0 if sparse else dense > 0
            if sparse:
                fires = torch.bincount(local[active], minlength=self.n_local)
            else:
                fires = active.sum(0)
            l0 = batch_sum(self._tp(active.sum(-1).double())) / n_tokens
        recon = self._denormalize(x_hat, stats)
        out = SAEOutput(loss=loss, reconstruction=recon.reshape(x.shape), fvu=fvu, mse=mse, auxk_loss=auxk,
                        l1_loss=l1, l0_loss=l0_loss, afa_loss=afa, multi_topk_fvu=multi)
        if sparse:
            out.latent_values, out.latent_indices = self._tp(values.detach()), ids
        return ShardedStep(out, fires.long(), l0)

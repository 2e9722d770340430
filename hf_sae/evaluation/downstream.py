"""Downstream loss: splice the SAE reconstruction into the LM and compare next-token losses.

For a batch of token windows ``input_ids`` [B, T] and a keep-mask [B, T] (position 0, BOS, EOS,
pad excluded, see :func:`hf_sae.data.corpus.token_mask`), the activation at the SAE's hook point
is replaced at kept positions only (``where(keep, sae(act), act)``); the other positions keep
the original activation. The loss counts the next-token predictions made *at kept positions*
(position t predicts token t+1, for t < T-1). All losses are in nats per predicted token.

Reported (Gao et al. 2024; docs/FORMULAS.md §1)::

    ce_clean, ce_spliced            mean next-token cross-entropy, clean vs SAE spliced in
    delta_loss = ce_spliced - ce_clean
    kl         = mean KL(p_clean || p_spliced) over predictions
    ce_zero_ablation, ce_mean_ablation   the activation replaced by 0 / by its mean at kept positions
    frac_recovered_zero/mean = (ce_ablated - ce_spliced) / (ce_ablated - ce_clean)

Everything is a running sum (:class:`DownstreamStats`), so streaming over batches equals one shot.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "next_token_ce",
    "kl_divergence",
    "loss_recovered",
    "prediction_mask",
    "downstream_from_sums",
    "downstream_batch_stats",
    "DownstreamStats",
    "make_splice_fn",
    "clean_next_token_log_probs",
    "downstream_batch",
    "downstream_eval",
]


def next_token_ce(logits: Tensor, input_ids: Tensor) -> Tensor:
    """Per-position cross-entropy (nats) of predicting ``input_ids[:, t+1]`` from ``logits[:, t]``.

    Args: logits [B, T, V]; input_ids [B, T]. Returns float32 [B, T-1].
    """
    if logits.ndim != 3 or input_ids.shape != logits.shape[:2]:
        raise ValueError(f"logits must be [B, T, V] and input_ids [B, T]; got {tuple(logits.shape)} and "
                         f"{tuple(input_ids.shape)}.")
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    return -logp.gather(-1, input_ids[:, 1:, None].long()).squeeze(-1)


def kl_divergence(clean_logits: Tensor, other_logits: Tensor) -> Tensor:
    """KL(p_clean || p_other) per position in nats, over the last (vocabulary) dimension.

    Args: two logit tensors [..., V] of the same shape. Returns float32 [...] (exactly 0 where the
    logits are identical).
    """
    if clean_logits.shape != other_logits.shape:
        raise ValueError(f"logit shapes differ: {tuple(clean_logits.shape)} vs {tuple(other_logits.shape)}.")
    lp = F.log_softmax(clean_logits.float(), dim=-1)
    lq = F.log_softmax(other_logits.float(), dim=-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def loss_recovered(ce_clean: float, ce_spliced: float, ce_ablated: float) -> float:
    """Fraction of loss recovered: (ce_ablated - ce_spliced) / (ce_ablated - ce_clean).

    1 = the SAE is as good as the clean model, 0 = as bad as the ablation. NaN when the ablation
    does not change the loss.
    """
    denom = ce_ablated - ce_clean
    if denom == 0:
        return float("nan")
    return (ce_ablated - ce_spliced) / denom


def prediction_mask(keep: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
    """Bool [B, T-1]: predictions counted in the loss: made at a kept position t (keep[:, t]) whose
    target t+1 is a real token (attention_mask[:, t+1], when given)."""
    m = keep[:, :-1].bool()
    if attention_mask is not None:
        m = m & attention_mask[:, 1:].bool()
    return m


def downstream_from_sums(count, sum_ce_clean, sum_ce_spliced, sum_kl, sum_ce_zero=None,
                         sum_ce_mean=None) -> dict:
    """Downstream metrics from sums over ``count`` predictions (the core used by
    :class:`DownstreamStats` and the ``downstream_loss`` evaluate module)."""
    if count <= 0:
        raise ValueError("downstream metrics need at least one prediction (count > 0).")
    c = float(count)
    out = {"n_predictions": int(count), "ce_clean": float(sum_ce_clean) / c,
           "ce_spliced": float(sum_ce_spliced) / c}
    out["delta_loss"] = out["ce_spliced"] - out["ce_clean"]
    out["kl"] = float(sum_kl) / c
    for name, s in (("zero", sum_ce_zero), ("mean", sum_ce_mean)):
        if s is not None:
            out[f"ce_{name}_ablation"] = float(s) / c
            out[f"frac_recovered_{name}"] = loss_recovered(out["ce_clean"], out["ce_spliced"], float(s) / c)
    return out


def downstream_batch_stats(per_prediction: dict) -> dict:
    """Per-batch statistics of the ``downstream_loss`` evaluate module from the output of
    :func:`downstream_batch`: ``count``, ``sum_ce_clean``, ``sum_ce_spliced``, ``sum_kl``,
    ``sum_ce_zero``, ``sum_ce_mean`` (None when that ablation was not run)."""
    s = DownstreamStats()
    s.update(per_prediction["ce_clean"], per_prediction["ce_spliced"], per_prediction["kl"],
             per_prediction.get("ce_zero"), per_prediction.get("ce_mean"))
    return s.sums_dict()


class DownstreamStats:
    """Running sums of per-prediction losses; :meth:`compute` gives the metrics of the module doc.

    ``update`` takes 1-D float tensors over the same counted predictions (e.g. the output of
    :func:`downstream_batch`); ablation terms are optional but must be given on every update or none.
    """

    _KEYS = ("ce_clean", "ce_spliced", "kl", "ce_zero", "ce_mean")

    def __init__(self):
        self.count = 0
        self.sums = {k: 0.0 for k in self._KEYS}
        self.present = {k: None for k in self._KEYS}

    def update(self, ce_clean: Tensor, ce_spliced: Tensor, kl: Tensor, ce_zero: Optional[Tensor] = None,
               ce_mean: Optional[Tensor] = None) -> None:
        """Add per-prediction values (1-D tensors of equal length, nats)."""
        vals = dict(ce_clean=ce_clean, ce_spliced=ce_spliced, kl=kl, ce_zero=ce_zero, ce_mean=ce_mean)
        n = ce_clean.numel()
        for k, v in vals.items():
            given = v is not None
            if self.present[k] is None:
                self.present[k] = given
            elif self.present[k] != given:
                raise ValueError(f"{k} was {'given' if self.present[k] else 'missing'} in earlier updates; "
                                 "pass the same terms on every update.")
            if given:
                if v.numel() != n:
                    raise ValueError(f"{k} has {v.numel()} values but ce_clean has {n}.")
                if not torch.isfinite(v).all():
                    raise ValueError(f"{k} contains NaN/Inf.")
                self.sums[k] += float(v.double().sum())
        self.count += n

    def sums_dict(self) -> dict:
        """``{"count", "sum_ce_clean", "sum_ce_spliced", "sum_kl", "sum_ce_zero", "sum_ce_mean"}``
        (absent ablations are None): the per-batch statistics of the ``downstream_loss`` module."""
        return {"count": self.count, **{f"sum_{k}": (self.sums[k] if self.present[k] else None) for k in self._KEYS}}

    def compute(self) -> dict:
        """See :func:`downstream_from_sums`."""
        return downstream_from_sums(**self.sums_dict())


def make_splice_fn(reconstruct: Union[nn.Module, Callable[[Tensor], Tensor], str], keep: Tensor,
                   mean_activation: Optional[Tensor] = None) -> Callable[[Tensor], Tensor]:
    """The replacement applied at the hook point: ``act`` [B, T, d] -> same shape, changed only
    where ``keep`` [B, T] is True.

    ``reconstruct`` is an SAE (uses ``sae(rows).reconstruction`` on the kept rows), any callable
    mapping rows [M, d] -> [M, d], ``"zero"`` (zero ablation) or ``"mean"`` (replace by
    ``mean_activation`` [d]).
    """
    keep = keep.bool()

    def fn(act: Tensor) -> Tensor:
        if act.shape[:2] != keep.shape:
            raise ValueError(f"activation {tuple(act.shape)} does not match the keep mask {tuple(keep.shape)}.")
        rows = act[keep]
        if isinstance(reconstruct, str):
            if reconstruct == "zero":
                new = torch.zeros_like(rows)
            elif reconstruct == "mean":
                if mean_activation is None:
                    raise ValueError("mean ablation needs mean_activation [d].")
                new = mean_activation.to(rows.dtype).to(rows.device).expand_as(rows)
            else:
                raise ValueError(f"unknown ablation {reconstruct!r}; use 'zero' or 'mean'.")
        elif isinstance(reconstruct, nn.Module) and hasattr(reconstruct, "config") and hasattr(reconstruct, "decode"):
            new = reconstruct(rows).reconstruction
        else:
            new = reconstruct(rows)
        out = act.clone()
        out[keep] = new.to(act.dtype)
        return out

    return fn


def _logits(model: nn.Module, input_ids: Tensor, attention_mask: Optional[Tensor]) -> Tensor:
    kw = {"use_cache": False}
    if attention_mask is not None:
        kw["attention_mask"] = attention_mask
    return model(input_ids=input_ids, **kw).logits


@torch.no_grad()
def clean_next_token_log_probs(model: nn.Module, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
    """float32 [B, T-1, V]: log-softmax of the clean model's logits at positions 0..T-2."""
    return F.log_softmax(_logits(model, input_ids, attention_mask)[:, :-1].float(), dim=-1)


@torch.no_grad()
def downstream_batch(model: nn.Module, reconstruct, input_ids: Tensor, keep: Tensor, hook_point: str,
                     mean_activation: Optional[Tensor] = None,
                     ablations: Sequence[str] = ("zero", "mean"),
                     attention_mask: Optional[Tensor] = None, clean_log_probs: Optional[Tensor] = None) -> dict:
    """Clean, spliced and ablated next-token losses for one batch.

    Args:
        model: a HF causal LM (eval mode).
        reconstruct: the SAE (or a callable rows [M, d] -> [M, d]) spliced in at ``hook_point``.
        input_ids: LongTensor [B, T].
        keep: bool [B, T], positions where the activation is replaced (and whose predictions count).
        hook_point: e.g. ``"layers.6.resid_post"``.
        mean_activation: [d] mean activation at the hook point (needed for ``"mean"`` ablation).
        ablations: subset of ``("zero", "mean")`` to run (one extra forward each).
        attention_mask: optional [B, T].
        clean_log_probs: optional float32 [B, T-1, V] from :func:`clean_next_token_log_probs` on the same
            batch, to skip the clean forward when several SAEs are scored on the same windows.
    Returns:
        dict of float32 1-D tensors over the counted predictions: ``ce_clean``, ``ce_spliced``,
        ``kl`` and ``ce_zero`` / ``ce_mean`` for the requested ablations (keys absent otherwise).
    """
    from hf_sae.hooks import splice

    if keep.shape != input_ids.shape:
        raise ValueError(f"keep mask {tuple(keep.shape)} must match input_ids {tuple(input_ids.shape)}.")
    for a in ablations:
        if a not in ("zero", "mean"):
            raise ValueError(f"unknown ablation {a!r}; use 'zero' and/or 'mean'.")
    if "mean" in ablations and mean_activation is None:
        raise ValueError("the 'mean' ablation needs mean_activation [d] (the mean activation at the hook point).")
    keep = keep.to(input_ids.device).bool()
    pred = prediction_mask(keep, attention_mask)
    lp_clean = (clean_next_token_log_probs(model, input_ids, attention_mask) if clean_log_probs is None
                else clean_log_probs)
    targets = input_ids[:, 1:, None].long()
    out = {"ce_clean": -lp_clean.gather(-1, targets).squeeze(-1)[pred]}

    def run(replacement):
        with splice(model, {hook_point: make_splice_fn(replacement, keep, mean_activation)}):
            logits = _logits(model, input_ids, attention_mask)
        return F.log_softmax(logits[:, :-1].float(), dim=-1)

    lp = run(reconstruct)
    out["ce_spliced"] = -lp.gather(-1, targets).squeeze(-1)[pred]
    out["kl"] = (lp_clean.exp() * (lp_clean - lp)).sum(-1)[pred]
    del lp
    for a in ablations:
        lp = run(a)
        out[f"ce_{a}"] = -lp.gather(-1, targets).squeeze(-1)[pred]
        del lp
    return out


@torch.no_grad()
def downstream_eval(model: nn.Module, sae, input_ids: Tensor, keep: Tensor, hook_point: str, n_tokens: int,
                    mean_activation: Tensor, batch_size: int = 8, device="cpu", progress: bool = False) -> dict:
    """The ``downstream`` section of ``hf-sae eval``: :class:`DownstreamStats` over the first ``n_tokens`` kept
    predictions of ``input_ids`` [N, T] (the last position of a window predicts nothing), at most
    ``max(1, 1024 // T)`` windows per forward. ``mean_activation`` [d]: the mean-ablation value."""
    from tqdm.auto import tqdm

    from .inputs import trim_mask

    T = input_ids.shape[1]
    can_predict = keep.clone()
    can_predict[:, -1] = False  # the last position has no next token in its window
    ds_keep = trim_mask(can_predict, n_tokens)
    n_rows = int(ds_keep.any(-1).sum())
    bs = max(1, min(batch_size, 1024 // T))
    ds = DownstreamStats()
    mean_activation = mean_activation.to(device)
    for s in tqdm(range(0, n_rows, bs), desc="downstream", disable=not progress):
        e = min(s + bs, n_rows)
        o = downstream_batch(model, sae, input_ids[s:e].to(device), ds_keep[s:e].to(device), hook_point,
                             mean_activation=mean_activation)
        ds.update(o["ce_clean"], o["ce_spliced"], o["kl"], o["ce_zero"], o["ce_mean"])
    return ds.compute()

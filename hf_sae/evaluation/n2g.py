"""N2G-style explainability (Gao et al. 2024, after Foote et al.'s Neuron2Graph), kept simple.

For each sampled latent:

1. On the *train* windows, take the ``top_contexts`` positions where the latent is largest
   (among those where it fires, i.e. activation > ``threshold``).
2. Candidate patterns are the n-grams (n = 1..``max_n``) of token ids *ending at* each of those
   positions.
3. A candidate's precision on train = (kept positions where the n-gram occurs and the latent
   fires) / (kept positions where it occurs). Candidates with precision >= ``min_precision`` and
   at least ``min_support`` occurrences form the explanation (shortest first: an n-gram whose
   (n-1)-suffix is already in the explanation adds nothing and is dropped).
4. On the held-out *test* windows the explanation predicts "fires" wherever one of its patterns
   ends; precision / recall / F1 of that prediction against the real firing are reported per
   latent, and their means over latents.

Positions are those of a keep-mask (position 0 / special tokens excluded); n-grams may reach
into earlier (also excluded) positions of the same window but never across windows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["ngram_codes", "decode_ngram", "N2GExplanation", "explain_latent", "n2g_evaluate", "summarize_n2g"]


def ngram_codes(input_ids: Tensor, n: int, base: int) -> Tensor:
    """int64 [N, T]: a collision-free code of the n-gram ending at each position (-1 where t < n-1).

    code = sum_{m=0}^{n-1} id[t-m] * base^m; requires base^n < 2^63 (base = vocabulary size).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}.")
    if base ** n >= 2 ** 63:
        raise ValueError(f"vocabulary size {base} is too large for {n}-gram codes in int64.")
    ids = input_ids.long()
    if int(ids.min()) < 0 or int(ids.max()) >= base:
        raise ValueError(f"token ids must lie in [0, {base}).")
    code = ids.clone()
    for m in range(1, n):
        shifted = torch.zeros_like(ids)
        shifted[:, m:] = ids[:, :-m]
        code = code + shifted * (base ** m)
    code[:, : n - 1] = -1
    return code


def decode_ngram(code: int, n: int, base: int) -> list[int]:
    """Token ids (oldest first) of an n-gram code from :func:`ngram_codes`."""
    ids = []
    for _ in range(n):
        ids.append(code % base)
        code //= base
    return ids[::-1]


@dataclass
class N2GExplanation:
    """Explanation of one latent and its held-out scores."""

    latent: int
    patterns: list = field(default_factory=list)    # [(n, code, train_precision, train_support)]
    precision: float = float("nan")
    recall: float = float("nan")
    f1: float = float("nan")
    n_fires_train: int = 0
    n_fires_test: int = 0
    n_predicted_test: int = 0

    def to_dict(self, tokenizer=None, base: Optional[int] = None) -> dict:
        """JSON-ready dict; with a tokenizer (and ``base``) the patterns are decoded to text."""
        d = {k: getattr(self, k) for k in ("latent", "precision", "recall", "f1", "n_fires_train",
                                          "n_fires_test", "n_predicted_test")}
        pats = []
        for n, code, prec, sup in self.patterns:
            p = {"n": n, "train_precision": prec, "train_support": sup}
            if tokenizer is not None and base is not None:
                p["text"] = tokenizer.decode(decode_ngram(code, n, base))
            else:
                p["code"] = code
            pats.append(p)
        d["patterns"] = pats
        return d


def _prf(pred: Tensor, fires: Tensor) -> tuple[float, float, float]:
    tp = int((pred & fires).sum())
    n_pred, n_true = int(pred.sum()), int(fires.sum())
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_true if n_true else float("nan")
    if n_true == 0:
        return precision, recall, float("nan")
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return precision, recall, f1


def explain_latent(latent: int, acts: Tensor, codes: Sequence[Tensor], keep: Tensor, train_rows: Tensor,
                   base: int, threshold: float = 0.0, top_contexts: int = 20, min_precision: float = 0.5,
                   min_support: int = 2, _train_codes: Optional[list] = None) -> N2GExplanation:
    """Explain one latent and score the explanation on the test windows.

    Args:
        latent: the latent's id (recorded in the result).
        acts: float [N, T] the latent's activation at every position (ignored where not kept).
        codes: ``[ngram_codes(ids, n, base) for n in 1..max_n]``, each int64 [N, T].
        keep: bool [N, T] positions that count.
        train_rows: bool [N] windows used to build the explanation (others = test).
        base: the vocabulary size used to build ``codes``.
        threshold: the latent "fires" where acts > threshold.
    """
    keep = keep.bool()
    tr_pos = keep & train_rows.bool().unsqueeze(-1)
    te_pos = keep & ~train_rows.bool().unsqueeze(-1)
    fires = (acts > threshold) & keep
    fires_tr, fires_te = fires & tr_pos, fires & te_pos
    ex = N2GExplanation(latent=latent, n_fires_train=int(fires_tr.sum()), n_fires_test=int(fires_te.sum()))
    if ex.n_fires_train:
        top = torch.where(fires_tr, acts, torch.full_like(acts, float("-inf"))).flatten()
        pos = top.topk(min(top_contexts, ex.n_fires_train)).indices
        fires_at_train = fires[tr_pos].unsqueeze(-1)
        train_codes = _train_codes if _train_codes is not None else [c[tr_pos] for c in codes]
        accepted: list[Tensor] = []  # accepted codes per level (index n-1)
        for n, (code, code_tr) in enumerate(zip(codes, train_codes), start=1):
            cand = torch.unique(code.flatten()[pos])
            cand = cand[cand >= 0]
            for m in range(1, n):  # drop n-grams whose m-token suffix is already an accepted pattern
                if cand.numel() and accepted[m - 1].numel():
                    cand = cand[~torch.isin(cand % (base ** m), accepted[m - 1])]
            if cand.numel() == 0:
                accepted.append(cand)
                continue
            occ_mask = code_tr.unsqueeze(-1) == cand          # [M_train, C]
            occ = occ_mask.sum(0)
            fired = (occ_mask & fires_at_train).sum(0)
            prec = fired.double() / occ.clamp_min(1).double()
            good = (prec >= min_precision) & (occ >= min_support)
            accepted.append(cand[good])
            for c, p, o in zip(cand[good].tolist(), prec[good].tolist(), occ[good].tolist()):
                ex.patterns.append((n, int(c), float(p), int(o)))
    pred = torch.zeros_like(keep)
    for n, c, _, _ in ex.patterns:
        pred |= codes[n - 1] == c
    pred &= te_pos
    ex.n_predicted_test = int(pred.sum())
    ex.precision, ex.recall, ex.f1 = _prf(pred[te_pos], fires_te[te_pos])
    return ex


def n2g_evaluate(input_ids: Tensor, keep: Tensor, train_rows: Tensor, latent_acts: Tensor, latents: Sequence[int],
                 vocab_size: Optional[int] = None, max_n: int = 3, threshold: float = 0.0, top_contexts: int = 20,
                 min_precision: float = 0.5, min_support: int = 2, progress: bool = False) -> list:
    """Explain and score several latents.

    Args:
        input_ids: int [N, T] token windows.
        keep: bool [N, T] positions that count.
        train_rows: bool [N] windows used to build explanations; the others are held out.
        latent_acts: float [N, T, L] activations of the L latents listed in ``latents``.
        latents: the L latent ids (for the report).
        vocab_size: base of the n-gram codes (default max id + 1).
    Returns:
        list of :class:`N2GExplanation` (one per latent, in order).
    """
    from tqdm.auto import tqdm

    if latent_acts.shape[:2] != input_ids.shape or latent_acts.shape[2] != len(latents):
        raise ValueError(f"latent_acts must be [N, T, L] = {tuple(input_ids.shape)} + [{len(latents)}], "
                         f"got {tuple(latent_acts.shape)}.")
    base = int(vocab_size) if vocab_size is not None else int(input_ids.max()) + 1
    codes = [ngram_codes(input_ids.cpu(), n, base) for n in range(1, max_n + 1)]
    tr_pos = keep.cpu().bool() & train_rows.cpu().bool().unsqueeze(-1)
    train_codes = [c[tr_pos] for c in codes]
    out = []
    for j, lat in enumerate(tqdm(latents, desc="N2G", disable=not progress)):
        out.append(explain_latent(int(lat), latent_acts[..., j].cpu().float(), codes, keep.cpu(), train_rows.cpu(),
                                  base, threshold, top_contexts, min_precision, min_support, train_codes))
    return out


def summarize_n2g(explanations: Sequence[N2GExplanation]) -> dict:
    """Mean precision / recall / F1 over latents that fire on held-out text (others have no recall)."""
    scored = [e for e in explanations if e.n_fires_test > 0]
    if not scored:
        return {"n_latents": len(explanations), "n_scored": 0, "precision": float("nan"),
                "recall": float("nan"), "f1": float("nan")}
    m = len(scored)
    return {
        "n_latents": len(explanations),
        "n_scored": m,
        "precision": sum(e.precision for e in scored) / m,
        "recall": sum(e.recall for e in scored) / m,
        "f1": sum(e.f1 for e in scored) / m,
        "mean_patterns": sum(len(e.patterns) for e in scored) / m,
    }

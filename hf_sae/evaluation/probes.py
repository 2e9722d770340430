"""Probe feature recovery (Gao et al. 2024): for binary token-level tasks, the best *single* latent
used as a 1-D logistic probe.

Tasks are built from real text with labels derived automatically from the tokens (see
:data:`TASKS`): token-intrinsic properties (digit, capitalised, all caps, punctuation, starts a
word, members of small word lists) and context properties (starts a sentence, follows a comma,
inside double quotes, inside parentheses). Tasks without enough positives and negatives in the
evaluated text are skipped and reported as such.

For each task and each candidate feature f (one latent, or one baseline direction) we fit
``p(y=1) = sigmoid(w * f + b)`` by Newton's method (all features at once, vectorised; a small L2
penalty ``l2/2 * w^2`` on the standardised weight keeps separable tasks finite), select the feature
with the lowest *train* loss, and report its binary cross-entropy (nats/token) on held-out test
tokens. Baselines run the same procedure on the raw activation basis (the d coordinates of x) and
on d random unit directions of x.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "probe_recovery",
    "TASKS",
    "token_table",
    "task_labels",
    "fit_probes_sparse",
    "probe_loss_sparse",
    "fit_probes_dense",
    "probe_loss_dense",
    "best_probe_sparse",
    "best_probe_dense",
    "screen_features",
    "ProbeTaskResult",
    "summarize_probe_results",
    "run_probe_tasks",
]

# ----------------------------------------------------------------------------------- task labels

WORD_LISTS = {
    "is_determiner": {"the", "a", "an", "this", "that", "these", "those", "every", "all", "some", "no", "each"},
    "is_pronoun": {"i", "me", "my", "mine", "he", "him", "his", "she", "her", "hers", "it", "its", "we", "us",
                   "our", "they", "them", "their", "you", "your", "thou", "thee", "thy", "thine", "ye"},
    "is_preposition": {"of", "in", "on", "at", "by", "with", "from", "to", "into", "unto", "upon", "for",
                       "over", "under", "through", "before", "after", "against", "among"},
    "is_number_word": {"one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                       "eleven", "twelve", "twenty", "thirty", "forty", "fifty", "hundred", "thousand",
                       "first", "second", "third"},
}


def _is_punct(ch: str) -> bool:
    return unicodedata.category(ch)[0] in "PS"


@dataclass
class TokenTable:
    """Per-vocabulary-id lookup tables (bool/int tensors [V]) used to derive task labels."""

    text: dict
    intrinsic: dict = field(default_factory=dict)   # name -> bool [V]
    counts: dict = field(default_factory=dict)      # name -> int [V] (quote/paren characters)
    ends_sentence: Optional[Tensor] = None          # bool [V]: stripped text ends with . ! ?
    ends_comma: Optional[Tensor] = None             # bool [V]
    alpha: Optional[Tensor] = None                  # bool [V]: contains a letter


def token_table(input_ids: Tensor, tokenizer) -> TokenTable:
    """Decode every distinct id of ``input_ids`` once and build the lookup tables of :data:`TASKS`.

    A token "starts a word" when its decoded text starts with whitespace or its raw token starts with
    a word-boundary marker (``Ġ`` byte-level BPE, ``▁`` SentencePiece).
    """
    ids = torch.unique(input_ids).tolist()
    V = max(ids) + 1 if ids else 1
    texts = {}
    raw = tokenizer.convert_ids_to_tokens(ids)
    tab = {name: torch.zeros(V, dtype=torch.bool) for name in
           ("is_digit", "is_capitalised", "is_all_caps", "is_punctuation", "starts_word", *WORD_LISTS)}
    cnt = {name: torch.zeros(V, dtype=torch.long) for name in ("dq", "open_q", "close_q", "open_p", "close_p")}
    ends_sentence = torch.zeros(V, dtype=torch.bool)
    ends_comma = torch.zeros(V, dtype=torch.bool)
    alpha = torch.zeros(V, dtype=torch.bool)
    for i, r in zip(ids, raw):
        t = tokenizer.decode([i])
        texts[i] = t
        s = t.strip()
        has_alpha = any(c.isalpha() for c in s)
        alpha[i] = has_alpha
        tab["is_digit"][i] = any(c.isdigit() for c in s)
        tab["is_capitalised"][i] = bool(s) and s[0].isupper()
        letters = [c for c in s if c.isalpha()]
        tab["is_all_caps"][i] = len(letters) >= 2 and all(c.isupper() for c in letters)
        tab["is_punctuation"][i] = bool(s) and all(_is_punct(c) for c in s)
        marker = isinstance(r, str) and r[:1] in ("Ġ", "▁")
        tab["starts_word"][i] = has_alpha and (t[:1].isspace() or marker)
        low = s.lower()
        for name, words in WORD_LISTS.items():
            tab[name][i] = low in words
        cnt["dq"][i] = s.count('"')
        cnt["open_q"][i] = s.count("\u201c")
        cnt["close_q"][i] = s.count("\u201d")
        cnt["open_p"][i] = s.count("(")
        cnt["close_p"][i] = s.count(")")
        ends_sentence[i] = bool(s) and s[-1] in ".!?"
        ends_comma[i] = bool(s) and s[-1] in ",;:"
    return TokenTable(text=texts, intrinsic=tab, counts=cnt, ends_sentence=ends_sentence,
                      ends_comma=ends_comma, alpha=alpha)


def _prev(t: Tensor) -> Tensor:
    """Shift right along the last dim by one (position 0 gets False/0)."""
    out = torch.zeros_like(t)
    out[..., 1:] = t[..., :-1]
    return out


def _exclusive_cumsum(t: Tensor) -> Tensor:
    return t.cumsum(-1) - t


def _ctx_starts_sentence(ids, tab):
    return _prev(tab.ends_sentence[ids]) & tab.alpha[ids]


def _ctx_after_comma(ids, tab):
    return _prev(tab.ends_comma[ids]) & tab.alpha[ids]


def _ctx_inside_quotes(ids, tab):
    straight = _exclusive_cumsum(tab.counts["dq"][ids]) % 2 == 1
    curly = (_exclusive_cumsum(tab.counts["open_q"][ids]) - _exclusive_cumsum(tab.counts["close_q"][ids])) > 0
    is_quote = (tab.counts["dq"][ids] + tab.counts["open_q"][ids] + tab.counts["close_q"][ids]) > 0
    return (straight | curly) & ~is_quote


def _ctx_inside_parens(ids, tab):
    depth = _exclusive_cumsum(tab.counts["open_p"][ids]) - _exclusive_cumsum(tab.counts["close_p"][ids])
    is_paren = (tab.counts["open_p"][ids] + tab.counts["close_p"][ids]) > 0
    return (depth > 0) & ~is_paren


def _intrinsic(name):
    return lambda ids, tab: tab.intrinsic[name][ids]


TASKS: dict[str, Callable[[Tensor, TokenTable], Tensor]] = {
    "is_digit": _intrinsic("is_digit"),
    "is_capitalised": _intrinsic("is_capitalised"),
    "is_all_caps": _intrinsic("is_all_caps"),
    "is_punctuation": _intrinsic("is_punctuation"),
    "starts_word": _intrinsic("starts_word"),
    "is_determiner": _intrinsic("is_determiner"),
    "is_pronoun": _intrinsic("is_pronoun"),
    "is_preposition": _intrinsic("is_preposition"),
    "is_number_word": _intrinsic("is_number_word"),
    "starts_sentence": _ctx_starts_sentence,
    "after_comma": _ctx_after_comma,
    "inside_quotes": _ctx_inside_quotes,
    "inside_parens": _ctx_inside_parens,
}
"""Binary token-level tasks: name -> fn(input_ids [N, T], TokenTable) -> bool [N, T]. Context tasks
look only at earlier tokens of the same window."""


def task_labels(input_ids: Tensor, tokenizer, tasks: Optional[Sequence[str]] = None,
                table: Optional[TokenTable] = None) -> dict:
    """Labels of each task for every token: ``{task: bool [N, T]}`` for ``input_ids`` [N, T]."""
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [N, T], got shape {tuple(input_ids.shape)}.")
    names = list(TASKS) if tasks is None else list(tasks)
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown probe tasks {unknown}; available: {sorted(TASKS)}.")
    table = table if table is not None else token_table(input_ids, tokenizer)
    ids = input_ids.cpu()
    return {t: TASKS[t](ids, table) for t in names}


# ----------------------------------------------------------------------------------- 1-D logistic probes


def _solve_step(g_w, g_b, h_ww, h_wb, h_bb):
    det = (h_ww * h_bb - h_wb * h_wb).clamp_min(1e-30)
    return (h_bb * g_w - h_wb * g_b) / det, (h_ww * g_b - h_wb * g_w) / det


def _sparse_entries(values: Tensor, indices: Tensor, labels=None):
    """(token [E], latent [E], value [E] float64) of the non-zero entries of a code [M, w]."""
    M, w = values.shape
    nz = values != 0
    tok = torch.arange(M, device=values.device).unsqueeze(-1).expand(M, w)[nz]
    return tok, indices[nz].long(), values[nz].double()


def _sparse_loss_sums(w, b, lat, val, y_e, n0, p0):
    """Sum of BCE per latent (float64 [n]) for parameters w, b [n]."""
    z = w.index_select(0, lat) * val + b.index_select(0, lat)
    per = F.softplus(z) - y_e * z
    s = torch.zeros_like(w).index_add_(0, lat, per)
    return s + p0 * F.softplus(-b) + (n0 - p0) * F.softplus(b)


def fit_probes_sparse(values: Tensor, indices: Tensor, labels: Tensor, n_latents: int, l2: float = 1e-4,
                      iters: int = 30, tol: float = 1e-9, entries: Optional[tuple] = None):
    """Fit one 1-D logistic probe per latent from a sparse code, all latents at once.

    Args:
        values, indices: sparse code [M, w] of M tokens (value 0 = padding / inactive).
        labels: bool [M].
        n_latents: n.
        l2: penalty ``l2/2 * w_std^2`` on the weight of the standardised feature (f / rms(f)).
        iters: Newton iterations (each with step halving so the objective never increases).
        tol: stop when every latent's Newton decrement (predicted decrease of the summed
            objective) is below ``tol * M``.
        entries: the code's non-zero entries precomputed by ``_sparse_entries(values, indices)``
            (saves the work when several tasks share one code).
    Returns:
        ``(w [n], b [n], loss [n])`` float64: weight on the *raw* latent value, bias, and the train
        binary cross-entropy (nats/token, without the penalty).
    """
    if values.shape != indices.shape or values.ndim != 2:
        raise ValueError(f"values/indices must both be [M, w]; got {tuple(values.shape)}, {tuple(indices.shape)}.")
    if labels.shape != values.shape[:1]:
        raise ValueError(f"labels must be [M]={values.shape[0]}, got {tuple(labels.shape)}.")
    M = values.shape[0]
    y = labels.double()
    P = float(y.sum())
    tok, lat, val = entries if entries is not None else _sparse_entries(values, indices)
    dev = values.device
    n = n_latents
    ones = torch.ones_like(val)
    cnt = torch.zeros(n, dtype=torch.float64, device=dev).index_add_(0, lat, ones)
    rms = torch.zeros(n, dtype=torch.float64, device=dev).index_add_(0, lat, val * val).div(M).sqrt()
    rms = torch.where(rms > 0, rms, torch.ones_like(rms))
    val_s = val / rms.index_select(0, lat)
    y_e = y.index_select(0, tok)
    pos = torch.zeros(n, dtype=torch.float64, device=dev).index_add_(0, lat, y_e)
    n0, p0 = M - cnt, P - pos
    lam = l2 * M
    w = torch.zeros(n, dtype=torch.float64, device=dev)
    prior = min(max(P / max(M, 1), 1e-12), 1 - 1e-12)
    b = torch.full((n,), math.log(prior / (1 - prior)), dtype=torch.float64, device=dev)

    def objective(w_, b_):
        return _sparse_loss_sums(w_, b_, lat, val_s, y_e, n0, p0) + 0.5 * lam * w_ * w_

    obj = objective(w, b)
    for _ in range(iters):
        z = w.index_select(0, lat) * val_s + b.index_select(0, lat)
        p = torch.sigmoid(z)
        r, s = p - y_e, p * (1 - p)
        pb = torch.sigmoid(b)
        sv = s * val_s
        per = torch.stack([r * val_s, r, sv * val_s, sv, s], dim=1)          # [E, 5]
        acc = torch.zeros(n, 5, dtype=torch.float64, device=dev).index_add_(0, lat, per)
        g_w = acc[:, 0] + lam * w
        g_b = acc[:, 1] + n0 * pb - p0
        h_ww = acc[:, 2] + lam
        h_wb = acc[:, 3]
        h_bb = acc[:, 4] + n0 * pb * (1 - pb) + 1e-12
        dw, db = _solve_step(g_w, g_b, h_ww, h_wb, h_bb)
        active = 0.5 * (g_w * dw + g_b * db) > tol * M    # Newton decrement: predicted decrease
        if not active.any():
            break
        t = active.double()
        for _ in range(12):
            new = objective(w - t * dw, b - t * db)
            bad = active & ~(new <= obj)
            if not bad.any():
                break
            t = torch.where(bad, t * 0.5, t)
        accept = active & (new <= obj)
        w = torch.where(accept, w - t * dw, w)
        b = torch.where(accept, b - t * db, b)
        obj = torch.where(accept, new, obj)
    loss = _sparse_loss_sums(w, b, lat, val_s, y_e, n0, p0) / M
    return w / rms, b, loss


def probe_loss_sparse(values: Tensor, indices: Tensor, labels: Tensor, w: Tensor, b: Tensor,
                      entries: Optional[tuple] = None) -> Tensor:
    """Binary cross-entropy (nats/token, float64 [n]) of the probes (w, b) [n] on a sparse code [M, width]."""
    M = values.shape[0]
    y = labels.double()
    tok, lat, val = entries if entries is not None else _sparse_entries(values, indices)
    n = w.shape[0]
    y_e = y.index_select(0, tok)
    cnt = torch.zeros(n, dtype=torch.float64, device=values.device).index_add_(0, lat, torch.ones_like(val))
    pos = torch.zeros(n, dtype=torch.float64, device=values.device).index_add_(0, lat, y_e)
    return _sparse_loss_sums(w, b, lat, val, y_e, M - cnt, float(y.sum()) - pos) / M


def fit_probes_dense(features: Tensor, labels: Tensor, l2: float = 1e-4, iters: int = 30, tol: float = 1e-9,
                     chunk: int = 256):
    """Fit one 1-D logistic probe per column of dense ``features`` [M, F] (see :func:`fit_probes_sparse`).

    Features are standardised internally (mean 0, rms 1; float32 arithmetic, float64 sums); the
    returned ``(w [F], b [F], loss [F])`` (float64) apply to the raw feature values.
    """
    if features.ndim != 2 or labels.shape != features.shape[:1]:
        raise ValueError(f"features must be [M, F] and labels [M]; got {tuple(features.shape)}, {tuple(labels.shape)}.")
    if not torch.isfinite(features).all():
        raise ValueError("probe features contain NaN/Inf.")
    M, Fdim = features.shape
    y = labels.float().unsqueeze(-1)
    P = float(labels.double().sum())
    prior = min(max(P / max(M, 1), 1e-12), 1 - 1e-12)
    lam = l2 * M
    ws, bs, losses = [], [], []

    def total(z):
        return (F.softplus(z) - y * z).sum(0).double()

    for start in range(0, Fdim, chunk):
        f = features[:, start:start + chunk].float()
        mu = f.mean(0, dtype=torch.float64)
        sd = (f.double() - mu).square().mean(0).sqrt()
        sd = torch.where(sd > 0, sd, torch.ones_like(sd))
        f = (f - mu.float()) / sd.float()
        c = f.shape[1]
        w = torch.zeros(c, dtype=torch.float64, device=f.device)
        b = torch.full((c,), math.log(prior / (1 - prior)), dtype=torch.float64, device=f.device)
        z = torch.zeros_like(f) + b.float()
        obj = total(z) + 0.5 * lam * w * w
        for _ in range(iters):
            p = torch.sigmoid(z)
            r = p - y
            s = p * (1 - p)
            sf = s * f
            g_w = (r * f).sum(0).double() + lam * w
            g_b = r.sum(0).double()
            h_ww = (sf * f).sum(0).double() + lam
            h_wb = sf.sum(0).double()
            h_bb = s.sum(0).double() + 1e-12
            dw, db = _solve_step(g_w, g_b, h_ww, h_wb, h_bb)
            # Newton decrement: the predicted decrease of the objective; ~0 once converged
            active = 0.5 * (g_w * dw + g_b * db) > tol * M
            if not active.any():
                break
            t = active.double()
            slack = 1e-6 * obj.abs() + 1e-9 * M   # float32 sums are noisy at this level
            for _ in range(12):
                w_new, b_new = w - t * dw, b - t * db
                z_new = f * w_new.float() + b_new.float()
                new = total(z_new) + 0.5 * lam * w_new * w_new
                bad = active & ~(new <= obj + slack)
                if not bad.any():
                    break
                t = torch.where(bad, t * 0.5, t)
            accept = active & (new <= obj + slack)
            w = torch.where(accept, w_new, w)
            b = torch.where(accept, b_new, b)
            z = torch.where(accept, z_new, z)
            obj = torch.where(accept, new, obj)
        losses.append(total(z) / M)
        ws.append(w / sd)
        bs.append(b - w * mu / sd)
    return torch.cat(ws), torch.cat(bs), torch.cat(losses)


def probe_loss_dense(features: Tensor, labels: Tensor, w: Tensor, b: Tensor, chunk: int = 256) -> Tensor:
    """Binary cross-entropy (nats/token, float64 [F]) of probes (w, b) [F] on features [M, F]."""
    y = labels.double().unsqueeze(-1)
    out = []
    for start in range(0, features.shape[1], chunk):
        z = features[:, start:start + chunk].double() * w[start:start + chunk] + b[start:start + chunk]
        out.append((F.softplus(z) - y * z).mean(0))
    return torch.cat(out)


def _bce_of_prior(train: Tensor, test: Tensor) -> float:
    p = float(train.double().mean())
    p = min(max(p, 1e-12), 1 - 1e-12)
    y = test.double()
    return float(-(y * math.log(p) + (1 - y) * math.log(1 - p)).mean())


@dataclass
class ProbeTaskResult:
    """Best single-feature probe of one task (losses in nats/token)."""

    task: str
    method: str                 # "sae", "raw_basis", "random_directions"
    feature: int                # index of the best latent / coordinate / direction
    train_loss: float
    test_loss: float
    prior_loss: float           # BCE of predicting the train base rate on test (a no-feature reference)
    n_train: int
    n_test: int
    positive_rate: float        # on test

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def best_probe_sparse(task: str, train_code, test_code, y_train: Tensor, y_test: Tensor, n_latents: int,
                      l2: float = 1e-4, train_entries=None, test_entries=None) -> ProbeTaskResult:
    """Fit all latents on train, pick the lowest train loss, report its test loss.

    ``train_code``/``test_code`` are ``(values [M, w], indices [M, w])``; ``*_entries`` optionally
    their precomputed non-zero entries (``_sparse_entries``)."""
    w, b, loss = fit_probes_sparse(*train_code, y_train, n_latents, l2=l2, entries=train_entries)
    j = int(loss.argmin())
    test = probe_loss_sparse(test_code[0], test_code[1], y_test, w, b, entries=test_entries)[j:j + 1]
    return ProbeTaskResult(task, "sae", j, float(loss[j]), float(test[0]), _bce_of_prior(y_train, y_test),
                           int(y_train.numel()), int(y_test.numel()), float(y_test.double().mean()))


def screen_features(features: Tensor, labels: Tensor, top: int) -> Tensor:
    """Indices of the ``top`` columns of ``features`` [M, F] with the largest |correlation| with the
    labels [M]. |corr| is the score test of a 1-D logistic probe at w = 0 (the loss decrease
    predicted by the first Newton step is proportional to corr^2), computed in one pass."""
    f = features.float()
    yc = labels.float() - labels.float().mean()
    mu = f.mean(0)
    cov = (yc @ f) / f.shape[0]                        # E[(y - ybar) f] = E[(y - ybar)(f - mu)]
    sd = (f.square().mean(0) - mu.square()).clamp_min(0).sqrt()
    score = torch.where(sd > 0, cov.abs() / sd.clamp_min(1e-30), torch.zeros_like(cov))
    return score.topk(min(top, score.numel())).indices


def best_probe_dense(task: str, method: str, train_f: Tensor, test_f: Tensor, y_train: Tensor, y_test: Tensor,
                     l2: float = 1e-4, screen: Optional[int] = 64) -> ProbeTaskResult:
    """Dense counterpart of :func:`best_probe_sparse` (features [M, F]).

    With ``screen``, only the ``screen`` features most correlated with the train labels
    (:func:`screen_features`) are fitted exactly (``None`` = fit all F; same result unless the best
    probe is not among the most correlated features)."""
    cols = None
    if screen is not None and train_f.shape[1] > screen:
        cols = screen_features(train_f, y_train, screen)
        train_f = train_f.index_select(1, cols)
        test_f = test_f.index_select(1, cols)
    w, b, loss = fit_probes_dense(train_f, y_train, l2=l2)
    j = int(loss.argmin())
    test = probe_loss_dense(test_f[:, j:j + 1], y_test, w[j:j + 1], b[j:j + 1])
    feature = int(cols[j]) if cols is not None else j
    return ProbeTaskResult(task, method, feature, float(loss[j]), float(test[0]), _bce_of_prior(y_train, y_test),
                           int(y_train.numel()), int(y_test.numel()), float(y_test.double().mean()))


def summarize_probe_results(rows: Sequence) -> dict:
    """Mean test probe loss over tasks, per method.

    Args: rows of :class:`ProbeTaskResult` or dicts with ``task``, ``method``, ``test_loss``
        (and optionally ``prior_loss``).
    Returns:
        ``{"mean_probe_loss": {method: float}, "n_tasks": {method: int},
        "mean_prior_loss": float, "per_task": {task: {method: test_loss}}}``.
    """
    per_task: dict = {}
    by_method: dict = {}
    priors = {}
    for r in rows:
        r = r.to_dict() if hasattr(r, "to_dict") else dict(r)
        if not math.isfinite(float(r["test_loss"])):
            raise ValueError(f"probe loss of task {r['task']!r} ({r['method']}) is not finite.")
        per_task.setdefault(r["task"], {})[r["method"]] = float(r["test_loss"])
        by_method.setdefault(r["method"], []).append(float(r["test_loss"]))
        if r.get("prior_loss") is not None:
            priors[r["task"]] = float(r["prior_loss"])
    return {
        "mean_probe_loss": {m: sum(v) / len(v) for m, v in by_method.items()},
        "n_tasks": {m: len(v) for m, v in by_method.items()},
        "mean_prior_loss": (sum(priors.values()) / len(priors)) if priors else float("nan"),
        "per_task": per_task,
    }


def run_probe_tasks(
    labels: dict,
    keep: Tensor,
    train_rows: Tensor,
    code_values: Tensor,
    code_indices: Tensor,
    n_latents: int,
    x: Optional[Tensor] = None,
    baselines: Sequence[str] = ("raw_basis", "random_directions"),
    n_random: Optional[int] = None,
    min_count: int = 20,
    seed: int = 0,
    l2: float = 1e-4,
    screen: Optional[int] = 64,
    progress: bool = False,
) -> dict:
    """Run every task: best latent vs baselines.

    Args:
        labels: ``{task: bool [N, T]}`` (from :func:`task_labels`).
        keep: bool [N, T], the tokens that have a code (in row-major order of ``code_*`` / ``x``).
        train_rows: bool [N], windows used for fitting (the rest are test windows).
        code_values, code_indices: sparse code [M, w] of the M kept tokens.
        n_latents: n.
        x: optional activations [M, d] of the kept tokens (needed by the baselines).
        baselines: any of ``"raw_basis"`` (the d coordinates of x) and ``"random_directions"``
            (``n_random`` random unit directions, default d).
        min_count: tasks with fewer positives or negatives than this in train or test are skipped.
        screen: baselines fit exactly only their ``screen`` features most correlated with the labels
            (:func:`screen_features`; None = all). The SAE's latents are always all fitted.
    Returns:
        ``{"results": [ProbeTaskResult...], "skipped": {task: reason}, **summarize_probe_results}``.
    """
    from tqdm.auto import tqdm

    keep = keep.bool()
    M = int(keep.sum())
    if code_values.shape[0] != M:
        raise ValueError(f"the code has {code_values.shape[0]} rows but keep selects {M} tokens.")
    tr = train_rows.bool()[torch.arange(keep.shape[0]).unsqueeze(-1).expand_as(keep)[keep]]  # per kept token
    te = ~tr
    feats = {}
    if x is not None and baselines:
        if x.shape[0] != M:
            raise ValueError(f"x has {x.shape[0]} rows but keep selects {M} tokens.")
        if "raw_basis" in baselines:
            feats["raw_basis"] = x.float()
        if "random_directions" in baselines:
            g = torch.Generator().manual_seed(seed)
            R = torch.randn(n_random or x.shape[1], x.shape[1], generator=g)
            R = R / R.norm(dim=-1, keepdim=True)
            feats["random_directions"] = x.float() @ R.T.to(x.device)
    results, skipped = [], {}
    code_tr = (code_values[tr], code_indices[tr])
    code_te = (code_values[te], code_indices[te])
    ent_tr, ent_te = _sparse_entries(*code_tr), _sparse_entries(*code_te)
    feats = {m: (f[tr], f[te]) for m, f in feats.items()}
    for task, lab in tqdm(labels.items(), desc="probe tasks", disable=not progress):
        y = lab[keep].to(code_values.device)
        ytr, yte = y[tr], y[te]
        counts = [int(ytr.sum()), int((~ytr).sum()), int(yte.sum()), int((~yte).sum())]
        if min(counts) < min_count:
            skipped[task] = (
                f"too few examples (train pos/neg {counts[0]}/{counts[1]}, test pos/neg "
                f"{counts[2]}/{counts[3]}; need >= {min_count})"
            )
            continue
        results.append(
            best_probe_sparse(
                task, code_tr, code_te, ytr, yte, n_latents, l2=l2, train_entries=ent_tr, test_entries=ent_te
            )
        )
        for method, (f_tr, f_te) in feats.items():
            results.append(best_probe_dense(task, method, f_tr, f_te, ytr, yte, l2=l2, screen=screen))
    empty = {"mean_probe_loss": {}, "n_tasks": {}, "mean_prior_loss": float("nan"), "per_task": {}}
    return {"results": results, "skipped": skipped, **(summarize_probe_results(results) if results else empty)}


def probe_recovery(input_ids: Tensor, probe_keep: Tensor, code_values: Tensor, code_indices: Tensor, n_latents: int,
                   tokenizer, x: Optional[Tensor] = None, baselines: Sequence[str] = ("raw_basis", "random_directions"),
                   seed: int = 0, progress: bool = False) -> dict:
    """The ``probes`` section of ``hf-sae eval``: label the windows' tokens, fit on 2 of every 3 windows, test on
    the third, and summarise.

    Args:
        input_ids: LongTensor [N, T]; probe_keep: bool [N, T], the M probed tokens (a row-major prefix of the code).
        code_values, code_indices: sparse code [>= M, w]; its first M rows are the probed tokens.
        x: optional activations [M, d] of the probed tokens (for the baselines).
    Returns:
        ``{"summary", "per_task", "prior_per_task", "results", "skipped"}`` (JSON-ready).
    """
    n_probe = int(probe_keep.sum())
    n_rows = int(probe_keep.any(-1).sum())
    p_ids, p_keep = input_ids[:n_rows], probe_keep[:n_rows]
    labels = task_labels(p_ids, tokenizer)
    train_rows = torch.arange(n_rows) % 3 != 2
    pr = run_probe_tasks(labels, p_keep, train_rows, code_values[:n_probe], code_indices[:n_probe], n_latents,
                         x=x, baselines=list(baselines), seed=seed, progress=progress)
    res_rows = [r.to_dict() for r in pr["results"]]
    return {
        "summary": {
            **{f"mean_probe_loss_{m}": v for m, v in pr["mean_probe_loss"].items()},
            "mean_prior_loss": pr["mean_prior_loss"],
            "n_tasks": len(pr["per_task"]),
            "n_skipped": len(pr["skipped"]),
        },
        "per_task": pr["per_task"],
        "prior_per_task": {r["task"]: r["prior_loss"] for r in res_rows if r["method"] == "sae"},
        "results": res_rows,
        "skipped": pr["skipped"],
    }

"""N2G explainability (Gao et al. 2024, after Foote et al.'s Neuron2Graph): two explainers.

**Faithful N2G** (:func:`n2g_explain`, :func:`n2g_faithful_evaluate`), the method the paper scores
with. For each top-activating context of a latent (token ids ending at the activating token):

1. prune it to the shortest suffix whose activation (re-running the model + SAE on that suffix
   alone) keeps at least ``keep_frac`` of the full context's activation;
2. replace each token of the suffix in turn by a blank token and re-run; a token whose blanking
   keeps at least ``keep_frac`` of the suffix's activation does not matter and becomes a wildcard
   ``*`` (a leading wildcard still demands *some* token there, as the pruning showed);
3. merge the patterns into a trie read backwards from the activating token (:class:`N2GTrie`).

The trie predicts "fires" at every position where one of its patterns ends; precision / recall
are measured on held-out windows. The activation function is any callable over token-id lists,
so the method is tested without an LM (planted patterns) and run on real SAEs through
:func:`sae_latent_activation_fn`.

**n-gram baseline** (:func:`explain_latent`, :func:`n2g_evaluate`, used by ``hf-sae eval``): a
frequency explainer that does not re-run the model; kept as a named baseline. For each sampled latent:

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

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

__all__ = ["ngram_codes", "decode_ngram", "N2GExplanation", "explain_latent", "n2g_evaluate", "summarize_n2g",
           "n2g_from_codes", "WILDCARD", "N2GTrie", "n2g_explain", "n2g_score", "sae_latent_activation_fn",
           "n2g_faithful_evaluate"]


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


# ---------------------------------------------------------------------------------------------- faithful N2G
WILDCARD = -1
"""Pattern entry that matches any token (but demands that a token is there)."""



def n2g_from_codes(input_ids: Tensor, keep: Tensor, code_values: Tensor, code_indices: Tensor, n_latents: int,
                   n_sample: int, tokenizer, generator: torch.Generator, progress: bool = False) -> dict:
    """The ``n2g`` section of ``hf-sae eval``: n-gram explanations of ``n_sample`` latents drawn (with
    ``generator``) among those firing >= 5 times on the even (train) windows; odd windows score them.

    Args:
        input_ids: LongTensor [N, T]; keep: bool [N, T], the tokens that have a code (row-major).
        code_values, code_indices: sparse code [M, w] of the M kept tokens (0 values = not firing).
    Returns:
        ``{"summary", "latents"}``, or a ``summary`` with ``n_latents = 0`` and a note when none qualifies.
    """
    N, T = keep.shape
    train_rows = torch.arange(N) % 2 == 0
    row_of = torch.arange(N).unsqueeze(-1).expand(N, T)[keep]
    tr_tok = train_rows[row_of]
    nz = code_values != 0
    fires_tr = torch.bincount(code_indices[nz & tr_tok.unsqueeze(-1)], minlength=n_latents)
    candidates = (fires_tr >= 5).nonzero().squeeze(-1)
    perm = candidates[torch.randperm(candidates.numel(), generator=generator)][:n_sample].sort().values
    sel = perm.tolist()
    if not sel:
        return {"summary": {"n_latents": 0, "note": "no latent fired >= 5 times on the train windows"}}
    dense = torch.zeros(N, T, len(sel))  # the selected latents' activations at every position
    lookup = torch.full((n_latents,), -1, dtype=torch.long)
    lookup[perm] = torch.arange(len(sel))
    col = lookup[code_indices]
    hit = (col >= 0) & nz
    tok = torch.arange(code_values.shape[0]).unsqueeze(-1).expand_as(code_indices)[hit]
    kept_pos = keep.flatten().nonzero().squeeze(-1)
    dense.view(-1, len(sel))[kept_pos[tok], col[hit]] = code_values[hit]
    base = max(len(tokenizer), int(input_ids.max()) + 1)
    exps = n2g_evaluate(input_ids, keep, train_rows, dense, sel, vocab_size=base, progress=progress)
    return {"summary": summarize_n2g(exps), "latents": [e.to_dict(tokenizer, base) for e in exps]}


class N2GTrie:
    """Explanation patterns of one latent, merged into a trie read backwards from the activating token.

    A pattern is a list of token ids, oldest first, ending at the activating token; ``WILDCARD``
    entries match any token. Node = ``{"children": {token: node}, "acts": [activations of the
    patterns ending here]}``; the root's children are the activating tokens.
    """

    def __init__(self):
        self.root: dict = {"children": {}, "acts": []}

    def add(self, pattern: Sequence[int], activation: float) -> None:
        node = self.root
        for tok in reversed(list(pattern)):
            node = node["children"].setdefault(int(tok), {"children": {}, "acts": []})
        node["acts"].append(float(activation))

    def patterns(self) -> list[tuple[list[int], float, int]]:
        """``[(pattern oldest first, mean activation, number of contexts)]`` in insertion-independent order."""
        out = []

        def walk(node, rev):
            if node["acts"]:
                out.append((rev[::-1], sum(node["acts"]) / len(node["acts"]), len(node["acts"])))
            for tok in sorted(node["children"]):
                walk(node["children"][tok], rev + [tok])

        walk(self.root, [])
        return out

    def match(self, input_ids: Tensor) -> Tensor:
        """bool [N, T]: True where some pattern ends at that position (within the same row)."""
        ids = input_ids.long()
        N, T = ids.shape
        out = torch.zeros(N, T, dtype=torch.bool, device=ids.device)
        shifted_cache: dict[int, Tensor] = {}

        def shifted(depth):  # shifted[:, t] = ids[:, t - depth], -2 where t < depth
            if depth not in shifted_cache:
                sh = torch.full_like(ids, -2)
                if depth < T:
                    sh[:, depth:] = ids[:, : T - depth]
                shifted_cache[depth] = sh
            return shifted_cache[depth]

        def walk(node, depth, mask):
            nonlocal out
            if node["acts"]:
                out |= mask
            for tok, child in node["children"].items():
                sh = shifted(depth)
                m = mask & ((sh >= 0) if tok == WILDCARD else (sh == tok))
                if bool(m.any()):
                    walk(child, depth + 1, m)

        walk(self.root, 0, torch.ones(N, T, dtype=torch.bool, device=ids.device))
        return out

    def to_list(self, tokenizer=None) -> list[dict]:
        """JSON-ready patterns; with a tokenizer each token is decoded (wildcards shown as ``*``)."""
        rows = []
        for pat, act, count in self.patterns():
            row = {"pattern": pat, "mean_activation": act, "contexts": count}
            if tokenizer is not None:
                row["text"] = "".join("[*]" if t == WILDCARD else tokenizer.decode([t]) for t in pat)
            rows.append(row)
        return rows


def n2g_explain(contexts: Sequence[Sequence[int]], activation_fn, blank_id: int, keep_frac: float = 0.5,
                max_len: Optional[int] = None) -> N2GTrie:
    """Build the faithful N2G trie of one latent from its top-activating contexts.

    Args:
        contexts: token-id lists, each ending at a position where the latent fires.
        activation_fn: ``list[list[int]] -> Tensor [B]``, the latent's activation at the *last*
            token of each sequence when the model + SAE run on that sequence alone.
        blank_id: the token that replaces a token to test whether it matters.
        keep_frac: a suffix (or a blanked variant) "keeps" the activation when it reaches
            ``keep_frac`` x the reference activation.
        max_len: longest suffix considered (default: the whole context).
    Returns:
        :class:`N2GTrie` (contexts whose own activation is <= 0 contribute nothing).
    """
    if not 0 < keep_frac <= 1:
        raise ValueError(f"keep_frac must be in (0, 1], got {keep_frac}.")
    trie = N2GTrie()
    for ctx in contexts:
        ctx = [int(t) for t in ctx]
        if not ctx:
            continue
        L = min(len(ctx), max_len or len(ctx))
        suffixes = [ctx[len(ctx) - m:] for m in range(1, L + 1)] + ([ctx] if L < len(ctx) else [])
        acts = activation_fn(suffixes).float().tolist()
        a_full = acts[-1]
        if not a_full > 0:
            continue
        m = next((i for i, a in enumerate(acts[:-1]) if a >= keep_frac * a_full), len(suffixes) - 1)
        suffix, a_suffix = suffixes[m], acts[m]
        variants = [suffix[:i] + [int(blank_id)] + suffix[i + 1:] for i in range(len(suffix))]
        blanked = activation_fn(variants).float().tolist()
        pattern = [WILDCARD if (b >= keep_frac * a_suffix and tok != blank_id) else tok
                   for tok, b in zip(suffix, blanked)]
        trie.add(pattern, a_suffix)
    return trie


def n2g_score(trie: N2GTrie, input_ids: Tensor, keep: Tensor, fires: Tensor) -> tuple[float, float, float]:
    """(precision, recall, F1) of the trie's predictions against ``fires`` (bool [N, T]) at kept positions."""
    keep = keep.bool()
    pred = trie.match(input_ids) & keep
    return _prf(pred[keep], (fires.bool() & keep)[keep])


def sae_latent_activation_fn(model, sae, hook_point: str, latent: int, bos_id: Optional[int] = None,
                             pad_id: int = 0, batch_size: int = 64):
    """``activation_fn`` for :func:`n2g_explain` on a real LM + SAE.

    Each sequence is run alone (``bos_id`` prepended when given, as in the training windows;
    right-padded to the batch's longest with ``pad_id``, which a causal LM never sees from an
    earlier position), and the latent's value at its last token is returned (float [B])."""
    from hf_sae.hooks import run_with_capture

    def fn(seqs: list) -> Tensor:
        out = []
        for s in range(0, len(seqs), batch_size):
            chunk = [([bos_id] if bos_id is not None else []) + list(q) for q in seqs[s:s + batch_size]]
            width = max(len(q) for q in chunk)
            ids = torch.full((len(chunk), width), int(pad_id), dtype=torch.long)
            for i, q in enumerate(chunk):
                ids[i, : len(q)] = torch.tensor(q, dtype=torch.long)
            last = torch.tensor([len(q) - 1 for q in chunk])
            with torch.no_grad():
                acts = run_with_capture(model, ids, [hook_point])[hook_point]
                x = acts[torch.arange(len(chunk)), last].float()
                out.append(sae.encode(x)[:, latent].float())
        return torch.cat(out)

    return fn


@torch.no_grad()
def n2g_faithful_evaluate(model, tokenizer, sae, hook_point: str, n_tokens: int = 8192, n_latents: int = 16,
                          top_contexts: int = 8, max_context: int = 12, keep_frac: float = 0.5,
                          dataset: str = "default", split: str = "validation", window: int = 128,
                          min_fires: int = 5, seed: int = 0) -> dict:
    """Faithful N2G on a real SAE: explanations from the even windows' top contexts, scored on the odd ones.

    ``n_tokens`` kept tokens of ``dataset``/``split`` are cut into ``window``-token windows; the
    ``n_latents`` latents are sampled (seeded) among those firing >= ``min_fires`` times on the
    build windows. A latent "fires" where its activation is > 0 (the n-gram baseline's rule).
    Returns ``{"summary": {...precision, recall, f1 means...}, "latents": [...]}``.
    """
    from hf_sae.data import corpus
    from hf_sae.hooks import run_with_capture

    ids = corpus.windows_with_tokens(dataset, tokenizer, n_tokens, window=window, split=split)
    keep = corpus.token_mask(ids, tokenizer)
    N, T = ids.shape
    train_rows = torch.arange(N) % 2 == 0
    pos, lat_ids, vals = [], [], []  # the code, stored sparse: (flat position, latent, value) where > 0
    for s in range(0, N, 8):
        acts = run_with_capture(model, ids[s:s + 8], [hook_point])[hook_point]
        z = sae.encode(acts.float()).float() * keep[s:s + 8].unsqueeze(-1)
        nz = (z > 0).nonzero()
        pos.append((nz[:, 0] + s) * T + nz[:, 1])
        lat_ids.append(nz[:, 2])
        vals.append(z[nz[:, 0], nz[:, 1], nz[:, 2]])
    pos, lat_ids, vals = torch.cat(pos), torch.cat(lat_ids), torch.cat(vals)
    fires_train = torch.bincount(lat_ids[train_rows[pos // T]], minlength=sae.config.n_latents)
    cand = (fires_train >= min_fires).nonzero().squeeze(-1)
    g = torch.Generator().manual_seed(seed)
    latents = cand[torch.randperm(cand.numel(), generator=g)][:n_latents].sort().values.tolist()
    bos = tokenizer.bos_token_id
    blank = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    test_keep = keep & ~train_rows.unsqueeze(-1)
    results = []
    for lat in latents:
        sel = lat_ids == lat
        a = torch.zeros(N * T).index_put_((pos[sel],), vals[sel]).view(N, T)
        a_train = torch.where(train_rows.unsqueeze(-1) & keep, a, torch.zeros_like(a)).flatten()
        top = a_train.topk(min(top_contexts, int((a_train > 0).sum()))).indices.tolist()
        contexts = [ids[p // T, max(1, p % T - max_context + 1): p % T + 1].tolist() for p in top]
        fn = sae_latent_activation_fn(model, sae, hook_point, lat, bos_id=bos, pad_id=blank)
        trie = n2g_explain(contexts, fn, blank_id=blank, keep_frac=keep_frac)
        p, r, f = n2g_score(trie, ids, test_keep, a > 0)
        results.append({"latent": lat, "precision": p, "recall": r, "f1": f,
                        "n_fires_test": int(((a > 0) & test_keep).sum()),
                        "patterns": trie.to_list(tokenizer)})
    scored = [r for r in results if r["n_fires_test"] > 0]
    mean = (lambda k: sum(r[k] for r in scored) / len(scored)) if scored else (lambda k: float("nan"))
    return {"summary": {"n_latents": len(results), "n_scored": len(scored), "precision": mean("precision"),
                        "recall": mean("recall"), "f1": mean("f1"), "keep_frac": keep_frac,
                        "top_contexts": top_contexts, "max_context": max_context},
            "latents": results}

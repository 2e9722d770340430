"""The static feature-browser site: shipped assets + data files written from :class:`FeatureStats`.

Layout of a site folder::

    index.html  app.js  style.css      the browser (package data in hf_sae/dashboard/assets/, no network)
    data/meta.js                       model, hook point, sizes, histogram edges, shard size, flags
    data/index.js                      one row per latent: density, mean/max activation, top tokens, explanations
    data/latents_0000.js ...           SHARD_SIZE latents per shard: contexts, histogram, logit effects, neighbours
    data/texts.js                      "which latents fire on this text" for the texts given at build time
    data/pool.js                       random contexts with their active latents (autointerp negatives)
    data/autointerp.js                 written by ``hf-sae autointerp`` (explanations and scores)

Data files are JavaScript, not JSON, so that the site works opened from disk (``file://`` forbids
``fetch``): each is one call ``HFSAE_DATA([kind, key, payload]);`` that the page loads lazily with a
``<script>`` tag. :func:`read_data` / :func:`write_data` are the Python side of that format.
"""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

__all__ = ["SHARD_SIZE", "ASSETS", "write_data", "read_data", "shard_name", "write_site", "latent_record"]

SHARD_SIZE = 256
"""Latents per data shard: a latent page loads one shard (~0.5-2 MB for 256 latents)."""
ASSETS = ("index.html", "app.js", "style.css")
_PREFIX, _SUFFIX = "HFSAE_DATA(", ");\n"


def write_data(path: Path, kind: str, key, payload: Any) -> None:
    """Write one data file (atomically: a reader never sees half a file)."""
    from hf_sae._io import atomic_write_bytes

    text = (
        _PREFIX + json.dumps([kind, key, payload], separators=(",", ":"), ensure_ascii=False, allow_nan=False) + _SUFFIX
    )
    atomic_write_bytes(Path(path), text.encode("utf-8"))


def read_data(path: Path) -> Any:
    """The payload of a data file written by :func:`write_data`."""
    text = Path(path).read_text(encoding="utf-8")
    if not (text.startswith(_PREFIX) and text.endswith(_SUFFIX)):
        raise ValueError(
            f"{path} is not a feature-browser data file (expected {_PREFIX}...{_SUFFIX.strip()}); "
            "rebuild the site with `hf-sae dashboard`."
        )
    return json.loads(text[len(_PREFIX) : -len(_SUFFIX)])[2]


def shard_name(shard: int) -> str:
    return f"latents_{shard:04d}.js"


def _r(x: float, digits: int = 4) -> Optional[float]:
    if x is None:
        return None
    x = float(x)
    if not math.isfinite(x):
        return None
    return float(f"{x:.{digits}g}")


class _Vocab:
    """Token strings of one shard: contexts refer to indices into ``strings``. ``decoded`` (token id ->
    string) may be shared by the shards of a site, so that each token is decoded once."""

    def __init__(self, tokenizer, decoded: Optional[dict] = None):
        self.tokenizer, self.index, self.strings = tokenizer, {}, []
        self.decoded = {} if decoded is None else decoded

    def __call__(self, tid: int) -> int:
        j = self.index.get(tid)
        if j is None:
            j = self.index[tid] = len(self.strings)
            s = self.decoded.get(tid)
            if s is None:
                s = self.decoded[tid] = self.tokenizer.decode([int(tid)]) if tid >= 0 else ""
            self.strings.append(s)
        return j

    def of(self, ids: Tensor) -> Tensor:
        """The indices (a tensor shaped like ``ids``) of many token ids at once."""
        uniq, inv = torch.unique(ids, return_inverse=True)
        return torch.tensor([self(t) for t in uniq.tolist()], dtype=torch.long)[inv]


def _contexts(
    ids: Tensor, before: int, after: int, pos: Tensor, acts: Tensor, scale: Tensor, vocab: _Vocab
) -> list[dict]:
    """The contexts around global positions ``pos`` [M] (``row * T + col`` into ``ids`` [N, T]), clipped to
    their row: token indices ``t`` (into the shard vocabulary), activations ``v`` as integers 0..100 relative
    to ``scale`` [M] (the latent's max; 0 = none), the centre's index ``c`` in ``t`` and its activation ``a``.
    ``acts`` [M, before + 1 + after] is the latent's activation over each window."""
    if pos.numel() == 0:
        return []
    T = ids.shape[1]
    row, col = pos // T, pos % T
    cols = col.unsqueeze(-1) + torch.arange(-before, after + 1)
    tok = vocab.of(ids.flatten()[row.unsqueeze(-1) * T + cols.clamp(0, T - 1)].long()).tolist()
    a, sc = acts.double(), scale.double().unsqueeze(-1)
    vals = torch.where((a > 0) & (sc > 0), (100 * a / sc).round(), 0).long().tolist()
    lo = (before - col).clamp_min(0).tolist()  # the window's first and last index inside the row
    hi = (before + T - col).clamp_max(before + 1 + after).tolist()
    centre = acts[:, before].tolist()
    return [
        {"a": _r(x, 4), "t": t[i:j], "v": v[i:j], "c": before - i} for x, t, v, i, j in zip(centre, tok, vals, lo, hi)
    ]


def _latent_contexts(st, lats: range, vocab: _Vocab) -> tuple[list, list]:
    """(top contexts, random samples sorted by decreasing activation) of each latent in ``lats``."""
    sl = slice(lats.start, lats.stop)
    out = []
    for pos, act, ctx in (
        (st.top_pos[sl], st.top_act[sl], st.top_ctx[sl]),
        (st.sample_pos[sl], st.sample_act[sl], st.sample_ctx[sl]),
    ):
        order = act.argsort(dim=1, descending=True, stable=True)
        pos, ctx = pos.gather(1, order), ctx[torch.arange(len(lats)).unsqueeze(-1), order]
        has = pos >= 0
        scale = st.act_max[sl].unsqueeze(-1).expand_as(pos)[has]
        flat = _contexts(st.input_ids, st.before, st.after, pos[has], ctx[has].float(), scale, vocab)
        ends = has.sum(1).cumsum(0).tolist()
        out.append([flat[e - c : e] for e, c in zip(ends, has.sum(1).tolist())])
    return out[0], out[1]


def latent_record(st, rows, j: int, vocab: _Vocab, extras: dict, contexts: Optional[tuple] = None) -> dict:
    """The shard entry of latent ``j`` (``extras``: logit effects, neighbours, N2G, by name; ``contexts``:
    its (top, samples) from :func:`_latent_contexts`, computed here when None; ``rows`` is unused, kept for
    callers of the earlier signature)."""
    top, samples = contexts if contexts is not None else (x[0] for x in _latent_contexts(st, range(j, j + 1), vocab))
    count = int(st.count[j])
    rec = {
        "id": j,
        "count": count,
        "density": _r(count / max(st.n_tokens, 1), 5),
        "mean": _r(float(st.act_sum[j]) / max(count, 1)),
        "max": _r(float(st.act_max[j])),
        "hist": st.hist[j].tolist(),
        "top": top,
        "samples": samples,
    }
    for name, fn in extras.items():
        rec[name] = fn(j, vocab)
    return rec


def _peak_tokens(rec: dict, strings: list, m: int = 3) -> list[str]:
    """The m most frequent tokens at which a latent's top activations peak."""
    return [strings[t] for t, _ in Counter(c["t"][c["c"]] for c in rec["top"]).most_common(m)]


def copy_assets(out: Path) -> None:
    src = Path(__file__).resolve().parent / "assets"
    for name in ASSETS:
        if not (src / name).is_file():
            raise FileNotFoundError(f"feature-browser asset {src / name} is missing; reinstall hf_sae (package data).")
        shutil.copyfile(src / name, out / name)


INDEX_COLUMNS = ["id", "density", "mean", "max", "top_tokens", "promoted", "n2g", "n2g_f1"]


def _index_row(r: dict, strings: list) -> list:
    """A latent's row of the index table (:data:`INDEX_COLUMNS`) from its page record."""
    pats = [p.get("text", "") for p in (r["n2g"] or {}).get("patterns", [])]
    promoted = [strings[t] for t, _ in r.get("pos", [])[:3]]
    return [r["id"], r["density"], r["mean"], r["max"], " | ".join(_peak_tokens(r, strings)), " | ".join(promoted),
            " | ".join(pats[:4]), _r((r["n2g"] or {}).get("f1", float("nan")), 3)]


def _write_pool(out: Path, st, vocab) -> None:
    """``data/pool.js``: the pool of random contexts (the negatives of autointerp)."""
    P = st.pool_pos.numel()
    ctxs = _contexts(st.input_ids, st.before, st.after, st.pool_pos, torch.zeros(P, st.width), torch.zeros(P), vocab)
    pool = [{**c, "active": act} for c, act in zip(ctxs, st.pool_active)]
    write_data(out / "data" / "pool.js", "pool", None, {"tok": vocab.strings, "contexts": pool})


def write_site(
    st,
    out,
    tokenizer,
    *,
    meta: dict,
    logits=None,
    near=None,
    n2g: Optional[dict] = None,
    texts: Sequence[dict] = (),
    progress: bool = False,
) -> Path:
    """Write the site for the gathered :class:`~hf_sae.dashboard.collect.FeatureStats` into ``out``.

    Args:
        logits: (top values, top ids, bottom values, bottom ids) from ``logit_effects`` or None.
        near: (cosines, ids) from ``nearest_latents`` or None.
        n2g: {latent: ``N2GExplanation.to_dict(tokenizer, base)``}.
        texts: [{"text", "tokens": [str], "latents": [[[latent, act], ...] per token]}].
    Returns the folder.
    """
    from tqdm.auto import tqdm

    from .collect import HIST_EDGES

    out = Path(out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    copy_assets(out)
    n = st.top_act.shape[0]
    n2g = n2g or {}

    def tok_list(vals, ids, vocab):
        return [[vocab(int(t)), _r(v, 3)] for v, t in zip(vals.tolist(), ids.tolist())]

    extras = {}
    if logits is not None:
        tv, ti, bv, bi = logits
        extras["pos"] = lambda j, vocab: tok_list(tv[j], ti[j], vocab)
        extras["neg"] = lambda j, vocab: tok_list(bv[j], bi[j], vocab)
    if near is not None:
        cv, ci = near
        extras["near"] = lambda j, vocab: [[int(i), _r(c, 3)] for c, i in zip(cv[j].tolist(), ci[j].tolist())]
    extras["n2g"] = lambda j, vocab: n2g.get(j)

    rows, decoded = [], {}
    n_shards = (n + SHARD_SIZE - 1) // SHARD_SIZE
    for shard in tqdm(range(n_shards), desc="site", disable=not progress):
        vocab = _Vocab(tokenizer, decoded)
        lats = range(shard * SHARD_SIZE, min(n, (shard + 1) * SHARD_SIZE))
        recs = [
            latent_record(st, None, j, vocab, extras, contexts=c)
            for j, c in zip(lats, zip(*_latent_contexts(st, lats, vocab)))
        ]
        write_data(out / "data" / shard_name(shard), "shard", shard, {"tok": vocab.strings, "latents": recs})
        rows.extend(_index_row(r, vocab.strings) for r in recs)
    index = {"columns": INDEX_COLUMNS, "rows": rows}
    write_data(out / "data" / "index.js", "index", None, index)
    write_data(out / "data" / "texts.js", "texts", None, list(texts))
    _write_pool(out, st, _Vocab(tokenizer, decoded))
    meta = {
        **meta,
        "n_latents": n,
        "n_tokens": st.n_tokens,
        "shard_size": SHARD_SIZE,
        "n_shards": n_shards,
        "hist_edges": [_r(e, 3) for e in HIST_EDGES.tolist()],
        "context": [st.before, st.after],
        "autointerp": (out / "data" / "autointerp.js").is_file(),
        "n_texts": len(texts),
    }
    write_data(out / "data" / "meta.js", "meta", None, meta)
    return out


def site_size(out) -> int:
    """Bytes of all files under a site folder."""
    return sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file())


def set_meta_flag(out, **flags) -> None:
    """Update fields of a site's ``data/meta.js`` (e.g. ``autointerp=True`` once scores are written)."""
    path = Path(out) / "data" / "meta.js"
    meta = read_data(path)
    meta.update(flags)
    write_data(path, "meta", None, meta)


def is_site(path) -> bool:
    return (Path(path) / "data" / "meta.js").is_file() and (Path(path) / "index.html").is_file()

"""``hf-sae autointerp SITE``: explain latents of a feature-browser site with an LM and score the explanations.

    hf-sae dashboard runs/l6/layers.6.resid_post --out site/        # the contexts come from the site
    hf-sae autointerp site/ --latents 50                           # embedded SmolLM2-135M-Instruct (offline)
    hf-sae autointerp site/ --backend local --model path/to/causal-lm
    hf-sae autointerp site/ --backend openai --api-base http://127.0.0.1:8000/v1 --model NAME   # vLLM, llama.cpp, TGI

Writes ``site/autointerp.json`` (per latent: explanation, detection accuracy / AUROC, fuzzing accuracy /
AUROC, the shuffled-explanation baseline; and their means), ``site/data/autointerp.js`` (the browser shows
the explanations and scores), ``site/autointerp.html`` + ``autointerp.png``; with ``--eval-dir`` also the
eval report's ``metrics.json`` / ``report.html``. Answers are cached in ``site/autointerp_cache.jsonl``
(``--cache``), so an interrupted or repeated run asks the LM only what it has not answered.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from ..cli_args import add_autointerp_args  # noqa: F401  (the arguments, defined without torch)
from .backends import Backend, make_backend
from .explain import (
    accuracy,
    auroc,
    clean_explanation,
    detection_prompt,
    explain_prompt,
    firing_marks,
    fuzzing_prompt,
    wrong_marks,
)

__all__ = ["autointerp_site", "add_autointerp_args", "run_autointerp", "main"]


def _mean(xs) -> float:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else float("nan")


def _finite(x):
    return None if isinstance(x, float) and not math.isfinite(x) else x


class _Site:
    """Read access to a feature-browser site's data files."""

    def __init__(self, path):
        from hf_sae.dashboard.site import is_site, read_data

        self.path = Path(path)
        if not is_site(self.path):
            raise FileNotFoundError(
                f"{self.path} is not a feature-browser site (no index.html + data/meta.js); "
                "build one with `hf-sae dashboard SAE --out DIR` first."
            )
        self.read = read_data
        self.meta = read_data(self.path / "data" / "meta.js")
        self._shards: dict = {}

    def latent(self, j: int) -> tuple[dict, list]:
        from hf_sae.dashboard.site import shard_name

        s = j // self.meta["shard_size"]
        if s not in self._shards:
            self._shards[s] = self.read(self.path / "data" / shard_name(s))
        sh = self._shards[s]
        return sh["latents"][j - s * self.meta["shard_size"]], sh["tok"]

    def pool(self) -> dict:
        return self.read(self.path / "data" / "pool.js")


def _derangement(n: int, rng: random.Random) -> list[int]:
    """A permutation of range(n) with no fixed point (n >= 2): a random shift keeps it uniform enough."""
    shift = rng.randrange(1, n)
    perm = list(range(n))
    rng.shuffle(perm)
    out = [0] * n
    for i in range(n):
        out[perm[i]] = perm[(i + shift) % n]
    return out


def autointerp_site(
    site,
    backend: Backend,
    *,
    latents: Optional[Sequence[int]] = None,
    n_latents: int = 50,
    n_explain: int = 10,
    n_detect: int = 5,
    n_fuzz: int = 5,
    seed: int = 0,
    baseline: bool = True,
    progress: bool = True,
) -> dict:
    """Explain and score latents of the site at ``site`` with ``backend``; write the outputs (module doc).

    Args:
        latents: latent ids (default: ``n_latents`` seeded random latents with >= 3 top contexts and
            >= 2 random samples).
        n_explain: top contexts shown when explaining.
        n_detect: held-out firing contexts and as many silent ones per latent for detection.
        n_fuzz: firing contexts per latent for fuzzing (each with correct and with wrong marks).
        baseline: also score detection with shuffled explanations.
    Returns the results dict (also written to ``site/autointerp.json``).
    """
    from hf_sae.dashboard.site import set_meta_flag, write_data

    t0 = time.perf_counter()
    site = _Site(site)
    n_total = site.meta["n_latents"]
    if min(n_explain, n_detect) < 1 or n_fuzz < 0:
        raise ValueError("n_explain and n_detect must be >= 1 and n_fuzz >= 0.")
    rng = random.Random(seed)
    if latents is None:
        order = list(range(n_total))
        rng.shuffle(order)
        chosen = []
        for j in order:
            rec, _ = site.latent(j)
            if len(rec["top"]) >= min(3, n_explain) and len(rec["samples"]) >= 2:
                chosen.append(j)
            if len(chosen) == n_latents:
                break
        chosen.sort()
    else:
        bad = [j for j in latents if not 0 <= int(j) < n_total]
        if bad:
            raise ValueError(f"latents {bad} do not exist: the site has latents 0..{n_total - 1}.")
        chosen = sorted(int(j) for j in latents)
    if len(chosen) < (2 if baseline else 1):
        raise ValueError(
            f"only {len(chosen)} latents of the site fire often enough to be explained; "
            "build the site over more tokens (--n-tokens) or pass --no-baseline."
        )
    pool = site.pool()

    # ------------------------------------------------------------------ explanations
    items = []
    for j in chosen:
        rec, tok = site.latent(j)
        shown = rec["top"][:n_explain]
        shown_keys = {tuple(c["t"]) for c in shown}
        held = [c for c in rec["samples"] if tuple(c["t"]) not in shown_keys]
        pos = held[:n_detect]
        silent = [c for c in pool["contexts"] if j not in c["active"]]
        neg = rng.sample(silent, min(len(silent), len(pos)))
        items.append(
            {
                "latent": j,
                "tok": tok,
                "shown": shown,
                "pos": pos,
                "neg": neg,
                "fuzz": (held + rec["top"][n_explain:])[:n_fuzz] if n_fuzz else [],
            }
        )
    t = time.perf_counter()
    if progress:
        print(f"[hf-sae autointerp] explaining {len(items)} latents with {backend.name}", flush=True)
    answers = backend.generate([explain_prompt(it["shown"], it["tok"]) for it in items], max_tokens=32)
    for it, a in zip(items, answers):
        it["raw"] = a
        it["explanation"] = clean_explanation(a) or "(no explanation)"
    t_explain = time.perf_counter() - t

    # ------------------------------------------------------------------ detection (+ shuffled baseline) and fuzzing
    def detection(expl_of):
        chats, owner, labels = [], [], []
        for i, it in enumerate(items):
            for c, y, tk in [(c, 1, it["tok"]) for c in it["pos"]] + [(c, 0, pool["tok"]) for c in it["neg"]]:
                chats.append(detection_prompt(expl_of(i), c, tk))
                owner.append(i)
                labels.append(y)
        return owner, labels, backend.yes_probability(chats)

    t = time.perf_counter()
    if progress:
        print(
            f"[hf-sae autointerp] detection: {sum(len(it['pos']) + len(it['neg']) for it in items)} prompts", flush=True
        )
    owner, labels, scores = detection(lambda i: items[i]["explanation"])
    base = None
    if baseline:
        perm = _derangement(len(items), rng)
        base = detection(lambda i: items[perm[i]]["explanation"])
    fz_owner, fz_labels, fz_chats = [], [], []
    for i, it in enumerate(items):
        for c in it["fuzz"]:
            for marks, y in ((firing_marks(c), 1), (wrong_marks(c, rng), 0)):
                fz_chats.append(fuzzing_prompt(it["explanation"], c, it["tok"], marks))
                fz_owner.append(i)
                fz_labels.append(y)
    fz_scores = backend.yes_probability(fz_chats) if fz_chats else []
    t_score = time.perf_counter() - t

    def per_item(i, own, lab, sc):
        s = [x for o, x in zip(own, sc) if o == i]
        y = [x for o, x in zip(own, lab) if o == i]
        return accuracy(s, y), auroc(s, y)

    out_latents = {}
    for i, it in enumerate(items):
        da, dr = per_item(i, owner, labels, scores)
        fa, fr = per_item(i, fz_owner, fz_labels, fz_scores)
        r = {
            "explanation": it["explanation"],
            "raw_answer": it["raw"],
            "detection_accuracy": da,
            "detection_auroc": dr,
            "fuzzing_accuracy": fa,
            "fuzzing_auroc": fr,
            "n_detect": len(it["pos"]) + len(it["neg"]),
            "n_fuzz": 2 * len(it["fuzz"]),
        }
        if base is not None:
            ba, br = per_item(i, *base)
            r.update(
                baseline_explanation=items[perm[i]]["explanation"],
                baseline_detection_accuracy=ba,
                baseline_detection_auroc=br,
            )
        out_latents[str(it["latent"])] = {k: _finite(v) for k, v in r.items()}
    summary = {
        "n_latents": len(items),
        "detection_accuracy": accuracy(scores, labels),
        "detection_auroc": auroc(scores, labels),
        "mean_latent_detection_accuracy": _mean([r["detection_accuracy"] for r in out_latents.values()]),
        "mean_latent_detection_auroc": _mean([r["detection_auroc"] for r in out_latents.values()]),
        "fuzzing_accuracy": accuracy(fz_scores, fz_labels),
        "fuzzing_auroc": auroc(fz_scores, fz_labels),
    }
    if base is not None:
        summary.update(
            baseline_detection_accuracy=accuracy(base[2], base[1]), baseline_detection_auroc=auroc(base[2], base[1])
        )
    cache = getattr(backend, "hits", None)
    results = {
        "backend": backend.name,
        "site": str(site.path),
        "hook_point": site.meta.get("hook_point"),
        "settings": {"n_explain": n_explain, "n_detect": n_detect, "n_fuzz": n_fuzz, "seed": seed},
        "summary": {k: _finite(v) for k, v in summary.items()},
        "latents": out_latents,
        "timings_s": {
            "explain": round(t_explain, 2),
            "score": round(t_score, 2),
            "total": round(time.perf_counter() - t0, 2),
        },
        "cache": {"hits": backend.hits, "misses": backend.misses} if cache is not None else None,
    }
    (site.path / "autointerp.json").write_text(json.dumps(results, indent=1))
    write_data(
        site.path / "data" / "autointerp.js",
        "autointerp",
        None,
        {"backend": backend.name, "summary": results["summary"], "latents": out_latents},
    )
    set_meta_flag(site.path, autointerp=True)
    from .report import write_autointerp_report

    write_autointerp_report(results, site.path)
    return results


def add_eval_section(results: dict, eval_dir) -> Path:
    """Add the autointerp summary to an ``hf-sae eval`` folder's ``metrics.json`` and re-render its report."""
    from hf_sae.evaluation.report import write_report

    path = Path(eval_dir) / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass the --out folder of an `hf-sae eval` run.")
    metrics = json.loads(path.read_text())
    metrics["autointerp"] = {
        "summary": results["summary"],
        "backend": results["backend"],
        "latents": results["latents"],
    }
    for k, v in results["summary"].items():
        if k != "n_latents":
            metrics.setdefault("summary", {})[f"autointerp_{k}"] = v
    path.write_text(json.dumps(metrics, indent=1))
    write_report(metrics, eval_dir)
    return Path(eval_dir) / "report.html"


def run_autointerp(args: argparse.Namespace) -> int:
    from hf_sae.dashboard.site import is_site

    if not is_site(args.site):  # before loading any model
        raise FileNotFoundError(
            f"{args.site} is not a feature-browser site (no index.html + data/meta.js); "
            "build one with `hf-sae dashboard SAE --out DIR` first."
        )
    if args.eval_dir and not (Path(args.eval_dir) / "metrics.json").is_file():
        raise FileNotFoundError(f"--eval-dir {args.eval_dir} has no metrics.json; pass an `hf-sae eval --out` folder.")
    cache = None if args.cache == "none" else (args.cache or str(Path(args.site) / "autointerp_cache.jsonl"))
    backend = make_backend(
        args.backend,
        model=args.model,
        api_base=args.api_base,
        api_key=os.environ.get(args.api_key_env) if args.api_key_env else None,
        cache=cache,
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        device=args.device,
    )
    res = autointerp_site(
        args.site,
        backend,
        latents=args.latent_ids,
        n_latents=args.latents,
        n_explain=args.n_explain,
        n_detect=args.n_detect,
        n_fuzz=args.n_fuzz,
        seed=args.seed,
        baseline=not args.no_baseline,
        progress=not args.no_progress,
    )
    s = res["summary"]

    def f(k):
        v = s.get(k)
        return "n/a" if v is None else f"{v:.3f}"

    print(
        f"[hf-sae autointerp] {s['n_latents']} latents with {res['backend']}: detection accuracy "
        f"{f('detection_accuracy')} (AUROC {f('detection_auroc')}) vs shuffled explanations "
        f"{f('baseline_detection_accuracy')} (AUROC {f('baseline_detection_auroc')}); fuzzing accuracy "
        f"{f('fuzzing_accuracy')} (AUROC {f('fuzzing_auroc')}); {res['timings_s']['total']:.0f} s; "
        f"wrote {Path(args.site) / 'autointerp.json'} and {Path(args.site) / 'autointerp.html'}"
    )
    if args.eval_dir:
        print(f"[hf-sae autointerp] added to {add_eval_section(res, args.eval_dir)}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-sae autointerp", description=__doc__.split("\n\n")[0])
    return run_autointerp(add_autointerp_args(parser).parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

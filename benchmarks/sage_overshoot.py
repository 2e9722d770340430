"""Why does the supervised IOI reconstruction overshoot (sufficiency ~1.2 at the END residual stream)?

Measures, on SmolLM2-135M and the IOI task (``hf_sae.evaluation.sage``), at given locations, the
sufficiency / necessity of the supervised reconstruction fitted by conditional means (the SAGE
formula) and by regression (no IO/S cross terms, ``SupervisedDictionary.fit(method="regression")``),
each also rescaled per prompt to the norm of the true activation (a supervised reconstruction has no
prompt-specific variance, so a smaller norm, and the next block's RMSNorm divides by it).
See :func:`hf_sae.evaluation.sage.validation.supervised_fit_comparison`.

Usage::

    python benchmarks/sage_overshoot.py --n-fit 96 --n-eval 64 --out sage_overshoot.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LOCATIONS = ("layers.25.resid_pre@END", "layers.29.resid_pre@END", "layers.23.attn_z.h3@END")
"""The IOI END locations where RESULTS_sage.md measured the overshoot (1.21, 1.20) and a head (0.98)."""


def parse_and_load(p: argparse.ArgumentParser, argv, out: str):
    """Add the options both SAGE validation scripts share (prompt split, batch, threads, output), parse,
    set the torch threads and load SmolLM2. Returns (namespace, model, tokenizer)."""
    from hf_sae.data.models import load_default_model

    p.add_argument("--n-fit", type=int, default=96, help="fitting prompts (the SAGE run's split)")
    p.add_argument("--n-eval", type=int, default=64, help="held-out prompts measured")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    p.add_argument("--out", default=out, help="JSON output")
    ns = p.parse_args(argv)
    torch.set_num_threads(ns.threads if ns.threads > 0 else (os.cpu_count() or 1))
    return ns, *load_default_model()


def main(argv=None) -> dict:
    from hf_sae.evaluation.sage import make_task
    from hf_sae.evaluation.sage.validation import supervised_fit_comparison

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="ioi")
    p.add_argument("--locations", nargs="+", default=list(LOCATIONS))
    p.add_argument("--seed", type=int, default=0)
    ns, model, tok = parse_and_load(p, argv, "sage_overshoot.json")
    t0 = time.perf_counter()
    task = make_task(ns.task, tok, n_prompts=ns.n_fit + ns.n_eval, seed=ns.seed)
    fit, ev = task.split(ns.n_fit)
    with torch.no_grad():
        res = supervised_fit_comparison(model, fit, ev, ns.locations, batch_size=ns.batch_size)
    out = {"config": vars(ns), "results": res, "seconds": time.perf_counter() - t0}
    Path(ns.out).write_text(json.dumps(out, indent=1))
    print("| location | suff. (cond. means) | nec. | suff. (regression) | nec. | suff. (cond. means, norm-matched) | "
          "suff. (regression, norm-matched) | mean ||â||/||a|| (cond. means) |")
    print("|---|---|---|---|---|---|---|---|")
    for key, r in res.items():
        print(f"| {key} | {r['mean']['sufficiency']:.3f} | {r['mean']['necessity']:.3f} | "
              f"{r['regression']['sufficiency']:.3f} | {r['regression']['necessity']:.3f} | "
              f"{r['mean_norm_matched']['sufficiency']:.3f} | {r['regression_norm_matched']['sufficiency']:.3f} | "
              f"{r['norm_ratio_mean']:.3f} |")
    print(f"({out['seconds']:.0f} s)")
    return out


if __name__ == "__main__":
    main()

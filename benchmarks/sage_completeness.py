"""Cross-section completeness on SmolLM2-135M: patch every location of a SAGE cross-section at once
with each attribute's corrupted values and compare with the full clean -> corrupted LD change
(:func:`hf_sae.evaluation.sage.validation.cross_section_completeness`).

The default locations are the cross-sections recorded in ``benchmarks/RESULTS_sage.md`` §2 (found by
attribution patching, confirmed by activation patching); ``hf-sae sage`` reports the same check for
the cross-section it selects.

Usage::

    python benchmarks/sage_completeness.py --tasks ioi gender --n-fit 96 --n-eval 64
    python benchmarks/sage_completeness.py --drop-kinds resid_pre   # heads and MLPs only
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CROSS_SECTIONS = {
    "ioi": ["layers.29.resid_pre@END", "layers.25.resid_pre@END", "layers.23.attn_z.h3@END",
            "layers.29.attn_z.h1@END", "layers.29.attn_z.h0@END", "layers.24.attn_z.h4@END",
            "layers.0.mlp_out@IO", "layers.0.mlp_out@S1"],
    "gender": ["layers.25.resid_pre@NAME", "layers.27.resid_pre@END", "layers.29.resid_pre@END",
               "layers.26.attn_z.h2@END", "layers.25.attn_z.h2@END", "layers.24.mlp_out@NAME",
               "layers.29.mlp_out@END"],
}


def main(argv=None) -> dict:
    from sage_overshoot import parse_and_load

    from hf_sae.evaluation.sage import make_task
    from hf_sae.evaluation.sage.patching import Location
    from hf_sae.evaluation.sage.validation import cross_section_completeness

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=["ioi", "gender"], choices=sorted(CROSS_SECTIONS))
    p.add_argument("--tolerance", type=float, default=0.1)
    p.add_argument("--drop-kinds", nargs="*", default=[], metavar="KIND",
                   help="leave out the locations of these kinds (e.g. resid_pre: only heads and MLPs remain)")
    t0 = time.perf_counter()
    ns, model, tok = parse_and_load(p, argv, "sage_completeness.json")
    out = {"config": vars(ns), "tasks": {}}
    print("| task | locations | attribute | LD clean | LD corrupted | LD all patched | fraction | complete |")
    print("|---|---|---|---|---|---|---|---|")
    for name in ns.tasks:
        _, ev = make_task(name, tok, n_prompts=ns.n_fit + ns.n_eval, seed=0).split(ns.n_fit)
        locs = [key for key in CROSS_SECTIONS[name] if Location.parse(key).kind not in ns.drop_kinds]
        with torch.no_grad():
            r = cross_section_completeness(model, ev, locs, tolerance=ns.tolerance,
                                           batch_size=ns.batch_size)
        out["tasks"][name] = r
        for a, v in r["attributes"].items():
            verdict = "n/a (small effect)" if v["complete"] is None else ("yes" if v["complete"] else "**no**")
            print(f"| {name} | {len(r['locations'])} | {a} | {v['ld_clean']:.3f} | {v['ld_corrupted']:.3f} | "
                  f"{v['ld_patched_all']:.3f} | {v['fraction']:.3f} | {verdict} |", flush=True)
    out["seconds"] = time.perf_counter() - t0
    Path(ns.out).write_text(json.dumps(out, indent=1))
    print(f"({out['seconds']:.0f} s)")
    return out


if __name__ == "__main__":
    main()

"""The SAGE pipeline end to end, and the ``hf-sae sage`` command (``add_sage_args`` / ``run_sage``).

Per task:

1. build the task (``n_fit + n_eval`` prompts; the first ``n_fit`` fit dictionaries and choose
   probe thresholds, the rest are held out for every reported LD and accuracy);
2. report the model's clean LD and the LD of every corrupted counterpart;
3. cross-sections: attribution patching over residual / head / MLP locations at every task
   position (on ``n_attribution`` fitting prompts), keep the top locations of each node kind and
   confirm them with real activation patching;
4. supervised dictionaries at those locations, and the sufficiency/necessity of the supervised
   reconstruction;
5. for each SAE: evaluate it at the locations it covers: its own residual stream at every task
   position (direct) and the ``n_sublayer`` best-scoring sublayer locations of the block its
   stream feeds (recomputed from the reconstruction), see :mod:`.evaluate_sae`.

Example::

    hf-sae sage --sae runs/sae-l12 --tasks ioi gender --out sage_out
    python -m hf_sae.evaluation.sage.run --fresh-sae layers.12.resid_pre --tasks ioi
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from ...cli_args import add_sage_args  # noqa: F401  (the arguments, defined without torch)
from ...hooks import model_parts, parse_hook_point
from .attribution import NODE_KINDS, AttributionResult, activation_patching, attribution_patching, enumerate_locations
from .dictionaries import SupervisedDictionary, fit_dictionaries
from .evaluate_sae import (
    evaluate_sae,
    mean_ablation_logit_diff,
    reconstruction_fidelity,
    residual_stream_index,
    sufficiency_necessity,
)
from .patching import Location, PrefixCache, location_activations, logit_diff, mean_logit_diff
from .report import write_report
from .tasks import TASKS, Task, make_task
from .validation import cross_section_completeness

__all__ = ["add_sage_args", "run_sage", "run_sage_pipeline", "run_task", "attribution_grid"]


def attribution_grid(model: nn.Module, task: Task, attr: AttributionResult) -> dict:
    """Scores arranged for a heatmap: rows = layers, columns = ``resid@P``, ``heads@P`` (the head
    with the largest |score|, signed), ``mlp@P`` for each task position P."""
    parts = model_parts(model)
    cols = []
    for p in task.position_names:
        cols += [f"resid@{p}", f"heads@{p}", f"mlp@{p}"]
    grid = {}
    for a, scores in attr.scores.items():
        m = [[0.0] * len(cols) for _ in range(parts.n_layers)]
        for loc in attr.locations:
            kind = {"resid_pre": "resid", "attn_z": "heads", "mlp_out": "mlp"}.get(parse_hook_point(loc.hook)[1])
            if kind is None:
                continue
            c = cols.index(f"{kind}@{loc.position}")
            v = scores[loc.key]
            if abs(v) > abs(m[loc.layer][c]):
                m[loc.layer][c] = v
        grid[a] = m
    return {"columns": cols, "n_layers": parts.n_layers, "scores": grid}


def _sublayer_candidates(attr: AttributionResult, block: int, n: int) -> list[Location]:
    comb = attr.combined()
    cands = [l for l in attr.locations if l.layer == block and parse_hook_point(l.hook)[1] in ("attn_z", "mlp_out")]
    return sorted(cands, key=lambda l: -comb[l.key])[:n]


def _supervised_scores(model, task, fit, ev, top: list, ld_clean: float, batch_size: int, cache) -> tuple:
    """Supervised dictionaries at the cross-section ``top``, fitted on ``fit`` and scored on held-out ``ev``:
    ``(dictionaries, {location: sufficiency, necessity, fidelity, "regression": the same for the regression fit})``."""
    acts_fit = location_activations(model, fit.clean, top, batch_size=batch_size)
    dicts = fit_dictionaries(acts_fit, fit.clean.attributes, nested=task.nested)
    acts_ev = location_activations(model, ev.clean, top, batch_size=batch_size)
    scores = {}
    for loc in top:
        a = acts_ev[loc.key]
        ld_ablate = mean_ablation_logit_diff(model, ev.clean, loc, a, batch_size, cache)
        rec = dicts[loc.key].reconstruct(ev.clean.attributes)
        sn = sufficiency_necessity(model, ev.clean, loc, a, rec, ld_clean, ld_ablate, batch_size, cache)
        reg = SupervisedDictionary.fit(acts_fit[loc.key], fit.clean.attributes, loc.key, nested=task.nested,
                                       method="regression").reconstruct(ev.clean.attributes)
        sn_reg = sufficiency_necessity(model, ev.clean, loc, a, reg, ld_clean, ld_ablate, batch_size, cache)
        scores[loc.key] = {"ld_mean_ablation": ld_ablate, "denominator": ld_clean - ld_ablate,
                           **sn, **reconstruction_fidelity(a, rec),
                           "regression": {**sn_reg, **reconstruction_fidelity(a, reg)}}
    return dicts, scores


def run_task(
    model: nn.Module,
    tokenizer,
    task_name: str,
    saes: Mapping[str, object] | None = None,
    n_fit: int = 96,
    n_eval: int = 64,
    n_attribution: int = 32,
    kinds: Sequence[str] = NODE_KINDS,
    top_per_kind: Mapping[str, int] | None = None,
    n_confirm: int | None = None,
    n_sublayer: int = 4,
    edit_steps: Sequence[int] = (1, 2, 4, 8, 16),
    n_control: int | None = 32,
    control: bool = True,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Run the SAGE pipeline for one task; returns a JSON-able dict (see the module docstring).

    Keys: ``task``, ``description``, ``n_fit``, ``n_eval``, ``ld_clean`` (mean clean LD on the eval
    prompts, logits), ``ld_clean_std``, ``ld_clean_positive_fraction``, ``corrupted`` ({attr:
    {ld_clean_metric, ld_own}}), ``attribution`` (top scores), ``attribution_grid``,
    ``cross_section`` (the kept locations), ``patching`` (activation patching of the kept
    locations), ``attribution_scores_of_confirmed``, ``supervised`` ({location: sufficiency,
    necessity, fidelity}), ``saes`` ({name: :func:`evaluate_sae` result}), ``seconds``.
    """
    t0 = time.time()
    top_per_kind = dict(top_per_kind or {"resid": 4, "head": 4, "mlp": 2})
    task = make_task(task_name, tokenizer, n_prompts=n_fit + n_eval, seed=seed)
    fit, ev = task.split(n_fit)
    out: dict = {"task": task_name, "description": task.description, "n_fit": n_fit, "n_eval": n_eval,
                 "attributes": list(task.attribute_names), "positions": list(task.position_names),
                 "example_prompts": {"clean": ev.clean.prompts[:3],
                                     **{a: ev.corrupted[a].prompts[:3] for a in task.attribute_names}}}
    with torch.no_grad():
        ld = logit_diff(model, ev.clean, batch_size=batch_size)
    out.update(ld_clean=float(ld.mean()), ld_clean_std=float(ld.std()) if len(ld) > 1 else 0.0,
               ld_clean_positive_fraction=float((ld > 0).float().mean()))
    out["corrupted"] = {a: {
        "ld_clean_metric": mean_logit_diff(model, ev.corrupted[a].as_counterfactual_of(ev.clean), batch_size),
        "ld_own": mean_logit_diff(model, ev.corrupted[a], batch_size),
    } for a in task.attribute_names}
    # Cross-sections: attribution patching on fitting prompts, confirmation on held-out ones.
    locations = enumerate_locations(model, task, kinds=kinds)
    attr = attribution_patching(model, fit.select(range(min(n_attribution, n_fit))), locations,
                                batch_size=batch_size, progress=progress)
    out["attribution"] = attr.to_dict(top_k=30)
    out["attribution_grid"] = attribution_grid(model, task, attr)
    top: list[Location] = []
    for kind, k in top_per_kind.items():
        if kind in kinds and k > 0:
            top += attr.top(k, [kind])
    out["cross_section"] = [l.key for l in top]
    confirm = top if n_confirm is None else top[:n_confirm]
    cache = PrefixCache(model, ev.clean, batch_size)
    ld_corr = {a: v["ld_clean_metric"] for a, v in out["corrupted"].items()}
    out["patching"] = activation_patching(model, ev, confirm, ld_clean=out["ld_clean"], ld_corrupted=ld_corr,
                                          batch_size=batch_size, progress=progress, cache=cache)
    out["attribution_scores_of_confirmed"] = {a: {l.key: attr.scores[a][l.key] for l in confirm}
                                              for a in task.attribute_names}

    # Is the cross-section complete: does patching all of it reproduce the full clean -> corrupted change?
    out["completeness"] = cross_section_completeness(model, ev, top, batch_size=batch_size, cache=cache)
    dicts, out["supervised"] = _supervised_scores(model, task, fit, ev, top, out["ld_clean"], batch_size, cache)
    out["saes"] = {}
    for name, sae in (saes or {}).items():
        hook = sae.config.hook_point
        locs = [Location(hook, p) for p in task.position_names]
        j = residual_stream_index(hook)
        if j is not None and j < model_parts(model).n_layers:
            locs += _sublayer_candidates(attr, j, n_sublayer)
        out["saes"][name] = evaluate_sae(
            model, sae, fit, ev, locs, dictionaries=dicts, edit_steps=edit_steps, n_control=n_control,
            control=control, batch_size=batch_size, progress=progress, cache=cache,
        )
    out["seconds"] = time.time() - t0
    return out


def run_sage_pipeline(model: nn.Module, tokenizer, tasks: Sequence[str] = ("ioi", "gender"),
                      saes: Mapping[str, object] | None = None, model_name: str = "", **kwargs) -> dict:
    """Run :func:`run_task` for each task; returns ``{"model", "settings", "tasks": {name: result}}``."""
    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"unknown SAGE task {t!r}; available: {sorted(TASKS)}")
    settings = {k: (list(v) if isinstance(v, (tuple, list)) else v) for k, v in kwargs.items()}
    settings["saes"] = {n: getattr(s.config, "hook_point", None) for n, s in (saes or {}).items()}
    return {"model": model_name, "settings": settings,
            "tasks": {t: run_task(model, tokenizer, t, saes=saes, **kwargs) for t in tasks}}


# --------------------------------------------------------------------------- CLI


def _load_saes(paths: Sequence[str], fresh: Sequence[str], model: nn.Module, device) -> dict:
    from ... import SAEConfig, SparseAutoencoder

    saes = {}
    for p in paths:
        path, _, sub = str(p).partition("::")
        if not Path(path).expanduser().exists() and path.startswith((".", "/", "~")):
            raise FileNotFoundError(f"SAE folder {path} does not exist")
        sae = SparseAutoencoder.from_pretrained(path, subfolder=sub) if sub else SparseAutoencoder.from_pretrained(path)
        if not sae.config.hook_point:
            raise ValueError(f"SAE {p} has no config.hook_point; SAGE needs to know where it reads activations")
        saes[Path(path).name + (f"/{sub}" if sub else "")] = sae.to(device).eval()
    d_model = model_parts(model).d_model
    for hook in fresh:
        parse_hook_point(hook)
        torch.manual_seed(0)
        cfg = SAEConfig(d_in=d_model, expansion_factor=8, activation="topk", k=32, hook_point=hook)
        saes[f"fresh@{hook}"] = SparseAutoencoder(cfg).to(device).eval()
    return saes


def run_sage(args: argparse.Namespace) -> dict:
    """Entry point of ``hf-sae sage``: load the model and SAEs, run, write the report; returns the paths."""
    from ...data.models import load_model

    model, tokenizer = load_model(args.model, device=args.device)
    saes = _load_saes(args.sae, args.fresh_sae, model, args.device)
    result = run_sage_pipeline(
        model,
        tokenizer,
        tasks=args.tasks,
        saes=saes,
        model_name=str(args.model),
        n_fit=args.n_fit,
        n_eval=args.n_eval,
        n_attribution=args.n_attribution,
        kinds=args.kinds,
        top_per_kind={"resid": args.top_resid, "head": args.top_head, "mlp": args.top_mlp},
        n_confirm=args.n_confirm,
        n_sublayer=args.n_sublayer,
        edit_steps=args.edit_steps,
        n_control=args.n_control,
        control=not args.no_control,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=not args.no_progress,
    )
    paths = write_report(result, args.out)
    for name, t in result["tasks"].items():
        print(
            f"[sage] {name}: clean LD {t['ld_clean']:.3f} (eval n={t['n_eval']}, "
            f"{100 * t['ld_clean_positive_fraction']:.0f}% > 0); cross-section {t['cross_section']}"
        )
        c = t["completeness"]
        fr = ", ".join(f"{a} {v['fraction']:.3f}" for a, v in c["attributes"].items())
        print(
            f"[sage] {name}: cross-section {'complete' if c['complete'] else 'NOT complete'} "
            f"(all locations patched / full corruption: {fr}; tolerance {c['tolerance']})"
        )
    print(f"[sage] report: {paths['html']}  json: {paths['json']}")
    return paths


def main(argv: Sequence[str] | None = None) -> dict:
    """``python -m hf_sae.evaluation.sage.run ...``"""
    parser = add_sage_args(argparse.ArgumentParser(prog="hf-sae sage", description=__doc__.split("\n\n")[0]))
    return run_sage(parser.parse_args(argv))


if __name__ == "__main__":
    main()

"""Checks of SAGE's own assumptions: cross-section completeness, the sublayer method against SAEs
trained at the sublayer, and the supervised-dictionary fit (the IOI sufficiency overshoot).

- :func:`cross_section_completeness`: patch *all* chosen locations at once with the corrupted
  prompt's values; the cross-section is complete for an attribute when that reproduces the full
  clean-to-corrupted change of the logit difference within ``tolerance``::

      fraction = (LD[clean with every location patched] - LD_clean) / (LD_corrupted - LD_clean)
      complete  <=>  |fraction - 1| <= tolerance

  (attributes whose full change |LD_corrupted - LD_clean| is below ``min_effect`` logits are
  reported with ``complete = None``: their fraction is a ratio of tiny numbers.)
- :func:`compare_sublayer_methods`: at each sublayer location (``attn_out`` / ``mlp_out`` of the
  block a residual SAE feeds), the residual SAE applied by SAGE's sublayer method (recompute the
  sublayer from the reconstructed residual stream, :func:`~.evaluate_sae.recompute_sublayers`) beside
  an SAE trained at that sublayer applied directly, with the supervised dictionary as reference.
- :func:`supervised_fit_comparison`: sufficiency / necessity of the conditional-mean dictionary
  against the regression dictionary (:mod:`.dictionaries`) at the same locations; with IO != S the
  conditional means carry cross terms, the regression fit does not. Each is also measured with its
  reconstruction rescaled per prompt to the norm of the true activation (``*_norm_matched``):
  a supervised reconstruction lacks the prompt-specific variance, so its norm is smaller, and a
  downstream RMSNorm divides by that norm -- scaling the task directions up.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn

from .dictionaries import SupervisedDictionary
from .evaluate_sae import classify_location, evaluate_sae, sufficiency_necessity
from .patching import Location, PrefixCache, location_activations, mean_logit_diff, patched_logit_diff
from .tasks import Task

__all__ = ["cross_section_completeness", "compare_sublayer_methods", "supervised_fit_comparison"]


def _locs(locations) -> list[Location]:
    return [l if isinstance(l, Location) else Location.parse(l) for l in locations]


def cross_section_completeness(model: nn.Module, task: Task, locations: Sequence[Location | str],
                               attributes: Sequence[str] | None = None, tolerance: float = 0.1,
                               min_effect: float = 0.5, batch_size: int = 64,
                               cache: PrefixCache | None = None) -> dict:
    """Patch every location at once with each attribute's corrupted values (see the module docstring).

    Returns ``{"tolerance", "locations": [keys], "attributes": {attr: {"ld_clean", "ld_corrupted",
    "ld_patched_all", "fraction", "complete"}}, "complete": bool}`` -- the last is True when every
    attribute with a full effect >= ``min_effect`` is complete.
    """
    locs = _locs(locations)
    if not locs:
        raise ValueError("cross_section_completeness: give at least one location")
    attributes = list(task.attribute_names) if attributes is None else list(attributes)
    cache = cache if cache is not None else PrefixCache(model, task.clean, batch_size)
    ld_clean = mean_logit_diff(model, task.clean, batch_size=batch_size, cache=cache)
    out = {"tolerance": tolerance, "min_effect": min_effect, "locations": [l.key for l in locs], "attributes": {}}
    verdicts = []
    for attr in attributes:
        cf = task.corrupted[attr].as_counterfactual_of(task.clean)
        ld_cf = mean_logit_diff(model, cf, batch_size=batch_size)
        acts = location_activations(model, cf, locs, batch_size=batch_size)
        ld_all = patched_logit_diff(model, task.clean, {l: acts[l.key] for l in locs}, batch_size=batch_size,
                                    cache=cache)
        full = ld_cf - ld_clean
        frac = (ld_all - ld_clean) / full if abs(full) > 1e-6 else float("nan")
        complete = None if abs(full) < min_effect else bool(abs(frac - 1.0) <= tolerance)
        if complete is not None:
            verdicts.append(complete)
        out["attributes"][attr] = {"ld_clean": ld_clean, "ld_corrupted": ld_cf, "ld_patched_all": ld_all,
                                   "fraction": frac, "complete": complete}
    out["complete"] = bool(verdicts) and all(verdicts)
    return out


def compare_sublayer_methods(model: nn.Module, residual_sae, sublayer_saes: Mapping[str, object], fit_task: Task,
                             eval_task: Task, locations: Sequence[Location | str], batch_size: int = 64,
                             progress: bool = False, **evaluate_kw) -> dict:
    """Residual SAE by recomputation vs an SAE trained at the sublayer, at the same locations.

    Args:
        residual_sae: an SAE at a residual hook point (``layers.j.resid_pre`` / ``layers.(j-1).resid_post``).
        sublayer_saes: ``{hook point: SAE}`` trained at ``layers.j.attn_out`` / ``layers.j.mlp_out``
            (each SAE's ``config.hook_point`` must equal its key).
        locations: candidates; a location is compared when the residual SAE covers it as ``"sublayer"``
            and one of ``sublayer_saes`` covers it ``"direct"``.
        evaluate_kw: passed to :func:`~.evaluate_sae.evaluate_sae` (``edit_steps``, ``n_control``, ...).
    Returns ``{"locations": {key: {"supervised": {...}, "residual_recomputed": {...}, "sublayer_sae": {...},
    "sublayer_sae_control": {...} | None}}, "skipped": [keys]}``; each block holds ``sufficiency``,
    ``necessity``, ``fvu``, ``cosine`` (and ``ld``) as in :func:`~.evaluate_sae.evaluate_sae`.
    """
    for hook, sae in sublayer_saes.items():
        if getattr(sae.config, "hook_point", None) != hook:
            raise ValueError(f"compare_sublayer_methods: the SAE given for {hook!r} has hook_point "
                             f"{getattr(sae.config, 'hook_point', None)!r}; set config.hook_point to {hook!r}")
    res_hook = residual_sae.config.hook_point
    pairs, skipped = [], []
    for loc in _locs(locations):
        owner = sublayer_saes.get(loc.hook) if loc.head is None else None
        if owner is not None and classify_location(res_hook, loc) == "sublayer":
            pairs.append((loc, owner))
        else:
            skipped.append(loc.key)
    out = {"residual_hook": res_hook, "locations": {}, "skipped": skipped}
    if not pairs:
        return out
    control = evaluate_kw.pop("control", True)
    cache = PrefixCache(model, eval_task.clean, batch_size)
    kw = dict(batch_size=batch_size, progress=progress, cache=cache, **evaluate_kw)
    res = evaluate_sae(model, residual_sae, fit_task, eval_task, [l for l, _ in pairs], control=False, **kw)
    dicts = {k: SupervisedDictionary.fit(location_activations(model, fit_task.clean, [Location.parse(k)],
                                                               batch_size=batch_size)[k],
                                          fit_task.clean.attributes, k, nested=fit_task.nested)
             for k in res["locations"]}
    for loc, sae in pairs:
        direct = evaluate_sae(model, sae, fit_task, eval_task, [loc], dictionaries={loc.key: dicts[loc.key]},
                              control=control, **kw)
        r, d = res["locations"][loc.key], direct["locations"][loc.key]
        pick = ("ld", "sufficiency", "necessity", "fvu", "cosine")
        out["locations"][loc.key] = {
            "denominator": r["denominator"],
            "supervised": {k: r["supervised"][k] for k in pick},
            "residual_recomputed": {k: r["sae"][k] for k in pick},
            "sublayer_sae": {k: d["sae"][k] for k in pick},
            "sublayer_sae_control": d.get("control"),
        }
    return out


def supervised_fit_comparison(model: nn.Module, fit_task: Task, eval_task: Task, locations: Sequence[Location | str],
                              batch_size: int = 64) -> dict:
    """Sufficiency / necessity of the ``mean`` and ``regression`` supervised dictionaries (fit on
    ``fit_task``, measured on ``eval_task``) at each location, and the sufficiency of each with its
    reconstruction rescaled per prompt to ||a|| (``mean_norm_matched``, ``regression_norm_matched``):
    ``{key: {"mean": {...}, "regression": {...}, "mean_norm_matched": {...}, ..., "ld_clean",
    "ld_mean_ablation", "norm_ratio_mean"}}`` (``norm_ratio_*`` = mean ||a_hat|| / ||a||)."""
    locs = _locs(locations)
    clean = eval_task.clean
    cache = PrefixCache(model, clean, batch_size)
    ld_clean = mean_logit_diff(model, clean, batch_size=batch_size, cache=cache)
    a_fit = location_activations(model, fit_task.clean, locs, batch_size=batch_size)
    a_ev = location_activations(model, clean, locs, batch_size=batch_size)
    out = {}
    for loc in locs:
        a = a_ev[loc.key]
        ld_abl = patched_logit_diff(model, clean, {loc: a.mean(0, keepdim=True).expand_as(a)}, batch_size=batch_size,
                                    cache=cache)
        row = {"ld_clean": ld_clean, "ld_mean_ablation": ld_abl}
        for method in ("mean", "regression"):
            d = SupervisedDictionary.fit(a_fit[loc.key], fit_task.clean.attributes, loc.key, nested=fit_task.nested,
                                         method=method)
            rec = d.reconstruct(clean.attributes)
            row[method] = sufficiency_necessity(model, clean, loc, a, rec, ld_clean, ld_abl, batch_size, cache)
            ratio = rec.float().norm(dim=-1) / a.float().norm(dim=-1).clamp_min(1e-12)
            row[f"norm_ratio_{method}"] = float(ratio.mean())
            matched = rec / ratio.to(rec.dtype).unsqueeze(-1)
            ld = patched_logit_diff(model, clean, {loc: matched}, batch_size=batch_size, cache=cache)
            den = ld_clean - ld_abl
            row[f"{method}_norm_matched"] = {"ld": ld, "sufficiency": (ld - ld_abl) / den if abs(den) > 1e-6
                                             else float("nan")}
        out[loc.key] = row
    return out

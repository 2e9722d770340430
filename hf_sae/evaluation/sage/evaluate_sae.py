"""Evaluate an SAE against supervised dictionaries (SAGE step 3) at direct and sublayer locations.

Which locations an SAE covers. An SAE at hook point ``H`` applies *directly* to locations on
``H`` (and, for residual-stream SAEs, on any hook naming the same residual stream: ``embed`` =
``layers.0.resid_pre``, ``layers.{i}.resid_post`` = ``layers.{i+1}.resid_pre``). A residual SAE
whose stream enters block ``j`` also covers block ``j``'s *sublayer* locations (``attn_z`` heads,
``attn_out``, ``mlp_out``) through recomputation (SAGE's reconstruction method, step 4): splice
the SAE's reconstruction into the residual stream at every position (the first token, which SAEs
are not trained on, keeps its true value by default) and let block ``j`` recompute its
sublayer activations from it (:func:`recompute_sublayers`). No SAE per sublayer is needed.

Metrics, per location ``l`` (all LDs are means over the evaluation prompts, in logits):

- ``ld_clean``: clean LD; ``ld_mean_ablation``: LD with ``a_l`` replaced by its mean over the
  evaluation prompts (the baseline, chosen because it removes exactly the prompt-specific
  information at ``l`` and keeps the activation on-distribution).
- *sufficiency* of a reconstruction ``a_hat``: patch ``a_hat`` in place of ``a_l``::

      sufficiency = (LD[a_hat] - LD[mean]) / (LD_clean - LD[mean])

  1 = the reconstruction carries all task information at ``l``; 0 = no better than the mean.
- *necessity* (Makelov et al.): remove the reconstruction's prompt-specific part,
  ``a_l - a_hat + E[a_hat]``::

      necessity = (LD_clean - LD[a - a_hat + E a_hat]) / (LD_clean - LD[mean])

  1 = removing the reconstructed part hurts as much as mean-ablating the location (nothing the
  task needs is left in the error ``a - a_hat``).
  Both are reported for the supervised reconstruction and for the SAE's; they are only
  meaningful where ``|LD_clean - LD[mean]|`` is not tiny (``denominator`` is reported).
- *latent matching* per attribute value ``v`` of attribute ``i``: the decoder direction with the
  largest cosine to ``u_{i,v}`` (direct locations only: sublayer features live in another space),
  and the best 1-D probe: the single latent and threshold (``latent > t`` predicts
  ``attr_i = v``, one-vs-rest) chosen on the fitting prompts, scored by *balanced accuracy*
  (mean of true-positive and true-negative rates; 0.5 = chance) on the evaluation prompts. For
  sublayer locations the latents are those of the residual stream feeding the block at the
  location's position.
- *sparse controllability* (direct locations): change attribute ``i`` from each prompt's value
  ``A`` to its counterfactual's ``B``. The target is the counterfactual prompt's own activation
  ``a'`` at ``l`` (token-aligned). Supervised edit: ``a - u_{i,A} + u_{i,B}``. SAE edit: start
  from the latents ``z = enc(a)``, greedily set, one at a time, the latent ``j`` whose move
  ``z_j <- z'_j`` (``z' = enc(a')``) most reduces ``||dec(z_edit) - dec(z')||``; after ``k`` moves
  patch ``a + dec(z_edit) - dec(z)`` (the SAE error is kept). Reported: LD after the supervised
  edit, after patching ``a'`` itself, after ``k`` SAE moves for each ``k``, and the fewest moves
  reaching ``match_fraction`` of the supervised edit's LD change.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ...hooks import parse_hook_point
from ..reconstruction import cosine_similarity, fvu
from .dictionaries import SupervisedDictionary
from .patching import Location, PrefixCache, location_activations, mean_logit_diff, patched_logit_diff
from .tasks import Task

__all__ = [
    "residual_stream_index",
    "classify_location",
    "sae_reconstruct",
    "recompute_sublayers",
    "best_cosine_latents",
    "best_probe_latents",
    "greedy_latent_edit",
    "sufficiency_necessity",
    "reconstruction_fidelity",
    "evaluate_sae",
]

_SUBLAYER_KINDS = ("attn_z", "attn_out", "mlp_out")


def residual_stream_index(hook: str) -> int | None:
    """Index j of the residual stream a hook point reads (the one entering block j), else None.

    ``embed`` -> 0, ``layers.i.resid_pre`` -> i, ``layers.i.resid_post`` -> i + 1; sublayer
    hook points (``attn_z``/``attn_out``/``mlp_out``) -> None.
    """
    layer, kind = parse_hook_point(hook)
    if kind == "embed":
        return 0
    if kind == "resid_pre":
        return layer
    if kind == "resid_post":
        return layer + 1
    return None


def classify_location(sae_hook: str, loc: Location | str) -> str | None:
    """How an SAE at ``sae_hook`` covers ``loc``: ``"direct"``, ``"sublayer"`` or None (not covered)."""
    loc = loc if isinstance(loc, Location) else Location.parse(loc)
    if loc.hook == sae_hook:
        return "direct"
    j = residual_stream_index(sae_hook)
    if j is None:
        return None
    if residual_stream_index(loc.hook) == j:
        return "direct"
    layer, kind = parse_hook_point(loc.hook)
    if layer == j and kind in _SUBLAYER_KINDS:
        return "sublayer"
    return None


def _sae_hook(sae) -> str:
    hook = getattr(getattr(sae, "config", None), "hook_point", None)
    if not hook:
        raise ValueError(
            "the SAE has no config.hook_point; set it (e.g. sae.config.hook_point = 'layers.6.resid_post')"
        )
    parse_hook_point(hook)
    return hook


def sae_reconstruct(sae, x: Tensor) -> Tensor:
    """SAE reconstruction ``dec(enc(x))`` [..., d] in x's units and dtype (no grad)."""
    with torch.no_grad():
        return sae.decode(sae.encode(x), norm_stats=sae.input_norm_stats(x)).to(x.dtype)


def _decoder_directions(sae) -> Tensor:
    """[n, d] decoder direction of each latent (rows of W_dec, or dec(e_j) - dec(0))."""
    W = getattr(sae, "W_dec", None)
    if isinstance(W, Tensor) and W.dim() == 2:
        return W.detach()
    n = int(sae.config.n_latents)
    with torch.no_grad():
        eye = torch.eye(n)
        return sae.decode(eye) - sae.decode(torch.zeros(1, n))


def recompute_sublayers(
    model: nn.Module,
    sae,
    prompts,
    locations: Sequence[Location | str],
    keep_first_position: bool = True,
    batch_size: int = 64,
) -> dict[str, Tensor]:
    """Sublayer activations recomputed from a residual SAE's reconstruction (SAGE step 4).

    Splices ``SAE(resid)`` into the SAE's residual hook point at every position (the first token
    keeps its true value if ``keep_first_position``), runs the model and returns the values at
    ``locations`` (block j's ``attn_z`` heads / ``attn_out`` / ``mlp_out``):
    ``{location key: Tensor [N, d_loc]}``.
    """
    hook = _sae_hook(sae)

    def fn(act: Tensor) -> Tensor:
        rec = sae_reconstruct(sae, act)
        if keep_first_position:
            rec = torch.cat([act[:, :1], rec[:, 1:]], dim=1)
        return rec

    return location_activations(model, prompts, locations, batch_size=batch_size, replacements={hook: fn})


# --------------------------------------------------------------------------- latent matching


def best_cosine_latents(directions: Tensor, dictionary: SupervisedDictionary) -> dict[str, dict]:
    """For each attribute value, the decoder direction most aligned with ``u_{i,v}``.

    ``directions``: [n, d] decoder rows. Returns ``{attr: {"mean_best_cosine": float,
    "per_value": {v: {"latent": j, "cosine": c}}}}`` (cosine in [-1, 1]; NaN for a zero feature).
    """
    W = directions.float()
    Wn = W / W.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    out = {}
    for attr in dictionary.attributes:
        values, U = dictionary.feature_matrix(attr)
        U = U.float().to(W.device)
        if U.shape[-1] != W.shape[-1]:
            raise ValueError(f"best_cosine_latents: features have width {U.shape[-1]}, decoder rows {W.shape[-1]}")
        norms = U.norm(dim=-1, keepdim=True)
        cos = (U / norms.clamp_min(1e-12)) @ Wn.T  # [V, n]
        best, idx = cos.max(-1)
        per = {}
        for v, c, j, nv in zip(values, best.tolist(), idx.tolist(), norms.squeeze(-1).tolist()):
            per[v] = {"latent": int(j), "cosine": float(c) if nv > 0 else float("nan")}
        vals = [p["cosine"] for p in per.values() if p["cosine"] == p["cosine"]]
        out[attr] = {"mean_best_cosine": sum(vals) / len(vals) if vals else float("nan"), "per_value": per}
    return out


def _best_threshold(z: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per latent, the threshold t maximizing the balanced accuracy of ``z > t`` for labels y.

    z: [N, n] latents, y: bool [N]. Returns (balanced accuracy [n], threshold [n]), and the
    in-sample accuracy is what is maximized. Thresholds sit midway between distinct sorted values.
    """
    n_pos = y.sum().clamp_min(1).float()
    n_neg = (~y).sum().clamp_min(1).float()
    zs, order = z.float().sort(dim=0, descending=True)  # [N, n]
    ys = y[order].float()  # [N, n]
    tp = ys.cumsum(0)
    k = torch.arange(1, z.shape[0] + 1, device=z.device, dtype=torch.float32)[:, None]
    fp = k - tp
    bal = 0.5 * (tp / n_pos + 1.0 - fp / n_neg)  # predicting the top k as positive, [N, n]
    # a cut after row k is valid only between distinct values (and never after the last row)
    nxt = torch.cat([zs[1:], torch.full_like(zs[:1], float("-inf"))], dim=0)
    valid = zs > nxt
    valid[-1] = False
    bal = torch.where(valid, bal, torch.full_like(bal, 0.5))
    best, kbest = bal.max(0)
    cols = torch.arange(z.shape[1], device=z.device)
    thr = 0.5 * (zs[kbest, cols] + nxt[kbest, cols])
    thr = torch.where(best > 0.5, thr, torch.full_like(thr, float("inf")))
    return best, thr, kbest


def best_probe_latents(
    z_fit: Tensor,
    attrs_fit: dict[str, list[str]],
    z_eval: Tensor,
    attrs_eval: dict[str, list[str]],
    attributes: Sequence[str] | None = None,
) -> dict[str, dict]:
    """Best single-latent 1-D probe for each attribute value (one-vs-rest), chosen on the fit set.

    z_fit: [N_fit, n] latents, z_eval: [N_eval, n]; attrs: ``{attribute: [value per prompt]}``.
    Returns ``{attr: {"mean_balanced_accuracy": float (eval), "per_value": {v: {"latent", "threshold",
    "fit_balanced_accuracy", "balanced_accuracy"}}}}``; 0.5 is chance.
    """
    attributes = list(attrs_fit) if attributes is None else list(attributes)
    out = {}
    for attr in attributes:
        per = {}
        for v in sorted(set(attrs_fit[attr])):
            y_fit = torch.tensor([w == v for w in attrs_fit[attr]], device=z_fit.device)
            y_ev = torch.tensor([w == v for w in attrs_eval[attr]], device=z_eval.device)
            if y_fit.all() or not y_fit.any():
                continue
            bal, thr, _ = _best_threshold(z_fit, y_fit)
            j = int(bal.argmax())
            pred = z_eval[:, j].float() > thr[j]
            pos, neg = y_ev.sum().item(), (~y_ev).sum().item()
            tpr = (pred & y_ev).sum().item() / pos if pos else float("nan")
            tnr = (~pred & ~y_ev).sum().item() / neg if neg else float("nan")
            acc = 0.5 * (tpr + tnr) if pos and neg else float("nan")
            per[v] = {
                "latent": j,
                "threshold": float(thr[j]),
                "fit_balanced_accuracy": float(bal[j]),
                "balanced_accuracy": acc,
            }
        vals = [p["balanced_accuracy"] for p in per.values() if p["balanced_accuracy"] == p["balanced_accuracy"]]
        out[attr] = {"mean_balanced_accuracy": sum(vals) / len(vals) if vals else float("nan"), "per_value": per}
    return out


# --------------------------------------------------------------------------- controllability


def greedy_latent_edit(z: Tensor, z_target: Tensor, directions: Tensor, steps: Sequence[int]) -> dict[int, Tensor]:
    """Greedy sparse edit of latents toward a target code.

    Starting from ``z`` [N, n], repeatedly set the one latent ``j`` (per row) whose move
    ``z_j <- z_target_j`` most reduces ``||(z_edit - z_target) @ directions||^2`` (directions [n, d],
    the decoder rows); a row stops when no move reduces it. Returns ``{k: z_edit after k moves}``
    for each k in ``steps``.
    """
    if z.shape != z_target.shape or z.dim() != 2 or directions.shape[0] != z.shape[1]:
        raise ValueError(
            f"greedy_latent_edit: z {tuple(z.shape)}, z_target {tuple(z_target.shape)} and "
            f"directions {tuple(directions.shape)} do not match ([N, n], [N, n], [n, d])"
        )
    steps = sorted({int(s) for s in steps})
    if not steps or steps[0] < 1:
        raise ValueError(f"greedy_latent_edit: steps must be positive integers, got {steps}")
    W = directions.to(z.dtype)
    wn2 = (W * W).sum(-1)
    cur = z.clone()
    D = (cur - z_target) @ W  # [N, d]
    ar = torch.arange(z.shape[0], device=z.device)
    out = {}
    for step in range(1, steps[-1] + 1):
        delta = cur - z_target  # [N, n]
        gain = 2 * delta * (D @ W.T) - delta.square() * wn2
        gain = gain.masked_fill(delta == 0, float("-inf"))
        g, j = gain.max(-1)
        move = g > 0
        if move.any():
            rows, cols = ar[move], j[move]
            D[rows] -= delta[rows, cols, None] * W[cols]
            cur[rows, cols] = z_target[rows, cols]
        if step in steps:
            out[step] = cur.clone()
    return out


# --------------------------------------------------------------------------- sufficiency / necessity


def _ratio(num: float, den: float) -> float:
    return num / den if abs(den) > 1e-6 else float("nan")


def mean_ablation_logit_diff(model: nn.Module, prompts, loc: Location, a: Tensor, batch_size: int, cache) -> float:
    """Mean logit difference on ``prompts`` with the activations ``a`` [N, d] at ``loc`` replaced by their mean."""
    return patched_logit_diff(model, prompts, {loc: a.mean(0, keepdim=True).expand_as(a)}, batch_size=batch_size,
                              cache=cache)


def sufficiency_necessity(
    model: nn.Module,
    prompts,
    loc: Location,
    acts: Tensor,
    recon: Tensor,
    ld_clean: float,
    ld_ablate: float,
    batch_size: int = 64,
    cache: PrefixCache | None = None,
) -> dict[str, float]:
    """Patch ``recon`` [N, d] (sufficiency) and ``acts - recon + mean(recon)`` (necessity) at ``loc``.

    Returns ``{"ld", "sufficiency", "necessity_ld", "necessity"}`` (see the module docstring).
    """
    ld = patched_logit_diff(model, prompts, {loc: recon}, batch_size=batch_size, cache=cache)
    nec_vals = acts - recon + recon.mean(0, keepdim=True)
    ld_nec = patched_logit_diff(model, prompts, {loc: nec_vals}, batch_size=batch_size, cache=cache)
    den = ld_clean - ld_ablate
    return {
        "ld": ld,
        "sufficiency": _ratio(ld - ld_ablate, den),
        "necessity_ld": ld_nec,
        "necessity": _ratio(ld_clean - ld_nec, den),
    }


def reconstruction_fidelity(true: Tensor, approx: Tensor) -> dict[str, float]:
    """``{"fvu", "cosine"}`` of ``approx`` vs ``true`` [N, d] (:mod:`hf_sae.evaluation.reconstruction`);
    here the variance in the FVU is over the N prompts at one location."""
    return {"fvu": fvu(true.float(), approx.float()), "cosine": cosine_similarity(true.float(), approx.float())}


def _activations(model, sae, hook: str, fit_task: Task, clean_ev, covered: list, modes: dict,
                 keep_first_position: bool, batch_size: int) -> tuple:
    """True activations at the covered locations (fit + eval prompts); for sublayer locations the recomputed
    values and the residual stream feeding the block at the location's position (for latent probes), encoded.

    Returns ``(feeder, acts_fit, acts_ev, recomputed, z_fit, z_ev)``."""
    feeder = {l.key: Location(hook, l.position) for l in covered}
    needed = list({l.key: l for l in covered + list(feeder.values())}.values())
    acts_fit = location_activations(model, fit_task.clean, needed, batch_size=batch_size)
    acts_ev = location_activations(model, clean_ev, needed, batch_size=batch_size)
    sub = [l for l in covered if modes[l.key] == "sublayer"]
    recomputed = recompute_sublayers(model, sae, clean_ev, sub, keep_first_position, batch_size) if sub else {}
    with torch.no_grad():
        feed_keys = {f.key for f in feeder.values()}
        z_fit = {k: sae.encode(acts_fit[k]) for k in feed_keys}
        z_ev = {k: sae.encode(acts_ev[k]) for k in feed_keys}
    return feeder, acts_fit, acts_ev, recomputed, z_fit, z_ev


def _direct_reconstruction(sae, a: Tensor, key: str, d_in: int) -> Tensor:
    """The SAE's reconstruction of the activations ``a`` [N, d] at a location it reads directly."""
    if a.shape[-1] != d_in:
        raise ValueError(f"location {key} has width {a.shape[-1]} but the SAE's d_in is {d_in}")
    return sae_reconstruct(sae, a)


def evaluate_sae(
    model: nn.Module,
    sae,
    fit_task: Task,
    eval_task: Task,
    locations: Sequence[Location | str],
    dictionaries: dict[str, SupervisedDictionary] | None = None,
    edit_steps: Sequence[int] = (1, 2, 4, 8, 16),
    match_fraction: float = 0.9,
    n_control: int | None = 32,
    control: bool = True,
    keep_first_position: bool = True,
    batch_size: int = 64,
    progress: bool = True,
    cache: PrefixCache | None = None,
) -> dict:
    """Evaluate ``sae`` at the ``locations`` it covers, against supervised dictionaries.

    Args:
        sae: an :class:`~hf_sae.SparseAutoencoder` (or any object with ``encode``/``decode`` and
            ``config.hook_point``), already on the model's device.
        fit_task: prompts to fit supervised dictionaries and choose probe thresholds on.
        eval_task: held-out prompts on which every LD and accuracy is measured.
        locations: candidate locations; those the SAE does not cover are listed as ``uncovered``.
        dictionaries: supervised dictionaries fitted on ``fit_task`` (fitted here when missing).
        edit_steps: numbers of latent moves at which the SAE edit is measured.
        match_fraction: a SAE edit "matches" the supervised one when its LD change reaches this
            fraction of the supervised edit's.
        n_control: evaluation prompts used for controllability (the first ones; None = all).
        control: run the controllability edits (direct locations only).
        keep_first_position: residual splicing for sublayer recomputation keeps token 0 exact.
        cache: a :class:`PrefixCache` of ``eval_task.clean`` with this ``batch_size`` (built if None).
    Returns a JSON-able dict ``{"hook_point", "locations": {key: metrics}, "uncovered": [keys]}``
    (metrics as in the module docstring).
    """
    hook = _sae_hook(sae)
    locs = [l if isinstance(l, Location) else Location.parse(l) for l in locations]
    modes = {l.key: classify_location(hook, l) for l in locs}
    covered = [l for l in locs if modes[l.key] is not None]
    result = {"hook_point": hook, "locations": {}, "uncovered": [l.key for l in locs if modes[l.key] is None]}
    if not covered:
        return result
    dictionaries, directions, clean_ev = dict(dictionaries or {}), _decoder_directions(sae), eval_task.clean
    cache = cache if cache is not None else PrefixCache(model, clean_ev, batch_size)
    ld_clean = mean_logit_diff(model, clean_ev, batch_size=batch_size, cache=cache)
    d_in = int(sae.config.d_in) if hasattr(sae.config, "d_in") else directions.shape[1]

    feeder, acts_fit, acts_ev, recomputed, z_fit, z_ev = _activations(
        model, sae, hook, fit_task, clean_ev, covered, modes, keep_first_position, batch_size
    )
    ctrl_task = eval_task if n_control is None or n_control >= len(eval_task) else eval_task.select(range(n_control))
    ctrl_cache = None
    for loc in tqdm(covered, desc=f"SAGE eval {hook}", disable=not progress):
        key, mode = loc.key, modes[loc.key]
        d = dictionaries[key] = dictionaries.get(key) or SupervisedDictionary.fit(
            acts_fit[key], fit_task.clean.attributes, key, nested=fit_task.nested
        )
        a = acts_ev[key]
        ld_ablate = mean_ablation_logit_diff(model, clean_ev, loc, a, batch_size, cache)
        sae_rec = recomputed[key] if mode == "sublayer" else _direct_reconstruction(sae, a, key, d_in)
        entry = {"mode": mode, "ld_clean": ld_clean, "ld_mean_ablation": ld_ablate, "denominator": ld_clean - ld_ablate}
        for name, rec in (("supervised", d.reconstruct(clean_ev.attributes)), ("sae", sae_rec)):
            entry[name] = {
                **sufficiency_necessity(model, clean_ev, loc, a, rec, ld_clean, ld_ablate, batch_size, cache),
                **reconstruction_fidelity(a, rec),
            }
        entry["probe"] = best_probe_latents(
            z_fit[feeder[key].key], fit_task.clean.attributes, z_ev[feeder[key].key], clean_ev.attributes
        )
        entry["cosine"] = best_cosine_latents(directions, d) if mode == "direct" else None
        if control and mode == "direct":
            if ctrl_cache is None:
                ctrl_cache = cache if ctrl_task is eval_task else PrefixCache(model, ctrl_task.clean, batch_size)
            entry["control"] = _control(
                model, sae, directions, ctrl_task, loc, d, edit_steps, match_fraction, batch_size, ctrl_cache
            )
        result["locations"][key] = entry
    result["dictionaries"] = {k: dictionaries[k].to_dict() for k in result["locations"]}
    return result


def _control(
    model,
    sae,
    directions,
    task: Task,
    loc: Location,
    d: SupervisedDictionary,
    edit_steps,
    match_fraction,
    batch_size,
    cache: PrefixCache | None = None,
) -> dict:
    """Sparse controllability at a direct location, for every attribute (see module docstring)."""
    clean = task.clean
    a = location_activations(model, clean, [loc], batch_size=batch_size)[loc.key]
    ld_clean = mean_logit_diff(model, clean, batch_size=batch_size, cache=cache)
    with torch.no_grad():
        z = sae.encode(a)
        base = sae.decode(z)
    out = {}
    for attr in task.attribute_names:
        cf = task.corrupted[attr].as_counterfactual_of(clean)
        a_cf = location_activations(model, cf, [loc], batch_size=batch_size)[loc.key]
        ld_cf = patched_logit_diff(model, clean, {loc: a_cf}, batch_size=batch_size, cache=cache)
        a_sup = d.edit(a, attr, clean.attributes[attr], task.corrupted[attr].attributes[attr])
        ld_sup = patched_logit_diff(model, clean, {loc: a_sup}, batch_size=batch_size, cache=cache)
        with torch.no_grad():
            z_cf = sae.encode(a_cf)
            edits = greedy_latent_edit(z, z_cf, directions.to(z.device), edit_steps)
        ld_k = {}
        for k, zk in edits.items():
            with torch.no_grad():
                a_k = a + (sae.decode(zk) - base).to(a.dtype)
            ld_k[k] = patched_logit_diff(model, clean, {loc: a_k}, batch_size=batch_size, cache=cache)
        sup_change = ld_sup - ld_clean
        needed = None
        if abs(sup_change) > 1e-6:
            for k in sorted(ld_k):
                if (ld_k[k] - ld_clean) / sup_change >= match_fraction:
                    needed = k
                    break
        out[attr] = {
            "ld_clean": ld_clean,
            "ld_counterfactual_patch": ld_cf,
            "ld_supervised_edit": ld_sup,
            "ld_sae_edit": {str(k): v for k, v in ld_k.items()},
            "supervised_edit_fraction": _ratio(ld_sup - ld_clean, ld_cf - ld_clean),
            "sae_edit_fraction": {str(k): _ratio(v - ld_clean, ld_cf - ld_clean) for k, v in ld_k.items()},
            "latents_needed": needed,
            "mean_active_latents": float((z != 0).float().sum(-1).mean()),
        }
    return out

"""Cross-section discovery: attribution patching over node locations, confirmed by activation patching.

For a clean prompt x and its counterpart x' that differs in attribute i, *activation patching*
(noising) of a location l runs x with l's activation replaced by its value on x' and measures the
clean metric ``LD`` (logit[answer] - logit[wrong] of the clean prompt). *Attribution patching*
(Nanda 2023; Syed et al. 2023) estimates that change for every location at once, to first order,
from one clean forward+backward and one corrupted forward::

    score_i(l) = mean over prompts of  (a_l(x') - a_l(x)) . dLD(x)/da_l      (logits)

Node locations (all at every task position): ``layers.{i}.resid_pre`` (the residual stream per
layer), ``layers.{i}.attn_z`` head slices (each head's output; its residual contribution is that
slice times the output-projection columns, so the score is the same), ``layers.{i}.mlp_out``.
Locations are ranked by ``max_i |score_i(l)|`` and the top ones are confirmed with real
activation patching (:func:`activation_patching`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ...cli_args import NODE_KINDS  # the one list, also `hf-sae sage --kinds`'s choices
from ...hooks import capture, format_hook_point, model_parts, splice
from .patching import Location, PrefixCache, _batches, _end_logits, location_activations, patched_logit_diff
from .tasks import Task, TaskPrompts

__all__ = ["NODE_KINDS", "enumerate_locations", "AttributionResult", "attribution_patching", "activation_patching"]

# Node kinds of :func:`enumerate_locations` (NODE_KINDS: residual stream, attention heads, MLP outputs) -> hook.
_KIND_HOOK = {"resid": "resid_pre", "head": "attn_z", "mlp": "mlp_out"}


def enumerate_locations(
    model: nn.Module,
    task: Task,
    kinds: Sequence[str] = NODE_KINDS,
    layers: Sequence[int] | None = None,
    positions: Sequence[str] | None = None,
) -> list[Location]:
    """All node locations of ``model`` for ``task``: kinds x layers x positions (x heads).

    Args:
        kinds: subset of :data:`NODE_KINDS`.
        layers: block indices (default all).
        positions: task position names (default all of ``task.position_names``).
    Returns a list of :class:`Location` in forward order of layers.
    """
    parts = model_parts(model)
    bad = [k for k in kinds if k not in NODE_KINDS]
    if bad:
        raise ValueError(f"unknown node kinds {bad}; choose from {NODE_KINDS}")
    layers = list(range(parts.n_layers)) if layers is None else list(layers)
    for i in layers:
        if not 0 <= i < parts.n_layers:
            raise ValueError(f"layer {i} does not exist: the model has layers 0..{parts.n_layers - 1}")
    positions = list(task.position_names) if positions is None else list(positions)
    missing = [p for p in positions if p not in task.position_names]
    if missing:
        raise ValueError(f"task {task.name} has no positions {missing}; it has {list(task.position_names)}")
    out = []
    for i in layers:
        for kind in ("resid", "head", "mlp"):
            if kind not in kinds:
                continue
            hook = format_hook_point(i, _KIND_HOOK[kind])
            for p in positions:
                if kind == "head":
                    out.extend(Location(hook, p, h) for h in range(parts.n_heads))
                else:
                    out.append(Location(hook, p))
    return out


@dataclass
class AttributionResult:
    """Attribution-patching scores of one task.

    Attributes:
        ld_clean: mean clean LD (logits).
        ld_corrupted: ``{attribute: mean LD of the corrupted prompts under the clean metric}``.
        scores: ``{attribute: {location key: estimated mean change of LD when the location is
            patched from the corrupted run}}`` (logits; negative = patching hurts).
        locations: the locations scored, in enumeration order.
        n_prompts: prompts averaged over.
    """

    ld_clean: float
    ld_corrupted: dict[str, float]
    scores: dict[str, dict[str, float]]
    locations: list[Location]
    n_prompts: int
    extra: dict = field(default_factory=dict)

    def combined(self) -> dict[str, float]:
        """``{location key: max over attributes of |score|}`` (logits)."""
        return {l.key: max(abs(s[l.key]) for s in self.scores.values()) for l in self.locations}

    def top(self, k: int, kinds: Sequence[str] | None = None) -> list[Location]:
        """The ``k`` locations with the largest combined score (optionally only node ``kinds``,
        ``resid``/``head``/``mlp``)."""
        comb = self.combined()
        want = None if kinds is None else {_KIND_HOOK[k] for k in kinds}
        locs = [l for l in self.locations if want is None or l.hook.rsplit(".", 1)[-1] in want]
        return sorted(locs, key=lambda l: -comb[l.key])[:k]

    def best_attribute(self, loc: Location | str) -> str:
        """The attribute whose score at ``loc`` is largest in magnitude."""
        key = loc.key if isinstance(loc, Location) else loc
        return max(self.scores, key=lambda a: abs(self.scores[a][key]))

    def to_dict(self, top_k: int = 50) -> dict:
        """JSON-able summary: LDs and the top ``top_k`` locations with their per-attribute scores."""
        return {
            "ld_clean": self.ld_clean,
            "ld_corrupted": dict(self.ld_corrupted),
            "n_prompts": self.n_prompts,
            "n_locations": len(self.locations),
            "top": [
                {"location": l.key, **{a: self.scores[a][l.key] for a in self.scores}}
                for l in self.top(top_k)
            ],
        }


def _score_locations(delta: dict[str, Tensor], grad: dict[str, Tensor], prompts: TaskPrompts,
                     locations: Sequence[Location], d_head: int) -> dict[str, Tensor]:
    """Per-prompt first-order effects [b] of each location from (a' - a) and dLD/da at the hooks."""
    out = {}
    ar = torch.arange(len(prompts))
    for loc in locations:
        pos = prompts.positions[loc.position]
        prod = (delta[loc.hook][ar, pos] * grad[loc.hook][ar, pos]).float()  # [b, D]
        if loc.head is not None:
            prod = prod[:, loc.head * d_head : (loc.head + 1) * d_head]
        out[loc.key] = prod.sum(-1)
    return out


def _forward_capture(model, prompts: TaskPrompts, hooks: list[str], with_grad: bool):
    """Full forward of ``prompts``: returns ({hook: act [b,T,D]}, LD [b]); graph kept if with_grad."""
    device = next(model.parameters()).device
    ids = prompts.input_ids.to(device)
    end = prompts.positions["END"].to(device)
    ctx_grad = torch.enable_grad() if with_grad else torch.no_grad()
    # Frozen LMs produce no graph: make the embedding output a leaf that requires grad.
    leaf = {"embed": lambda a: a.detach().requires_grad_(True)} if with_grad else {}
    with ctx_grad, splice(model, leaf), capture(model, hooks, stop_early=False, detach=not with_grad) as acts:
        logits = _end_logits(model, ids, end)
        ar = torch.arange(len(end), device=device)
        ld = logits[ar, prompts.answer_ids.to(device)] - logits[ar, prompts.wrong_ids.to(device)]
        acts = dict(acts)
    return acts, ld


def attribution_patching(
    model: nn.Module,
    task: Task,
    locations: Sequence[Location] | None = None,
    attributes: Sequence[str] | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> AttributionResult:
    """Attribution-patching scores of every location for every attribute's corruption.

    One forward+backward of the clean prompts (the gradient of the clean LD is shared by all
    attributes) and one forward per attribute's corrupted prompts, per mini-batch.

    Args:
        locations: locations to score (default :func:`enumerate_locations` of all node kinds).
        attributes: attributes to corrupt (default all of the task's).
        batch_size: prompts per forward.
    Returns an :class:`AttributionResult` (scores in logits, averaged over prompts).
    """
    locations = enumerate_locations(model, task) if locations is None else list(locations)
    attributes = list(task.attribute_names) if attributes is None else list(attributes)
    for a in attributes:
        if a not in task.corrupted:
            raise ValueError(f"task {task.name} has no corrupted counterpart for attribute {a!r}; "
                             f"it has {sorted(task.corrupted)}")
    hooks = sorted({l.hook for l in locations})
    d_head = model_parts(model).d_head
    n = len(task)
    sums = {a: {l.key: 0.0 for l in locations} for a in attributes}
    ld_clean_sum, ld_corr_sum = 0.0, {a: 0.0 for a in attributes}
    batches = list(_batches(n, batch_size))
    for rows in tqdm(batches, desc=f"attribution {task.name}", disable=not progress):
        sub = task.select(range(rows.start, rows.stop))
        acts, ld = _forward_capture(model, sub.clean, hooks, with_grad=True)
        grads = torch.autograd.grad(ld.sum(), [acts[h] for h in hooks], allow_unused=True)
        grad = {h: (g if g is not None else torch.zeros_like(acts[h])).detach() for h, g in zip(hooks, grads)}
        clean = {h: acts[h].detach() for h in hooks}
        ld_clean_sum += float(ld.detach().sum())
        del acts, ld, grads
        for a in attributes:
            corr_prompts = sub.corrupted[a].as_counterfactual_of(sub.clean)
            corr, ld_c = _forward_capture(model, corr_prompts, hooks, with_grad=False)
            ld_corr_sum[a] += float(ld_c.sum())
            delta = {h: corr[h] - clean[h] for h in hooks}
            for key, v in _score_locations(delta, grad, sub.clean, locations, d_head).items():
                sums[a][key] += float(v.sum())
    return AttributionResult(
        ld_clean=ld_clean_sum / n,
        ld_corrupted={a: ld_corr_sum[a] / n for a in attributes},
        scores={a: {k: v / n for k, v in s.items()} for a, s in sums.items()},
        locations=list(locations),
        n_prompts=n,
    )


def activation_patching(
    model: nn.Module,
    task: Task,
    locations: Sequence[Location],
    attributes: Sequence[str] | None = None,
    ld_clean: float | None = None,
    ld_corrupted: dict[str, float] | None = None,
    batch_size: int = 64,
    progress: bool = True,
    cache: PrefixCache | None = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """Real activation patching (noising) of each location with each attribute's corrupted value.

    Returns ``{attribute: {location key: {"ld": patched mean LD, "effect": ld - ld_clean,
    "fraction": (ld - ld_clean) / (ld_corrupted - ld_clean)}}}`` (logits; ``fraction`` is 1 when
    patching this one location alone does as much as corrupting the whole prompt). ``ld_clean``
    and ``ld_corrupted`` are computed if not given; ``cache``: a :class:`PrefixCache` of
    ``task.clean`` with this ``batch_size`` (built here if None).
    """
    from .patching import mean_logit_diff

    attributes = list(task.attribute_names) if attributes is None else list(attributes)
    if ld_clean is None:
        ld_clean = mean_logit_diff(model, task.clean, batch_size=batch_size)
    ld_corrupted = dict(ld_corrupted or {})
    out: dict[str, dict[str, dict[str, float]]] = {}
    cache = cache if cache is not None else PrefixCache(model, task.clean, batch_size)
    total = len(attributes) * len(locations)
    bar = tqdm(total=total, desc=f"activation patching {task.name}", disable=not progress)
    for a in attributes:
        corr_prompts = task.corrupted[a].as_counterfactual_of(task.clean)
        if a not in ld_corrupted:
            ld_corrupted[a] = mean_logit_diff(model, corr_prompts, batch_size=batch_size)
        corr_acts = location_activations(model, corr_prompts, locations, batch_size=batch_size)
        out[a] = {}
        for loc in locations:
            ld = patched_logit_diff(model, task.clean, {loc: corr_acts[loc.key]}, batch_size=batch_size, cache=cache)
            denom = ld_corrupted[a] - ld_clean
            out[a][loc.key] = {
                "ld": ld,
                "effect": ld - ld_clean,
                "fraction": (ld - ld_clean) / denom if abs(denom) > 1e-6 else float("nan"),
            }
            bar.update(1)
    bar.close()
    return out

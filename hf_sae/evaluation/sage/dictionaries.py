"""Supervised feature dictionaries (Makelov et al. 2024; SAGE step 2).

At one location, with activations ``a`` [N, d] of prompts whose attributes ``i`` take values
``v_i``, the supervised feature of value ``v`` of attribute ``i`` is the conditional mean offset::

    u_{i,v} = E[a | attr_i = v] - E[a]                                   [d]

and the supervised reconstruction of a prompt with values ``(v_1, ..., v_m)`` is::

    a_hat = E[a] + sum_i u_{i, v_i}                                      [d]

(exact when the activation is an additive function of the attributes and the attributes are
balanced). Changing attribute ``i`` from ``A`` to ``B`` is the supervised edit
``a - u_{i,A} + u_{i,B}``. A value never seen when fitting gets ``u = 0``.

Nested attributes. When attribute ``j`` determines attribute ``p`` (every value of ``j`` occurs
with one value of ``p``: a name determines its gender), ``E[a | j = w] - E[a]`` already contains
``u_{p, p(w)}`` and the sum above would count it twice. For such a pair, declared as
``nested={j: p}``, the child's feature is taken relative to its parent's mean::

    u_{j,w} = E[a | j = w] - E[a | p = p(w)]

so that ``E[a] + u_{p,p(w)} + u_{j,w} = E[a | j = w]``. Attributes not declared nested use the
plain formula.

Regression fit (``method="regression"``). The conditional means above are exact for a balanced
product design. IOI is not one: IO and S are never the same name, so ``E[a | io = v]`` averages over
prompts whose S is *not* v and picks up a share of the S-feature of v (and vice versa). The
regression fit solves the additive model directly, by least squares over the one-hot design::

    min_{c, beta} sum_n || a_n - c - sum_i beta_{i, v_i(n)} ||^2

(minimum-norm solution), then moves each attribute's count-weighted mean of ``beta`` into ``c``
so that ``mean = c`` and ``u_{i,v} = beta_{i,v}`` keep the conditional-mean convention (features
average to 0 over the fitting prompts). It equals the conditional-mean fit on a balanced product
design (tested) and removes the IO/S cross terms otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["SupervisedDictionary", "fit_dictionaries"]


@dataclass
class SupervisedDictionary:
    """Supervised features of one location.

    Attributes:
        location: the location key (e.g. ``layers.12.resid_pre@END``).
        mean: E[a], Tensor [d] (activation units).
        features: ``{attribute: {value: u_{attribute,value} [d]}}``.
        counts: ``{attribute: {value: number of fitting prompts with that value}}``.
    """

    location: str
    mean: Tensor
    features: dict[str, dict[str, Tensor]]
    counts: dict[str, dict[str, int]] = field(default_factory=dict)

    @classmethod
    def fit(cls, acts: Tensor, attributes: Mapping[str, Sequence], location: str = "",
            nested: Mapping[str, str] | None = None, method: str = "mean") -> SupervisedDictionary:
        """Fit ``u_{i,v}`` from activations ``acts`` [N, d] and ``attributes`` ``{i: [v per prompt]}``.

        ``nested``: ``{child attribute: parent attribute}`` for attributes whose value determines
        the parent's (see the module docstring); ``ValueError`` if a child value occurs with two
        parent values. Means are taken in float64 and stored in ``acts``' dtype. ``method``: ``"mean"``
        (conditional means, the default) or ``"regression"`` (least squares; see the module docstring).
        """
        if method not in ("mean", "regression"):
            raise ValueError(f"SupervisedDictionary.fit: method={method!r}; use 'mean' or 'regression'")
        if not isinstance(acts, Tensor) or acts.dim() != 2 or acts.shape[0] < 1:
            shape = tuple(acts.shape) if isinstance(acts, Tensor) else type(acts).__name__
            raise ValueError(f"SupervisedDictionary.fit: acts must be a [N, d] tensor with N >= 1, got {shape}")
        if not torch.isfinite(acts).all():
            raise ValueError(f"SupervisedDictionary.fit({location}): activations contain NaN/Inf")
        if not attributes:
            raise ValueError("SupervisedDictionary.fit: no attributes given")
        n = acts.shape[0]
        x = acts.double()
        mean = x.mean(0)
        nested = dict(nested or {})
        for child, parent in nested.items():
            if child not in attributes or parent not in attributes or child == parent:
                raise ValueError(f"nested={nested}: {child!r} -> {parent!r} must name two different attributes "
                                 f"among {list(attributes)}")
        features: dict[str, dict[str, Tensor]] = {}
        counts: dict[str, dict[str, int]] = {}
        for attr, values in attributes.items():
            values = [str(v) for v in values]
            if len(values) != n:
                raise ValueError(f"attribute {attr!r} has {len(values)} values for {n} activations")
            parent = [str(v) for v in attributes[nested[attr]]] if attr in nested else None
            features[attr], counts[attr] = {}, {}
            for v in sorted(set(values)):
                mask = torch.tensor([w == v for w in values], device=acts.device)
                base = mean
                if parent is not None:
                    pv = {parent[i] for i in range(n) if values[i] == v}
                    if len(pv) != 1:
                        raise ValueError(f"attribute {attr!r}={v!r} occurs with {nested[attr]!r} values {sorted(pv)}; "
                                         "it is not nested in that attribute")
                    p_value = pv.pop()
                    pmask = torch.tensor([w == p_value for w in parent], device=acts.device)
                    base = x[pmask].mean(0)
                features[attr][v] = (x[mask].mean(0) - base).to(acts.dtype)
                counts[attr][v] = int(mask.sum())
        if method == "regression":
            mean, features = _regression_fit(x, attributes, counts)
            features = {a: {v: u.to(acts.dtype) for v, u in f.items()} for a, f in features.items()}
        return cls(location=location, mean=mean.to(acts.dtype), features=features, counts=counts)

    @property
    def attributes(self) -> list[str]:
        return list(self.features)

    def feature(self, attribute: str, value) -> Tensor:
        """u_{attribute,value} [d]; zeros for a value not seen when fitting."""
        if attribute not in self.features:
            raise ValueError(f"dictionary at {self.location} has no attribute {attribute!r}; it has {self.attributes}")
        u = self.features[attribute].get(str(value))
        return u if u is not None else torch.zeros_like(self.mean)

    def _stack(self, attribute: str, values: Sequence) -> Tensor:
        return (
            torch.stack([self.feature(attribute, v) for v in values])
            if len(values)
            else self.mean.new_zeros(0, self.mean.numel())
        )

    def reconstruct(self, attributes: Mapping[str, Sequence]) -> Tensor:
        """Supervised reconstructions [N, d]: ``E[a] + sum_i u_{i, v_i}`` for each prompt.

        ``attributes`` must give every attribute of the dictionary (``{i: [v per prompt]}``).
        """
        missing = [a for a in self.features if a not in attributes]
        if missing:
            raise ValueError(f"reconstruct at {self.location}: attributes {missing} are missing")
        lengths = {len(attributes[a]) for a in self.features}
        if len(lengths) != 1:
            raise ValueError(f"reconstruct at {self.location}: attribute lists have different lengths {lengths}")
        n = lengths.pop()
        out = self.mean.expand(n, -1).clone()
        for a in self.features:
            out = out + self._stack(a, list(attributes[a]))
        return out

    def edit(self, acts: Tensor, attribute: str, old_values: Sequence, new_values: Sequence) -> Tensor:
        """Supervised edit [N, d]: ``acts - u_{i, old} + u_{i, new}`` for attribute ``i``."""
        if acts.dim() != 2 or acts.shape[0] != len(old_values) or len(old_values) != len(new_values):
            raise ValueError(
                f"edit at {self.location}: acts {tuple(acts.shape)}, {len(old_values)} old and "
                f"{len(new_values)} new values must agree in N"
            )
        delta = self._stack(attribute, list(new_values)) - self._stack(attribute, list(old_values))
        return acts + delta.to(acts.dtype)

    def feature_matrix(self, attribute: str) -> tuple[list[str], Tensor]:
        """(values, U [n_values, d]) of one attribute, values sorted."""
        if attribute not in self.features:
            raise ValueError(f"dictionary at {self.location} has no attribute {attribute!r}")
        vals = list(self.features[attribute])
        return vals, torch.stack([self.features[attribute][v] for v in vals])

    def to_dict(self) -> dict:
        """JSON-able summary: feature norms per value and counts."""
        return {
            "location": self.location,
            "mean_norm": float(self.mean.float().norm()),
            "feature_norms": {a: {v: float(u.float().norm()) for v, u in f.items()} for a, f in self.features.items()},
            "counts": self.counts,
        }


def _regression_fit(x: Tensor, attributes: Mapping[str, Sequence], counts: dict) -> tuple[Tensor, dict]:
    """Least-squares additive fit of x [N, d] (float64) on one-hot attributes; see the module docstring."""
    n = x.shape[0]
    cols, slots = [torch.ones(n, 1, dtype=x.dtype, device=x.device)], []
    for attr in counts:
        values = [str(v) for v in attributes[attr]]
        for v in counts[attr]:
            cols.append(torch.tensor([[w == v] for w in values], dtype=x.dtype, device=x.device))
            slots.append((attr, v))
    design = torch.cat(cols, 1)
    coef = torch.linalg.pinv(design) @ x  # minimum-norm least squares, [1 + values, d]
    c = coef[0].clone()
    features: dict[str, dict[str, Tensor]] = {a: {} for a in counts}
    for j, (attr, v) in enumerate(slots, start=1):
        features[attr][v] = coef[j]
    for attr, f in features.items():
        w = torch.tensor([counts[attr][v] for v in f], dtype=x.dtype, device=x.device)
        shift = (torch.stack(list(f.values())) * w[:, None]).sum(0) / w.sum()
        c = c + shift
        features[attr] = {v: u - shift for v, u in f.items()}
    return c, features


def fit_dictionaries(
    acts: Mapping[str, Tensor], attributes: Mapping[str, Sequence], nested: Mapping[str, str] | None = None
) -> dict[str, SupervisedDictionary]:
    """Fit one :class:`SupervisedDictionary` per location: ``{key: acts [N, d]}`` -> ``{key: dictionary}``."""
    return {k: SupervisedDictionary.fit(v, attributes, location=k, nested=nested) for k, v in acts.items()}

"""Locations (hook point x token position [x head]), logit differences and activation patching.

A SAGE *location* is one activation vector per prompt: the value of a hook point at one named
token position of the task, optionally restricted to one attention head:

- ``layers.{i}.resid_pre@END``   residual stream entering block i at END          [N, d_model]
- ``layers.{i}.mlp_out@S2``      what block i's MLP adds at S2                    [N, d_model]
- ``layers.{i}.attn_z.h{h}@END`` head h's output (its slice of ``attn_z``, the
                                 input of the attention output projection)        [N, d_head]

Any hook point of :mod:`hf_sae.hooks` may be used. Patching a location replaces exactly that
slice of the activation (other positions / heads untouched), using :func:`hf_sae.hooks.splice`,
so everything downstream is recomputed.

The task metric is the mean logit difference ``LD = logit[answer] - logit[wrong]`` at each
prompt's END position (logits, i.e. unnormalized log-probabilities), see :mod:`.tasks`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ...hooks import model_parts, parse_hook_point, run_with_capture, splice
from .tasks import TaskPrompts

__all__ = [
    "Location",
    "logit_diff",
    "mean_logit_diff",
    "PrefixCache",
    "location_activations",
    "extract_location",
    "patch_functions",
    "patched_logit_diff",
]

_KEY_RE = re.compile(r"^(?P<hook>[A-Za-z0-9_.]+?)(?:\.h(?P<head>\d+))?@(?P<pos>[A-Za-z0-9_]+)$")


@dataclass(frozen=True)
class Location:
    """One activation vector per prompt: ``hook`` at token position ``position`` (head ``head``).

    Attributes:
        hook: hook-point string (``layers.5.resid_pre``, ``layers.5.attn_z``, ``layers.5.mlp_out``...).
        position: name of a task position (``END``, ``IO``, ...).
        head: attention head index for ``attn_z`` hook points (its ``d_head`` columns), else None.
    """

    hook: str
    position: str
    head: int | None = None

    def __post_init__(self):
        _, kind = parse_hook_point(self.hook)
        if self.head is not None and kind != "attn_z":
            raise ValueError(f"Location {self.hook}: a head index is only valid for attn_z hook points")
        if self.head is not None and (not isinstance(self.head, int) or self.head < 0):
            raise ValueError(f"Location head must be a non-negative int, got {self.head!r}")

    @property
    def key(self) -> str:
        """String form, e.g. ``layers.5.attn_z.h3@END`` (inverse: :meth:`parse`)."""
        head = f".h{self.head}" if self.head is not None else ""
        return f"{self.hook}{head}@{self.position}"

    @property
    def layer(self) -> int | None:
        return parse_hook_point(self.hook)[0]

    @property
    def kind(self) -> str:
        """``"head"`` for a head location, else the hook kind (``resid_pre``, ``mlp_out``, ...)."""
        return "head" if self.head is not None else parse_hook_point(self.hook)[1]

    @classmethod
    def parse(cls, key: str) -> Location:
        """``"layers.5.attn_z.h3@END"`` -> Location("layers.5.attn_z", "END", 3)."""
        m = _KEY_RE.match(key) if isinstance(key, str) else None
        if m is None:
            raise ValueError(
                f"invalid location {key!r}; expected '<hook point>@<POSITION>' or "
                f"'layers.<i>.attn_z.h<head>@<POSITION>', "
                "e.g. 'layers.5.resid_pre@END'"
            )
        head = m.group("head")
        return cls(m.group("hook"), m.group("pos"), int(head) if head is not None else None)

    def __str__(self) -> str:  # pragma: no cover - cosmetic
        return self.key


def _as_location(loc: Location | str) -> Location:
    return loc if isinstance(loc, Location) else Location.parse(loc)


def _d_head(model: nn.Module) -> int:
    return model_parts(model).d_head


def _positions(prompts: TaskPrompts, loc: Location) -> Tensor:
    if loc.position not in prompts.positions:
        raise ValueError(
            f"location {loc.key}: the task has no position {loc.position!r}; it has {sorted(prompts.positions)}"
        )
    return prompts.positions[loc.position]


def extract_location(act: Tensor, prompts: TaskPrompts, loc: Location | str, d_head: int | None = None) -> Tensor:
    """Slice a hook-point activation [N, T, D] to the location's vectors [N, d_loc].

    ``d_head`` (the head width) is required for head locations.
    """
    loc = _as_location(loc)
    pos = _positions(prompts, loc).to(act.device)
    if act.dim() != 3 or act.shape[0] != len(pos):
        raise ValueError(f"activation for {loc.key} has shape {tuple(act.shape)}; expected [N={len(pos)}, T, D]")
    out = act[torch.arange(len(pos), device=act.device), pos]
    if loc.head is not None:
        if d_head is None:
            raise ValueError(f"extract_location({loc.key}) needs d_head for a head location")
        out = out[:, loc.head * d_head : (loc.head + 1) * d_head]
    return out


def _batches(n: int, batch_size: int):
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, n, batch_size):
        yield slice(start, min(n, start + batch_size))


class PrefixCache:
    """Block inputs of clean forwards, so that a patched forward can resume at block L.

    A patch at a location of block L (or later) leaves blocks 0..L-1 unchanged, so their outputs
    are taken from this cache: :meth:`record` runs the clean prompts once, in mini-batches, and
    keeps, for every block, the positional and keyword arguments it was called with (hidden
    states [b, T, d_model], masks, position embeddings). :meth:`end_logits` then calls blocks
    L.., the final norm and the unembedding. The shortcut checks itself on the recording run (the
    logits it produces from the last block's output must match the model's own, else it is
    disabled and every forward runs from the start). Memory: n_layers x N x T x d_model floats.
    """

    def __init__(self, model: nn.Module, prompts: TaskPrompts, batch_size: int = 64):
        self.model, self.prompts, self.batch_size = model, prompts, batch_size
        self.parts = model_parts(model)
        self.batches: list[list[tuple[tuple, dict]]] = []
        self.clean_logits: list[Tensor] = []  # [b, V] END logits of each recorded mini-batch
        self.enabled = True
        self._record()

    def _record(self) -> None:
        blocks = self.parts.blocks
        device = next(self.model.parameters()).device
        for rows in _batches(len(self.prompts), self.batch_size):
            inputs: list[tuple[tuple, dict] | None] = [None] * len(blocks)
            handles = []

            def make(i):
                def pre(module, args, kwargs):
                    inputs[i] = (args, kwargs)

                return pre

            try:
                for i, b in enumerate(blocks):
                    handles.append(b.register_forward_pre_hook(make(i), with_kwargs=True))
                ids = self.prompts.input_ids[rows].to(device)
                end = self.prompts.positions["END"][rows].to(device)
                with torch.no_grad():
                    ref = _end_logits(self.model, ids, end)
                    last_out = self._run_blocks(inputs, len(blocks) - 1, None, only_last_input=True)
                    mine = self._head(last_out, end)
            finally:
                for h in handles:
                    h.remove()
            if any(x is None for x in inputs) or not torch.allclose(mine, ref, atol=1e-3, rtol=1e-3):
                self.enabled = False
                self.batches, self.clean_logits = [], []
                return
            self.batches.append(inputs)
            self.clean_logits.append(ref)

    def _run_blocks(self, inputs, start: int, h: Tensor | None, only_last_input: bool = False) -> Tensor:
        blocks = self.parts.blocks
        for i in range(start, len(blocks)):
            args, kwargs = inputs[i]
            key = None if args else ("hidden_states" if "hidden_states" in kwargs else next(iter(kwargs)))
            if h is None:
                h = args[0] if args else kwargs[key]
            call_args = (h,) + tuple(args[1:]) if args else ()
            call_kwargs = dict(kwargs) if args else {**kwargs, key: h}
            out = blocks[i](*call_args, **call_kwargs)
            h = out[0] if isinstance(out, (tuple, list)) else out
        return h

    def _head(self, h: Tensor, end: Tensor) -> Tensor:
        h = h[torch.arange(len(end), device=h.device), end]
        if self.parts.final_norm is not None:
            h = self.parts.final_norm(h)
        logits = self.parts.lm_head(h)
        cfg = getattr(self.model, "config", None)
        cap = getattr(cfg, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def end_logits(self, batch: int, start_layer: int, end: Tensor) -> Tensor:
        """Logits [b, V] at ``end`` for mini-batch ``batch``, recomputing blocks ``start_layer``.. only."""
        return self._head(self._run_blocks(self.batches[batch], start_layer, None), end)


def _start_layer(hooks) -> int | None:
    """First block a set of replacement hooks touches (None when ``embed`` is among them)."""
    layers = []
    for h in hooks:
        layer, kind = parse_hook_point(h)
        if layer is None:
            return None
        layers.append(layer)
    return min(layers) if layers else None


def logit_diff(
    model: nn.Module,
    prompts: TaskPrompts,
    batch_size: int = 64,
    replacements: Mapping[str, Callable[[Tensor, slice], Tensor]] | None = None,
    cache: PrefixCache | None = None,
) -> Tensor:
    """Per-prompt logit difference ``logit[answer] - logit[wrong]`` at END: Tensor [N] (logits).

    ``replacements`` (optional) maps hook points to ``fn(act [b, T, D], rows: slice) -> act'``,
    spliced in while each mini-batch ``rows`` runs (see :func:`patch_functions`). Runs under
    ``torch.no_grad()`` unless the caller enables gradients outside; only the END logits are
    computed. With a :class:`PrefixCache` of the same ``prompts`` (and batch size), the forward
    starts at the first block a replacement touches (no replacement: the recorded clean logits).
    """
    device = next(model.parameters()).device
    start = _start_layer(replacements or {}) if replacements else len(cache.parts.blocks) if cache else None
    use_cache = cache is not None and cache.enabled and start is not None
    if use_cache and (cache.prompts is not prompts or cache.batch_size != batch_size):
        raise ValueError("logit_diff: the PrefixCache was recorded for other prompts or another batch size")
    out = []
    for b, rows in enumerate(_batches(len(prompts), batch_size)):
        ids = prompts.input_ids[rows].to(device)
        end = prompts.positions["END"][rows].to(device)
        reps = {h: (lambda a, f=f, r=rows: f(a, r)) for h, f in (replacements or {}).items()}
        if use_cache and not reps:
            logits = cache.clean_logits[b]
        else:
            with splice(model, reps) if reps else nullcontext():
                logits = cache.end_logits(b, start, end) if use_cache else _end_logits(model, ids, end)
        ar = torch.arange(len(end), device=device)
        ld = logits[ar, prompts.answer_ids[rows].to(device)] - logits[ar, prompts.wrong_ids[rows].to(device)]
        out.append(ld if ld.dtype == torch.float64 else ld.float())
    return torch.cat(out)


def _end_logits(model: nn.Module, ids: Tensor, end: Tensor) -> Tensor:
    """Logits [b, V] at positions ``end`` [b]; computes the unembedding only at those positions."""
    uniq, inverse = torch.unique(end, return_inverse=True)
    try:
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=uniq).logits  # [b, U, V]
        return logits[torch.arange(len(end), device=ids.device), inverse]
    except TypeError:  # models without logits_to_keep
        logits = model(input_ids=ids, use_cache=False).logits
        return logits[torch.arange(len(end), device=ids.device), end]


def mean_logit_diff(model: nn.Module, prompts: TaskPrompts, batch_size: int = 64, **kw) -> float:
    """Mean over prompts of :func:`logit_diff` (a float, in logits)."""
    with torch.no_grad():
        return float(logit_diff(model, prompts, batch_size=batch_size, **kw).mean())


def location_activations(
    model: nn.Module,
    prompts: TaskPrompts,
    locations: Sequence[Location | str],
    batch_size: int = 64,
    replacements: Mapping[str, Callable[[Tensor], Tensor]] | None = None,
) -> dict[str, Tensor]:
    """Activations at each location: ``{location key: Tensor [N, d_loc]}`` (no grad, model dtype).

    ``replacements`` (``{hook: fn(act) -> act'}``, applied to every mini-batch) are spliced in
    first, so the captured values are those of the modified forward (e.g. a residual SAE's
    reconstruction upstream). The forward stops after the deepest hook point needed.
    """
    locs = [_as_location(l) for l in locations]
    if not locs:
        return {}
    hooks = list(dict.fromkeys(l.hook for l in locs))
    d_head = _d_head(model) if any(l.head is not None for l in locs) else None
    device = next(model.parameters()).device
    parts: dict[str, list[Tensor]] = {l.key: [] for l in locs}
    with torch.no_grad():
        for rows in _batches(len(prompts), batch_size):
            sub = prompts.select(range(rows.start, rows.stop))
            with splice(model, dict(replacements)) if replacements else nullcontext():
                acts = run_with_capture(model, sub.input_ids.to(device), hooks)
            for l in locs:
                parts[l.key].append(extract_location(acts[l.hook], sub, l, d_head))
    return {k: torch.cat(v) for k, v in parts.items()}


def patch_functions(
    model: nn.Module,
    prompts: TaskPrompts,
    values: Mapping[Location | str, Tensor],
) -> dict[str, Callable[[Tensor, slice], Tensor]]:
    """Build ``{hook: fn(act, rows) -> act'}`` that writes ``values[loc][rows]`` into each location.

    ``values[loc]`` is a Tensor [N, d_loc] (one row per prompt of ``prompts``). Pass the result
    as ``replacements`` to :func:`logit_diff`. Several locations on one hook point are written
    by one function.
    """
    d_head = None
    by_hook: dict[str, list[tuple[Location, Tensor]]] = {}
    for loc, v in values.items():
        loc = _as_location(loc)
        if v.dim() != 2 or v.shape[0] != len(prompts):
            raise ValueError(f"patch value for {loc.key} has shape {tuple(v.shape)}; expected [N={len(prompts)}, d]")
        if loc.head is not None and d_head is None:
            d_head = _d_head(model)
        by_hook.setdefault(loc.hook, []).append((loc, v))

    def make(items: list[tuple[Location, Tensor]]):
        def fn(act: Tensor, rows: slice) -> Tensor:
            out = act.clone()
            ar = torch.arange(out.shape[0], device=out.device)
            for loc, v in items:
                pos = _positions(prompts, loc)[rows].to(out.device)
                vals = v[rows].to(device=out.device, dtype=out.dtype)
                if loc.head is None:
                    if vals.shape[-1] != out.shape[-1]:
                        raise ValueError(
                            f"patch value for {loc.key} has width {vals.shape[-1]}, the hook has {out.shape[-1]}"
                        )
                    out[ar, pos] = vals
                else:
                    lo = loc.head * d_head
                    if vals.shape[-1] != d_head or lo + d_head > out.shape[-1]:
                        raise ValueError(
                            f"patch value for {loc.key} must have width d_head={d_head} inside {out.shape[-1]}"
                        )
                    out[ar, pos, lo : lo + d_head] = vals
            return out

        return fn

    return {hook: make(items) for hook, items in by_hook.items()}


def patched_logit_diff(
    model: nn.Module,
    prompts: TaskPrompts,
    values: Mapping[Location | str, Tensor],
    batch_size: int = 64,
    extra: Mapping[str, Callable[[Tensor, slice], Tensor]] | None = None,
    cache: PrefixCache | None = None,
) -> float:
    """Mean LD when each location's activation is replaced by ``values[loc]`` [N, d_loc] (logits).

    ``extra``: more ``{hook: fn(act, rows)}`` replacements applied in the same forward (a hook may
    not appear in both).
    """
    reps = patch_functions(model, prompts, values)
    for h, f in (extra or {}).items():
        if h in reps:
            raise ValueError(f"hook {h} is both patched and in extra replacements")
        reps[h] = f
    return mean_logit_diff(model, prompts, batch_size=batch_size, replacements=reps, cache=cache)

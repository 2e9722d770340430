"""Sparsity of downstream effects (Gao et al. 2024): ablate one latent, measure how many logits move.

With the SAE spliced in at its hook point (kept positions), one latent j that is active at position
p of a window is set to 0 in the code at p only (the reconstruction at p is decoded again without
it: x^' = x^ - z_j W_dec,j, exact since decoding is linear). The change of the final logits
Δ = logits(ablated) - logits(spliced) is measured at positions t = p .. C-1 (C = context length;
t = p is the prediction made right at the ablated token). For each such position::

    s_t = (sum_v |Δ_tv|)^2 / (sum_v Δ_tv^2) / V          in [1/V, 1]

(1/V: the ablation moves a single logit; 1: every logit moves by the same amount). A latent's
ablation sparsity is the mean of s_t over the positions where Δ is not identically zero; the
report gives the mean over sampled latents (lower = sparser downstream effect).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "ablation_sparsity",
    "latent_ablation_effects",
    "summarize_ablation",
    "sample_ablation_targets",
    "ablation_eval",
]


def ablation_sparsity(delta: Tensor) -> Tensor:
    """(sum_v |Δ_v|)^2 / (sum_v Δ_v^2) / V over the last dim of ``delta`` [..., V].

    Returns float64 [...]; NaN where Δ is identically zero (no effect, sparsity undefined).
    """
    if delta.ndim == 0 or delta.shape[-1] == 0:
        raise ValueError(f"delta must be [..., V] with V > 0, got shape {tuple(delta.shape)}.")
    d = delta.double()
    l1 = d.abs().sum(-1)
    l2 = d.square().sum(-1)
    out = l1.square() / l2 / d.shape[-1]
    return torch.where(l2 > 0, out, torch.full_like(out, float("nan")))


@torch.no_grad()
def latent_ablation_effects(model: nn.Module, sae, input_ids: Tensor, keep: Tensor, hook_point: str,
                            targets: Sequence[tuple], batch_size: int = 8, progress: bool = False) -> list:
    """Ablate single latents at single positions and measure the logit changes.

    Args:
        model: HF causal LM (eval mode).
        sae: the SparseAutoencoder spliced in at ``hook_point`` (at the kept positions).
        input_ids: [B, C] windows (C = context used for the measurement).
        keep: bool [B, C] positions where the SAE is spliced in.
        targets: ``(row, position, latent)`` triples; the latent should be active there.
        batch_size: rows per forward (each forward holds one unablated copy plus ablated copies).
    Returns:
        list of dicts (one per target, in order) with ``row``, ``position``, ``latent``,
        ``value`` (the ablated latent's activation), ``sparsity`` (mean s_t, NaN if no effect),
        ``n_positions`` (positions with an effect) and ``effect_l2`` (||Δ|| at t = p).
    """
    from tqdm.auto import tqdm

    from hf_sae.hooks import splice

    if input_ids.ndim != 2 or keep.shape != input_ids.shape:
        raise ValueError(
            f"input_ids [B, C] and keep [B, C] must match; got {tuple(input_ids.shape)}, {tuple(keep.shape)}."
        )
    if batch_size < 2:
        raise ValueError("batch_size must be >= 2 (one unablated row + at least one ablated row).")
    B, C = input_ids.shape
    for r, p, j in targets:
        if not (0 <= r < B and 0 <= p < C and 0 <= j < sae.config.n_latents):
            raise ValueError(
                f"target (row={r}, position={p}, latent={j}) is out of range "
                f"(B={B}, C={C}, n_latents={sae.config.n_latents})."
            )
        if not bool(keep[r, p]):
            raise ValueError(f"target (row={r}, position={p}) is not a kept position; the SAE is not spliced there.")
    by_row = defaultdict(list)
    for i, (r, p, j) in enumerate(targets):
        by_row[int(r)].append((i, int(p), int(j)))
    results: list = [None] * len(targets)
    scale = float(sae.config.input_scale)
    chunks = []
    for r, items in by_row.items():
        for s in range(0, len(items), batch_size - 1):
            chunks.append((r, items[s : s + batch_size - 1]))
    for r, items in tqdm(chunks, desc="ablation", disable=not progress):
        n = 1 + len(items)
        ids = input_ids[r : r + 1].expand(n, C)
        kmask = keep[r : r + 1].expand(n, C)
        values = torch.zeros(len(items))

        def fn(act: Tensor) -> Tensor:
            out = act.clone()
            rows = act[kmask]
            out[kmask] = sae(rows).reconstruction.to(act.dtype)
            for b, (_, p, j) in enumerate(items, start=1):
                z = sae.encode(act[b, p])[j]
                values[b - 1] = float(z)
                stats = sae.input_norm_stats(act[b, p])  # per-token layer norm: the latent's share scales by sigma
                unit = scale if stats is None else scale / stats[1].to(sae.W_dec.dtype)
                out[b, p] = out[b, p] - (z * sae.W_dec[j] / unit).to(act.dtype)
            return out

        with splice(model, {hook_point: fn}):
            logits = model(input_ids=ids, use_cache=False).logits.float()
        for b, (i, p, j) in enumerate(items, start=1):
            delta = logits[b, p:] - logits[0, p:]
            s = ablation_sparsity(delta)
            ok = ~torch.isnan(s)
            results[i] = {
                "row": r,
                "position": p,
                "latent": j,
                "value": float(values[b - 1]),
                "sparsity": float(s[ok].mean()) if ok.any() else float("nan"),
                "n_positions": int(ok.sum()),
                "effect_l2": float(delta[0].double().norm()),
            }
    return results


def summarize_ablation(results: Sequence[dict]) -> dict:
    """Mean ablation sparsity over targets with an effect, and how many had none."""
    vals = [r["sparsity"] for r in results if r["sparsity"] == r["sparsity"]]
    return {
        "n_latents": len(results),
        "n_with_effect": len(vals),
        "ablation_sparsity": (sum(vals) / len(vals)) if vals else float("nan"),
        "ablation_sparsity_median": (float(torch.tensor(vals).median()) if vals else float("nan")),
    }


def sample_ablation_targets(keep: Tensor, code_values: Tensor, code_indices: Tensor, n_latents: int, context: int,
                            n_rows: int, generator: torch.Generator) -> list:
    """Draw (with ``generator``) up to ``n_latents`` distinct latents active in the first ``n_rows`` windows at a
    position p <= context - min(8, context - 1), and for each one occurrence: sorted ``[(row, p, latent)]``.

    ``keep`` [N, T] marks the tokens that have a code (row-major rows of ``code_values``/``code_indices`` [M, w])."""
    T = keep.shape[1]
    min_after = min(8, context - 1)
    kept_pos = keep.flatten().nonzero().squeeze(-1)  # kept token index -> (row, pos)
    rows_k, pos_k = kept_pos // T, kept_pos % T
    tok_idx = ((rows_k < n_rows) & (pos_k <= context - min_after)).nonzero().squeeze(-1)
    v_sub, i_sub = code_values[tok_idx], code_indices[tok_idx]
    active = v_sub != 0
    pairs_tok = tok_idx.unsqueeze(-1).expand_as(i_sub)[active]
    pairs_lat = i_sub[active]
    uniq = torch.unique(pairs_lat)
    chosen = uniq[torch.randperm(uniq.numel(), generator=generator)][:n_latents]
    targets = []
    for lat in chosen.tolist():
        occ = pairs_tok[pairs_lat == lat]
        pick = int(occ[torch.randint(occ.numel(), (1,), generator=generator)])
        targets.append((int(rows_k[pick]), int(pos_k[pick]), int(lat)))
    return sorted(targets)


@torch.no_grad()
def ablation_eval(model: nn.Module, sae, input_ids: Tensor, keep: Tensor, hook_point: str, code_values: Tensor,
                  code_indices: Tensor, n_latents: int, context: int, generator: torch.Generator,
                  batch_size: int = 8, device="cpu", progress: bool = False) -> dict:
    """The ``ablation`` section of ``hf-sae eval``: :func:`sample_ablation_targets` in the first 4 windows cut to
    ``C = min(context, T)`` tokens, then :func:`latent_ablation_effects`.

    Returns ``{"summary", "latents", "context"}``."""
    N, T = keep.shape
    C = min(context, T)
    n_rows = min(N, 4)
    targets = sample_ablation_targets(keep, code_values, code_indices, n_latents, C, n_rows, generator)
    eff = latent_ablation_effects(model, sae, input_ids[:n_rows, :C].to(device), keep[:n_rows, :C].to(device),
                                  hook_point, targets, batch_size=max(2, batch_size), progress=progress)
    return {"summary": summarize_ablation(eff), "latents": eff, "context": C}

"""``evaluate_sae``: every metric of the papers on one SAE, as a typed Python call.

The stages (each metric's data handling lives in its own module; ``metrics`` selects them):

- read ``n_tokens`` kept tokens of the text source and run the LM up to the hook point once
  (:func:`encode_tokens`): ``reconstruction`` statistics, ``afa`` sums, and the sparse code that
  ``probes`` / ``n2g`` / ``ablation`` read;
- ``afa``: :func:`afa_section`; ``probes``: :func:`hf_sae.evaluation.probes.probe_recovery`;
  ``n2g``: :func:`hf_sae.evaluation.n2g.n2g_from_codes`; ``n2g_faithful``:
  :func:`hf_sae.evaluation.n2g.n2g_faithful_evaluate`; ``downstream``:
  :func:`hf_sae.evaluation.downstream.downstream_eval`; ``ablation``:
  :func:`hf_sae.evaluation.ablation.ablation_eval`;
- :func:`summarize` picks the headline numbers; :func:`write_eval_outputs` writes ``metrics.json``
  and the HTML report.

``hf-sae eval`` (:mod:`hf_sae.evaluation.run`) is a thin command-line adapter over :func:`evaluate_sae`::

    from hf_sae.evaluation import evaluate_sae
    results = evaluate_sae(sae, model, tokenizer, metrics=["reconstruction", "downstream"], n_tokens=20_000)
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch

from ..cli_args import ALL_METRICS, OPTIONAL_METRICS
from .inputs import MAX_CODE_WIDTH, finite_or_none, kept_windows, load_lm_for, pad_cat, trim_mask

__all__ = [
    "ALL_METRICS",
    "OPTIONAL_METRICS",
    "parse_metrics",
    "EncodedTokens",
    "encode_tokens",
    "afa_section",
    "summarize",
    "write_eval_outputs",
    "evaluate_sae",
]

# The metric names live in hf_sae.cli_args (torch-free, for --help); OPTIONAL_METRICS run only when named
# ("all" leaves them out): the faithful N2G re-runs the LM on every edited context of every explained latent.


def parse_metrics(spec: Union[str, Sequence[str], None]) -> list:
    """``"all"`` / None / "" -> :data:`ALL_METRICS`; else the named metrics (a comma string or a list), checked."""
    if spec is None or (isinstance(spec, str) and spec in ("", "all")):
        return list(ALL_METRICS)
    names = [m.strip() for m in spec.split(",")] if isinstance(spec, str) else [str(m).strip() for m in spec]
    names = [m for m in names if m]
    bad = [m for m in names if m not in ALL_METRICS + OPTIONAL_METRICS]
    if bad:
        raise ValueError(f"unknown metrics {bad}; choose from {', '.join(ALL_METRICS + OPTIONAL_METRICS)} (or 'all').")
    return names


@dataclass
class EncodedTokens:
    """What one pass of the LM (to the hook point) and the SAE over the kept tokens leaves behind."""

    stats: object
    """:class:`~hf_sae.evaluation.reconstruction.ReconstructionStats` over every kept token."""
    afa_stats: object
    """:class:`~hf_sae.evaluation.afa.AFAStats` (empty unless ``afa`` was asked)."""
    code_values: Optional[torch.Tensor] = None
    """float32 [M, w]: each kept token's code values (w = k, or <= MAX_CODE_WIDTH for dense codes); None if unused."""
    code_indices: Optional[torch.Tensor] = None
    """int64 [M, w]: the latent index of each value of ``code_values``."""
    x_probe: list = field(default_factory=list)
    """Activation chunks [m_i, d] of the first probed tokens (the probes' baselines)."""
    code_truncated: bool = False
    """True when a dense code had more than MAX_CODE_WIDTH non-zero latents on some token."""
    sae_seconds: float = 0.0
    """Wall time spent in the SAE and the running statistics (not the LM)."""


@torch.no_grad()
def encode_tokens(sae, model, input_ids: torch.Tensor, keep: torch.Tensor, hook_point: str, *, batch_size: int,
                  device, need_codes: bool, afa: bool, n_probe: int = 0, progress: bool = False) -> EncodedTokens:
    """Run ``model`` over ``input_ids`` [N, T] ``batch_size`` windows at a time, capture ``hook_point`` at the
    kept positions (``keep`` [N, T], row-major) and encode them with ``sae``.

    ``need_codes``: keep the sparse code for probes / N2G / ablation; ``afa``: accumulate the AFA sums;
    ``n_probe``: keep the activations of the first ``n_probe`` kept tokens."""
    from tqdm.auto import tqdm

    from hf_sae.hooks import run_with_capture

    from .afa import AFAStats
    from .reconstruction import ReconstructionStats

    enc = EncodedTokens(stats=ReconstructionStats(n_latents=sae.config.n_latents), afa_stats=AFAStats())
    vals_chunks, idx_chunks = [], []
    n_seen = 0
    for s in tqdm(range(0, input_ids.shape[0], batch_size), desc="activations", disable=not progress):
        b_ids = input_ids[s : s + batch_size].to(device)
        b_keep = keep[s : s + batch_size].to(device)
        if not b_keep.any():
            continue
        acts = run_with_capture(model, b_ids, [hook_point])[hook_point].to(device)  # dispatched LM: layer device
        ts = time.perf_counter()
        x = acts[b_keep].float()
        out = sae(x)
        if out.latent_values is not None:
            v, i = out.latent_values, out.latent_indices
            enc.stats.update(x, out.reconstruction, latent_values=v, latent_indices=i)
        else:
            enc.stats.update(x, out.reconstruction, latents=out.latents)
            if need_codes:  # dense activation: keep the largest MAX_CODE_WIDTH latents per token
                width = min(MAX_CODE_WIDTH, out.latents.shape[-1])
                v, i = out.latents.topk(width, dim=-1)
                if int((out.latents != 0).sum(-1).max()) > width:
                    enc.code_truncated = True
        if afa:
            enc.afa_stats.update_from_sae(sae, x, out)
        if need_codes:
            vals_chunks.append(v.float().cpu())
            idx_chunks.append(i.to(torch.int32).cpu())
        if n_seen < n_probe:
            enc.x_probe.append(x[: n_probe - n_seen].cpu())
        n_seen += x.shape[0]
        enc.sae_seconds += time.perf_counter() - ts
    if need_codes:
        enc.code_values, enc.code_indices = pad_cat(vals_chunks), pad_cat(idx_chunks).long()
    return enc


def afa_section(afa_stats, sae) -> dict:
    """The ``afa`` section: the AFA relative gap statistics, decoder cosine statistics and the gap histogram."""
    from .afa import decoder_cosine_stats

    afa = afa_stats.compute()
    afa.update(decoder_cosine_stats(sae.W_dec.detach().cpu()))
    afa["gap_histogram"] = afa_stats.histogram()
    afa["n_latents"] = sae.config.n_latents
    return afa


_SUMMARY_KEYS = {
    "reconstruction": ("fvu", "mse", "explained_variance", "cosine_similarity", "l0", "dead_fraction"),
    "downstream": ("ce_clean", "ce_spliced", "delta_loss", "kl", "frac_recovered_zero", "frac_recovered_mean"),
    "afa": ("eps_lbo_mean", "eps_lbo_h1_mean", "eps_max", "eps_mean", "afa_gap_mean", "afa_gap_abs_mean"),
}


def summarize(results: dict) -> dict:
    """The headline numbers of every section present in ``results`` (one flat dict)."""
    summary = {}
    if "reconstruction" in results:
        summary.update({k: results["reconstruction"].get(k) for k in _SUMMARY_KEYS["reconstruction"]})
    if "downstream" in results:
        summary.update({k: results["downstream"].get(k) for k in _SUMMARY_KEYS["downstream"]})
    if "probes" in results:
        summary.update({k: v for k, v in results["probes"]["summary"].items() if k.startswith("mean_probe_loss")})
    for name in ("n2g", "n2g_faithful"):
        if name in results and "f1" in results[name]["summary"]:
            summary.update({f"{name}_{k}": results[name]["summary"][k] for k in ("precision", "recall", "f1")})
    if "ablation" in results:
        summary["ablation_sparsity"] = results["ablation"]["summary"]["ablation_sparsity"]
    if "afa" in results:
        summary.update({k: results["afa"][k] for k in _SUMMARY_KEYS["afa"] if k in results["afa"]})
    return summary


def write_eval_outputs(results: dict, out_dir: Union[str, Path], report: bool = True, zf_points=None) -> dict:
    """Write ``metrics.json`` (NaN/inf as null) and, with ``report``, ``report.html`` + PNGs into ``out_dir``.

    ``zf_points``: the AFA (Z, F) scatter as two lists. Returns the JSON-safe results."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = finite_or_none(results)
    (out_dir / "metrics.json").write_text(json.dumps(results, indent=1))
    if report:
        from .report import write_report

        write_report(results, out_dir, zf_points=zf_points)
    return results


def _check_positive(**values) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ValueError(f"{name} must be > 0, got {value}.")


def _meta(sae, label, subfolder, hook, model_name, dataset, split, window, n_tokens, device, seed, truncated) -> dict:
    cfg = sae.config
    return {
        "sae_path": label,
        "subfolder": subfolder,
        "hook_point": hook,
        "model": model_name,
        "activation": cfg.activation,
        "k": cfg.k,
        "d_in": cfg.d_in,
        "n_latents": cfg.n_latents,
        "dataset": dataset,
        "split": split,
        "window": window,
        "n_tokens": n_tokens,
        "device": str(device),
        "seed": seed,
        "torch_threads": torch.get_num_threads(),
        "code_truncated_to": MAX_CODE_WIDTH if truncated else None,
    }


@torch.no_grad()
def evaluate_sae(
    sae,
    model=None,
    tokenizer=None,
    *,
    metrics: Union[str, Sequence[str]] = "all",
    n_tokens: int = 100_000,
    hook_point: Optional[str] = None,
    model_name: Optional[str] = None,
    dataset: str = "default",
    split: str = "validation",
    text_column: str = "text",
    window: int = 256,
    batch_size: int = 8,
    downstream_tokens: int = 2048,
    probe_tokens: int = 30_000,
    probe_baselines: Sequence[str] = ("raw_basis", "random_directions"),
    n2g_latents: int = 64,
    ablation_latents: int = 16,
    ablation_context: int = 64,
    seed: int = 0,
    device: Union[str, torch.device] = "cpu",
    progress: bool = True,
    out_dir: Union[str, Path, None] = None,
    report: bool = True,
    sae_label: Optional[str] = None,
    subfolder: Optional[str] = None,
    placement: Optional[dict] = None,
) -> dict:
    """Evaluate ``sae`` on ``n_tokens`` kept tokens of ``dataset``/``split``; return the results dict
    (sections per metric, ``meta``, ``summary``, ``timings_s``).

    Args:
        sae: a :class:`~hf_sae.SparseAutoencoder`. model, tokenizer: the LM (default: ``model_name``, else the
            SAE's ``config.base_model``, else the embedded SmolLM2-135M). hook_point: default the SAE's.
        metrics: "all" (= :data:`ALL_METRICS`) or names from :data:`ALL_METRICS` + :data:`OPTIONAL_METRICS`.
        n_tokens: kept tokens for reconstruction / AFA / N2G (downstream_tokens, probe_tokens: the first ones
            those use); window: tokens per window; batch_size: windows per LM forward; n2g_latents,
            ablation_latents: latents sampled (seeded by ``seed``); ablation_context: tokens per ablation forward.
        out_dir: also write ``metrics.json`` (+ ``report.html`` and PNGs when ``report``) there, and add
            ``out_dir`` to the returned dict. sae_label, subfolder: only label ``meta``. placement: see load_lm_for.
    """
    t_start = time.perf_counter()
    metrics = parse_metrics(metrics)
    _check_positive(n_tokens=n_tokens, window=window, batch_size=batch_size)
    torch.manual_seed(seed)
    device, timings, t = torch.device(device), {}, time.perf_counter()
    sae = sae.to(device).eval()
    model, tokenizer, hook, model_name = load_lm_for(sae, model, tokenizer, hook_point, model_name, device, placement)
    timings["load"] = time.perf_counter() - t
    t = time.perf_counter()
    ids, keep = kept_windows(dataset, tokenizer, n_tokens, window=window, split=split, text_column=text_column)
    timings["tokenize"] = time.perf_counter() - t
    t = time.perf_counter()
    probe_keep = trim_mask(keep, probe_tokens) if "probes" in metrics else None
    n_probe = int(probe_keep.sum()) if probe_keep is not None else 0
    enc = encode_tokens(sae, model, ids, keep, hook, batch_size=batch_size, device=device, afa="afa" in metrics,
                        need_codes=any(m in metrics for m in ("probes", "n2g", "ablation")), n_probe=n_probe,
                        progress=progress)
    timings["activations_and_reconstruction"] = time.perf_counter() - t
    timings["of_which_sae_and_stats"] = enc.sae_seconds
    rec = enc.stats.compute()
    rec["histograms"] = enc.stats.histograms()
    results: dict = {"meta": _meta(sae, sae_label or getattr(sae, "name_or_path", None), subfolder, hook, model_name,
                                   dataset, split, window, rec["n_tokens"], device, seed, enc.code_truncated)}
    if "reconstruction" in metrics:
        results["reconstruction"] = rec
    _run_sections(results, timings, metrics, enc, sae=sae, model=model, tokenizer=tokenizer, ids=ids, keep=keep,
                  hook=hook, probe_keep=probe_keep, probe_baselines=probe_baselines, n_tokens=n_tokens,
                  n2g_latents=n2g_latents, downstream_tokens=downstream_tokens, ablation_latents=ablation_latents,
                  ablation_context=ablation_context, dataset=dataset, split=split, window=window,
                  batch_size=batch_size, seed=seed, device=device, progress=progress)
    results["summary"] = summarize(results)
    timings["total"] = time.perf_counter() - t_start
    results["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
    if out_dir is None:
        return finite_or_none(results)
    zf = enc.afa_stats.points if "afa" in metrics else None
    zf = (zf[0].tolist(), zf[1].tolist()) if zf is not None else None
    return {**write_eval_outputs(results, out_dir, report=report, zf_points=zf), "out_dir": str(out_dir)}


def _run_sections(results: dict, timings: dict, metrics: list, enc: EncodedTokens, *, sae, model, tokenizer, ids,
                  keep, hook, probe_keep, probe_baselines, n_tokens, n2g_latents, downstream_tokens,
                  ablation_latents, ablation_context, dataset, split, window, batch_size, seed, device, progress):
    """Every metric section after the encoding pass, in order, each timed into ``timings``."""
    from .ablation import ablation_eval
    from .downstream import downstream_eval
    from .n2g import n2g_faithful_evaluate, n2g_from_codes
    from .probes import probe_recovery

    g = torch.Generator().manual_seed(seed)  # n2g then ablation draw from it, in this order
    mean_act = (enc.stats.sum_x / enc.stats.count).float()
    cv, ci, n_lat = enc.code_values, enc.code_indices, sae.config.n_latents
    sections = [
        ("afa", True, lambda: afa_section(enc.afa_stats, sae)),
        ("probes", True, lambda: probe_recovery(
            ids, probe_keep, cv, ci, n_lat, tokenizer, x=torch.cat(enc.x_probe) if enc.x_probe else None,
            baselines=[b for b in (probe_baselines.split(",") if isinstance(probe_baselines, str) else probe_baselines)
                       if b], seed=seed, progress=progress)),
        ("n2g", n2g_latents > 0, lambda: n2g_from_codes(
            ids, keep, cv, ci, n_lat, n2g_latents, tokenizer, g, progress=progress)),
        ("n2g_faithful", n2g_latents > 0, lambda: n2g_faithful_evaluate(
            model, tokenizer, sae, hook, n_tokens=n_tokens, n_latents=n2g_latents, dataset=dataset, split=split,
            window=window, seed=seed)),
        ("downstream", downstream_tokens > 0, lambda: downstream_eval(
            model, sae, ids, keep, hook, downstream_tokens, mean_act, batch_size=batch_size, device=device,
            progress=progress)),
        ("ablation", ablation_latents > 0, lambda: ablation_eval(
            model, sae, ids, keep, hook, cv, ci, ablation_latents, ablation_context, g, batch_size=batch_size,
            device=device, progress=progress)),
    ]
    for name, enabled, run in sections:
        if name in metrics and enabled:
            t = time.perf_counter()
            results[name] = run()
            timings[name] = time.perf_counter() - t

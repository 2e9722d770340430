"""``hf-sae eval SAE_PATH``: every metric of the papers on one SAE, written as JSON + an HTML report.

Stages (each can be switched with ``--metrics``):

- ``reconstruction`` + ``afa``: on ``--n-tokens`` kept tokens (the LM forward stops right after the
  hook point): MSE, FVU, explained variance, cosine, L0 (+ histogram), firing density, dead
  latents; the AFA relative gap, decoder cosine statistics and the ZF plot.
- ``probes``: best single-latent 1-D logistic probe on automatically labelled token tasks, on the
  first ``--probe-tokens`` tokens, against the raw activation basis and random directions.
- ``n2g``: n-gram explanations of ``--n2g-latents`` sampled latents (even windows build, odd
  windows test).
- ``downstream``: 4 full LM forwards (clean, spliced, zero- and mean-ablated) on the first
  ``--downstream-tokens`` tokens.
- ``ablation``: ``--ablation-latents`` sampled latents ablated one at a time in the spliced
  forward over ``--ablation-context`` tokens.
- ``n2g_faithful`` (only when named): the paper's N2G (pruned contexts, wildcards, a trie; see
  ``hf_sae.evaluation.n2g``) for ``--n2g-latents`` latents, built on even windows, scored on odd ones.

Python use::

    parser = argparse.ArgumentParser(); add_eval_args(parser)
    results = run_eval(parser.parse_args(["path/to/sae", "--out", "eval_out"]))
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch

from ..cli_args import ALL_METRICS, OPTIONAL_METRICS, add_eval_args, add_sae_source_args  # noqa: F401  (torch-free)

__all__ = ["ALL_METRICS", "OPTIONAL_METRICS", "add_eval_args", "run_eval", "main"]

MAX_CODE_WIDTH = 256
"""Dense-activation SAEs (relu, jumprelu, batchtopk at inference): the code kept in memory for probes,
N2G and ablation holds each token's largest MAX_CODE_WIDTH latents (reconstruction metrics use all)."""


def _parse_metrics(spec: str) -> list:
    if spec in (None, "", "all"):
        return list(ALL_METRICS)
    names = [m.strip() for m in spec.split(",") if m.strip()]
    bad = [m for m in names if m not in ALL_METRICS + OPTIONAL_METRICS]
    if bad:
        raise ValueError(f"unknown metrics {bad}; choose from {', '.join(ALL_METRICS + OPTIONAL_METRICS)} (or 'all').")
    return names


def _load_sae(path: str, subfolder: Optional[str], device):
    from hf_sae import SparseAutoencoder

    p = Path(path).expanduser()  # a missing path or SAE raises an error listing what is there (from_pretrained)
    kw = {"subfolder": subfolder} if subfolder else {}
    sae = SparseAutoencoder.from_pretrained(str(p) if p.exists() else path, **kw)
    return sae.to(device).eval()


def _collect_windows(args, tokenizer, n_tokens_needed: int):
    """Token windows whose kept positions number >= n_tokens_needed (or all the source has)."""
    from hf_sae.data import corpus

    return corpus.windows_with_tokens(
        args.dataset, tokenizer, n_tokens_needed, window=args.window, split=args.split, text_column=args.text_column
    )


def _trim_mask(keep: torch.Tensor, n: int) -> torch.Tensor:
    """Keep only the first n True entries (row-major) of a bool [N, T] mask."""
    flat = keep.flatten().clone()
    idx = flat.nonzero().squeeze(-1)
    flat[idx[n:]] = False
    return flat.view_as(keep)


def _pad_cat(chunks: list, fill=0) -> torch.Tensor:
    width = max(c.shape[1] for c in chunks)
    return torch.cat([torch.nn.functional.pad(c, (0, width - c.shape[1]), value=fill) for c in chunks])


def _finite(d):
    """Replace NaN/inf floats by None so that the JSON is standard."""
    if isinstance(d, dict):
        return {k: _finite(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_finite(v) for v in d]
    if isinstance(d, float) and not math.isfinite(d):
        return None
    return d


@torch.no_grad()
def run_eval(args: argparse.Namespace, sae=None, model=None, tokenizer=None) -> dict:
    """Run the evaluation described by ``args`` (see :func:`add_eval_args`); write
    ``metrics.json`` (+ ``report.html`` and PNGs) into ``args.out``; return the results dict.

    ``sae`` / ``model`` + ``tokenizer`` may be passed already loaded (then ``args.sae_path`` /
    ``args.model`` only label the report)."""
    from tqdm.auto import tqdm

    from hf_sae.data import corpus
    from hf_sae.data.models import DEFAULT_MODEL, load_model
    from hf_sae.hooks import hook_point_dim, run_with_capture

    from .ablation import latent_ablation_effects, summarize_ablation
    from .afa import AFAStats, decoder_cosine_stats
    from .downstream import DownstreamStats, downstream_batch
    from .n2g import n2g_evaluate, summarize_n2g
    from .probes import run_probe_tasks, task_labels
    from .reconstruction import ReconstructionStats

    t_start = time.perf_counter()
    timings: dict = {}
    metrics = _parse_metrics(args.metrics)
    progress = not getattr(args, "no_progress", False)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    for name in ("n_tokens", "window", "batch_size"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}.")

    t = time.perf_counter()
    sae = _load_sae(args.sae_path, args.subfolder, device) if sae is None else sae.to(device).eval()
    cfg = sae.config
    hook = args.hook_point or cfg.hook_point
    if not hook:
        raise ValueError("the SAE's config has no hook_point; pass --hook-point (e.g. layers.6.resid_post).")
    model_name = args.model or cfg.base_model or DEFAULT_MODEL
    if model is None or tokenizer is None:
        model, tokenizer = load_model(model_name, device=device)
    dim = hook_point_dim(model, hook)
    if dim != cfg.d_in:
        raise ValueError(f"hook point {hook!r} of {model_name} has width {dim} but the SAE expects d_in={cfg.d_in}.")
    timings["load"] = time.perf_counter() - t

    # ---------------------------------------------------------------- data
    t = time.perf_counter()
    need = args.n_tokens
    ids = _collect_windows(args, tokenizer, need)
    keep_all = corpus.token_mask(ids, tokenizer)
    n_avail = int(keep_all.sum())
    if n_avail < need:
        print(
            f"[hf-sae eval] warning: {args.dataset!r}/{args.split} has only {n_avail} usable tokens "
            f"(< --n-tokens {need}); evaluating on {n_avail}."
        )
    keep = _trim_mask(keep_all, need)
    N, T = ids.shape
    timings["tokenize"] = time.perf_counter() - t

    # ---------------------------------------------------------------- phase A: activations at the hook point
    t = time.perf_counter()
    stats = ReconstructionStats(n_latents=cfg.n_latents)
    afa_stats = AFAStats()
    need_codes = any(m in metrics for m in ("probes", "n2g", "ablation"))
    probe_keep = _trim_mask(keep, args.probe_tokens) if "probes" in metrics else None
    n_probe = int(probe_keep.sum()) if probe_keep is not None else 0
    vals_chunks, idx_chunks, x_probe = [], [], []
    code_truncated = False
    n_seen = 0
    sae_time = 0.0
    for s in tqdm(range(0, N, args.batch_size), desc="activations", disable=not progress):
        b_ids = ids[s : s + args.batch_size].to(device)
        b_keep = keep[s : s + args.batch_size].to(device)
        if not b_keep.any():
            continue
        acts = run_with_capture(model, b_ids, [hook])[hook]
        ts = time.perf_counter()
        x = acts[b_keep].float()
        out = sae(x)
        if out.latent_values is not None:
            v, i = out.latent_values, out.latent_indices
            stats.update(x, out.reconstruction, latent_values=v, latent_indices=i)
        else:
            stats.update(x, out.reconstruction, latents=out.latents)
            if need_codes:  # dense activation: keep the largest MAX_CODE_WIDTH latents per token
                width = min(MAX_CODE_WIDTH, out.latents.shape[-1])
                v, i = out.latents.topk(width, dim=-1)
                if int((out.latents != 0).sum(-1).max()) > width:
                    code_truncated = True
        if "afa" in metrics:
            afa_stats.update_from_sae(sae, x, out)
        if need_codes:
            vals_chunks.append(v.float().cpu())
            idx_chunks.append(i.to(torch.int32).cpu())
        if n_seen < n_probe:
            x_probe.append(x[: n_probe - n_seen].cpu())
        n_seen += x.shape[0]
        sae_time += time.perf_counter() - ts
    timings["activations_and_reconstruction"] = time.perf_counter() - t
    timings["of_which_sae_and_stats"] = sae_time
    rec = stats.compute()
    rec["histograms"] = stats.histograms()
    results: dict = {
        "meta": {
            "sae_path": str(args.sae_path),
            "subfolder": args.subfolder,
            "hook_point": hook,
            "model": model_name,
            "activation": cfg.activation,
            "k": cfg.k,
            "d_in": cfg.d_in,
            "n_latents": cfg.n_latents,
            "dataset": args.dataset,
            "split": args.split,
            "window": args.window,
            "n_tokens": rec["n_tokens"],
            "device": str(device),
            "seed": args.seed,
            "torch_threads": torch.get_num_threads(),
            "code_truncated_to": MAX_CODE_WIDTH if code_truncated else None,
        },
    }
    if "reconstruction" in metrics:
        results["reconstruction"] = rec
    mean_act = (stats.sum_x / stats.count).float()

    codes_v = _pad_cat(vals_chunks) if need_codes else None
    codes_i = _pad_cat(idx_chunks).long() if need_codes else None
    g = torch.Generator().manual_seed(args.seed)

    # ---------------------------------------------------------------- AFA
    if "afa" in metrics:
        t = time.perf_counter()
        afa = afa_stats.compute()
        afa.update(decoder_cosine_stats(sae.W_dec.detach().cpu()))
        afa["gap_histogram"] = afa_stats.histogram()
        afa["n_latents"] = cfg.n_latents
        results["afa"] = afa
        timings["afa"] = time.perf_counter() - t

    # ---------------------------------------------------------------- probes
    if "probes" in metrics:
        t = time.perf_counter()
        rows_p = probe_keep.any(-1)
        n_rows = int(rows_p.sum())
        p_ids, p_keep = ids[:n_rows], probe_keep[:n_rows]
        labels = task_labels(p_ids, tokenizer)
        train_rows = torch.arange(n_rows) % 3 != 2
        baselines = [b for b in args.probe_baselines.split(",") if b]
        pr = run_probe_tasks(
            labels,
            p_keep,
            train_rows,
            codes_v[:n_probe],
            codes_i[:n_probe],
            cfg.n_latents,
            x=torch.cat(x_probe) if x_probe else None,
            baselines=baselines,
            seed=args.seed,
            progress=progress,
        )
        res_rows = [r.to_dict() for r in pr["results"]]
        results["probes"] = {
            "summary": {
                **{f"mean_probe_loss_{m}": v for m, v in pr["mean_probe_loss"].items()},
                "mean_prior_loss": pr["mean_prior_loss"],
                "n_tasks": len(pr["per_task"]),
                "n_skipped": len(pr["skipped"]),
            },
            "per_task": pr["per_task"],
            "prior_per_task": {r["task"]: r["prior_loss"] for r in res_rows if r["method"] == "sae"},
            "results": res_rows,
            "skipped": pr["skipped"],
        }
        timings["probes"] = time.perf_counter() - t

    # ---------------------------------------------------------------- N2G
    if "n2g" in metrics and args.n2g_latents > 0:
        t = time.perf_counter()
        train_rows = torch.arange(N) % 2 == 0
        row_of = torch.arange(N).unsqueeze(-1).expand(N, T)[keep]
        tr_tok = train_rows[row_of]
        nz = codes_v != 0
        fires_tr = torch.bincount(codes_i[nz & tr_tok.unsqueeze(-1)], minlength=cfg.n_latents)
        candidates = (fires_tr >= 5).nonzero().squeeze(-1)
        perm = candidates[torch.randperm(candidates.numel(), generator=g)][: args.n2g_latents].sort().values
        sel = perm.tolist()
        if sel:
            dense = torch.zeros(keep.shape[0], keep.shape[1], len(sel))
            lookup = torch.full((cfg.n_latents,), -1, dtype=torch.long)
            lookup[perm] = torch.arange(len(sel))
            col = lookup[codes_i]
            hit = (col >= 0) & nz
            tok = torch.arange(codes_v.shape[0]).unsqueeze(-1).expand_as(codes_i)[hit]
            kept_pos = keep.flatten().nonzero().squeeze(-1)
            flat = dense.view(-1, len(sel))
            flat[kept_pos[tok], col[hit]] = codes_v[hit]
            exps = n2g_evaluate(
                ids, keep, train_rows, dense, sel, vocab_size=max(len(tokenizer), int(ids.max()) + 1), progress=progress
            )
            base = max(len(tokenizer), int(ids.max()) + 1)
            results["n2g"] = {"summary": summarize_n2g(exps), "latents": [e.to_dict(tokenizer, base) for e in exps]}
        else:
            results["n2g"] = {"summary": {"n_latents": 0, "note": "no latent fired >= 5 times on the train windows"}}
        timings["n2g"] = time.perf_counter() - t

    # ---------------------------------------------------------------- faithful N2G
    if "n2g_faithful" in metrics and args.n2g_latents > 0:
        from .n2g import n2g_faithful_evaluate

        t = time.perf_counter()
        results["n2g_faithful"] = n2g_faithful_evaluate(
            model,
            tokenizer,
            sae,
            hook,
            n_tokens=args.n_tokens,
            n_latents=args.n2g_latents,
            dataset=args.dataset,
            split=args.split,
            window=args.window,
            seed=args.seed,
        )
        timings["n2g_faithful"] = time.perf_counter() - t

    # ---------------------------------------------------------------- downstream
    if "downstream" in metrics and args.downstream_tokens > 0:
        t = time.perf_counter()
        can_predict = keep.clone()
        can_predict[:, -1] = False  # the last position has no next token in its window
        ds_keep = _trim_mask(can_predict, args.downstream_tokens)
        n_rows = int(ds_keep.any(-1).sum())
        bs = max(1, min(args.batch_size, 1024 // T))
        ds = DownstreamStats()
        for s in tqdm(range(0, n_rows, bs), desc="downstream", disable=not progress):
            e = min(s + bs, n_rows)
            o = downstream_batch(
                model, sae, ids[s:e].to(device), ds_keep[s:e].to(device), hook, mean_activation=mean_act.to(device)
            )
            ds.update(o["ce_clean"], o["ce_spliced"], o["kl"], o["ce_zero"], o["ce_mean"])
        results["downstream"] = ds.compute()
        timings["downstream"] = time.perf_counter() - t

    # ---------------------------------------------------------------- ablation sparsity
    if "ablation" in metrics and args.ablation_latents > 0:
        t = time.perf_counter()
        C = min(args.ablation_context, T)
        min_after = min(8, C - 1)
        n_ab_rows = min(N, 4)
        # kept token index -> (row, pos)
        kept_pos = keep.flatten().nonzero().squeeze(-1)
        rows_k, pos_k = kept_pos // T, kept_pos % T
        ok_tok = (rows_k < n_ab_rows) & (pos_k <= C - min_after)
        tok_idx = ok_tok.nonzero().squeeze(-1)
        v_sub, i_sub = codes_v[tok_idx], codes_i[tok_idx]
        active = v_sub != 0
        pairs_tok = tok_idx.unsqueeze(-1).expand_as(i_sub)[active]
        pairs_lat = i_sub[active]
        uniq = torch.unique(pairs_lat)
        chosen = uniq[torch.randperm(uniq.numel(), generator=g)][: args.ablation_latents]
        targets = []
        for lat in chosen.tolist():
            occ = pairs_tok[pairs_lat == lat]
            pick = int(occ[torch.randint(occ.numel(), (1,), generator=g)])
            targets.append((int(rows_k[pick]), int(pos_k[pick]), int(lat)))
        targets.sort()
        eff = latent_ablation_effects(
            model,
            sae,
            ids[:n_ab_rows, :C].to(device),
            keep[:n_ab_rows, :C].to(device),
            hook,
            targets,
            batch_size=max(2, args.batch_size),
            progress=progress,
        )
        results["ablation"] = {"summary": summarize_ablation(eff), "latents": eff, "context": C}
        timings["ablation"] = time.perf_counter() - t

    # ---------------------------------------------------------------- summary + files
    summary = {}
    if "reconstruction" in results:
        r = results["reconstruction"]
        for k in ("fvu", "mse", "explained_variance", "cosine_similarity", "l0", "dead_fraction"):
            summary[k] = r.get(k)
    if "downstream" in results:
        for k in ("ce_clean", "ce_spliced", "delta_loss", "kl", "frac_recovered_zero", "frac_recovered_mean"):
            summary[k] = results["downstream"].get(k)
    if "probes" in results:
        for k, v in results["probes"]["summary"].items():
            if k.startswith("mean_probe_loss"):
                summary[k] = v
    if "n2g" in results and "f1" in results["n2g"]["summary"]:
        for k in ("precision", "recall", "f1"):
            summary[f"n2g_{k}"] = results["n2g"]["summary"][k]
    if "n2g_faithful" in results:
        for k in ("precision", "recall", "f1"):
            summary[f"n2g_faithful_{k}"] = results["n2g_faithful"]["summary"][k]
    if "ablation" in results:
        summary["ablation_sparsity"] = results["ablation"]["summary"]["ablation_sparsity"]
    if "afa" in results:
        for k in ("eps_lbo_mean", "eps_lbo_h1_mean", "eps_max", "eps_mean", "afa_gap_mean", "afa_gap_abs_mean"):
            if k in results["afa"]:
                summary[k] = results["afa"][k]
    results["summary"] = summary
    timings["total"] = time.perf_counter() - t_start
    results["timings_s"] = {k: round(v, 3) for k, v in timings.items()}

    out_dir = Path(args.out) if args.out else Path(f"eval_{Path(str(args.sae_path)).name or 'sae'}")
    out_dir.mkdir(parents=True, exist_ok=True)
    results = _finite(results)
    (out_dir / "metrics.json").write_text(json.dumps(results, indent=1))
    if not getattr(args, "no_report", False):
        from .report import write_report

        zf = afa_stats.points if "afa" in metrics else None
        write_report(results, out_dir, zf_points=(zf[0].tolist(), zf[1].tolist()) if zf is not None else None)
    results["out_dir"] = str(out_dir)
    if progress:
        print(json.dumps(results["summary"], indent=1))
    print(
        f"[hf-sae eval] {rec['n_tokens']} tokens in {timings['total']:.1f} s; wrote {out_dir / 'metrics.json'}"
        + ("" if getattr(args, "no_report", False) else f" and {out_dir / 'report.html'}")
    )
    return results


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """``python -m hf_sae.evaluation.run SAE_PATH [options]`` (same as ``hf-sae eval``)."""
    parser = argparse.ArgumentParser(prog="hf-sae eval", description="Evaluate a sparse autoencoder (all metrics).")
    add_eval_args(parser)
    return run_eval(parser.parse_args(argv))


if __name__ == "__main__":
    main()

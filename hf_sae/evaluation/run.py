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

This module is the command-line adapter; the work is :func:`hf_sae.evaluation.pipeline.evaluate_sae`,
which Python code calls directly::

    from hf_sae.evaluation import evaluate_sae
    results = evaluate_sae(sae, model, tokenizer, metrics="reconstruction,downstream", out_dir="eval_out")
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import torch

from ..cli_args import add_eval_args, add_sae_source_args  # noqa: F401  (defined without torch, for --help)
from .inputs import MAX_CODE_WIDTH as MAX_CODE_WIDTH
from .inputs import load_sae
from .pipeline import ALL_METRICS, OPTIONAL_METRICS, evaluate_sae, parse_metrics

__all__ = ["ALL_METRICS", "OPTIONAL_METRICS", "add_eval_args", "run_eval", "main"]


def run_eval(args: argparse.Namespace, sae=None, model=None, tokenizer=None) -> dict:
    """Run the evaluation described by ``args`` (see :func:`add_eval_args`) with
    :func:`~hf_sae.evaluation.pipeline.evaluate_sae`; write ``metrics.json`` (+ ``report.html`` and PNGs)
    into ``args.out``; return the results dict.

    ``sae`` / ``model`` + ``tokenizer`` may be passed already loaded (then ``args.sae_path`` /
    ``args.model`` only label the report)."""
    metrics = parse_metrics(args.metrics)
    for name in ("n_tokens", "window", "batch_size"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}.")
    device = torch.device(args.device)
    sae = load_sae(args.sae_path, args.subfolder, device) if sae is None else sae
    progress = not getattr(args, "no_progress", False)
    report = not getattr(args, "no_report", False)
    out_dir = Path(args.out) if args.out else Path(f"eval_{Path(str(args.sae_path)).name or 'sae'}")
    results = evaluate_sae(
        sae, model, tokenizer, metrics=metrics, n_tokens=args.n_tokens, hook_point=args.hook_point,
        model_name=args.model, dataset=args.dataset, split=args.split, text_column=args.text_column,
        window=args.window, batch_size=args.batch_size, downstream_tokens=args.downstream_tokens,
        probe_tokens=args.probe_tokens, probe_baselines=args.probe_baselines.split(","),
        n2g_latents=args.n2g_latents, ablation_latents=args.ablation_latents,
        ablation_context=args.ablation_context, seed=args.seed, device=device, progress=progress,
        out_dir=out_dir, report=report, sae_label=str(args.sae_path), subfolder=args.subfolder,
        placement={k: getattr(args, k, None) for k in ("device_map", "max_memory", "offload_folder")},
    )
    if progress:
        print(json.dumps(results["summary"], indent=1))
    print(
        f"[hf-sae eval] {results['meta']['n_tokens']} tokens in {results['timings_s']['total']:.1f} s; wrote "
        f"{out_dir / 'metrics.json'}" + ("" if not report else f" and {out_dir / 'report.html'}")
    )
    return results


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """``python -m hf_sae.evaluation.run SAE_PATH [options]`` (same as ``hf-sae eval``)."""
    parser = argparse.ArgumentParser(prog="hf-sae eval", description="Evaluate a sparse autoencoder (all metrics).")
    add_eval_args(parser)
    return run_eval(parser.parse_args(argv))


if __name__ == "__main__":
    main()

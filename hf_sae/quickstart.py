"""``make quickstart``: train a TopK SAE on SmolLM2-135M in about ten minutes on a laptop-class CPU.

    python -m hf_sae.quickstart --out quickstart_out

What it does (everything offline, everything under ``--out``):

1. loads the embedded SmolLM2-135M-Instruct (``hf_sae.data.models``);
2. caches ``layers.6.resid_post`` activations of the embedded KJV corpus: ``--cache-tokens`` training
   tokens and ``--eval-tokens`` held-out tokens (books Hebrews-Revelation) into ``cache/`` (position 0
   and special tokens are dropped; the LM forward stops after block 6);
3. trains a TopK SAE (n = 8 x 576 = 4608 latents, k = 32) with the full recipe of Gao et al. (tied init,
   geometric-median b_dec, input normalisation, AuxK, decoder renormalisation + gradient projection,
   Adam with warmup) for ``--train-tokens`` tokens: ``sae/layers.6.resid_post/`` (``save_pretrained``
   folder + ``training_report.json`` + ``training_curves.png``), checkpoints and logs in ``sae/``;
4. evaluates it on held-out text with ``hf_sae.evaluation`` (the same code as ``hf-sae eval``): FVU,
   L0, dead latents, and the downstream loss increase when the reconstruction is spliced into the
   LM: ``eval/metrics.json`` + ``eval/report.html``; prints a summary (``summary.json``);
5. builds the static feature browser of the SAE (``hf_sae.dashboard``) over ``--dashboard-tokens`` held-out
   tokens: ``dashboard/index.html`` (open it from disk; ``--dashboard-tokens 0`` skips this step).

Why layer 6: SmolLM2-135M has 30 blocks. Block 6 (about 1/5 of the depth) is past the first blocks,
whose residual stream mostly re-encodes the current token, but early enough that harvesting is
cheap: the forward is cut right after block 6, so each token costs 7 of 30 blocks and no unembedding.

Every stage is resumable: rerunning the command reuses the cache, resumes training from the newest
checkpoint (or re-exports a finished run), and reuses the evaluation when it was made of the same SAE
weights with the same settings (``eval/quickstart_stamp.json``), and so the feature browser
(``dashboard/quickstart_stamp.json``); otherwise it re-evaluates / rebuilds.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

HOOK_LAYER = 6


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hf_sae.quickstart", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="quickstart_out", help="output folder (default: quickstart_out)")
    p.add_argument("--layer", type=int, default=HOOK_LAYER, help="block whose resid_post is used (default 6)")
    p.add_argument("--n-latents", type=int, default=4608, help="SAE latents (default 4608 = 8 x 576)")
    p.add_argument("--k", type=int, default=32, help="active latents per token (default 32)")
    p.add_argument("--cache-tokens", type=int, default=600_000, help="training tokens cached (default 600k)")
    p.add_argument("--train-tokens", type=int, default=1_200_000,
                   help="training tokens (default 1.2M = 2 passes over the cache)")
    p.add_argument("--batch-size", type=int, default=2048, help="tokens per optimizer step (default 2048)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak Adam LR (default 3e-3, tuned for this short run)")
    p.add_argument("--dead-tokens", type=int, default=300_000,
                   help="a latent that has not fired for this many tokens is dead (AuxK revives it; default 300k)")
    p.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens (default 16384)")
    p.add_argument("--downstream-tokens", type=int, default=4096,
                   help="tokens for the downstream loss (4 full LM forwards; default 4096)")
    p.add_argument("--dashboard-tokens", type=int, default=8192,
                   help="held-out tokens for the feature browser (default 8192; 0 = no browser)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores, os.cpu_count())")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def _fmt_time(s: float) -> str:
    return f"{int(s // 60)}m{int(s % 60):02d}s"


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the quickstart; returns the summary dict (also written to ``<out>/summary.json``)."""
    args = build_parser().parse_args(argv)
    import torch

    torch.set_num_threads(args.threads if args.threads > 0 else (os.cpu_count() or 1))
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(var, "1")
    from ._io import sha256_file
    from .data.models import DEFAULT_MODEL, load_model

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    hook = f"layers.{args.layer}.resid_post"
    progress = not args.no_progress
    times: dict = {}
    t0 = time.perf_counter()

    print("[quickstart] 1/5 loading SmolLM2-135M (embedded, offline)", flush=True)
    t = time.perf_counter()
    model, tok = load_model(DEFAULT_MODEL)
    times["load_model"] = time.perf_counter() - t

    t = time.perf_counter()
    cache_train, cache_val = _cache(model, tok, hook, out, args, progress)
    times["cache_activations"] = time.perf_counter() - t

    t = time.perf_counter()
    sae = _train(hook, cache_train, cache_val, out, args, progress)
    times["train"] = time.perf_counter() - t

    weights_sha256 = sha256_file(str(out / "sae" / hook / "model.safetensors"))  # the stamp of steps 4 and 5
    t = time.perf_counter()
    results = _evaluate(sae, model, tok, hook, out / "eval", args, progress, weights_sha256)
    times["evaluate"] = time.perf_counter() - t

    dashboard = None
    if args.dashboard_tokens > 0:
        t = time.perf_counter()
        dashboard = _dashboard(sae, model, tok, hook, out, args, progress, weights_sha256)
        times["dashboard"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t0
    summary = _summary(sae, hook, results, times, out, dashboard)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    _print_summary(summary, args)
    return summary


def _cache(model, tok, hook: str, out: Path, args, progress: bool) -> tuple:
    """Step 2: cache held-out and training activations at ``hook``; returns the two cache folders."""
    import torch

    from .data.cache import cache_activations

    print(f"[quickstart] 2/5 caching {hook} activations: {args.cache_tokens} training + {args.eval_tokens} "
          f"held-out tokens -> {out / 'cache'}", flush=True)
    cache_train, cache_val = out / "cache" / "train", out / "cache" / "validation"
    with torch.no_grad():
        cache_activations(model, tok, "default", [hook], cache_val, max_tokens=args.eval_tokens, dtype="float16",
                          split="validation", progress=progress)
        cache_activations(model, tok, "default", [hook], cache_train, max_tokens=args.cache_tokens,
                          dtype="float16", split="train", progress=progress)
    return cache_train, cache_val


def _train(hook: str, cache_train: Path, cache_val: Path, out: Path, args, progress: bool):
    """Step 3: train (or resume, or re-export) the TopK SAE on the cached activations; returns it."""
    from .training import SAETrainer, SAETrainingArguments
    from .training.checkpoint import holds_run

    print(f"[quickstart] 3/5 training a TopK SAE (n={args.n_latents}, k={args.k}) on {args.train_tokens} tokens",
          flush=True)
    targs = SAETrainingArguments(
        hook_points=[hook], activations=str(cache_train), eval_activations=str(cache_val),
        n_latents=args.n_latents, k=args.k, train_tokens=args.train_tokens, batch_size=args.batch_size,
        lr=args.lr, dead_tokens_threshold=args.dead_tokens, eval_every_tokens=args.train_tokens // 4,
        eval_tokens=args.eval_tokens, checkpoint_every_tokens=args.train_tokens // 3, save_total_limit=1,
        log_every_steps=10, output_dir=str(out / "sae"), progress_bar=progress,
        resume=holds_run(str(out / "sae")),  # a first run starts fresh without a word
        log_with=["auto"], run_name="quickstart",
    )
    return SAETrainer(targs).train()[hook]


def _dashboard(sae, model, tok, hook: str, out: Path, args, progress: bool, weights_sha256: str) -> str:
    """Step 5: the feature browser over held-out text, reused when ``dashboard/`` was built from the same
    weights (``weights_sha256``) with the same settings; returns its index.html."""
    from .dashboard import build_dashboard

    dash_dir = out / "dashboard"
    dash_stamp = {"sae_sha256": weights_sha256, "dashboard_tokens": args.dashboard_tokens}
    if _reuse_eval(dash_dir, dash_stamp, "build_info.json") is not None and (dash_dir / "index.html").is_file():
        print("[quickstart] 5/5 feature browser: reusing dashboard/ (same SAE weights and settings)", flush=True)
    else:
        print(f"[quickstart] 5/5 building the feature browser over {args.dashboard_tokens} held-out tokens",
              flush=True)
        build_dashboard(sae, dash_dir, model=model, tokenizer=tok, model_name=sae.config.base_model,
                        n_tokens=args.dashboard_tokens, n2g_latents=256, n2g_tokens=args.dashboard_tokens,
                        sae_label=f"quickstart {hook}", progress=progress)
        (dash_dir / STAMP_FILE).write_text(json.dumps(dash_stamp, indent=1))
    return str(dash_dir / "index.html")


def _summary(sae, hook: str, results: dict, times: dict, out: Path, dashboard) -> dict:
    """The summary dict printed and written to ``summary.json``."""
    import torch

    cpu_seconds = time.process_time()
    rec, ds = results.get("reconstruction", {}), results.get("downstream", {})
    info = sae.config.training_info
    summary = {
        "hook_point": hook, "base_model": sae.config.base_model, "n_latents": sae.config.n_latents,
        "k": sae.config.k, "tokens_trained": info.get("tokens_trained"),
        "heldout_fvu": rec.get("fvu"), "heldout_l0": rec.get("l0"),
        "heldout_dead_fraction": rec.get("dead_fraction"),
        "train_dormant_fraction": info.get("final_metrics", {}).get("train_dormant_fraction"),
        "ce_clean": ds.get("ce_clean"), "ce_spliced": ds.get("ce_spliced"), "delta_loss": ds.get("delta_loss"),
        "kl": ds.get("kl"), "frac_recovered_zero": ds.get("frac_recovered_zero"),
        "frac_recovered_mean": ds.get("frac_recovered_mean"),
        "seconds": {k: round(v, 1) for k, v in times.items()},
        "cpu_seconds": round(cpu_seconds, 1),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "torch_threads": torch.get_num_threads(),
        "paths": {"sae": str(out / "sae" / hook), "curves": str(out / "sae" / hook / "training_curves.png"),
                  "eval_report": str(out / "eval" / "report.html"), "dashboard": dashboard},
    }
    return summary


STAMP_FILE = "quickstart_stamp.json"


def _evaluate(sae, model, tok, hook: str, eval_dir: Path, args, progress: bool, weights_sha256: str) -> dict:
    """Step 4: reconstruction + downstream metrics on held-out text, reused when ``eval_dir`` holds an evaluation
    of the same weights (``weights_sha256``) with the same settings."""
    import torch

    from .evaluation.pipeline import evaluate_sae

    settings = {"metrics": ["reconstruction", "downstream"], "n_tokens": args.eval_tokens,
                "downstream_tokens": args.downstream_tokens}
    stamp = {"sae_sha256": weights_sha256, "eval_settings": settings}
    results = _reuse_eval(eval_dir, stamp)
    if results is not None:
        print("[quickstart] 4/5 evaluation: reusing eval/metrics.json (same SAE weights and settings)", flush=True)
        return results
    print("[quickstart] 4/5 evaluating on held-out text (reconstruction + downstream loss)", flush=True)
    sae.eval()
    with torch.no_grad():
        results = evaluate_sae(sae, model, tok, **settings, progress=progress, out_dir=eval_dir,
                               sae_label=str(eval_dir.parent / "sae" / hook))
    (eval_dir / STAMP_FILE).write_text(json.dumps(stamp, indent=1))
    return results


def _reuse_eval(eval_dir: Path, stamp: dict, result: str = "metrics.json") -> Optional[dict]:
    """The earlier ``result`` JSON in ``eval_dir`` (the evaluation's metrics, or the browser's build info)
    when the folder's stamp equals ``stamp`` (same weights, same settings)."""
    try:
        if json.loads((eval_dir / STAMP_FILE).read_text()) != stamp:
            return None
        return json.loads((eval_dir / result).read_text())
    except (OSError, ValueError):
        return None


def _print_summary(s: dict, args) -> None:
    def f(v, spec):
        return "n/a" if v is None else format(v, spec)

    lines = [
        "",
        f"hf_sae quickstart: TopK SAE on SmolLM2-135M {s['hook_point']} "
        f"(n={s['n_latents']}, k={s['k']}, {s['tokens_trained']:,} training tokens)",
        f"  held-out FVU (fraction of variance unexplained) {f(s['heldout_fvu'], '.4f')}",
        f"  L0 (active latents per token)                   {f(s['heldout_l0'], '.1f')}",
        f"  dead latents (never fired on held-out tokens)   {f(100 * s['heldout_dead_fraction'], '.2f')} %"
        if s["heldout_dead_fraction"] is not None else "  dead latents                                    n/a",
        f"  dead latents (no fire in the last {args.dead_tokens:,} training tokens) "
        f"{f(100 * (s['train_dormant_fraction'] or 0), '.2f')} %",
        f"  LM loss clean -> SAE spliced in                 {f(s['ce_clean'], '.3f')} -> {f(s['ce_spliced'], '.3f')} "
        f"nats/token (increase {f(s['delta_loss'], '+.3f')}, KL {f(s['kl'], '.3f')})",
        f"  fraction of loss recovered (vs zero / mean ablation) {f(s['frac_recovered_zero'], '.3f')} / "
        f"{f(s['frac_recovered_mean'], '.3f')}",
        f"  time: {_fmt_time(s['seconds']['total'])} total (cache {_fmt_time(s['seconds']['cache_activations'])}, "
        f"train {_fmt_time(s['seconds']['train'])}, eval {_fmt_time(s['seconds']['evaluate'])}"
        f"{', browser ' + _fmt_time(s['seconds']['dashboard']) if 'dashboard' in s['seconds'] else ''}), "
        f"{s['torch_threads']} threads, {_fmt_time(s['cpu_seconds'])} CPU time, load average {s['load_average_1min']}",
        f"  SAE: {s['paths']['sae']}   curves: {s['paths']['curves']}   report: {s['paths']['eval_report']}",
        f"  feature browser: {s['paths']['dashboard']}" if s["paths"].get("dashboard") else "",
        "",
    ]
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()

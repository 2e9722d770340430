"""top-AFA versus TopK (and TopK + AFA loss) at matched mean L0 on SmolLM2-135M activations.

The central empirical claim of Lee et al. 2025 ("Evaluating and Designing Sparse Autoencoders by
Approximating Quasi-Orthogonality"): top-AFA, which chooses k(x) per token and has no k to tune,
reconstructs as well as TopK at the same mean L0. This script trains, at each dictionary size:

1. ``topafa``: top-AFA as the authors' code defines it (``afa_variant="reference"``: no b_enc,
   uncapped k(x) <= n - 1, loss FVU + AuxK + afa_coef * mean((||z|| - ||x||)^2));
2. ``topk``: TopK with k = the top-AFA SAE's mean held-out L0 (rounded);
3. ``topk_afa``: the same TopK plus the AFA loss with the same coefficient,

all with per-token standardised inputs (the authors' ``input_unit_norm``: x -> (x - mean_d x) /
(std_d x + 1e-5), here ``SAEConfig(input_norm="layer_norm")``, undone on the output), and reports
held-out FVU (of the reconstruction in the LM's units), Δ LM loss (the reconstruction spliced back
into the LM), dead fraction, top-AFA's per-token L0 distribution, mean ε_LBO and the ZF plots
(in the standardised units the SAE sees).

Usage (resumable: each finished run keeps ``<work>/<name>/result.json``; the caches are reused)::

    nice -n 19 python benchmarks/afa_study.py --threads 2 > afa_study.log 2>&1

Writes ``<work>/afa_study.json``, ``afa_study.png`` (L0 distributions, FVU/L0) and
``afa_zf_<n>.png`` (ZF plots) and prints the markdown tables of ``benchmarks/RESULTS_afa.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

HOOK = "layers.6.resid_post"


def ensure_caches(root: Path, train_tokens: int, val_tokens: int) -> tuple[Path, Path]:
    """SmolLM2 activations at HOOK (KJV train / validation splits), cached resumably."""
    from hf_sae.data.cache import cache_activations
    from hf_sae.data.models import load_default_model

    out = []
    for split, n in (("validation", val_tokens), ("train", train_tokens)):
        raw = root / f"raw_{split}"
        if not (raw / "metadata.json").is_file():
            model, tok = load_default_model()
            with torch.no_grad():
                cache_activations(model, tok, "default", [HOOK], raw, max_tokens=n, dtype="float16", split=split)
        out.append(raw)
    return out[1], out[0]


def train(name: str, work: Path, train_dir: Path, val_dir: Path, ns, **kw):
    """Train one SAE on the cache (skipped when ``<work>/<name>/sae`` exists); return the SAE."""
    from hf_sae import SparseAutoencoder
    from hf_sae.training import SAETrainer, SAETrainingArguments

    out = work / name
    saved = out / "sae"
    if (saved / "config.json").is_file() and not ns.force:
        return SparseAutoencoder.from_pretrained(saved), json.loads((out / "train.json").read_text())
    args = dict(hook_points=[HOOK], activations=str(train_dir), eval_activations=str(val_dir),
                train_tokens=ns.tokens, batch_size=ns.batch_size, lr=ns.lr, dead_tokens_threshold=ns.dead_tokens,
                eval_every_tokens=0, eval_tokens=ns.eval_tokens, checkpoint_every_tokens=0, save_total_limit=1,
                log_every_steps=20, log_with=["jsonl"], output_dir=str(out / "run"), overwrite_output_dir=True,
                seed=ns.seed, run_name=name, input_norm="layer_norm", b_dec_init=ns.b_dec_init)
    args.update(kw)
    t = time.perf_counter()
    sae = SAETrainer(SAETrainingArguments(**args)).train()[HOOK]
    info = {"seconds": time.perf_counter() - t, **sae.config.training_info.get("final_metrics", {})}
    sae.save_pretrained(saved)
    (out / "train.json").write_text(json.dumps(info, indent=1, default=float))
    return sae, info


@torch.no_grad()
def heldout_metrics(sae, val_dir: Path, max_tokens: int) -> dict:
    """FVU, L0 (mean and per-token histogram), never-fired fraction and the AFA diagnostic on held-out rows."""
    from hf_sae.data.cache import CachedActivations
    from hf_sae.evaluation.afa import AFAStats, decoder_cosine_stats
    from hf_sae.evaluation.reconstruction import ReconstructionStats

    sae.eval()
    rec, afa = ReconstructionStats(sae.config.n_latents), AFAStats(max_points=4000)
    l0_counts = torch.zeros(sae.config.n_latents + 1, dtype=torch.long)
    seen = 0
    for x in CachedActivations(val_dir, HOOK, batch_size=4096, shuffle=False):
        x = x[: max_tokens - seen].float()
        out = sae(x)
        rec.update(x, out.reconstruction, out.latent_values, out.latent_indices, out.latents)
        afa.update_from_sae(sae, x, out)
        l0 = (out.latent_values > 0).sum(-1) if out.latent_values is not None else (out.latents > 0).sum(-1)
        l0_counts += torch.bincount(l0, minlength=sae.config.n_latents + 1)
        seen += x.shape[0]
        if seen >= max_tokens:
            break
    r = rec.compute()
    res = {"fvu": r["fvu"], "l0": r["l0"], "dead_heldout": r["dead_fraction"], **afa.compute(),
           **{k: v for k, v in decoder_cosine_stats(sae.W_dec).items()}}
    nz = l0_counts.nonzero().flatten()
    res["l0_hist"] = {int(i): int(l0_counts[i]) for i in nz}
    cdf = l0_counts.cumsum(0).double() / l0_counts.sum()
    res["l0_p05"], res["l0_median"], res["l0_p95"] = (int(torch.searchsorted(cdf, torch.tensor(q, dtype=torch.float64)))
                                                       for q in (0.05, 0.5, 0.95))
    res["zf_points"] = [v.tolist() for v in afa.points]
    return res


@torch.no_grad()
def delta_lm_loss(saes: dict, n_windows: int, batch: int = 2) -> dict:
    """Mean CE increase when each SAE's reconstruction replaces the activation at HOOK,
    on ``n_windows`` validation windows of 256 tokens (position 0 and special tokens left untouched);
    the clean forward is shared by all SAEs."""
    from hf_sae.data.corpus import load_texts, token_mask, tokenize_windows
    from hf_sae.data.models import load_default_model
    from hf_sae.evaluation.downstream import make_splice_fn, next_token_ce, prediction_mask
    from hf_sae.hooks import splice

    model, tok = load_default_model()
    model.eval()
    windows = tokenize_windows(load_texts("default", split="validation"), tok, window=256, max_windows=n_windows)
    sums = {name: [0.0, 0.0, 0] for name in saes}
    for s in range(0, windows.shape[0], batch):
        ids = windows[s:s + batch]
        keep = token_mask(ids, tok)
        pred = prediction_mask(keep)
        ce_clean = next_token_ce(model(input_ids=ids, use_cache=False).logits, ids)[pred]
        for name, sae in saes.items():
            with splice(model, {HOOK: make_splice_fn(sae, keep)}):
                ce = next_token_ce(model(input_ids=ids, use_cache=False).logits, ids)[pred]
            sums[name][0] += float(ce_clean.sum())
            sums[name][1] += float(ce.sum())
            sums[name][2] += int(ce.numel())
        print(f"Δ LM loss: {s + ids.shape[0]}/{windows.shape[0]} windows", flush=True)
    return {name: {"ce_clean": c / n, "ce_spliced": sp / n, "delta_lm_loss": (sp - c) / n, "lm_predictions": n}
            for name, (c, sp, n) in sums.items()}


def main(argv=None) -> dict:
    from hf_sae.data.models import hf_sae_cache_dir

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default=str(hf_sae_cache_dir() / "afa_study"), help="caches and run folders")
    p.add_argument("--sizes", default="2304,4608", help="comma list of n_latents (4x and 8x of d = 576)")
    p.add_argument("--force", action="store_true", help="retrain runs that are saved")
    p.add_argument("--b-dec-init", default="zeros", choices=["zeros", "geometric_median", "mean"],
                   help="b_dec initialisation (the authors': zeros; hf_sae's trainer default: geometric_median)")
    for flag, typ, default, what in (
        ("cache-tokens", int, 600_000, "training tokens to cache"),
        ("val-tokens", int, 32768, "held-out tokens (KJV validation split)"),
        ("tokens", int, 600_000, "training tokens per run"),
        ("afa-coef", float, 1 / 32, "AFA loss coefficient (paper: 1/128 .. 1/16)"),
        ("batch-size", int, 2048, "tokens per step"), ("lr", float, 3e-3, "Adam learning rate"),
        ("dead-tokens", int, 100_000, "dead = no fire in this many training tokens"),
        ("eval-tokens", int, 32768, "held-out tokens for FVU / L0 / AFA"),
        ("lm-windows", int, 24, "validation windows (256 tokens) for Δ LM loss"),
        ("seed", int, 0, "training seed"), ("threads", int, 0, "torch threads (0 = all cores)"),
    ):
        p.add_argument(f"--{flag}", type=typ, default=default, help=f"{what} (default {default:g})")
    ns = p.parse_args(argv)
    torch.set_num_threads(ns.threads if ns.threads > 0 else (os.cpu_count() or 1))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(ns.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train_dir, val_dir = ensure_caches(work, ns.cache_tokens, ns.val_tokens)
    print(f"caches ready ({time.perf_counter() - t0:.0f} s)", flush=True)
    results: dict = {"config": vars(ns), "runs": {}}
    saes = {}
    for n in [int(s) for s in ns.sizes.split(",") if s]:
        sae, info = train(f"topafa_n{n}", work, train_dir, val_dir, ns, activation="topafa", n_latents=n,
                          afa_coef=ns.afa_coef)
        res = heldout_metrics(sae, val_dir, ns.eval_tokens)
        k = max(1, round(res["l0"]))
        runs = {f"topafa_n{n}": (sae, info, res)}
        print(f"topafa n={n}: L0 {res['l0']:.1f} -> TopK k={k}", flush=True)
        for name, kw in ((f"topk_n{n}", {}), (f"topk_afa_n{n}", {"afa_coef": ns.afa_coef})):
            s2, i2 = train(name, work, train_dir, val_dir, ns, activation="topk", n_latents=n, k=k, **kw)
            runs[name] = (s2, i2, heldout_metrics(s2, val_dir, ns.eval_tokens))
        for name, (s, i, r) in runs.items():
            results["runs"][name] = {"n_latents": n, "activation": s.config.activation, "k": s.config.k,
                                     "afa_coef": s.config.afa_coef, "train_seconds": i.get("seconds"),
                                     "dead_train": i.get("train_dormant_fraction"), **r}
            saes[name] = s
            print(json.dumps({name: {k: v for k, v in results["runs"][name].items()
                                     if k not in ("zf_points", "l0_hist")}}, default=float), flush=True)
        (work / "afa_study.json").write_text(json.dumps(results, default=float))
    lm_file = work / "lm_loss.json"
    lm = json.loads(lm_file.read_text()) if lm_file.is_file() and not ns.force else {}
    todo = {k: v for k, v in saes.items() if k not in lm}
    if todo:
        lm.update(delta_lm_loss(todo, ns.lm_windows))
        lm_file.write_text(json.dumps(lm, indent=1))
    for name, r in lm.items():
        if name in results["runs"]:
            results["runs"][name].update(r)
    results["seconds"] = time.perf_counter() - t0
    (work / "afa_study.json").write_text(json.dumps(results, default=float))
    print_tables(results)
    plot(results, work)
    return results


def print_tables(results: dict) -> None:
    print("\n| SAE | n | k | held-out FVU | Δ LM loss (nats) | L0 mean | L0 p5 / median / p95 | dead (train) | "
          "dead (held-out) | mean ε_LBO | mean ε_LBO (h−1) | ε_mean (signed cos) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results["runs"].items():
        dl = r.get("delta_lm_loss")
        print(f"| {name} | {r['n_latents']} | {r['k'] if r['k'] else 'none'} | {r['fvu']:.4f} | "
              f"{f'{dl:.4f}' if dl is not None else '-'} | {r['l0']:.1f} | {r['l0_p05']} / {r['l0_median']} / "
              f"{r['l0_p95']} | {100 * (r['dead_train'] or 0):.2f} % | {100 * r['dead_heldout']:.2f} % | "
              f"{r['eps_lbo_mean']:.2e} | {r['eps_lbo_h1_mean']:.3f} | {r['eps_mean']:.2e} |")


def plot(results: dict, work: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hf_sae.evaluation.report import zf_plot

    runs = results["runs"]
    sizes = sorted({r["n_latents"] for r in runs.values()})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for n in sizes:
        r = runs.get(f"topafa_n{n}")
        if r:
            h = {int(k): v for k, v in r["l0_hist"].items()}
            xs = sorted(h)
            tot = sum(h.values())
            axes[0].plot(xs, [h[x] / tot for x in xs], label=f"top-AFA n={n} (mean {r['l0']:.1f})")
    axes[0].set_xlabel("active latents per token (held-out)")
    axes[0].set_ylabel("fraction of tokens")
    axes[0].set_title("top-AFA: per-token L0")
    axes[0].legend(fontsize=8)
    for name, r in runs.items():
        marker = {"topafa": "o", "topk": "s", "topk_afa": "^"}[name.rsplit("_n", 1)[0]]
        axes[1].plot([r["l0"]], [r["fvu"]], marker, label=name)
    axes[1].set_xlabel("mean L0 (held-out)")
    axes[1].set_ylabel("held-out FVU")
    axes[1].set_title("reconstruction at matched mean L0")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(work / "afa_study.png", dpi=100)
    plt.close(fig)
    for n in sizes:
        names = [k for k in runs if k.endswith(f"_n{n}")]
        fig, axes = plt.subplots(1, len(names), figsize=(5.2 * len(names), 4.6))
        for ax, name in zip(axes, names):
            r = runs[name]
            zf_plot(ax, r["zf_points"][0], r["zf_points"][1], n)
            ax.set_title(f"{name}: mean ε_LBO {r['eps_lbo_mean']:.1e}", fontsize=9)
        fig.tight_layout()
        fig.savefig(work / f"afa_zf_n{n}.png", dpi=90)
        plt.close(fig)


if __name__ == "__main__":
    main()

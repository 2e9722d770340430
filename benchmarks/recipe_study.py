"""Recipe study on real activations (SmolLM2-135M, layers.6.resid_post, embedded KJV corpus).

Two questions from Gao et al. (2024), answered with hf_sae's trainer on cached activations:

1. Dead latents: TopK with the recipe (tied init + AuxK) versus without them (independent W_enc,
   no AuxK), and each switch alone. Reported: fraction of latents that did not fire in the last
   ``--dead-tokens`` training tokens, fraction that never fired on the held-out tokens, held-out FVU.
2. TopK versus ReLU + L1 at matched L0: TopK at k, and ReLU SAEs at a few L1 coefficients that
   bracket the same L0; the ReLU normalized MSE (FVU) at L0 = k is interpolated linearly in
   (log L0, log FVU) between the two bracketing runs.

Usage (caches the activations first if needed; ~1M tokens of KJV train split + 64k held-out)::

    python benchmarks/recipe_study.py                        # the full study (hours on 2 CPU cores)
    python benchmarks/recipe_study.py --tokens 300000 --only dead   # a reduced run

Prints markdown tables and writes ``<work>/recipe_study.json`` and ``<work>/recipe_study.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

HOOK = "layers.6.resid_post"


def ensure_cache(root: Path, train_tokens: int, val_tokens: int) -> tuple[Path, Path]:
    """Cache SmolLM2 activations at HOOK (train / validation splits of the embedded corpus), resumably."""
    from hf_sae.data.cache import cache_activations
    from hf_sae.data.models import load_default_model

    train, val = root / "train", root / "validation"
    done = all((p / "metadata.json").is_file() for p in (train, val))
    if not done:
        model, tok = load_default_model()
        with torch.no_grad():
            cache_activations(model, tok, "default", [HOOK], val, max_tokens=val_tokens, dtype="float16",
                              split="validation")
            cache_activations(model, tok, "default", [HOOK], train, max_tokens=train_tokens, dtype="float16",
                              split="train")
    return train, val


def run(name: str, work: Path, train_dir: Path, val_dir: Path, ns, **kw) -> dict:
    """Train one SAE on the cache; return its final metrics (cached in <work>/<name>/result.json)."""
    from hf_sae.training import SAETrainer, SAETrainingArguments

    out = work / name
    res_file = out / "result.json"
    if res_file.is_file() and not ns.force:
        return json.loads(res_file.read_text())
    base = dict(hook_points=[HOOK], activations=str(train_dir), eval_activations=str(val_dir),
                n_latents=ns.n_latents, k=ns.k, train_tokens=ns.tokens, batch_size=ns.batch_size, lr=ns.lr,
                dead_tokens_threshold=ns.dead_tokens, eval_every_tokens=0, eval_tokens=ns.eval_tokens,
                checkpoint_every_tokens=0, save_total_limit=1, log_every_steps=20, log_with=["jsonl"],
                output_dir=str(out), overwrite_output_dir=True, seed=ns.seed, run_name=name)
    base.update(kw)
    t = time.perf_counter()
    trainer = SAETrainer(SAETrainingArguments(**base))
    sae = trainer.train()[HOOK]
    m = sae.config.training_info["final_metrics"]
    res = {"name": name, **{k: v for k, v in kw.items()}, "seconds": time.perf_counter() - t,
           "tokens": sae.config.training_info["tokens_trained"],
           "fvu": m["eval_fvu"], "l0": m["eval_l0"], "dead_heldout": m["eval_dead_fraction"],
           "dead_train": m["train_dormant_fraction"], "train_fvu": m["train_fvu"]}
    res_file.write_text(json.dumps(res, indent=2))
    print(json.dumps(res), flush=True)
    return res


def interp_at_l0(points: list[tuple[float, float]], l0: float):
    """FVU at ``l0`` by linear interpolation in (log L0, log FVU) between the bracketing points, or None."""
    pts = sorted(points)
    for (l_a, f_a), (l_b, f_b) in zip(pts, pts[1:]):
        if l_a <= l0 <= l_b and l_a > 0 and l_b > l_a:
            w = (math.log(l0) - math.log(l_a)) / (math.log(l_b) - math.log(l_a))
            return math.exp((1 - w) * math.log(f_a) + w * math.log(f_b))
    return None


def main(argv=None) -> dict:
    from hf_sae.data.models import hf_sae_cache_dir

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", default=str(hf_sae_cache_dir() / "activations" / f"smollm2-135m_kjv_{HOOK}"),
                   help="activation cache folder (train/ and validation/ inside)")
    p.add_argument("--cache-tokens", type=int, default=1_000_000, help="training tokens to cache (corpus permitting)")
    p.add_argument("--work", default=str(hf_sae_cache_dir() / "recipe_study"), help="run folders")
    p.add_argument("--tokens", type=int, default=1_000_000, help="training tokens per run")
    p.add_argument("--n-latents", type=int, default=4608)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--dead-tokens", type=int, default=100_000, help="dead = no fire in this many training tokens")
    p.add_argument("--eval-tokens", type=int, default=65536)
    p.add_argument("--l1", default="0.001,0.003,0.01,0.03", help="comma list of ReLU L1 coefficients")
    p.add_argument("--only", default="dead,relu,switches",
                   help="subset of: dead (recipe vs neither), relu (TopK vs ReLU+L1), switches (each alone)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--force", action="store_true", help="rerun runs that have a result.json")
    ns = p.parse_args(argv)
    torch.set_num_threads(ns.threads if ns.threads > 0 else (os.cpu_count() or 1))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(ns.work)
    work.mkdir(parents=True, exist_ok=True)
    train_dir, val_dir = ensure_cache(Path(ns.cache), ns.cache_tokens, 65536)
    only = set(ns.only.split(","))
    results: dict = {"config": vars(ns), "dead": [], "relu": []}

    if "dead" in only:  # the recipe versus neither switch
        for name, tied, auxk in (("topk_tied_auxk", True, True), ("topk_untied_noauxk", False, False)):
            results["dead"].append(run(name, work, train_dir, val_dir, ns, tied_init=tied, auxk=auxk))
    if "relu" in only:
        topk = run("topk_tied_auxk", work, train_dir, val_dir, ns, tied_init=True, auxk=True)
        results["topk"] = topk
        for c in [float(s) for s in ns.l1.split(",") if s]:
            results["relu"].append(run(f"relu_l1_{c:g}", work, train_dir, val_dir, ns, activation="relu",
                                       l1_coef=c))
        pts = [(r["l0"], r["fvu"]) for r in results["relu"]]
        results["relu_fvu_at_topk_l0"] = interp_at_l0(pts, topk["l0"])
    if "switches" in only:  # each switch alone
        for name, tied, auxk in (("topk_tied_noauxk", True, False), ("topk_untied_auxk", False, True)):
            results["dead"].append(run(name, work, train_dir, val_dir, ns, tied_init=tied, auxk=auxk))

    (work / "recipe_study.json").write_text(json.dumps(results, indent=2, default=float))
    print_tables(results, ns)
    plot(results, work / "recipe_study.png")
    return results


def print_tables(results: dict, ns) -> None:
    print(f"\nSmolLM2-135M {HOOK}, {ns.tokens:,} training tokens per run, n={ns.n_latents}, "
          f"batch {ns.batch_size}, lr {ns.lr}, held-out {ns.eval_tokens:,} tokens\n")
    if results["dead"]:
        print(f"| run | tied init | AuxK | dead (no fire in last {ns.dead_tokens:,} train tokens) | "
              "dead (never fired, held-out) | held-out FVU | L0 |")
        print("|---|---|---|---|---|---|---|")
        for r in results["dead"]:
            print(f"| {r['name']} | {'yes' if r['tied_init'] else 'no'} | {'yes' if r['auxk'] else 'no'} | "
                  f"{100 * r['dead_train']:.2f} % | {100 * r['dead_heldout']:.2f} % | {r['fvu']:.4f} | {r['l0']:.1f} |")
        print()
    if results["relu"]:
        t = results["topk"]
        print("| SAE | L1 coef | L0 (held-out) | normalized MSE (FVU, held-out) |")
        print("|---|---|---|---|")
        print(f"| TopK k={ns.k} | - | {t['l0']:.1f} | {t['fvu']:.4f} |")
        for r in results["relu"]:
            print(f"| ReLU + L1 | {r['l1_coef']:g} | {r['l0']:.1f} | {r['fvu']:.4f} |")
        v = results.get("relu_fvu_at_topk_l0")
        if v is None:
            print(f"\nReLU L1 sweep does not bracket L0 = {t['l0']:.1f}: widen --l1.")
        else:
            print(f"\nReLU + L1 at matched L0 = {t['l0']:.1f} (interpolated): FVU {v:.4f}; "
                  f"TopK / ReLU = {t['fvu'] / v:.3f}")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    if results["dead"]:
        names = [r["name"].replace("topk_", "") for r in results["dead"]]
        axes[0].bar(names, [100 * r["dead_train"] for r in results["dead"]])
        axes[0].set_ylabel("dead latents (%)")
        axes[0].set_title("dead latents at the end of training")
        axes[0].tick_params(axis="x", rotation=20)
    if results["relu"]:
        r = sorted(results["relu"], key=lambda r: r["l0"])
        axes[1].plot([x["l0"] for x in r], [x["fvu"] for x in r], "o-", label="ReLU + L1")
        t = results["topk"]
        axes[1].plot([t["l0"]], [t["fvu"]], "r*", markersize=12, label="TopK")
        axes[1].set_xscale("log")
        axes[1].set_yscale("log")
        axes[1].set_xlabel("L0")
        axes[1].set_ylabel("held-out FVU")
        axes[1].legend()
        axes[1].set_title("sparsity / reconstruction frontier")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()

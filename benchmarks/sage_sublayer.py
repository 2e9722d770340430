"""SAGE's sublayer method against SAEs trained at the sublayer, on SmolLM2-135M (issue 15).

SAGE evaluates attention / MLP outputs without an SAE per sublayer: it splices a residual SAE's
reconstruction into the residual stream entering block ``j`` and lets the block recompute
``layers.j.attn_out`` / ``layers.j.mlp_out`` from it. This script trains, on the same KJV tokens,

1. a TopK SAE on each residual stream ``layers.j.resid_pre`` for the blocks ``j`` SAGE's
   cross-sections point at (IOI: head 23.h3 and 24.h4 at END; gender: the MLP of block 24 at NAME),
2. a TopK SAE directly at each ``layers.j.attn_out`` and ``layers.j.mlp_out`` of those blocks,

and, per task, compares at each sublayer location the residual SAE applied by recomputation with the
sublayer SAE applied directly (sufficiency, necessity, FVU, cosine; supervised dictionary as the
reference; :func:`hf_sae.evaluation.sage.validation.compare_sublayer_methods`).

Usage (resumable: the caches, each trained SAE and each task's result are kept under ``--work``)::

    nice -n 19 python benchmarks/sage_sublayer.py --work /tmp/sage_sublayer --threads 1

Writes ``<work>/sage_sublayer.json``, ``<work>/sage_sublayer.png`` and prints the markdown tables of
``benchmarks/RESULTS_sage.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BLOCKS = (23, 24)
HOOKS = [f"layers.{j}.{kind}" for j in BLOCKS for kind in ("resid_pre", "attn_out", "mlp_out")]
LOCATIONS = {  # attention and MLP outputs of blocks 23-24 where RESULTS_sage.md §2 found the tasks' signal
    "ioi": ["layers.23.attn_out@END", "layers.24.attn_out@END", "layers.24.mlp_out@END"],
    "gender": ["layers.24.mlp_out@NAME", "layers.24.attn_out@END", "layers.24.mlp_out@END"],
}


def ensure_caches(work: Path, train_tokens: int, val_tokens: int) -> tuple[Path, Path]:
    """KJV activations at every hook of HOOKS (one LM pass per split, stopped after block 24), resumable."""
    from hf_sae.data.cache import cache_activations
    from hf_sae.data.models import load_default_model

    out = {}
    for split, n in (("validation", val_tokens), ("train", train_tokens)):
        raw = work / f"cache_{split}"
        if not (raw / "metadata.json").is_file():
            model, tok = load_default_model()
            t = time.perf_counter()
            with torch.no_grad():
                cache_activations(model, tok, "default", HOOKS, raw, max_tokens=n, dtype="float16", split=split)
            print(f"cache {split}: {n} tokens x {len(HOOKS)} hooks in {time.perf_counter() - t:.0f} s", flush=True)
        out[split] = raw
    return out["train"], out["validation"]


def train_sae(hook: str, k: int, work: Path, train_dir: Path, val_dir: Path, ns):
    """One TopK SAE at ``hook`` (skipped when saved); returns (SAE, info with held-out FVU and seconds)."""
    from hf_sae import SparseAutoencoder
    from hf_sae.training import SAETrainer, SAETrainingArguments

    out = work / "saes" / hook
    if (out / "sae" / "config.json").is_file():
        return SparseAutoencoder.from_pretrained(out / "sae"), json.loads((out / "train.json").read_text())
    t = time.perf_counter()
    sae = SAETrainer(SAETrainingArguments(
        hook_points=[hook], activations=str(train_dir), eval_activations=str(val_dir), n_latents=ns.n_latents, k=k,
        train_tokens=ns.tokens, batch_size=ns.batch_size, eval_every_tokens=0, eval_tokens=ns.val_tokens,
        checkpoint_every_tokens=0, save_total_limit=1, log_every_steps=50, log_with=["jsonl"],
        output_dir=str(out / "run"), overwrite_output_dir=True, seed=ns.seed, run_name=hook.replace(".", "_"),
    )).train()[hook]
    info = {"seconds": time.perf_counter() - t, "k": k, **sae.config.training_info.get("final_metrics", {})}
    sae.save_pretrained(out / "sae")
    (out / "train.json").write_text(json.dumps(info, indent=1, default=float))
    print(f"{hook}: k={k} held-out FVU {info.get('eval_fvu')} ({info['seconds']:.0f} s)", flush=True)
    return sae, info


def main(argv=None) -> dict:
    from hf_sae.data.models import load_default_model
    from hf_sae.evaluation.sage import make_task
    from hf_sae.evaluation.sage.validation import compare_sublayer_methods

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/sage_sublayer", help="caches, SAEs and results")
    p.add_argument("--tasks", nargs="+", default=list(LOCATIONS), choices=sorted(LOCATIONS))
    p.add_argument("--edit-steps", type=int, nargs="+", default=[1, 4, 16])
    for flag, typ, default, what in (
        ("cache-tokens", int, 32768, "training tokens cached per hook"),
        ("val-tokens", int, 8192, "held-out tokens (KJV validation split) for FVU"),
        ("tokens", int, 131072, "training tokens per SAE (the cache is reused in epochs)"),
        ("n-latents", int, 1152, "latents per SAE (2x d)"), ("k-resid", int, 64, "k of the residual SAEs"),
        ("k-sublayer", int, 64, "k of the sublayer SAEs"), ("batch-size", int, 1024, "tokens per step"),
        ("n-fit", int, 64, "prompts fitting the supervised dictionaries"), ("n-eval", int, 48, "held-out prompts"),
        ("n-control", int, 16, "prompts for controllability"), ("seed", int, 0, "seed"),
        ("threads", int, 0, "torch threads (0 = all cores)"),
    ):
        p.add_argument(f"--{flag}", type=typ, default=default, help=f"{what} (default {default:g})")
    ns = p.parse_args(argv)
    torch.set_num_threads(ns.threads if ns.threads > 0 else (os.cpu_count() or 1))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(ns.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train_dir, val_dir = ensure_caches(work, ns.cache_tokens, ns.val_tokens)
    saes, infos = {}, {}
    needed = {f"layers.{j}.resid_pre" for j in BLOCKS} | {loc.split("@")[0] for t in ns.tasks for loc in LOCATIONS[t]}
    for hook in [h for h in HOOKS if h in needed]:
        k = ns.k_resid if hook.endswith("resid_pre") else ns.k_sublayer
        saes[hook], infos[hook] = train_sae(hook, k, work, train_dir, val_dir, ns)
        saes[hook].eval()
    model, tok = load_default_model()
    result_file = work / "sage_sublayer.json"
    results = json.loads(result_file.read_text()) if result_file.is_file() else {"tasks": {}}
    results.update(config=vars(ns), saes=infos)
    for name in ns.tasks:
        if name in results["tasks"]:
            continue
        t = time.perf_counter()
        fit, ev = make_task(name, tok, n_prompts=ns.n_fit + ns.n_eval, seed=ns.seed).split(ns.n_fit)
        per_block = {}
        for j in BLOCKS:
            subs = {h: saes[h] for h in (f"layers.{j}.attn_out", f"layers.{j}.mlp_out") if h in saes}
            with torch.no_grad():
                per_block[j] = compare_sublayer_methods(
                    model, saes[f"layers.{j}.resid_pre"], subs, fit, ev, LOCATIONS[name], batch_size=32,
                    edit_steps=ns.edit_steps, n_control=ns.n_control)
        results["tasks"][name] = {"blocks": per_block, "seconds": time.perf_counter() - t}
        result_file.write_text(json.dumps(results, indent=1, default=float))
        print(f"task {name}: {time.perf_counter() - t:.0f} s", flush=True)
    results["seconds_this_call"] = time.perf_counter() - t0
    result_file.write_text(json.dumps(results, indent=1, default=float))
    print_tables(results)
    plot(results, work / "sage_sublayer.png")
    return results


def rows(results: dict):
    """(task, location, compared block) for every location compared."""
    for task, r in results["tasks"].items():
        for block in r["blocks"].values():
            for key, v in block["locations"].items():
                yield task, key, v


def print_tables(results: dict) -> None:
    print("\n| SAE | k | held-out FVU | train seconds |\n|---|---|---|---|")
    for hook, i in results["saes"].items():
        print(f"| {hook} | {i['k']} | {i.get('eval_fvu', float('nan')):.3f} | {i['seconds']:.0f} |")
    print("\n| task | location | LD clean − mean-abl. | suff. supervised | suff. residual SAE (recomputed) | "
          "suff. sublayer SAE | nec. supervised | nec. residual (recomp.) | nec. sublayer SAE | "
          "FVU residual (recomp.) | FVU sublayer SAE | cos residual (recomp.) | cos sublayer SAE |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for task, key, v in rows(results):
        s, r, d = v["supervised"], v["residual_recomputed"], v["sublayer_sae"]
        print(f"| {task} | {key} | {v['denominator']:.2f} | {s['sufficiency']:.2f} | {r['sufficiency']:.2f} | "
              f"**{d['sufficiency']:.2f}** | {s['necessity']:.2f} | {r['necessity']:.2f} | {d['necessity']:.2f} | "
              f"{r['fvu']:.2f} | {d['fvu']:.2f} | {r['cosine']:.2f} | {d['cosine']:.2f} |")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = list(rows(results))
    if not items:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    labels = [f"{t}\n{k.replace('layers.', 'L')}" + ("" if abs(v["denominator"]) >= 0.5 else "\n(|Δ| < 0.5: noise)")
              for t, k, v in items]
    x = torch.arange(len(items)).float()
    for ax, metric in zip(axes, ("sufficiency", "necessity")):
        for off, (which, name) in zip((-0.27, 0.0, 0.27), (("supervised", "supervised"),
                                                             ("residual_recomputed", "residual SAE, recomputed"),
                                                             ("sublayer_sae", "SAE trained at the sublayer"))):
            ax.bar((x + off).tolist(), [v[which][metric] for _, _, v in items], width=0.27, label=name)
        ax.axhline(1.0, color="k", lw=0.6)
        ax.axhline(0.0, color="k", lw=0.6)
        ax.set_xticks(x.tolist())
        ax.set_xticklabels(labels, fontsize=6.5, rotation=60)
        ax.set_ylim(-0.5, 2.0)  # ratios at locations whose mean-ablation effect is tiny run off the axis
        ax.set_title(metric)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()

"""Scaling study on SmolLM2-135M activations: Gao et al. (2024)'s curves, regenerated from one script.

    nice -n 19 nohup .venv/bin/python benchmarks/scaling_study.py > runs/scaling_study.log 2>&1 &
    .venv/bin/python benchmarks/scaling_study.py --plan            # the manifest of runs, nothing trained
    .venv/bin/python benchmarks/scaling_study.py --stages report   # refit + replot from finished runs

Stages (``--stages``, default all, each resumable):

1. ``cache``: ``layers.6.resid_post`` activations of the embedded KJV corpus (train split: up to
   ``--cache-tokens``; validation split, Hebrews-Revelation: ``--eval-tokens``), with the same
   ``hf_sae.data.cache.cache_activations`` path as ``make quickstart``.
2. ``train``: every run of the manifest (``<work>/manifest.json``), each a normal ``hf-sae train``
   output folder ``<work>/runs/<name>/`` (the equivalent command is in ``command.txt``). A run whose
   SAE folder exists is skipped; a killed run resumes from its newest checkpoint. The groups:
   - ``LN``: TopK, k = 32, n in ``--sizes`` (L(N));
   - ``Lk``: TopK at n = ``--lk-n``, k in ``--ks`` (L(k)); with ``LN`` it feeds the joint L(N, k) fit;
   - ``frontier``: TopK / BatchTopK / JumpReLU / ReLU+L1 / top-AFA at several sparsities, two sizes;
   - ``multitopk``: TopK with the Multi-TopK (4k) term, against the plain TopK run of the same n, k.
   Every run sees the same tokens (``--train-tokens``; several passes over the cache) at the same
   batch size; the LR is ``--lr`` scaled by sqrt(``--lr-ref-n`` / n) (the paper's 1/sqrt(n) rule).
3. ``eval``: per run, on held-out text: normalised MSE (FVU), L0 and dead fraction on the held-out
   cache (the trainer's final evaluation); downstream Delta loss and KL with the reconstruction
   spliced into the LM; for the ``LN`` group also probe loss, the n-gram N2G baseline, faithful N2G
   (``hf_sae.evaluation.n2g.n2g_faithful_evaluate``), ablation sparsity; for ``multitopk`` the FVU
   at test-time k' in {k/2 ... 4k}. Written to ``<work>/runs/<name>/study_eval.json``.
4. ``report``: fits (``hf_sae.scaling``: L(N) with 95 % intervals and a bootstrap, L(k), joint
   L(N, k)), plots and tables into ``--results`` (committed: ``benchmarks/scaling/``):
   ``results.json``, ``tables.md``, ``*.png``.

"Flattened" criterion (stated in ``tables.md``): a run's held-out FVU, evaluated every
``--train-tokens / 4`` tokens, fell by less than ``--flat-tol`` (relative) over the last quarter of
training. Runs that miss it are marked; their loss is an upper bound on the converged loss.

Run outputs (SAE weights, checkpoints, caches) live under ``--work`` (default ``runs/scaling_study``,
git-ignored); only the summaries in ``--results`` are committed.

Cost: the cache, each run's training and each run's evaluation write ``*_timing.json`` (wall and CPU
seconds, load average); the report sums them, so a study resumed over several invocations, or worked
through by several processes at once (``--runs`` in each: a trainer's output-folder lock keeps two
processes off one run), is counted once. ``--only`` / ``--runs`` choose what an invocation trains and
evaluates; ``manifest.json`` and the report always cover the whole study, and the report refuses runs
whose ``train_args.json`` disagrees with its flags.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

HOOK = "layers.6.resid_post"


# ---------------------------------------------------------------------------------------------- plan
def build_manifest(ns) -> list[dict]:
    """Every run of the study: {name, groups, activation, n, k, extra training arguments}."""
    runs: dict[str, dict] = {}

    def add(group, activation, n, k=32, **extra):
        tag = "_".join(f"{a}{b:g}" if isinstance(b, float) else f"{a}{b}" for a, b in sorted(extra.items()))
        name = f"{activation}_n{n}" + (f"_k{k}" if activation in ("topk", "batchtopk", "topafa") else "") \
            + (f"_{tag}" if tag else "")
        run = runs.setdefault(name, {"name": name, "groups": [], "activation": activation, "n": n, "k": k,
                                     "extra": extra})
        if group not in run["groups"]:
            run["groups"].append(group)

    for n in ns.sizes:
        add("LN", "topk", n, ns.k)
    for k in ns.ks:
        add("Lk", "topk", ns.lk_n, k)
    for n in ns.frontier_sizes:
        for k in ns.ks:
            add("frontier", "topk", n, k)
        for k in ns.batchtopk_ks:
            add("frontier", "batchtopk", n, k)
        for c in ns.l1:
            add("frontier", "relu", n, ns.k, l1_coef=c)
        for c in ns.l0:
            add("frontier", "jumprelu", n, ns.k, l0_coef=c)
        for c in ns.afa:
            add("frontier", "topafa", n, min(ns.topafa_cap, n), afa_coef=c)
    add("multitopk", "topk", ns.lk_n, ns.k, multi_topk=True)
    add("multitopk", "topk", ns.lk_n, ns.k)
    # priority order: L(N) (small to large), the Multi-TopK pair, then the frontier / L(k) by size
    # (the two largest L(N) sizes last: they cost as much as everything else together)
    def tier(r):
        if "LN" in r["groups"]:
            return 0 if r["n"] <= sorted(ns.sizes)[max(0, len(ns.sizes) - 3)] else 3
        return 1 if "multitopk" in r["groups"] else 2

    return sorted(runs.values(), key=lambda r: (tier(r), r["n"], r["name"]))


def run_lr(ns, n: int) -> float:
    return ns.lr * math.sqrt(ns.lr_ref_n / n)


def training_kwargs(ns, run: dict, cache: Path, work: Path) -> dict:
    """The SAETrainingArguments of one run (the same values as its command.txt)."""
    every = max(ns.batch_size, ns.train_tokens // 4 // ns.batch_size * ns.batch_size)
    kw = dict(hook_points=[HOOK], activations=str(cache / "train"), eval_activations=str(cache / "validation"),
              activation=run["activation"], n_latents=run["n"], k=run["k"], train_tokens=ns.train_tokens,
              batch_size=ns.batch_size, lr=run_lr(ns, run["n"]), dead_tokens_threshold=ns.dead_tokens,
              eval_every_tokens=every, eval_tokens=ns.eval_tokens, checkpoint_every_tokens=2 * every,
              save_total_limit=1, log_every_steps=20, log_with=["jsonl"], output_dir=str(work / "runs" / run["name"]),
              seed=ns.seed, run_name=run["name"], progress_bar=False, resume=True)
    kw.update(run["extra"])
    return kw


def command_line(kw: dict) -> str:
    parts = ["hf-sae train"]
    for key, v in kw.items():
        if isinstance(v, list):
            v = " ".join(map(str, v))
        parts.append(f"--{key} {v}")
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------- stages
def stage_cache(ns, cache: Path) -> dict:
    import torch

    from hf_sae.data.cache import cache_activations
    from hf_sae.data.models import load_default_model

    done = all((cache / s / "metadata.json").is_file() for s in ("train", "validation"))
    if not done:
        cache.mkdir(parents=True, exist_ok=True)
        with timed(cache / "cache_timing.json"), torch.no_grad():
            model, tok = load_default_model()
            cache_activations(model, tok, "default", [HOOK], cache / "validation", max_tokens=ns.eval_cache_tokens,
                              dtype="float16", split="validation", progress=False)
            cache_activations(model, tok, "default", [HOOK], cache / "train", max_tokens=ns.cache_tokens,
                              dtype="float16", split="train", progress=False)
    return {s: json.loads((cache / s / "metadata.json").read_text())["per_hook_point"][HOOK]["num_tokens"]
            for s in ("train", "validation")}


def sae_folder(work: Path, run: dict) -> Path:
    return work / "runs" / run["name"] / HOOK


def stage_train(ns, manifest, cache: Path, work: Path, log) -> None:
    from hf_sae.training import SAETrainer, SAETrainingArguments

    for run in manifest:
        if (sae_folder(work, run) / "config.json").is_file():
            continue
        kw = training_kwargs(ns, run, cache, work)
        out = Path(kw["output_dir"])
        out.mkdir(parents=True, exist_ok=True)
        (out / "command.txt").write_text(command_line(kw) + "\n")
        log(f"train {run['name']} lr={kw['lr']:.2e}")
        with timed(out / "train_timing.json") as tm:
            SAETrainer(SAETrainingArguments(**kw)).train()
        log(f"  done in {tm['wall_seconds']:.0f} s ({tm['cpu_seconds']:.0f} CPU s, load {tm['loadavg'][0]:.1f})")


def _heldout_windows(tok, n_tokens: int):
    from hf_sae.data import corpus

    ids = corpus.windows_with_tokens("default", tok, n_tokens, window=128, split="validation")
    return ids, corpus.token_mask(ids, tok)


def flattened(history: list[dict], tol: float) -> dict:
    """The held-out FVU trajectory and whether it fell by < tol (relative) over the last quarter."""
    pts = [(r["tokens"], r[f"{HOOK}/eval/fvu"]) for r in history if f"{HOOK}/eval/fvu" in r]
    if len(pts) < 3:
        return {"flattened": None, "last_quarter_rel_drop": None, "eval_fvu_curve": pts}
    last_t = pts[-1][0]
    ref = min(pts[:-1], key=lambda p: abs(p[0] - 0.75 * last_t))
    drop = (ref[1] - pts[-1][1]) / ref[1]
    return {"flattened": bool(drop < tol), "last_quarter_rel_drop": drop, "eval_fvu_curve": pts}


_LM: dict = {}


def stage_eval(ns, manifest, work: Path, log) -> int:
    """Evaluate every trained run of ``manifest`` that has no ``study_eval.json`` yet; returns how many."""
    import torch

    from hf_sae.data.models import load_default_model
    from hf_sae.evaluation.downstream import clean_next_token_log_probs

    done = 0
    for run in manifest:
        folder = sae_folder(work, run)
        res_path = work / "runs" / run["name"] / "study_eval.json"
        if not (folder / "config.json").is_file() or res_path.is_file():
            continue
        if not _LM:  # the LM and the held-out windows, loaded once per process
            _LM["model"], _LM["tok"] = load_default_model()
            _LM["ids"], _LM["keep"] = _heldout_windows(_LM["tok"], ns.downstream_tokens)
            with torch.no_grad():  # the clean forward is the same for every SAE: once per process
                _LM["clean"] = [clean_next_token_log_probs(_LM["model"], _LM["ids"][s:s + 4])
                                for s in range(0, _LM["ids"].shape[0], 4)]
        run_dir = work / "runs" / run["name"]
        with timed(run_dir / "eval_timing.json") as tm:
            res = _evaluate_run(ns, run, folder, run_dir, work)
        res.update(train_timing=read_timing(run_dir / "train_timing.json"), eval_timing=tm)
        res_path.write_text(json.dumps(res, indent=1, default=float))
        log(f"eval {run['name']}: fvu={res['fvu']:.4f} l0={res['l0']:.1f} dloss={res['delta_loss']:.4f} "
            f"({tm['wall_seconds']:.0f} s, {tm['cpu_seconds']:.0f} CPU s)")
        done += 1
    return done


def _evaluate_run(ns, run: dict, folder: Path, run_dir: Path, work: Path) -> dict:
    """Every study metric of one trained run (the row of ``study_eval.json``, without timings)."""
    import torch

    from hf_sae import SparseAutoencoder
    from hf_sae.evaluation.downstream import DownstreamStats, downstream_batch

    model, tok, ids, keep = _LM["model"], _LM["tok"], _LM["ids"], _LM["keep"]
    sae = SparseAutoencoder.from_pretrained(str(folder)).eval()
    info = sae.config.training_info
    fm = info["final_metrics"]
    metrics = run_dir / "logs" / "metrics.jsonl"
    history = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] \
        if metrics.is_file() else []
    res = {"name": run["name"], "groups": run["groups"], "activation": run["activation"], "n": run["n"],
           "k": run["k"], "extra": run["extra"], "tokens_trained": info["tokens_trained"],
           "fvu": fm.get("eval_fvu"), "l0": fm.get("eval_l0"), "dead_heldout": fm.get("eval_dead_fraction"),
           "dead_train": fm.get("train_dormant_fraction", fm.get("train_dead_fraction")),  # runs before the rename
           **flattened(history, ns.flat_tol)}
    ds = DownstreamStats()
    with torch.no_grad():
        for s, clean in zip(range(0, ids.shape[0], 4), _LM["clean"]):
            o = downstream_batch(model, sae, ids[s:s + 4], keep[s:s + 4], HOOK, ablations=(), clean_log_probs=clean)
            ds.update(o["ce_clean"], o["ce_spliced"], o["kl"])
    d = ds.compute()
    res.update(ce_clean=d["ce_clean"], ce_spliced=d["ce_spliced"], delta_loss=d["delta_loss"], kl=d["kl"])
    if "LN" in run["groups"]:
        res.update(_size_metrics(ns, sae, model, tok, run_dir))
    if "multitopk" in run["groups"]:
        res["fvu_at_k"] = _fvu_at_k(ns, sae, work)
    return res


@contextlib.contextmanager
def timed(path: Path):
    """Time the body: wall and CPU seconds (this process, all threads) and the 1-minute load average at both
    ends, written to ``path`` (JSON) when the body finishes; yields the dict that is filled in."""
    t, c, load0 = time.perf_counter(), time.process_time(), os.getloadavg()[0]
    tm: dict = {}
    yield tm
    tm.update(wall_seconds=time.perf_counter() - t, cpu_seconds=time.process_time() - c,
              loadavg=[load0, os.getloadavg()[0]])
    path.write_text(json.dumps(tm))


def read_timing(path: Path) -> dict:
    """A ``timed`` file, with ``ended``: its modification time (epoch seconds), i.e. when the timed body ended."""
    return {**json.loads(path.read_text()), "ended": path.stat().st_mtime} if path.is_file() else {}


def _size_metrics(ns, sae, model, tok, run_dir: Path) -> dict:
    """Probe loss, N2G (n-gram baseline and faithful), ablation sparsity: `hf-sae eval` + faithful N2G."""
    import torch

    from hf_sae.evaluation.n2g import n2g_faithful_evaluate
    from hf_sae.evaluation.run import add_eval_args, run_eval

    args = add_eval_args(argparse.ArgumentParser()).parse_args([
        str(run_dir / HOOK), "--metrics", "probes,n2g,ablation", "--n-tokens", str(ns.metric_tokens),
        "--probe-tokens", str(ns.metric_tokens), "--probe-baselines", "", "--n2g-latents", str(ns.n2g_latents),
        "--ablation-latents", str(ns.ablation_latents), "--window", "128", "--out", str(run_dir / "eval"),
        "--no-report", "--no-progress", "--seed", str(ns.seed)])
    with torch.no_grad():
        r = run_eval(args, sae=sae, model=model, tokenizer=tok)
    s = r["summary"]
    out = {"probe_loss": s.get("mean_probe_loss_sae"), "n2g_ngram_precision": s.get("n2g_precision"),
           "n2g_ngram_recall": s.get("n2g_recall"), "ablation_sparsity": s.get("ablation_sparsity")}
    f = n2g_faithful_evaluate(model, tok, sae, HOOK, n_tokens=ns.metric_tokens, n_latents=ns.n2g_latents,
                              top_contexts=ns.n2g_contexts, max_context=ns.n2g_max_context, window=128, seed=ns.seed)
    (run_dir / "eval" / "n2g_faithful.json").write_text(json.dumps(f, indent=1, default=float))
    out.update(n2g_precision=f["summary"]["precision"], n2g_recall=f["summary"]["recall"],
               n2g_f1=f["summary"]["f1"])
    return out


def _fvu_at_k(ns, sae, work: Path) -> dict:
    """Held-out FVU of a TopK SAE evaluated with k' active latents (the progressive-code curve)."""
    import torch

    from hf_sae.data.cache import CachedActivations
    from hf_sae.evaluation.reconstruction import fvu

    x = CachedActivations(work / "cache" / "validation", hook_point=[HOOK], shuffle=False) \
        .to_tensor(HOOK, max_rows=ns.eval_tokens).float()
    k0, res = sae.config.k, {}
    try:
        for kp in sorted({max(1, k0 // 2), k0 * 3 // 4, k0, k0 * 3 // 2, 2 * k0, 3 * k0, 4 * k0}):
            sae.config.k = kp
            with torch.no_grad():
                res[str(kp)] = fvu(x, torch.cat([sae(x[i:i + 4096]).reconstruction for i in range(0, len(x), 4096)]))
    finally:
        sae.config.k = k0
    return res


# ---------------------------------------------------------------------------------------------- report
def study_command(ns) -> str:
    """The command that trains and evaluates this study: the script with every setting that differs from its
    default (paths and --stages / --only / --runs left out: they choose where and what, not how)."""
    defaults = vars(parser().parse_args([]))
    skip = {"work", "results", "reproduction", "stages", "plan", "only", "runs", "report_every"}
    flags = []
    for key, v in vars(ns).items():
        if key in skip or v == defaults[key]:
            continue
        v = ",".join(f"{x:g}" for x in v) if isinstance(v, list) else v
        flags.append(f"--{key.replace('_', '-')} {v}")
    return " ".join(["nice -n 19 .venv/bin/python benchmarks/scaling_study.py", *flags])


def study_cost(work: Path, rows: list[dict]) -> dict:
    """Wall and CPU seconds of the finished study, summed over its stages from the timing files the cache and
    each run wrote (so a study resumed over several invocations, or run by several processes, is counted once),
    the elapsed time from the first stage's start to the last one's end, and the load averages seen."""
    parts = {"cache": [read_timing(work / "cache" / "cache_timing.json")],
             "train": [read_timing(work / "runs" / r["name"] / "train_timing.json") for r in rows],
             "eval": [read_timing(work / "runs" / r["name"] / "eval_timing.json") for r in rows]}
    parts = {stage: [t for t in ts if t] for stage, ts in parts.items()}
    spans = [(t["ended"] - t["wall_seconds"], t["ended"]) for ts in parts.values() for t in ts]
    out = {f"{stage}_{kind}_seconds": sum(t.get(f"{kind}_seconds", 0.0) for t in ts)
           for stage, ts in parts.items() for kind in ("wall", "cpu")}
    loads = [v for ts in parts.values() for t in ts for v in t.get("loadavg", [])]
    out.update(wall_seconds=sum(out[f"{s}_wall_seconds"] for s in parts),
               cpu_seconds=sum(out[f"{s}_cpu_seconds"] for s in parts),
               loadavg_min=min(loads, default=None), loadavg_max=max(loads, default=None),
               elapsed_seconds=max(e for _, e in spans) - min(b for b, _ in spans) if spans else 0.0)
    return out


def collect(work: Path, manifest) -> list[dict]:
    """The ``study_eval.json`` rows of the finished runs, with the N2G spread read from each run's per-latent
    faithful-N2G file."""
    out = []
    for run in manifest:
        p = work / "runs" / run["name"] / "study_eval.json"
        if p.is_file():
            out.append({**json.loads(p.read_text()), **n2g_spread(p.parent / "eval" / "n2g_faithful.json")})
    return out


def n2g_spread(path: Path) -> dict:
    """Standard errors of the mean faithful-N2G precision and recall over the scored latents (those that fire
    on the test text): ``{"n2g_precision_se", "n2g_recall_se"}``, or ``{}`` without the file or two latents."""
    if not path.is_file():
        return {}
    scored = [r for r in json.loads(path.read_text())["latents"] if r["n_fires_test"] > 0]
    if len(scored) < 2:
        return {}
    import statistics

    return {f"n2g_{k}_se": statistics.stdev(r[k] for r in scored) / math.sqrt(len(scored))
            for k in ("precision", "recall")}


_CHECKED = ("activation", "n_latents", "k", "train_tokens", "batch_size", "lr", "dead_tokens_threshold",
            "eval_every_tokens", "eval_tokens", "seed")


def settings_mismatch(ns, run: dict, work: Path) -> list[str]:
    """The training settings of a finished run (its ``train_args.json``) that differ from what this command's
    flags would train, as ``key=saved (this command: wanted)``; ``[]`` when they agree or nothing was saved."""
    path = work / "runs" / run["name"] / "train_args.json"
    if not path.is_file():
        return []
    saved, want = json.loads(path.read_text()), training_kwargs(ns, run, work / "cache", work)
    bad = []
    for key in (*_CHECKED, *run["extra"]):
        a, b = want[key], saved.get(key)
        same = math.isclose(a, b, rel_tol=1e-9) if isinstance(a, float) and isinstance(b, (int, float)) else a == b
        if not same:
            bad.append(f"{key}={b!r} (this command: {a!r})")
    return bad


def stage_report(ns, manifest, work: Path, results_dir: Path, meta: dict, log) -> dict:
    import scaling_plots as plots

    from hf_sae.scaling import fit_joint_law, fit_power_law

    rows = collect(work, manifest)
    for run in manifest:  # a report must describe the runs it reads: refuse before writing anything
        bad = settings_mismatch(ns, run, work)
        if bad:
            raise SystemExit(f"report: run {run['name']} was trained with {', '.join(bad)}; rerun with the flags "
                             f"the study was trained with (see {work / 'runs' / run['name'] / 'command.txt'})")
    results_dir.mkdir(parents=True, exist_ok=True)
    meta = {**meta, "cost": study_cost(work, rows),
            "study_command": study_command(ns)}
    report: dict = {"meta": meta, "runs": rows, "fits": {}, "missing": [r["name"] for r in manifest
                                                                       if r["name"] not in {x["name"] for x in rows}]}
    ln = sorted([r for r in rows if "LN" in r["groups"]], key=lambda r: r["n"])
    lk = sorted([r for r in rows if "Lk" in r["groups"]], key=lambda r: r["k"])
    if len(ln) >= 3:
        fit = fit_power_law([r["n"] for r in ln], [r["fvu"] for r in ln], bootstrap=ns.bootstrap, seed=ns.seed)
        report["fits"]["L(N)"] = json.loads(fit.to_json())
        plots.power_law(ln, fit, results_dir / "L_of_N.png", subject=plots.subject(meta))
    if len(lk) >= 3:
        fit = fit_power_law([r["k"] for r in lk], [r["fvu"] for r in lk], bootstrap=ns.bootstrap, seed=ns.seed)
        report["fits"]["L(k)"] = json.loads(fit.to_json())
        plots.power_law(lk, fit, results_dir / "L_of_k.png", x="k", subject=plots.subject(meta))
    topk = [r for r in rows if r["activation"] == "topk" and not r["extra"]]
    if len({(r["n"], r["k"]) for r in topk}) >= 7:
        fit = fit_joint_law([r["n"] for r in topk], [r["k"] for r in topk], [r["fvu"] for r in topk])
        report["fits"]["L(N,k)"] = json.loads(fit.to_json())
        plots.joint_law(topk, fit, results_dir / "L_of_N_k.png")
    front = [r for r in rows if "frontier" in r["groups"]]
    if front:
        plots.frontier(front, results_dir / "frontier.png", subject=plots.subject(meta))
    if ln:
        plots.metrics_vs_size(ln, results_dir / "metrics_vs_size.png")
    mt = [r for r in rows if "multitopk" in r["groups"] and "fvu_at_k" in r]
    if mt:
        plots.progressive(mt, results_dir / "progressive_code.png")
    (results_dir / "results.json").write_text(json.dumps(report, indent=1, default=float))
    (results_dir / "tables.md").write_text(plots.tables(report, ns))
    rel = os.path.relpath(results_dir, Path(ns.reproduction).parent)
    Path(ns.reproduction).write_text(plots.reproduction_md(report, ns, results_link=rel))
    log(f"report: {len(rows)}/{len(manifest)} runs evaluated -> {results_dir}")
    return report


# ---------------------------------------------------------------------------------------------- main
def parser() -> argparse.ArgumentParser:
    def ints(s):
        return [int(v) for v in s.split(",") if v]

    def floats(s):
        return [float(v) for v in s.split(",") if v]

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default=str(REPO / "runs" / "scaling_study"), help="run outputs (git-ignored)")
    p.add_argument("--results", default=str(REPO / "benchmarks" / "scaling"), help="committed summaries + plots")
    p.add_argument("--reproduction", default=str(REPO / "benchmarks" / "REPRODUCTION.md"),
                   help="the claim-by-claim markdown written by the report stage")
    p.add_argument("--stages", default="cache,train,eval,report")
    p.add_argument("--plan", action="store_true", help="write + print the manifest and exit")
    p.add_argument("--only", default="", help="comma list of groups to train/eval (default: all)")
    p.add_argument("--runs", default="", help="comma list of run names to train/eval, in this order (default: all)")
    p.add_argument("--cache-tokens", type=int, default=32_768, help="training tokens cached")
    p.add_argument("--eval-tokens", type=int, default=8192,
                   help="held-out tokens for FVU / L0 / dead (the cache holds 16384: it is shared with larger runs)")
    p.add_argument("--eval-cache-tokens", type=int, default=16_384, help="held-out tokens cached")
    p.add_argument("--train-tokens", type=int, default=32_768, help="tokens per run (passes over the cache)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3, help="peak LR at n = --lr-ref-n")
    p.add_argument("--lr-ref-n", type=int, default=1024)
    p.add_argument("--dead-tokens", type=int, default=16_384, help="dead = no fire in this many training tokens")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--sizes", type=ints, default=[512, 1024, 2048, 4096, 8192, 16384, 32768])
    p.add_argument("--ks", type=ints, default=[8, 16, 32, 64, 128])
    p.add_argument("--lk-n", type=int, default=1024)
    p.add_argument("--frontier-sizes", type=ints, default=[512, 1024])
    p.add_argument("--batchtopk-ks", type=ints, default=[16, 64])
    p.add_argument("--l1", type=floats, default=[0.003, 0.03])
    p.add_argument("--l0", type=floats, default=[0.001, 0.01])
    p.add_argument("--afa", type=floats, default=[0.03125])
    p.add_argument("--topafa-cap", type=int, default=128, help="cap on k(x) of top-AFA")
    p.add_argument("--downstream-tokens", type=int, default=256, help="held-out tokens for Delta loss / KL")
    p.add_argument("--metric-tokens", type=int, default=1024, help="held-out tokens for probes / N2G / ablation")
    p.add_argument("--n2g-latents", type=int, default=8)
    p.add_argument("--n2g-contexts", type=int, default=4, help="top-activating contexts per latent (faithful N2G)")
    p.add_argument("--n2g-max-context", type=int, default=8, help="longest context kept before pruning (tokens)")
    p.add_argument("--ablation-latents", type=int, default=4)
    p.add_argument("--flat-tol", type=float, default=0.02, help="'flattened' = held-out FVU fell < this over the "
                                                               "last quarter of training (relative)")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples of the L(N) / L(k) fits")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report-every", type=float, default=600,
                   help="refresh the report after a run at most this often (seconds; the last one is always written)")
    p.add_argument("--threads", type=int, default=0)
    return p


def main(argv=None) -> dict:
    ns = parser().parse_args(argv)
    stages = [s for s in ns.stages.split(",") if s]
    bad = [s for s in stages if s not in ("cache", "train", "eval", "report")]
    if bad:
        raise SystemExit(f"--stages: unknown stage(s) {bad}; choose from cache,train,eval,report")
    work, results_dir = Path(ns.work), Path(ns.results)
    work.mkdir(parents=True, exist_ok=True)
    manifest = build_manifest(ns)  # the whole study: manifest.json and the report always describe all of it
    (work / "manifest.json").write_text(json.dumps(manifest, indent=1))
    todo = manifest  # the runs this invocation trains and evaluates
    if ns.only:
        groups = set(ns.only.split(","))
        todo = [r for r in todo if groups & set(r["groups"])]
    if ns.runs:  # these runs, in this order (e.g. a second process working on other runs than the first)
        by_name = {r["name"]: r for r in todo}
        unknown = [n for n in ns.runs.split(",") if n not in by_name]
        if unknown:
            raise SystemExit(f"--runs: unknown run(s) {unknown}; see --plan for the names")
        todo = [by_name[n] for n in ns.runs.split(",")]
    if ns.plan:
        for r in todo:
            print(f"{r['name']:45s} {','.join(r['groups']):20s} lr={run_lr(ns, r['n']):.2e}")
        print(f"{len(todo)} runs x {ns.train_tokens:,} tokens; manifest: {work / 'manifest.json'}")
        return {"manifest": todo}
    if stages == ["report"] and not collect(work, manifest):  # a fresh clone: keep the committed report
        raise SystemExit(f"--stages report: no evaluated runs under {work / 'runs'}, so nothing to refit; "
                         f"{ns.reproduction} and {results_dir} are left as they are (run the study first)")

    import torch

    torch.set_num_threads(ns.threads if ns.threads > 0 else (os.cpu_count() or 1))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - t0:.0f}s] {msg}", flush=True)

    cache = work / "cache"
    meta: dict = {"hook_point": HOOK, "model": "SmolLM2-135M-Instruct (embedded)", "corpus": "KJV (embedded)",
                  "config": {k: v for k, v in vars(ns).items() if k not in ("work", "results", "reproduction")},
                  "niceness": os.nice(0), "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                  "command": "python benchmarks/scaling_study.py "
                  + " ".join(argv if argv is not None else sys.argv[1:])}
    if "cache" in stages or (cache / "train" / "metadata.json").is_file():
        meta["cached_tokens"] = stage_cache(ns, cache)
        log(f"cache: {meta['cached_tokens']}")

    last_report = [-math.inf]

    def finish():
        meta["wall_seconds_this_invocation"] = time.perf_counter() - t0
        last_report[0] = time.perf_counter()
        return stage_report(ns, manifest, work, results_dir, meta, log) if "report" in stages else {"meta": meta}

    # one run at a time (train, evaluate, refresh the report at most every --report-every seconds), so partial
    # results cover every group early; a run that fails is logged and left unfinished (the report lists it), and
    # the exit status is 1
    failed = []
    for run in todo:
        try:
            if "train" in stages:
                stage_train(ns, [run], cache, work, log)
            if "eval" in stages and stage_eval(ns, [run], work, log) and "report" in stages \
                    and time.perf_counter() - last_report[0] >= ns.report_every:
                finish()
        except Exception:  # noqa: BLE001 - one broken run must not stop the others
            import traceback

            failed.append(run["name"])
            log(f"FAILED {run['name']}:\n{traceback.format_exc()}")
    report = finish()
    if failed:
        raise SystemExit(f"{len(failed)} run(s) failed: {failed} (see the log above); rerun to retry them")
    return report


if __name__ == "__main__":
    main()

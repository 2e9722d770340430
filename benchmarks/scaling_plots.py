"""Plots and markdown tables of ``benchmarks/scaling_study.py`` (rows = the runs' ``study_eval.json``)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from hf_sae.scaling import plot_power_law

_COLORS = {"topk": "C0", "batchtopk": "C1", "jumprelu": "C2", "relu": "C3", "topafa": "C4"}
_LABELS = {"topk": "TopK", "batchtopk": "BatchTopK", "jumprelu": "JumpReLU", "relu": "ReLU + L1", "topafa": "top-AFA"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, dpi: int = 120) -> Path:
    plt = _plt()
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return Path(path)


def power_law(rows, fit, path: Path, x: str = "n", subject: str = "") -> Path:
    """L(N) (x="n") or L(k) (x="k") with the fitted law (``hf_sae.scaling.plot_power_law``); ``subject``
    (model and hook point) heads the title."""
    title = f"{subject}\nTopK " + (f"k={rows[0]['k']}" if x == "n" else f"n={rows[0]['n']}")
    p = plot_power_law([r[x] for r in rows], [r["fvu"] for r in rows], fit, path, title=title)
    if x == "k":  # the shared plot labels its x axis "latents N"; relabel for L(k)
        plt = _plt()
        fig, ax = plt.subplots(figsize=(5.5, 4))
        ks = np.array([r["k"] for r in rows], float)
        grid = np.geomspace(ks.min() / 1.5, ks.max() * 2, 200)
        pr = fit.params
        ax.loglog(ks, [r["fvu"] for r in rows], "o", label="sweep")
        ax.loglog(grid, pr["alpha"] * grid ** pr["beta"] + pr["L_irr"], "-",
                  label=f"fit: beta={pr['beta']:.3f} [{fit.ci95['beta'][0]:.3f}, {fit.ci95['beta'][1]:.3f}]")
        ax.set_xlabel("active latents k")
        ax.set_ylabel("normalized MSE (held-out)")
        ax.set_title(title)
        ax.legend(fontsize=8)
        _save(fig, path)
    return p


def joint_law(rows, fit, path: Path) -> Path:
    """Every TopK run, FVU against n, one line per k, with the joint L(N, k) fit."""
    plt = _plt()
    p = fit.params
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for i, k in enumerate(sorted({r["k"] for r in rows})):
        pts = sorted((r["n"], r["fvu"]) for r in rows if r["k"] == k)
        ns = np.array([a for a, _ in pts], float)
        ax.loglog(ns, [b for _, b in pts], "o", c=f"C{i}", label=f"k={k}")
        grid = np.geomspace(256, 65536, 100)
        lk, ln = math.log(k), np.log(grid)
        pred = np.exp(p["a"] + p["b_k"] * lk + p["b_n"] * ln + p["g"] * lk * ln) + math.exp(p["z"] + p["h"] * lk)
        ax.loglog(grid, pred, "-", c=f"C{i}", lw=0.8)
    ax.set_xlabel("latents N")
    ax.set_ylabel("normalized MSE (held-out)")
    ax.set_title(f"joint L(N, k) fit (RMS log residual {fit.rms_log_residual:.3f})")
    ax.legend(fontsize=8)
    return _save(fig, path, 120)


def frontier(rows, path: Path, subject: str = "") -> Path:
    """Normalised MSE and Delta loss against L0, one line per (activation, size)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for act in _LABELS:
        for j, n in enumerate(sorted({r["n"] for r in rows})):
            pts = sorted((r["l0"], r["fvu"], r["delta_loss"]) for r in rows if r["activation"] == act and r["n"] == n
                         and r["l0"] and r["l0"] > 0)
            if not pts:
                continue
            style = "o-" if j == 0 else "s--"
            lab = f"{_LABELS[act]} n={n}"
            axes[0].plot([a for a, _, _ in pts], [b for _, b, _ in pts], style, c=_COLORS[act], label=lab, ms=4)
            axes[1].plot([a for a, _, _ in pts], [c for _, _, c in pts], style, c=_COLORS[act], label=lab, ms=4)
    for ax, yl in zip(axes, ("normalized MSE (held-out)", "Delta LM loss (nats/token)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("L0 (active latents per token, held-out)")
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"sparsity-reconstruction frontier, {subject}")
    return _save(fig, path, 120)


SIZE_METRICS = [("fvu", "normalized MSE", True), ("delta_loss", "Delta loss (nats)", True), ("kl", "KL (nats)", True),
                ("probe_loss", "probe loss (nats)", True), ("n2g_precision", "N2G precision", False),
                ("n2g_recall", "N2G recall", False), ("ablation_sparsity", "ablation sparsity", True),
                ("dead_train", "dead fraction (train)", True)]


def metrics_vs_size(rows, path: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(2, 4, figsize=(14, 6))
    for ax, (key, label, _) in zip(axes.flat, SIZE_METRICS):
        pts = [(r["n"], r.get(key), r.get(f"{key}_se")) for r in rows if r.get(key) is not None]
        err = [c for _, _, c in pts] if all(c is not None for _, _, c in pts) else None  # 1 SE over the latents
        ax.errorbar([a for a, _, _ in pts], [b for _, b, _ in pts], yerr=err, fmt="o-", capsize=3)
        if key == "n2g_precision":
            pts = [(r["n"], r.get("n2g_ngram_precision")) for r in rows if r.get("n2g_ngram_precision") is not None]
            ax.plot([a for a, _ in pts], [b for _, b in pts], "x:", c="gray", label="n-gram baseline")
            ax.legend(fontsize=7)
        if key == "n2g_recall":
            pts = [(r["n"], r.get("n2g_ngram_recall")) for r in rows if r.get("n2g_ngram_recall") is not None]
            ax.plot([a for a, _ in pts], [b for _, b in pts], "x:", c="gray", label="n-gram baseline")
            ax.legend(fontsize=7)
        ax.set_xscale("log", base=2)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("latents n")
        ax.grid(alpha=0.3)
    fig.suptitle(f"metrics against SAE size (TopK, k={rows[0]['k']})")
    return _save(fig, path, 110)


def progressive(rows, path: Path) -> Path:
    """Held-out FVU at test-time k' for the Multi-TopK and the plain TopK SAE (same n, trained k)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for r in sorted(rows, key=lambda r: bool(r["extra"].get("multi_topk"))):
        ks = sorted(int(k) for k in r["fvu_at_k"])
        lab = ("Multi-TopK" if r["extra"].get("multi_topk") else "TopK") + f" (trained k={r['k']})"
        ax.loglog(ks, [r["fvu_at_k"][str(k)] for k in ks], "o-", label=lab)
        ax.axvline(r["k"], c="gray", ls=":", lw=0.8)
    ax.set_xlabel("k' used at test time")
    ax.set_ylabel("normalized MSE (held-out)")
    ax.set_title(f"progressive code, n={rows[0]['n']}")
    ax.legend(fontsize=8)
    return _save(fig, path, 120)


# ---------------------------------------------------------------------------------------------- tables
def _timing(t) -> str:
    return f"{t['wall_seconds']:.0f} ({t['cpu_seconds']:.0f})" if t else "n/a"


def _f(v, spec=".4f"):
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def _identified(fit, key) -> bool:
    """False when the 95 % interval has zero width although the fit leaves residuals: the data do not pin the
    parameter (a degenerate fit). An exact fit (no residual) has zero-width intervals legitimately."""
    lo, hi = fit["ci95"][key]
    return hi - lo > 1e-9 * max(1.0, abs(fit["params"][key])) or fit["rms_log_residual"] < 1e-6


def _ci(fit, key, spec=".3f", label="") -> str:
    lo, hi = fit["ci95"][key]
    return f"[{label}{lo:{spec}}, {hi:{spec}}]" if _identified(fit, key) else "[interval not identified]"


def _fit_line(name, fit, keys):
    parts = []
    for k in keys:
        b = fit.get("bootstrap_ci95", {}).get(k)
        parts.append(f"{k} = {fit['params'][k]:.4g} {_ci(fit, k, '.4g', '95 % CI ')}"
                     + (f" (bootstrap {b[0]:.4g}, {b[1]:.4g})" if b else ""))
    return f"- **{name}** ({fit['law']}, {fit['n_points']} points, RMS log residual {fit['rms_log_residual']:.3f}): " \
           + "; ".join(parts)


def subject(m: dict) -> str:
    """The model and hook point, for plot titles."""
    return f"{m['model']} {m['hook_point']}"


def _passes(m: dict, ns) -> float:
    return ns.train_tokens / max(1, (m.get("cached_tokens") or {}).get("train", ns.train_tokens))


def setup_text(m: dict, ns) -> str:
    """One paragraph: model, hook point, corpus, token counts of every stage, optimiser settings."""
    c = m.get("cached_tokens") or {}
    return (
        f"Setup: {m['model']}, hook point `{m['hook_point']}`, corpus {m['corpus']} (held-out numbers on its "
        f"validation split, for the embedded KJV Hebrews-Revelation). Cached activations: {c.get('train', 0):,} "
        f"training and {c.get('validation', 0):,} held-out tokens. Every run trains on {ns.train_tokens:,} tokens "
        f"({_passes(m, ns):.1f} passes over the cache) at batch {ns.batch_size}, LR {ns.lr:g} x sqrt({ns.lr_ref_n}/n); "
        f"dead = no fire in {ns.dead_tokens:,} training tokens. Held-out FVU / L0 / dead fraction on "
        f"{ns.eval_tokens:,} tokens; Delta loss / KL on {ns.downstream_tokens:,} tokens; probes, N2G "
        f"({ns.n2g_latents} latents, {ns.n2g_contexts} top contexts each) and ablation sparsity "
        f"({ns.ablation_latents} latents) on {ns.metric_tokens:,} tokens, for the L(N) runs."
    )


def cost_text(m: dict) -> str:
    """One paragraph: the study's wall and CPU time by stage, from the timings the runs wrote."""
    c = m.get("cost") or {}
    if not c.get("wall_seconds"):
        return "Cost: no timed runs yet."
    mins = lambda key: c.get(key, 0) / 60  # noqa: E731
    load = f"{c['loadavg_min']:.1f}-{c['loadavg_max']:.1f}" if c.get("loadavg_min") is not None else "n/a"
    return (
        f"Cost: {mins('elapsed_seconds'):.1f} min elapsed from the first stage's start to the last one's end; "
        f"{mins('wall_seconds'):.1f} min wall, {mins('cpu_seconds'):.1f} CPU min summed over the stages (cache "
        f"{mins('cache_wall_seconds'):.1f} / {mins('cache_cpu_seconds'):.1f}, training "
        f"{mins('train_wall_seconds'):.1f} / {mins('train_cpu_seconds'):.1f}, evaluation "
        f"{mins('eval_wall_seconds'):.1f} / {mins('eval_cpu_seconds'):.1f} min wall / CPU; runs may overlap in "
        f"separate processes), on {m.get('cpu_count', '?')} CPU cores shared with other jobs (1-minute load "
        f"average {load}; niceness {m.get('niceness')}, {m.get('torch_threads')} torch thread(s)). Command: "
        f"`{m.get('study_command', m.get('command', ''))}`."
    )


def scale_text(runs: list[dict], ns) -> str:
    """What the token counts can and cannot show, from the study's own sizes and sample sizes."""
    ns_ = sorted({r["n"] for r in runs if "LN" in r["groups"]})
    if not ns_:
        return ""
    per = lambda n: ns.k * ns.train_tokens / n  # noqa: E731 - mean firings of one latent over its training
    return (
        f"**Scale.** A run sees {ns.train_tokens:,} training tokens, so one latent fires on k x tokens / n = "
        f"{per(ns_[0]):,.0f} tokens over its whole training at n = {ns_[0]:,} and {per(ns_[-1]):,.0f} at "
        f"n = {ns_[-1]:,}; the paper's SAEs see billions of tokens. The large SAEs are therefore the least trained, "
        "so these runs can show the direction of each trend at a fixed token budget, not the paper's converged "
        f"exponents. The per-SAE metrics are small samples: Delta loss / KL on {ns.downstream_tokens:,} tokens; N2G on "
        f"{ns.n2g_latents} latents and {ns.metric_tokens:,} tokens (half to build, half to score); ablation sparsity "
        f"on {ns.ablation_latents} latents. N2G trends are tested against their standard errors; the others are not."
    )


def tables(report: dict, ns) -> str:
    """Markdown: fits, the per-run table, metrics against size, progressive code, what is missing."""
    m, runs = report["meta"], report["runs"]
    out = [
        "# Scaling study tables (generated by `benchmarks/scaling_study.py`; do not edit by hand)",
        "",
        setup_text(m, ns),
        "",
        cost_text(m),
        "",
        f"'flat' = held-out FVU fell by less than {100 * ns.flat_tol:g} % (relative) over the last quarter of the "
        "run (evaluated every 1/4 of the run).",
        "",
        "## Fits",
        "",
    ]
    fits = report["fits"]
    if "L(N)" in fits:
        out.append(_fit_line(f"L(N), k={ns.k}", fits["L(N)"], ["beta", "alpha", "L_irr"]))
    if "L(k)" in fits:
        out.append(_fit_line(f"L(k), n={ns.lk_n}", fits["L(k)"], ["beta", "alpha", "L_irr"]))
    if "L(N,k)" in fits:
        out.append(_fit_line("joint L(N, k)", fits["L(N,k)"], ["b_n", "b_k", "g", "z", "h"]))
    if not fits:
        out.append("(not enough finished runs yet)")
    out += [
        "",
        "## Runs",
        "",
        "| run | groups | n | k | L0 | FVU | Delta loss | KL | dead (train) | flat | last-quarter drop "
        "| train s (CPU s) | eval s (CPU s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(runs, key=lambda r: (r["activation"], r["n"], r["k"], str(r["extra"]))):
        out.append(
            f"| {r['name']} | {','.join(r['groups'])} | {r['n']} | {r['k']} | {_f(r['l0'], '.1f')} | "
            f"{_f(r['fvu'])} | {_f(r['delta_loss'])} | {_f(r['kl'])} | {_f(100 * (r['dead_train'] or 0), '.2f')} % | "
            f"{'yes' if r['flattened'] else 'no' if r['flattened'] is False else 'n/a'} | "
            f"{_f(r['last_quarter_rel_drop'] and 100 * r['last_quarter_rel_drop'], '.2f')} % | "
            f"{_timing(r.get('train_timing'))} | {_timing(r.get('eval_timing'))} |"
        )
    ln = sorted([r for r in runs if "LN" in r["groups"]], key=lambda r: r["n"])
    if ln:
        out += [
            "",
            f"## Metrics against size (TopK, k={ns.k})",
            "",
            "| n | " + " | ".join(lab for _, lab, _ in SIZE_METRICS) + " | N2G n-gram baseline P / R |",
            "|---" * (len(SIZE_METRICS) + 2) + "|",
        ]
        for r in ln:
            out.append(
                f"| {r['n']} | "
                + " | ".join(_f(r.get(k)) + (f" +- {r[k + '_se']:.3f}" if r.get(k + "_se") is not None else "")
                             for k, _, _ in SIZE_METRICS)
                + f" | {_f(r.get('n2g_ngram_precision'), '.3f')} / {_f(r.get('n2g_ngram_recall'), '.3f')} |"
            )
        out += [
            "",
            "Trend from the smallest to the largest n (Spearman rank correlation with n; "
            "'improves' = moves in the better direction):",
            "",
        ]
        for key, label, lower_better in SIZE_METRICS:
            pts = [(r["n"], r.get(key)) for r in ln if r.get(key) is not None]
            if len(pts) >= 3:
                rho = spearman([a for a, _ in pts], [b for _, b in pts])
                out.append(f"- {label}: rho = {rho:+.2f} -> {_trend(rho, lower_better)} with n")
    mt = [r for r in runs if "fvu_at_k" in r]
    if mt:
        ks = sorted({int(k) for r in mt for k in r["fvu_at_k"]})
        out += [
            "",
            "## Progressive code (held-out FVU at test-time k')",
            "",
            "| SAE | " + " | ".join(f"k'={k}" for k in ks) + " |",
            "|---" * (len(ks) + 1) + "|",
        ]
        for r in mt:
            lab = "Multi-TopK" if r["extra"].get("multi_topk") else "TopK"
            out.append(
                f"| {lab} n={r['n']} k={r['k']} | " + " | ".join(_f(r["fvu_at_k"].get(str(k))) for k in ks) + " |"
            )
    if report["missing"]:
        out += [
            "",
            f"## Not finished ({len(report['missing'])} runs)",
            "",
            ", ".join(report["missing"]),
            "",
            "Finish with the same command (finished runs are skipped): `nice -n 19 .venv/bin/python "
            "benchmarks/scaling_study.py`",
        ]
    return "\n".join(out) + "\n"


def spearman(x, y) -> float:
    """Spearman rank correlation (ties get their average rank); NaN when either side is constant."""
    from scipy.stats import rankdata

    rx, ry = rankdata(x), rankdata(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    d = math.sqrt(float((rx**2).sum() * (ry**2).sum()))
    return float((rx * ry).sum() / d) if d else float("nan")


def _trend(rho: float, lower_better: bool) -> str:
    if math.isnan(rho):
        return "no trend (constant)"
    better = (rho < 0) if lower_better else (rho > 0)
    return ("improves" if abs(rho) >= 0.7 else "weakly improves") if better else "does not improve"


# ---------------------------------------------------------------------------------------------- REPRODUCTION.md
def _interp_loglog(points, x0):
    """y at x0 by linear interpolation in (log x, log y) between the bracketing points, or None."""
    pts = sorted(p for p in points if p[0] > 0 and p[1] > 0)
    for (xa, ya), (xb, yb) in zip(pts, pts[1:]):
        if xa <= x0 <= xb and xb > xa:
            w = (math.log(x0) - math.log(xa)) / (math.log(xb) - math.log(xa))
            return math.exp((1 - w) * math.log(ya) + w * math.log(yb))
    return None


def _ci_excludes_zero(fit, key):
    lo, hi = fit["ci95"][key]
    return hi < 0 or lo > 0


def reproduction_md(report: dict, ns, results_link: str = "scaling") -> str:
    """benchmarks/REPRODUCTION.md: each claim of Gao et al. (2024), our number, and a verdict computed
    from the study's results (nothing typed by hand: rerunning the study rewrites this file)."""
    m, runs, fits = report["meta"], report["runs"], report["fits"]
    rows = []
    tables_link = f"{results_link}/tables.md"

    def claim(ref, statement, ours, verdict, plot=None):
        rows.append((ref, statement, ours + (f" ![]({plot})" if plot else ""), verdict))

    # --- scaling laws
    ln_rows = [r for r in runs if "LN" in r["groups"]]
    unflat = sum(not r.get("flattened") for r in ln_rows)
    best = min(ln_rows, key=lambda r: r["fvu"], default=None)
    if "L(N)" in fits:
        f = fits["L(N)"]
        ok = f["params"]["beta"] < 0 and _ci_excludes_zero(f, "beta")
        exact = f["n_points"] <= 3  # 3 parameters: an exact fit, no residual and no interval
        claim(
            "§3.1 (number of latents), the L(N) law at fixed k",
            "At fixed k the normalised MSE falls as a power law in n plus an irreducible loss.",
            f"beta = {f['params']['beta']:.3f} {_ci(f, 'beta', label='95 % CI ')}, "
            f"L_irr = {f['params']['L_irr']:.3g}, RMS log residual {f['rms_log_residual']:.3f}"
            f" over {f['n_points']} sizes",
            (
                "not testable yet: 3 sizes for 3 parameters is an exact fit (finish the study for more sizes)"
                if exact
                else "agree (direction and power-law form)"
                if ok
                else f"disagree at this token budget: the FVU is lowest at n = {best['n']:,} and rises beyond it "
                "(the larger SAEs are the least trained, see 'Scale')"
                if _ci_excludes_zero(f, "beta")
                else "not confirmed (exponent's CI includes 0)"
            )
            + (f"; exponents not comparable to the paper's: {unflat} of {len(ln_rows)} L(N) runs were still improving "
               "(see 'Flattened?')" if unflat else ""),
            f"{results_link}/L_of_N.png",
        )
    else:
        claim("§3.1, L(N)", "MSE falls as a power law in n.", "not enough sizes finished", "not yet run")
    if "L(k)" in fits:
        f = fits["L(k)"]
        ok = f["params"]["beta"] < 0 and _ci_excludes_zero(f, "beta")
        claim(
            "§3.1, L(k) at fixed n",
            "At fixed n the MSE falls with k as a power law.",
            f"n = {ns.lk_n}: beta = {f['params']['beta']:.3f} {_ci(f, 'beta')}, "
            f"RMS log residual {f['rms_log_residual']:.3f}",
            "agree" if ok else "not confirmed",
            f"{results_link}/L_of_k.png",
        )
    if "L(N,k)" in fits:
        f = fits["L(N,k)"]
        p = f["params"]
        claim(
            "§3.1, the joint law L(N, k) with an irreducible term exp(z + h log k)",
            "One law of n and k fits every run: exp(a + b_k log k + b_n log n + g log k log n) + exp(z + h log k).",
            f"b_n = {p['b_n']:.3f} {_ci(f, 'b_n')}, b_k = {p['b_k']:.3f} {_ci(f, 'b_k')}, g = {p['g']:.3f} "
            f"{_ci(f, 'g')}, h = {p['h']:.3f}; RMS log residual {f['rms_log_residual']:.3f} over {f['n_points']} runs",
            "not identified at this scale: the power-law term's parameters have zero-width intervals (the fit "
            "leaves most of the loss to the irreducible term, see the plot)"
            if not all(_identified(f, key) for key in ("b_n", "b_k", "g"))
            else "agree (the form fits)" if f["rms_log_residual"] < 0.05 else "partly (residuals > 5 %)",
            f"{results_link}/L_of_N_k.png",
        )
    # --- frontier
    front = [r for r in runs if "frontier" in r["groups"]]
    if front:
        parts, wins, total = [], 0, 0
        for n in sorted({r["n"] for r in front}):
            topk = [r for r in front if r["activation"] == "topk" and r["n"] == n]
            for other in ("relu", "jumprelu", "batchtopk", "topafa"):
                pts = [(r["l0"], r["fvu"]) for r in front if r["activation"] == other and r["n"] == n]
                for t in topk:
                    v = _interp_loglog(pts, t["l0"])
                    if v is not None and other == "relu":
                        total += 1
                        wins += t["fvu"] < v
                        parts.append(f"n={n}, L0={t['l0']:.0f}: TopK {t['fvu']:.3f} vs ReLU+L1 {v:.3f}")
        claim(
            "§5.2 (comparison with other activation functions), the sparsity-reconstruction frontier",
            "TopK has a better MSE-L0 frontier than ReLU + L1 (and is competitive with the other variants).",
            ("; ".join(parts) + " (ReLU interpolated in log-log at TopK's L0)")
            if parts
            else "the ReLU sweep does not bracket any TopK L0 (see the plot)",
            (
                f"agree ({wins}/{total} matched points)"
                if total and wins == total
                else f"partly ({wins}/{total})"
                if total
                else "not testable with this sweep (widen --l1)"
            ),
            f"{results_link}/frontier.png",
        )
    # --- metrics vs size
    ln = sorted([r for r in runs if "LN" in r["groups"]], key=lambda r: r["n"])
    if len(ln) >= 3:
        refs = {
            "delta_loss": "§4.1 downstream loss",
            "kl": "§4.1 downstream loss",
            "probe_loss": "§4.2 probe loss",
            "n2g_precision": "§4.3 explainability (N2G)",
            "n2g_recall": "§4.3 explainability (N2G)",
            "ablation_sparsity": "§4.4 sparsity of ablation effects",
        }
        for key, label, lower_better in SIZE_METRICS:
            pts = [(r["n"], r.get(key)) for r in ln if r.get(key) is not None]
            if key not in refs or len(pts) < 3:
                continue
            rho = spearman([a for a, _ in pts], [b for _, b in pts])
            trend = _trend(rho, lower_better)
            verdict = {"improves": "agree", "weakly improves": "weak agreement"}.get(
                trend, f"disagree at this scale ({trend})")
            ours = f"{label}: " + ", ".join(f"{a}: {b:.3g}" for a, b in pts) + f" (Spearman rho with n {rho:+.2f})"
            lo, hi = ln[0], ln[-1]
            if lo.get(f"{key}_se") is not None and hi.get(f"{key}_se") is not None:
                diff, se = hi[key] - lo[key], math.hypot(lo[f"{key}_se"], hi[f"{key}_se"])
                ours += f"; n={lo['n']} to n={hi['n']}: {diff:+.3f} +- {se:.3f} (standard error over the latents)"
                if abs(diff) < 2 * se:
                    verdict = "not resolved at this scale (the change is within 2 standard errors)"
            claim(refs[key], f"{label} improves with n (the paper: 'these metrics all generally improve with "
                  "autoencoder size').", ours, verdict,
                  f"{results_link}/metrics_vs_size.png" if key == "delta_loss" else None)
    # --- progressive code
    mt = {bool(r["extra"].get("multi_topk")): r for r in runs if "fvu_at_k" in r}
    if len(mt) == 2:
        multi, plain = mt[True], mt[False]
        k = plain["k"]
        f4m, f4p = multi["fvu_at_k"].get(str(4 * k)), plain["fvu_at_k"].get(str(4 * k))
        fkp = plain["fvu_at_k"].get(str(k))
        claim(
            "§5.3 (progressive recovery), Multi-TopK",
            "A TopK SAE gets worse when run with k' > k; training with the extra 4k term makes the code progressive "
            "(the MSE keeps falling as k' grows).",
            f"FVU at k'={4 * k}: Multi-TopK {_f(f4m)} vs TopK {_f(f4p)} (TopK at its own k: {_f(fkp)})",
            "agree" if f4m is not None and f4p is not None and f4m < f4p else "disagree at this scale",
            f"{results_link}/progressive_code.png",
        )
    # --- dead latents
    if ln:
        worst = max(r["dead_train"] or 0 for r in ln)
        claim(
            "§2.4 (preventing dead latents)",
            "Tied init + AuxK leave few dead latents, even for large n.",
            f"largest dead fraction over the L(N) runs: {100 * worst:.2f} % "
            f"(no fire in the last {ns.dead_tokens:,} training tokens)",
            "agree" if worst < 0.05 else "disagree",
        )
    flat = [r for r in runs if r.get("flattened")]
    header = [
        f'# Reproducing Gao et al. (2024), "Scaling and evaluating sparse autoencoders", on {m["model"]}',
        "",
        "Generated by `benchmarks/scaling_study.py` (the report stage); rerunning the study rewrites every number "
        "and plot here. Section numbers refer to the paper (arXiv 2406.04093).",
        "",
        setup_text(m, ns) + f" {len(runs)} runs evaluated, {len(report['missing'])} not finished.",
        "",
        cost_text(m),
        "",
        f"Corpus: only {m['corpus']}. SPEC §2 lists more offline English text (Debian's python3.11-doc, "
        f"fortunes), but on {m.get('cpu_count', '?')} shared CPU cores this study is bound by compute, not by tokens: "
        f"the cached tokens are passed over {_passes(m, ns):.1f} times per run and every number is measured on the "
        "held-out split.",
        "",
        scale_text(runs, ns),
        "",
        f"**Flattened?** Criterion: the held-out FVU fell by less than {100 * ns.flat_tol:g} % over the last quarter "
        f"of the run. {len(flat)} of {len(runs)} runs meet it"
        + (
            "; the others were still improving, so their losses bound the converged loss from above and the fitted "
            "exponents describe this token budget, not convergence as in the paper."
            if len(flat) < len(runs)
            else "."
        ),
        "",
        f"Per-run numbers: [{tables_link}]({tables_link}).",
        "",
        "| paper (section) | claim | ours | verdict |",
        "|---|---|---|---|",
    ]
    body = [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    tail = [
        "",
        "## Not testable at this scale",
        "",
        "- GPT-4 / 16M-latent results, compute-optimal L(C) and the subject-model-size trend (§3.2): one 135M "
        "model, runs of minutes on shared CPUs.",
        f"- Converged losses: every run here sees {ns.train_tokens:,} tokens and {len(flat)} of {len(runs)} "
        "flattened (see 'Flattened?'); the paper trains each SAE to convergence on far more tokens.",
    ]
    if report["missing"]:
        tail += [
            "",
            f"## Not finished: {len(report['missing'])} runs",
            "",
            ", ".join(report["missing"]),
            "",
            "Finish with the same command (finished runs are skipped, a killed run resumes):",
            "`nice -n 19 nohup .venv/bin/python benchmarks/scaling_study.py > runs/scaling_study.log 2>&1 &`",
        ]
    return "\n".join(header + body + tail) + "\n"

"""Visual report of an evaluation: PNG plots + one self-contained ``report.html`` beside them.

``write_report(results, out_dir, zf_points=None)`` takes the JSON-ready ``results`` dict produced by
:func:`hf_sae.evaluation.run.run_eval` (sections ``reconstruction``, ``downstream``, ``probes``,
``n2g``, ``ablation``, ``afa``; each optional) and writes one PNG per plot and the HTML page that
shows the tables and plots. The page is self-contained: every plot is inlined as a ``data:`` URI, so
``report.html`` alone can be mailed or uploaded; the PNGs stay beside it for other uses. Every metric
row says what the number means and whether higher or lower is better (:data:`METRIC_INFO`).
Returns the list of written paths.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Optional

__all__ = ["write_report", "METRIC_INFO"]

_LOWER, _HIGHER = "lower is better", "higher is better"
METRIC_INFO: dict[str, tuple[str, str]] = {
    "fvu": ("fraction of variance unexplained, Σ‖x̂ − x‖² / Σ‖x − x̄‖²", _LOWER),
    "mse": ("mean squared reconstruction error per element (activation units²)", _LOWER),
    "explained_variance": ("1 − Var(x − x̂) / Var(x)", _HIGHER),
    "cosine_similarity": ("mean cosine between x and its reconstruction x̂", _HIGHER),
    "l0": ("mean number of active latents per token", "lower is sparser (at equal FVU)"),
    "l0_std": ("standard deviation of active latents per token", ""),
    "dead_fraction": ("share of latents that never fired on the evaluated tokens", _LOWER),
    "n_dead": ("latents that never fired on the evaluated tokens", _LOWER),
    "n_tokens": ("tokens evaluated", ""),
    "ce_clean": ("LM next-token cross-entropy without the SAE (nats/token)", ""),
    "ce_spliced": ("LM cross-entropy with the SAE reconstruction spliced in (nats/token)", _LOWER),
    "delta_loss": ("increase of the LM loss when the reconstruction replaces the activation (nats/token)", _LOWER),
    "kl": ("KL(clean ‖ spliced) of the next-token distributions (nats/token)", _LOWER),
    "ce_zero_ablation": ("LM loss with the activation set to zero", ""),
    "ce_mean_ablation": ("LM loss with the activation set to its mean", ""),
    "frac_recovered_zero": ("share of the zero-ablation loss increase that the SAE recovers", _HIGHER),
    "frac_recovered_mean": ("share of the mean-ablation loss increase that the SAE recovers", _HIGHER),
    "mean_probe_loss_sae": ("test BCE of the best single-latent probe, mean over tasks (nats)", _LOWER),
    "mean_probe_loss_raw_basis": ("same, best single raw activation dimension (baseline)", _LOWER),
    "mean_probe_loss_random_directions": ("same, best random direction (baseline)", _LOWER),
    "mean_prior_loss": ("BCE of predicting each task's base rate (no feature)", ""),
    "n2g_precision": ("N2G explanation precision on held-out windows", _HIGHER),
    "n2g_recall": ("N2G explanation recall on held-out windows", _HIGHER),
    "n2g_f1": ("N2G explanation F1 on held-out windows", _HIGHER),
    "precision": ("explanation precision on held-out windows", _HIGHER),
    "recall": ("explanation recall on held-out windows", _HIGHER),
    "f1": ("explanation F1 on held-out windows", _HIGHER),
    "ablation_sparsity": ("(Σ|Δ|)² / ΣΔ² / V of the downstream effects of ablating one latent", _LOWER),
    "afa_gap_mean": (
        "mean of (‖x − b‖² − ‖z̃‖²) / ‖x − b‖² (0 = code norm matches the input's)",
        "closer to 0 is better",
    ),
    "afa_gap_abs_mean": ("mean |AFA relative gap|", _LOWER),
    "eps_max": ("largest |cosine| between two decoder directions", _LOWER),
    "eps_mean": ("mean |cosine| between decoder directions", _LOWER),
}
"""metric name -> (what it measures, which direction is better); shown beside every number."""


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _fmt(v) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        return f"{v:.4g}"
    return html.escape(str(v))


def _table(rows, header=None) -> str:
    out = ["<table>"]
    if header:
        out.append("<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>")
    for r in rows:
        out.append("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in r) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _save(fig, path: Path, written: list) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    written.append(path)
    return path


def inline_png(path: Path) -> str:
    """A ``data:image/png;base64,...`` URI holding the PNG at ``path`` (an ``<img src>`` that needs no file)."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _metric_table(items) -> str:
    """Rows ``metric | value | meaning | better`` (meaning and direction from METRIC_INFO when known)."""
    rows = [(k, v, *METRIC_INFO.get(k, ("", ""))) for k, v in items]
    return _table(rows, ["metric", "value", "meaning", "better"])


def _plot_reconstruction(rec: dict, out: Path, written: list) -> list:
    plt = _plt()
    imgs = []
    hist = rec.get("histograms", {})
    if "l0" in hist:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        ax.bar(hist["l0"]["values"], hist["l0"]["counts"], width=1.0, color="#4477aa")
        ax.set_xlabel("L0 (active latents per token)")
        ax.set_ylabel("tokens")
        ax.set_title(f"L0 histogram (mean {rec['l0']:.2f})")
        imgs.append(("L0 per token", _save(fig, out / "l0_histogram.png", written)))
    if "density_log10" in hist:
        h = hist["density_log10"]
        e = h["edges"]
        fig, ax = plt.subplots(figsize=(6, 3.2))
        ax.bar(e[:-1], h["counts"], width=[b - a for a, b in zip(e[:-1], e[1:])], align="edge", color="#228833")
        ax.set_xlabel("log10(firing density)")
        ax.set_ylabel("latents")
        ax.set_title(f"Latent firing density ({h['n_dead']} dead latents not shown)")
        imgs.append(("Firing density", _save(fig, out / "firing_density.png", written)))
    return imgs


def _plot_downstream(ds: dict, out: Path, written: list) -> list:
    plt = _plt()
    names, vals = [], []
    for key, label in (
        ("ce_clean", "clean"),
        ("ce_spliced", "SAE spliced"),
        ("ce_mean_ablation", "mean ablation"),
        ("ce_zero_ablation", "zero ablation"),
    ):
        if key in ds:
            names.append(label)
            vals.append(ds[key])
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar(names, vals, color=["#4477aa", "#ee6677", "#ccbb44", "#aa3377"][: len(vals)])
    ax.set_ylabel("next-token CE (nats)")
    ax.set_title(f"Downstream loss (Δ = {ds['delta_loss']:.4f}, KL = {ds['kl']:.4f})")
    return [("Downstream loss", _save(fig, out / "downstream.png", written))]


def _plot_probes(pr: dict, out: Path, written: list) -> list:
    plt = _plt()
    per_task = pr.get("per_task", {})
    if not per_task:
        return []
    tasks = list(per_task)
    methods = sorted({m for t in per_task.values() for m in t}, key=lambda m: (m != "sae", m))
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(tasks)), 3.6))
    width = 0.8 / (len(methods) + 1)
    for i, m in enumerate(methods):
        ax.bar(
            [j + i * width for j in range(len(tasks))],
            [per_task[t].get(m, float("nan")) for t in tasks],
            width=width,
            label=m,
        )
    priors = pr.get("prior_per_task", {})
    if priors:
        ax.bar(
            [j + len(methods) * width for j in range(len(tasks))],
            [priors.get(t, float("nan")) for t in tasks],
            width=width,
            label="prior (no feature)",
            color="#bbbbbb",
        )
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))])
    ax.set_xticklabels(tasks, rotation=30, ha="right")
    ax.set_ylabel("test BCE of best 1-D probe (nats)")
    ax.set_title("Probe feature recovery (lower is better)")
    ax.legend(fontsize=8)
    return [("Probe losses", _save(fig, out / "probes.png", written))]


def _plot_n2g(n2g: dict, out: Path, written: list) -> list:
    plt = _plt()
    lat = [x for x in n2g.get("latents", []) if x.get("n_fires_test", 0) > 0]
    if not lat:
        return []
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.scatter([x["recall"] for x in lat], [x["precision"] for x in lat], s=14, alpha=0.7)
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("recall (held-out)")
    ax.set_ylabel("precision (held-out)")
    ax.set_title(f"N2G explanations (mean F1 {n2g['summary']['f1']:.3f})")
    return [("N2G precision / recall", _save(fig, out / "n2g.png", written))]


def _plot_ablation(ab: dict, out: Path, written: list) -> list:
    plt = _plt()
    vals = [x["sparsity"] for x in ab.get("latents", []) if x["sparsity"] == x["sparsity"]]
    if not vals:
        return []
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.hist(vals, bins=30, color="#aa3377")
    ax.set_xlabel("(Σ|Δ|)² / ΣΔ² / V  per latent")
    ax.set_ylabel("latents")
    ax.set_title(f"Ablation sparsity (mean {ab['summary']['ablation_sparsity']:.4g})")
    return [("Ablation sparsity", _save(fig, out / "ablation_sparsity.png", written))]


def zf_plot(ax, x_norm, f_norm, n_latents=None, label=None, color=None, bands=True) -> None:
    """Draw the ZF plot of Lee et al. on ``ax`` as the authors' notebook draws it: ||x|| (the SAE's input,
    not centred) against ||f~|| (with ||b_dec|| as one more atom), the diagonal, and the error-bound bands
    ||x|| / sqrt(1 +- e) for e = ε_LBO (h - 1) in (0.25, 0.5, 1) (e = 1: no upper bound)."""
    from .afa import LBO_BANDS

    xs, fs = [float(v) for v in x_norm], [float(v) for v in f_norm]
    ax.scatter(xs, fs, s=3, alpha=0.3, label=label, color=color)
    hi = max(max(xs), max(fs)) * 1.05
    ax.plot([0, hi], [0, hi], "r--", lw=1, alpha=0.6)
    if bands:
        for i, e in enumerate(LBO_BANDS):
            lo = (1 / (1 + e)) ** 0.5
            up = (1 / (1 - e)) ** 0.5 if e < 1 else 999.0
            ax.fill_between(
                [0, hi], [0, lo * hi], [0, up * hi], color="lightblue", alpha=(1, 0.66, 0.33)[i] / 4, zorder=-1, lw=0
            )
            eps = f", ε={e / (n_latents - 1):.1e}" if n_latents else ""
            ax.plot([0, hi], [0, lo * hi], "k--", lw=0.5, alpha=(1, 0.66, 0.33)[i])
            ax.text(hi, lo * hi, f" ε(h-1)={e:g}{eps}", fontsize=7, va="center")
    ax.set_xlim(0, hi)
    ax.set_ylim(0, hi)
    ax.set_aspect("equal")
    ax.set_xlabel("||x||  (SAE input, normalized units)")
    ax.set_ylabel("||f~||  (latents × ||W_dec,i||, with ||b_dec||)")


def _plot_afa(afa: dict, out: Path, written: list, zf_points) -> list:
    plt = _plt()
    imgs = []
    if zf_points is None and (out / "afa_zf_plot.png").is_file():  # a re-rendered report keeps the plot
        imgs.append(("ZF plot", "afa_zf_plot.png"))
    elif zf_points is not None and len(zf_points[0]):
        fig, ax = plt.subplots(figsize=(5.6, 4.8))
        zf_plot(ax, zf_points[0], zf_points[1], afa.get("n_latents"))
        title = "ZF plot"
        if "eps_lbo_mean" in afa:
            title += f" (mean ε_LBO {afa['eps_lbo_mean']:.2e})"
        ax.set_title(title)
        imgs.append(("ZF plot", _save(fig, out / "afa_zf_plot.png", written)))
    h = afa.get("gap_histogram")
    if h:
        e = h["edges"]
        fig, ax = plt.subplots(figsize=(6, 3.2))
        ax.bar(e[:-1], h["counts"], width=[b - a for a, b in zip(e[:-1], e[1:])], align="edge", color="#66ccee")
        ax.set_xlabel("(||x - b||² - ||z~||²) / ||x - b||²")
        ax.set_ylabel("tokens")
        ax.set_title("AFA relative gap")
        imgs.append(("AFA relative gap", _save(fig, out / "afa_gap.png", written)))
    return imgs


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;
font-size:0.9em}th{background:#f3f3f3}img{max-width:100%;margin:0.5em 0}h2{border-bottom:1px solid #ddd}
.small{color:#666;font-size:0.85em}"""


def _scalars(d: dict) -> list:
    return [(k, v) for k, v in d.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)]


def _probe_tables(pr: dict) -> str:
    """Per-task probe losses (SAE, baselines, prior) and the skipped tasks, as HTML tables."""
    rows = [
        (
            t,
            *(m.get(k, float("nan")) for k in ("sae", "raw_basis", "random_directions")),
            pr.get("prior_per_task", {}).get(t, float("nan")),
        )
        for t, m in pr.get("per_task", {}).items()
    ]
    extra = _table(rows, ["task", "SAE", "raw basis", "random directions", "prior"])
    if pr.get("skipped"):
        extra += _table(list(pr["skipped"].items()), ["skipped task", "reason"])
    return extra


def _n2g_table(n2g: dict) -> str:
    """The first 100 explained latents with their scores and first patterns, as an HTML table."""
    rows = []
    for x in n2g.get("latents", [])[:100]:
        pats = ", ".join(repr(p.get("text", p.get("code"))) for p in x["patterns"][:6])
        rows.append((x["latent"], x["precision"], x["recall"], x["f1"], x["n_fires_test"], pats))
    return _table(rows, ["latent", "precision", "recall", "F1", "test fires", "patterns"])


def _ablation_table(ab: dict) -> str:
    """The first 100 ablated latents with their sparsity and effect, as an HTML table."""
    rows = [
        (x["latent"], x["row"], x["position"], x["value"], x["sparsity"], x["effect_l2"])
        for x in ab.get("latents", [])[:100]
    ]
    return _table(rows, ["latent", "window", "position", "activation", "sparsity", "||Δ|| at p"])


def write_report(results: dict, out_dir, zf_points: Optional[tuple] = None) -> list:
    """Write PNG plots and ``report.html`` for ``results`` into ``out_dir``; return written paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list = []
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>hf_sae evaluation</title>"
        f"<style>{_CSS}</style></head><body>",
        "<h1>SAE evaluation report</h1>",
    ]
    meta = results.get("meta", {})
    if meta:
        parts.append(_table(_scalars(meta), ["", ""]))
    summary = results.get("summary", {})
    if summary:
        parts.append("<h2>Summary</h2>" + _metric_table(summary.items()))

    def section(title, key, plotter, extra=""):
        data = results.get(key)
        if not data:
            return
        parts.append(f"<h2>{html.escape(title)}</h2>")
        scal = _scalars(data.get("summary", data))
        if scal:
            parts.append(_metric_table(scal))
        for caption, path in plotter(data):
            parts.append(
                f"<figure><img src='{inline_png(path)}' alt='{html.escape(caption)}'><figcaption "
                f"class='small'>{html.escape(caption)} ({html.escape(path.name)})</figcaption></figure>"
            )
        if extra:
            parts.append(extra)

    section("Reconstruction", "reconstruction", lambda d: _plot_reconstruction(d, out, written))
    section("Downstream loss", "downstream", lambda d: _plot_downstream(d, out, written))
    if results.get("probes"):
        section("Probe feature recovery", "probes", lambda d: _plot_probes(d, out, written),
                _probe_tables(results["probes"]))
    if results.get("n2g"):
        section("N2G explainability", "n2g", lambda d: _plot_n2g(d, out, written), _n2g_table(results["n2g"]))
    if results.get("ablation"):
        section("Ablation sparsity", "ablation", lambda d: _plot_ablation(d, out, written),
                _ablation_table(results["ablation"]))
    section("AFA diagnostic", "afa", lambda d: _plot_afa(d, out, written, zf_points))
    if results.get("autointerp"):  # added by `hf-sae autointerp --eval-dir`
        from hf_sae.autointerp.report import autointerp_section

        parts.append("<h2>Automatic interpretation</h2>" + autointerp_section(results["autointerp"], out))
    timings = results.get("timings_s")
    if timings:
        parts.append("<h2>Timings (s)</h2>" + _table(list(timings.items()), ["stage", "seconds"]))
    parts.append(
        "<h2>Raw results</h2><details><summary>JSON</summary><pre>"
        + html.escape(json.dumps(results, indent=1, default=str)[:200_000])
        + "</pre></details>"
    )
    parts.append("</body></html>")
    page = out / "report.html"
    page.write_text("\n".join(parts), encoding="utf-8")
    written.append(page)
    return written

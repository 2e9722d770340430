"""SAGE report: ``sage.json`` (every number), PNG figures and an ``index.html`` that shows them.

The JSON layout is the dict returned by :func:`hf_sae.evaluation.sage.run.run_sage_pipeline`:
``{"model": ..., "settings": {...}, "tasks": {task: {...}}}``; see that function for the fields.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

__all__ = ["write_report", "plot_attribution", "plot_patching", "plot_sufficiency", "plot_control"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fmt(x, nd: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        return f"{x:.{nd}f}"
    return html.escape(str(x))


def plot_attribution(task_result: dict, path: Path) -> Path | None:
    """Heatmap per attribute: layers (rows) x node kind@position (columns) of attribution scores.

    Head columns show, per layer and position, the head score of largest magnitude.
    """
    grid = task_result.get("attribution_grid")
    if not grid:
        return None
    plt = _plt()
    attrs = list(grid["scores"])
    cols = grid["columns"]
    fig, axes = plt.subplots(
        1, len(attrs), figsize=(1.2 + 0.45 * len(cols) * len(attrs), 0.18 * grid["n_layers"] + 2.2), squeeze=False
    )
    for ax, a in zip(axes[0], attrs):
        m = grid["scores"][a]
        vmax = max(1e-6, max(abs(v) for row in m for v in row))
        im = ax.imshow(m, aspect="auto", cmap="RdBu", vmin=-vmax, vmax=vmax, origin="lower")
        ax.set_title(f"attribute '{a}'")
        ax.set_xticks(range(len(cols)))
        ax.set_xticklabels(cols, rotation=90, fontsize=7)
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax, fraction=0.04, label="est. ΔLD (logits)")
    fig.suptitle(f"{task_result['task']}: attribution patching (clean LD {task_result['ld_clean']:.2f})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_patching(task_result: dict, path: Path) -> Path | None:
    """Bar chart: activation-patching effect (ΔLD) of the confirmed top locations, per attribute."""
    conf = task_result.get("patching")
    if not conf or not any(conf.values()):  # --n-confirm 0: nothing was patched
        return None
    plt = _plt()
    attrs = list(conf)
    keys = list(conf[attrs[0]])
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(keys) * max(1, len(attrs)) / 2), 4))
    w = 0.8 / len(attrs)
    for i, a in enumerate(attrs):
        ax.bar([k + i * w for k in range(len(keys))], [conf[a][key]["effect"] for key in keys], width=w, label=a)
        est = task_result["attribution_scores_of_confirmed"][a]
        ax.scatter(
            [k + i * w for k in range(len(keys))], [est[key] for key in keys], color="k", marker="x", s=14, zorder=3
        )
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xticks([k + 0.4 - w / 2 for k in range(len(keys))])
    ax.set_xticklabels(keys, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("ΔLD when patched from corrupted (logits)")
    ax.set_title(f"{task_result['task']}: activation patching (bars) vs attribution estimate (x)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sufficiency(task_result: dict, path: Path) -> Path | None:
    """Bars per location: sufficiency of the supervised reconstruction and of each SAE's.

    The y axis is clipped to [-1, 2] (values beyond are drawn at the edge); exact values are in
    the JSON and the HTML tables.
    """
    val: dict[tuple[str, str], float] = {}
    for key, r in task_result.get("supervised", {}).items():
        val[(key, "supervised")] = r["sufficiency"]
    for name, ev in task_result.get("saes", {}).items():
        for key, r in ev["locations"].items():
            val.setdefault((key, "supervised"), r["supervised"]["sufficiency"])
            val[(key, f"SAE {name}")] = r["sae"]["sufficiency"]
    if not val:
        return None
    plt = _plt()
    labels = list(dict.fromkeys(k for k, _ in val))
    series = list(dict.fromkeys(s for _, s in val))
    fig, ax = plt.subplots(figsize=(min(18, max(6, 0.35 * len(labels) * len(series) + 2)), 4.2))
    w = 0.8 / len(series)
    for i, s in enumerate(series):
        ys = [val.get((l, s), float("nan")) for l in labels]
        ys = [0.0 if y != y else min(2.0, max(-1.0, y)) for y in ys]
        ax.bar([k + i * w for k in range(len(labels))], ys, width=w, label=s)
    ax.axhline(1, color="k", lw=0.6, ls="--")
    ax.axhline(0, color="k", lw=0.6)
    ax.set_ylim(-1.05, 2.05)
    ax.set_xticks([k + 0.4 - w / 2 for k in range(len(labels))])
    ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=7)
    ax.set_ylabel("sufficiency (1 = all LD recovered)")
    ax.set_title(f"{task_result['task']}: sufficiency of reconstructions (vs mean ablation)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_control(task_result: dict, path: Path) -> Path | None:
    """LD after k greedy SAE latent edits, against the supervised edit and the counterfactual patch."""
    curves = []
    for name, ev in task_result.get("saes", {}).items():
        for key, r in ev["locations"].items():
            for attr, c in (r.get("control") or {}).items():
                curves.append((f"{name} {key}", attr, c))
    if not curves:
        return None
    plt = _plt()
    n = len(curves)
    ncol = min(4, n)
    nrow = math.ceil(n / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.4 * ncol, 2.8 * nrow), squeeze=False)
    for ax, (title, attr, c) in zip(axes.flat, curves):
        ks = sorted(int(k) for k in c["ld_sae_edit"])
        ax.plot(ks, [c["ld_sae_edit"][str(k)] for k in ks], "o-", label="SAE edit")
        ax.axhline(c["ld_supervised_edit"], color="C1", ls="--", label="supervised edit")
        ax.axhline(c["ld_counterfactual_patch"], color="C2", ls=":", label="counterfactual patch")
        ax.axhline(c["ld_clean"], color="k", lw=0.6, label="clean")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{title}\n{attr}", fontsize=7)
        ax.set_xlabel("latents edited")
        ax.set_ylabel("LD")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _table(headers: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _task_html(name: str, t: dict, figs: dict[str, str]) -> str:
    parts = [f"<h2>Task {html.escape(name)}</h2><p>{html.escape(t.get('description', ''))}</p>"]
    parts.append(
        _table(
            ["prompts (eval)", "clean LD mean", "clean LD std", "fraction LD > 0"],
            [[t["n_eval"], t["ld_clean"], t["ld_clean_std"], t["ld_clean_positive_fraction"]]],
        )
    )
    parts.append(
        "<h3>Corrupted counterparts</h3>"
        + _table(
            ["attribute", "LD under clean metric", "own LD (its answer)"],
            [[a, v["ld_clean_metric"], v["ld_own"]] for a, v in t["corrupted"].items()],
        )
    )
    if "attribution" in figs:
        parts.append(f'<h3>Attribution patching</h3><img src="{figs["attribution"]}">')
    top = t.get("attribution", {}).get("top", [])
    if top:
        attrs = [k for k in top[0] if k != "location"]
        parts.append(
            _table(
                ["location"] + [f"est. ΔLD {a}" for a in attrs], [[r["location"]] + [r[a] for a in attrs] for r in top]
            )
        )
    if t.get("patching"):
        parts.append("<h3>Activation patching of the top locations</h3>")
        if "patching" in figs:
            parts.append(f'<img src="{figs["patching"]}">')
        rows = []
        for a, d in t["patching"].items():
            for key, v in d.items():
                rows.append([key, a, v["ld"], v["effect"], v["fraction"], t["attribution_scores_of_confirmed"][a][key]])
        parts.append(
            _table(
                ["location", "attribute", "patched LD", "ΔLD", "fraction of full corruption", "attribution est."], rows
            )
        )
    if t.get("completeness"):
        c = t["completeness"]
        parts.append(
            f"<h3>Cross-section completeness (all {len(c['locations'])} locations patched at once; "
            f"complete when |fraction − 1| ≤ {c['tolerance']}): {'complete' if c['complete'] else 'NOT complete'}</h3>"
        )
        rows = [
            [
                a,
                v["ld_clean"],
                v["ld_corrupted"],
                v["ld_patched_all"],
                v["fraction"],
                "n/a (small effect)" if v["complete"] is None else ("yes" if v["complete"] else "no"),
            ]
            for a, v in c["attributes"].items()
        ]
        parts.append(_table(["attribute", "LD clean", "LD corrupted", "LD all patched", "fraction", "complete"], rows))
    if t.get("supervised"):
        parts.append("<h3>Supervised dictionaries at the top locations</h3>")
        rows = [
            [
                k,
                v["ld_mean_ablation"],
                v["ld"],
                v["sufficiency"],
                v["necessity"],
                v["fvu"],
                v.get("regression", {}).get("sufficiency"),
                v.get("regression", {}).get("necessity"),
            ]
            for k, v in t["supervised"].items()
        ]
        parts.append(
            _table(
                [
                    "location",
                    "LD mean-ablated",
                    "LD supervised recon",
                    "sufficiency",
                    "necessity",
                    "FVU",
                    "sufficiency (regression fit)",
                    "necessity (regression fit)",
                ],
                rows,
            )
        )
    if "sufficiency" in figs:
        parts.append(f'<img src="{figs["sufficiency"]}">')
    for sname, ev in t.get("saes", {}).items():
        parts.append(f"<h3>SAE {html.escape(sname)} at {html.escape(ev['hook_point'])}</h3>")
        rows = []
        for k, v in ev["locations"].items():
            probe = "; ".join(f"{a}: {_fmt(p['mean_balanced_accuracy'], 2)}" for a, p in v["probe"].items())
            cos = "; ".join(f"{a}: {_fmt(p['mean_best_cosine'], 2)}" for a, p in (v["cosine"] or {}).items()) or "–"
            rows.append(
                [
                    k,
                    v["mode"],
                    v["denominator"],
                    v["supervised"]["sufficiency"],
                    v["sae"]["sufficiency"],
                    v["supervised"]["necessity"],
                    v["sae"]["necessity"],
                    v["sae"]["fvu"],
                    probe,
                    cos,
                ]
            )
        parts.append(
            _table(
                [
                    "location",
                    "mode",
                    "LD clean − ablated",
                    "suff. supervised",
                    "suff. SAE",
                    "nec. supervised",
                    "nec. SAE",
                    "SAE FVU",
                    "best 1-D probe bal. acc.",
                    "best |cos| with u",
                ],
                rows,
            )
        )
        crow = []
        for k, v in ev["locations"].items():
            for a, c in (v.get("control") or {}).items():
                last = max(c["ld_sae_edit"], key=int)
                crow.append(
                    [
                        k,
                        a,
                        c["ld_clean"],
                        c["ld_counterfactual_patch"],
                        c["ld_supervised_edit"],
                        f"{c['ld_sae_edit'][last]:.3f} (k={last})",
                        c["latents_needed"],
                    ]
                )
        if crow:
            parts.append(
                _table(
                    [
                        "location",
                        "attribute",
                        "LD clean",
                        "LD counterfactual patch",
                        "LD supervised edit",
                        "LD SAE edit",
                        "latents to match supervised",
                    ],
                    crow,
                )
            )
        if ev.get("uncovered"):
            parts.append(f"<p>Not covered by this SAE: {html.escape(', '.join(ev['uncovered']))}</p>")
    if "control" in figs:
        parts.append(f'<img src="{figs["control"]}">')
    return "\n".join(parts)


def write_report(result: dict, out_dir: str | Path) -> dict[str, str]:
    """Write ``sage.json``, PNG figures and ``index.html`` under ``out_dir``; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": str(out / "sage.json")}
    (out / "sage.json").write_text(json.dumps(result, indent=2, default=_json_default))
    sections = []
    for name, t in result.get("tasks", {}).items():
        figs = {}
        for kind, fn in (
            ("attribution", plot_attribution),
            ("patching", plot_patching),
            ("sufficiency", plot_sufficiency),
            ("control", plot_control),
        ):
            p = fn(t, out / f"{name}_{kind}.png")
            if p is not None:
                figs[kind] = p.name
                paths[f"{name}_{kind}"] = str(p)
        sections.append(_task_html(name, t, figs))
    settings = html.escape(json.dumps(result.get("settings", {}), default=_json_default))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>SAGE report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1400px}} table{{border-collapse:collapse;margin:0.6em 0}}
td,th{{border:1px solid #bbb;padding:2px 6px;font-size:12px}} img{{max-width:100%}}</style></head><body>
<h1>SAGE: ground-truth SAE evaluation</h1>
<p>Model: {html.escape(str(result.get("model", "")))}. LD = logit difference (logits) at the last prompt token.
Sufficiency = (LD[patched] − LD[mean-ablated]) / (LD[clean] − LD[mean-ablated]);
necessity = (LD[clean] − LD[a − â + E â]) / (LD[clean] − LD[mean-ablated]).</p>
<p><small>settings: {settings}</small></p>
{"".join(sections)}
</body></html>"""
    (out / "index.html").write_text(page)
    paths["html"] = str(out / "index.html")
    return paths


def _json_default(o):
    try:
        import torch

        if isinstance(o, torch.Tensor):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")

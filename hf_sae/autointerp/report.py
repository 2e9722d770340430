"""The autointerp results as a plot and HTML: ``autointerp.html`` + ``autointerp.png`` in the site folder,
and the section :func:`autointerp_section` that the ``hf-sae eval`` report shows."""

from __future__ import annotations

import html
from pathlib import Path

__all__ = ["plot_autointerp", "autointerp_section", "write_autointerp_report"]

_COLUMNS = (
    ("detection_accuracy", "detection acc."),
    ("detection_auroc", "detection AUROC"),
    ("baseline_detection_accuracy", "shuffled acc."),
    ("fuzzing_accuracy", "fuzzing acc."),
)


def _f(v) -> str:
    return "n/a" if v is None else (f"{v:.3f}" if isinstance(v, float) else html.escape(str(v)))


def plot_autointerp(results: dict, out: Path) -> str:
    """Histogram of per-latent detection accuracy, real vs shuffled explanations; returns the PNG's name."""
    from hf_sae.evaluation.report import _plt

    plt = _plt()
    lat = results["latents"].values()
    real = [r["detection_accuracy"] for r in lat if r.get("detection_accuracy") is not None]
    shuf = [r["baseline_detection_accuracy"] for r in lat if r.get("baseline_detection_accuracy") is not None]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    bins = [i / 10 for i in range(11)]
    ax.hist(real, bins=bins, alpha=0.7, label=f"explanations (mean {sum(real) / max(len(real), 1):.3f})")
    if shuf:
        ax.hist(shuf, bins=bins, alpha=0.5, label=f"shuffled explanations (mean {sum(shuf) / len(shuf):.3f})")
    ax.set_xlabel("detection accuracy per latent")
    ax.set_ylabel("latents")
    ax.set_title(f"Autointerp detection ({results['backend']})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    name = "autointerp.png"
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def autointerp_section(results: dict, out: Path, latent_link: str = "") -> str:
    """HTML: the summary table, the plot and the per-latent table (``latent_link`` prefixes latent links)."""
    img = plot_autointerp(results, out)
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{_f(v)}</td></tr>" for k, v in results["summary"].items())
    parts = [
        f"<p>LM: <code>{html.escape(results['backend'])}</code></p><table>{rows}</table>",
        f"<figure><img src='{img}' alt='detection accuracy'></figure>",
        "<table><tr><th>latent</th><th>explanation</th>" + "".join(f"<th>{h}</th>" for _, h in _COLUMNS) + "</tr>",
    ]
    for j, r in sorted(results["latents"].items(), key=lambda kv: int(kv[0])):
        cell = f"<a href='{latent_link}{j}'>{j}</a>" if latent_link else j
        parts.append(
            f"<tr><td>{cell}</td><td>{html.escape(r['explanation'])}</td>"
            + "".join(f"<td>{_f(r.get(k))}</td>" for k, _ in _COLUMNS)
            + "</tr>"
        )
    parts.append("</table>")
    return "\n".join(parts)


def write_autointerp_report(results: dict, site) -> Path:
    site = Path(site)
    body = autointerp_section(results, site, latent_link="index.html#latent/")
    page = site / "autointerp.html"
    page.write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>hf_sae autointerp</title>"
        "<link rel='icon' href='data:,'><link rel='stylesheet' href='style.css'></head><body><main>"
        "<h1>Automatic interpretation</h1>" + body + "</main></body></html>",
        encoding="utf-8",
    )
    return page

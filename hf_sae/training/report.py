"""Training records: a JSONL tracker for Accelerate, and the end-of-run report (JSON + PNG curves)."""

from __future__ import annotations

import json
import os
from typing import Optional

from accelerate.tracking import GeneralTracker, on_main_process


class JSONLTracker(GeneralTracker):
    """An Accelerate tracker appending one JSON object per ``log`` call to ``<logging_dir>/metrics.jsonl``.

    Each line is ``{"step": int, **values}``; the hyperparameters go to ``hparams.json``.
    """

    name = "jsonl"
    requires_logging_directory = True

    def __init__(self, run_name: str, logging_dir: str):
        super().__init__()
        self.run_name = run_name
        self.logging_dir = logging_dir
        self.path = os.path.join(logging_dir, "metrics.jsonl")
        self._f = None

    @on_main_process
    def start(self):
        os.makedirs(self.logging_dir, exist_ok=True)
        self._f = open(self.path, "a")

    @property
    def tracker(self):
        return self._f

    @on_main_process
    def store_init_configuration(self, values: dict):
        with open(os.path.join(self.logging_dir, "hparams.json"), "w") as f:
            json.dump(values, f, indent=2, sort_keys=True, default=str)

    @on_main_process
    def log(self, values: dict, step: Optional[int] = None, **kwargs):
        if self._f is None:
            self.start()
        self._f.write(json.dumps({"step": step, **values}, default=float) + "\n")
        self._f.flush()

    @on_main_process
    def finish(self):
        if self._f is not None:
            self._f.close()
            self._f = None


def truncate_jsonl(path: str, max_step: int) -> None:
    """Keep only the records of ``path`` with ``step <= max_step`` (used when resuming, so that the log of
    the interrupted run's steps after the checkpoint is not duplicated)."""
    if not os.path.isfile(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut by the kill
            if rec.get("step") is not None and rec["step"] <= max_step:
                kept.append(line if line.endswith("\n") else line + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


_PANELS = (("loss", "training loss"), ("fvu", "FVU"), ("l0", "L0 (active latents / token)"),
           ("dormant_fraction", "dead-latent fraction"))
_EVAL_KEY = {"dormant_fraction": "dead_fraction"}
"""The held-out curve drawn beside a training one, where it has another name: latents never fired on the held-out
tokens (``dead_fraction``) beside latents with no fire in the last dead_tokens_threshold training tokens
(``dormant_fraction``)."""


def write_report(out_dir: str, hook_point: str, history: list[dict], summary: dict, plot: bool = True) -> dict:
    """Write ``training_report.json`` and ``training_curves.png`` for one hook point into ``out_dir``.

    Args:
        out_dir: the SAE's folder.
        hook_point: whose curves to draw (history keys are ``"{hook_point}/{metric}"``).
        history: records ``{"step", "tokens", "<hook>/loss", "<hook>/fvu", ..., "<hook>/eval/fvu", ...}``.
        summary: run-level facts (tokens trained, final metrics, configuration) stored as is.
        plot: also draw ``training_curves.png`` (loss, FVU, L0, dead fraction against tokens).
    Returns the report dict.
    """
    prefix = hook_point + "/"
    curves: dict[str, dict[str, list]] = {}
    for rec in history:
        for key, value in rec.items():
            if not key.startswith(prefix) or not isinstance(value, (int, float)):
                continue
            name = key[len(prefix):]
            c = curves.setdefault(name, {"tokens": [], "value": []})
            c["tokens"].append(rec["tokens"])
            c["value"].append(value)
    report = {"hook_point": hook_point, **summary, "curves": curves}
    with open(os.path.join(out_dir, "training_report.json"), "w") as f:
        json.dump(report, f, indent=2, default=float)
    if plot:
        _plot(os.path.join(out_dir, "training_curves.png"), hook_point, curves)
    return report


def _plot(path: str, hook_point: str, curves: dict) -> None:
    import matplotlib.pyplot as plt

    fig = curves_figure(hook_point, curves)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def curves_figure(hook_point: str, curves: dict):
    """The 2x2 matplotlib figure of :func:`write_report` (loss, FVU, L0, dead fraction against tokens, with
    1.2M-style tick labels; a panel without records says why)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter, MaxNLocator

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    fig.subplots_adjust(left=0.08, right=0.97, bottom=0.08, top=0.9, wspace=0.25, hspace=0.35)
    for ax, (key, title) in zip(axes.flat, _PANELS):
        labels = (("train (no fire within dead_tokens_threshold)", "held-out (never fired)")
                  if key in _EVAL_KEY else ("train", "held-out"))
        for name, style, label in ((key, "-", labels[0]), (f"eval/{_EVAL_KEY.get(key, key)}", "o-", labels[1])):
            c = curves.get(name)
            if c and c["value"]:
                ax.plot(c["tokens"], c["value"], style, label=label, markersize=3)
        ax.set_title(title)
        ax.set_xlabel("tokens")
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5))
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 1.2M, not 1200000 (labels never overlap)
        if not ax.lines:
            ax.text(0.5, 0.5, "no record yet: the run was shorter than\none log interval (--log_every_steps)",
                    ha="center", va="center", transform=ax.transAxes, color="#666")
        values = [v for n in (key, f"eval/{key}") for v in curves.get(n, {}).get("value", []) if v == v]
        if key in ("loss", "fvu") and values and min(values) > 0:
            ax.set_yscale("log")
        elif values:
            ax.ticklabel_format(axis="y", useOffset=False)
            ax.set_ylim(bottom=0, top=max(values) * 1.1 if max(values) > 0 else 1)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.suptitle(f"SAE training: {hook_point}")
    return fig

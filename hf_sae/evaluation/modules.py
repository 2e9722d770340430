"""The ``evaluate`` modules of hf_sae (``hf_sae/metrics/<name>/<name>.py``): where they are installed, and the
one adapter that lets them take ``predictions`` / ``references`` like any ``evaluate`` metric.

Loading from anywhere (not only from the repository root)::

    import evaluate
    from hf_sae.evaluation.modules import load_metric, metric_path
    fvu = load_metric("fvu")                       # = evaluate.load(metric_path("fvu"))
    fvu.compute(predictions=x_hat, references=x)   # tensors / arrays / lists [tokens, d]

Each module stores one row of *statistics* per batch (sums; raw activations never go through Arrow), so
``add_batch(predictions=..., references=...)`` / ``add(prediction=..., reference=...)`` turn one batch of
tensors into one statistics row, and ``compute(predictions=..., references=...)`` adds a last batch and
computes. The statistics themselves can still be given (``add(**fvu_batch_stats(x, x_hat))``).
"""

from __future__ import annotations

from pathlib import Path

METRICS_DIR = Path(__file__).resolve().parent.parent / "metrics"
METRIC_NAMES = ("fvu", "l0", "dead_latents", "downstream_loss", "probe_recovery", "afa")


def metric_path(name: str) -> str:
    """The installed folder of the ``evaluate`` module ``name`` (pass it to ``evaluate.load``)."""
    path = METRICS_DIR / name
    if not (path / f"{name}.py").is_file():
        raise ValueError(f"hf_sae has no evaluate module {name!r}; choose from {', '.join(METRIC_NAMES)}.")
    return str(path)


def load_metric(name: str, **kwargs):
    """``evaluate.load(metric_path(name), **kwargs)``: works from any working directory, offline."""
    import evaluate

    return evaluate.load(metric_path(name), **kwargs)


def as_tensor(x, what: str):
    """A float tensor ``[tokens, d]`` from a tensor, a numpy array or nested lists."""
    import torch

    if x is None:
        raise ValueError(f"{what} is required (a tensor, array or list of shape [tokens, d]).")
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(x)
    t = t.detach().cpu()
    if t.ndim == 1:
        t = t.unsqueeze(0)
    if t.ndim != 2:
        raise ValueError(f"{what} must be [tokens, d], got shape {tuple(t.shape)}.")
    return t.double() if not t.is_floating_point() else t


class PredictionsReferencesMixin:
    """Mix into an ``evaluate.Metric`` whose rows are per-batch statistics; define
    ``_stats_from(predictions, references) -> dict`` (one statistics row for one batch of tensors)."""

    def _stats_from(self, predictions, references) -> dict:  # pragma: no cover - defined by each module
        raise NotImplementedError

    def add_batch(self, *, predictions=None, references=None, **kwargs):
        """Add one batch: ``predictions`` / ``references`` tensors (one statistics row), or statistics columns.
        """
        if predictions is None and references is None:
            return super().add_batch(**kwargs)
        return super().add(**self._stats_from(predictions, references))

    def add(self, *, prediction=None, reference=None, **kwargs):
        """Add one batch of tensors (``prediction`` / ``reference``) or one row of statistics.
        """
        if prediction is None and reference is None:
            return super().add(**kwargs)
        return super().add(**self._stats_from(prediction, reference))

    def compute(self, *, predictions=None, references=None, **kwargs):
        """Add ``predictions`` / ``references`` (if given) as a last batch, then compute over every row.
        """
        if predictions is None and references is None:
            return super().compute(**kwargs)
        self.add_batch(predictions=predictions, references=references)
        return super().compute()

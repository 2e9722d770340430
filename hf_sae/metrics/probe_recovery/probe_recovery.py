"""Probe feature recovery: mean over tasks of the held-out loss of the best single-feature 1-D
logistic probe, per method (the SAE's latents, baselines).

Probe fitting needs the whole code of a task's tokens, so this module takes the per-task results
of ``hf_sae.evaluation.probes`` (one row per task and method, e.g. ``ProbeTaskResult.to_dict()``
from ``run_probe_tasks`` / ``best_probe_sparse``) and aggregates them with
``hf_sae.evaluation.probes.summarize_probe_results``, the core used by ``hf-sae eval``.

Example::

    metric = evaluate.load("hf_sae/metrics/probe_recovery")
    for r in run_probe_tasks(...)["results"]:
        metric.add(task=r.task, method=r.method, test_loss=r.test_loss, prior_loss=r.prior_loss)
    metric.compute()   # {"mean_probe_loss": {"sae": ..., "raw_basis": ...}, "per_task": {...}, ...}
"""
import datasets
import evaluate

from hf_sae.evaluation.probes import summarize_probe_results

_DESCRIPTION = "Mean over binary token tasks of the best single-latent 1-D logistic probe loss (nats), per method."
_CITATION = "Gao et al. 2024, Scaling and evaluating sparse autoencoders, arXiv:2406.04093."
_INPUTS = """One row per (task, method): task (str), method (str, e.g. 'sae', 'raw_basis',
'random_directions'), test_loss (float, nats/token), prior_loss (float or None: loss of the base rate).
Returns: mean_probe_loss {method: float}, n_tasks {method: int}, mean_prior_loss, per_task."""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class ProbeRecovery(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation=_CITATION, inputs_description=_INPUTS,
            features=datasets.Features({
                "task": datasets.Value("string"),
                "method": datasets.Value("string"),
                "test_loss": datasets.Value("float64"),
                "prior_loss": datasets.Value("float64"),
            }),
        )

    def _compute(self, task, method, test_loss, prior_loss):
        rows = [{"task": t, "method": m, "test_loss": l, "prior_loss": p}
                for t, m, l, p in zip(task, method, test_loss, prior_loss)]
        return summarize_probe_results(rows)

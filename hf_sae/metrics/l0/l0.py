"""L0 of an SAE's latent code (mean, std and histogram of active latents per token), from per-batch sums.

Per-batch rows come from ``hf_sae.evaluation.reconstruction.l0_batch_stats(latent_values=...,
latent_indices=...)`` (or ``latents=dense``); ``compute`` calls the same core as ``hf_sae.evaluation``.

``predictions`` may also be dense latent codes ``[tokens, n_latents]`` (``references`` is not used).

Example::

    from hf_sae.evaluation.modules import load_metric
    load_metric("l0").compute(predictions=sae.encode(x))
    metric = load_metric("l0")
    out = sae(x); metric.add(**l0_batch_stats(out.latent_values, out.latent_indices))
    metric.compute()   # {"l0": ..., "l0_std": ..., "l0_histogram": [...], "n_tokens": ...}
"""
import datasets
import evaluate

from hf_sae.evaluation.modules import PredictionsReferencesMixin, as_tensor
from hf_sae.evaluation.reconstruction import combine_sums, l0_batch_stats, l0_from_sums

_DESCRIPTION = "Mean / std / histogram of the number of non-zero latents per token (L0)."
_CITATION = "Gao et al. 2024, Scaling and evaluating sparse autoencoders, arXiv:2406.04093."
_INPUTS = """Per-batch statistics (see hf_sae.evaluation.reconstruction.l0_batch_stats):
    count (int): tokens; sum_l0 (float): sum of L0; sum_sq_l0 (float): sum of L0^2;
    l0_hist (list[int]): tokens per L0 value 0, 1, 2, ...
Returns: l0, l0_std, l0_histogram, n_tokens."""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class L0(PredictionsReferencesMixin, evaluate.Metric):
    def _stats_from(self, predictions, references=None):
        return l0_batch_stats(latents=as_tensor(predictions, "predictions (dense latents)"))

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation=_CITATION, inputs_description=_INPUTS,
            features=datasets.Features({
                "count": datasets.Value("int64"),
                "sum_l0": datasets.Value("float64"),
                "sum_sq_l0": datasets.Value("float64"),
                "l0_hist": datasets.Sequence(datasets.Value("int64")),
            }),
        )

    def _compute(self, count, sum_l0, sum_sq_l0, l0_hist):
        s = combine_sums({"count": count, "sum_l0": sum_l0, "sum_sq_l0": sum_sq_l0, "l0_hist": l0_hist})
        out = l0_from_sums(int(s["count"]), s["sum_l0"], s["sum_sq_l0"], s["l0_hist"])
        out["n_tokens"] = int(s["count"])
        return out

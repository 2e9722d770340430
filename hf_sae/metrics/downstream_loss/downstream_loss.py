"""Downstream loss of an SAE spliced into its LM: CE clean vs spliced, delta loss, KL, and the
fraction of loss recovered against zero- and mean-ablation, from per-batch sums.

Per-batch rows come from ``hf_sae.evaluation.downstream.downstream_batch_stats(
downstream_batch(model, sae, input_ids, keep, hook_point, mean_activation))``; ``compute`` calls
``hf_sae.evaluation.downstream.downstream_from_sums``, the core used everywhere else.

Example::

    metric = evaluate.load("hf_sae/metrics/downstream_loss")
    metric.add(**downstream_batch_stats(downstream_batch(model, sae, ids, keep, "layers.6.resid_post", mean)))
    metric.compute()   # {"ce_clean", "ce_spliced", "delta_loss", "kl", "frac_recovered_zero", ...}
"""
import datasets
import evaluate

from hf_sae.evaluation.downstream import downstream_from_sums
from hf_sae.evaluation.reconstruction import combine_sums

_DESCRIPTION = "Next-token cross-entropy with the SAE reconstruction spliced in, vs clean and ablated runs."
_CITATION = "Gao et al. 2024, Scaling and evaluating sparse autoencoders, arXiv:2406.04093."
_INPUTS = """Per-batch statistics (see hf_sae.evaluation.downstream.downstream_batch_stats), losses in nats:
    count (int): predictions counted; sum_ce_clean, sum_ce_spliced, sum_kl (float);
    sum_ce_zero, sum_ce_mean (float or None when that ablation was not run).
Returns: n_predictions, ce_clean, ce_spliced, delta_loss, kl, and for each ablation given
ce_{zero,mean}_ablation and frac_recovered_{zero,mean}."""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class DownstreamLoss(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation=_CITATION, inputs_description=_INPUTS,
            features=datasets.Features({
                "count": datasets.Value("int64"),
                "sum_ce_clean": datasets.Value("float64"),
                "sum_ce_spliced": datasets.Value("float64"),
                "sum_kl": datasets.Value("float64"),
                "sum_ce_zero": datasets.Value("float64"),
                "sum_ce_mean": datasets.Value("float64"),
            }),
        )

    def _compute(self, count, sum_ce_clean, sum_ce_spliced, sum_kl, sum_ce_zero, sum_ce_mean):
        s = combine_sums({"count": count, "sum_ce_clean": sum_ce_clean, "sum_ce_spliced": sum_ce_spliced,
                          "sum_kl": sum_kl, "sum_ce_zero": sum_ce_zero, "sum_ce_mean": sum_ce_mean})
        return downstream_from_sums(int(s["count"]), s["sum_ce_clean"], s["sum_ce_spliced"], s["sum_kl"],
                                    s["sum_ce_zero"], s["sum_ce_mean"])

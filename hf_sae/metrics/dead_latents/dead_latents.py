"""Dead latents and latent firing density of an SAE over the evaluated tokens, from per-batch fire counts.

Per-batch rows come from ``hf_sae.evaluation.reconstruction.dead_latents_batch_stats(n_latents,
latent_values=..., latent_indices=...)``; ``compute`` calls the same core as ``hf_sae.evaluation``.

``predictions`` may also be dense latent codes ``[tokens, n_latents]`` (``references`` is not used).

Example::

    from hf_sae.evaluation.modules import load_metric
    load_metric("dead_latents").compute(predictions=sae.encode(x))
    metric = load_metric("dead_latents")
    metric.add(**dead_latents_batch_stats(sae.config.n_latents, out.latent_values, out.latent_indices))
    metric.compute()   # {"dead_fraction", "n_dead", "n_latents", "density_log10_histogram", "n_tokens"}
"""
import datasets
import evaluate

from hf_sae.evaluation.modules import PredictionsReferencesMixin, as_tensor
from hf_sae.evaluation.reconstruction import combine_sums, dead_latents_batch_stats, dead_latents_from_sums

_DESCRIPTION = "Fraction of latents that never fire over the evaluated tokens, and the log10 firing-density histogram."
_CITATION = "Gao et al. 2024, Scaling and evaluating sparse autoencoders, arXiv:2406.04093."
_INPUTS = """Per-batch statistics (see hf_sae.evaluation.reconstruction.dead_latents_batch_stats):
    count (int): tokens in the batch; fire_counts (list[int], length n): tokens on which each latent fired.
Returns: dead_fraction, n_dead, n_latents, density_log10_histogram {edges, counts, n_dead}, n_tokens."""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class DeadLatents(PredictionsReferencesMixin, evaluate.Metric):
    def _stats_from(self, predictions, references=None):
        z = as_tensor(predictions, "predictions (dense latents)")
        return dead_latents_batch_stats(z.shape[-1], latents=z)

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation=_CITATION, inputs_description=_INPUTS,
            features=datasets.Features({
                "count": datasets.Value("int64"),
                "fire_counts": datasets.Sequence(datasets.Value("int64")),
            }),
        )

    def _compute(self, count, fire_counts):
        widths = {len(f) for f in fire_counts}
        if len(widths) != 1:
            raise ValueError(
                f"fire_counts rows have different lengths {sorted(widths)}; every row must have n_latents entries."
            )
        s = combine_sums({"count": count, "fire_counts": fire_counts})
        out = dead_latents_from_sums(int(s["count"]), s["fire_counts"])
        out["n_tokens"] = int(s["count"])
        return out

"""AFA diagnostic (quasi-orthogonality): relative gap between ||x - b_dec||^2 and ||z~||^2 per
token, z~ = latents times decoder-row norms, from per-batch sums.

Per-batch rows come from ``hf_sae.evaluation.afa.afa_batch_stats(*afa_norms(sae.normalize_input(x), sae.b_dec,
sae.decoder_norms(), out.latent_values, out.latent_indices))`` (normalized units: input_norm and input_scale applied);
``compute`` calls ``hf_sae.evaluation.afa.afa_from_sums``, the core used by ``hf-sae eval``.
Decoder cosine statistics are a property of the SAE alone: ``hf_sae.evaluation.decoder_cosine_stats``.

Example::

    metric = evaluate.load("hf_sae/metrics/afa")
    metric.add(**afa_batch_stats(*afa_norms(...)))
    metric.compute()   # {"afa_gap_mean", "afa_gap_std", "afa_gap_abs_mean", "afa_norm_mse", "n_tokens"}
"""
import datasets
import evaluate

from hf_sae.evaluation.afa import afa_from_sums
from hf_sae.evaluation.reconstruction import combine_sums

_DESCRIPTION = "AFA relative gap (||x - b||^2 - ||z~||^2) / ||x - b||^2 statistics and mean (||z~|| - ||x - b||)^2."
_CITATION = ("Lee, Davies, Canby, Hockenmaier 2025, Evaluating and Designing Sparse Autoencoders by "
             "Approximating Quasi-Orthogonality, arXiv:2503.24277.")
_INPUTS = """Per-batch statistics (see hf_sae.evaluation.afa.afa_batch_stats): count (int), sum_gap,
sum_sq_gap, sum_abs_gap, sum_sq_norm_diff (float).
Returns: afa_gap_mean, afa_gap_std, afa_gap_abs_mean, afa_norm_mse, n_tokens."""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class Afa(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation=_CITATION, inputs_description=_INPUTS,
            features=datasets.Features({
                "count": datasets.Value("int64"),
                "sum_gap": datasets.Value("float64"),
                "sum_sq_gap": datasets.Value("float64"),
                "sum_abs_gap": datasets.Value("float64"),
                "sum_sq_norm_diff": datasets.Value("float64"),
            }),
        )

    def _compute(self, count, sum_gap, sum_sq_gap, sum_abs_gap, sum_sq_norm_diff):
        s = combine_sums({"count": count, "sum_gap": sum_gap, "sum_sq_gap": sum_sq_gap,
                          "sum_abs_gap": sum_abs_gap, "sum_sq_norm_diff": sum_sq_norm_diff})
        return afa_from_sums(int(s["count"]), s["sum_gap"], s["sum_sq_gap"], s["sum_abs_gap"], s["sum_sq_norm_diff"])

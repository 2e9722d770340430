"""FVU, MSE and explained variance of an SAE's reconstructions, from per-batch sums.

``predictions`` are reconstructions x_hat and ``references`` the activations x, ``[tokens, d]``
(tensors, arrays or lists); each batch is stored as one row of statistics
(``hf_sae.evaluation.reconstruction.fvu_batch_stats(x, x_hat)``, which may also be given directly),
and ``compute`` sums the rows and calls the same core functions as ``hf_sae.evaluation`` and the trainer.

Example::

    from hf_sae.evaluation.modules import load_metric      # = evaluate.load(<installed path>/fvu)
    metric = load_metric("fvu")
    for x in batches:
        metric.add_batch(predictions=sae(x).reconstruction, references=x)
    metric.compute()   # {"fvu": ..., "mse": ..., "explained_variance": ..., "n_tokens": ...}
    load_metric("fvu").compute(predictions=x_hat, references=x)   # one call
"""
import datasets
import evaluate

from hf_sae.evaluation.modules import PredictionsReferencesMixin, as_tensor
from hf_sae.evaluation.reconstruction import (
    combine_sums,
    explained_variance_from_sums,
    fvu_batch_stats,
    fvu_from_sums,
    mse_from_sums,
)

_DESCRIPTION = ("Fraction of variance unexplained sum||x - x_hat||^2 / sum||x - mean(x)||^2, MSE per element and "
                "explained variance.")
_CITATION = "Gao et al. 2024, Scaling and evaluating sparse autoencoders, arXiv:2406.04093."
_INPUTS = """predictions (x_hat) and references (x), [tokens, d]; or per-batch statistics (one row per batch; see
hf_sae.evaluation.reconstruction.fvu_batch_stats):
    count (int): tokens in the batch.
    sum_x (list[float]): sum over tokens of x, length d.
    sum_sq_x (float): sum over tokens of ||x||^2.
    sum_err (list[float]): sum over tokens of x - x_hat, length d.
    sum_sq_err (float): sum over tokens of ||x - x_hat||^2.
Returns: fvu, mse (caller's units squared), explained_variance, n_tokens."""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class Fvu(PredictionsReferencesMixin, evaluate.Metric):
    def _stats_from(self, predictions, references):
        return fvu_batch_stats(as_tensor(references, "references (x)"), as_tensor(predictions, "predictions (x_hat)"))

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_INPUTS,
            features=datasets.Features(
                {
                    "count": datasets.Value("int64"),
                    "sum_x": datasets.Sequence(datasets.Value("float64")),
                    "sum_sq_x": datasets.Value("float64"),
                    "sum_err": datasets.Sequence(datasets.Value("float64")),
                    "sum_sq_err": datasets.Value("float64"),
                }
            ),
        )

    def _compute(self, count, sum_x, sum_sq_x, sum_err, sum_sq_err):
        s = combine_sums(
            {"count": count, "sum_x": sum_x, "sum_sq_x": sum_sq_x, "sum_err": sum_err, "sum_sq_err": sum_sq_err}
        )
        n, d = int(s["count"]), int(s["sum_x"].numel())
        return {
            "fvu": fvu_from_sums(n, s["sum_x"], s["sum_sq_x"], s["sum_sq_err"]),
            "mse": mse_from_sums(n, d, s["sum_sq_err"]),
            "explained_variance": explained_variance_from_sums(
                n, s["sum_x"], s["sum_sq_x"], s["sum_err"], s["sum_sq_err"]
            ),
            "n_tokens": n,
        }

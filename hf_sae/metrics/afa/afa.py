"""AFA diagnostic of Lee et al. 2025 (quasi-orthogonality), from per-batch sums: ε_LBO and the ZF
bands as the authors' code defines them (||x|| of the SAE's input against ||f~||, f~ = [f_i ||W_dec,i||,
||b_dec||], ε_LBO = | ||x||^2 - ||f~||^2 | / ((h - 1) ||f~||^2), h = n_latents), and hf_sae's relative gap
(||x - b_dec||^2 - ||z~||^2) / ||x - b_dec||^2 beside it.

Per-batch rows come from ``hf_sae.evaluation.afa.AFAStats`` (``update_from_sae(sae, x, sae(x))`` then
``sums_dict()``) or ``afa_batch_stats(*afa_norms(*args), zf=zf_norms(*args), n_latents=n)`` with
``args = (sae.normalize_input(x), sae.b_dec, sae.decoder_norms(), out.latent_values, out.latent_indices)``
(normalized units: input_norm and input_scale applied); ``compute`` calls
``hf_sae.evaluation.afa.afa_from_sums``, the core used by ``hf-sae eval``. The decoder's signed
ε_max / ε_mean are a property of the SAE alone: ``hf_sae.evaluation.decoder_cosine_stats``.

Example::

    metric = evaluate.load("hf_sae/metrics/afa")
    stats = AFAStats(); stats.update_from_sae(sae, x, sae(x))
    metric.add(**stats.sums_dict())
    metric.compute()   # {"eps_lbo_mean", "eps_lbo_h1_mean", "zf_frac_in_025", ..., "afa_gap_mean", ...}
"""
import datasets
import evaluate

from hf_sae.evaluation.afa import afa_from_sums
from hf_sae.evaluation.reconstruction import combine_sums

_DESCRIPTION = (
    "AFA diagnostic: mean ε_LBO = | ||x||^2 - ||f~||^2 | / ((h-1) ||f~||^2), the fractions of tokens in the "
    "ZF plot's bands, and the relative gap (||x - b||^2 - ||z~||^2) / ||x - b||^2."
)
_CITATION = (
    "Lee, Davies, Canby, Hockenmaier 2025, Evaluating and Designing Sparse Autoencoders by "
    "Approximating Quasi-Orthogonality, arXiv:2503.24277."
)
_INPUTS = """Per-batch statistics (see hf_sae.evaluation.afa.AFAStats.sums_dict): count (int), sum_gap,
sum_sq_gap, sum_abs_gap, sum_sq_norm_diff (float), zf_count (int), sum_lbo, sum_lbo_signed (float),
n_band_025, n_band_050, n_band_100 (int), n_latents (int, h; the same in every row, 0 = unknown).
Returns: eps_lbo_mean (when n_latents is known), eps_lbo_h1_mean, eps_lbo_h1_signed_mean, zf_frac_in_025,
zf_frac_in_050, zf_frac_in_100, afa_gap_mean, afa_gap_std, afa_gap_abs_mean, afa_norm_mse, n_tokens."""

_SUMMED = (
    "count",
    "sum_gap",
    "sum_sq_gap",
    "sum_abs_gap",
    "sum_sq_norm_diff",
    "zf_count",
    "sum_lbo",
    "sum_lbo_signed",
    "n_band_025",
    "n_band_050",
    "n_band_100",
)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class Afa(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_INPUTS,
            features=datasets.Features(
                {
                    "count": datasets.Value("int64"),
                    "sum_gap": datasets.Value("float64"),
                    "sum_sq_gap": datasets.Value("float64"),
                    "sum_abs_gap": datasets.Value("float64"),
                    "sum_sq_norm_diff": datasets.Value("float64"),
                    "zf_count": datasets.Value("int64"),
                    "sum_lbo": datasets.Value("float64"),
                    "sum_lbo_signed": datasets.Value("float64"),
                    "n_band_025": datasets.Value("int64"),
                    "n_band_050": datasets.Value("int64"),
                    "n_band_100": datasets.Value("int64"),
                    "n_latents": datasets.Value("int64"),
                }
            ),
        )

    def _compute(self, n_latents, **columns):
        sizes = {int(h) for h in n_latents if h}
        if len(sizes) > 1:
            raise ValueError(
                f"afa: rows come from SAEs of different sizes n_latents={sorted(sizes)}; compute one metric per SAE."
            )
        s = combine_sums({k: columns[k] for k in _SUMMED})
        s = {k: (int(v) if k in ("count", "zf_count") or k.startswith("n_band") else v) for k, v in s.items()}
        return afa_from_sums(**s, n_latents=sizes.pop() if sizes else None)

"""Evaluation of sparse autoencoders: every metric of Gao et al. 2024 and the AFA diagnostic.

All metrics are functions over tensors or running sums (float64), streaming over any number of
tokens; the ``evaluate`` modules in ``hf_sae/metrics/<name>/`` and the trainer call this same code.

=====================  ========================================================================
module                 contents
=====================  ========================================================================
``reconstruction``     MSE, FVU, explained variance, cosine, L0, firing density, dead latents;
                       :class:`ReconstructionStats` (running; used by the trainer)
``downstream``         spliced vs clean CE, Δloss, KL, loss recovered vs zero/mean ablation
``probes``             best single-latent 1-D logistic probe on auto-labelled token tasks
``n2g``                n-gram explanations of latents, held-out precision / recall / F1
``ablation``           (Σ|Δ|)² / ΣΔ² / V of logit changes when one latent is ablated
``afa``                AFA relative gap, decoder cosine statistics (ε_max, ε_mean), ZF plot data
``report``             PNG plots + HTML report
``inputs``             shared by eval and dashboard: load the SAE, token windows, kept-token masks
``pipeline``           :func:`evaluate_sae`: every metric on one SAE, typed (the stages, the summary)
``run``                the ``hf-sae eval`` command-line adapter: :func:`add_eval_args`, :func:`run_eval`
=====================  ========================================================================
"""

from .ablation import ablation_sparsity, latent_ablation_effects, summarize_ablation
from .afa import AFAStats, afa_from_sums, afa_norms, afa_relative_gap, decoder_cosine_stats
from .downstream import (
    DownstreamStats,
    downstream_batch,
    downstream_from_sums,
    kl_divergence,
    loss_recovered,
    make_splice_fn,
    next_token_ce,
)
from .n2g import N2GExplanation, explain_latent, n2g_evaluate, ngram_codes, summarize_n2g
from .pipeline import evaluate_sae
from .probes import (
    TASKS,
    fit_probes_dense,
    fit_probes_sparse,
    probe_loss_dense,
    probe_loss_sparse,
    run_probe_tasks,
    summarize_probe_results,
    task_labels,
)
from .reconstruction import (
    ReconstructionStats,
    cosine_similarity,
    dead_fraction,
    explained_variance,
    explained_variance_from_sums,
    fire_counts,
    firing_density_histogram,
    fvu,
    fvu_from_sums,
    l0,
    latent_sums,
    mse,
    mse_from_sums,
    reconstruction_sums,
)
from .run import add_eval_args, run_eval

__all__ = [
    "ReconstructionStats", "reconstruction_sums", "latent_sums", "mse", "fvu", "explained_variance",
    "cosine_similarity", "l0", "fire_counts", "dead_fraction", "firing_density_histogram", "fvu_from_sums",
    "mse_from_sums", "explained_variance_from_sums",
    "DownstreamStats", "downstream_batch", "downstream_from_sums", "next_token_ce", "kl_divergence",
    "loss_recovered", "make_splice_fn",
    "TASKS", "task_labels", "fit_probes_sparse", "fit_probes_dense", "probe_loss_sparse", "probe_loss_dense",
    "run_probe_tasks", "summarize_probe_results",
    "ngram_codes", "explain_latent", "n2g_evaluate", "summarize_n2g", "N2GExplanation",
    "ablation_sparsity", "latent_ablation_effects", "summarize_ablation",
    "AFAStats", "afa_norms", "afa_relative_gap", "afa_from_sums", "decoder_cosine_stats",
    "add_eval_args", "run_eval", "evaluate_sae",
]

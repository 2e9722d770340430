"""SAGE: ground-truth SAE evaluation on real tasks (Venhoff et al. 2024, arXiv 2410.07456).

Pipeline (see :mod:`.run`): tasks as data (:mod:`.tasks`), cross-section discovery by attribution
patching confirmed with activation patching (:mod:`.attribution`), supervised dictionaries
``u_{i,v} = E[a | attr_i = v] - E[a]`` (:mod:`.dictionaries`), and the evaluation of an SAE —
latent matching, sufficiency / necessity, sparse controllability, and residual SAEs applied to
sublayer locations by recomputation (:mod:`.evaluate_sae`). Report: :mod:`.report`.

Quick use::

    from hf_sae.evaluation.sage import make_task, attribution_patching, evaluate_sae
    task = make_task("ioi", tokenizer, n_prompts=128)
    fit, ev = task.split(64)
    scores = attribution_patching(model, fit)
    result = evaluate_sae(model, sae, fit, ev, [f"{sae.config.hook_point}@END"])
"""

from .attribution import NODE_KINDS, AttributionResult, activation_patching, attribution_patching, enumerate_locations
from .dictionaries import SupervisedDictionary, fit_dictionaries
from .evaluate_sae import (
    best_cosine_latents,
    best_probe_latents,
    classify_location,
    evaluate_sae,
    greedy_latent_edit,
    recompute_sublayers,
    residual_stream_index,
    sae_reconstruct,
    sufficiency_necessity,
)
from .patching import (
    Location,
    PrefixCache,
    extract_location,
    location_activations,
    logit_diff,
    mean_logit_diff,
    patch_functions,
    patched_logit_diff,
)
from .report import write_report
from .run import add_sage_args, run_sage, run_sage_pipeline, run_task
from .tasks import TASKS, Task, TaskPrompts, make_gender_task, make_ioi_task, make_task, single_token_names

__all__ = [
    "NODE_KINDS", "AttributionResult", "activation_patching", "attribution_patching", "enumerate_locations",
    "SupervisedDictionary", "fit_dictionaries",
    "best_cosine_latents", "best_probe_latents", "classify_location", "evaluate_sae", "greedy_latent_edit",
    "recompute_sublayers", "residual_stream_index", "sae_reconstruct", "sufficiency_necessity",
    "Location", "PrefixCache", "extract_location", "location_activations", "logit_diff", "mean_logit_diff",
    "patch_functions", "patched_logit_diff",
    "write_report", "add_sage_args", "run_sage", "run_sage_pipeline", "run_task",
    "TASKS", "Task", "TaskPrompts", "make_gender_task", "make_ioi_task", "make_task", "single_token_names",
]

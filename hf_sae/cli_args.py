"""The arguments of every ``hf-sae`` sub-command, and the names they offer as choices.

This module imports only the standard library, so building any sub-command's parser (and so ``hf-sae CMD
--help``, and the parse before any work) never imports torch or transformers: each command's module is
imported only when the command runs (:mod:`hf_sae.cli`). The functions stay importable from their
command's module too (``hf_sae.evaluation.run.add_eval_args`` is :func:`add_eval_args`).

``add_<command>_args(parser)`` adds the options to ``parser`` and returns it. The choice lists of
registries that live beside torch code (:data:`CACHE_DTYPES`, :data:`SAGE_TASKS`, :data:`CONVERT_FORMATS`)
are checked against those registries by ``tests/test_hf_ux.py``.
"""

from __future__ import annotations

import argparse

from .placement import add_placement_args

__all__ = [
    "ALL_METRICS", "OPTIONAL_METRICS", "CACHE_DTYPES", "SAGE_TASKS", "NODE_KINDS", "CONVERT_FORMATS", "DL_CLASSES",
    "DEFAULT_LICENSE", "add_train_args", "add_cache_args", "add_sae_source_args", "add_eval_args", "add_sage_args",
    "add_push_args", "add_convert_args", "add_dashboard_args", "add_autointerp_args",
]

ALL_METRICS = ("reconstruction", "afa", "probes", "n2g", "downstream", "ablation")
"""``hf-sae eval --metrics all``."""
OPTIONAL_METRICS = ("n2g_faithful",)
"""Metrics run only when named in ``--metrics`` ("all" leaves them out): the faithful N2G re-runs the LM
on every edited context of every explained latent."""
CACHE_DTYPES = ("bfloat16", "float16", "float32")
"""Storage and LM dtypes of ``hf-sae cache`` (the keys of ``hf_sae.data.cache_format._DTYPES``)."""
SAGE_TASKS = ("gender", "ioi")
"""The SAGE tasks (the keys of ``hf_sae.evaluation.sage.tasks.TASKS``)."""
NODE_KINDS = ("resid", "head", "mlp")
"""Kinds of SAGE cross-section locations: residual stream, attention head, MLP output."""
CONVERT_FORMATS = ("saelens", "sparsify", "openai", "gemmascope", "dictionary_learning")
"""Foreign SAE formats (the keys of ``hf_sae.convert.FORMATS``, in detection order)."""
DL_CLASSES = ("AutoEncoder", "AutoEncoderNew", "AutoEncoderTopK", "BatchTopKSAE", "JumpReluAutoEncoder")
"""The dictionary_learning autoencoder classes hf_sae converts."""
DEFAULT_LICENSE = "apache-2.0"
"""The card's license when none is given (hf_sae, SmolLM2 and the embedded KJV corpus allow it); the card
body and :func:`hf_sae.hub.push_to_hub` say it is a default for the uploader to confirm."""


# --------------------------------------------------------------------------------------------- train
def add_train_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``hf-sae train`` options: every :class:`~hf_sae.training.SAETrainingArguments` field, ``--config``
    and an optional positional config file (:func:`hf_sae.training.arguments.add_arguments`)."""
    from .training.arguments import add_arguments

    return add_arguments(parser)


# --------------------------------------------------------------------------------------------- cache
def add_cache_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``hf-sae cache`` options to ``parser`` (use with :func:`run_cache`)."""
    parser.add_argument(
        "--model",
        "--model_name_or_path",
        dest="model",
        default="smollm2-135m",
        help="Hub id or local folder of a causal LM; 'smollm2-135m' = embedded offline SmolLM2 (default)",
    )
    parser.add_argument(
        "--hook-points",
        "--hook_points",
        "--hook-point",
        "--hook_point",
        dest="hook_points",
        nargs="+",
        required=True,
        help="one or more hook points, e.g. layers.6.resid_post layers.6.mlp_out (comma-separated works too)",
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--dataset",
        default="default",
        help="'default' (shipped KJV sample), a .txt/.jsonl/.parquet file or folder, a save_to_disk "
        "folder, or a `datasets` name ('name' or 'name:config')",
    )
    parser.add_argument(
        "--split",
        default="train",
        help="train, validation or all; a source without a validation "
        "split holds out a fixed 5%% of its documents as validation (and train excludes them)",
    )
    parser.add_argument("--text-column", "--text_column", default="text")
    parser.add_argument(
        "--max-tokens", "--max_tokens", type=int, default=None, help="tokens to cache (default: the whole source)"
    )
    parser.add_argument("--dtype", default="float16", choices=list(CACHE_DTYPES), help="storage dtype")
    parser.add_argument("--window", type=int, default=256, help="tokens per LM window")
    parser.add_argument("--batch-windows", "--batch_windows", type=int, default=8, help="windows per LM forward")
    parser.add_argument(
        "--shard-tokens", "--shard_tokens", type=int, default=1 << 16, help="rows per shard (approximately)"
    )
    parser.add_argument(
        "--keep-first", "--keep_first", action="store_true", help="keep position 0 (excluded by default)"
    )
    parser.add_argument(
        "--keep-special", "--keep_special", action="store_true", help="keep BOS/EOS/pad tokens (excluded by default)"
    )
    parser.add_argument("--no-bos", "--no_bos", action="store_true", help="do not start windows with BOS")
    g = parser.add_mutually_exclusive_group()
    g.add_argument(
        "--resume",
        dest="resume",
        action="store_true",
        default=True,
        help="continue an interrupted run in --out (default)",
    )
    g.add_argument(
        "--no-resume", "--no_resume", dest="resume", action="store_false", help="fail if --out already holds a cache"
    )
    parser.add_argument("--overwrite", action="store_true", help="delete --out first")
    parser.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    parser.add_argument(
        "--model-dtype", "--model_dtype", default="float32", choices=list(CACHE_DTYPES), help="dtype of the LM"
    )
    add_placement_args(parser, dashes=True)  # --device_map auto --max_memory ...: an LM larger than one device
    return parser


# --------------------------------------------------------------------------------------------- eval, dashboard
def add_sae_source_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments every command that runs an SAE over text shares: the SAE, the LM and the text source."""
    parser.add_argument("sae_path", help="folder (or Hub id) of a saved SparseAutoencoder")
    parser.add_argument(
        "--subfolder", default=None, help="subfolder holding the SAE (e.g. one hook point of a multi-SAE repo)"
    )
    parser.add_argument(
        "--model", default=None, help="causal LM (default: the SAE's config.base_model, else the embedded SmolLM2-135M)"
    )
    parser.add_argument("--hook-point", default=None, help="override the SAE's config.hook_point")
    parser.add_argument(
        "--dataset",
        default="default",
        help="text source: 'default' (shipped KJV), a local .txt/.jsonl/.parquet file or folder, a "
        "save_to_disk folder, or a datasets name ('name' or 'name:config')",
    )
    return parser


def add_eval_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``hf-sae eval`` arguments to ``parser`` (returns it)."""
    add_sae_source_args(parser)
    parser.add_argument(
        "--split",
        default="validation",
        help="split of the text source (default: validation; a "
        "source without one holds out a fixed 5%% of its documents, never seen by training)",
    )
    parser.add_argument("--text-column", default="text")
    parser.add_argument(
        "--n-tokens", type=int, default=100_000, help="kept tokens for reconstruction/AFA/N2G (default 100k)"
    )
    parser.add_argument("--window", type=int, default=256, help="tokens per window (sequence length)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per LM forward")
    parser.add_argument(
        "--metrics",
        default="all",
        help=f"comma-separated subset of {','.join(ALL_METRICS + OPTIONAL_METRICS)} "
        f"(default all = all but {','.join(OPTIONAL_METRICS)})",
    )
    parser.add_argument(
        "--downstream-tokens", type=int, default=2048, help="tokens for the downstream loss (4 full forwards each)"
    )
    parser.add_argument(
        "--probe-tokens", type=int, default=30_000, help="tokens for probe recovery (2/3 fit, 1/3 test)"
    )
    parser.add_argument("--probe-baselines", default="raw_basis,random_directions", help="comma list; '' for none")
    parser.add_argument("--n2g-latents", type=int, default=64, help="latents sampled for N2G")
    parser.add_argument("--ablation-latents", type=int, default=16, help="latents sampled for ablation sparsity")
    parser.add_argument("--ablation-context", type=int, default=64, help="context length of the ablation forwards")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    add_placement_args(parser, dashes=True)  # an LM larger than one device: --device_map auto --max_memory ...
    parser.add_argument("--out", default=None, help="output folder (default: ./eval_<sae folder name>)")
    parser.add_argument("--no-report", action="store_true", help="write metrics.json only (no PNG/HTML)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def add_dashboard_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``hf-sae dashboard`` arguments."""
    add_sae_source_args(parser)
    parser.add_argument(
        "--split", default="validation", help="split of the text source (default: validation, held out)"
    )
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--n-tokens", type=int, default=20_000, help="kept tokens read (default 20000)")
    parser.add_argument("--window", type=int, default=128, help="tokens per LM window (default 128)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per LM forward")
    parser.add_argument("--top-k", type=int, default=10, help="top-activating contexts per latent (default 10)")
    parser.add_argument(
        "--samples", type=int, default=10, help="random firing contexts per latent, shown by quantile (default 10)"
    )
    parser.add_argument(
        "--context",
        type=int,
        nargs=2,
        default=(8, 3),
        metavar=("BEFORE", "AFTER"),
        help="context tokens shown before and after the activating token (default 8 3)",
    )
    parser.add_argument(
        "--n2g-latents", type=int, default=512, help="latents given an N2G explanation (default 512; all if fewer)"
    )
    parser.add_argument(
        "--n2g-tokens", type=int, default=20_000, help="tokens the N2G explanations use (default 20000)"
    )
    parser.add_argument(
        "--text",
        action="append",
        default=None,
        dest="texts",
        help="a text for the 'which latents fire' view (repeat; default: four built-in sentences)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="output folder (default: ./dashboard_<sae folder name>)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


# --------------------------------------------------------------------------------------------- sage
def add_sage_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``hf-sae sage`` options to ``parser`` (returns it)."""
    parser.add_argument("--model", default="smollm2-135m",
                        help="HF causal LM: 'smollm2-135m' (embedded, offline), a local folder or a Hub id")
    parser.add_argument("--sae", nargs="*", default=[], metavar="PATH",
                        help="SAE folder(s) saved by hf_sae (config.hook_point must be set); "
                             "'PATH::SUBFOLDER' loads a subfolder of a multi-hook-point folder/repo")
    parser.add_argument("--fresh-sae", nargs="*", default=[], metavar="HOOK",
                        help="also evaluate an untrained TopK SAE (8x, k=32) at these hook points "
                        "(a baseline/smoke test)")
    parser.add_argument("--tasks", nargs="+", default=["ioi", "gender"], choices=list(SAGE_TASKS))
    parser.add_argument("--n-fit", type=int, default=96, help="prompts for dictionaries / probe thresholds")
    parser.add_argument("--n-eval", type=int, default=64, help="held-out prompts for every reported number")
    parser.add_argument("--n-attribution", type=int, default=32, help="fitting prompts used for attribution patching")
    parser.add_argument(
        "--kinds",
        nargs="+",
        default=list(NODE_KINDS),
        choices=list(NODE_KINDS),
        help="node kinds searched for cross-sections",
    )
    parser.add_argument("--top-resid", type=int, default=4, help="residual locations kept in the cross-section")
    parser.add_argument("--top-head", type=int, default=4, help="attention-head locations kept")
    parser.add_argument("--top-mlp", type=int, default=2, help="MLP locations kept")
    parser.add_argument(
        "--n-confirm",
        type=int,
        default=None,
        help="how many kept locations to confirm by activation patching (default all)",
    )
    parser.add_argument(
        "--n-sublayer",
        type=int,
        default=4,
        help="sublayer locations per residual SAE (best attribution scores in the block it feeds)",
    )
    parser.add_argument(
        "--edit-steps",
        type=int,
        nargs="+",
        default=[1, 2, 4, 8, 16],
        help="numbers of SAE latents edited at which controllability is measured",
    )
    parser.add_argument("--n-control", type=int, default=32, help="eval prompts used for controllability")
    parser.add_argument("--no-control", action="store_true", help="skip the controllability edits")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="sage_out", help="output folder (sage.json, PNGs, index.html)")
    parser.add_argument("--no-progress", action="store_true")
    return parser


# --------------------------------------------------------------------------------------------- push, convert
def add_push_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``hf-sae push``."""
    parser.add_argument(
        "paths",
        nargs="+",
        help="saved SAE folders (config.json + model.safetensors), or a folder "
        "whose subfolders are saved SAEs (one per hook point)",
    )
    parser.add_argument("--repo-id", required=True, help="target repository, e.g. my-org/smollm2-saes")
    parser.add_argument(
        "--layout",
        choices=("auto", "root", "subfolders"),
        default="auto",
        help="auto: a single SAE at the repo root, several in hook-point folders",
    )
    parser.add_argument("--base-model", default=None, help="card metadata (default: the SAEs' config.base_model)")
    parser.add_argument("--dataset", default=None, help="card metadata (default: training_info['dataset'])")
    parser.add_argument("--training-tokens", type=int, default=None, help="card metadata")
    parser.add_argument(
        "--license",
        default=None,
        help=f"card metadata, e.g. mit (default: {DEFAULT_LICENSE}, "
        "marked in the card as not confirmed until you pass it)",
    )
    parser.add_argument(
        "--metrics",
        nargs="+",
        default=None,
        help="hf-sae eval's metrics.json file(s), or a JSON {hook point: {fvu, l0, dead_fraction, "
        "delta_loss}} (default: the held-out metrics the trainer stored in each SAE's config)",
    )
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--revision", default=None, help="branch to commit to (default main)")
    parser.add_argument("--commit-message", default=None)
    parser.add_argument("--token", default=None, help="Hub token (default: the logged-in token / HF_TOKEN)")
    parser.add_argument(
        "--dashboard",
        action="append",
        default=None,
        metavar="SITE",
        help="a feature-browser folder from `hf-sae dashboard` to ship beside its SAE (repeatable)",
    )
    parser.add_argument(
        "--dry-run", metavar="DIR", default=None, help="write the repository layout into DIR instead of pushing"
    )
    return parser


def add_convert_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``hf-sae convert``."""
    parser.add_argument("src", help="checkpoint folder/file (or an hf_sae folder with --to saelens)")
    parser.add_argument("out", help="output folder")
    parser.add_argument("--from", dest="fmt", default="auto", choices=("auto", *CONVERT_FORMATS), help="source format")
    parser.add_argument("--to", dest="to", default="hf_sae", choices=("hf_sae", "saelens"), help="target format")
    parser.add_argument("--hook-point", default=None, help="hf_sae hook point, e.g. layers.6.resid_post")
    parser.add_argument("--base-model", default=None, help="Hub id of the language model")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64", "bfloat16", "float16"))
    parser.add_argument("--input-scale", type=float, default=None,
                        help="SAELens expected_average_only_in: the dataset scaling factor")
    parser.add_argument("--accept-layer-norm", action="store_true",
                        help="(no longer needed: an OpenAI TopK autoencoder's layer norm is part of the converted SAE)")
    parser.add_argument("--no-layer-norm", action="store_true",
                        help="openai TopK: convert the SAE behind its layer norm (it then takes normalized inputs)")
    parser.add_argument("--dictionary-learning-version", default=None,
                        help="dictionary_learning JumpReLU: the library version that wrote ae.pt (default 0.1.0; "
                             "versions before 0.1.0 scale latents by the decoder-row norms)")
    parser.add_argument("--dict-class", default=None, choices=DL_CLASSES, help="dictionary_learning class")
    parser.add_argument("--use-threshold", default=None, choices=("yes", "no"),
                        help="dictionary_learning TopK/BatchTopK: encode with the stored threshold")
    parser.add_argument("--fold-decoder-norms", action="store_true", help="ReLU/JumpReLU: unit-norm decoder rows")
    parser.add_argument("--no-check", action="store_true", help="skip the check against the source's own forward")
    return parser


# --------------------------------------------------------------------------------------------- autointerp
def add_autointerp_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("site", help="folder of a feature-browser site (written by `hf-sae dashboard`)")
    parser.add_argument(
        "--backend",
        choices=("local", "openai"),
        default="local",
        help="local: a HF causal LM (default: the embedded SmolLM2-135M-Instruct); "
        "openai: an OpenAI-compatible chat endpoint",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="local: a model folder (default: the embedded SmolLM2); openai: the model name sent",
    )
    parser.add_argument("--api-base", default=None, help="openai: base URL, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument(
        "--api-key-env",
        default="OPENAI_API_KEY",
        help="openai: environment variable holding the API key (default OPENAI_API_KEY; unset = none)",
    )
    parser.add_argument("--latents", type=int, default=50, help="number of random latents to explain (default 50)")
    parser.add_argument("--latent-ids", type=int, nargs="+", default=None, help="explain these latents instead")
    parser.add_argument("--n-explain", type=int, default=10, help="top contexts shown to the explainer (default 10)")
    parser.add_argument(
        "--n-detect", type=int, default=5, help="firing and as many silent contexts per latent (default 5)"
    )
    parser.add_argument("--n-fuzz", type=int, default=3, help="contexts per latent for fuzzing (default 3; 0 = none)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the shuffled-explanation baseline")
    parser.add_argument("--batch-size", type=int, default=8, help="local: prompts per forward (default 8)")
    parser.add_argument("--concurrency", type=int, default=4, help="openai: requests in flight (default 4)")
    parser.add_argument(
        "--cache", default=None, help="answer cache (default SITE/autointerp_cache.jsonl; 'none' = off)"
    )
    parser.add_argument("--eval-dir", default=None, help="also add the scores to this `hf-sae eval` output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-progress", action="store_true")
    return parser

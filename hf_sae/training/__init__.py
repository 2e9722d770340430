"""Training SAEs with Accelerate: arguments, the trainer, initialisation, LR schedules, reports.

    from hf_sae.training import SAETrainingArguments, train
    args = SAETrainingArguments(hook_points=["layers.6.resid_post"], train_tokens=2_000_000, k=32)
    saes = train(args)                       # live SmolLM2 over the embedded corpus
    saes = train(args, train_data=x)         # or any [N, d] tensor / iterable of [B, d] batches

Command line: ``python scripts/train.py --help`` or ``hf-sae train --help`` (same arguments,
also from a JSON/YAML file); runs under ``python``, ``accelerate launch`` and ``torchrun``.
"""

import importlib

# name -> submodule; imported on first use, so that `hf-sae train --help` does not load the trainer
# (accelerate, transformers' model code) just to list the flags.
_LAZY = {
    "SAETrainingArguments": "arguments", "parse_args": "arguments",
    "add_train_args": "cli", "run_train": "cli", "train_main": "cli",
    "geometric_median": "init", "initialize_sae": "init", "input_scale_from_mean_sq_norm": "init",
    "default_lr": "schedules", "lr_at": "schedules",
    "SAEBundle": "trainer", "SAETrainer": "trainer", "TrainerState": "trainer", "train": "trainer",
}

__all__ = ["SAETrainingArguments", "parse_args", "SAETrainer", "SAEBundle", "TrainerState", "train",
           "train_main", "add_train_args", "run_train", "geometric_median", "initialize_sae",
           "input_scale_from_mean_sq_norm", "default_lr", "lr_at"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'hf_sae.training' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)


def __dir__():
    return sorted(set(globals()) | set(__all__))

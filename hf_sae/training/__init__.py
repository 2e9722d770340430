"""Training SAEs with Accelerate: arguments, the trainer, initialisation, LR schedules, reports.

    from hf_sae.training import SAETrainingArguments, train
    args = SAETrainingArguments(hook_points=["layers.6.resid_post"], train_tokens=2_000_000, k=32)
    saes = train(args)                       # live SmolLM2 over the embedded corpus
    saes = train(args, train_data=x)         # or any [N, d] tensor / iterable of [B, d] batches

Command line: ``python scripts/train.py --help`` or ``hf-sae train --help`` (same arguments,
also from a JSON/YAML file); runs under ``python``, ``accelerate launch`` and ``torchrun``.
"""

from .arguments import SAETrainingArguments, parse_args
from .cli import add_train_args, run_train, train_main
from .init import geometric_median, initialize_sae, input_scale_from_mean_sq_norm
from .schedules import default_lr, lr_at
from .trainer import SAEBundle, SAETrainer, TrainerState, train

__all__ = ["SAETrainingArguments", "parse_args", "SAETrainer", "SAEBundle", "TrainerState", "train",
           "train_main", "add_train_args", "run_train", "geometric_median", "initialize_sae",
           "input_scale_from_mean_sq_norm", "default_lr", "lr_at"]

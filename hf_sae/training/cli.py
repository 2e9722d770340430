"""Command-line entry points of training: ``hf-sae train ...`` and ``python scripts/train.py ...``."""

from __future__ import annotations

import argparse
import json
import logging
from typing import Optional


def train_main(argv: Optional[list[str]] = None) -> dict:
    """Parse ``argv`` (default ``sys.argv[1:]``) as training arguments, train, and return a summary
    ``{hook_point: {"path": folder, "final_metrics": {...}}}`` (also printed as JSON by the main process)."""
    from .arguments import parse_args
    from .trainer import SAETrainer

    logging.basicConfig(level=logging.INFO, format="[hf_sae] %(levelname)s %(message)s")
    for noisy in ("accelerate", "accelerate.checkpointing", "accelerate.accelerator"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = parse_args(argv)
    trainer = SAETrainer(args)
    saes = trainer.train()
    summary = {h: {"path": f"{trainer.out}/{h}", "tokens_trained": sae.config.training_info.get("tokens_trained"),
                   "final_metrics": sae.config.training_info.get("final_metrics", {})}
               for h, sae in saes.items()}
    if trainer.accelerator.is_main_process:
        print(json.dumps(summary, indent=2, default=float), flush=True)
    return summary


def add_train_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make ``parser`` (e.g. the ``train`` sub-parser of ``hf-sae``) forward its arguments to
    :func:`train_main`. Create it with ``add_help=False`` so ``--help`` reaches the training parser."""
    parser.add_argument("train_argv", nargs=argparse.REMAINDER,
                        help="training arguments (see `hf-sae train --help`); a .json/.yaml file may come first")
    return parser


def run_train(args: argparse.Namespace) -> dict:
    """Run training from a namespace produced by a parser set up with :func:`add_train_args`."""
    return train_main(list(args.train_argv))

"""Command-line entry points of training: ``hf-sae train ...`` and ``python scripts/train.py ...``.

``hf-sae`` wiring (the convention of hf_sae.cli)::

    add_train_args(subparser)        # every training flag, --config PATH, optional positional config file
    run_train(parsed_namespace)      # trains; returns the summary dict
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Optional

from ..cli_args import add_train_args  # noqa: F401  (the arguments, with every command's in hf_sae.cli_args)


def run_train(args: argparse.Namespace) -> dict:
    """Train from a namespace parsed with :func:`add_train_args`; returns
    ``{hook_point: {"path", "tokens_trained", "final_metrics"}}`` (printed as JSON by the main process)."""
    from .arguments import arguments_from_namespace
    from .trainer import make_trainer

    logging.basicConfig(level=logging.INFO, format="[hf_sae] %(levelname)s %(message)s")
    for noisy in ("accelerate", "accelerate.checkpointing", "accelerate.accelerator"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    trainer = make_trainer(arguments_from_namespace(args))
    saes = trainer.train()
    summary = {h: {"path": f"{trainer.out}/{h}", "tokens_trained": sae.config.training_info.get("tokens_trained"),
                   "final_metrics": sae.config.training_info.get("final_metrics", {})}
               for h, sae in saes.items()}
    if trainer.accelerator.is_main_process:
        print(json.dumps(summary, indent=2, default=float), flush=True)
    return summary


def _script_parser() -> argparse.ArgumentParser:
    from ..cli import add_common_args

    parser = argparse.ArgumentParser(prog="train.py", description="Train sparse autoencoders (hf_sae): one SAE "
                                     "per hook point, live or from cached activations.")
    return add_common_args(add_train_args(parser))


def train_main(argv: Optional[list[str]] = None) -> dict:
    """``python scripts/train.py ARGS``: parse ``argv`` (default ``sys.argv[1:]``) and train (errors raise)."""
    return run_train(_script_parser().parse_args(argv))


def script_main(argv: Optional[list[str]] = None) -> int:
    """``scripts/train.py``'s entry point: :func:`train_main` with the CLI's error convention (one line on
    stderr and exit status 1; the traceback with ``--debug``). Returns the exit status."""
    import sys

    from ..cli import run_command

    argv = list(sys.argv[1:] if argv is None else argv)
    args = _script_parser().parse_args(argv)
    return run_command("train.py", lambda: run_train(args), args.debug)

"""`hf-sae` command line: one sub-command per job, each a thin shell over a library module.

    hf-sae train ...      train SAEs (hf_sae.training)
    hf-sae cache ...      cache LM activations as Arrow shards (hf_sae.data.cache)
    hf-sae eval PATH      every metric + HTML report (hf_sae.evaluation.run)
    hf-sae sage ...       SAGE ground-truth evaluation (hf_sae.evaluation.sage.run)
    hf-sae push ...       push SAEs to the Hub with a model card (hf_sae.hub)
    hf-sae convert ...    import/export other SAE libraries' formats (hf_sae.convert)
    hf-sae dashboard PATH static feature browser of one SAE (hf_sae.dashboard)
    hf-sae autointerp DIR LM explanations of latents, scored by detection and fuzzing (hf_sae.autointerp)

Each module provides ``add_<name>_args(parser)`` and ``run_<name>(args)``; they are imported only
when their sub-command runs, so `hf-sae --help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("hf_sae.training", "train one SAE per hook point on live or cached activations"),
    "cache": ("hf_sae.data.cache", "cache activations at one or more hook points in one LM pass"),
    "eval": ("hf_sae.evaluation.run", "evaluate a trained SAE (reconstruction, downstream, probes, N2G, ...)"),
    "sage": ("hf_sae.evaluation.sage.run", "SAGE ground-truth evaluation on IOI-style tasks"),
    "push": ("hf_sae.hub", "push SAEs (one or many hook points) to the Hub with a model card"),
    "convert": ("hf_sae.convert", "convert SAEs from/to SAELens, sparsify, OpenAI, Gemma Scope, dictionary_learning"),
    "dashboard": ("hf_sae.dashboard", "build the static feature browser of an SAE (top contexts, histograms, logits)"),
    "autointerp": ("hf_sae.autointerp", "explain latents with an LM and score the explanations (detection, fuzzing)"),
}


def _load(name: str):
    module_name, _ = COMMANDS[name]
    module = importlib.import_module(module_name)
    return getattr(module, f"add_{name}_args"), getattr(module, f"run_{name}")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; only ``command``'s arguments are loaded (all names are listed)."""
    parser = argparse.ArgumentParser(prog="hf-sae", description="Sparse autoencoders on LM activations.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            _load(name)[0](p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    result = _load(args.command)[1](args)
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())

"""`hf-sae` command line: one sub-command per job, each a thin shell over a library module.

    hf-sae train ...      train SAEs (hf_sae.training)
    hf-sae cache ...      cache LM activations as Arrow shards (hf_sae.data.cache)
    hf-sae eval PATH      every metric + HTML report (hf_sae.evaluation.run)
    hf-sae sage ...       SAGE ground-truth evaluation (hf_sae.evaluation.sage.run)
    hf-sae push ...       push SAEs to the Hub with a model card (hf_sae.hub)
    hf-sae convert ...    import/export other SAE libraries' formats (hf_sae.convert)
    hf-sae dashboard PATH static feature browser of one SAE (hf_sae.dashboard)
    hf-sae autointerp DIR LM explanations of latents, scored by detection and fuzzing (hf_sae.autointerp)

Each command's options are ``hf_sae.cli_args.add_<name>_args(parser)`` (standard library only) and its
work is ``run_<name>(args)`` in its module, imported only when the command runs: ``hf-sae --help`` and
``hf-sae CMD --help`` never import torch, transformers or accelerate (``tests/test_hf_ux.py`` checks it).

Conventions every sub-command gets from :func:`build_parser` / :func:`run_command` (one place, so a new
sub-command only registers its module in :data:`COMMANDS`):

- every ``--flag_name`` is also accepted as ``--flag-name`` and the reverse (:func:`add_flag_aliases`);
- ``--help`` shows each option's default (:class:`HelpFormatter`);
- an error prints one line, ``hf-sae CMD: error: ...``, and exits 1; ``--debug`` (or ``HF_SAE_DEBUG=1``)
  shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable

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

DEBUG_ENV = "HF_SAE_DEBUG"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help that ends every option with its default, ``(default: 100000)``, unless the text already names
    it. Options whose namespace default is suppressed (``hf-sae train``) carry the value to show in
    ``action.help_default``."""

    def _get_help_string(self, action):
        text = action.help or ""
        if not action.option_strings or "default" in text.lower() or action.help is argparse.SUPPRESS:
            return text
        default = getattr(action, "help_default", action.default)
        if default is argparse.SUPPRESS or default is None or isinstance(action, (
                argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._HelpAction, argparse._VersionAction)):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})".lstrip()


def _other_style(option: str) -> str:
    body = option[2:]
    return "--" + (body.replace("_", "-") if "_" in body else body.replace("-", "_"))


def add_flag_aliases(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Accept every long option in both spellings (``--n-tokens`` and ``--n_tokens``): the other spelling
    is registered for parsing only, so ``--help`` stays one line per option. Returns ``parser``."""
    for action in list(parser._actions):
        for option in list(action.option_strings):
            if option.startswith("--"):
                other = _other_style(option)
                if other != option and other not in parser._option_string_actions:
                    parser._option_string_actions[other] = action
    return parser


def _add_args(name: str) -> Callable[[argparse.ArgumentParser], argparse.ArgumentParser]:
    """``add_<name>_args`` from :mod:`hf_sae.cli_args` (no torch import)."""
    from . import cli_args

    return getattr(cli_args, f"add_{name}_args")


def _run(name: str) -> Callable[[argparse.Namespace], object]:
    """``run_<name>`` from the command's module (imported now, after the arguments parsed)."""
    return getattr(importlib.import_module(COMMANDS[name][0]), f"run_{name}")


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options every command has (``--debug``), both flag spellings, defaults in help."""
    if "--debug" not in parser._option_string_actions:
        parser.add_argument("--debug", action="store_true",
                            help=f"on an error, show the full traceback instead of one line (or set {DEBUG_ENV}=1)")
    parser.formatter_class = HelpFormatter
    return add_flag_aliases(parser)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; only ``command``'s arguments are loaded (all names are listed)."""
    parser = argparse.ArgumentParser(prog="hf-sae", description="Sparse autoencoders on LM activations. "
                                     "Flags may be written --like-this or --like_this; errors print one line "
                                     "(add --debug for the traceback).", formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        if name == command:
            _add_args(name)(p)
            add_common_args(p)
    return parser


def error_line(exc: BaseException) -> str:
    """One line describing ``exc``: its message with newlines folded, prefixed by the exception type
    when the message alone would not say what went wrong."""
    msg = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, (FileNotFoundError, PermissionError, ImportError, KeyError, OSError, RuntimeError)) \
            and type(exc).__name__ not in msg:
        msg = f"{type(exc).__name__}: {msg}"
    return msg


def run_command(prog: str, run: Callable[[], object], debug: bool = False) -> int:
    """Run ``run()``; an exception becomes one line on stderr and exit status 1 (the traceback with
    ``debug`` or ``HF_SAE_DEBUG=1``). Returns the exit status: ``run``'s int result, else 0."""
    debug = debug or os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes")
    try:
        result = run()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 -- the CLI boundary: every error becomes one line
        if debug:
            raise
        print(f"{prog}: error: {error_line(exc)}  (--debug shows the traceback)", file=sys.stderr, flush=True)
        return 1
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    if command is None:
        parser = build_parser()
        args = parser.parse_args(argv)
        parser.print_help()
        return 2
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes")
    holder: dict = {}

    def _parse():
        holder["parser"] = build_parser(command)
        return 0

    status = run_command(f"hf-sae {command}", _parse, debug)  # an import error of the sub-command: one line
    if status:
        return status
    args = holder["parser"].parse_args(argv)
    return run_command(f"hf-sae {command}", lambda: _run(command)(args), debug or args.debug)


if __name__ == "__main__":
    sys.exit(main())

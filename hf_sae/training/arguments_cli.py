"""Command-line support for :mod:`hf_sae.training.arguments` that needs neither torch nor transformers (so that
``hf-sae train --help`` stays fast): the SAE defaults read from ``configuration_sae.py``'s source, and the
options ``HfArgumentParser`` would build from a dataclass."""

from __future__ import annotations

import argparse
import functools
import os
from dataclasses import MISSING, fields

_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


@functools.cache
def sae_source() -> tuple[dict, dict]:
    """``(constants, defaults)`` of :mod:`hf_sae.configuration_sae`, read from its source without importing
    it (it imports transformers, which imports torch): the module's upper-case constants and the defaults of
    ``SAEConfig.__init__``, each a constant expression evaluated with no names in scope. SAEConfig stays
    the single source of truth; ``tests/test_hf_ux.py`` checks these against the imported class."""
    import ast

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configuration_sae.py")
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)

    def value(node):
        return eval(compile(ast.Expression(node), path, "eval"), {"__builtins__": {}})  # constants only

    constants = {t.id: value(node.value) for node in tree.body if isinstance(node, ast.Assign)
                 for t in node.targets if isinstance(t, ast.Name) and t.id.isupper()}
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SAEConfig")
    init = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__").args
    names = [a.arg for a in init.args[len(init.args) - len(init.defaults):]]
    return constants, {n: value(d) for n, d in zip(names, init.defaults)}


def to_bool(value: str) -> bool:
    text = value.strip().lower()
    if text not in _TRUE + _FALSE:
        raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")
    return text in _TRUE


def add_field_options(parser: argparse.ArgumentParser, cls, field_types: dict) -> argparse.ArgumentParser:
    """One option per field of the dataclass ``cls`` (resolved types: ``field_types``), as transformers'
    ``HfArgumentParser`` makes them (built here because importing transformers imports torch): ``--name``
    typed by the annotation, ``Optional[X]`` as ``X``, ``list[str]`` as one or more values, a ``bool`` as
    ``--name [true|false]`` plus ``--no_name`` when it defaults to True; help from the field's metadata."""
    import typing

    for f in fields(cls):
        annotation = field_types[f.name]
        args = typing.get_args(annotation)
        if typing.get_origin(annotation) is typing.Union and type(None) in args:
            annotation = next(a for a in args if a is not type(None))
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        kw = {"default": default, "help": f.metadata.get("help")}
        if annotation is bool:
            kw.update(type=to_bool, **({"nargs": "?", "const": True} if default is not None else {}))
        elif typing.get_origin(annotation) is list:
            kw.update(type=typing.get_args(annotation)[0], nargs="+")
        else:
            kw["type"] = annotation
        parser.add_argument(f"--{f.name}", **kw)
        if annotation is bool and default is True:
            parser.add_argument(f"--no_{f.name}", action="store_false", dest=f.name, default=False,
                                help=f"turn --{f.name} off")
    return parser

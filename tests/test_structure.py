"""The shape of the code base, checked so that it stays true: import layering.

Imports are read from the source (any level: top, function, ``importlib.import_module("hf_sae.x")``), except
those under ``if TYPE_CHECKING:``, which never run.
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent / "hf_sae"


def _modules() -> dict:
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = list(p.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


MODULES = _modules()


def _runtime_nodes(tree):
    """Every node outside ``if TYPE_CHECKING:`` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                stack.extend(child.orelse)
                continue
            stack.append(child)


def _imports(name: str) -> set:
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in MODULES else mod for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and getattr(node.func, "attr", getattr(node.func, "id", "")) in ("import_module", "_optional")):
            targets = [node.args[0].value]
        found.update(t for t in targets if t in MODULES and t != name)
    return found


GRAPH = {name: _imports(name) for name in MODULES}


def _reach(start: str) -> set:
    seen, stack = set(), [start]
    while stack:
        for nxt in GRAPH[stack.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def test_the_import_scan_sees_lazy_and_importlib_imports():
    # the scan must be able to fail: hub imports the model class lazily, and the model loads its optional helpers
    # through importlib
    assert "hf_sae.modeling_sae" in GRAPH["hf_sae.hub"]
    assert {"hf_sae.hub_layout", "hf_sae.hub_push", "hf_sae.kernels"} <= GRAPH["hf_sae.modeling_sae"]


def test_the_model_and_the_hub_form_no_import_cycle():
    """modeling_sae never imports hf_sae.hub, and nothing it imports leads back to it, except the loaders of other
    libraries' formats (hf_sae.pretrained), which build SparseAutoencoders by design."""
    model = "hf_sae.modeling_sae"
    assert "hf_sae.hub" not in _reach(model)
    for dep in GRAPH[model] - {"hf_sae.pretrained"}:
        assert model not in _reach(dep), f"{dep} imports {model} back"


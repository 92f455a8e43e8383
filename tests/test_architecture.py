"""Contract: the packages of megatron_vp2o form the declared layers of docs/architecture.md.

``LAYERS`` lists the top-level packages (and top-level modules), lowest first. Every ``import`` /
``from ... import`` in a module's source counts, function-level and relative ones too; a module may
import only its own package and packages listed before it, so the import graph between packages has
no cycle. No module imports a private name (``_x``) from another package. The root
``megatron_vp2o/__init__.py`` imports nothing from the project.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "megatron_vp2o"
LAYERS = ["algo", "config", "compat", "platform", "device", "data", "model", "moe", "distributed", "monitor",
          "checkpoint", "training", "plan", "rewards", "generation", "eval", "launch", "rl", "recipes", "cli"]
# Pairs that must not import each other in either direction, whatever the order: evaluation and the RL
# loop both stand on generation and rewards; the CLI hands the loop its evaluation callable.
SIBLINGS = [("rl", "eval")]
FILES = sorted(p for p in PKG.rglob("*.py") if p != PKG / "__init__.py")


def _top(path: pathlib.Path) -> str:
    return path.relative_to(PKG).parts[0].removesuffix(".py")


def _imports(path: pathlib.Path):
    """(imported module, names taken from it, line) for every project import in ``path``."""
    rel = path.relative_to(ROOT).with_suffix("").parts
    package = rel if path.name == "__init__.py" else rel[:-1]
    package = package[:-1] if package[-1] == "__init__" else package
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("megatron_vp2o."):
                    yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = list(package[: len(package) - node.level + 1])
                base = ".".join(parts + ([base] if base else []))
            if base == "megatron_vp2o":  # from megatron_vp2o import X: X is the package
                for alias in node.names:
                    yield f"megatron_vp2o.{alias.name}", [], node.lineno
            elif base.startswith("megatron_vp2o."):
                yield base, [a.name for a in node.names], node.lineno


def _edges():
    out = {}
    for path in FILES:
        for module, _, line in _imports(path):
            dst, src = module.split(".")[1], _top(path)
            if dst != src:
                out.setdefault((src, dst), []).append(f"{path.relative_to(ROOT)}:{line}")
    return out


def test_every_package_is_declared():
    found = {_top(p) for p in FILES} - {"__main__"}
    assert found <= set(LAYERS), f"undeclared packages (add them to LAYERS and docs/architecture.md): {found - set(LAYERS)}"
    assert set(LAYERS) <= found, f"declared but missing: {set(LAYERS) - found}"


def test_imports_only_go_down_the_layers():
    print("layer order (lowest first): " + " < ".join(LAYERS))
    upward = [f"{src} -> {dst} ({', '.join(where[:3])})" for (src, dst), where in _edges().items()
              if LAYERS.index(dst) > LAYERS.index(src)]
    assert not upward, "imports up the layer order:\n" + "\n".join(upward)


def test_siblings_do_not_import_each_other():
    edges = _edges()
    bad = [f"{a} -> {b} ({', '.join(edges[(a, b)][:3])})" for x, y in SIBLINGS for a, b in ((x, y), (y, x))
           if (a, b) in edges]
    assert not bad, "\n".join(bad)


def test_no_cycle_between_packages():
    graph = {}
    for src, dst in _edges():
        graph.setdefault(src, set()).add(dst)
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in graph.get(node, ()):
            if state.get(nxt) == "open":
                pytest.fail("package import cycle: " + " -> ".join(path + [node, nxt]))
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_no_private_name_imported_across_packages():
    bad = []
    for path in FILES:
        for module, names, line in _imports(path):
            other = module.split(".")[1] != _top(path)
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            private_module = any(part.startswith("_") and not part.startswith("__") for part in module.split("."))
            if other and (private or private_module):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {private or module} from {module}")
    assert not bad, "\n".join(bad)


def test_root_package_imports_nothing():
    tree = ast.parse((PKG / "__init__.py").read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]


def test_checker_sees_function_level_and_relative_imports(tmp_path):
    """The checker itself: a function-level import and a relative import are both edges."""
    edges = _edges()
    assert ("cli", "config") in edges and ("rl", "generation") in edges

"""Contract: every import of the project in tests/, bench/, tools/, examples/ and the package itself
names a module that exists and names defined in it, function-level imports included.

A module moved in a refactor leaves lazy imports behind in code that only some machines run: the
GPU-only rank code of tests/gpu imported ``megatron_vp2o.training.vp2o_step`` long after it moved to
``rl/learner/vp2o.py``, and only ``make gpu-check`` on an H100 found it. Resolved statically (no
import, so nothing here needs CUDA, vLLM or megatron-core): a module's names are its top-level
definitions, assignments and imports, and its submodules.
"""

import ast
import functools
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCES = sorted(p for d in ("megatron_vp2o", "tests", "bench", "tools", "examples")
                 for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts)


def _module_path(name: str) -> pathlib.Path | None:
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.exists():
            return path
    return None


@functools.lru_cache(maxsize=None)
def _names(name: str) -> frozenset | None:
    """Names module ``name`` defines (None: it defines a module ``__getattr__``, anything goes)."""
    path = _module_path(name)
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if node.name == "__getattr__":
                return None
            found.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                found.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            found.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.If, ast.Try)):  # guarded definitions: take every branch
            for sub in ast.walk(node):
                if isinstance(sub, (ast.FunctionDef, ast.ClassDef)):
                    found.add(sub.name)
                elif isinstance(sub, (ast.Import, ast.ImportFrom)):
                    found.update((a.asname or a.name).split(".")[0] for a in sub.names)
                elif isinstance(sub, ast.Assign):
                    found.update(n.id for t in sub.targets for n in ast.walk(t) if isinstance(n, ast.Name))
    if path.name == "__init__.py":
        found.update(p.stem for p in path.parent.glob("*.py"))
        found.update(p.name for p in path.parent.iterdir() if (p / "__init__.py").exists())
    return frozenset(found)


def _project_imports(path: pathlib.Path):
    """(module, names, line) for each absolute or relative import of megatron_vp2o in ``path``."""
    rel = path.relative_to(ROOT).with_suffix("").parts
    package = rel[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "megatron_vp2o":
                    yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                if package[:1] != ("megatron_vp2o",):
                    continue
                base = package[:len(package) - node.level + 1]
                module = ".".join([*base, module] if module else base)
            if module.split(".")[0] == "megatron_vp2o":
                yield module, [a.name for a in node.names if a.name != "*"], node.lineno


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_project_imports_resolve(path):
    for module, names, line in _project_imports(path):
        where = f"{path.relative_to(ROOT)}:{line}"
        assert _module_path(module), f"{where} imports {module}, which does not exist"
        defined = _names(module)
        if defined is None:
            continue
        for name in names:
            assert name in defined or _module_path(f"{module}.{name}"), \
                f"{where} imports {name} from {module}, which does not define it"


def test_checker_catches_a_moved_module(tmp_path, monkeypatch):
    stale = ROOT / "tests" / "gpu" / "_stale_import_probe.py"
    stale.write_text("def f():\n    from megatron_vp2o.training.vp2o_step import init_vp2o\n")
    try:
        with pytest.raises(AssertionError, match="does not exist"):
            test_project_imports_resolve(stale)
        stale.write_text("def f():\n    from megatron_vp2o.rl.learner.vp2o import no_such_function\n")
        with pytest.raises(AssertionError, match="does not define"):
            test_project_imports_resolve(stale)
        stale.write_text("def f():\n    from megatron_vp2o.rl.learner.vp2o import init_vp2o\n")
        test_project_imports_resolve(stale)
    finally:
        stale.unlink()

"""Contract: megatron_vp2o/algo is pure torch + math (STYLE principle 1): no megatron, no
torch.distributed, no host syncs (.item/.cpu/.tolist/.cuda); every file opens with a docstring that
cites the spec and carries a shape legend, and stays under 600 lines."""

import ast
import io
import pathlib
import tokenize

import pytest

ALGO = pathlib.Path(__file__).resolve().parents[2] / "megatron_vp2o" / "algo"
FILES = sorted(ALGO.rglob("*.py"))
ALLOWED_ROOTS = {"torch", "math", "__future__", "typing", "dataclasses"}
FORBIDDEN_CALLS = ("item", "cpu", "tolist", "cuda", "numpy")


def _imports(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module


def test_files_found():
    assert {f.name for f in FILES} >= {"prototypes.py", "kernels.py", "coactivation.py",
                                      "stein.py", "specialization.py", "trust_region.py",
                                      "grpo.py", "config.py", "registry.py", "__init__.py"}


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_imports_only_torch_and_math(path):
    tree = ast.parse(path.read_text())
    for name in _imports(tree):
        assert name.split(".")[0] in ALLOWED_ROOTS, f"{path.name} imports {name}"
        assert not name.startswith("torch.distributed"), f"{path.name} imports {name}"
    for node in ast.walk(tree):  # torch.distributed used as an attribute
        if isinstance(node, ast.Attribute) and node.attr == "distributed":
            pytest.fail(f"{path.name}:{node.lineno} uses .distributed")


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_no_host_syncs(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in FORBIDDEN_CALLS:
            pytest.fail(f"{path.name}:{node.lineno} calls .{node.attr}()")
    # The same check on raw tokens, in case of getattr-style spellings in strings of code.
    tokens = [t.string for t in tokenize.generate_tokens(io.StringIO(path.read_text()).readline)]
    for i, tok in enumerate(tokens[:-2]):
        if tok == "." and tokens[i + 1] in FORBIDDEN_CALLS and tokens[i + 2] == "(":
            pytest.fail(f"{path.name} calls .{tokens[i + 1]}()")


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_module_docstring_and_size(path):
    text = path.read_text()
    doc = ast.get_docstring(ast.parse(text))
    assert doc, f"{path.name} has no module docstring"
    assert "Shape legend" in doc, f"{path.name} docstring lacks a shape legend"
    assert "spec" in doc, f"{path.name} docstring cites no spec section"
    assert len(text.splitlines()) <= 600
    assert max(len(line) for line in text.splitlines()) <= 100, f"{path.name}: line > 100"


# ---- package boundaries outside algo/ (issue 14): the transitive closure of project imports --------
# Every ``import``/``from ... import`` in a module's source counts (function-level ones too), and so do
# the parent packages of each imported module, except the root ``megatron_vp2o/__init__.py`` (the
# application wiring: it imports rl/config.py so that the rl section registers itself).

ROOT = ALGO.parents[1]


def _module_file(name):
    path = ROOT.joinpath(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _project_imports(name):
    file = _module_file(name)
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    named = {m for m in found if m.startswith("megatron_vp2o.") and _module_file(m)}
    parents = {".".join(m.split(".")[:i]) for m in named | {name} for i in range(2, len(m.split(".")))}
    return named | parents


def import_closure(*starts):
    seen, todo = set(), list(starts)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += sorted(_project_imports(name) - seen)
    return seen


def test_closure_helper_sees_function_level_and_relative_imports():
    closure = import_closure("megatron_vp2o.algo")
    assert {"megatron_vp2o.algo.config", "megatron_vp2o.algo.grpo"} <= closure  # relative imports
    assert "megatron_vp2o.model.inputs" in import_closure("megatron_vp2o.checkpoint.convert_hf")  # in a function


def test_config_is_a_leaf_package():
    """config/ imports no other project package (the rl section registers itself from rl/config.py)."""
    starts = [f"megatron_vp2o.config.{p.stem}" for p in (ROOT / "megatron_vp2o" / "config").glob("*.py")]
    reached = {name.split(".")[1] for name in import_closure(*starts)}
    assert reached <= {"config", "algo", "compat"}, sorted(reached)


def test_conversion_does_not_import_training():
    """`vp2o convert` (and its --verify) reaches no module under training/."""
    closure = import_closure("megatron_vp2o.cli.convert", "megatron_vp2o.checkpoint.convert_hf")
    assert not [m for m in closure if m.startswith("megatron_vp2o.training")]
    assert "megatron_vp2o.checkpoint.convert_hf" in closure

"""Contract: megatron_vp2o/algo is pure torch + math (CONTRIBUTING.md §1): no megatron, no
torch.distributed, no host syncs (.item/.cpu/.tolist/.cuda); every file opens with a docstring that
cites docs/method.md and carries a shape legend, and stays under 600 lines."""

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
def test_no_host_to_device_copies(path):
    """A Python value sent to a device (torch.tensor(x), torch.as_tensor(x, device=...)) is a
    host-to-device copy that CUDA-graph capture refuses (make gpu-check caught one in
    coactivation_matrix): algo code fills numbers on the device with scalars.as_scalar."""
    for node in ast.walk(ast.parse(path.read_text())):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        name = node.func.attr
        on_torch = isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
        if on_torch and (name == "tensor" or (name == "as_tensor" and
                                              any(k.arg == "device" for k in node.keywords))):
            pytest.fail(f"{path.name}:{node.lineno} torch.{name}(...) copies a host value to the "
                        "device: use megatron_vp2o.algo.scalars.as_scalar")


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_module_docstring_and_size(path):
    text = path.read_text()
    doc = ast.get_docstring(ast.parse(text))
    assert doc, f"{path.name} has no module docstring"
    assert "Shape legend" in doc, f"{path.name} docstring lacks a shape legend"
    assert "method §" in doc, f"{path.name} docstring cites no docs/method.md section (method §N)"
    assert len(text.splitlines()) <= 600
    assert max(len(line) for line in text.splitlines()) <= 100, f"{path.name}: line > 100"

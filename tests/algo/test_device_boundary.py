"""Contract (one device, everywhere): every tensor factory call in megatron_vp2o outside algo/
(``torch.zeros/ones/empty/full/arange/tensor/as_tensor/rand*/linspace/eye`` and
``torch.Generator``) states its device: ``device=device()``, the device of a tensor it already has,
or ``device="cpu"`` for host-side bookkeeping (explicit, so a reader sees it is meant). ``*_like``
and ``x.new_*`` derive it and are not checked. algo/ takes devices from its inputs (its own
boundary test). A bare ``torch.zeros(3)`` on a CUDA run lands on the CPU and fails later, far away
(a collective, a mixed-device add): this test finds it without a GPU."""

from __future__ import annotations

import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parents[2] / "megatron_vp2o"
FACTORIES = {"zeros", "ones", "empty", "full", "arange", "tensor", "as_tensor", "rand", "randn", "randint",
             "randperm", "linspace", "eye", "Generator"}
#: (file relative to megatron_vp2o/, enclosing function): calls allowed without a device, each with why.
ALLOW: dict[tuple[str, str], str] = {}


def _enclosing_functions(tree) -> dict:
    """id(node) -> name of the innermost function containing it."""
    owner = {}

    def visit(node, name):
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else name
            owner[id(child)] = inner
            visit(child, inner)

    visit(tree, "<module>")
    return owner


def bare_factory_calls(source: str, name: str = "<src>") -> list[tuple[int, str, str]]:
    """(line, call, enclosing function) of each torch factory call that states no device."""
    tree = ast.parse(source)
    owner = _enclosing_functions(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        func = node.func
        if func.attr not in FACTORIES or not (isinstance(func.value, ast.Name) and func.value.id == "torch"):
            continue
        if any(k.arg == "device" or k.arg is None for k in node.keywords):  # device= or **kwargs
            continue
        found.append((node.lineno, f"torch.{func.attr}", owner.get(id(node), "<module>")))
    return found


FILES = sorted(p for p in PKG.rglob("*.py") if "algo" not in p.relative_to(PKG).parts)


def test_files_found():
    names = {str(p.relative_to(PKG)) for p in FILES}
    assert {"moe/layer.py", "generation/megatron_engine.py", "rl/learner/vp2o.py"} <= names


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PKG)))
def test_every_factory_states_its_device(path):
    rel = str(path.relative_to(PKG))
    bad = [f"{rel}:{line} {call}(...) in {fn}() states no device (device=device(), x.device, or "
           f"device='cpu' for host bookkeeping)"
           for line, call, fn in bare_factory_calls(path.read_text(), rel) if (rel, fn) not in ALLOW]
    assert not bad, "\n".join(bad)


def test_check_finds_a_bare_factory_and_accepts_stated_ones():
    assert bare_factory_calls("import torch\nx = torch.zeros(3)\n") == [(2, "torch.zeros", "<module>")]
    assert bare_factory_calls("import torch\ndef f(g):\n    return torch.Generator()\n") == [
        (3, "torch.Generator", "f")]
    ok = ("import torch\ndef f(x, dev):\n    a = torch.zeros(3, device=dev)\n    b = torch.ones_like(x)\n"
          "    c = x.new_zeros(2)\n    d = torch.tensor([1], device='cpu')\n    return torch.full((2,), 1.0, **{})\n")
    assert bare_factory_calls(ok) == []


def test_allow_list_entries_exist():
    for (rel, fn), why in ALLOW.items():
        assert why and any(f == fn for _, _, f in bare_factory_calls((PKG / rel).read_text(), rel)), (rel, fn)

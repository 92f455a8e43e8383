"""Contract: docs/errors.md is exactly what megatron_vp2o/cli/errors.py generates (real messages of
real command lines), and every error class derived from ConfigError in the package has a row."""

import ast

from harness import ROOT
from megatron_vp2o.cli import errors


def test_doc_is_generated_from_the_code():
    assert errors.DOC.read_text() == errors.render(), \
        "docs/errors.md is stale: run `python -m megatron_vp2o.cli.errors --write` and review the diff"


def test_every_config_error_subclass_is_documented():
    bases = {"ConfigError"}
    classes = [node for path in (ROOT / "megatron_vp2o").rglob("*.py")
               for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ClassDef)]
    grew = True
    while grew:  # subclasses of subclasses, to a fixed point
        found = {c.name for c in classes
                 if {getattr(b, "id", getattr(b, "attr", None)) for b in c.bases} & bases}
        grew, bases = not found <= bases, bases | found
    documented = {name for name, *_ in errors.CLASSES}
    assert bases <= documented, f"undocumented error classes: {sorted(bases - documented)}"
    assert len(errors.EXAMPLES) >= 15 and all(e[2] for e in errors.EXAMPLES)

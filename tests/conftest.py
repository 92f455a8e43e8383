"""Shared pytest set-up: repo root on sys.path, wandb offline, the multi-rank harness fixture."""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("WANDB_MODE", "offline")


# ---- tiny offline tokenizers (tests/tokenizers_fixture.py) ----
import pytest  # noqa: E402

from tokenizers_fixture import CHAT_TEMPLATE, build_char_tokenizer  # noqa: E402


@pytest.fixture
def char_tokenizer():
    return build_char_tokenizer()


@pytest.fixture
def chat_tokenizer():
    return build_char_tokenizer(CHAT_TEMPLATE)


# ---- markers (pytest.ini): what a module does decides its marks --------------------------------------
_SLOW_MODULES = {"tests/cli/test_fuzz.py", "tests/cli/test_listed_cases.py", "tests/cli/test_checkpoint_safety.py",
                 "tests/cli/test_resume_state.py", "tests/checkpoint/test_cli.py", "tests/recipes/test_recipes.py",
                 "tests/eval/test_tasks.py", "tests/monitor/test_plots.py"}
_DIST_CALLS = ("run_world(", "torch.distributed.run", "--nproc-per-node")
_SOURCES: dict = {}


def _marks_for(path: Path) -> list[str]:
    rel = path.relative_to(ROOT).as_posix()
    if rel not in _SOURCES:
        _SOURCES[rel] = path.read_text() if path.suffix == ".py" else ""
    source, marks = _SOURCES[rel], []
    if rel.startswith("tests/gpu/"):
        marks.append("gpu")
    if rel.startswith("tests/launch/") and rel != "tests/launch/test_signals.py":
        marks.append("slurm")
    if any(call in source for call in _DIST_CALLS):
        marks.append("dist")
    if rel.startswith("tests/e2e/") or rel in _SLOW_MODULES:
        marks.append("slow")
    return marks


def pytest_collection_modifyitems(config, items):
    for item in items:
        for mark in _marks_for(Path(str(item.fspath))):
            item.add_marker(getattr(pytest.mark, mark))

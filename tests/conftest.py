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

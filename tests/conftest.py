"""Shared pytest set-up: repo root on sys.path, wandb offline, the multi-rank harness fixture."""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("WANDB_MODE", "offline")

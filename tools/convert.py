#!/usr/bin/env python
"""Checkpoint conversion HF <-> megatron: the same as ``vp2o convert`` (see megatron_vp2o/cli/convert.py).

    python tools/convert.py hf-to-mcore --hf DIR --out DIR [--tp N --pp N --ep N] [--verify]
    python tools/convert.py mcore-to-hf --ckpt DIR --out DIR
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if __name__ == "__main__":  # dist_checkpointing's helper processes re-import __main__
    from megatron_vp2o.cli.convert import main

    sys.exit(main())

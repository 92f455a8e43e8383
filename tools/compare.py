"""VP2O vs GRPO at equal rollout budget: the study tool (same as ``vp2o compare``).

    python tools/compare.py --out runs/study --tasks digit_sum digit_sum3 --seeds 1 2 3 4 5 --ablations
    python tools/compare.py --out runs/study --report docs/study --report-only ...   # rewrite the report

See megatron_vp2o/cli/compare.py for the options and megatron_vp2o/monitor/study.py for the
statistics (paired by seed, 95% Student-t intervals) and the claims table.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_vp2o.cli.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))

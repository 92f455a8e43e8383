"""Compare VP2O with the GRPO baseline on the tiny recipe: 3 seeds each, one table.

    python tools/compare_algos.py [--steps 30] [--seeds 1 2 3] [--out runs/compare] [overrides ...]

Runs ``vp2o train`` for each (algo, seed), then prints per algo the mean +- std over seeds of: eval
reward and pass@1 at the start and the end, distinct correct answers per prompt, prototype overlap
(mean off-diagonal |cos| of expert prototypes, vp2o), refresh count, step time; and whether the
end-minus-start reward rise exceeds the seed-to-seed spread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(algo: str, seed: int, out: Path, steps: int, overrides: list[str]) -> list[dict]:
    if not (out / "metrics.jsonl").exists():
        cmd = [sys.executable, "-m", "megatron_vp2o.cli.main", "train", "--config", "examples/configs/tiny_cpu.yaml",
               "--out", str(out), f"rl.algo={algo}", f"train.seed={seed}", f"rl.steps={steps}",
               "logging.progress=false", *overrides]
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def summarize(rows: list[dict]) -> dict:
    first, last = rows[0], rows[-1]
    overlap = [v for k, v in last.items() if k.startswith("moe/proto_overlap")]
    return {
        "reward start": first.get("eval/mean", float("nan")), "reward end": last.get("eval/mean", float("nan")),
        "pass@1 end": last.get("eval/pass_at_1", float("nan")),
        "distinct correct end": last.get("eval/distinct_correct", float("nan")),
        "proto overlap": sum(overlap) / len(overlap) if overlap else float("nan"),
        "refreshes": last.get("vp2o/refreshes", float("nan")),
        "step s": statistics.mean(r["timing/step"] for r in rows if "timing/step" in r),
    }


def fmt(values: list[float]) -> str:
    values = [v for v in values if v == v]  # drop NaN (e.g. prototype overlap of grpo runs)
    if not values:
        return "-"
    if len(values) < 2:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} +- {statistics.stdev(values):.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--out", default="runs/compare")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    table = {}
    for algo in ("vp2o", "grpo"):
        table[algo] = [summarize(run(algo, s, Path(args.out) / f"{algo}_seed{s}", args.steps, args.overrides))
                       for s in args.seeds]
    keys = list(table["vp2o"][0])
    print(f"{'metric':<22}" + "".join(f"{algo:>24}" for algo in table))
    for key in keys:
        print(f"{key:<22}" + "".join(f"{fmt([r[key] for r in table[a]]):>24}" for a in table))
    for algo, runs in table.items():
        rises = [r["reward end"] - r["reward start"] for r in runs]
        spread = statistics.stdev([r["reward end"] for r in runs]) if len(runs) > 1 else 0.0
        verdict = "yes" if statistics.mean(rises) > spread else "NO"
        print(f"{algo}: mean reward rise {statistics.mean(rises):+.3f} vs seed spread {spread:.3f} -> exceeds: {verdict}")


if __name__ == "__main__":
    main()

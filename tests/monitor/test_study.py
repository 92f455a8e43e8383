"""Contract: the study report's statistics -- the 95% Student-t interval of paired differences, the
three-way verdicts, rollout batches to reach a reward, and the evaluation points read from a run
(one point per rollout cost, optimizer steps counted as the learner took them)."""

import json
import math

import pytest

from megatron_vp2o.monitor import study as R
from megatron_vp2o.cli.compare import parse_arms
from argparse import Namespace


def test_t_interval_matches_the_formula():
    diffs = [0.1, 0.3, 0.2, 0.4, 0.0]
    mean, low, high = R.t_interval(diffs)
    sd = math.sqrt(sum((d - 0.2) ** 2 for d in diffs) / 4)
    assert mean == pytest.approx(0.2) and high - mean == pytest.approx(2.776 * sd / math.sqrt(5))
    assert mean - low == pytest.approx(high - mean)
    assert math.isnan(R.t_interval([0.5])[1])


@pytest.mark.parametrize("low, high, better, expected", [
    (0.1, 0.3, "higher", "holds"), (-0.3, -0.1, "higher", "does not hold"), (-0.1, 0.2, "higher", "inconclusive"),
    (-0.3, -0.1, "lower", "holds"), (0.1, 0.3, "lower", "does not hold"),
    (float("nan"), float("nan"), "lower", "n/a (one seed)")])
def test_verdicts(low, high, better, expected):
    assert R.verdict(low, high, better) == expected


def test_run_points_and_batches_to_reach(tmp_path):
    rows = [{"step": 0, "eval/mean": 0.5, "rollout/samples": 0},
            {"step": 1, "vp2o/refreshes": 1, "rollout/samples": 64, "grpo/optimizer_steps": 4},
            {"step": 2, "vp2o/refreshes": 2, "rollout/samples": 128, "grpo/optimizer_steps": 4, "eval/mean": 0.6},
            {"step": 3, "vp2o/refreshes": 2, "rollout/samples": 128, "grpo/optimizer_steps": 4, "eval/mean": 0.7,
             "budget_end": True}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    points = R.load_run(tmp_path)
    assert [(p["samples"], p["eval/mean"], p["updates"], p["refreshes"]) for p in points] == [
        (0, 0.5, 0, 0), (128, 0.7, 12, 2)]  # the two evaluations at 128 responses: the later is kept
    assert R.batches_to_reach(points, "eval/mean", 0.55) == 2
    assert R.batches_to_reach(points, "eval/mean", 0.45) == 2  # the start does not count
    assert R.batches_to_reach(points, "eval/mean", 0.9) == 3  # never: all batches + 1
    (tmp_path / "metrics.jsonl").write_text(json.dumps(rows[0]) + "\n")
    assert R.load_run(tmp_path) is None  # unfinished runs are left out


def test_vp2o_epoch_loop_counts_its_optimizer_steps(tmp_path):
    """VP2O on GRPO's loop (rl.vp2o.mini_batches x epochs > 1) logs vp2o/optimizer_steps per update; a
    single VP2O step logs none and counts one."""
    rows = [{"step": 0, "eval/mean": 0.5, "rollout/samples": 0},
            {"step": 1, "rollout/samples": 64, "vp2o/optimizer_steps": 12},
            {"step": 2, "rollout/samples": 128, "eval/mean": 0.6, "budget_end": True}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [p["updates"] for p in R.load_run(tmp_path)] == [0, 13]


def test_custom_arms_parse_and_bad_ones_name_the_format():
    args = Namespace(arms=["grpo"], ablations=False, arm=["g2=grpo:rl.lr=3e-4,rl.grpo.mini_batches=2"])
    g2 = ["rl.algo=grpo", "rl.lr=3e-4", "rl.grpo.mini_batches=2"]
    assert parse_arms(args) == {"grpo": ["rl.algo=grpo"], "g2": g2}
    with pytest.raises(ValueError, match="NAME=ALGO"):
        parse_arms(Namespace(arms=[], ablations=False, arm=["g3=ppo:rl.lr=1"]))

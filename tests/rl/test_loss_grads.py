"""Contract: the loss-gradient diagnostic (logging.loss_grad_every; spec/grad_norm_{ortho,var,pg}/layerN
and spec/grad_ratio_*) leaves a VP2O update bit-identical (same parameters after two updates with it on
every step as with it off) and logs finite norms for every MoE layer; both learners log the per-token
ratio quantiles policy/ratio_{p50,p99,max}, ordered p50 <= p99 <= max. Tiny recipe, one rank."""

from __future__ import annotations

import math

import pytest

from e2e.test_rl import QUICK
from harness import run_world

SPEC = ["vp2o.specialization.ortho_coef=0.01", "vp2o.specialization.var_coef=0.001"]


def _run(tmp_path_factory, name, overrides):
    return run_world(1, "rl.worlds_loss_grads:updates",
                     {"out": str(tmp_path_factory.mktemp(name)), "overrides": QUICK + overrides}, timeout_s=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return {"off": _run(tmp_path_factory, "off", SPEC + ["logging.loss_grad_every=0"]),
            "on": _run(tmp_path_factory, "on", SPEC + ["logging.loss_grad_every=1"]),
            "grpo": _run(tmp_path_factory, "grpo", ["rl.algo=grpo"])}


def test_diagnostic_leaves_the_update_bit_identical(runs):
    assert runs["on"]["params"] == runs["off"]["params"]
    for on, off in zip(runs["on"]["rows"], runs["off"]["rows"]):
        assert on["loss"] == off["loss"]
        assert on["vp2o/grad_norm"] == off["vp2o/grad_norm"]


def test_norms_logged_per_layer_only_when_on(runs):
    for row in runs["on"]["rows"]:
        layers = sorted(k.rsplit("/", 1)[1] for k in row if k.startswith("spec/grad_norm_pg/"))
        assert layers, row.keys()
        for n in layers:
            for key in ("grad_norm_pg", "grad_norm_ortho", "grad_norm_var", "grad_ratio_ortho", "grad_ratio_var"):
                value = row[f"spec/{key}/{n}"]
                assert math.isfinite(value) and value > 0, (key, n, value)
            assert row[f"spec/grad_ratio_var/{n}"] == pytest.approx(
                row[f"spec/grad_norm_var/{n}"] / row[f"spec/grad_norm_pg/{n}"], rel=1e-5)
    assert not any(k.startswith("spec/") for row in runs["off"]["rows"] for k in row)


@pytest.mark.parametrize("run", ["on", "grpo"])
def test_ratio_quantiles_logged_by_both_learners(runs, run):
    for row in runs[run]["rows"]:
        p50, p99, top = row["policy/ratio_p50"], row["policy/ratio_p99"], row["policy/ratio_max"]
        assert 0 < p50 <= p99 <= top, row

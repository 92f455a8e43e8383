"""Contract (issue 19): a VP2O learner step with megatron's activation recompute (``model.recompute``
full and selective) gives the same parameters, losses and VP2O statistics (co-activation counts,
active sets, captures, loss logs, router entropy, Stein metrics) as without, bitwise on the CPU path,
for 1 rank, EP=2 and PP=2; and a forward saves fewer activation bytes with recompute."""

from __future__ import annotations

import pytest

from harness import run_world

LAYOUTS = {"1rank": (1, {}), "ep2": (2, {"ep": 2}), "pp2": (2, {"pp": 2})}
MODES = ("full", "selective")


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    init = str(tmp_path_factory.mktemp("recompute") / "init")
    run_world(1, "distributed.worlds_recompute:init_weights", {"init": init})
    return {name: run_world(n, "distributed.worlds_recompute:layout_modes", {"init": init, "parallel": par})
            for name, (n, par) in LAYOUTS.items()}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_recompute_step_is_bitwise_the_same(worlds, name, mode):
    got = worlds[name][mode]
    assert worlds[name]["world"] == LAYOUTS[name][0]
    assert worlds[name]["num_layers_captured"] >= 1
    assert got["loss"][0] == got["loss"][1], got
    assert got["decision"][0] == got["decision"][1], got
    assert got["d_anc"][0] == got["d_anc"][1], got
    for key in ("params", "counts", "loss_log", "captured", "active", "stats_equal"):
        assert got[key], (key, got)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["1rank", "ep2"])
def test_recompute_saves_fewer_activations(worlds, name, mode):
    without, with_rc = worlds[name][mode]["saved_bytes"]
    assert with_rc < without, (without, with_rc)


def test_print_recompute_numbers(worlds):
    """Not a check: the numbers for the log (run with -s)."""
    for name, report in worlds.items():
        for mode in MODES:
            r = report[mode]
            print(f"{name} {mode}: params {r['params']} max diff {r['max_param_diff']:.1e} counts {r['counts']} "
                  f"loss {r['loss']} decision {r['decision']} saved bytes {r['saved_bytes']}")

"""Contract: `vp2o train --resume` of an RL checkpoint written before checkpoints kept the RL loop state
is refused in the pre-flight with one stderr line naming what it lacks and how to go on from its weights
(``rl.policy``, a fresh run), exit code 2, no traceback, nothing in its directory written or changed; the
line's fix works.

The checkpoint is a real one of a 1-step tiny `vp2o train`, made "pre-loop-state" as checkpoints were before
05c75cd: its common ``extra`` in the old layout (step, refreshes, steps_since_refresh, force_refresh, skipped,
vp2o_steps_since_refresh, vp2o_counters) and its rank file a full pickle (the format before plain-data state).
``fixtures/v0.1.0-rl-pre_loop_state`` (docs/errors.md's example) holds only what the pre-flight reads: the
vp2o.json of ``v0.1.0-inner_epochs``, an empty torch-DCP ``.metadata`` and a ``common.pt`` of that layout."""

import hashlib
import shutil
from pathlib import Path

import pytest
import torch

from e2e.test_sft import TINY, vp2o
from harness import ROOT
from megatron_vp2o.checkpoint.meta import (RL_LOOP_KEYS, latest_checkpoint, loop_state_refusal, missing_loop_keys,
                                           missing_rl_loop_state)

pytestmark = pytest.mark.slow  # runs `vp2o train` end to end (~15 s each)

QUICK = ["--config", TINY, "logging.progress=false", "rl.eval_prompts=null", "rl.prompts_per_step=4",
         "rl.policy_loss.group_size=4", "rl.sampling.max_new_tokens=5", "checkpoint.every=1"]
LACKS = "next_refresh, forced, anchor_failed, samples, tokens, elapsed_s"
FIXTURE = ROOT / "tests" / "checkpoint" / "fixtures" / "v0.1.0-rl-pre_loop_state"


def _make_pre_loop_state(found: Path) -> None:
    """Rewrite ``found``'s common state and rank file as an RL checkpoint from before 05c75cd had them."""
    import megatron_vp2o.rl.state  # noqa: F401  (the buffer's dataclasses, which load_state rebuilds)
    from megatron_vp2o.checkpoint.state import load_state

    common = torch.load(found / "common.pt", weights_only=True)
    new = common["extra"]
    common["extra"] = {"step": new["step"], "refreshes": new["refreshes"],
                       "steps_since_refresh": new["steps_since_refresh"], "force_refresh": False,
                       "skipped": new["skipped"], "vp2o_steps_since_refresh": new["steps_since_refresh"],
                       "vp2o_counters": new["vp2o_counters"]}
    torch.save(common, found / "common.pt")
    rank = load_state(found / "rank0.pt")
    torch.save(dict(rank, last_reward_metrics={"reward/mean": 0.5}), found / "rank0.pt")  # a full pickle


def _snapshot(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(the out dir of a 1-step run whose checkpoint is pre-loop-state, that checkpoint, a complete copy)."""
    base = tmp_path_factory.mktemp("pre_loop_state")
    proc = vp2o(["train", *QUICK, "rl.steps=1", "--out", str(base / "old")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = latest_checkpoint(base / "old" / "checkpoints")
    if not (found / "common.pt").is_file():  # megatron-core >= 0.19: common state inside the sharded files
        pytest.skip("megatron-core >= 0.19 writes no common.pt (compat.py row 5): the pre-loop-state layout is "
                    "a 0.16 one; the RL session's own check is test_a_0_19_layout_is_left_to_the_session")
    complete = base / "complete"
    shutil.copytree(found, complete)
    _make_pre_loop_state(found)
    return base / "old", found, complete


def test_resume_is_refused_in_one_line_and_nothing_is_written(runs):
    out, found, _ = runs
    before = _snapshot(out)
    proc = vp2o(["train", *QUICK, "rl.steps=2", "--out", str(out), "--resume"])
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[0] == (f"vp2o train: error: --resume: checkpoint '{found}' was written before RL checkpoints kept "
                        f"the loop state (it lacks {LACKS}), so its run cannot be resumed; start a fresh run from "
                        f"its weights instead: rl.policy={found} with a new --out, without --resume")
    assert _snapshot(out) == before  # byte-identical, no file added or removed


def test_the_fix_in_the_line_works(runs, tmp_path):
    out, found, _ = runs
    before = _snapshot(out)
    proc = vp2o(["train", *QUICK, "rl.steps=1", "--out", str(tmp_path / "fresh"), f"rl.policy={found}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "fresh" / "checkpoints" / "latest").read_text() == "iter_0000001"
    assert _snapshot(out) == before


def test_which_checkpoints_lack_the_loop_state(runs):
    from megatron_vp2o.rl.state import LoopState, loop_extra

    _, found, complete = runs
    assert RL_LOOP_KEYS == tuple(loop_extra(LoopState()))  # the pre-flight's list is the saved fields
    assert missing_rl_loop_state(found) == LACKS.split(", ") == missing_rl_loop_state(FIXTURE)
    assert missing_rl_loop_state(complete) == []
    assert missing_rl_loop_state(ROOT / "checkpoints" / "tiny_policy" / "iter_0001000") == []  # sft: not asked
    assert torch.load(FIXTURE / "common.pt", weights_only=True)["extra"].keys() < \
        torch.load(found / "common.pt", weights_only=True)["extra"].keys()  # the fixture's layout is the old one


def test_a_0_19_layout_is_left_to_the_session(tmp_path):
    """A checkpoint without ``common.pt`` (megatron-core 0.19's layout) is not judged by the pre-flight,
    which cannot read the sharded common state; the RL session refuses it when it loads, with the same
    line (rl/session.py restore_loop_state), from the keys `missing_loop_keys` names."""
    shutil.copytree(FIXTURE, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "common.pt").unlink()
    assert missing_rl_loop_state(tmp_path / "ckpt") == []
    assert missing_loop_keys({"step": 1, "refreshes": 0, "steps_since_refresh": 0, "force_refresh": False,
                              "skipped": 0}) == LACKS.split(", ")
    assert missing_loop_keys(None) == list(RL_LOOP_KEYS)
    assert missing_loop_keys(dict.fromkeys(RL_LOOP_KEYS, 0)) == []
    assert loop_state_refusal("/c", ["next_refresh"]) == (
        "--resume: checkpoint '/c' was written before RL checkpoints kept the loop state (it lacks next_refresh), "
        "so its run cannot be resumed; start a fresh run from its weights instead: rl.policy=/c with a new --out, "
        "without --resume")

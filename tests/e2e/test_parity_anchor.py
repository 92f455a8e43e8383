"""Contract (the parity anchor, issue 21 item 5): VP2O with every part ablated (rl.ablate.*=false),
vp2o.trust_region.enabled=false and GRPO's clip, mini-batches and epochs (rl.vp2o.* = rl.grpo.*) is
GRPO, bit for bit: a few tiny-recipe steps on one rank log the same losses, rewards, rollout counts
and last grad norm, and end with the same parameters and optimizer state, while running the VP2O
learner (VP2O MoE layers, vp2o_train_step in GRPO's mini-batch loop; rl.learner.epochs)."""

from __future__ import annotations

import json

import torch

from e2e.test_rl import QUICK
from e2e.test_sft import TINY, vp2o

STEPS = 3
GRPO = ["rl.algo=grpo"]  # tiny_cpu.yaml's rl.grpo: clip 0.1, 2 mini-batches x 2 epochs
VP2O_AS_GRPO = ["rl.algo=vp2o", *(f"rl.ablate.{part}=false" for part in (
    "stein", "attraction", "repulsion", "specialization", "anchor_budget", "behaviour_budget")),
    "vp2o.trust_region.enabled=false", "rl.vp2o.clip_eps=0.1", "rl.vp2o.mini_batches=2", "rl.vp2o.epochs=2"]
SAME = ("loss", "skipped_steps", "vp2o/refresh_reason", "vp2o/refreshes")  # plus every reward/* and rollout/*


def _run(tmp_path, name, overrides):
    out = tmp_path / name
    proc = vp2o(["train", "--config", TINY, "--out", str(out), *QUICK, f"rl.steps={STEPS}", *overrides])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return rows, _tensors(out / "checkpoints" / f"iter_{STEPS:07d}", tmp_path / f"{name}.pt")


def _tensors(ckpt, flat) -> dict:
    """Every tensor of a dist checkpoint (model and optimizer state), read without a process group."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(ckpt), str(flat))
    return {k: v for k, v in torch.load(flat, weights_only=False).items() if torch.is_tensor(v)}


def test_vp2o_with_every_part_off_is_grpo_bit_for_bit(tmp_path):
    grpo_rows, grpo_state = _run(tmp_path, "grpo", GRPO)
    vp2o_rows, vp2o_state = _run(tmp_path, "vp2o", VP2O_AS_GRPO)
    assert [r["step"] for r in vp2o_rows] == list(range(1, STEPS + 1))
    assert all(r["vp2o/optimizer_steps"] == 4 and "moe/utilisation/layer1" in r for r in vp2o_rows)  # VP2O's learner
    for g, v in zip(grpo_rows, vp2o_rows, strict=True):
        keys = [k for k in g if k in SAME or k.startswith(("reward/", "rollout/"))]
        assert {k: g[k] for k in keys} == {k: v[k] for k in keys}, g["step"]
        assert "reward/mean" in g and g["learner/grad_norm"] == v["vp2o/grad_norm"]
    assert set(vp2o_state) - set(grpo_state) == {"decoder.layers.mlp.protos_XD"}  # VP2O's prototype buffer
    differ = [k for k in grpo_state if not torch.equal(grpo_state[k], vp2o_state[k])]
    assert not differ and any(k.startswith("optimizer.") for k in grpo_state), differ

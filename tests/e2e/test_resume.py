"""Contract: `vp2o sft --resume` continues exactly (bitwise on CPU) from the newest complete checkpoint,
and a half-written checkpoint directory is ignored."""

import json
import shutil

from e2e.test_sft import TINY, vp2o

ARGS = ["sft", "--config", TINY, "logging.progress=false", "train.steps=6", "checkpoint.every=3",
        "model.num_layers=2", "model.hidden_size=64", "model.moe_ffn_hidden_size=64"]


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_resume_is_bitwise_and_ignores_partial_checkpoints(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert vp2o(ARGS + ["--out", str(full)]).returncode == 0
    first = vp2o(ARGS + ["--out", str(cut), "train.steps=3"])
    assert first.returncode == 0, first.stderr[-2000:]
    ckpts = cut / "checkpoints"
    # a crash while writing step 4 leaves a .tmp directory and must not be picked up
    shutil.copytree(ckpts / "iter_0000003", ckpts / "iter_0000004.tmp")
    (ckpts / "iter_0000004.tmp" / "vp2o.json").unlink()
    resumed = vp2o(ARGS + ["--out", str(cut), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = rows(full), rows(cut)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b):
        assert (ra["loss"], ra["grad_norm"], ra["lr"]) == (rb["loss"], rb["grad_norm"], rb["lr"]), (ra, rb)

"""Contract: a config saved by an older version loads through the migration table (config/migrate.py);
a checkpoint of a newer, unknown version is refused with one line; new checkpoints record the version;
both shipped policies (saved before rl.inner_epochs became rl.epochs) convert to HF.

Fixtures (tests/checkpoint/fixtures/): ``v0.1.0-inner_epochs`` is the vp2o.json of an RL checkpoint
written before the rename (no version recorded), ``v0.2.0-shared_clip`` one of a GRPO run of 0.2.0 (GRPO's
loop at rl level, clip 0.1 in the shared rl.policy_loss.clip_eps), ``v9.0.0-future`` one of a version after
ours."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest

import megatron_vp2o
from harness import ROOT
from megatron_vp2o.checkpoint.meta import check_same_model, new_meta, read_meta
from megatron_vp2o.config import Config, ConfigError, build, to_dict
from megatron_vp2o.config.migrate import MIGRATIONS, PROJECT_VERSION, migrate_config, parse_version, table

FIXTURES = ROOT / "tests" / "checkpoint" / "fixtures"
OLD, FUTURE = FIXTURES / "v0.1.0-inner_epochs", FIXTURES / "v9.0.0-future"
SHARED_CLIP = FIXTURES / "v0.2.0-shared_clip"
SHIPPED = ("checkpoints/tiny_policy", "checkpoints/tiny_policy_sum3")


def _has(data: dict, dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return False
        data = data[part]
    return True


def test_table_targets_are_keys_of_this_version():
    """Every target is a key of this version, or the old key of a later entry (a chain of renames)."""
    defaults = to_dict(Config())
    for i, change in enumerate(MIGRATIONS):
        later = {c.old for c in MIGRATIONS[i + 1:]}
        assert not _has(defaults, change.old), change
        targets = [change.target({"rl": {"algo": algo}}) for algo in ("grpo", "vp2o")] if change.new else []
        assert all(_has(defaults, t) or t in later for t in targets), change
        assert all(_has(defaults, key) or key in later for key, _ in change.implies), change
        assert parse_version(change.version, "t") <= parse_version(PROJECT_VERSION, "t")
    assert "rl.inner_epochs -> rl.epochs" in table() and "rl.epochs -> rl.grpo.epochs" in table()
    assert PROJECT_VERSION == megatron_vp2o.__version__ == "0.3.0"


def test_old_fixture_loads_through_the_migration():
    meta = read_meta(OLD, "rl.policy")
    rl = meta["config"]["rl"]
    assert "inner_epochs" not in rl and rl["grpo"] == {"epochs": 2, "mini_batches": 1}  # one step per pass, as then
    cfg = build(Config, meta["config"])
    assert cfg.rl.algo == "grpo" and (cfg.rl.grpo.epochs, cfg.rl.grpo.mini_batches) == (2, 1)
    assert json.loads((OLD / "vp2o.json").read_text())["config"]["rl"]["inner_epochs"] == 2  # the file is untouched


def test_migration_is_idempotent_and_keeps_new_keys():
    saved = {"rl": {"inner_epochs": 3, "epochs": 5}}
    once = migrate_config(saved, None)
    assert once == {"rl": {"grpo": {"epochs": 5, "mini_batches": 1}}} and migrate_config(once, PROJECT_VERSION) == once
    kept = migrate_config({"rl": {"mini_batches": 4, "grpo": {"mini_batches": 2}}}, "0.2.0")
    assert kept == {"rl": {"grpo": {"mini_batches": 2}}}


def test_shared_clip_of_0_2_0_goes_to_the_algorithm_that_ran():
    """0.2.0 kept GRPO's loop at rl level and one clip for both algorithms: a GRPO run's config gets its
    clip, mini-batches and epochs in rl.grpo; a VP2O run's null clip (none for vp2o, 0.2 for grpo) leaves
    both sections' defaults, which mean what null meant."""
    meta = read_meta(SHARED_CLIP, "rl.policy")
    assert meta["version"] == "0.2.0" and "clip_eps" not in meta["config"]["rl"]["policy_loss"]
    cfg = build(Config, meta["config"])
    assert cfg.rl.algo == "grpo" and (cfg.rl.clip_eps, cfg.rl.grpo.mini_batches, cfg.rl.grpo.epochs) == (0.1, 2, 2)
    product = build(Config, read_meta(ROOT / "checkpoints/tiny_policy_product/iter_0001000", "x")["config"])
    assert product.rl.algo == "vp2o" and product.rl.clip_eps is None and product.rl.vp2o == type(product.rl.vp2o)()
    assert (product.rl.grpo.clip_eps, product.rl.grpo.mini_batches, product.rl.grpo.epochs) == (0.2, 2, 2)
    vp2o_clip = migrate_config({"rl": {"policy_loss": {"clip_eps": 0.3}}}, "0.2.0")  # rl.algo absent: vp2o
    assert vp2o_clip == {"rl": {"policy_loss": {}, "vp2o": {"clip_eps": 0.3}}}


def test_future_version_is_refused_in_one_line():
    with pytest.raises(ConfigError) as info:
        read_meta(FUTURE, "rl.policy")
    msg = str(info.value)
    assert "\n" not in msg and "9.0.0" in msg and PROJECT_VERSION in msg and "newer" in msg
    with pytest.raises(ConfigError, match="newer than this"):
        check_same_model(FUTURE, Config().model, "rl.policy")
    with pytest.raises(ConfigError, match="not a version"):
        migrate_config({}, "latest")


def test_new_checkpoints_record_this_version():
    assert new_meta(kind="sft", step=3) == {"kind": "sft", "step": 3, "version": PROJECT_VERSION}


def test_pre_rename_config_and_weights_pass_the_preflight(tmp_path):
    """The old fixture's vp2o.json beside the tiny policy's weights: same model, safe, loads as rl.policy."""
    ckpt = tmp_path / "old"
    shutil.copytree(ROOT / "checkpoints/tiny_policy/iter_0001000", ckpt)
    shutil.copy(OLD / "vp2o.json", ckpt / "vp2o.json")
    model = build(Config, read_meta(ckpt, "rl.policy")["config"]).model
    assert check_same_model(ckpt, model, "rl.policy") == ckpt
    assert dataclasses.asdict(model) == dataclasses.asdict(build(Config, read_meta(ROOT / SHIPPED[0] / "iter_0001000", "x")["config"]).model)


def _convert(ckpt, out):
    return subprocess.run([sys.executable, "-m", "megatron_vp2o.cli.main", "convert", "mcore-to-hf", "--ckpt",
                           str(ckpt), "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})


@pytest.mark.slow
@pytest.mark.parametrize("ckpt", [*SHIPPED, "old-fixture"])
def test_saved_before_the_rename_converts_to_hf(ckpt, tmp_path):
    if ckpt == "old-fixture":  # the fixture's config with real weights: config and weights load
        src = tmp_path / "old" / "iter_0000003"
        shutil.copytree(ROOT / "checkpoints/tiny_policy/iter_0001000", src)
        shutil.copy(OLD / "vp2o.json", src / "vp2o.json")
        ckpt = src.parent
    saved = json.loads(next((ROOT / ckpt).glob("iter_*/vp2o.json")).read_text())
    assert "inner_epochs" in saved["config"]["rl"] and "version" not in saved  # written before the rename
    proc = _convert(ckpt, tmp_path / "hf")
    assert proc.returncode == 0, proc.stderr[-3000:]
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf["num_local_experts"] == saved["config"]["model"]["num_experts"]


def test_future_checkpoint_does_not_convert(tmp_path, capsys):
    from megatron_vp2o.cli.main import main

    assert main(["convert", "mcore-to-hf", "--ckpt", str(FUTURE), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "9.0.0" in err and not (tmp_path / "hf").exists()

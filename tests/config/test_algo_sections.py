"""Contract: one switch per algorithm (config/rl.py): ``rl.algo`` alone picks the section (``rl.grpo`` /
``rl.vp2o``) that holds the algorithm's tuned clip, mini-batches, epochs and lr, so the tiny config runs
either as tuned; YAMLs and command lines of 0.2.0 (GRPO's loop at rl level, one shared clip) load
through the migration table, with a FutureWarning naming each key's new place."""

import warnings

import pytest

from megatron_vp2o.config import ConfigError, load_config

TINY = "examples/configs/tiny_cpu.yaml"


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch, request):
    monkeypatch.chdir(request.config.rootpath)


def _quiet(path, overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the shipped configs use this version's keys
        return load_config(path, overrides)


@pytest.mark.parametrize("path", [TINY, "examples/configs/tiny_cpu_sum3.yaml",
                                  "examples/configs/tiny_cpu_digit_product.yaml"])
def test_rl_algo_alone_runs_each_as_tuned(path):
    grpo, vp2o = _quiet(path, ["rl.algo=grpo"]).rl, _quiet(path, ["rl.algo=vp2o"]).rl
    assert (grpo.loss_name, grpo.clip_eps, grpo.loop.mini_batches, grpo.loop.epochs, grpo.resolved_lr) == (
        "grpo_clip", 0.1, 2, 2, 3e-4)
    assert (vp2o.loss_name, vp2o.clip_eps, vp2o.loop.mini_batches, vp2o.loop.epochs, vp2o.resolved_lr) == (
        "vp2o", None, 1, 1, 3e-4)
    assert grpo.grpo == vp2o.grpo and grpo.vp2o == vp2o.vp2o  # the switch changes nothing else


def test_an_algorithm_lr_wins_over_the_shared_one():
    rl = _quiet(TINY, ["rl.algo=grpo", "rl.grpo.lr=1e-3", "rl.vp2o.lr=5e-5"]).rl
    assert rl.resolved_lr == 1e-3 and _quiet(TINY, ["rl.vp2o.lr=5e-5"]).rl.resolved_lr == 5e-5


def test_old_yaml_keys_load_through_the_migration(tmp_path):
    text = open(TINY).read().replace("  grpo:\n    clip_eps: 0.1\n    mini_batches: 2\n    epochs: 2\n",
                                     "  mini_batches: 2\n  epochs: 3\n")
    text = text.replace("    group_size: 8\n", "    group_size: 8\n    clip_eps: 0.15\n")
    assert "\n  grpo:\n" not in text and "clip_eps: 0.15" in text
    old = tmp_path / "old.yaml"
    old.write_text(text)
    with pytest.warns(FutureWarning, match="rl.mini_batches is rl.grpo.mini_batches since megatron-vp2o 0.3.0"):
        grpo = load_config(old, ["rl.algo=grpo"]).rl  # the shared clip goes to the algorithm that runs
    assert (grpo.clip_eps, grpo.grpo.mini_batches, grpo.grpo.epochs) == (0.15, 2, 3)
    with pytest.warns(FutureWarning):
        vp2o = load_config(old, []).rl
    assert (vp2o.clip_eps, vp2o.grpo.clip_eps, vp2o.grpo.epochs) == (0.15, 0.2, 3)


def test_old_override_keys_are_the_last_word():
    with pytest.warns(FutureWarning, match="rl.policy_loss.clip_eps is rl.grpo.clip_eps"):
        rl = load_config(TINY, ["rl.policy_loss.clip_eps=0.3", "rl.mini_batches=4", "rl.algo=grpo"]).rl
    assert (rl.clip_eps, rl.grpo.mini_batches, rl.grpo.epochs) == (0.3, 4, 2)
    with pytest.warns(FutureWarning):
        assert load_config(TINY, ["rl.policy_loss.clip_eps=0.3"]).rl.vp2o.clip_eps == 0.3


@pytest.mark.parametrize("override, words", [
    ("rl.grpo.clip_eps=0", ["rl.grpo.clip_eps", "(0, 1)"]),
    ("rl.grpo.clip_eps=null", ["rl.grpo.clip_eps", "number"]),
    ("rl.vp2o.clip_eps=1.5", ["rl.vp2o.clip_eps", "(0, 1) or null"]),
    ("rl.grpo.mini_batches=0", ["rl.grpo.mini_batches", ">= 1"]),
    ("rl.vp2o.epochs=0", ["rl.vp2o.epochs", ">= 1"]),
    ("rl.vp2o.lr=-1", ["rl.vp2o.lr", "> 0 or null"]),
    ("rl.grpo.clipeps=0.1", ["rl.grpo.clipeps", "clip_eps"]),
])
def test_section_fields_are_checked(override, words):
    with pytest.raises(ConfigError) as info:
        load_config(TINY, [override])
    assert "\n" not in str(info.value) and all(w in str(info.value) for w in words), str(info.value)

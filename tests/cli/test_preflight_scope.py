"""Contract: each command's pre-flight (cli/checks.py) checks only the fields that command reads: RL
(`vp2o train`) under 4 ranks is not refused for train.global_batch_size (an SFT field), `vp2o sft` is."""

import pytest

from megatron_vp2o.cli.main import parse_args, subcommand_modules, validate_args
from megatron_vp2o.config import ConfigError

TINY = "examples/configs/tiny_cpu.yaml"  # train.global_batch_size 32, micro_batch_size 16


@pytest.fixture
def four_ranks(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "4")
    return str(tmp_path / "out")


def _preflight(argv):
    args = parse_args(argv)
    validate_args(args, subcommand_modules())
    return args.cfg


def test_rl_under_four_ranks_ignores_the_sft_batch(four_ranks):
    cfg = _preflight(["train", "--config", TINY, "--out", four_ranks])
    assert cfg.train.global_batch_size % (cfg.train.micro_batch_size * 4)  # what SFT would refuse


def test_sft_under_four_ranks_checks_its_batch(four_ranks):
    with pytest.raises(ConfigError, match="train.global_batch_size=32 must be a multiple"):
        _preflight(["sft", "--config", TINY, "--out", four_ranks])


def test_sft_does_not_read_rl_inputs(tmp_path):
    cfg = _preflight(["sft", "--config", TINY, "--out", str(tmp_path / "o"), "rl.prompts=data/prompts/nope.jsonl",
                      "rl.policy=checkpoints/nope"])
    assert cfg.rl.prompts.endswith("nope.jsonl")


def test_train_checks_the_chosen_algorithms_mini_batches_per_rank(tmp_path, monkeypatch):
    """rl.<algo>.mini_batches must split each data-parallel rank's prompt groups (8 prompts / 2 ranks = 4);
    the other algorithm's section is not read."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = str(tmp_path / "o")
    with pytest.raises(ConfigError, match=r"rl.grpo.mini_batches=8 must divide the 4 prompt groups .* \[1, 2, 4\]"):
        _preflight(["train", "--config", TINY, "--out", out, "rl.algo=grpo", "rl.grpo.mini_batches=8"])
    assert _preflight(["train", "--config", TINY, "--out", out, "rl.algo=vp2o", "rl.grpo.mini_batches=8"])


def test_vp2o_mini_batch_epochs_need_the_anchor_budget_off(tmp_path):
    out = str(tmp_path / "o")
    with pytest.raises(ConfigError, match="rl.vp2o.mini_batches x rl.vp2o.epochs = 4 .* anchor budget off"):
        _preflight(["train", "--config", TINY, "--out", out, "rl.vp2o.mini_batches=2", "rl.vp2o.epochs=2"])
    for off in ("vp2o.trust_region.enabled=false", "rl.ablate.anchor_budget=false"):
        cfg = _preflight(["train", "--config", TINY, "--out", out, "rl.vp2o.mini_batches=2", "rl.vp2o.epochs=2", off])
        assert (cfg.rl.loop.mini_batches, cfg.rl.loop.epochs) == (2, 2)
